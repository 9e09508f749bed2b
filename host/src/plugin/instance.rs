//! One plugin instance — a wasmtime `Store` with its sandbox — and the warm
//! pool that lends instances to commands.
//!
//! Instances are interchangeable because guests keep no state between calls
//! (the host passes state bytes in). An instance whose call failed is never
//! returned to the pool: a trapped store cannot be entered again.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rand::SeedableRng as _;
use tokio::io::AsyncWrite;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::bindings::rehydra::aggregate::types::LogLevel;
use super::bindings::{Aggregate, AggregateImports, AggregatePre};
use super::engine::SandboxLimits;
use super::log_limit::LogLimiter;
use crate::error::FailureKind;

/// Why a guest call failed. The instance that failed must be discarded.
#[derive(Debug, Clone)]
pub struct GuestFailure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What happened, with the guest's panic message when it printed one.
    pub message: String,
}

/// The host-side state of one instance's `Store`.
pub struct GuestState {
    plugin: Arc<str>,
    /// The plugin's log budget, shared with all its instances.
    log: Arc<LogLimiter>,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    stdout: GuestOutput,
    stderr: GuestOutput,
    clock: CallClock,
}

/// The running call's budget: CPU time of the thread that runs it, with a
/// wall-clock backstop.
///
/// Deadlines are CPU time so that a loaded machine, which stretches a call
/// on the wall clock, does not fail healthy calls (and feed the plugin's
/// quarantine with them). wasmtime interrupts a guest only through the
/// engine's epoch, which the ticker thread advances on the wall clock; when
/// a call's epoch deadline comes, [`CallClock::check`] runs on the guest's
/// own thread and reads that thread's CPU clock: a call that has not used
/// its budget yet gets more ticks. A guest that burns CPU therefore stops
/// within one tick of its budget; one that is starved of CPU goes on until
/// [`WALL_BACKSTOP_FACTOR`] times its budget on the wall clock.
struct CallClock {
    budget: Duration,
    cpu_start: Duration,
    wall_start: Instant,
    /// Why the call was interrupted, for the error message.
    interrupted: Option<Interrupted>,
}

#[derive(Debug, Clone, Copy)]
enum Interrupted {
    Cpu(Duration),
    Wall(Duration),
}

/// How many times its CPU budget a call may take on the wall clock.
pub const WALL_BACKSTOP_FACTOR: u32 = 10;

impl CallClock {
    fn new(budget: Duration) -> Self {
        CallClock {
            budget,
            cpu_start: thread_cpu_time(),
            wall_start: Instant::now(),
            interrupted: None,
        }
    }

    /// Starts the budget of a new call on this thread.
    fn start(&mut self, budget: Duration) {
        *self = CallClock::new(budget);
    }

