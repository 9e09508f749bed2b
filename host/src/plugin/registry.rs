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

use anyhow::Context as _;
use arc_swap::ArcSwap;
use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Linker;

use super::cache::CompileCache;
use super::engine::{EpochTicker, SandboxLimits, new_engine};
use super::instance::{GuestState, add_to_linker};
use super::kept::KeptFiles;
use super::log_limit::LogLimiter;
use super::upgrade::Verification;
use super::verify::VerificationReport;
use super::versions::History;
use super::{Plugin, PluginRef};

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
pub(super) const SLOW_COMPILE_BYTES: usize = 2_000_000;

/// A new or changed plugin file, read and hashed, waiting to be loaded.
struct Candidate {
    path: PathBuf,
    bytes: Vec<u8>,
    hash: String,
    /// The version loaded from this path, if any.
    by_path: Option<PluginRef>,
    slow: bool,
}

/// The loaded plugins and everything needed to load more.
pub struct PluginRegistry {
    pub(super) engine: Engine,
    pub(super) linker: Linker<GuestState>,
    pub(super) cache: CompileCache,
    pub(super) limits: SandboxLimits,
    pub(super) plugins: ArcSwap<HashMap<String, PluginRef>>,
    pub(super) failures: Mutex<Vec<LoadFailure>>,
    /// Each plugin name's log budget, kept across its versions so that a
    /// reload does not refill it.
    pub(super) log_limiters: Mutex<HashMap<String, Arc<LogLimiter>>>,
    /// The directory of the last scan, for [`rescan`](Self::rescan).
    pub(super) dir: Mutex<Option<PathBuf>>,
    /// One scan at a time: a scan reads the map, loads, then swaps it.
    pub(super) scanning: Arc<tokio::sync::Mutex<()>>,
    /// Files a start-up scan left compiling in the background (a watch, so
    /// [`wait_loaded`](Self::wait_loaded) can wait for it to empty).
    pub(super) pending: tokio::sync::watch::Sender<Vec<PendingLoad>>,
    /// What verifies a new version of a loaded plugin before it serves,
    /// under which policy and budget; set once by the server.
    pub(super) verifier: std::sync::OnceLock<Verification>,
    /// Each plugin name's last refused verification, until a version passes.
    pub(super) refused: Mutex<HashMap<String, VerificationReport>>,
    /// The last versions of each plugin, for rollback.
    pub(super) history: History,
    pub(super) _ticker: EpochTicker,
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
        if let Some(cache_dir) = self.cache.dir() {
            self.history.keep_in(KeptFiles::new(cache_dir, dir));
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
}
