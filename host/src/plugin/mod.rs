//! Plugins: aggregate logic compiled to WebAssembly components.
//!
//! This module is the only part of the host that knows about wasmtime and
//! the WIT bindings. It turns a `.wasm` file into a [`Plugin`] — compiled,
//! validated, described — and exposes plain-Rust calls (`handle`, `apply`)
//! on host types, so the actor and API layers never see a wasm type.
//!
//! - [`engine`]: the shared engine and the sandbox limits.
//! - [`cache`]: the on-disk compile cache.
//! - [`instance`]: a sandboxed instance and the warm pool.
//! - [`log_limit`]: the limit on the lines a plugin may log.
//! - [`registry`]: the loaded plugins, by aggregate type; `loader` turns a
//!   file into a [`Plugin`], `contract` says what a component must be.
//! - [`threads`]: the threads that run a plugin's guest calls.
//! - [`types`]: the host types of a plugin's calls; `convert` maps them to
//!   and from the WIT bindings.
//! - [`verify`], [`versions`], [`kept`]: upgrades — the check a new version
//!   passes before it serves, and the versions kept for rollback.
//!
//! A [`Plugin`] is normally a component. [`NativeAggregate`] is the one
//! other kind: logic compiled into the process, for benchmarks that measure
//! what the sandbox costs. The product never builds one.

pub mod bindings;
pub mod cache;
mod contract;
mod convert;
pub mod engine;
pub mod instance;
pub mod kept;
mod loader;
pub mod log_limit;
mod output;
pub mod quarantine;
pub mod registry;
pub mod threads;
pub mod types;
mod upgrade;
pub mod verify;
pub mod versions;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use self::bindings::rehydra::aggregate::types as wit;
use self::engine::SandboxLimits;
use self::instance::{GuestFailure, InstancePool};
use self::quarantine::{Quarantine, QuarantineStatus};
use self::threads::{GuestThreadError, GuestThreads};
use crate::error::{CommandError, FailureKind};
use crate::store::EventToApply;

use self::convert::{from_wit_outcome, handle_args, to_wit_event};
pub use self::registry::{LoadFailure, PluginRegistry, ScanReport};
pub use self::types::{
    AggregateRef, CommandInput, CommandMode, CommandSpec, Decision, Due, Follow, InstanceKey,
    NewEvent, PluginInfo, ProcessInfo, Rejection, ReplayEvent, StateBytes, TimerChange,
    TimerRequest, is_host_event, is_valid_name, is_valid_stream_prefix,
};

/// One loaded, validated version of a plugin.
pub struct Plugin {
    /// The plugin's name: its file name without `.wasm`.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex: identifies this version.
    pub hash: String,
    /// The file's size in bytes.
    pub size: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// The content hash of the version this one replaced, if any.
    pub previous_hash: Option<String>,
    /// What it said about itself.
    pub info: PluginInfo,
    initial_state: StateBytes,
    backend: Backend,
    limits: SandboxLimits,
    quarantine: Quarantine,
    verification: std::sync::OnceLock<verify::VerificationReport>,
}

/// What runs a plugin's `handle` and `apply`.
// One per plugin version, behind an `Arc`: the size of the larger variant
// costs nothing, and boxing it would add an indirection to every call.
#[allow(clippy::large_enum_variant)]
enum Backend {
    /// A WebAssembly component's warm instances, and the threads its calls
    /// run on: every plugin the host loads from its plugin directory.
    Wasm {
        pool: Arc<InstancePool>,
        threads: GuestThreads,
    },
    /// Native code behind the benchmark seam ([`NativeAggregate`]).
    Native(Arc<dyn NativeAggregate>),
}

impl Backend {
    /// A component's backend: `pool`, with as many guest threads as it
    /// keeps warm instances.
    fn wasm(pool: Arc<InstancePool>, limits: &SandboxLimits) -> Backend {
        let threads = GuestThreads::new(
            pool.plugin_name(),
            limits.pool_size,
            limits.max_queued_calls,
        );
        Backend::Wasm { pool, threads }
    }
}