    /// At an epoch deadline: `Some(ticks)` to go on for that many more,
    /// `None` to interrupt the call.
    fn check(&mut self) -> Option<u64> {
        let used = thread_cpu_time().saturating_sub(self.cpu_start);
        let wall = self.wall_start.elapsed();
        if used >= self.budget {
            self.interrupted = Some(Interrupted::Cpu(used));
            return None;
        }
        if wall >= self.budget.saturating_mul(WALL_BACKSTOP_FACTOR) {
            self.interrupted = Some(Interrupted::Wall(wall));
            return None;
        }
        Some(SandboxLimits::ticks(self.budget - used))
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; the clock id is
    // a constant Linux knows.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0;
    if !ok {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl super::bindings::rehydra::aggregate::types::Host for GuestState {}

impl AggregateImports for GuestState {
    fn log(&mut self, level: LogLevel, message: String) {
        if !self.log.admit() {
            return;
        }
        let plugin = &*self.plugin;
        // Bound what one message can put in the host's log.
        let message = truncate(&message, 4096);
        match level {
            LogLevel::Trace => tracing::trace!(target: "rehydra::guest", plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "rehydra::guest", plugin, "{message}"),
            LogLevel::Info => tracing::info!(target: "rehydra::guest", plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "rehydra::guest", plugin, "{message}"),
            LogLevel::Error => tracing::error!(target: "rehydra::guest", plugin, "{message}"),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Caps linear memory growth and remembers that it refused, so that the
/// resulting trap (a guest's allocator aborts) is reported as `memory_limit`.
struct MemoryLimiter {
    max_bytes: usize,
    denied: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Guest stdout or stderr: kept in a bounded buffer that the host drains
/// into the log after each call. Bytes past the bound are dropped, never an
/// error, so a chatty guest cannot trap itself or flood the host.
#[derive(Clone)]
struct GuestOutput {
    buf: Arc<Mutex<Vec<u8>>>,
    cap: usize,
}

impl GuestOutput {
    fn new(cap: usize) -> Self {
        GuestOutput {
            buf: Arc::new(Mutex::new(Vec::new())),
            cap,
        }
    }

    fn push(&self, bytes: &[u8]) {
        if let Ok(mut buf) = self.buf.lock() {
            let room = self.cap.saturating_sub(buf.len());
            buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    fn take(&self) -> String {
        match self.buf.lock() {
            Ok(mut buf) => String::from_utf8_lossy(&std::mem::take(&mut *buf)).into_owned(),
            Err(_) => String::new(),
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.push(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

/// A wall clock stuck at the Unix epoch: plugins get time only through the
/// command's `now` metadata, so replays are deterministic.
struct FrozenWallClock;

impl HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A monotonic clock that never advances.
struct FrozenMonotonicClock;

impl HostMonotonicClock for FrozenMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Adds everything a plugin may import to `linker`: the WASI interfaces a
/// Rust std guest links against (backed by an empty context) and `log`.
pub fn add_to_linker(linker: &mut Linker<GuestState>) -> anyhow::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    Aggregate::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// A live instance of one plugin version.
pub struct Instance {
    store: Store<GuestState>,
    aggregate: Aggregate,
}

impl Instance {
    /// Runs one export with a fresh CPU deadline, drains the guest's output
    /// into the log, and classifies a failure.
    pub fn call<R>(
        &mut self,
        deadline: Duration,
        f: impl FnOnce(&Aggregate, &mut Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<R, GuestFailure> {
        let aggregate = &self.aggregate;
        run_in(&mut self.store, deadline, |store| f(aggregate, store))
    }
}

/// Runs `f` in `store` with a fresh CPU deadline, drains the guest's
/// output into the log, and classifies a failure.
fn run_in<R>(
    store: &mut Store<GuestState>,
    deadline: Duration,
    f: impl FnOnce(&mut Store<GuestState>) -> wasmtime::Result<R>,
) -> Result<R, GuestFailure> {
    store.set_epoch_deadline(SandboxLimits::ticks(deadline));
    store.data_mut().limiter.denied = false;
    store.data_mut().clock.start(deadline);
    let result = f(store);
    let data = store.data();
    let stdout = data.stdout.take();
    let stderr = data.stderr.take();
    let plugin = &*data.plugin;
    // The stderr text is kept whole for the failure's message below;
    // only what reaches the log is limited.
    for line in stdout.lines().filter(|l| !l.is_empty()) {
        if data.log.admit() {
            tracing::info!(target: "rehydra::guest", plugin, stream = "stdout", "{line}");
        }
    }
    for line in stderr.lines().filter(|l| !l.is_empty()) {
        if data.log.admit() {
            tracing::warn!(target: "rehydra::guest", plugin, stream = "stderr", "{line}");
        }
    }
    let interrupted = data.clock.interrupted;
    result.map_err(|e| classify(&e, data.limiter.denied, &stderr, deadline, interrupted))
}

fn classify(
    e: &wasmtime::Error,
    memory_denied: bool,
    stderr: &str,
    deadline: Duration,
    interrupted: Option<Interrupted>,
) -> GuestFailure {
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        let message = match interrupted {
            Some(Interrupted::Wall(wall)) => format!(
                "the call took {wall:?} on the wall clock without using its CPU deadline of \
                 {deadline:?} (the backstop is {WALL_BACKSTOP_FACTOR}x the deadline): the machine \
                 is overloaded, or the guest waits on something"
            ),
            Some(Interrupted::Cpu(used)) => format!(
                "the call used {used:?} of CPU, past its deadline of {deadline:?}; raise \
                 --handle-deadline / --apply-deadline (or --plugin-deadline for this plugin) if \
                 that much work is intended"
            ),
            None => format!("the call ran past its CPU deadline of {deadline:?}"),
        };
        return GuestFailure {
            kind: FailureKind::DeadlineExceeded,
            message,
        };
    }
    // A Rust guest reports a panic on stderr before trapping; that line is
    // what a plugin author needs to see.
    let panic = stderr
        .lines()
        .skip_while(|l| !l.contains("panicked at"))
        .take(4)
        .collect::<Vec<_>>()
        .join(" ");
    if memory_denied {
        return GuestFailure {
            kind: FailureKind::MemoryLimit,
            message: "the instance tried to grow its memory past the cap".to_string(),
        };
    }
    let message = if panic.is_empty() {
        format!("{e:#}")
    } else {
        format!("{panic} ({e})")
    };
    GuestFailure {
        kind: FailureKind::Trap,
        message,
    }
}

/// A small set of warm instances of one plugin version.
pub struct InstancePool {
    plugin: Arc<str>,
    log: Arc<LogLimiter>,
    engine: Engine,
    pre: AggregatePre<GuestState>,
    limits: SandboxLimits,
    idle: Mutex<Vec<Instance>>,
}

impl InstancePool {
    /// A pool instantiating from `pre`, whose instances log through `log`.
    pub fn new(
        plugin: &str,
        engine: &Engine,
        pre: AggregatePre<GuestState>,
        limits: &SandboxLimits,
        log: Arc<LogLimiter>,
    ) -> Self {
        InstancePool {
            plugin: Arc::from(plugin),
            log,
            engine: engine.clone(),
            pre,
            limits: limits.clone(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The name of the plugin whose instances these are.
    pub fn plugin_name(&self) -> &str {
        &self.plugin
    }

    /// A fresh sandboxed store for one instance of this plugin.
    fn new_store(&self) -> Store<GuestState> {
        let stdout = GuestOutput::new(self.limits.max_output_bytes);
        let stderr = GuestOutput::new(self.limits.max_output_bytes);
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(FrozenWallClock)
            .monotonic_clock(FrozenMonotonicClock)
            .secure_random(rand::rngs::StdRng::seed_from_u64(0))
            .insecure_random(rand::rngs::StdRng::seed_from_u64(1))
            .insecure_random_seed(0)
            .build();
        let state = GuestState {
            plugin: self.plugin.clone(),
            log: self.log.clone(),
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: self.limits.max_memory_bytes,
                denied: false,
            },
            stdout,
            stderr,
            clock: CallClock::new(self.limits.handle_deadline),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // At each epoch deadline: go on while the call has CPU budget left.
        store.epoch_deadline_callback(|mut cx| match cx.data_mut().clock.check() {
            Some(ticks) => Ok(wasmtime::UpdateDeadline::Continue(ticks)),
            None => Err(Trap::Interrupt.into()),
        });
        // Instantiation runs the guest's start code: bound it too.
        store.set_epoch_deadline(SandboxLimits::ticks(self.limits.handle_deadline));
        store
    }

    fn instantiate(&self) -> Result<Instance, GuestFailure> {
        let mut store = self.new_store();
        let aggregate = self.pre.instantiate(&mut store).map_err(|e| {
            let memory_denied = store.data().limiter.denied;
            let stderr = store.data().stderr.take();
            let interrupted = store.data().clock.interrupted;
            let mut failure = classify(
                &e,
                memory_denied,
                &stderr,
                self.limits.handle_deadline,
                interrupted,
            );
            failure.message = format!("could not instantiate: {}", failure.message);
            failure
        })?;
        Ok(Instance { store, aggregate })
    }

    /// Calls the `process` export of a process manager (`pre`, made from
    /// the same component) once, in an instance of its own.
    pub fn call_process(
        &self,
        pre: &super::bindings::process_manager::ProcessManagerPre<GuestState>,
    ) -> Result<
        super::bindings::process_manager::rehydra::aggregate::types::ProcessInfo,
        GuestFailure,
    > {
        let mut store = self.new_store();
        let deadline = self.limits.handle_deadline;
        let pm = run_in(&mut store, deadline, |store| pre.instantiate(store))?;
        run_in(&mut store, deadline, |store| pm.call_process(store))
    }

    /// Drops the warm instances, giving their slots back to the engine's
    /// pool: for a version that no longer serves but is kept for a
    /// rollback. Calls still running return theirs as usual.
    pub fn release_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// Runs `f` on a pooled instance. On success the instance goes back to
    /// the pool; on a guest failure it is dropped.
    pub fn with_instance<R>(
        &self,
        f: impl FnOnce(&mut Instance) -> Result<R, GuestFailure>,
    ) -> Result<R, GuestFailure> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut instance = match pooled {
            Some(i) => i,
            None => self.instantiate()?,
        };
        let result = f(&mut instance);
        if result.is_ok()
            && let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.limits.pool_size
        {
            idle.push(instance);
        }
        result
    }
}
