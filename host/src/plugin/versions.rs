//! The last versions of each plugin, for a one-step rollback and for
//! `GET /v1/plugins/{name}/versions`.
//!
//! Each time a version starts serving (a first load, a reload, a rollback)
//! it is recorded with its file's bytes, when it began and its
//! verification report; the version it replaced gets the time it stopped.
//! At most [`KEPT`] versions per plugin are kept.
//!
//! Versions that served since this host started stay loaded, so a
//! rollback to one swaps it back in at once, without a compile or a
//! verification (it served before). With a compile cache, the list and the
//! files are also kept on disk ([`super::kept`]): after a restart, the
//! versions that served before it are listed again, and a rollback to one
//! loads it from its kept file (its compiled form is a cache hit) first.
//! A rollback writes the version's bytes back to the plugin file, so the
//! directory stays the source of truth.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use serde::Serialize;

use super::PluginRef;
use super::kept::{KeptError, KeptFiles, Record, from_ms, to_ms};
use super::verify::VerificationReport;

/// Versions kept per plugin, the serving one included.
pub const KEPT: usize = 4;

/// One version's time of service.
struct Served {
    hash: String,
    /// The version, loaded; `None` for one that served before this host
    /// started, until a rollback loads it.
    plugin: Option<PluginRef>,
    /// Its file's bytes, if held in memory (otherwise they are kept on
    /// disk).
    bytes: Option<Arc<Vec<u8>>>,
    from: SystemTime,
    until: Option<SystemTime>,
    verification: Option<VerificationReport>,
}

impl Served {
    fn record(&self) -> Record {
        Record {
            hash: self.hash.clone(),
            served_from_ms: to_ms(self.from),
            served_until_ms: self.until.map(to_ms),
            verification: self.verification.clone(),
        }
    }

    fn from_record(r: Record) -> Served {
        Served {
            hash: r.hash,
            plugin: None,
            bytes: None,
            from: from_ms(r.served_from_ms),
            until: r.served_until_ms.map(from_ms),
            verification: r.verification,
        }
    }
}

/// A version as `GET /v1/plugins/{name}/versions` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VersionInfo {
    /// The content hash.
    pub hash: String,
    /// When it began serving (RFC 3339).
    pub served_from: String,
    /// When it stopped; `None` while it serves (or, for a version that
    /// served when an earlier run of the host stopped, until another one
    /// serves).
    pub served_until: Option<String>,
    /// Whether it serves now.
    pub serving: bool,
    /// The check it passed (or, under `warn`, failed) before it served.
    pub verification: Option<VerificationReport>,
}

/// A version to roll back to.
pub struct Earlier {
    /// Its content hash.
    pub hash: String,
    /// The version, if loaded; otherwise load it from `bytes`.
    pub plugin: Option<PluginRef>,
    /// Its file's bytes.
    pub bytes: Arc<Vec<u8>>,
    /// The report it served with.
    pub verification: Option<VerificationReport>,
}

/// The versions of every plugin, by plugin name.
#[derive(Default)]
pub struct History {
    by_name: Mutex<HashMap<String, VecDeque<Served>>>,
    /// Where the versions are kept on disk, once the plugin directory is
    /// known and if there is a compile cache.
    kept: OnceLock<KeptFiles>,
}

impl History {
    /// Keeps the versions on disk in `kept` too, and lists the ones kept
    /// there by an earlier run. Set once (the plugin directory does not
    /// change); later calls are ignored.
    pub fn keep_in(&self, kept: KeptFiles) {
        let _ = self.kept.set(kept);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, VecDeque<Served>>> {
        self.by_name.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The versions of `name`: those in memory, or on first use those kept
    /// on disk by an earlier run.
    fn versions<'a>(
        &self,
        all: &'a mut HashMap<String, VecDeque<Served>>,
        name: &str,
    ) -> &'a mut VecDeque<Served> {
        all.entry(name.to_owned()).or_insert_with(|| {
            let Some(kept) = self.kept.get() else {
                return VecDeque::new();
            };
            match kept.read(name) {
                Ok(records) => records.into_iter().map(Served::from_record).collect(),
                Err(e) => {
                    tracing::warn!(plugin = name, "the kept versions are lost: {e}");
                    VecDeque::new()
                }
            }
        })
    }

