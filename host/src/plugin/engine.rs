//! The wasmtime engine shared by every plugin, and the sandbox limits it
//! enforces: CPU deadlines (epoch interruption), memory caps (pooling
//! allocator and a per-store limiter).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch ticker advances the engine's epoch. Deadlines are
/// whole ticks, so this is their resolution.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The limits every plugin instance runs under.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    /// The cap on each instance's linear memory, in bytes.
    pub max_memory_bytes: usize,
    /// CPU time allowed for one `handle` (or `describe`, `initial-state`) call.
    pub handle_deadline: Duration,
    /// CPU time allowed for one rehydration `apply` batch.
    pub apply_deadline: Duration,
    /// Idle instances kept warm per plugin version (and guest threads).
    pub pool_size: usize,
    /// Guest calls that may wait for one plugin version's threads; past it
    /// a call is refused with `overloaded` rather than queued, so that the
    /// wait of the accepted ones stays bounded.
    pub max_queued_calls: usize,
    /// Instances of all plugins that may exist at once (pooling allocator
    /// slots).
    pub total_instances: u32,
    /// Guest stdout/stderr kept per call for the log, in bytes; the rest is
    /// dropped.
    pub max_output_bytes: usize,
    /// The largest event (its data) a command may produce, in bytes.
    pub max_event_bytes: usize,
    /// The most events one command may produce.
    pub max_events_per_command: usize,
    /// The largest state (or reply) a plugin may return, in bytes.
    pub max_state_bytes: usize,
    /// Consecutive failed calls after which a plugin is quarantined.
    pub quarantine_after: u32,
    /// The first quarantine's length; it doubles while failures go on, up
    /// to [`MAX_QUARANTINE`].
    pub quarantine_backoff: Duration,
    /// Deadlines for particular plugins (by plugin name), overriding
    /// `handle_deadline` and `apply_deadline`.
    pub plugin_deadlines: HashMap<String, PluginDeadlines>,
    /// Lines per second each plugin may put in the host's log (its `log`
    /// calls and its stdout and stderr lines, all its instances together),
    /// with a burst of as many; the rest are dropped and counted. 0: no
    /// limit. See [`super::log_limit`].
    pub log_rate: u32,
    /// Interrupt guests at their deadline. Only turned off to measure what
    /// it costs: without it a looping guest runs forever.
    pub epoch_interruption: bool,
    /// Use the pooling allocator. Only turned off to measure what it saves.
    pub pooling: bool,
}

/// One plugin's own deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginDeadlines {
    /// For `handle`, `describe` and instantiation.
    pub handle: Duration,
    /// For a rehydration `apply` batch; the default when `None`.
    pub apply: Option<Duration>,
}

impl SandboxLimits {
    /// The limits for the plugin `name`: these, with its own deadlines if
    /// it has any.
    pub fn for_plugin(&self, name: &str) -> SandboxLimits {
        let mut limits = self.clone();
        if let Some(d) = self.plugin_deadlines.get(name) {
            limits.handle_deadline = d.handle;
            if let Some(apply) = d.apply {
                limits.apply_deadline = apply;
            }
        }
        limits
    }
}

/// Parses a `--plugin-deadline` value: `NAME=HANDLE[,APPLY]`, durations as
/// `500ms`, `2s`, …
pub fn parse_plugin_deadline(s: &str) -> Result<(String, PluginDeadlines), String> {
    let usage = "expected NAME=HANDLE[,APPLY], e.g. reports=2s or reports=2s,30s";
    let (name, rest) = s.split_once('=').ok_or_else(|| format!("{s:?}: {usage}"))?;
    let (handle, apply) = match rest.split_once(',') {
        Some((h, a)) => (h, Some(a)),
        None => (rest, None),
    };
    let duration =
        |d: &str| humantime::parse_duration(d.trim()).map_err(|e| format!("{d:?}: {e}; {usage}"));
    if name.trim().is_empty() {
        return Err(format!("{s:?}: the plugin name is missing; {usage}"));
    }
    Ok((
        name.trim().to_string(),
        PluginDeadlines {
            handle: duration(handle)?,
            apply: apply.map(duration).transpose()?,
        },
    ))
}

