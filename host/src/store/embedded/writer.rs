//! The embedded store's writer thread: the only read-write connection to
//! the log, committing groups of appends (and snapshots) in one
//! transaction each. An append writes its events at the log's end and
//! nothing else; versions and ids are checked against the unindexed tail
//! and the index database ([`Index`]), not by SQLite.
//! A committed group goes to the syncer ([`super::syncer`]), which answers
//! its callers once it is durable; meanwhile the writer commits the next.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::MAX_BATCH;
use super::index::{self, INDEX_FILE};
use super::indexer::IndexerControl;
use super::rows::{describe, from_sql_int, sql_error, to_sql_int};
use super::syncer::{Answer, Committed, Syncer};
use super::tail::{self, Located, Pending, Tail, TailEvent};
use crate::store::memory::{id_already_stored, id_in_other_stream, id_twice_in_append};
use crate::store::{AppendResult, EventData, ExpectedVersion, Snapshot, StoreError};

pub(super) enum Command {
    Append(AppendRequest),
    /// Store a snapshot, after the appends of the same wake-up.
    Snapshot(SnapshotRequest),
    /// Stop after the appends queued before this one.
    Close,
}

pub(super) struct SnapshotRequest {
    pub(super) snapshot: Snapshot,
    pub(super) reply: oneshot::Sender<Result<(), StoreError>>,
}

pub(super) struct AppendRequest {
    pub(super) stream: String,
    pub(super) expected: ExpectedVersion,
    pub(super) events: Vec<EventData>,
    pub(super) reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

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

/// What the writer thread works with besides its connection.
pub(super) struct WriterParts {
    /// The directory's lock, released when the writer has closed the
    /// database.
    pub(super) lock: File,
    /// The data directory, for messages.
    pub(super) dir: PathBuf,
    /// Committed groups, to the syncer thread.
    pub(super) to_syncer: SyncSender<Committed>,
    /// The syncer thread, joined before the database is closed.
    pub(super) syncer_thread: JoinHandle<()>,
    /// What makes groups durable, shared with the syncer thread.
    pub(super) syncer: Arc<Syncer>,
    /// Where the writer finds what the indexer has not written yet.
    pub(super) index: Index,
    /// The indexer thread, stopped and joined after the syncer.
    pub(super) indexer_thread: JoinHandle<()>,
    /// How the indexer is told to stop, and why it cannot write.
    pub(super) indexer: Arc<IndexerControl>,
}

/// How the writer finds where events are: the group it is committing, the
/// unindexed tail, and the index database, in that order.
pub(super) struct Index {
    /// A read-only connection to the index database.
    pub(super) conn: Connection,
    /// The events committed but not indexed yet, shared with the indexer
    /// and the readers.
    pub(super) tail: Arc<Mutex<Tail>>,
    /// The current group's events, until it commits.
    pub(super) pending: Pending,
    /// The most events the tail may hold before the writer waits.
    pub(super) tail_limit: usize,
    /// The heads of the streams committed since the store opened, up to
    /// [`HEAD_CACHE_STREAMS`] of them (see [`Heads`]).
    pub(super) heads: Heads,
}

/// Streams whose heads the writer keeps; past it the cache starts again
/// empty. About 100 bytes per stream.
pub(super) const HEAD_CACHE_STREAMS: usize = 65_536;

/// The version and last position of the streams the writer committed to.
/// The writer is the store's only appender, so a head it committed stays
/// true until it commits to the stream again, whatever the indexer does:
/// an append to a stream it wrote to before is checked without a look-up
/// in the index database (a B-tree search there cost about a quarter of
/// the writer's instructions per append). Only committed groups enter it;
/// a group rolled back leaves it as it was.
#[derive(Default)]
pub(super) struct Heads(HashMap<Arc<str>, (u64, u64)>);

impl Heads {
    fn get(&self, stream: &str) -> Option<(u64, u64)> {
        self.0.get(stream).copied()
    }

