//! What happens when a new version of a loaded plugin arrives: it is
//! verified against stored history before it serves (see [`super::verify`]
//! for the check and its policies), and the versions that served are kept
//! for a one-step rollback (see [`super::versions`]).
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::PluginRef;
use super::cache::write_whole;
use super::registry::{LoadFailure, PluginRegistry, ScanReport};
use super::verify::{UpgradeCheck, UpgradeVerifier, VerificationReport, VerifyBudget};
use super::versions::{Earlier, VersionInfo};
use crate::error::CommandError;

/// How new versions are verified: by what, under which policies, within
/// which budget.
pub(super) struct Verification {
    pub(super) verifier: Arc<dyn UpgradeVerifier>,
    pub(super) policy: UpgradeCheck,
    pub(super) per_plugin: HashMap<String, UpgradeCheck>,
    pub(super) budget: VerifyBudget,
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

impl PluginRegistry {
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
    /// one again and writes its bytes to the plugin's file, so that the
    /// directory agrees: the next scan finds the file unchanged. It served
    /// before, so it is not verified again. A version that served since
    /// this host started is still loaded and swaps in at once; one that
    /// served before it started is loaded from the kept versions first (its
    /// compiled form is in the compile cache). Commands already running
    /// finish on the version they started with.
    pub async fn rollback(self: &Arc<Self>, name: &str) -> Result<Rollback, CommandError> {
        // No scan may swap the map, or read the file, in between.
        let _one_at_a_time = self.scanning.clone().lock_owned().await;
        let Some(current) = self.list().into_iter().find(|p| p.name == name) else {
            return Err(CommandError::NotFound(format!(
                "no plugin named {name:?} is loaded (GET /v1/plugins lists them)"
            )));
        };
        let earlier = self.history.earlier(name, &current.hash).map_err(|e| {
            CommandError::Internal(format!(
                "the earlier version of plugin {name:?} cannot be read back ({e}); nothing was \
                 rolled back: to go back by hand, copy the earlier .wasm file into the plugin \
                 directory"
            ))
        })?;
        let Some(earlier) = earlier else {
            let kept = if self.cache.dir().is_some() {
                "the versions that served are kept in the compile cache"
            } else {
                "without a compile cache (--no-cache), only the versions that served since the \
                 host started are kept"
            };
            return Err(CommandError::NotFound(format!(
                "plugin {name:?} has no earlier version kept to roll back to ({kept}; \
                 GET /v1/plugins/{name}/versions lists them)"
            )));
        };
        let bytes = earlier.bytes.clone();
        let plugin = match earlier.plugin {
            Some(plugin) => plugin,
            None => self.load_earlier(&current, earlier).await?,
        };
        if plugin.info.aggregate_type != current.info.aggregate_type {
            return Err(CommandError::Internal(format!(
                "the earlier version {} of plugin {name:?} serves aggregate type {:?}, not {:?}; \
                 nothing was rolled back",
                plugin.short_hash(),
                plugin.info.aggregate_type,
                current.info.aggregate_type
            )));
        }
        let path = current.path.clone();
        let (file, contents) = (path.clone(), bytes.clone());
        let written = tokio::task::spawn_blocking(move || write_whole(&file, &contents))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            return Err(CommandError::Internal(format!(
                "cannot write the earlier version to {} ({e}); nothing was rolled back: make the \
                 plugin directory writable by this user",
                path.display()
            )));
        }
        let mut next: HashMap<String, PluginRef> = (*self.plugins.load_full()).clone();
        next.insert(current.info.aggregate_type.clone(), plugin.clone());
        self.plugins.store(Arc::new(next));
        self.history.served(&plugin, bytes);
        tracing::warn!(
            plugin = name,
            from = %current.short_hash(),
            to = %plugin.short_hash(),
            "plugin rolled back"
        );
        Ok(Rollback {
            plugin: name.to_owned(),
            from: current.hash.clone(),
            to: plugin.hash.clone(),
        })
    }

    /// Loads a kept version that served before this host started, for a
    /// rollback from `current`, with the report it served with.
    async fn load_earlier(
        self: &Arc<Self>,
        current: &PluginRef,
        earlier: Earlier,
    ) -> Result<PluginRef, CommandError> {
        let this = self.clone();
        let path = current.path.clone();
        let Earlier {
            hash,
            bytes,
            verification,
            ..
        } = earlier;
        let short = hash.get(..12).unwrap_or(&hash).to_owned();
        let loaded = tokio::task::spawn_blocking(move || this.load_bytes(&path, &bytes, hash))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("loading panicked: {e}")));
        let plugin = loaded.map_err(|e| {
            CommandError::Internal(format!(
                "the earlier version {short} of plugin {:?} no longer loads ({e:#}); nothing was \
                 rolled back",
                current.name
            ))
        })?;
        if let Some(report) = verification {
            plugin.set_verification(report);
        }
        Ok(Arc::new(plugin))
    }

    /// Verifies `candidate`, a new version of `current`, if a verifier is
    /// set and the policy is not `off`. False when the policy refuses it
    /// (recorded as a load failure of `path`; `current` keeps serving).
    pub(super) async fn verified(
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
}
