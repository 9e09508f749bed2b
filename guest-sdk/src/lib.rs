//! Write Rehydra aggregates in Rust.
//!
//! A Rehydra plugin is a WebAssembly component holding the domain logic of
//! one event-sourced aggregate type: which events a command produces
//! (`handle`) and how events fold into state (`apply`). The host owns
//! everything else — the event store, routing, concurrency, snapshots, the
//! API. This crate lets you write that logic as plain Rust: implement
//! [`Aggregate`] on a type and export it with
//! [`export_aggregate!`]. Commands, events and state are serde types; the
//! SDK does the JSON, the dispatch by command name, the field errors and the
//! WIT plumbing.
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "counter"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! # Not on crates.io yet: point at a checkout of the Rehydra repository.
//! rehydra-guest = { path = "../rehydra/guest-sdk" }
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```rust,standalone_crate
//! //! A counter: started with a label, incremented, reset.
//! use rehydra_guest::{Aggregate, CommandSpec, Context, Decision, Rejection};
//! use serde::{Deserialize, Serialize};
//!
//! pub struct Counter;
//!
//! /// Stored as `{"label": "...", "total": 0}`.
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! pub struct State {
//!     label: String,
//!     total: u64,
//! }
//!
//! /// One variant per command; the kebab-case name is the command's name.
//! #[derive(Deserialize)]
//! #[serde(rename_all = "kebab-case")]
//! pub enum Command {
//!     Start { label: String },
//!     Increment { by: u64 },
//!     Reset,
//! }
//!
//! /// One variant per event; the variant name is the stored event type.
//! #[derive(Serialize, Deserialize)]
//! pub enum Event {
//!     Started { label: String },
//!     Incremented { by: u64 },
//!     Reset,
//! }
//!
//! impl Aggregate for Counter {
//!     const TYPE: &'static str = "counter";
//!     const STREAM_PREFIX: &'static str = "counter";
//!     const COMMANDS: &'static [CommandSpec] = &[
//!         CommandSpec::create("start"),
//!         CommandSpec::update("increment"),
//!         CommandSpec::update("reset"),
//!     ];
//!     type State = State;
//!     type Command = Command;
//!     type Event = Event;
//!
//!     fn handle(state: &State, command: Command, ctx: &Context) -> Result<Decision<Event>, Rejection> {
//!         match command {
//!             Command::Start { label } if label.trim().is_empty() => {
//!                 Err(Rejection::invalid("label", "is required"))
//!             }
//!             Command::Start { label } => Ok(Event::Started { label }.into()),
//!             Command::Increment { by: 0 } => Err(Rejection::invalid("by", "must be greater than 0")),
//!             Command::Increment { by } => {
//!                 let total = state.total.checked_add(by).ok_or_else(|| Rejection::rejected("too large"))?;
//!                 // The reply goes back to the client: here, the new total.
//!                 Ok(Decision::emit(Event::Incremented { by }).with_reply(total))
//!             }
//!             // Nothing to do: no events.
//!             Command::Reset if state.total == 0 => Ok(Decision::none()),
//!             Command::Reset => {
//!                 rehydra_guest::log::info(format_args!("{} reset", ctx.aggregate_id()));
//!                 Ok(Event::Reset.into())
//!             }
//!         }
//!     }
//!
//!     fn apply(state: &mut State, event: Event) {
//!         match event {
//!             Event::Started { label } => state.label = label,
//!             Event::Incremented { by } => state.total += by,
//!             Event::Reset => state.total = 0,
//!         }
//!     }
//! }
//!
//! rehydra_guest::export_aggregate!(Counter);
//! #
//! # fn main() {
//! #     use rehydra_guest::dispatch;
//! #     let s0 = dispatch::initial_state::<Counter>().unwrap();
//! #     let s1 = dispatch::handle::<Counter>(&s0, "start", br#"{"label":"hits"}"#, &Context::new("c1", 0)).unwrap();
//! #     let s2 = dispatch::handle::<Counter>(&s1.state, "increment", br#"{"by":2}"#, &Context::new("c1", 1)).unwrap();
//! #     assert_eq!(s2.reply.as_deref(), Some(&b"2"[..]));
//! #     assert_eq!(s2.state.bytes, br#"{"label":"hits","total":2}"#);
//! #     let s3 = dispatch::handle::<Counter>(&s2.state, "reset", b"", &Context::new("c1", 2)).unwrap();
//! #     assert_eq!(s3.events[0].event_type, "Reset");
//! # }
//! ```
//!
//! The state, command and event types appear in the trait's signatures,
//! so they must be at least as public as the aggregate type (all `pub`
//! here).
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the
//! `.wasm` in `target/wasm32-wasip2/release/` is the component. Drop it into
//! the host's plugin directory and the host loads it (and reloads it when
//! the file changes).
//!
//! # How a command runs
//!
//! For each command the host makes one call. The SDK decodes the
//! aggregate's state, picks the [`Command`](Aggregate::Command) variant by
//! the command's name and deserializes the command's JSON data into it,
//! runs [`handle`](Aggregate::handle), then passes each resulting event —
//! read back from the JSON that will be stored — through
//! [`apply`](Aggregate::apply) to compute the new state. Rebuilding the
//! aggregate from its stream later runs the very same `apply`, so the two
//! always agree. `apply` gets each event's data only: the SDK leaves the
//! event's stored metadata (one JSON string in the contract) unparsed.
//!
//! * Data that does not fit the command becomes [`Rejection::Invalid`],
//!   naming the field (`"by"`); a missing field is `"is required"`. A
//!   command name missing from [`COMMANDS`](Aggregate::COMMANDS) is
//!   [`Rejection::Rejected`] (the host normally refuses it first).
//! * Domain refusals are [`Rejection::rejected`] (HTTP 422) and
//!   [`Rejection::forbidden`] (HTTP 403); several invalid fields at once are
//!   collected with [`FieldErrors`].
//! * [`Context`] has the aggregate's id and version and the command's
//!   metadata: [`now`](Context::now), [`principal`](Context::principal),
//!   message, correlation and causation ids. The plugin has no clock: use
//!   `now`.
//! * [`log`] writes to the host's log.
//! * A [`Decision`] can also schedule commands for later ([`Timer`],
//!   [`Decision::schedule`]) and cancel them ([`Decision::cancel_timer`]):
//!   durable timers the host stores with the events and sends once when
//!   due. A command a timer sent has [`Context::timer`].
//!
//! State is JSON tagged with [`STATE_SCHEMA`](Aggregate::STATE_SCHEMA).
//! State of another schema, or that does not read as your `State`, makes
//! the SDK ask the host to rebuild it from the events
//! ([`Rejection::IncompatibleState`]); empty state bytes read as
//! `State::default()`, which is also what `initial-state` returns.
//!
//! # Testing
//!
//! `handle` and `apply` are plain functions: call them in unit tests. To
//! go through the same JSON the host sees, use [`dispatch`], which runs
//! natively.
//!
//! # Failures
//!
//! Nothing the client sends makes the plugin trap: bad data is a
//! rejection. A plugin *bug* that the WIT has no way to report — commands
//! declared in [`COMMANDS`](Aggregate::COMMANDS) that do not match the
//! command enum, an event that cannot be encoded as JSON or read back, a
//! reply or a timer's data that cannot be encoded — panics with a message naming the
//! plugin. The panic traps; the host reports it (`plugin_failed`, or a
//! plugin that fails to load) and nothing is stored.

