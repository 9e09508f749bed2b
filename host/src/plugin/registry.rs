//! The registry of loaded plugins, by aggregate type: loading a directory
//! of `.wasm` files, validating each one, and handing out the current
//! version of a plugin to every command.
//!
//! The map is swapped atomically as a whole ([`arc_swap`]), so a command
//! always sees one consistent set of plugins and reads cost no lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use arc_swap::ArcSwap;
use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::bindings::rehydra::aggregate::types as wit;
use super::bindings::{AggregatePre, WIT_PACKAGE, WIT_VERSION};
use super::cache::{CacheOutcome, CompileCache};
use super::engine::{EpochTicker, SandboxLimits, new_engine};
use super::instance::{GuestState, InstancePool, add_to_linker};
use super::log_limit::LogLimiter;
use super::quarantine::Quarantine;
use super::verify::{UpgradeCheck, UpgradeVerifier, VerificationReport, VerifyBudget};
use super::versions::{History, VersionInfo};
use super::{
    Backend, CommandMode, CommandSpec, Plugin, PluginInfo, PluginRef, StateBytes, is_valid_name,
    is_valid_stream_prefix,
};
use crate::error::CommandError;

/// A file that could not be loaded, and why.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFailure {
    /// The file.
    pub path: PathBuf,
    /// What went wrong, for people.
    pub error: String,
}

/// What one scan of the plugin directory changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanReport {
    /// Plugins loaded for the first time, as `type@hash12`.
    pub loaded: Vec<String>,
    /// Plugins replaced by a new version, as `type@old12->new12`.
    pub replaced: Vec<String>,
    /// Aggregate types no longer served because their file is gone.
    pub removed: Vec<String>,
    /// Files whose bytes had not changed.
    pub unchanged: usize,
    /// Files that failed to load; a working version of theirs, if any,
    /// keeps serving.
    pub failed: Vec<LoadFailure>,
    /// Large uncached files left compiling in the background (start-up only,
    /// see [`PluginRegistry::start`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loading: Vec<PathBuf>,
}

/// A plugin file compiling in the background.
#[derive(Debug, Clone, Serialize)]
pub struct PendingLoad {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// When its compilation was queued.
    #[serde(skip)]
    pub since: SystemTime,
}

impl PendingLoad {
    /// Whole seconds it has been compiling.
    pub fn compiling_for_s(&self) -> u64 {
        self.since.elapsed().map(|d| d.as_secs()).unwrap_or(0)
    }
}

/// Components at least this large and not in the compile cache are
/// compiled in the background at start-up: they take seconds to minutes.
const SLOW_COMPILE_BYTES: usize = 2_000_000;

/// A new or changed plugin file, read and hashed, waiting to be loaded.
struct Candidate {
    path: PathBuf,
    bytes: Vec<u8>,
    hash: String,
    /// The version loaded from this path, if any.
    by_path: Option<PluginRef>,
    slow: bool,
}

/// How new versions are verified: by what, under which policies, within
/// which budget.
struct Verification {
    verifier: Arc<dyn UpgradeVerifier>,
    policy: UpgradeCheck,
    per_plugin: HashMap<String, UpgradeCheck>,
    budget: VerifyBudget,
}

/// What a rollback did.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Rollback {
    /// The plugin's name.
    pub plugin: String,
    /// The version that served before (content hash).
    pub from: String,
    /// The version that serves now.
    pub to: String,
}

