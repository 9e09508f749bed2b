//! Hot reload triggers: a watch on the plugin directory (debounced), so
//! that dropping a new `.wasm` file in is a deployment. `POST
//! /v1/plugins/reload` and SIGHUP trigger the same rescan.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};

use super::PluginRegistry;

/// How long the directory must be quiet before a rescan, by default
/// (`--watch-debounce`): a copy or a build writes a file in many steps.
/// Most of a warm reload's latency is this wait (BENCHMARKS.md).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(300);

/// Keeps the directory watch alive; dropping it stops watching.
pub struct DirectoryWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Watches `dir` and rescans the registry once `.wasm` files in it have
/// changed and the directory has then been quiet for `debounce`.
pub fn watch(
    registry: Arc<PluginRegistry>,
    dir: &Path,
    debounce: Duration,
) -> anyhow::Result<DirectoryWatch> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(e) => e
                .paths
                .iter()
                .any(|p| p.extension().is_some_and(|x| x == "wasm")),
            // An error from the watcher: rescan to be safe.
            Err(_) => true,
        };
        if relevant {
            // A full channel means a rescan is already due.
            let _ = tx.try_send(());
        }
    })
    .context("starting the plugin directory watch")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    let dir: PathBuf = dir.to_path_buf();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Wait for the directory to be quiet.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            tracing::debug!(dir = %dir.display(), "plugin directory changed; rescanning");
            if let Err(e) = registry.scan(&dir).await {
                tracing::error!("rescanning the plugin directory failed: {e:#}");
            }
        }
    });
    Ok(DirectoryWatch { _watcher: watcher })
}