#![warn(missing_docs)]

mod aggregate;
mod codec;
mod context;
mod decision;
pub mod dispatch;
mod encode;
mod export;
pub mod log;
mod process;
mod rejection;
mod timer;

pub use aggregate::{Aggregate, CommandMode, CommandSpec};
pub use context::{Context, TimerFiring};
pub use decision::Decision;
pub use process::{
    AggregateRef, Follow, FollowedEvent, InstanceKey, ProcessDescription, ProcessManager, Refusal,
    process_info,
};
pub use rejection::{FieldError, FieldErrors, Rejection};
pub use timer::{Due, Timer, TimerChange};

/// The bindings wit-bindgen generates for the `aggregate` world of
/// `wit/aggregate.wit` (`rehydra:aggregate@0.3.0`). Not part of the API:
/// use [`export_aggregate!`].
#[doc(hidden)]
#[allow(missing_docs, clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "aggregate",
        pub_export_macro: true,
        export_macro_name: "__export_aggregate_world",
        default_bindings_module: "rehydra_guest::bindings",
    });
}

/// The bindings wit-bindgen generates for the `process-manager` world.
/// Not part of the API: use [`export_process_manager!`].
#[doc(hidden)]
#[allow(missing_docs, clippy::too_many_arguments)]
pub mod process_bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "process-manager",
        pub_export_macro: true,
        export_macro_name: "__export_process_world",
        default_bindings_module: "rehydra_guest::process_bindings",
    });
}

