//! The embedded store's syncer thread: makes committed groups of appends
//! durable, and only then answers their callers.
//!
//! The writer commits with `synchronous=NORMAL`: a commit writes the group's
//! pages to the WAL file without waiting for the disk. It hands the group
//! here and goes on to collect and commit the next one while this thread
//! `fdatasync`s the WAL. A sync covers every byte written before it began,
//! so one sync makes durable every group committed before it; groups
//! committed while it runs wait for the next one. Only after the sync is
//! the durable position raised (reads show nothing beyond it), are the
//! callers answered, and are live subscriptions woken. The writer syncs
//! and answers a group itself when nothing else is waiting (there is
//! nothing to overlap then, and the hand-over costs a thread wake-up per
//! append) and when the last sync took no longer than the group's commit:
//! overlap pays only when the disk is the slow part ([`Syncer::sync_inline`]).
//!
//! SQLite's own checkpoints stay safe under `NORMAL` in WAL mode: it syncs
//! the WAL before copying it into the database file and the database file
//! after, and it reuses the WAL only once everything in it is in the
//! database file.
//!
//! A failed sync is final. After `fsync` fails, Linux may have dropped the
//! dirty pages it could not write, and a later sync that succeeds says
//! nothing about them; so the groups waiting are answered `Unavailable`
//! (their outcome is unknown), and the store takes no more appends until
//! the host is restarted.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::store::{AppendResult, StoreError};

/// The reply channel of one append and the answer it gets once its group
/// is durable.
pub(super) type Answer = (
    oneshot::Sender<Result<AppendResult, StoreError>>,
    Result<AppendResult, StoreError>,
);

/// A group the writer committed, waiting to be made durable.
pub(super) struct Committed {
    /// Every append of the group, with its outcome.
    pub(super) answers: Vec<Answer>,
    /// The highest position the group stored (0 if it stored none).
    pub(super) last_position: u64,
    /// When the writer began the group, for the commit-latency metric.
    pub(super) began: Instant,
}

/// What makes the committed log durable: an `fdatasync` of the WAL file
/// ([`WalFile`]), or a stand-in that tests control.
pub(super) trait Durability: Send {
    /// Makes every byte committed so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// The WAL file of the store's database, synced through a handle of our
/// own.
pub(super) struct WalFile {
    path: PathBuf,
    dir: PathBuf,
    file: Option<File>,
}

impl WalFile {
    /// The WAL of the database `db_path` in directory `dir`.
    pub(super) fn new(db_path: &Path, dir: &Path) -> WalFile {
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        WalFile {
            path: PathBuf::from(wal),
            dir: dir.to_path_buf(),
            file: None,
        }
    }
}

impl Durability for WalFile {
    fn sync(&mut self) -> io::Result<()> {
        // One handle for the store's life: SQLite deletes the WAL only when
        // the last connection to the database closes, and the writer's
        // stays open as long as the store. (Checking the path before each
        // sync cost a sixth of the appends/s of one client, measured.)
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => {
                    // The WAL may be new: its directory entry must be
                    // durable too, as SQLite makes it when it syncs itself.
                    File::open(&self.dir)?.sync_all()?;
                    self.file = Some(file);
                }
                // No WAL yet: nothing was committed to one.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        match &self.file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }
}

/// What the syncer shares with the store.
pub(super) struct SyncState {
    /// The highest position known durable: reads show nothing beyond it.
    pub(super) durable: Arc<AtomicU64>,
    /// Set when a sync failed: the store takes no more appends.
    pub(super) broken: AtomicBool,
    /// Bumped after every sync that made a group durable, to wake live
    /// subscriptions.
    pub(super) commits: tokio::sync::watch::Sender<u64>,
    /// The data directory, for messages.
    pub(super) dir: PathBuf,
}

/// Makes committed groups durable and answers them: on the syncer thread
/// while the writer commits more, or on the writer's own thread when
/// nothing else is waiting (a hand-over to another thread then costs more
/// than it overlaps).
pub(super) struct Syncer {
    durability: Mutex<Box<dyn Durability>>,
    state: SyncState,
    /// Groups handed to the syncer thread and not answered yet.
    pending: AtomicUsize,
    /// How long the last sync took, in nanoseconds.
    last_sync_ns: AtomicU64,
}

impl Syncer {
    pub(super) fn new(durability: Box<dyn Durability>, state: SyncState) -> Syncer {
        Syncer {
            durability: Mutex::new(durability),
            state,
            pending: AtomicUsize::new(0),
            last_sync_ns: AtomicU64::new(0),
        }
    }

