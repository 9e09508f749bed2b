//! The network APIs. Each one translates its protocol into calls on
//! [`Aggregates`](crate::actor::Aggregates) and maps
//! [`CommandError`](crate::error::CommandError) codes to its own statuses;
//! none holds domain logic.
//!
//! - [`http`]: HTTP/JSON with axum.

pub mod http;
