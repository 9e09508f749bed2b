//! The kept versions of each plugin on disk, so that a rollback and the
//! version list survive a restart of the host.
//!
//! They live in the compile cache, under a directory of their own per
//! plugin directory (`versions/<key>/<plugin name>/`, the key derived from
//! the plugin directory's path: hosts that share one compile cache but
//! serve different plugin directories never see each other's versions):
//!
//! - `versions.json`: each kept version's content hash, when it served and
//!   its verification report, oldest first;
//! - `<hash>.wasm`: the file's bytes of each kept version. Its compiled form
//!   is in the compile cache under the same hash, so bringing one back is a
//!   cache hit, not a compilation.
//!
//! Both are written whole to a temporary file and renamed, so a crash
//! leaves the previous list or the new one, never half of one. Nothing
//! here can fail a load or a command: the callers log the errors and go on
//! with the versions kept in memory.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::verify::VerificationReport;

/// What went wrong reading or writing the kept versions.
#[derive(Debug, thiserror::Error)]
pub enum KeptError {
    /// A file or directory could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "writing", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The version list is not what this host writes.
    #[error(
        "{} is not a list of kept versions ({source}); delete it to start a new list",
        path.display()
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// A kept file's bytes do not hash to its name.
    #[error("{} was changed after it was kept (its SHA-256 is not {hash}); delete it", path.display())]
    Altered {
        /// The file.
        path: PathBuf,
        /// The hash it should have.
        hash: String,
    },
}

/// One kept version as `versions.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The content hash (SHA-256 of the file, hex).
    pub hash: String,
    /// When it began serving, in milliseconds since the Unix epoch.
    pub served_from_ms: u64,
    /// When it stopped; `None` while it serves, or when the host stopped
    /// while it served.
    pub served_until_ms: Option<u64>,
    /// The check it passed (or, under `warn`, failed) before it served.
    pub verification: Option<VerificationReport>,
}

/// The list as a file: a format number, so that a later host can tell.
#[derive(Serialize, Deserialize)]
struct ListFile {
    format: u32,
    versions: Vec<Record>,
}

const FORMAT: u32 = 1;

/// Milliseconds since the Unix epoch (0 before it).
pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Where the kept versions of one plugin directory are.
#[derive(Debug, Clone)]
pub struct KeptFiles {
    root: PathBuf,
}

impl KeptFiles {
    /// The kept versions of the plugins in `plugin_dir`, in the compile
    /// cache `cache_dir`.
    pub fn new(cache_dir: &Path, plugin_dir: &Path) -> KeptFiles {
        // The same directory named two ways must give one key.
        let canonical = std::fs::canonicalize(plugin_dir).unwrap_or_else(|_| plugin_dir.into());
        let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        let key = hex::encode(&digest[..8]);
        KeptFiles {
            root: cache_dir.join("versions").join(key),
        }
    }

    /// The directory of plugin `name`, or `None` for a name that is not one
    /// plain path component (a file named `...wasm` has the stem `..`).
    fn dir(&self, name: &str) -> Option<PathBuf> {
        let mut parts = Path::new(name).components();
        match (parts.next(), parts.next()) {
            (Some(Component::Normal(_)), None) => Some(self.root.join(name)),
            _ => None,
        }
    }

    /// The kept versions of plugin `name`, oldest first; none if nothing
    /// was kept yet.
    pub fn read(&self, name: &str) -> Result<Vec<Record>, KeptError> {
        let Some(dir) = self.dir(name) else {
            return Ok(Vec::new());
        };
        let path = dir.join("versions.json");
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(KeptError::Io {
                    action: "reading",
                    path,
                    source,
                });
            }
        };
        let list: ListFile = serde_json::from_slice(&text)
            .map_err(|source| KeptError::Unreadable { path, source })?;
        Ok(list.versions)
    }

    /// Records `versions` as the kept versions of plugin `name`, with the
    /// file bytes of `new` (hash, bytes) if they are not kept yet, and
    /// deletes the files of versions no longer listed.
    pub fn write(
        &self,
        name: &str,
        versions: &[Record],
        new: Option<(&str, &[u8])>,
    ) -> Result<(), KeptError> {
        let Some(dir) = self.dir(name) else {
            return Ok(());
        };
        std::fs::create_dir_all(&dir).map_err(|source| KeptError::Io {
            action: "creating",
            path: dir.clone(),
            source,
        })?;
        if let Some((hash, bytes)) = new {
            let path = dir.join(format!("{hash}.wasm"));
            if !path.exists() {
                write_whole(&path, bytes)?;
            }
        }
        let list = ListFile {
            format: FORMAT,
            versions: versions.to_vec(),
        };
        let path = dir.join("versions.json");
        let text = serde_json::to_vec_pretty(&list).map_err(|e| KeptError::Io {
            action: "encoding",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        write_whole(&path, &text)?;
        self.prune(&dir, versions);
        Ok(())
    }

    /// Deletes the kept files of versions not in `versions`. Best effort: a
    /// file left behind costs only disk.
    fn prune(&self, dir: &Path, versions: &[Record]) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let stale = path.extension().is_some_and(|e| e == "wasm")
                && path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|hash| !versions.iter().any(|v| v.hash == hash));
            if stale && let Err(e) = std::fs::remove_file(&path) {
                tracing::debug!(path = %path.display(), error = %e, "could not delete a version no longer kept");
            }
        }
    }

    /// The file bytes of the kept version `hash` of plugin `name`, checked
    /// against the hash.
    pub fn bytes(&self, name: &str, hash: &str) -> Result<Vec<u8>, KeptError> {
        let path = self
            .dir(name)
            .unwrap_or_else(|| self.root.clone())
            .join(format!("{hash}.wasm"));
        let bytes = std::fs::read(&path).map_err(|source| KeptError::Io {
            action: "reading",
            path: path.clone(),
            source,
        })?;
        if hex::encode(Sha256::digest(&bytes)) != hash {
            return Err(KeptError::Altered {
                path,
                hash: hash.to_owned(),
            });
        }
        Ok(bytes)
    }
}