    /// Whether a group whose commit took `commit` is better synced by the
    /// writer itself than handed over: when nothing else waits (nothing to
    /// overlap), or when a sync takes no longer than a commit. Overlapping
    /// pays only when the disk is the slow part; when it is not, a sync
    /// running beside the writer's next commit made both slower (measured:
    /// through the actors, 1,000 aggregates and 256 clients, 30-33k
    /// commands/s always handing over against 40-42k syncing inline, on a
    /// disk with 0.1 ms syncs).
    pub(super) fn sync_inline(&self, commit: Duration, nothing_queued: bool) -> bool {
        let last_sync = Duration::from_nanos(self.last_sync_ns.load(Ordering::Relaxed));
        (nothing_queued && self.idle()) || last_sync <= commit
    }

    /// Whether the syncer thread has nothing to do.
    pub(super) fn idle(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0
    }

    /// Counts a group handed to the syncer thread.
    pub(super) fn handed_over(&self) {
        self.pending.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a sync has failed.
    pub(super) fn broken(&self) -> bool {
        self.state.broken.load(Ordering::SeqCst)
    }

    /// The message appends get once a sync has failed.
    pub(super) fn broken_message(&self) -> String {
        broken_message(&self.state.dir)
    }

    /// Syncs once, then answers `groups` (all committed before the sync
    /// began) and wakes subscriptions; or, if the sync fails or failed
    /// before, answers them `Unavailable`.
    pub(super) fn make_durable(&self, groups: Vec<Committed>) {
        if self.broken() {
            return self.answer_unavailable(groups);
        }
        let started = Instant::now();
        let synced = self
            .durability
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sync();
        self.last_sync_ns.store(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Err(e) = synced {
            self.fail(&e);
            return self.answer_unavailable(groups);
        }
        if groups.is_empty() {
            return;
        }
        let last = groups.iter().map(|g| g.last_position).max().unwrap_or(0);
        // Raised before the answers, so that a caller who reads after its
        // answer sees its events.
        self.state.durable.fetch_max(last, Ordering::SeqCst);
        for group in groups {
            crate::metrics::global().group_commit(
                "embedded",
                group.answers.len(),
                group.began.elapsed(),
            );
            for (reply, result) in group.answers {
                // The caller may have given up waiting; the append stands.
                let _ = reply.send(result);
            }
        }
        self.state.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn fail(&self, e: &io::Error) {
        if !self.state.broken.swap(true, Ordering::SeqCst) {
            tracing::error!(path = %self.state.dir.display(), error = %e, "syncing the event log failed; the embedded store takes no more appends until restart");
        }
    }

    fn answer_unavailable(&self, groups: Vec<Committed>) {
        let message = self.broken_message();
        for group in groups {
            for (reply, _) in group.answers {
                let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
            }
        }
    }
}

/// The message appends get once a sync has failed.
fn broken_message(dir: &Path) -> String {
    format!(
        "the disk failed to make the event log at {} durable, so the outcome of the appends \
         waiting for it is unknown and the store takes no more appends; check the disk and the \
         system log, then restart the host (it recovers every append that reached the disk)",
        dir.display()
    )
}

/// The syncer thread: runs until the writer drops its end of `groups`,
/// having answered every group it was given.
pub(super) fn syncer_main(groups: Receiver<Committed>, syncer: Arc<Syncer>) {
    while let Ok(first) = groups.recv() {
        let mut waiting = vec![first];
        waiting.extend(groups.try_iter());
        let n = waiting.len();
        syncer.make_durable(waiting);
        syncer.pending.fetch_sub(n, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{SyncSender, sync_channel};
    use std::time::Duration;

    use rusqlite::{Connection, OpenFlags};

    use super::super::{DB_FILE, EmbeddedStore};
    use super::*;
    use crate::store::conformance::{event, new_stream};
    use crate::store::{EventStore, ExpectedVersion};

    /// A sync that waits for the test to say how it ends; with the test's
    /// end of the gate gone, every sync succeeds.
    struct Gated(Receiver<io::Result<()>>);

    impl Durability for Gated {
        fn sync(&mut self) -> io::Result<()> {
            self.0.recv().unwrap_or(Ok(()))
        }
    }

    /// A store whose syncs each wait for the test to send their outcome;
    /// a send returns once a sync has taken it.
    async fn gated_store(dir: &Path) -> (Arc<EmbeddedStore>, SyncSender<io::Result<()>>) {
        let (gate, syncs) = sync_channel(0);
        // The sync at open.
        let opening = std::thread::spawn(move || {
            gate.send(Ok(())).expect("the open waits");
            gate
        });
        let store =
            EmbeddedStore::open_with(dir, move |_, _| Box::new(Gated(syncs)), Default::default())
                .await
                .expect("open");
        let gate = opening.join().expect("the open's sync");
        (Arc::new(store), gate)
    }

    /// Waits until a connection of our own sees `n` events committed.
    async fn until_committed(dir: &Path, n: i64) {
        let db = Connection::open_with_flags(dir.join(DB_FILE), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("a connection of our own");
        for _ in 0..2000 {
            let count: i64 = db
                .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
                .expect("count");
            if count == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the writer never committed {n} events");
    }

    /// An append the writer has committed is neither answered nor shown
    /// to any reader or subscriber until the log is synced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_answered_or_read_before_the_log_is_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, gate) = gated_store(dir.path()).await;
        let mut signal = store.commit_signal().expect("a commit signal");
        let woken = *signal.borrow_and_update();
        let stream = new_stream("sync");
        let append = {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                store
                    .append(&stream, ExpectedVersion::NoStream, vec![event(1)])
                    .await
            })
        };
        until_committed(dir.path(), 1).await;

        assert!(!append.is_finished(), "answered before the sync");
        assert_eq!(store.read_all(1, 10).await.expect("read").len(), 0);
        assert!(
            store
                .read_stream(&stream, 1, 10)
                .await
                .expect("read")
                .is_empty()
        );
        assert_eq!(store.stream_version(&stream).await.expect("version"), 0);
        assert_eq!(store.head_position().await.expect("head"), 0);
        assert_eq!(*signal.borrow(), woken, "a subscriber was woken");

        let gate = tokio::task::spawn_blocking(move || {
            gate.send(Ok(())).expect("the syncer waits");
            gate
        })
        .await
        .expect("joined");
        let appended = append.await.expect("joined").expect("appended");
        assert_eq!(appended.version, 1);
        assert_eq!(store.read_all(1, 10).await.expect("read").len(), 1);
        assert_eq!(store.stream_version(&stream).await.expect("version"), 1);
        assert_eq!(
            store.head_position().await.expect("head"),
            appended.position
        );
        tokio::time::timeout(Duration::from_secs(10), signal.changed())
            .await
            .expect("subscribers are woken")
            .expect("the store is open");
        drop(gate);
        store.close().await;
    }

    /// A sync that fails answers its appends `Unavailable` (their outcome
    /// is unknown) and stops the store taking appends; a restart recovers
    /// what reached the disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_stops_appends_until_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, gate) = gated_store(dir.path()).await;
        let stream = new_stream("eio");
        let append = {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                store
                    .append(&stream, ExpectedVersion::Any, vec![event(1)])
                    .await
            })
        };
        let fail = tokio::task::spawn_blocking(move || {
            gate.send(Err(io::Error::other("injected EIO")))
                .expect("the syncer waits");
            gate
        });
        let failed = append.await.expect("joined").expect_err("the sync failed");
        let gate = fail.await.expect("joined");
        let StoreError::Unavailable(message) = failed else {
            panic!("not Unavailable: {failed}");
        };
        assert!(message.contains("restart the host"), "{message}");
        let refused = store
            .append(&stream, ExpectedVersion::Any, vec![event(2)])
            .await
            .expect_err("no more appends");
        assert!(matches!(refused, StoreError::Unavailable(_)), "{refused}");
        drop(gate);
        store.close().await;

        let reopened = EmbeddedStore::open(dir.path()).await.expect("reopen");
        let stored = reopened.read_stream(&stream, 1, 10).await.expect("read");
        assert_eq!(
            stored.len(),
            1,
            "the committed append, never the refused one"
        );
        reopened.close().await;
    }

    /// A disk that cannot sync at open refuses the store with a message
    /// that says so, and leaves the directory free.
    #[tokio::test]
    async fn a_failed_sync_at_open_is_a_clear_error() {
        struct Failing;
        impl Durability for Failing {
            fn sync(&mut self) -> io::Result<()> {
                Err(io::Error::other("injected EIO"))
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let refused =
            EmbeddedStore::open_with(dir.path(), |_, _| Box::new(Failing), Default::default())
                .await
                .expect_err("refused");
        let text = format!("{refused:#}");
        assert!(
            text.contains("fsync failed") && text.contains("injected EIO"),
            "{text}"
        );
        EmbeddedStore::open(dir.path())
            .await
            .expect("the directory is free")
            .close()
            .await;
    }
}