/// Aggregate logic compiled into the host process instead of loaded as a
/// component: a seam for benchmarks only.
///
/// Why it exists: to measure what the WebAssembly sandbox costs per command
/// (issue 8, "the cost of Wasm"), the same domain logic must run through the
/// same actor path — mailbox, idempotency, mode checks, output checks,
/// append — once as a component and once natively. A [`Plugin`] built with
/// [`Plugin::native`] is that native twin. `rehydra run` never builds one:
/// the registry loads only components from files.
///
/// Native code gets none of the sandbox: no CPU deadline, no memory cap, no
/// isolation (a panic unwinds into the actor). It is trusted code, and runs
/// on the calling task. Its output still passes
/// [`Plugin::check_decision`], as a component's does.
pub trait NativeAggregate: Send + Sync + 'static {
    /// The state of an aggregate with no events (`initial-state`).
    fn initial_state(&self) -> StateBytes;

    /// Decides what `command` does to an aggregate at `version` in `state`
    /// (the `handle` export). The outer `Err` is a failure of the logic
    /// itself, reported as a component's trap would be.
    fn handle(
        &self,
        state: &StateBytes,
        version: u64,
        command: &CommandInput<'_>,
    ) -> Result<Result<Decision, Rejection>, String>;

    /// Folds `events` into `state` (the `apply` export); `Err` refuses them.
    /// The events come as a component gets them: metadata as unparsed text.
    fn apply(&self, state: &StateBytes, events: &[ReplayEvent]) -> Result<StateBytes, String>;
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .field("aggregate_type", &self.info.aggregate_type)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The first 12 hex digits of the content hash, for logs.
    pub fn short_hash(&self) -> &str {
        &self.hash[..self.hash.len().min(12)]
    }

    /// The state of an aggregate with no events.
    pub fn initial_state(&self) -> &StateBytes {
        &self.initial_state
    }

    /// Guest calls waiting for this version's threads now.
    pub fn queued_calls(&self) -> usize {
        match &self.backend {
            Backend::Wasm { threads, .. } => threads.queued(),
            Backend::Native(_) => 0,
        }
    }

    /// Gives this version's warm instances back to the engine: it no
    /// longer serves (it is kept for a rollback, which warms it again).
    pub fn release_instances(&self) {
        if let Backend::Wasm { pool, .. } = &self.backend {
            pool.release_idle();
        }
    }

    /// Guest calls running on this version's threads now.
    pub fn running_calls(&self) -> usize {
        match &self.backend {
            Backend::Wasm { threads, .. } => threads.running(),
            Backend::Native(_) => 0,
        }
    }

    /// Whether the plugin is quarantined, and its failure counts.
    pub fn quarantine_status(&self) -> QuarantineStatus {
        self.quarantine.status()
    }

    /// Counts what a call for `aggregate` (its stream, say) came to toward
    /// the plugin's quarantine: a failure of the plugin, or an answer (even
    /// a refusal) that shows it works. Other errors say nothing about it.
    /// The caller, which knows the aggregate, calls this after each command
    /// or load ([`quarantine`] says why the aggregate matters).
    pub fn record_outcome<T>(&self, aggregate: &str, result: &Result<T, CommandError>) {
        match crate::error::PluginVerdict::of(result) {
            crate::error::PluginVerdict::Failed => {
                if let Some(rest) = self.quarantine.failed(aggregate) {
                    tracing::warn!(
                        plugin = %self.name,
                        rest_ms = rest.as_millis() as u64,
                        "plugin quarantined after repeated failures across aggregates"
                    );
                }
            }
            crate::error::PluginVerdict::Worked => self.quarantine.succeeded(),
            crate::error::PluginVerdict::Unknown => {}
        }
    }

    fn failure(&self, kind: FailureKind, message: String) -> CommandError {
        CommandError::PluginFailed {
            plugin: self.name.clone(),
            kind,
            message,
        }
    }

    fn guest_failed(&self, f: GuestFailure) -> CommandError {
        self.failure(f.kind, f.message)
    }

    fn check_quarantine(&self) -> Result<(), CommandError> {
        match self.quarantine.remaining() {
            None => Ok(()),
            Some(rest) => Err(CommandError::PluginFailed {
                plugin: self.name.clone(),
                kind: FailureKind::Quarantined,
                message: format!(
                    "the plugin failed repeatedly and is quarantined for another {} ms; fix or replace it",
                    rest.as_millis()
                ),
            }),
        }
    }

    /// A plugin whose logic is native code rather than a component: the
    /// benchmark seam described at [`NativeAggregate`]. `name` stands in for
    /// the file name; the content hash is derived from it, so that events
    /// carry metadata of the same shape as a component's.
    pub fn native(
        name: &str,
        info: PluginInfo,
        logic: Arc<dyn NativeAggregate>,
        limits: &SandboxLimits,
    ) -> Plugin {
        use sha2::{Digest as _, Sha256};
        let limits = limits.for_plugin(name);
        Plugin {
            name: name.to_string(),
            path: PathBuf::from(format!("native:{name}")),
            hash: hex::encode(Sha256::digest(format!("native:{name}"))),
            size: 0,
            loaded_at: SystemTime::now(),
            previous_hash: None,
            info,
            initial_state: logic.initial_state(),
            backend: Backend::Native(logic),
            quarantine: Quarantine::new(limits.quarantine_after, limits.quarantine_backoff),
            limits,
            verification: std::sync::OnceLock::new(),
        }
    }

    /// A copy of this version that runs its calls on guest threads of its
    /// own (sharing the warm instances), with a quarantine of its own: for
    /// work that must not queue behind, or rest, the commands this version
    /// serves (replaying history to verify a new version).
    pub fn shadow(&self) -> Plugin {
        let backend = match &self.backend {
            Backend::Wasm { pool, .. } => Backend::wasm(Arc::clone(pool), &self.limits),
            Backend::Native(logic) => Backend::Native(Arc::clone(logic)),
        };
        Plugin {
            name: self.name.clone(),
            path: self.path.clone(),
            hash: self.hash.clone(),
            size: self.size,
            loaded_at: self.loaded_at,
            previous_hash: self.previous_hash.clone(),
            info: self.info.clone(),
            initial_state: self.initial_state.clone(),
            backend,
            limits: self.limits.clone(),
            quarantine: Quarantine::new(0, self.limits.quarantine_backoff),
            verification: std::sync::OnceLock::new(),
        }
    }

    /// The report of the verification this version passed (or, under
    /// `--upgrade-check warn`, failed) before it served; `None` for a first
    /// load or with the check off.
    pub fn verification(&self) -> Option<&verify::VerificationReport> {
        self.verification.get()
    }

    /// Records this version's verification report (once).
    pub fn set_verification(&self, report: verify::VerificationReport) {
        let _ = self.verification.set(report);
    }

    /// Runs `f`, a guest call, on one of the plugin's guest threads — never
    /// as part of an async task (see [`threads`] for why) — and waits for
    /// it. A panic in the host's side of the call fails the command, not
    /// the actor.
    async fn off_the_workers<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Plugin) -> Result<R, CommandError> + Send + 'static,
    ) -> Result<R, CommandError> {
        let Backend::Wasm { threads, .. } = &self.backend else {
            return Err(self.no_component());
        };
        let this = self.clone();
        match threads.run(move || f(&this)).await {
            Ok(result) => result,
            Err(GuestThreadError::Panicked(message)) => Err(self.failure(
                FailureKind::Trap,
                format!("the host's call into the plugin panicked: {message}"),
            )),
            Err(GuestThreadError::Unavailable(message)) => Err(CommandError::Internal(message)),
            Err(GuestThreadError::Full(queued)) => Err(CommandError::Overloaded(format!(
                "plugin {} has {queued} calls waiting for its guest threads, the most it queues \
                 (--max-guest-queue)",
                self.name
            ))),
        }
    }

    fn no_component(&self) -> CommandError {
        CommandError::Internal(format!("plugin {} has no component to call", self.name))
    }

    /// Runs one export on a pooled instance under a fresh deadline.
    fn call<R>(
        &self,
        deadline: std::time::Duration,
        f: impl FnOnce(
            &bindings::Aggregate,
            &mut wasmtime::Store<instance::GuestState>,
        ) -> wasmtime::Result<R>,
    ) -> Result<R, CommandError> {
        let Backend::Wasm { pool, .. } = &self.backend else {
            return Err(self.no_component());
        };
        pool.with_instance(|i| i.call(deadline, f))
            .map_err(|f| self.guest_failed(f))
    }

    /// Folds `events` into `state` with one guest call. Takes the events by
    /// value: their type and data move into the call's arguments instead of
    /// being copied.
    pub async fn apply(
        self: &Arc<Self>,
        state: &StateBytes,
        events: Vec<EventToApply>,
    ) -> Result<StateBytes, CommandError> {
        self.check_quarantine()?;
        let first_version = events.first().map(|e| e.version).unwrap_or_default();
        // The host's own events (`$timers`) are the host's business: the
        // plugin folds only its own. Versions still count them.
        let mut events = events;
        events.retain(|e| !is_host_event(&e.event_type));
        if let Backend::Native(logic) = &self.backend {
            let events: Vec<ReplayEvent> = events.into_iter().map(ReplayEvent::from).collect();
            let result = logic.apply(state, &events);
            return self.finish_apply(result, first_version);
        }
        let s = wit::State {
            schema: state.schema,
            bytes: state.bytes.clone(),
        };
        let batch: Vec<wit::RecordedEvent> = events.into_iter().map(to_wit_event).collect();
        self.off_the_workers(move |p| {
            let result = p.call(p.limits.apply_deadline, |agg, store| {
                agg.call_apply(store, &s, &batch)
            })?;
            let result = result.map(|s| StateBytes {
                schema: s.schema,
                bytes: s.bytes,
            });
            p.finish_apply(result, first_version)
        })
        .await
    }

    /// Checks what `apply` returned for events from `first_version` on.
    fn finish_apply(
        &self,
        result: Result<StateBytes, String>,
        first_version: u64,
    ) -> Result<StateBytes, CommandError> {
        match result {
            Ok(s) if s.bytes.len() > self.limits.max_state_bytes => Err(self.failure(
                FailureKind::BadOutput,
                format!(
                    "apply() returned {} bytes of state, over the limit of {}",
                    s.bytes.len(),
                    self.limits.max_state_bytes
                ),
            )),
            Ok(s) => Ok(s),
            Err(message) => Err(self.failure(
                FailureKind::ApplyRefused,
                format!("apply refused the events from version {first_version}: {message}"),
            )),
        }
    }

    /// Decides what `command` does to an aggregate at `version` in `state`.
    /// A decision that comes back has passed [`Plugin::check_decision`].
    pub async fn handle(
        self: &Arc<Self>,
        state: &StateBytes,
        version: u64,
        command: &CommandInput<'_>,
    ) -> Result<Result<Decision, Rejection>, CommandError> {
        self.check_quarantine()?;
        if let Backend::Native(logic) = &self.backend {
            return self.handle_native(logic.as_ref(), state, version, command);
        }
        let (s, c) = handle_args(state, command);
        self.off_the_workers(move |p| p.handle_prepared(&s, version, &c))
            .await
    }

    /// [`handle`](Self::handle) on the calling thread, without the hand-off
    /// to a guest thread: for benchmarks and callers already off the async
    /// runtime. Never call it on an async worker thread (a guest's blocking
    /// WASI call would panic there).
    pub fn handle_blocking(
        &self,
        state: &StateBytes,
        version: u64,
        command: &CommandInput<'_>,
    ) -> Result<Result<Decision, Rejection>, CommandError> {
        self.check_quarantine()?;
        if let Backend::Native(logic) = &self.backend {
            return self.handle_native(logic.as_ref(), state, version, command);
        }
        let (s, c) = handle_args(state, command);
        self.handle_prepared(&s, version, &c)
    }

    fn handle_native(
        &self,
        logic: &dyn NativeAggregate,
        state: &StateBytes,
        version: u64,
        command: &CommandInput<'_>,
    ) -> Result<Result<Decision, Rejection>, CommandError> {
        match logic.handle(state, version, command) {
            Ok(outcome) => self.finish_handle(outcome),
            Err(message) => Err(self.failure(FailureKind::Trap, message)),
        }
    }

    fn handle_prepared(
        &self,
        s: &wit::State,
        version: u64,
        c: &wit::Command,
    ) -> Result<Result<Decision, Rejection>, CommandError> {
        let result = self.call(self.limits.handle_deadline, |agg, store| {
            agg.call_handle(store, s, version, c)
        })?;
        self.finish_handle(from_wit_outcome(result))
    }

    /// Gatekeeps what `handle` returned: a decision must pass
    /// [`check_decision`](Self::check_decision).
    fn finish_handle(
        &self,
        outcome: Result<Decision, Rejection>,
    ) -> Result<Result<Decision, Rejection>, CommandError> {
        if let Ok(decision) = &outcome
            && let Err(message) = self.check_decision(decision)
        {
            return Err(self.failure(FailureKind::BadOutput, message));
        }
        Ok(outcome)
    }
}

/// Shared by `Arc` everywhere a command runs.
pub type PluginRef = Arc<Plugin>;
