//! The embedded, durable event store (`embedded://PATH`): SQLite in WAL mode
//! inside a data directory that one host owns.
//!
//! Layout of the directory:
//! - `events.sqlite3` (+ SQLite's `-wal` and `-shm` files): the events;
//!   inspectable with the `sqlite3` tool.
//! - `LOCK`: held with an exclusive OS lock for as long as a host has the
//!   store open, so two hosts never write one directory. It holds the owner's
//!   process id for the error message; the file stays behind after close, and
//!   the OS drops the lock when the process exits, so it never goes stale.
//!
//! Writes: one writer thread owns the only read-write connection and commits
//! *groups* of appends. It takes everything queued (up to [`MAX_BATCH`]
//! appends, from any streams), runs them in one transaction (a conflict or
//! error in one append leaves the others alone: a one-event append fails as
//! one statement, a longer one runs in a savepoint), commits once, and only
//! then answers each caller. With `synchronous=FULL`
//! the commit is fsynced before anyone is told it succeeded, and one fsync
//! serves the whole group, which is what makes durable throughput exceed the
//! disk's fsync rate.
//!
//! Reads: a small pool of read-only connections used from
//! `spawn_blocking`. WAL lets them read a committed snapshot while the writer
//! works.
//!
//! What an append writes is what limits durable throughput: the commit
//! writes every page the group changed to the WAL and fsyncs it, and each
//! append changes a page of every index it touches at a random place. So
//! the schema has as few indexes as the reads need — the events table by
//! position, `(stream, version)` and the event id — and the writer looks an
//! event id up only when an append fails (a retry is recognised then).
//!
//! An empty append reports the stream's version and the position of its last
//! event (0 for a missing stream). An event id already stored in another
//! stream is refused as [`StoreError::Corrupt`]: ids are unique across the
//! store (a unique index), and a retry cannot fix a reused message id.
//!
//! An append that fails with [`StoreError::Unavailable`] has an unknown
//! outcome (the disk may have taken the commit before reporting an error), so
//! callers retry with the same event ids, which the idempotency rule makes
//! safe.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::memory::{id_already_stored, id_in_other_stream, id_twice_in_append};
use super::{AppendResult, EventData, EventStore, ExpectedVersion, RecordedEvent, StoreError};

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "events.sqlite3";
/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "LOCK";
/// The schema version this build writes; a database with a higher one was
/// written by a newer rehydra and is refused rather than misread, and one
/// with a lower one is migrated when it is opened.
///
/// - 1: the first schema.
/// - 2: no index on `(stream, message_id)`. It cost every append a write to
///   a random page of that index (a third of the WAL bytes per append,
///   BENCHMARKS.md); a command's events are found through the event-id
///   index instead ([`EventStore::find_command_events`]).
pub const SCHEMA_VERSION: u32 = 2;
/// The most appends committed in one transaction. Bounds the latency a large
/// group adds and the memory it holds; beyond it, the next group follows.
pub const MAX_BATCH: usize = 512;

/// Appends waiting for the writer, at most; a full queue makes callers wait
/// (back-pressure) instead of growing memory.
const QUEUE_CAPACITY: usize = 4096;
/// Read-only connections in the pool.
const READERS: usize = 4;
/// How long a statement waits for a lock held by someone else (only a
/// `sqlite3` shell poking at the file can hold one) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `SELECT <every column> FROM events <rest>`, as one literal so that
/// `prepare_cached` finds it without building a string per read.
macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT stream, version, position, event_id, event_type, data, metadata, message_id \
             FROM events ",
            $rest
        )
    };
}

/// The embedded SQLite event store. See the module docs.
///
/// Closing: [`EmbeddedStore::close`] stops the writer after it has committed
/// the appends already queued, checkpoints the WAL into the database file,
/// releases the directory's lock and waits for all of that; later calls fail
/// with [`StoreError::Unavailable`]. Dropping the store without `close` does
/// the same in the background (the writer sees its queue close), so the lock
/// is released a moment after the drop rather than at it: call `close` when
/// the directory must be free again right away, for example before reopening
/// it in the same process.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// The only way to the writer; dropping it is what stops the writer when
    /// the store is dropped without `close`.
    writer: mpsc::Sender<Command>,
    /// The writer thread, taken by `close` to wait for it.
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    /// Serialises `close` so a second caller waits for the first to finish.
    close_lock: tokio::sync::Mutex<()>,
}