/// Items the exported macros expand to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::export::aggregate::Plugin;
    pub use crate::export::process::ProcessPlugin;

    /// Fails to compile unless `A` implements [`Aggregate`](crate::Aggregate).
    pub const fn assert_aggregate<A: crate::Aggregate>() {}

    /// Fails to compile unless `P` implements
    /// [`ProcessManager`](crate::ProcessManager).
    pub const fn assert_process_manager<P: crate::ProcessManager>() {}
}

/// Exports a [`ProcessManager`] as the plugin's implementation of the
/// `process-manager` world (instead of [`export_aggregate!`]): an aggregate
/// that also follows other aggregates' events.
#[macro_export]
macro_rules! export_process_manager {
    ($process:ty) => {
        const _: () = {
            $crate::__private::assert_process_manager::<$process>();
            type RehydraProcess = $crate::__private::ProcessPlugin<$process>;
            $crate::process_bindings::__export_process_world!(
                RehydraProcess with_types_in $crate::process_bindings
            );
        };
    };
}

/// Exports an [`Aggregate`] as the plugin's implementation of the
/// `rehydra:aggregate` world.
///
/// Invoke it once, at the top level of the plugin's `cdylib` crate:
///
/// ```rust,standalone_crate
/// # use rehydra_guest::{Aggregate, CommandSpec, Context, Decision, Rejection};
/// # #[derive(serde::Deserialize)] #[serde(rename_all = "kebab-case")] pub enum Command { Ping }
/// # #[derive(serde::Serialize, serde::Deserialize)] pub enum Event { Pinged }
/// pub struct Pinger;
///
/// impl Aggregate for Pinger {
///     // ...
/// #     const TYPE: &'static str = "pinger";
/// #     const STREAM_PREFIX: &'static str = "pinger";
/// #     const COMMANDS: &'static [CommandSpec] = &[CommandSpec::upsert("ping")];
/// #     type State = u64;
/// #     type Command = Command;
/// #     type Event = Event;
/// #     fn handle(_: &u64, _: Command, _: &Context) -> Result<Decision<Event>, Rejection> {
/// #         Ok(Event::Pinged.into())
/// #     }
/// #     fn apply(pings: &mut u64, _: Event) { *pings += 1 }
/// }
///
/// rehydra_guest::export_aggregate!(Pinger);
/// # fn main() {}
/// ```
///
/// The crate root's documentation has a complete plugin.
#[macro_export]
macro_rules! export_aggregate {
    ($aggregate:ty) => {
        const _: () = {
            $crate::__private::assert_aggregate::<$aggregate>();
            type RehydraPlugin = $crate::__private::Plugin<$aggregate>;
            $crate::bindings::__export_aggregate_world!(
                RehydraPlugin with_types_in $crate::bindings
            );
        };
    };
}