    /// Writes the versions of `name` to disk, with the bytes of `new`.
    fn save(&self, name: &str, versions: &VecDeque<Served>, new: Option<(&str, &[u8])>) {
        let Some(kept) = self.kept.get() else {
            return;
        };
        let records: Vec<Record> = versions.iter().map(Served::record).collect();
        if let Err(e) = kept.write(name, &records, new) {
            tracing::warn!(
                plugin = name,
                "could not keep the plugin's versions on disk (a restart forgets them): {e}"
            );
        }
    }

    /// `plugin` (whose file holds `bytes`) serves from now on.
    pub fn served(&self, plugin: &PluginRef, bytes: Arc<Vec<u8>>) {
        let now = SystemTime::now();
        let mut all = self.lock();
        let versions = self.versions(&mut all, &plugin.name);
        // The same version still marked serving: a restart of the host
        // with the same file. Its service goes on.
        if let Some(last) = versions
            .back_mut()
            .filter(|v| v.until.is_none() && v.hash == plugin.hash)
        {
            last.plugin = Some(plugin.clone());
            last.bytes = Some(bytes.clone());
            match (plugin.verification(), &last.verification) {
                (Some(report), _) => last.verification = Some(report.clone()),
                // The report it passed when it first served, for
                // `GET /v1/plugins` too.
                (None, Some(report)) => plugin.set_verification(report.clone()),
                (None, None) => {}
            }
            self.save(&plugin.name, versions, Some((&plugin.hash, &bytes)));
            return;
        }
        for v in versions.iter_mut().filter(|v| v.until.is_none()) {
            v.until = Some(now);
            // Kept loaded, but without warm instances holding slots of the
            // engine's pool while it does not serve.
            if let Some(old) = v.plugin.as_ref().filter(|old| old.hash != plugin.hash) {
                old.release_instances();
            }
        }
        versions.push_back(Served {
            hash: plugin.hash.clone(),
            plugin: Some(plugin.clone()),
            bytes: Some(bytes.clone()),
            from: now,
            until: None,
            verification: plugin.verification().cloned(),
        });
        while versions.len() > KEPT {
            versions.pop_front();
        }
        self.save(&plugin.name, versions, Some((&plugin.hash, &bytes)));
    }

    /// The plugin `name` stopped serving (its file was removed).
    pub fn stopped(&self, name: &str) {
        let now = SystemTime::now();
        let mut all = self.lock();
        let versions = self.versions(&mut all, name);
        for v in versions.iter_mut().filter(|v| v.until.is_none()) {
            v.until = Some(now);
            if let Some(old) = &v.plugin {
                old.release_instances();
            }
        }
        self.save(name, versions, None);
    }

    /// The version that served before the one with `serving_hash`: the
    /// newest kept version of another content. `Ok(None)` if there is
    /// none; an error if it is kept on disk but cannot be read back.
    pub fn earlier(&self, name: &str, serving_hash: &str) -> Result<Option<Earlier>, KeptError> {
        let mut all = self.lock();
        let versions = self.versions(&mut all, name);
        let Some(v) = versions.iter().rev().find(|v| v.hash != serving_hash) else {
            return Ok(None);
        };
        let bytes = match (&v.bytes, self.kept.get()) {
            (Some(bytes), _) => bytes.clone(),
            (None, Some(kept)) => Arc::new(kept.bytes(name, &v.hash)?),
            // Without a cache nothing is kept across restarts, so every
            // version listed has its bytes in memory.
            (None, None) => return Ok(None),
        };
        Ok(Some(Earlier {
            hash: v.hash.clone(),
            plugin: v.plugin.clone(),
            bytes,
            verification: v.verification.clone(),
        }))
    }

    /// The kept versions of `name`, oldest first.
    pub fn list(&self, name: &str) -> Vec<VersionInfo> {
        let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        let mut all = self.lock();
        let versions = self.versions(&mut all, name);
        let list = versions
            .iter()
            .map(|v| VersionInfo {
                hash: v.hash.clone(),
                served_from: time(v.from),
                served_until: v.until.map(time),
                // Loaded and not stopped: a version still marked serving
                // by an earlier run is not loaded until it serves again.
                serving: v.until.is_none() && v.plugin.is_some(),
                verification: v.verification.clone(),
            })
            .collect();
        // A name nothing was ever kept for leaves no entry behind.
        if versions.is_empty() {
            all.remove(name);
        }
        list
    }
}
