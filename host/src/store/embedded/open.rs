//! Opening the embedded store's data directory: creating it, taking its
//! lock, opening the database in WAL mode with the durability settings, and
//! the read-only connections.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rusqlite::{Connection, OpenFlags};

use super::schema::migrate;
use super::{BUSY_TIMEOUT, DB_FILE, LOCK_FILE, READERS, WAL_AUTOCHECKPOINT_PAGES};

pub(super) struct Opened {
    pub(super) dir: PathBuf,
    pub(super) db_path: PathBuf,
    /// The position of the last event stored.
    pub(super) head: u64,
    /// The store's id, which ties the index database to this log.
    pub(super) store_id: String,
    pub(super) lock: File,
    pub(super) writer: Connection,
    pub(super) readers: Vec<Connection>,
}

pub(super) fn open_blocking(dir: &Path) -> anyhow::Result<Opened> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => bail!(
            "the embedded store path {} is a file, but it must be a directory (rehydra keeps \
             {DB_FILE} and {LOCK_FILE} inside it): use embedded://<directory>, a new or existing \
             directory",
            dir.display()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| {
                format!(
                    "cannot create the data directory {}: check that its parent exists and is \
                     writable by this user, or choose another path",
                    dir.display()
                )
            })?;
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot access the data directory {}: check its permissions",
                    dir.display()
                )
            });
        }
    }

    let lock = take_lock(dir)?;
    let db_path = dir.join(DB_FILE);
    let created = !db_path.exists();

    let writer = Connection::open_with_flags(
        &db_path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", db_path.display()))?;
    let not_a_database = || {
        format!(
            "{} is not a usable SQLite database (damaged, or another program's file?): move it \
             away or choose another directory",
            db_path.display()
        )
    };
    if writer.is_readonly("main").with_context(not_a_database)? {
        bail!(
            "{} is read-only: make it writable by this user or choose another directory",
            db_path.display()
        );
    }
    writer.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = writer
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .with_context(not_a_database)?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "cannot switch {} to WAL mode (it stayed in {mode:?} mode); is the directory on a \
             file system without shared-memory support, such as a network share?",
            db_path.display()
        );
    }
    // NORMAL: in WAL mode a commit writes the log without waiting for the
    // disk; the syncer thread fsyncs the log and only then acknowledges the
    // appends (see `syncer.rs`), so that the writer commits the next group
    // while the disk works. FULL would fsync inside every commit, and the
    // writer would wait for each one.
    // wal_autocheckpoint: SQLite's default of ~4 MB of WAL. An append
    // writes one row at the log table's end, so a checkpoint copies few,
    // contiguous pages; and a small WAL is soon reused from its start, where
    // an fdatasync has no file growth to record (measured with one client:
    // 1.5x the appends/s of a 40 MB WAL, which grew for the whole run).
    // journal_size_limit: shrink the WAL back after a checkpoint.
    writer.execute_batch(&format!(
        "PRAGMA synchronous=NORMAL;
         PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES};
         PRAGMA journal_size_limit=67108864;"
    ))?;
    writer.set_prepared_statement_cache_capacity(32);
    let store_id = migrate(&writer, &db_path)?;
    if created {
        // Make the new files' directory entries durable too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync the data directory {}", dir.display()))?;
    }

    let head: i64 = writer
        .query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
            r.get(0)
        })
        .with_context(not_a_database)?;
    let head = u64::try_from(head).with_context(not_a_database)?;

    let mut readers = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let reader = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open {} for reading", db_path.display()))?;
        reader.busy_timeout(BUSY_TIMEOUT)?;
        reader.set_prepared_statement_cache_capacity(16);
        // `rarray`: a read looks a list of positions up in one statement.
        rusqlite::vtab::array::load_module(&reader)
            .with_context(|| format!("cannot prepare {} for reading", db_path.display()))?;
        readers.push(reader);
    }

    Ok(Opened {
        dir: dir.to_path_buf(),
        db_path,
        head,
        store_id,
        lock,
        writer,
        readers,
    })
}

/// Takes the directory's exclusive lock (an OS file lock, released when the
/// file is closed or the process dies) and writes our pid into it.
fn take_lock(dir: &Path) -> anyhow::Result<File> {
    let lock_path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false) // the holder's pid must survive our failed attempt
        .open(&lock_path)
        .with_context(|| {
            format!(
                "cannot create {} : the data directory {} must be writable by this user (fix its \
                 permissions or choose another directory)",
                lock_path.display(),
                dir.display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another rehydra process".to_owned()
            } else {
                format!("another rehydra process ({holder})")
            };
            bail!(
                "the data directory {} is in use by {who}: its {LOCK_FILE} file is locked. Stop \
                 that process or give this one another directory; two hosts must never share \
                 one embedded store",
                dir.display()
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
    }
    // Only informative; failing to write it is not worth refusing to start.
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "pid {}", std::process::id()))
        .and_then(|()| file.flush());
    Ok(file)
}