/// What the reads (running on blocking threads) share with the store.
struct Shared {
    /// The data directory, for messages.
    dir: PathBuf,
    closed: AtomicBool,
    /// `None` once the store is closed.
    readers: Vec<Mutex<Option<Connection>>>,
    /// Round-robin start for picking a reader.
    next_reader: AtomicUsize,
    /// Bumped by the writer after every batch it commits.
    commits: tokio::sync::watch::Sender<u64>,
}

enum Command {
    Append(AppendRequest),
    /// Stop after the appends queued before this one.
    Close,
}

struct AppendRequest {
    stream: String,
    expected: ExpectedVersion,
    events: Vec<EventData>,
    reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in directory `path`.
    ///
    /// Fails with a message that says what to do when `path` is a file, the
    /// directory cannot be written, another rehydra process holds it, the
    /// database was written by a newer rehydra, or the file is not a rehydra
    /// database.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let dir = path.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || open_blocking(&dir))
            .await
            .context("opening the embedded store was interrupted")??;
        let Opened {
            dir,
            lock,
            writer,
            readers,
        } = opened;

        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let thread_dir = dir.clone();
        let commits = tokio::sync::watch::Sender::new(0u64);
        let writer_commits = commits.clone();
        let thread = std::thread::Builder::new()
            .name("rehydra-store-writer".into())
            .spawn(move || writer_main(writer, lock, rx, thread_dir, writer_commits))
            .context("cannot start the event store's writer thread")?;

        tracing::info!(path = %dir.display(), "embedded event store open");
        Ok(Self {
            shared: Arc::new(Shared {
                dir,
                closed: AtomicBool::new(false),
                readers: readers.into_iter().map(|c| Mutex::new(Some(c))).collect(),
                next_reader: AtomicUsize::new(0),
                commits,
            }),
            writer: tx,
            writer_thread: Mutex::new(Some(thread)),
            close_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Closes the store: commits the appends already queued, checkpoints,
    /// closes the database, releases the directory's lock, and returns once
    /// all of that is done. Appends queued after the close began fail with
    /// [`StoreError::Unavailable`], as does every later call. Calling it again
    /// is harmless.
    pub async fn close(&self) {
        let _serialised = self.close_lock.lock().await;
        self.shared.closed.store(true, Ordering::SeqCst);

        let shared = Arc::clone(&self.shared);
        let thread = self
            .writer_thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(thread) = thread else {
            return; // already closed
        };
        // Readers first (each once its current read is done), so the writer
        // holds the last connection and SQLite removes the WAL file when it
        // closes it.
        let readers = Arc::clone(&shared);
        let _ = tokio::task::spawn_blocking(move || {
            for reader in &readers.readers {
                drop(
                    reader
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take(),
                );
            }
        })
        .await;
        // A send error means the writer is already gone; joining tells us.
        let _ = self.writer.send(Command::Close).await;
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!(path = %self.shared.dir.display(), "the event store's writer thread panicked");
        }
    }

    fn closed_error(&self) -> StoreError {
        closed_error(&self.shared.dir)
    }

    /// Runs `f` with a read-only connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            let readers = &shared.readers;
            let start = shared.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len();
            // Take any idle connection; if all are busy, queue on one.
            let guard = (0..readers.len())
                .find_map(|k| readers[(start + k) % readers.len()].try_lock().ok())
                .unwrap_or_else(|| {
                    readers[start]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                });
            match guard.as_ref() {
                Some(conn) => f(conn),
                None => Err(closed_error(&shared.dir)),
            }
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("event store read failed: {e}")))?
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

fn closed_error(dir: &Path) -> StoreError {
    StoreError::Unavailable(format!("the embedded store at {} is closed", dir.display()))
}

