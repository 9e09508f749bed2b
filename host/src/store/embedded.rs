//! The embedded, durable event store (`embedded://PATH`): SQLite in WAL mode
//! inside a data directory that one host owns.
//!
//! Layout of the directory:
//! - `events.sqlite3` (+ SQLite's `-wal` and `-shm` files): the log, the
//!   `events` table in position order with no index besides its rowid, and
//!   the snapshots; inspectable with the `sqlite3` tool.
//! - `index.sqlite3` ([`INDEX_FILE`]): where each stream's versions and
//!   each event id are, derived from the log and rebuilt from it whenever
//!   it is missing, behind or does not match it (`index.rs`).
//! - `LOCK`: held with an exclusive OS lock for as long as a host has the
//!   store open, so two hosts never write one directory. It holds the owner's
//!   process id for the error message; the file stays behind after close, and
//!   the OS drops the lock when the process exits, so it never goes stale.
//!
//! Writes: one writer thread owns the only read-write connection to the log
//! and commits *groups* of appends. It takes everything queued (up to
//! [`MAX_BATCH`] appends, from any streams), runs them in one transaction
//! (a conflict or error in one append leaves the others alone) and commits
//! once, without waiting for the disk (`synchronous=NORMAL`). An append
//! writes its events at the log's end and nothing else: what used to limit
//! durable throughput was every append changing a page at a random place
//! of each index, so the indexes are written afterwards, by the indexer
//! thread, in large batches. The writer checks expected versions and event
//! ids against the committed events the indexer has not reached yet (the
//! tail, `tail.rs`, in memory) and then the index database; it never waits
//! for the indexer. The syncer thread then fsyncs the log and only then
//! answers each caller: nobody is told an append succeeded before it is
//! durable, one fsync serves every group committed before it began, and the
//! writer commits the next group while the disk works (see `syncer.rs`).
//!
//! Reads: a small pool of read-only connection pairs (the log and the
//! index) used from `spawn_blocking`. WAL lets them read a committed
//! snapshot while the writer works; a read joins what the index holds with
//! what the tail holds (`read.rs`), and shows only events up to the last
//! durable position, so no reader or subscriber sees an event a crash could
//! still take back.
//!
//! An empty append reports the stream's version and the position of its last
//! event (0 for a missing stream). An event id already stored in another
//! stream is refused as [`StoreError::Corrupt`]: ids are unique across the
//! store, and a retry cannot fix a reused message id.
//!
//! An append that fails with [`StoreError::Unavailable`] has an unknown
//! outcome (the disk may have taken the commit before reporting an error), so
//! callers retry with the same event ids, which the idempotency rule makes
//! safe.

mod index;
#[cfg(test)]
mod index_tests;
mod indexer;
#[cfg(test)]
mod migration_tests;
mod open;
mod read;
mod rows;
mod schema;
mod syncer;
mod tail;
#[cfg(test)]
mod torn_tail_tests;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{
    AppendResult, EventData, EventStore, EventToApply, ExpectedVersion, RecordedEvent, Snapshot,
    StoreError,
};
pub use index::INDEX_FILE;
use index::open_index;
use indexer::{IndexerControl, Indexing, indexer_main};
use open::{Opened, open_blocking};
use read::{Reader, View};
use syncer::{Durability, SyncState, Syncer, WalFile, syncer_main};
use tail::Tail;
use writer::{AppendRequest, Command, Index, SnapshotRequest, WriterParts, writer_main};

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
/// - 3: a `snapshots` table ([`EventStore::save_snapshot`]).
/// - 4: the log only: `events` has no index and no uniqueness rule, and
///   the indexes live in [`INDEX_FILE`], written off the commit path. A
///   store of version 3 or older is rewritten when it is opened.
pub const SCHEMA_VERSION: u32 = 4;
/// The most appends committed in one transaction. Bounds the latency a large
/// group adds and the memory it holds; beyond it, the next group follows.
pub const MAX_BATCH: usize = 512;