/// The loaded plugins and everything needed to load more.
pub struct PluginRegistry {
    engine: Engine,
    linker: Linker<GuestState>,
    cache: CompileCache,
    limits: SandboxLimits,
    plugins: ArcSwap<HashMap<String, PluginRef>>,
    failures: Mutex<Vec<LoadFailure>>,
    /// Each plugin name's log budget, kept across its versions so that a
    /// reload does not refill it.
    log_limiters: Mutex<HashMap<String, Arc<LogLimiter>>>,
    /// The directory of the last scan, for [`rescan`](Self::rescan).
    dir: Mutex<Option<PathBuf>>,
    /// One scan at a time: a scan reads the map, loads, then swaps it.
    scanning: Arc<tokio::sync::Mutex<()>>,
    /// Files a start-up scan left compiling in the background (a watch, so
    /// [`wait_loaded`](Self::wait_loaded) can wait for it to empty).
    pending: tokio::sync::watch::Sender<Vec<PendingLoad>>,
    /// What verifies a new version of a loaded plugin before it serves,
    /// under which policy and budget; set once by the server.
    verifier: std::sync::OnceLock<Verification>,
    /// Each plugin name's last refused verification, until a version passes.
    refused: Mutex<HashMap<String, VerificationReport>>,
    /// The last versions of each plugin, for rollback.
    history: History,
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
            log_limiters: Mutex::new(HashMap::new()),
            dir: Mutex::new(None),
            scanning: Arc::new(tokio::sync::Mutex::new(())),
            pending: tokio::sync::watch::Sender::new(Vec::new()),
            verifier: std::sync::OnceLock::new(),
            refused: Mutex::new(HashMap::new()),
            history: History::default(),
            _ticker: ticker,
        })
    }

    /// Has every new version of a loaded plugin verified by `verifier`
    /// before it serves, under `policy`, or the plugin's own policy in
    /// `per_plugin` (by plugin name; see [`super::verify`]). Set once;
    /// later calls are ignored.
    pub fn set_verifier(
        &self,
        verifier: Arc<dyn UpgradeVerifier>,
        policy: UpgradeCheck,
        per_plugin: HashMap<String, UpgradeCheck>,
        budget: VerifyBudget,
    ) {
        let _ = self.verifier.set(Verification {
            verifier,
            policy,
            per_plugin,
            budget,
        });
    }

    /// The last verification that refused a new version of plugin `name`
    /// (under `--upgrade-check enforce`), until a version passes.
    pub fn refused_verification(&self, name: &str) -> Option<VerificationReport> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The kept versions of plugin `name`, oldest first.
    pub fn versions(&self, name: &str) -> Vec<VersionInfo> {
        self.history.list(name)
    }

    /// Serves the version of plugin `name` that served before the current
    /// one again, at once (it is kept loaded; it served before, so it is not
    /// verified again), and writes its bytes to the plugin's file so that
    /// the directory agrees: the next scan finds the file unchanged.
    /// Commands already running finish on the version they started with.
    pub async fn rollback(&self, name: &str) -> Result<Rollback, CommandError> {
        // No scan may swap the map, or read the file, in between.
        let _one_at_a_time = self.scanning.clone().lock_owned().await;
        let Some(current) = self.list().into_iter().find(|p| p.name == name) else {
            return Err(CommandError::NotFound(format!(
                "no plugin named {name:?} is loaded (GET /v1/plugins lists them)"
            )));
        };
        let Some(earlier) = self.history.earlier(name, &current.hash) else {
            return Err(CommandError::NotFound(format!(
                "plugin {name:?} has no earlier version kept to roll back to: only versions that \
                 served since the host started are kept (GET /v1/plugins/{name}/versions)"
            )));
        };
        let path = current.path.clone();
        let tmp = path.with_extension("wasm.rollback");
        let written = async {
            tokio::fs::write(&tmp, earlier.bytes.as_slice()).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(CommandError::Internal(format!(
                "cannot write the earlier version to {} ({e}); nothing was rolled back: make the \
                 plugin directory writable by this user",
                path.display()
            )));
        }
        let mut next: HashMap<String, PluginRef> = (*self.plugins.load_full()).clone();
        next.insert(current.info.aggregate_type.clone(), earlier.plugin.clone());
        self.plugins.store(Arc::new(next));
        self.history.served(&earlier.plugin, earlier.bytes);
        tracing::warn!(
            plugin = name,
            from = %current.short_hash(),
            to = %earlier.plugin.short_hash(),
            "plugin rolled back"
        );
        Ok(Rollback {
            plugin: name.to_owned(),
            from: current.hash.clone(),
            to: earlier.plugin.hash.clone(),
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

    /// Serves `plugin` for its aggregate type, in place of any other. For
    /// plugins built in code — the benchmarks' native twin of a component
    /// ([`Plugin::native`]); `rehydra run` loads only files, through
    /// [`scan`](Self::scan), which drops a plugin that has no file.
    pub fn register(&self, plugin: Plugin) -> PluginRef {
        let plugin = Arc::new(plugin);
        self.plugins.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(plugin.info.aggregate_type.clone(), plugin.clone());
            next
        });
        plugin
    }

    /// Files that failed to load in the last scan.
    pub fn failures(&self) -> Vec<LoadFailure> {
        self.failures.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// The directory scanned last, if any.
    pub fn dir(&self) -> Option<PathBuf> {
        self.dir.lock().ok().and_then(|d| d.clone())
    }

    /// Loads every `*.wasm` file in `dir` (see [`scan`](Self::scan)) and
    /// returns the plugins now loaded.
    pub async fn load_dir(self: &Arc<Self>, dir: &Path) -> anyhow::Result<Vec<PluginRef>> {
        self.scan(dir).await?;
        Ok(self.list())
    }

    /// Start-up: loads the plugins of `dir` that are quick to load now (those
    /// in the compile cache, and small ones), and compiles the large uncached
    /// ones in the background, each served as soon as it is ready. Returns
    /// at once with the report of what is loaded; [`loading`](Self::loading)
    /// lists what is still compiling.
    ///
    /// Why: a JavaScript or Python component takes 30-60 s to compile cold on
    /// a small machine, and the plugins that are ready should not wait for
    /// it. Commands for an aggregate type that nothing serves yet are
    /// answered `plugins_loading` (503) while anything is still compiling.
    pub async fn start(self: &Arc<Self>, dir: &Path) -> anyhow::Result<ScanReport> {
        self.scan_inner(dir, true).await
    }

    /// Plugin files that are still compiling in the background.
    pub fn loading(&self) -> Vec<PendingLoad> {
        self.pending.borrow().clone()
    }

    /// Waits until nothing is compiling in the background.
    pub async fn wait_loaded(&self) {
        let mut pending = self.pending.subscribe();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = pending.wait_for(|p| p.is_empty()).await;
    }

    /// Scans the directory of the last scan again.
    pub async fn rescan(self: &Arc<Self>) -> anyhow::Result<ScanReport> {
        let dir = self
            .dir()
            .context("no plugin directory has been scanned yet")?;
        self.scan(&dir).await
    }

    /// Brings the registry in line with the `*.wasm` files in `dir`:
    ///
    /// - a file whose bytes are those of its loaded version is left alone;
    /// - a new or changed file is compiled off the async runtime, validated,
    ///   and only then swapped in; commands already running finish on the
    ///   version they started with. Each plugin is served as soon as it is
    ///   ready, quick ones (cached or small) first, then in name order;
    /// - a file that fails leaves its working version (if any) in place and
    ///   is reported in [`failures`](Self::failures) and the log;
    /// - an aggregate type whose file is gone is no longer served;
    /// - two files claiming one aggregate type: the one loaded first keeps it.
    ///
    /// Fails only if `dir` cannot be read.
    pub async fn scan(self: &Arc<Self>, dir: &Path) -> anyhow::Result<ScanReport> {
        self.scan_inner(dir, false).await
    }

    async fn scan_inner(
        self: &Arc<Self>,
        dir: &Path,
        defer_slow: bool,
    ) -> anyhow::Result<ScanReport> {
        // One scan at a time, including a start-up scan's background part:
        // a rescan must not compile a file the background is compiling.
        let one_at_a_time = self.scanning.clone().lock_owned().await;
        if let Ok(mut d) = self.dir.lock() {
            *d = Some(dir.to_path_buf());
        }
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

        let mut report = ScanReport::default();
        let current = self.plugins.load_full();
        let mut next: HashMap<String, PluginRef> = (*current).clone();
        next.retain(|aggregate_type, p| {
            let present = files.contains(&p.path);
            if !present {
                tracing::info!(aggregate_type = %aggregate_type, path = %p.path.display(), "plugin file removed; no longer serving this type");
                report.removed.push(aggregate_type.clone());
                self.history.stopped(&p.name);
            }
            present
        });
        self.plugins.store(Arc::new(next));

        let mut candidates = Vec::new();
        for path in &files {
            let by_path = current.values().find(|p| &p.path == path).cloned();
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    report.failed.push(LoadFailure {
                        path: path.clone(),
                        error: format!("cannot read the file: {e}"),
                    });
                    continue;
                }
            };
            let hash = hex::encode(Sha256::digest(&bytes));
            if by_path.as_ref().is_some_and(|p| p.hash == hash) {
                report.unchanged += 1;
                continue;
            }
            let slow =
                bytes.len() >= SLOW_COMPILE_BYTES && !self.cache.contains(&self.engine, &hash);
            candidates.push(Candidate {
                path: path.clone(),
                bytes,
                hash,
                by_path,
                slow,
            });
        }
        // Quick first (the sort is stable, so name order within each group).
        candidates.sort_by_key(|c| c.slow);
        // At start-up the slow ones are left to the background; otherwise
        // they load here, after the quick ones.
        let slow = if defer_slow {
            let split = candidates
                .iter()
                .position(|c| c.slow)
                .unwrap_or(candidates.len());
            candidates.split_off(split)
        } else {
            Vec::new()
        };
        for c in candidates {
            self.load_candidate(c, &mut report).await;
        }
        if let Ok(mut f) = self.failures.lock() {
            *f = report.failed.clone();
        }
        if slow.is_empty() {
            return Ok(report);
        }
        self.pending.send_replace(
            slow.iter()
                .map(|c| PendingLoad {
                    path: c.path.clone(),
                    size: c.bytes.len() as u64,
                    since: SystemTime::now(),
                })
                .collect(),
        );
        report.loading = slow.iter().map(|c| c.path.clone()).collect();
        let this = self.clone();
        tokio::spawn(async move {
            let _one_at_a_time = one_at_a_time;
            let started = Instant::now();
            let mut background = ScanReport::default();
            for c in slow {
                let path = c.path.clone();
                let failed_before = background.failed.len();
                this.load_candidate(c, &mut background).await;
                if let Ok(mut f) = this.failures.lock() {
                    f.extend(background.failed[failed_before..].iter().cloned());
                }
                this.pending.send_modify(|p| p.retain(|p| p.path != path));
            }
            tracing::info!(
                loaded = %background.loaded.join(", "),
                failed = background.failed.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "background plugin compilation finished"
            );
        });
        Ok(report)
    }

    /// Loads one new or changed file and, if it is valid, serves it.
    async fn load_candidate(self: &Arc<Self>, c: Candidate, report: &mut ScanReport) {
        let Candidate {
            path,
            bytes,
            hash,
            by_path,
            ..
        } = c;
        let this = self.clone();
        let p = path.clone();
        let bytes = Arc::new(bytes);
        let file = bytes.clone();
        let result = tokio::task::spawn_blocking(move || this.load_bytes(&p, &file, hash))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("loading panicked: {e}")));
        let mut plugin = match result {
            Ok(plugin) => plugin,
            Err(e) => {
                let error = format!("{e:#}");
                if by_path.is_some() {
                    tracing::error!(path = %path.display(), "new version refused; the loaded version keeps serving: {error}");
                } else {
                    tracing::error!(path = %path.display(), "plugin refused: {error}");
                }
                report.failed.push(LoadFailure { path, error });
                return;
            }
        };
        let aggregate_type = plugin.info.aggregate_type.clone();
        let mut next: HashMap<String, PluginRef> = (*self.plugins.load_full()).clone();
        if let Some(other) = next.get(&aggregate_type).filter(|o| o.path != path) {
            let error = format!(
                "aggregate type {aggregate_type:?} is already provided by {}; remove one of the two files",
                other.path.display()
            );
            tracing::error!(path = %path.display(), "plugin refused: {error}");
            report.failed.push(LoadFailure { path, error });
            return;
        }
        if let Some(old) = &by_path {
            plugin.previous_hash = Some(old.hash.clone());
        }
        let plugin = Arc::new(plugin);
        if let Some(old) = by_path
            .as_ref()
            .filter(|o| o.info.aggregate_type == aggregate_type)
            && !self.verified(old, &plugin, &path, report).await
        {
            return;
        }
        let short = plugin.short_hash().to_string();
        match &by_path {
            Some(old) => {
                if old.info.aggregate_type != aggregate_type {
                    next.remove(&old.info.aggregate_type);
                    report.removed.push(old.info.aggregate_type.clone());
                }
                tracing::info!(plugin = %plugin.name, from = %old.short_hash(), to = %short, "plugin replaced");
                report
                    .replaced
                    .push(format!("{aggregate_type}@{}->{short}", old.short_hash()));
            }
            None => report.loaded.push(format!("{aggregate_type}@{short}")),
        }
        self.history.served(&plugin, bytes);
        next.insert(aggregate_type, plugin);
        // Scans are serialised and nothing else writes the map, so a plain
        // store cannot lose another writer's change.
        self.plugins.store(Arc::new(next));
    }

    /// Verifies `candidate`, a new version of `current`, if a verifier is
    /// set and the policy is not `off`. False when the policy refuses it
    /// (recorded as a load failure of `path`; `current` keeps serving).
    async fn verified(
        &self,
        current: &PluginRef,
        candidate: &PluginRef,
        path: &Path,
        report: &mut ScanReport,
    ) -> bool {
        let Some(check) = self.verifier.get() else {
            return true;
        };
        let policy = check
            .per_plugin
            .get(&candidate.name)
            .unwrap_or(&check.policy);
        if *policy == UpgradeCheck::Off {
            return true;
        }
        tracing::info!(
            plugin = %candidate.name,
            from = %current.short_hash(),
            to = %candidate.short_hash(),
            "verifying the new version against stored history"
        );
        let mut checked = check
            .verifier
            .verify(current.clone(), candidate.clone(), check.budget)
            .await;
        checked.policy = policy.to_string();
        let summary = checked.summary();
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if checked.passed() {
            tracing::info!(plugin = %candidate.name, "the new version passed verification: {summary}");
            refused.remove(&candidate.name);
        } else if *policy == UpgradeCheck::Enforce {
            let error = format!(
                "new version {} refused by --upgrade-check enforce; version {} keeps serving: {summary}",
                candidate.short_hash(),
                current.short_hash()
            );
            tracing::error!(path = %path.display(), "{error}");
            refused.insert(candidate.name.clone(), checked);
            report.failed.push(LoadFailure {
                path: path.to_path_buf(),
                error,
            });
            return false;
        } else {
            tracing::warn!(
                plugin = %candidate.name,
                "the new version serves although its verification failed (--upgrade-check warn): {summary}"
            );
            refused.remove(&candidate.name);
        }
        candidate.set_verification(checked);
        true
    }

    /// Reads, compiles (or takes from the cache), instantiates and validates
    /// one plugin file. Blocking.
    pub fn load_file(&self, path: &Path) -> anyhow::Result<Plugin> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let hash = hex::encode(Sha256::digest(&bytes));
        self.load_bytes(path, &bytes, hash)
    }

    /// Compiles (or takes from the cache), instantiates and validates the
    /// plugin `bytes` read from `path`, whose SHA-256 is `hash`. Blocking.
    fn load_bytes(&self, path: &Path, bytes: &[u8], hash: String) -> anyhow::Result<Plugin> {
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
    fn log_limiter(&self, name: &str) -> Arc<LogLimiter> {
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

/// The contract version in the name of an imported interface of the
/// contract: `0.1.0` for `rehydra:aggregate/types@0.1.0`.
fn imported_contract_version(import: &str) -> Option<&str> {
    let (_, version) = import.strip_prefix("rehydra:aggregate/")?.split_once('@')?;
    Some(version)
}

/// Why a plugin built against contract version `plugin` cannot load on this
/// host, or `None` when it can: the same major version, and for 0.x the
/// same minor version too (the rule in the WIT's header).
fn contract_mismatch(plugin: &str) -> Option<String> {
    let (theirs, ours) = (release(plugin), release(WIT_VERSION));
    if let (Some(theirs), Some(ours)) = (theirs, ours)
        && theirs.0 == ours.0
        && (ours.0 != 0 || theirs.1 == ours.1)
    {
        return None;
    }
    let advice = if theirs > ours {
        format!(
            "run a Rehydra host that speaks it, or rebuild the plugin against this host's \
             SDK ({WIT_PACKAGE})"
        )
    } else {
        "rebuild the plugin against the current Rehydra SDK: rehydra-guest for Rust; for \
         JavaScript or Python, this host's rehydra.js or rehydra.py with its \
         wit/aggregate.wit"
            .to_string()
    };
    Some(format!(
        "the plugin was built against the contract rehydra:aggregate@{plugin}, but this host \
         speaks {WIT_PACKAGE}, which cannot run it; {advice}"
    ))
}

/// The major, minor and patch numbers of a semantic version, without its
/// pre-release or build suffix; `None` if it is not one.
fn release(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['-', '+']).next()?;
    let mut numbers = core.split('.').map(|n| n.parse::<u64>().ok());
    let parsed = (numbers.next()??, numbers.next()??, numbers.next()??);
    numbers.next().is_none().then_some(parsed)
}

/// How often a long compilation reports that it is still going.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Runs `f` (a compilation of plugin `name`), logging every
/// [`PROGRESS_EVERY`] that it is still running.
fn with_progress<R>(name: &str, f: impl FnOnce() -> R) -> R {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_version_is_read_from_an_import_name() {
        assert_eq!(
            imported_contract_version("rehydra:aggregate/types@0.1.0"),
            Some("0.1.0")
        );
        assert_eq!(imported_contract_version("wasi:io/streams@0.2.6"), None);
        assert_eq!(imported_contract_version("rehydra:aggregate/types"), None);
        assert_eq!(imported_contract_version("log"), None);
    }

    #[test]
    fn only_a_compatible_contract_version_loads() {
        assert_eq!(contract_mismatch(WIT_VERSION), None);
        let (major, minor, patch) = release(WIT_VERSION).expect("the host's version parses");
        assert_eq!(major, 0, "the cases below assume a 0.x contract");
        assert_eq!(contract_mismatch(&format!("0.{minor}.{}", patch + 1)), None);

        let older = contract_mismatch("0.1.0").expect("0.1.0 is refused");
        assert!(
            older.contains("built against the contract rehydra:aggregate@0.1.0"),
            "{older}"
        );
        assert!(older.contains(&format!("speaks {WIT_PACKAGE}")), "{older}");
        assert!(
            older.contains("rebuild the plugin against the current"),
            "{older}"
        );

        for newer in [format!("0.{}.0", minor + 1), "1.0.0".to_string()] {
            let message = contract_mismatch(&newer).expect("a newer contract is refused");
            assert!(message.contains(&format!("@{newer},")), "{message}");
            assert!(
                message.contains("run a Rehydra host that speaks it"),
                "{message}"
            );
        }
        let garbled = contract_mismatch("next").expect("an unreadable version is refused");
        assert!(garbled.contains("rehydra:aggregate@next"), "{garbled}");
    }

    #[test]
    fn release_numbers_parse() {
        assert_eq!(release("0.2.0"), Some((0, 2, 0)));
        assert_eq!(release("1.2.3-rc.1+build"), Some((1, 2, 3)));
        assert_eq!(release("1.2"), None);
        assert_eq!(release("1.2.3.4"), None);
        assert_eq!(release("x.2.3"), None);
    }
}