/// The longest a plugin stays quarantined in one go.
pub const MAX_QUARANTINE: Duration = Duration::from_secs(300);

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            max_memory_bytes: 64 << 20,
            handle_deadline: Duration::from_millis(500),
            apply_deadline: Duration::from_secs(5),
            pool_size: 4,
            max_queued_calls: 1024,
            total_instances: 256,
            max_output_bytes: 16 << 10,
            max_event_bytes: 1 << 20,
            max_events_per_command: 1000,
            max_state_bytes: 8 << 20,
            quarantine_after: 10,
            quarantine_backoff: Duration::from_secs(1),
            plugin_deadlines: HashMap::new(),
            log_rate: 100,
            epoch_interruption: true,
            pooling: true,
        }
    }
}

impl SandboxLimits {
    /// A deadline as a number of epoch ticks (at least one).
    pub fn ticks(deadline: Duration) -> u64 {
        (deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
    }
}

/// Builds the engine: component model, epoch interruption, no concurrency
/// support (exports are called synchronously), and a pooling allocator sized
/// from `limits` rather than wasmtime's 4 GiB-per-memory defaults.
pub fn new_engine(limits: &SandboxLimits) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(limits.epoch_interruption);
    config.concurrency_support(false);

    // Reserve only what a memory may grow to, plus a guard region, so that
    // many instances fit in the address space.
    let reservation = (limits.max_memory_bytes as u64).next_power_of_two();
    config.memory_reservation(reservation);
    config.memory_guard_size(32 << 20);

    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(limits.total_instances);
    // A Rust guest component holds a few core instances (the program, the
    // WASI adapter's shims); leave room for more in larger guests.
    pool.total_core_instances(limits.total_instances * 8);
    pool.total_memories(limits.total_instances * 2);
    pool.total_tables(limits.total_instances * 4);
    pool.max_memory_size(limits.max_memory_bytes);
    pool.max_memories_per_component(4);
    pool.max_tables_per_component(8);
    if limits.pooling {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }

    Engine::new(&config).map_err(|e| anyhow::anyhow!("creating the WebAssembly engine: {e:#}"))
}

/// Advances the engine's epoch on a background thread so that guest calls
/// past their deadline are interrupted. Stops when dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    /// Starts ticking `engine`'s epoch every [`EPOCH_TICK`].
    pub fn start(engine: &Engine) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.clone();
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("rehydra-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .context("starting the epoch ticker thread")?;
        Ok(EpochTicker { stop })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_deadlines_parse_and_apply() {
        let (name, d) = parse_plugin_deadline("reports=2s,30s").unwrap();
        assert_eq!(name, "reports");
        assert_eq!(
            d,
            PluginDeadlines {
                handle: Duration::from_secs(2),
                apply: Some(Duration::from_secs(30))
            }
        );
        let (_, d) = parse_plugin_deadline("x=250ms").unwrap();
        assert_eq!(d.apply, None);
        for bad in ["reports", "=1s", "r=soon", "r=1s,later"] {
            assert!(parse_plugin_deadline(bad).is_err(), "{bad}");
        }
        let mut limits = SandboxLimits::default();
        limits.plugin_deadlines.insert(
            "reports".into(),
            PluginDeadlines {
                handle: Duration::from_secs(2),
                apply: None,
            },
        );
        assert_eq!(
            limits.for_plugin("reports").handle_deadline,
            Duration::from_secs(2)
        );
        assert_eq!(
            limits.for_plugin("reports").apply_deadline,
            limits.apply_deadline
        );
        assert_eq!(
            limits.for_plugin("other").handle_deadline,
            limits.handle_deadline
        );
    }
}
