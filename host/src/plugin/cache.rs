//! The on-disk compile cache: compiled components keyed by the content hash
//! of the `.wasm` file and by the engine's compatibility hash, so a restart
//! (or a reload of a file seen before) skips compilation.
//!
//! Cache files are native code that wasmtime maps and runs without
//! validation: the cache directory must be writable only by the host's user.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where compiled components are kept, if anywhere.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: Option<PathBuf>,
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from the cache.
    Hit,
    /// Compiled (and stored, if the cache is enabled).
    Compiled,
}

impl CompileCache {
    /// A cache in `dir` (created when first written), or none.
    pub fn new(dir: Option<PathBuf>) -> Self {
        CompileCache { dir }
    }

    /// The cache's directory, if the cache is enabled.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn entry_path(&self, engine: &Engine, content_hash: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Some(dir.join(format!("{content_hash}-{:016x}.cwasm", h.finish())))
    }

    /// Whether a compiled entry for `content_hash` is already on disk, so
    /// that [`load_or_compile`](Self::load_or_compile) will most likely not
    /// compile (an unreadable entry is still recompiled).
    pub fn contains(&self, engine: &Engine, content_hash: &str) -> bool {
        self.entry_path(engine, content_hash)
            .is_some_and(|path| path.exists())
    }

    /// Returns the compiled component for `bytes` (whose SHA-256 is
    /// `content_hash`), from the cache when possible. Blocking: call it off
    /// the async runtime.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        content_hash: &str,
    ) -> anyhow::Result<(Component, CacheOutcome)> {
        let entry = self.entry_path(engine, content_hash);
        if let Some(path) = entry.as_deref().filter(|p| p.exists()) {
            // SAFETY: the cache holds only files this host wrote with
            // `Component::serialize` for this engine configuration (the file
            // name carries the engine's compatibility hash), and the
            // directory is documented as private to the host's user.
            match unsafe { Component::deserialize_file(engine, path) } {
                Ok(component) => {
                    crate::metrics::global()
                        .compile_cache
                        .get_or_create(&crate::metrics::CacheLabels { result: "hit" })
                        .inc();
                    return Ok((component, CacheOutcome::Hit));
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "ignoring an unreadable compile cache entry; recompiling"
                ),
            }
        }
        let component = Component::new(engine, bytes)?;
        crate::metrics::global()
            .compile_cache
            .get_or_create(&crate::metrics::CacheLabels { result: "compiled" })
            .inc();
        if let Some(path) = entry
            && let Err(e) = store_entry(&component, &path)
        {
            tracing::warn!(path = %path.display(), error = %e, "could not write the compile cache");
        }
        Ok((component, CacheOutcome::Compiled))
    }
}

/// Writes atomically (temporary file, then rename) so a crash never leaves a
/// truncated entry that a later start would map.
fn store_entry(component: &Component, path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().context("cache entry has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = component.serialize()?;
    write_whole(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file beside it and a
/// rename, so that a crash leaves the old file or the new one, never part
/// of one.
pub(super) fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