/// Committed groups waiting for the syncer, at most; beyond it the writer
/// waits for a sync before it commits more.
const SYNC_QUEUE: usize = 64;
/// Appends waiting for the writer, at most; a full queue makes callers wait
/// (back-pressure) instead of growing memory.
const QUEUE_CAPACITY: usize = 4096;
/// WAL pages after which a commit checkpoints the log into the database
/// (about 4 MB, SQLite's default; see `open.rs`).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 1_000;
/// Read-only connections in the pool.
const READERS: usize = 4;
/// How long a statement waits for a lock held by someone else (only a
/// `sqlite3` shell poking at the file can hold one) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
    readers: Vec<Mutex<Option<Reader>>>,
    /// The events committed but not indexed yet.
    tail: Arc<Mutex<Tail>>,
    /// Round-robin start for picking a reader.
    next_reader: AtomicUsize,
    /// Bumped by the syncer after every sync that made appends durable.
    commits: tokio::sync::watch::Sender<u64>,
    /// The highest position known durable. Reads show nothing beyond it:
    /// events committed but not yet synced could still vanish in a crash.
    durable: Arc<AtomicU64>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in directory `path`.
    ///
    /// Fails with a message that says what to do when `path` is a file, the
    /// directory cannot be written, another rehydra process holds it, the
    /// database was written by a newer rehydra, or the file is not a rehydra
    /// database.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_with(
            path,
            |db_path, dir| Box::new(WalFile::new(db_path, dir)),
            Indexing::default(),
        )
        .await
    }

    /// [`open`](Self::open), with an indexer that writes every event as soon
    /// as it is durable: reads then go through the index database, where
    /// the default reads most recent events from the tail.
    #[cfg(test)]
    pub(crate) async fn open_eagerly_indexed(path: &Path) -> anyhow::Result<Self> {
        Self::open_with(
            path,
            |db_path, dir| Box::new(WalFile::new(db_path, dir)),
            Indexing::eager(),
        )
        .await
    }

    /// [`open`](Self::open), with what makes the log durable made by
    /// `durability` (from the database file and the directory): the WAL
    /// file's `fdatasync`, or a stand-in in tests.
    async fn open_with(
        path: &Path,
        durability: impl FnOnce(&Path, &Path) -> Box<dyn Durability> + Send + 'static,
        indexing: Indexing,
    ) -> anyhow::Result<Self> {
        let dir = path.to_path_buf();
        let (opened, durability, index_writer, readers, index_reader) =
            tokio::task::spawn_blocking(move || {
                let opened = open_blocking(&dir)?;
                // Whatever an earlier run left in the WAL (committed, maybe
                // never synced before it stopped) is durable before anything
                // is read or indexed.
                let mut durability = durability(&opened.db_path, &opened.dir);
                durability.sync().with_context(|| {
                    format!(
                        "cannot make the event log in {} durable (fsync failed): check the disk \
                         and the system log",
                        opened.dir.display()
                    )
                })?;
                let index_writer =
                    open_index(&opened.dir, &opened.store_id, &opened.writer, opened.head)?;
                let readers = opened
                    .readers
                    .iter()
                    .map(|_| index::open_reader(&opened.dir))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let index_reader = index::open_reader(&opened.dir)?;
                anyhow::Ok((opened, durability, index_writer, readers, index_reader))
            })
            .await
            .context("opening the embedded store was interrupted")??;
        let Opened {
            dir,
            db_path: _,
            head,
            store_id: _,
            lock,
            writer,
            readers: log_readers,
        } = opened;
        let readers: Vec<Reader> = log_readers
            .into_iter()
            .zip(readers)
            .map(|(log, index)| Reader { log, index })
            .collect();

        let commits = tokio::sync::watch::Sender::new(0u64);
        let durable = Arc::new(AtomicU64::new(head));
        // Open indexed everything up to the head.
        let tail = Arc::new(Mutex::new(Tail::new(head)));
        let indexer = Arc::new(IndexerControl::default());
        let indexer_thread = {
            let (tail, durable, indexer) = (tail.clone(), durable.clone(), indexer.clone());
            std::thread::Builder::new()
                .name("rehydra-store-indexer".into())
                .spawn(move || indexer_main(index_writer, tail, durable, indexer, indexing))
                .context("cannot start the event store's indexer thread")?
        };
        let (to_syncer, groups) = std::sync::mpsc::sync_channel(SYNC_QUEUE);
        let sync_state = SyncState {
            durable: durable.clone(),
            broken: AtomicBool::new(false),
            commits: commits.clone(),
            dir: dir.clone(),
        };
        let syncer = Arc::new(Syncer::new(durability, sync_state));
        let thread_syncer = syncer.clone();
        let syncer_thread = std::thread::Builder::new()
            .name("rehydra-store-syncer".into())
            .spawn(move || syncer_main(groups, thread_syncer))
            .context("cannot start the event store's syncer thread")?;

        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let parts = WriterParts {
            lock,
            dir: dir.clone(),
            to_syncer,
            syncer_thread,
            syncer,
            index: Index {
                conn: index_reader,
                tail: tail.clone(),
                pending: Default::default(),
                tail_limit: indexing.tail_limit,
                heads: Default::default(),
            },
            indexer_thread,
            indexer,
        };
        let thread = std::thread::Builder::new()
            .name("rehydra-store-writer".into())
            .spawn(move || writer_main(writer, rx, parts))
            .context("cannot start the event store's writer thread")?;

        tracing::info!(path = %dir.display(), "embedded event store open");
        Ok(Self {
            shared: Arc::new(Shared {
                dir,
                closed: AtomicBool::new(false),
                readers: readers.into_iter().map(|c| Mutex::new(Some(c))).collect(),
                tail,
                next_reader: AtomicUsize::new(0),
                commits,
                durable,
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

    /// Hands the writer the request `make` builds around the reply channel,
    /// and waits for its answer. `what` names the request in the error.
    async fn ask_writer<T>(
        &self,
        what: &str,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        let (reply, answer) = oneshot::channel();
        // Either failure means the writer has stopped (closed, or crashed);
        // a request it dropped unanswered was not committed.
        self.writer
            .send(make(reply))
            .await
            .map_err(|_| writer_gone(&self.shared.dir, what))?;
        answer
            .await
            .map_err(|_| writer_gone(&self.shared.dir, what))?
    }

    /// Runs `f` on a blocking thread with a view of the store: a reader's
    /// connections, the tail, and the durable position.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&View<'_>) -> Result<T, StoreError> + Send + 'static,
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
            // Read after the connection is ours: the durable position only
            // grows, so a later one only shows more.
            let durable = shared.durable.load(Ordering::SeqCst);
            match guard.as_ref() {
                Some(reader) => f(&View {
                    reader,
                    tail: &shared.tail,
                    durable,
                }),
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
        self.ask_writer("append", |reply| {
            Command::Append(AppendRequest {
                stream: stream.to_owned(),
                expected,
                events,
                reply,
            })
        })
        .await
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
        self.read(move |view| view.read_stream(&stream, from_version, limit))
            .await
    }

    async fn read_stream_to_apply(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventToApply>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stream = stream.to_owned();
        self.read(move |view| view.read_stream_to_apply(&stream, from_version, limit))
            .await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        let stream = stream.to_owned();
        self.read(move |view| Ok(view.head(&stream)?.0)).await
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(move |view| view.read_all(from_position, limit))
            .await
    }

    async fn find_command_events(
        &self,
        stream: &str,
        first_event_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream = stream.to_owned();
        self.read(move |view| view.command_events(&stream, first_event_id))
            .await
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        self.read(|view| view.head_position()).await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.ask_writer("snapshot", |reply| {
            Command::Snapshot(SnapshotRequest {
                snapshot: snapshot.clone(),
                reply,
            })
        })
        .await
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        let stream = stream.to_owned();
        self.read(move |view| view.snapshot(stream)).await
    }

    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.shared.commits.subscribe())
    }

    fn describe(&self) -> String {
        format!("embedded SQLite store at {}", self.shared.dir.display())
    }

    async fn close(&self) {
        EmbeddedStore::close(self).await;
    }
}

/// `what` (an append, a snapshot) did not reach the writer, or the writer
/// dropped it unanswered.
fn writer_gone(dir: &Path, what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the embedded store at {} is closed or its writer has stopped; the {what} was not \
         committed",
        dir.display()
    ))
}
