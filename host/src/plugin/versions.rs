//! The last versions of each plugin, kept loaded for a one-step rollback
//! and listed by `GET /v1/plugins/{name}/versions`.
//!
//! Each time a version starts serving (a first load, a reload, a rollback)
//! it is recorded with its file's bytes and when it began; the version it
//! replaced gets the time it stopped. At most [`KEPT`] versions per plugin
//! are kept, loaded: a rollback swaps one back in at once, without a
//! compile or a verification (it served before), and writes its bytes back
//! to the plugin file so that the directory stays the source of truth.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use super::PluginRef;
use super::verify::VerificationReport;

/// Versions kept per plugin, the serving one included.
pub const KEPT: usize = 4;

/// One version's time of service.
struct Served {
    plugin: PluginRef,
    bytes: Arc<Vec<u8>>,
    from: SystemTime,
    until: Option<SystemTime>,
}

/// A version as `GET /v1/plugins/{name}/versions` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VersionInfo {
    /// The content hash.
    pub hash: String,
    /// When it began serving (RFC 3339).
    pub served_from: String,
    /// When it stopped; `None` while it serves.
    pub served_until: Option<String>,
    /// Whether it serves now.
    pub serving: bool,
    /// The check it passed (or, under `warn`, failed) before it served.
    pub verification: Option<VerificationReport>,
}

/// A version to roll back to: the plugin, loaded, and its file's bytes.
pub struct Earlier {
    /// The loaded version.
    pub plugin: PluginRef,
    /// Its file's bytes.
    pub bytes: Arc<Vec<u8>>,
}

/// The versions of every plugin, by plugin name.
#[derive(Default)]
pub struct History {
    by_name: Mutex<HashMap<String, VecDeque<Served>>>,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Served>>> {
        self.by_name.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `plugin` (whose file holds `bytes`) serves from now on.
    pub fn served(&self, plugin: &PluginRef, bytes: Arc<Vec<u8>>) {
        let now = SystemTime::now();
        let mut all = self.lock();
        let versions = all.entry(plugin.name.clone()).or_default();
        for v in versions.iter_mut().filter(|v| v.until.is_none()) {
            v.until = Some(now);
            // Kept loaded, but without warm instances holding slots of the
            // engine's pool while it does not serve.
            if v.plugin.hash != plugin.hash {
                v.plugin.release_instances();
            }
        }
        versions.push_back(Served {
            plugin: plugin.clone(),
            bytes,
            from: now,
            until: None,
        });
        while versions.len() > KEPT {
            versions.pop_front();
        }
    }

    /// The plugin `name` stopped serving (its file was removed).
    pub fn stopped(&self, name: &str) {
        let now = SystemTime::now();
        if let Some(versions) = self.lock().get_mut(name) {
            for v in versions.iter_mut().filter(|v| v.until.is_none()) {
                v.until = Some(now);
                v.plugin.release_instances();
            }
        }
    }

    /// The version that served before the one with `serving_hash`: the
    /// newest kept version of another content.
    pub fn earlier(&self, name: &str, serving_hash: &str) -> Option<Earlier> {
        let all = self.lock();
        all.get(name)?
            .iter()
            .rev()
            .find(|v| v.plugin.hash != serving_hash)
            .map(|v| Earlier {
                plugin: v.plugin.clone(),
                bytes: v.bytes.clone(),
            })
    }

    /// The kept versions of `name`, oldest first.
    pub fn list(&self, name: &str) -> Vec<VersionInfo> {
        let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        self.lock()
            .get(name)
            .map(|versions| {
                versions
                    .iter()
                    .map(|v| VersionInfo {
                        hash: v.plugin.hash.clone(),
                        served_from: time(v.from),
                        served_until: v.until.map(time),
                        serving: v.until.is_none(),
                        verification: v.plugin.verification().cloned(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
