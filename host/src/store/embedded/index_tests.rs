//! The index database and the tail together: reads that cross the
//! checkpoint, an index that is lost, behind, ahead of its log or from
//! another log, and an index that cannot be written.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::indexer::Indexing;
use super::syncer::WalFile;
use super::{DB_FILE, EmbeddedStore, INDEX_FILE};
use crate::store::conformance::{event, new_stream};
use crate::store::{EventData, EventStore, ExpectedVersion, StoreError};

async fn open(dir: &Path, indexing: Indexing) -> EmbeddedStore {
    EmbeddedStore::open_with(
        dir,
        |db_path, dir| Box::new(WalFile::new(db_path, dir)),
        indexing,
    )
    .await
    .expect("open")
}

/// An indexer that writes once `n` events wait, and never because the
/// store is quiet.
fn every(n: usize) -> Indexing {
    Indexing {
        min_batch: n,
        idle: Duration::from_secs(3600),
        ..Indexing::default()
    }
}

/// Waits until the index holds every position up to `position`.
async fn until_indexed(store: &EmbeddedStore, position: u64) {
    for _ in 0..2000 {
        if store.shared.tail.lock().expect("tail").indexed() >= position {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the indexer never reached position {position}");
}

fn tail_len(store: &EmbeddedStore) -> usize {
    store.shared.tail.lock().expect("tail").len()
}

/// Appends `n` one-event appends to `stream`; returns the events.
async fn append_each(store: &EmbeddedStore, stream: &str, n: usize) -> Vec<EventData> {
    let mut appended = Vec::new();
    for _ in 0..n {
        let e = event(u32::try_from(appended.len()).unwrap_or(u32::MAX));
        store
            .append(stream, ExpectedVersion::Any, vec![e.clone()])
            .await
            .expect("append");
        appended.push(e);
    }
    appended
}

fn versions(events: &[crate::store::RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version).collect()
}

/// With ten events indexed and five in the tail, every read sees the
/// fifteen as one stream, and the rules that need the indexed ones
/// (retries, ids, versions) still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_checks_join_the_index_and_the_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), every(10)).await;
    let stream = new_stream("joined");
    let mut appended = append_each(&store, &stream, 10).await;
    until_indexed(&store, 10).await;
    appended.extend(append_each(&store, &stream, 5).await);
    assert_eq!(tail_len(&store), 5, "five wait for the indexer");

    let all = store.read_stream(&stream, 1, 100).await.expect("read");
    assert_eq!(versions(&all), (1..=15).collect::<Vec<_>>());
    for (stored, sent) in all.iter().zip(&appended) {
        assert_eq!(stored.event_id, sent.event_id);
    }
    let across = store.read_stream(&stream, 8, 5).await.expect("read");
    assert_eq!(versions(&across), vec![8, 9, 10, 11, 12]);
    let indexed_only = store.read_stream(&stream, 2, 3).await.expect("read");
    assert_eq!(versions(&indexed_only), vec![2, 3, 4]);
    assert_eq!(store.stream_version(&stream).await.expect("version"), 15);

    for at in [3usize, 13] {
        let found = store
            .find_command_events(&stream, appended[at - 1].event_id)
            .await
            .expect("find");
        assert_eq!(versions(&found), vec![at as u64], "the command at v{at}");
        // A retry of it is recognised and answered as before.
        let again = store
            .append(
                &stream,
                ExpectedVersion::Exact(1),
                vec![appended[at - 1].clone()],
            )
            .await
            .expect("a retry");
        assert_eq!(again.version, at as u64);
        // Its id cannot go to another stream, first or later in an append.
        let other = new_stream("joined");
        let refused = store
            .append(
                &other,
                ExpectedVersion::Any,
                vec![event(99), appended[at - 1].clone()],
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::Corrupt(ref m)) if m.contains(&stream)),
            "{refused:?}"
        );
        assert_eq!(store.stream_version(&other).await.expect("version"), 0);
    }
    let stale = store
        .append(&stream, ExpectedVersion::Exact(10), vec![event(100)])
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::WrongExpectedVersion { actual: 15, .. })
        ),
        "{stale:?}"
    );
    store.close().await;
}

/// Readers that read a stream again and again while it grows and the
/// indexer moves events out of the tail always see a gap-free prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_indexing_never_miss_or_repeat_an_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = std::sync::Arc::new(open(dir.path(), every(7)).await);
    let stream = new_stream("moving");
    let writer = {
        let (store, stream) = (store.clone(), stream.clone());
        tokio::spawn(async move { append_each(&store, &stream, 300).await })
    };
    let mut reads = 0;
    let mut last_seen = 0;
    while !writer.is_finished() {
        let events = store.read_stream(&stream, 1, 1000).await.expect("read");
        assert_eq!(
            versions(&events),
            (1..=events.len() as u64).collect::<Vec<_>>()
        );
        assert!(events.len() >= last_seen, "a read saw fewer than before");
        last_seen = events.len();
        reads += 1;
    }
    writer.await.expect("writer");
    let events = store.read_stream(&stream, 1, 1000).await.expect("read");
    assert_eq!(events.len(), 300);
    assert!(reads > 10, "only {reads} reads overlapped the appends");
    store.close().await;
}