#[async_trait]
impl EventStore for EmbeddedStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            stream: stream.to_owned(),
            expected,
            events,
            reply,
        };
        // Either failure means the writer has stopped (closed, or crashed);
        // a request it dropped unanswered was not committed.
        self.writer
            .send(Command::Append(request))
            .await
            .map_err(|_| writer_gone(&self.shared.dir))?;
        answer.await.map_err(|_| writer_gone(&self.shared.dir))?
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stream = stream.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(select_events!(
                    "WHERE stream = ?1 AND version >= ?2 ORDER BY version LIMIT ?3"
                ))
                .map_err(sql_error)?;
            let rows = stmt
                .query(params![
                    stream,
                    to_sql_int(from_version),
                    to_sql_limit(limit)
                ])
                .map_err(sql_error)?;
            collect_events(rows)
        })
        .await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        let stream = stream.to_owned();
        self.read(move |conn| Ok(stream_head(conn, &stream)?.0))
            .await
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(select_events!(
                    "WHERE position >= ?1 ORDER BY position LIMIT ?2"
                ))
                .map_err(sql_error)?;
            let rows = stmt
                .query(params![to_sql_int(from_position), to_sql_limit(limit)])
                .map_err(sql_error)?;
            collect_events(rows)
        })
        .await
    }

    async fn find_command_events(
        &self,
        stream: &str,
        first_event_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream = stream.to_owned();
        self.read(move |conn| {
            // The first event through the event-id index, then the stream
            // from there on, read only as far as the command's events go.
            let mut stmt = conn
                .prepare_cached(select_events!(
                    "WHERE stream = ?1 AND version >= \
                     (SELECT version FROM events WHERE event_id = ?2 AND stream = ?1) \
                     ORDER BY version"
                ))
                .map_err(sql_error)?;
            let mut rows = stmt
                .query(params![stream, first_event_id.as_bytes()])
                .map_err(sql_error)?;
            let mut events: Vec<RecordedEvent> = Vec::new();
            while let Some(row) = rows.next().map_err(sql_error)? {
                let event = event_from_row(row)?;
                if events
                    .first()
                    .is_some_and(|first| first.message_id != event.message_id)
                {
                    break;
                }
                events.push(event);
            }
            Ok(events)
        })
        .await
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            let head: Option<i64> = conn
                .query_row("SELECT MAX(position) FROM events", [], |row| row.get(0))
                .map_err(sql_error)?;
            head.map_or(Ok(0), |p| from_sql_int(p, "position"))
        })
        .await
    }

    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.shared.commits.subscribe())
    }

    fn describe(&self) -> String {
        format!("embedded SQLite store at {}", self.shared.dir.display())
    }
}

fn writer_gone(dir: &Path) -> StoreError {
    StoreError::Unavailable(format!(
        "the embedded store at {} is closed or its writer has stopped; the append was not \
         committed",
        dir.display()
    ))
}

// ---------------------------------------------------------------------------
// Opening

struct Opened {
    dir: PathBuf,
    lock: File,
    writer: Connection,
    readers: Vec<Connection>,
}