    /// Records the heads of a group that committed.
    fn committed(&mut self, heads: HashMap<Arc<str>, (u64, u64)>) {
        if self.0.len() + heads.len() > HEAD_CACHE_STREAMS {
            // Bounded memory with no bookkeeping per hit: the hot streams
            // come back with their next append.
            self.0.clear();
        }
        self.0.extend(heads);
    }
}

impl Index {
    fn tail(&self) -> MutexGuard<'_, Tail> {
        tail::lock(&self.tail)
    }

    /// The stream's version and the position of its last event ((0, 0) if
    /// it has none), committed or in the current group: the writer orders
    /// every commit, durable or not.
    fn head(&self, stream: &str) -> Result<(u64, u64), StoreError> {
        if let Some(head) = self.pending.head(stream) {
            return Ok(head);
        }
        if let Some(head) = self.heads.get(stream) {
            return Ok(head);
        }
        if let Some(head) = self.tail().head(stream, u64::MAX) {
            return Ok(head);
        }
        // Not in the tail: either all indexed, or the indexer took it out
        // of the tail after its commit, which this read then sees.
        Ok(index::head(&self.conn, stream, u64::MAX)?.unwrap_or((0, 0)))
    }

    /// Where the event with `id` is stored, if it is.
    fn locate(&self, log: &Connection, id: &Uuid) -> Result<Option<Located>, StoreError> {
        if let Some(found) = self.pending.locate(id) {
            return Ok(Some(found.clone()));
        }
        if let Some(found) = self.tail().locate(id) {
            return Ok(Some(found.clone()));
        }
        index::locate(&self.conn, log, id, u64::MAX)
    }
}