fn indexed_up_to(dir: &Path) -> i64 {
    Connection::open(dir.join(INDEX_FILE))
        .expect("the index")
        .query_row("SELECT indexed_up_to FROM index_state", [], |r| r.get(0))
        .expect("the checkpoint")
}

fn copy(files: &[&str], from: &Path, to: &Path) {
    for file in files {
        std::fs::copy(from.join(file), to.join(file)).expect("copy");
    }
}

/// The index is derived data: deleted, behind its log (a crash lost its
/// last transactions), ahead of it (the log was restored from a backup),
/// or made from another log, it is rebuilt or caught up at open, and the
/// store answers as if nothing had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_that_is_lost_behind_ahead_or_foreign_is_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at_50 = tempfile::tempdir().expect("tempdir");
    let other = tempfile::tempdir().expect("tempdir");
    let stream = new_stream("rebuilt");

    let store = open(dir.path(), Indexing::default()).await;
    append_each(&store, &stream, 50).await;
    store.close().await;
    copy(&[DB_FILE, INDEX_FILE], dir.path(), at_50.path());
    let store = open(dir.path(), Indexing::default()).await;
    append_each(&store, &stream, 50).await;
    store.close().await;
    assert_eq!(indexed_up_to(dir.path()), 100);

    let check = |expected: u64| {
        let dir = dir.path().to_path_buf();
        let stream = stream.clone();
        async move {
            let store = open(&dir, Indexing::default()).await;
            assert_eq!(store.stream_version(&stream).await.expect("v"), expected);
            let events = store.read_stream(&stream, 1, 1000).await.expect("read");
            assert_eq!(versions(&events), (1..=expected).collect::<Vec<_>>());
            let first = &events[0];
            let found = store
                .find_command_events(&stream, first.event_id)
                .await
                .expect("find");
            assert_eq!(found.len(), 1);
            let next = store
                .append(&stream, ExpectedVersion::Exact(expected), vec![event(200)])
                .await
                .expect("append");
            assert_eq!(next.version, expected + 1);
            store.close().await;
            assert_eq!(indexed_up_to(&dir), expected as i64 + 1);
        }
    };

    // Deleted.
    std::fs::remove_file(dir.path().join(INDEX_FILE)).expect("delete");
    check(100).await;
    // Behind: the index as it was at 50 events, the log at 101.
    copy(&[INDEX_FILE], at_50.path(), dir.path());
    check(101).await;
    // From another log with as many events.
    let foreign = open(other.path(), Indexing::default()).await;
    append_each(&foreign, &new_stream("foreign"), 102).await;
    foreign.close().await;
    copy(&[INDEX_FILE], other.path(), dir.path());
    check(102).await;
    // Ahead: the log restored to its copy at 50 events, beside the index
    // of 103.
    copy(&[DB_FILE], at_50.path(), dir.path());
    check(50).await;
}

/// An index that cannot be written (its disk is full) holds nothing up
/// until the tail is full; then appends are refused with a message that
/// names the index and what to do, nothing acknowledged is lost, and a
/// restart with room indexes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_that_cannot_be_written_stops_appends_once_the_tail_is_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Create the index, so that its size is known.
    open(dir.path(), Indexing::default()).await.close().await;
    let pages: u32 = Connection::open(dir.path().join(INDEX_FILE))
        .expect("index")
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .expect("pages");
    let store = open(
        dir.path(),
        Indexing {
            min_batch: 1,
            idle: Duration::ZERO,
            tail_limit: 40,
            max_pages: Some(pages),
        },
    )
    .await;
    // Long enough that the index needs a new page after a few entries.
    let stream = new_stream(&"full".repeat(300));
    let mut acknowledged = 0u64;
    let refusal = loop {
        match store
            .append(
                &stream,
                ExpectedVersion::Exact(acknowledged),
                vec![event(1)],
            )
            .await
        {
            Ok(result) => {
                acknowledged = result.version;
                assert!(acknowledged <= 40, "the tail outgrew its limit");
            }
            Err(StoreError::Unavailable(message)) => break message,
            Err(other) => panic!("unexpected {other}"),
        }
    };
    assert_eq!(acknowledged, 40, "appends went on until the tail was full");
    assert!(
        refusal.contains(INDEX_FILE) && refusal.contains("free disk space"),
        "{refusal}"
    );
    assert_eq!(
        store
            .read_stream(&stream, 1, 100)
            .await
            .expect("read")
            .len(),
        40,
        "acknowledged appends are readable from the tail"
    );
    store.close().await;

    let store = open(dir.path(), Indexing::default()).await;
    assert_eq!(store.stream_version(&stream).await.expect("version"), 40);
    store.close().await;
    assert_eq!(indexed_up_to(dir.path()), 40);
}