fn open_blocking(dir: &Path) -> anyhow::Result<Opened> {
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
    // FULL: in WAL mode this fsyncs the log at every commit, which is what
    // lets an append be acknowledged only once it is durable (NORMAL would
    // not).
    // wal_autocheckpoint: checkpoint every ~40 MB of WAL instead of SQLite's
    // ~4 MB. Random event ids spread index updates over many pages; the
    // larger window writes each hot page back once instead of many times
    // (measured: 1.3-1.9x the appends/s with 128 writers on a slow disk).
    // journal_size_limit: shrink the WAL back after a checkpoint.
    writer.execute_batch(
        "PRAGMA synchronous=FULL;
         PRAGMA wal_autocheckpoint=10000;
         PRAGMA journal_size_limit=67108864;",
    )?;
    writer.set_prepared_statement_cache_capacity(32);
    migrate(&writer, &db_path)?;
    if created {
        // Make the new files' directory entries durable too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync the data directory {}", dir.display()))?;
    }

    let mut readers = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let reader = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open {} for reading", db_path.display()))?;
        reader.busy_timeout(BUSY_TIMEOUT)?;
        reader.set_prepared_statement_cache_capacity(16);
        readers.push(reader);
    }

    Ok(Opened {
        dir: dir.to_path_buf(),
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

/// Creates the schema in a new database, checks the version of an existing
/// one, and is where later migrations go.
fn migrate(conn: &Connection, db_path: &Path) -> anyhow::Result<()> {
    let tx = conn.unchecked_transaction()?;
    let has_meta: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rehydra_meta')",
        [],
        |r| r.get(0),
    )?;
    if has_meta {
        let found: Option<String> = tx
            .query_row(
                "SELECT value FROM rehydra_meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let Some(found) = found else {
            bail!(
                "{} has no schema version in rehydra_meta; it is damaged or was not written by \
                 rehydra",
                db_path.display()
            );
        };
        let version: u32 = found.parse().with_context(|| {
            format!(
                "{} has an unreadable schema version {found:?}",
                db_path.display()
            )
        })?;
        if version > SCHEMA_VERSION {
            bail!(
                "{} was written by a newer rehydra (schema version {version}; this build knows up \
                 to {SCHEMA_VERSION}): upgrade rehydra, or open a copy made before the upgrade",
                db_path.display()
            );
        }
        if version < 2 {
            tx.execute_batch("DROP INDEX IF EXISTS events_stream_message_id")?;
        }
        if version < SCHEMA_VERSION {
            tx.execute(
                "UPDATE rehydra_meta SET value = ?1 WHERE key = 'schema_version'",
                [SCHEMA_VERSION.to_string()],
            )?;
            tx.commit()
                .with_context(|| format!("cannot migrate {}", db_path.display()))?;
            tracing::info!(
                path = %db_path.display(),
                from = version,
                to = SCHEMA_VERSION,
                "event store schema migrated"
            );
        }
        return Ok(());
    }

    let tables: i64 = tx.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
        [],
        |r| r.get(0),
    )?;
    if tables > 0 {
        bail!(
            "{} is an SQLite database but not a rehydra event store (it has no rehydra_meta \
             table): move it away or choose another directory",
            db_path.display()
        );
    }
    tx.execute_batch(
        "CREATE TABLE rehydra_meta (
             key   TEXT PRIMARY KEY,
             value TEXT NOT NULL
         );
         CREATE TABLE events (
             position   INTEGER PRIMARY KEY,
             stream     TEXT NOT NULL,
             version    INTEGER NOT NULL,
             event_id   BLOB NOT NULL,
             event_type TEXT NOT NULL,
             data       BLOB NOT NULL,
             metadata   BLOB NOT NULL,
             message_id TEXT NOT NULL,
             UNIQUE (stream, version)
         );
         CREATE UNIQUE INDEX events_event_id ON events (event_id);",
    )?;
    tx.execute(
        "INSERT INTO rehydra_meta (key, value) VALUES ('schema_version', ?1)",
        [SCHEMA_VERSION.to_string()],
    )?;
    tx.commit()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The writer

/// Logs if the writer thread unwinds, which would be a bug; callers already
/// get `Unavailable` from the dropped channels.
struct PanicReporter<'a>(&'a Path);

impl Drop for PanicReporter<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(path = %self.0.display(), "the event store's writer thread panicked; appends will fail until restart");
        }
    }
}

fn writer_main(
    conn: Connection,
    lock: File,
    mut queue: mpsc::Receiver<Command>,
    dir: PathBuf,
    commits: tokio::sync::watch::Sender<u64>,
) {
    let _reporter = PanicReporter(&dir);
    let mut batch: Vec<AppendRequest> = Vec::with_capacity(MAX_BATCH);
    // `None` from the queue: every sender is gone (the store was dropped);
    // the queue hands out what was already in it first.
    while let Some(command) = queue.blocking_recv() {
        let mut closing = false;
        match command {
            Command::Append(request) => batch.push(request),
            Command::Close => closing = true,
        }
        while !closing && batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(Command::Append(request)) => batch.push(request),
                Ok(Command::Close) => closing = true,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_batch(&conn, &mut batch);
            // A wake-up for live subscriptions; they read what is committed.
            commits.send_modify(|n| *n = n.wrapping_add(1));
        }
        if closing {
            break;
        }
    }
    // Anything still queued is dropped unanswered, which its caller sees as
    // `Unavailable`.
    drop(queue);

    // Fold the WAL into the database so the directory is one file at rest.
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(path = %dir.display(), error = %e, "checkpoint at close failed");
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(path = %dir.display(), error = %e, "closing the event store failed");
    }
    // Only now may another host take the directory.
    drop(lock);
    tracing::info!(path = %dir.display(), "embedded event store closed");
}