/// Writes `bytes` to `path` whole ([`write_whole`](super::cache::write_whole)).
fn write_whole(path: &Path, bytes: &[u8]) -> Result<(), KeptError> {
    super::cache::write_whole(path, bytes).map_err(|source| KeptError::Io {
        action: "writing",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hash: &str) -> Record {
        Record {
            hash: hash.to_owned(),
            served_from_ms: 1,
            served_until_ms: None,
            verification: None,
        }
    }

    fn hash_of(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn versions_and_their_bytes_survive_and_stale_files_go() {
        let cache = tempfile::tempdir().expect("a directory");
        let plugins = tempfile::tempdir().expect("a directory");
        let kept = KeptFiles::new(cache.path(), plugins.path());
        assert_eq!(kept.read("bank").expect("nothing kept"), vec![]);

        let (one, two) = (b"one".as_slice(), b"two".as_slice());
        let (h1, h2) = (hash_of(one), hash_of(two));
        kept.write("bank", &[record(&h1)], Some((&h1, one)))
            .expect("written");
        kept.write("bank", &[record(&h1), record(&h2)], Some((&h2, two)))
            .expect("written");
        // Another handle on the same directory, named another way, as a
        // restarted host has.
        let again = KeptFiles::new(cache.path(), &plugins.path().join("."));
        assert_eq!(
            again.read("bank").expect("kept"),
            vec![record(&h1), record(&h2)]
        );
        assert_eq!(again.bytes("bank", &h1).expect("kept bytes"), one);

        // Dropping a version from the list deletes its file.
        again.write("bank", &[record(&h2)], None).expect("written");
        assert!(matches!(
            again.bytes("bank", &h1),
            Err(KeptError::Io { .. })
        ));
        assert_eq!(again.bytes("bank", &h2).expect("kept bytes"), two);

        // Another plugin directory sharing the cache sees none of it.
        let elsewhere = tempfile::tempdir().expect("a directory");
        let other = KeptFiles::new(cache.path(), elsewhere.path());
        assert_eq!(other.read("bank").expect("nothing kept"), vec![]);
    }

    #[test]
    fn an_altered_file_and_a_garbled_list_are_errors_not_versions() {
        let cache = tempfile::tempdir().expect("a directory");
        let kept = KeptFiles::new(cache.path(), Path::new("/nonexistent/plugins"));
        let h = hash_of(b"one");
        kept.write("bank", &[record(&h)], Some((&h, b"one")))
            .expect("written");
        let dir = kept.dir("bank").expect("a plain name");
        std::fs::write(dir.join(format!("{h}.wasm")), b"tampered").expect("written");
        let altered = kept.bytes("bank", &h).expect_err("altered");
        assert!(matches!(altered, KeptError::Altered { .. }), "{altered}");

        std::fs::write(dir.join("versions.json"), b"{not json").expect("written");
        let garbled = kept.read("bank").expect_err("garbled");
        assert!(garbled.to_string().contains("delete it"), "{garbled}");
    }

    #[test]
    fn a_name_that_is_not_a_plain_file_name_is_not_kept() {
        let cache = tempfile::tempdir().expect("a directory");
        let kept = KeptFiles::new(cache.path(), Path::new("/p"));
        let h = hash_of(b"x");
        kept.write("..", &[record(&h)], Some((&h, b"x")))
            .expect("nothing to do");
        assert_eq!(kept.read("..").expect("nothing"), vec![]);
        assert!(!cache.path().join("versions").exists());
    }
}
