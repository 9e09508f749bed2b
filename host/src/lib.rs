//! Rehydra: a host for event-sourced aggregates whose domain logic is a
//! sandboxed WebAssembly component.
//!
//! A request flows `api` → `actor` → `plugin` and `store`:
//!
//! - [`api`]: the HTTP/JSON and gRPC servers; each maps the error model to
//!   its own statuses.
//! - [`auth`]: bearer tokens and the principal they stand for.
//! - [`actor`]: one mailbox per live aggregate; concurrency, idempotency,
//!   rehydration, passivation.
//! - [`plugin`]: wasmtime, the sandbox, the WIT bindings, the registry.
//! - [`store`]: the event store trait and its backends.
//! - [`subscription`]: following the global event log (gRPC streams, SSE,
//!   `rehydra subscribe`).
//! - [`command`], [`error`]: the domain's requests, outcomes and errors.
//! - [`metrics`]: what `GET /metrics` exports.
//! - [`server`], [`cli`], [`client`]: the binary's entry points.
//! - [`scaffold`]: `rehydra new`, plugin projects from templates.
//!
//! See ARCHITECTURE.md at the repository root for the invariants.

pub mod actor;
pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod command;
pub mod error;
pub mod metrics;
pub mod plugin;
pub mod process;
pub mod scaffold;
pub mod server;
pub mod store;
pub mod subscription;
pub mod timer;
