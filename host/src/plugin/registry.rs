//! The registry of loaded plugins, by aggregate type: loading a directory
//! of `.wasm` files, validating each one, and handing out the current
//! version of a plugin to every command.
//!
//! The map is swapped atomically as a whole ([`arc_swap`]), so a command
//! always sees one consistent set of plugins and reads cost no lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::{Context as _, bail};
use arc_swap::ArcSwap;
use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::bindings::rehydra::aggregate::types as wit;
use super::bindings::{AggregatePre, WIT_PACKAGE};
use super::cache::{CacheOutcome, CompileCache};
use super::engine::{EpochTicker, SandboxLimits, new_engine};
use super::instance::{GuestState, InstancePool, add_to_linker};
use super::quarantine::Quarantine;
use super::{
    CommandMode, CommandSpec, Plugin, PluginInfo, PluginRef, StateBytes, is_valid_name,
    is_valid_stream_prefix,
};

/// A file that could not be loaded, and why.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    /// The file.
    pub path: PathBuf,
    /// What went wrong, for people.
    pub error: String,
}

/// The loaded plugins and everything needed to load more.
pub struct PluginRegistry {
    engine: Engine,
    linker: Linker<GuestState>,
    cache: CompileCache,
    limits: SandboxLimits,
    plugins: ArcSwap<HashMap<String, PluginRef>>,
    failures: Mutex<Vec<LoadFailure>>,
    _ticker: EpochTicker,
}

impl PluginRegistry {
    /// An empty registry with its engine, sandbox limits and compile cache
    /// (`None` disables the cache).
    pub fn new(limits: SandboxLimits, cache_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let engine = new_engine(&limits)?;
        let mut linker = Linker::new(&engine);
        add_to_linker(&mut linker).context("linking the host functions plugins may import")?;
        let ticker = EpochTicker::start(&engine)?;
        Ok(PluginRegistry {
            engine,
            linker,
            cache: CompileCache::new(cache_dir),
            limits,
            plugins: ArcSwap::from_pointee(HashMap::new()),
            failures: Mutex::new(Vec::new()),
            _ticker: ticker,
        })
    }

    /// The plugin that handles `aggregate_type` now.
    pub fn get(&self, aggregate_type: &str) -> Option<PluginRef> {
        self.plugins.load().get(aggregate_type).cloned()
    }

    /// Every loaded plugin, sorted by aggregate type.
    pub fn list(&self) -> Vec<PluginRef> {
        let mut all: Vec<PluginRef> = self.plugins.load().values().cloned().collect();
        all.sort_by(|a, b| a.info.aggregate_type.cmp(&b.info.aggregate_type));
        all
    }

