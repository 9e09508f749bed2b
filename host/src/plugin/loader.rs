//! Turning a plugin file into a [`Plugin`]: compiling it (or taking it
//! from the compile cache), checking the contract version it was built
//! against, instantiating it and validating what its `describe()` says.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::{AggregatePre, WIT_PACKAGE};
use super::cache::CacheOutcome;
use super::contract::{
    contract_mismatch, imported_contract_version, validate_info, validate_process,
};
use super::instance::{GuestState, InstancePool};
use super::log_limit::LogLimiter;
use super::quarantine::Quarantine;
use super::registry::{PluginRegistry, SLOW_COMPILE_BYTES};
use super::{Backend, Plugin, StateBytes};

impl PluginRegistry {
    /// Reads, compiles (or takes from the cache), instantiates and validates
    /// one plugin file. Blocking.
    pub fn load_file(&self, path: &Path) -> anyhow::Result<Plugin> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let hash = hex::encode(Sha256::digest(&bytes));
        self.load_bytes(path, &bytes, hash)
    }

    /// Compiles (or takes from the cache), instantiates and validates the
    /// plugin `bytes` read from `path`, whose SHA-256 is `hash`. Blocking.
    pub(super) fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        hash: String,
    ) -> anyhow::Result<Plugin> {
        let started = Instant::now();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("the plugin file name is not valid UTF-8")?
            .to_string();
        if !wasmparser_is_component(bytes) {
            bail!(
                "{} is not a WebAssembly component (a core module or another file?); build plugins \
                 for the wasm32-wasip2 target so cargo emits a component",
                path.display()
            );
        }
        let compile = || self.cache.load_or_compile(&self.engine, bytes, &hash);
        let compiled = if self.cache.contains(&self.engine, &hash) {
            compile()
        } else {
            // Components of interpreted languages (JS, Python) are 10-20 MB
            // and take many seconds to compile: say so, and keep saying so.
            // The result is cached, so the next start is fast.
            let mb = bytes.len() as f64 / 1e6;
            let slow = if bytes.len() >= SLOW_COMPILE_BYTES {
                "; this can take a while"
            } else {
                ""
            };
            tracing::info!(
                plugin = %name,
                bytes = bytes.len(),
                "compiling plugin {name} ({mb:.1} MB){slow}"
            );
            with_progress(&name, compile)
        };
        let (component, outcome) = compiled.context("compiling the component")?;
        let pre = self.instantiate_pre(&component)?;
        let limits = self.limits.for_plugin(&name);
        let pool = InstancePool::new(&name, &self.engine, pre, &limits, self.log_limiter(&name));

        let (info, initial) = pool
            .with_instance(|i| {
                let deadline = limits.handle_deadline;
                let info = i.call(deadline, |agg, store| agg.call_describe(store))?;
                let initial = i.call(deadline, |agg, store| agg.call_initial_state(store))?;
                Ok((info, initial))
            })
            .map_err(|f| {
                anyhow::anyhow!("describe() failed ({}): {}", f.kind.as_str(), f.message)
            })?;
        let mut info = validate_info(info)?;
        if exports_process(&self.engine, &component) {
            let pre = self
                .linker
                .instantiate_pre(&component)
                .and_then(super::bindings::process_manager::ProcessManagerPre::new)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the component exports `process` but not the `process-manager` world of \
                         {WIT_PACKAGE}: {e:#}"
                    )
                })?;
            let process = pool.call_process(&pre).map_err(|f| {
                anyhow::anyhow!("process() failed ({}): {}", f.kind.as_str(), f.message)
            })?;
            info.process = Some(validate_process(&info, process)?);
        }
        if initial.schema != info.state_schema {
            bail!(
                "initial-state() has schema {} but describe() declares state-schema {}",
                initial.schema,
                info.state_schema
            );
        }
        tracing::info!(
            plugin = %name,
            aggregate_type = %info.aggregate_type,
            hash = %&hash[..12],
            cache = if outcome == CacheOutcome::Hit { "hit" } else { "compiled" },
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded plugin"
        );
        Ok(Plugin {
            name,
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            hash,
            loaded_at: SystemTime::now(),
            previous_hash: None,
            info,
            initial_state: StateBytes {
                schema: initial.schema,
                bytes: initial.bytes,
            },
            backend: Backend::wasm(Arc::new(pool), &limits),
            quarantine: Quarantine::new(
                self.limits.quarantine_after,
                self.limits.quarantine_backoff,
            ),
            limits,
            verification: std::sync::OnceLock::new(),
        })
    }

    /// The log budget of the plugin `name`, made on first use.
    pub(super) fn log_limiter(&self, name: &str) -> Arc<LogLimiter> {
        let mut limiters = self
            .log_limiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        limiters
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(LogLimiter::new(name, self.limits.log_rate, Instant::now()))
            })
            .clone()
    }

    fn instantiate_pre(&self, component: &Component) -> anyhow::Result<AggregatePre<GuestState>> {
        self.check_contract(component)?;
        let pre = self.linker.instantiate_pre(component).map_err(|e| {
            anyhow::anyhow!(
                "the component does not fit this host: {e:#}. A plugin must export the world \
                 `aggregate` of {WIT_PACKAGE} and import nothing beyond WASI and `log`; rebuild it \
                 against this version of the rehydra-guest SDK"
            )
        })?;
        AggregatePre::new(pre).map_err(|e| {
            anyhow::anyhow!(
                "the component does not export the `aggregate` world of {WIT_PACKAGE}: {e:#}"
            )
        })
    }

    /// Refuses a component built against a contract version this host
    /// cannot serve, with a message naming both versions and what to do;
    /// otherwise it would fail wasmtime's type check of its exports (for
    /// 0.1.0: "type mismatch for field metadata"), which says neither. The
    /// version is read from the names of the contract's interfaces the
    /// component imports (`rehydra:aggregate/types@0.1.0`; a plugin built
    /// from the WIT imports `types`). A component that imports none of
    /// them is left to the linker and the export check.
    fn check_contract(&self, component: &Component) -> anyhow::Result<()> {
        let ty = component.component_type();
        let built_against = ty
            .imports(&self.engine)
            .find_map(|(name, _)| imported_contract_version(name));
        match built_against.and_then(contract_mismatch) {
            Some(message) => bail!(message),
            None => Ok(()),
        }
    }
}

/// Whether `component` exports `process`: a process manager.
fn exports_process(engine: &wasmtime::Engine, component: &Component) -> bool {
    component
        .component_type()
        .exports(engine)
        .any(|(name, _)| name == "process")
}

/// How often a long compilation reports that it is still going.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Runs `f` (a compilation of plugin `name`), logging every
/// [`PROGRESS_EVERY`] that it is still running.
pub(super) fn with_progress<R>(name: &str, f: impl FnOnce() -> R) -> R {
    let started = Instant::now();
    let (done, finished) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(PROGRESS_EVERY) {
                tracing::info!(
                    plugin = %name,
                    "still compiling plugin {name} ({} s so far)",
                    started.elapsed().as_secs()
                );
            }
        });
        let result = f();
        drop(done);
        result
    })
}

/// Component binaries have layer 1 in their header (`\0asm`, version
/// 0x0d, layer 1); core modules have layer 0.
pub(super) fn wasmparser_is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[0..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}