pub(super) fn writer_main(
    conn: Connection,
    mut queue: mpsc::Receiver<Command>,
    parts: WriterParts,
) {
    let WriterParts {
        lock,
        dir,
        to_syncer,
        syncer_thread,
        syncer,
        mut index,
        indexer_thread,
        indexer,
    } = parts;
    let _reporter = PanicReporter(&dir);
    let mut batch: Vec<AppendRequest> = Vec::with_capacity(MAX_BATCH);
    let mut snapshots: Vec<SnapshotRequest> = Vec::new();
    // `None` from the queue: every sender is gone (the store was dropped);
    // the queue hands out what was already in it first.
    while let Some(command) = queue.blocking_recv() {
        let mut next = Some(command);
        let mut closing = false;
        while let Some(command) = next.take() {
            match command {
                Command::Append(request) => batch.push(request),
                Command::Snapshot(request) => snapshots.push(request),
                Command::Close => closing = true,
            }
            if !closing && batch.len() + snapshots.len() < MAX_BATCH {
                next = queue.try_recv().ok();
            }
        }
        if syncer.broken() {
            fail_all(&mut batch, syncer.broken_message());
            for request in snapshots.drain(..) {
                let _ = request
                    .reply
                    .send(Err(StoreError::Unavailable(syncer.broken_message())));
            }
        }
        if !batch.is_empty()
            && let Err(message) = wait_for_indexer(&index, &indexer)
        {
            fail_all(&mut batch, message);
        }
        if !batch.is_empty()
            && let Some(committed) = commit_batch(&conn, &mut index, &mut batch)
        {
            if syncer.sync_inline(committed.began.elapsed(), queue.is_empty()) {
                syncer.make_durable(vec![committed]);
            } else {
                syncer.handed_over();
                if let Err(unsent) = to_syncer.send(committed) {
                    // The syncer thread is gone (it panicked): make the
                    // group durable here.
                    syncer.make_durable(vec![unsent.0]);
                }
            }
        }
        if !snapshots.is_empty() {
            commit_snapshots(&conn, &mut snapshots);
        }
        if closing {
            break;
        }
    }
    // Anything still queued is dropped unanswered, which its caller sees as
    // `Unavailable`.
    drop(queue);
    // The syncer answers what it holds, then stops.
    drop(to_syncer);
    if syncer_thread.join().is_err() {
        tracing::error!(path = %dir.display(), "the event store's syncer thread panicked");
    }
    // Everything durable is indexed before the files close, so that the
    // next open has nothing to catch up.
    indexer.close();
    if indexer_thread.join().is_err() {
        tracing::error!(path = %dir.display(), "the event store's indexer thread panicked");
    }
    drop(index);

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

/// Waits while the unindexed tail is full ([`Index::tail_limit`]): the
/// indexer is behind. An error if it is behind because it cannot write.
fn wait_for_indexer(index: &Index, indexer: &IndexerControl) -> Result<(), String> {
    loop {
        let waiting = index.tail().len();
        if waiting < index.tail_limit {
            return Ok(());
        }
        if let Some(error) = indexer.error() {
            return Err(format!(
                "the event index ({INDEX_FILE}) cannot be written ({error}), and {waiting} \
                 events wait for it: nothing was appended; free disk space in the data \
                 directory, then restart the host"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Answers every request of `batch` (emptying it) with `Unavailable`:
/// nothing of it was committed.
fn fail_all(batch: &mut Vec<AppendRequest>, message: String) {
    if batch.is_empty() {
        return;
    }
    tracing::warn!(error = %message, appends = batch.len(), "event store batch failed");
    for request in batch.drain(..) {
        let _ = request
            .reply
            .send(Err(StoreError::Unavailable(message.clone())));
    }
}

/// Commits `batch` (emptying it) in one transaction. The group committed,
/// with each append's outcome, for the syncer to answer once it is
/// durable; `None` if nothing was committed (every request is answered
/// `Unavailable` then). The group's events join the unindexed tail once
/// committed.
fn commit_batch(
    conn: &Connection,
    index: &mut Index,
    batch: &mut Vec<AppendRequest>,
) -> Option<Committed> {
    let began = std::time::Instant::now();
    index.pending.clear();
    if let Err(e) = run(conn, "BEGIN IMMEDIATE") {
        let _ = run(conn, "ROLLBACK");
        fail_all(
            batch,
            format!("cannot start a write transaction: {}", describe(&e)),
        );
        return None;
    }
    let mut results = Vec::with_capacity(batch.len());
    for request in batch.iter_mut() {
        let events = std::mem::take(&mut request.events);
        results.push(append_in_savepoint(
            conn,
            index,
            &request.stream,
            request.expected,
            &events,
        ));
        // SQLite rolls back the whole transaction on some errors (disk full,
        // I/O error). Carrying on would run later appends outside it, each
        // committing on its own, so the batch stops here.
        if conn.is_autocommit() {
            index.pending.clear();
            let message = results
                .pop()
                .and_then(Result::err)
                .map(|e| match e {
                    StoreError::Unavailable(m) | StoreError::Corrupt(m) => m,
                    other => other.to_string(),
                })
                .unwrap_or_else(|| "the transaction was rolled back".into());
            fail_all(batch, format!("write failed, nothing committed: {message}"));
            return None;
        }
    }
    if let Err(e) = run(conn, "COMMIT") {
        let _ = run(conn, "ROLLBACK");
        index.pending.clear();
        fail_all(batch, format!("commit failed: {}", describe(&e)));
        return None;
    }
    let heads = index.pending.take_heads();
    index.heads.committed(heads);
    let committed = index.pending.take();
    index.tail().extend(committed);
    let last_position = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|a| a.position))
        .max()
        .unwrap_or(0);
    let answers: Vec<Answer> = batch
        .drain(..)
        .map(|request| request.reply)
        .zip(results)
        .collect();
    Some(Committed {
        answers,
        last_position,
        began,
    })
}

/// Stores `snapshots` (emptying it) in one transaction of their own, after
/// the appends': a snapshot that fails (a full disk) must never undo an
/// append. They are answered at once, not after a sync: a snapshot lost in
/// a crash costs a replay, not data, and the next sync makes it durable
/// anyway, since it syncs the whole log file.
fn commit_snapshots(conn: &Connection, snapshots: &mut Vec<SnapshotRequest>) {
    let began = std::time::Instant::now();
    let written = (|| -> Result<Vec<Result<(), StoreError>>, StoreError> {
        run(conn, "BEGIN IMMEDIATE").map_err(sql_error)?;
        let mut results = Vec::with_capacity(snapshots.len());
        for request in snapshots.iter() {
            results.push(upsert_snapshot(conn, &request.snapshot));
            if conn.is_autocommit() {
                return Err(results.pop().and_then(Result::err).unwrap_or_else(|| {
                    StoreError::Unavailable("the transaction was rolled back".into())
                }));
            }
        }
        run(conn, "COMMIT").map_err(sql_error)?;
        Ok(results)
    })();
    if !conn.is_autocommit() {
        let _ = run(conn, "ROLLBACK");
    }
    match written {
        Ok(results) => {
            tracing::debug!(
                snapshots = snapshots.len(),
                duration_us = began.elapsed().as_micros() as u64,
                "snapshots stored"
            );
            for (request, result) in snapshots.drain(..).zip(results) {
                let _ = request.reply.send(result);
            }
        }
        Err(e) => {
            for request in snapshots.drain(..) {
                let _ = request.reply.send(Err(StoreError::Unavailable(format!(
                    "snapshot not stored: {e}"
                ))));
            }
        }
    }
}

/// Inserts or replaces the stream's snapshot, by the rule of
/// [`crate::store::EventStore::save_snapshot`].
fn upsert_snapshot(conn: &Connection, snapshot: &Snapshot) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO snapshots (stream, state_schema, version, event_id, state)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (stream) DO UPDATE SET
             state_schema = excluded.state_schema, version = excluded.version,
             event_id = excluded.event_id, state = excluded.state
         WHERE snapshots.state_schema <> excluded.state_schema OR excluded.version > snapshots.version",
    )
    .map_err(sql_error)?
    .execute(params![
        snapshot.stream,
        snapshot.schema,
        to_sql_int(snapshot.version),
        snapshot.event_id.as_bytes(),
        snapshot.state,
    ])
    .map_err(sql_error)?;
    Ok(())
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
    index: &mut Index,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<AppendResult, StoreError> {
    if events.len() <= 1 {
        return append_one(conn, index, stream, expected, events);
    }
    run(conn, "SAVEPOINT append").map_err(sql_error)?;
    let result = append_one(conn, index, stream, expected, events);
    if result.is_err() {
        // Errors here only matter if the transaction is gone, which the
        // caller checks.
        let _ = run(conn, "ROLLBACK TO append");
    }
    let _ = run(conn, "RELEASE append");
    result
}

/// Checks one append against the stream's head and the ids stored (the
/// same rules, in the same order, as the memory store's), then writes its
/// events at the log's end. Its events join the group's pending ones only
/// once all are written.
fn append_one(
    conn: &Connection,
    index: &mut Index,
    stream: &str,
    expected: ExpectedVersion,
    events: &[EventData],
) -> Result<AppendResult, StoreError> {
    // A retry is recognised before the expectation is checked: the
    // original append already moved the version on.
    if let Some(first) = events.first()
        && let Some(stored) = index.locate(conn, &first.event_id)?
    {
        if &*stored.stream != stream {
            return Err(id_in_other_stream(first.event_id, &stored.stream, stream));
        }
        return retry_result(conn, index, stream, events);
    }
    let (version, last_position) = index.head(stream)?;
    if !expected.matches(version) {
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
    // Every id is checked before anything is written, so a bad append
    // writes nothing.
    for (n, event) in events.iter().enumerate().skip(1) {
        if events[..n].iter().any(|e| e.event_id == event.event_id) {
            return Err(id_twice_in_append(event.event_id, stream));
        }
        if let Some(stored) = index.locate(conn, &event.event_id)? {
            return Err(id_already_stored(event.event_id, &stored.stream, stream));
        }
    }

    let name: Arc<str> = Arc::from(stream);
    let mut stored = Vec::with_capacity(events.len());
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO events (stream, version, event_id, event_type, data, metadata, message_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(sql_error)?;
    for event in events {
        result.version = result.version.checked_add(1).ok_or_else(|| {
            StoreError::Corrupt(format!("stream {stream:?} is at the largest version"))
        })?;
        insert
            .execute(params![
                stream,
                to_sql_int(result.version),
                event.event_id.as_bytes(),
                event.event_type,
                event.data,
                event.metadata,
                event.message_id,
            ])
            .map_err(sql_error)?;
        // The rowid SQLite chose: one more than the largest, so positions
        // grow in commit order with a single writer.
        result.position = from_sql_int(conn.last_insert_rowid(), "position")?;
        stored.push(TailEvent {
            position: result.position,
            stream: name.clone(),
            version: result.version,
            event_id: event.event_id,
        });
    }
    index.pending.add(stored);
    Ok(result)
}

/// The outcome of the original append that a retry repeats: the last of the
/// stored events (in this stream) that carry the batch's ids.
fn retry_result(
    conn: &Connection,
    index: &Index,
    stream: &str,
    events: &[EventData],
) -> Result<AppendResult, StoreError> {
    let mut result = AppendResult {
        version: 0,
        position: 0,
    };
    for event in events {
        if let Some(stored) = index.locate(conn, &event.event_id)?
            && &*stored.stream == stream
            && stored.version > result.version
        {
            result = AppendResult {
                version: stored.version,
                position: stored.position,
            };
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::super::open::open_blocking;
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

    /// Answers a committed group as the syncer does after its sync.
    fn deliver(committed: Option<Committed>) {
        for (reply, result) in committed.map(|c| c.answers).unwrap_or_default() {
            let _ = reply.send(result);
        }
    }

    fn stored_count(conn: &Connection, stream: &str) -> i64 {
        conn.query_row(
            "SELECT count(*) FROM events WHERE stream = ?1",
            [stream],
            |r| r.get(0),
        )
        .expect("count")
    }

    /// The writer's cache of stream heads holds what committed groups left,
    /// never more than its bound of streams: a group that would overflow it
    /// starts it again from that group.
    #[test]
    fn the_head_cache_is_bounded() {
        let group = |from: usize, n: usize| {
            (from..from + n)
                .map(|i| (Arc::<str>::from(format!("s-{i}")), (1, i as u64 + 1)))
                .collect::<HashMap<_, _>>()
        };
        let mut heads = Heads::default();
        heads.committed(group(0, HEAD_CACHE_STREAMS));
        assert_eq!(heads.get("s-0"), Some((1, 1)));
        heads.committed(group(HEAD_CACHE_STREAMS, 2));
        assert_eq!(heads.get("s-0"), None, "a full cache starts again");
        let newest = format!("s-{}", HEAD_CACHE_STREAMS + 1);
        assert_eq!(heads.get(&newest), Some((1, HEAD_CACHE_STREAMS as u64 + 2)));
        assert_eq!(heads.0.len(), 2);
    }

    /// A full disk (simulated with `max_page_count`) fails the appends it
    /// hits with `Unavailable`, never half-writes one, and the writer carries
    /// on once there is room again.
    #[test]
    fn a_full_disk_fails_appends_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = open_blocking(dir.path()).expect("open");
        let conn = &opened.writer;
        let mut index = Index {
            conn: {
                index::open_index(dir.path(), &opened.store_id, conn, opened.head).expect("index");
                index::open_reader(dir.path()).expect("index reader")
            },
            tail: Arc::new(Mutex::new(Tail::new(opened.head))),
            pending: Pending::default(),
            tail_limit: usize::MAX,
            heads: Heads::default(),
        };
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
        deliver(commit_batch(conn, &mut index, &mut batch));
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
        deliver(commit_batch(conn, &mut index, &mut batch));
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