    /// Files that failed to load in the last scan.
    pub fn failures(&self) -> Vec<LoadFailure> {
        self.failures.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Loads every `*.wasm` file in `dir`, in name order. A file that fails
    /// is reported (log and [`failures`](Self::failures)) and skipped; the
    /// others load. Fails only if `dir` cannot be read.
    pub async fn load_dir(self: &Arc<Self>, dir: &Path) -> anyhow::Result<Vec<PluginRef>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| {
                format!(
                    "cannot read the plugin directory {}: create it and put plugin .wasm files in it, \
                     or point --plugins at the directory that has them",
                    dir.display()
                )
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm") && p.is_file())
            .collect();
        files.sort();

        let mut loaded: HashMap<String, PluginRef> = HashMap::new();
        let mut failures = Vec::new();
        for path in files {
            let this = self.clone();
            let p = path.clone();
            let result = tokio::task::spawn_blocking(move || this.load_file(&p))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("loading panicked: {e}")));
            match result {
                Ok(plugin) => {
                    if let Some(other) = loaded.get(&plugin.info.aggregate_type) {
                        let error = format!(
                            "aggregate type {:?} is already provided by {}; remove one of the two files",
                            plugin.info.aggregate_type,
                            other.path.display()
                        );
                        tracing::error!(path = %path.display(), "plugin refused: {error}");
                        failures.push(LoadFailure { path, error });
                        continue;
                    }
                    loaded.insert(plugin.info.aggregate_type.clone(), Arc::new(plugin));
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    tracing::error!(path = %path.display(), "plugin refused: {error}");
                    failures.push(LoadFailure { path, error });
                }
            }
        }
        let list: Vec<PluginRef> = loaded.values().cloned().collect();
        self.plugins.store(Arc::new(loaded));
        if let Ok(mut f) = self.failures.lock() {
            *f = failures;
        }
        Ok(list)
    }

    /// Reads, compiles (or takes from the cache), instantiates and validates
    /// one plugin file. Blocking.
    pub fn load_file(&self, path: &Path) -> anyhow::Result<Plugin> {
        let started = Instant::now();
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("the plugin file name is not valid UTF-8")?
            .to_string();
        if !wasmparser_is_component(&bytes) {
            bail!(
                "{} is not a WebAssembly component (a core module or another file?); build plugins \
                 for the wasm32-wasip2 target so cargo emits a component",
                path.display()
            );
        }
        let hash = hex::encode(Sha256::digest(&bytes));
        let (component, outcome) = self
            .cache
            .load_or_compile(&self.engine, &bytes, &hash)
            .context("compiling the component")?;
        let pre = self.instantiate_pre(&component)?;
        let pool = InstancePool::new(&name, &self.engine, pre, &self.limits);

        let (info, initial) = pool
            .with_instance(|i| {
                let deadline = self.limits.handle_deadline;
                let info = i.call(deadline, |agg, store| agg.call_describe(store))?;
                let initial = i.call(deadline, |agg, store| agg.call_initial_state(store))?;
                Ok((info, initial))
            })
            .map_err(|f| {
                anyhow::anyhow!("describe() failed ({}): {}", f.kind.as_str(), f.message)
            })?;
        let info = validate_info(info)?;
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
            info,
            initial_state: StateBytes {
                schema: initial.schema,
                bytes: initial.bytes,
            },
            pool,
            quarantine: Quarantine::new(
                self.limits.quarantine_after,
                self.limits.quarantine_backoff,
            ),
            limits: self.limits.clone(),
        })
    }

    fn instantiate_pre(&self, component: &Component) -> anyhow::Result<AggregatePre<GuestState>> {
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
}

/// Component binaries have layer 1 in their header (`\0asm`, version
/// 0x0d, layer 1); core modules have layer 0.
fn wasmparser_is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[0..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}

fn validate_info(info: wit::Info) -> anyhow::Result<PluginInfo> {
    if !is_valid_name(&info.aggregate_type) {
        bail!(
            "describe() gives an invalid aggregate type {:?}: use 1-64 ASCII letters, digits, '-', '_' or '.', starting with a letter",
            info.aggregate_type
        );
    }
    if !is_valid_stream_prefix(&info.stream_prefix) {
        bail!(
            "describe() gives an invalid stream prefix {:?}: use 1-64 ASCII letters, digits, '_' or '.', starting with a letter, and no '-' (it separates the prefix from the id)",
            info.stream_prefix
        );
    }
    if info.commands.is_empty() {
        bail!("describe() lists no commands");
    }
    let mut commands: Vec<CommandSpec> = Vec::with_capacity(info.commands.len());
    for c in info.commands {
        if !is_valid_name(&c.name) {
            bail!("describe() gives an invalid command name {:?}", c.name);
        }
        if commands.iter().any(|known| known.name == c.name) {
            bail!("describe() lists the command {:?} twice", c.name);
        }
        let mode = match c.mode {
            wit::CommandMode::Create => CommandMode::Create,
            wit::CommandMode::Update => CommandMode::Update,
            wit::CommandMode::Upsert => CommandMode::Upsert,
        };
        commands.push(CommandSpec { name: c.name, mode });
    }
    for t in &info.event_types {
        if !is_valid_name(t) {
            bail!("describe() gives an invalid event type {t:?}");
        }
    }
    Ok(PluginInfo {
        aggregate_type: info.aggregate_type,
        stream_prefix: info.stream_prefix,
        state_schema: info.state_schema,
        commands,
        event_types: info.event_types,
    })
}