/// Commits `batch` (emptying it) in one transaction and answers each request.
fn commit_batch(conn: &Connection, batch: &mut Vec<AppendRequest>) {
    let fail_all = |batch: &mut Vec<AppendRequest>, message: String| {
        tracing::warn!(error = %message, appends = batch.len(), "event store batch failed");
        for request in batch.drain(..) {
            let _ = request
                .reply
                .send(Err(StoreError::Unavailable(message.clone())));
        }
    };

    let began = std::time::Instant::now();
    if let Err(e) = run(conn, "BEGIN IMMEDIATE") {
        let _ = run(conn, "ROLLBACK");
        return fail_all(batch, format!("cannot start a write transaction: {e}"));
    }
    let mut results = Vec::with_capacity(batch.len());
    for request in batch.iter_mut() {
        let events = std::mem::take(&mut request.events);
        results.push(append_in_savepoint(
            conn,
            &request.stream,
            request.expected,
            &events,
        ));
        // SQLite rolls back the whole transaction on some errors (disk full,
        // I/O error). Carrying on would run later appends outside it, each
        // committing on its own, so the batch stops here.
        if conn.is_autocommit() {
            let message = results
                .pop()
                .and_then(Result::err)
                .map(|e| match e {
                    StoreError::Unavailable(m) | StoreError::Corrupt(m) => m,
                    other => other.to_string(),
                })
                .unwrap_or_else(|| "the transaction was rolled back".into());
            return fail_all(batch, format!("write failed, nothing committed: {message}"));
        }
    }
    if let Err(e) = run(conn, "COMMIT") {
        let _ = run(conn, "ROLLBACK");
        return fail_all(batch, format!("commit failed: {e}"));
    }
    crate::metrics::global().group_commit("embedded", batch.len(), began.elapsed());
    for (request, result) in batch.drain(..).zip(results) {
        // The caller may have given up waiting; the append stands anyway.
        let _ = request.reply.send(result);
    }
}

fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// One append, whose failure undoes only its own rows so that the rest of
/// the batch still commits. An append of several events runs in a savepoint;
/// an append of one event does not need one, because its only write is one
/// `INSERT`, which SQLite undoes by itself when it fails. (The savepoint's
/// two statements were a tenth of an append's SQL.)
fn append_in_savepoint(
    conn: &Connection,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<AppendResult, StoreError> {
    if events.len() <= 1 {
        return append_one(conn, stream, expected, events);
    }
    run(conn, "SAVEPOINT append").map_err(sql_error)?;
    let result = append_one(conn, stream, expected, events);
    if result.is_err() {
        // Errors here only matter if the transaction is gone, which the
        // caller checks.
        let _ = run(conn, "ROLLBACK TO append");
    }
    let _ = run(conn, "RELEASE append");
    result
}

fn append_one(
    conn: &Connection,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<AppendResult, StoreError> {
    let (version, last_position) = stream_head(conn, stream)?;
    if !expected.matches(version) {
        // A retry of an append that was stored finds the version moved on:
        // it is recognised by its first event's id, and answered as before.
        // (Looking the id up only on this path and on a uniqueness failure
        // saves every other append a random probe of the event-id index.)
        if let Some(retried) = recognise_retry(conn, stream, events)? {
            return Ok(retried);
        }
        return Err(StoreError::WrongExpectedVersion {
            stream: stream.to_owned(),
            expected,
            actual: version,
        });
    }
    let mut result = AppendResult {
        version,
        position: last_position,
    };
    if events.is_empty() {
        return Ok(result);
    }

    let mut insert = conn
        .prepare_cached(
            "INSERT INTO events (stream, version, event_id, event_type, data, metadata, message_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(sql_error)?;
    for event in events {
        result.version += 1;
        let inserted = insert.execute(params![
            stream,
            to_sql_int(result.version),
            event.event_id.as_bytes(),
            event.event_type,
            event.data,
            event.metadata,
            event.message_id,
        ]);
        if let Err(e) = inserted {
            if e.sqlite_error_code() != Some(ErrorCode::ConstraintViolation) {
                return Err(sql_error(e));
            }
            // The first event's id is stored already: a retry (with an
            // expectation that still matches, such as `Any`), or an id
            // reused across streams. Nothing of this append was written.
            if result.version == version + 1
                && let Some(retried) = recognise_retry(conn, stream, events)?
            {
                return Ok(retried);
            }
            return Err(explain_duplicate_id(conn, stream, version, event.event_id)
                .unwrap_or_else(|| sql_error(e)));
        }
        // The rowid SQLite chose: one more than the largest, so positions
        // grow in commit order with a single writer.
        result.position = from_sql_int(conn.last_insert_rowid(), "position")?;
    }
    Ok(result)
}

/// If `events` were stored before (their first event's id is in `stream`),
/// the outcome of that append; an id stored in another stream is an error
/// that no retry can fix.
fn recognise_retry(
    conn: &Connection,
    stream: &str,
    events: &[EventData],
) -> Result<Option<AppendResult>, StoreError> {
    let Some(first) = events.first() else {
        return Ok(None);
    };
    match find_event_id(conn, first.event_id)? {
        None => Ok(None),
        Some((stored_in, _, _)) if stored_in != stream => {
            Err(id_in_other_stream(first.event_id, &stored_in, stream))
        }
        Some(_) => retry_result(conn, stream, events).map(Some),
    }
}

/// Why inserting `id` broke a uniqueness rule, if it is the event id's.
fn explain_duplicate_id(
    conn: &Connection,
    stream: &str,
    version_before: u64,
    id: Uuid,
) -> Option<StoreError> {
    let (stored_in, stored_version, _) = find_event_id(conn, id).ok()??;
    if stored_in == stream && stored_version > version_before {
        // Written earlier in this same append.
        Some(id_twice_in_append(id, stream))
    } else {
        Some(id_already_stored(id, &stored_in, stream))
    }
}

/// The outcome of the original append that a retry repeats: the last of the
/// stored events (in this stream) that carry the batch's ids.
fn retry_result(
    conn: &Connection,
    stream: &str,
    events: &[EventData],
) -> Result<AppendResult, StoreError> {
    let mut result = AppendResult {
        version: 0,
        position: 0,
    };
    for event in events {
        if let Some((stored_in, version, position)) = find_event_id(conn, event.event_id)?
            && stored_in == stream
            && version > result.version
        {
            result = AppendResult { version, position };
        }
    }
    Ok(result)
}

/// Where the event with `id` is stored: (stream, version, position).
fn find_event_id(conn: &Connection, id: Uuid) -> Result<Option<(String, u64, u64)>, StoreError> {
    let found = conn
        .prepare_cached("SELECT stream, version, position FROM events WHERE event_id = ?1")
        .map_err(sql_error)?
        .query_row([id.as_bytes()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()
        .map_err(sql_error)?;
    match found {
        Some((stream, version, position)) => Ok(Some((
            stream,
            from_sql_int(version, "version")?,
            from_sql_int(position, "position")?,
        ))),
        None => Ok(None),
    }
}

/// The stream's version and the position of its last event ((0, 0) if the
/// stream does not exist); one index probe on (stream, version).
fn stream_head(conn: &Connection, stream: &str) -> Result<(u64, u64), StoreError> {
    let head = conn
        .prepare_cached(
            "SELECT version, position FROM events WHERE stream = ?1 ORDER BY version DESC LIMIT 1",
        )
        .map_err(sql_error)?
        .query_row([stream], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .optional()
        .map_err(sql_error)?;
    match head {
        Some((version, position)) => Ok((
            from_sql_int(version, "version")?,
            from_sql_int(position, "position")?,
        )),
        None => Ok((0, 0)),
    }
}

// ---------------------------------------------------------------------------
// Conversions

fn collect_events(mut rows: rusqlite::Rows<'_>) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut events = Vec::new();
    while let Some(row) = rows.next().map_err(sql_error)? {
        events.push(event_from_row(row)?);
    }
    Ok(events)
}

/// Decodes a row selected with `select_events!`.
fn event_from_row(row: &Row<'_>) -> Result<RecordedEvent, StoreError> {
    let id_bytes = row.get_ref(3).map_err(sql_error)?;
    let id_bytes = id_bytes.as_blob().map_err(|e| corrupt("event_id", e))?;
    let event_id = Uuid::from_slice(id_bytes).map_err(|e| corrupt("event_id", e))?;
    Ok(RecordedEvent {
        stream: row.get(0).map_err(sql_error)?,
        version: from_sql_int(row.get(1).map_err(sql_error)?, "version")?,
        position: from_sql_int(row.get(2).map_err(sql_error)?, "position")?,
        event_id,
        event_type: row.get(4).map_err(sql_error)?,
        data: row.get(5).map_err(sql_error)?,
        metadata: row.get(6).map_err(sql_error)?,
        message_id: row.get(7).map_err(sql_error)?,
    })
}

fn corrupt(column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("unreadable {column}: {e}"))
}

fn from_sql_int(value: i64, column: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(column, format!("negative value {value}")))
}

/// SQLite integers are signed; anything beyond is "past every event".
fn to_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Maps a SQLite error: unreadable data is `Corrupt`, anything else (I/O,
/// disk full, locked by a `sqlite3` shell, ...) is `Unavailable` with
/// SQLite's message.
fn sql_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match &e {
        E::FromSqlConversionFailure(..)
        | E::InvalidColumnType(..)
        | E::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
        _ => match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Unavailable(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{event, new_stream};

    type Reply = oneshot::Receiver<Result<AppendResult, StoreError>>;

    fn request(stream: &str, events: Vec<EventData>) -> (AppendRequest, Reply) {
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            stream: stream.to_owned(),
            expected: ExpectedVersion::Any,
            events,
            reply,
        };
        (request, answer)
    }

    fn stored_count(conn: &Connection, stream: &str) -> i64 {
        conn.query_row(
            "SELECT count(*) FROM events WHERE stream = ?1",
            [stream],
            |r| r.get(0),
        )
        .expect("count")
    }

    /// A full disk (simulated with `max_page_count`) fails the appends it
    /// hits with `Unavailable`, never half-writes one, and the writer carries
    /// on once there is room again.
    #[test]
    fn a_full_disk_fails_appends_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = open_blocking(dir.path()).expect("open");
        let conn = &opened.writer;
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("page_count");
        conn.execute_batch(&format!("PRAGMA max_page_count = {}", pages + 30))
            .expect("limit");

        let mut big = event(2);
        big.data = vec![b'x'; 1024 * 1024];
        let streams = [new_stream("full"), new_stream("full"), new_stream("full")];
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for (stream, events) in
            streams
                .iter()
                .zip([vec![event(1)], vec![event(3), big], vec![event(4)]])
        {
            let (request, answer) = request(stream, events);
            batch.push(request);
            answers.push(answer);
        }
        commit_batch(conn, &mut batch);
        assert!(batch.is_empty(), "every request was answered");

        for (stream, mut answer) in streams.iter().zip(answers) {
            match answer.try_recv().expect("answered") {
                Ok(result) => {
                    assert_eq!(result.version, 1);
                    assert_eq!(stored_count(conn, stream), 1);
                }
                Err(StoreError::Unavailable(message)) => {
                    assert!(message.contains("full"), "{message}");
                    assert_eq!(stored_count(conn, stream), 0, "nothing half-written");
                }
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        assert_eq!(stored_count(conn, &streams[1]), 0, "the big append failed");
        assert!(conn.is_autocommit(), "no transaction left open");

        conn.execute_batch("PRAGMA max_page_count = 1073741823")
            .expect("room again");
        let (request, mut answer) = request(&streams[1], vec![event(5)]);
        let mut batch = vec![request];
        commit_batch(conn, &mut batch);
        assert_eq!(
            answer
                .try_recv()
                .expect("answered")
                .expect("append")
                .version,
            1
        );
    }
}
