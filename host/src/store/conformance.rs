//! The conformance suite: the behaviour every [`EventStore`] backend must
//! show, written once as generic async functions and run against each
//! backend.
//!
//! Each function takes a store and uses fresh, randomly named streams, so the
//! suite also works against a shared server (a KurrentDB backend will reuse
//! it) where other data already exists. To run it for a backend, write an
//! async function returning `(Arc<dyn EventStore>, keep_alive)` and invoke
//! [`conformance_suite!`] with it; the `keep_alive` value (a temporary
//! directory, say) is dropped after the test. Checks that depend on the
//! embedded/memory rule that event ids are unique across all streams are in
//! [`unique_event_id_suite!`], separate because KurrentDB does not have that
//! rule.
//!
//! Below the generic functions are the runs for the memory and embedded
//! backends, and tests only the embedded store needs (reopening, locking).

use std::sync::Arc;

use uuid::Uuid;

use super::{
    AppendResult, EventData, EventStore, EventToApply, ExpectedVersion, RecordedEvent, Snapshot,
    StoreError,
};

/// Generates one `#[tokio::test]` per named conformance function, each with
/// a store from `$make` (an async fn returning `(Arc<dyn EventStore>, _)`).
macro_rules! conformance_tests {
    ($make:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _keep_alive) = $make().await;
                $crate::store::conformance::$name(store).await;
            }
        )*
    };
}
pub(crate) use conformance_tests;

/// Generates the tests every backend must pass, with stores from `$make`.
macro_rules! conformance_suite {
    ($make:path) => {
        $crate::store::conformance::conformance_tests!(
            $make;
            append_any,
            append_no_stream,
            append_stream_exists,
            append_exact,
            conflict_writes_nothing,
            multi_event_append_is_atomic,
            paged_stream_reads,
            reads_to_apply_are_the_stream_reads,
            missing_stream_is_empty,
            read_all_in_global_order,
            idempotent_retry,
            find_command_events,
            bytes_round_trip,
            large_event,
            concurrent_appends_same_stream,
            concurrent_appends_different_streams,
            empty_append,
            head_position_follows_appends,
            snapshot_round_trip,
            snapshot_newest_wins,
            snapshots_are_not_events,
        );
    };
}
pub(crate) use conformance_suite;

/// Generates the tests of the rule that an event id is unique across all
/// streams (embedded and memory stores).
macro_rules! unique_event_id_suite {
    ($make:path) => {
        $crate::store::conformance::conformance_tests!(
            $make;
            event_id_in_another_stream_is_refused,
            duplicate_ids_in_one_append_are_refused,
        );
    };
}
pub(crate) use unique_event_id_suite;

// ---------------------------------------------------------------------------
// Helpers

/// A fresh stream name in the `<prefix>-<id>` convention.
pub(crate) fn new_stream(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

/// A small JSON event with a fresh id, from command `message_id`.
pub(crate) fn event_for(message_id: &str, n: u32) -> EventData {
    EventData {
        event_id: Uuid::new_v4(),
        event_type: "ThingHappened".into(),
        data: format!(r#"{{"n":{n}}}"#).into_bytes(),
        metadata: format!(r#"{{"$correlationId":"{message_id}","messageId":"{message_id}"}}"#)
            .into_bytes(),
        message_id: message_id.to_owned(),
    }
}

/// A small JSON event from a command of its own.
pub(crate) fn event(n: u32) -> EventData {
    event_for(&Uuid::new_v4().to_string(), n)
}

/// `n` events from one command.
pub(crate) fn events(n: u32) -> Vec<EventData> {
    let message_id = Uuid::new_v4().to_string();
    (1..=n).map(|i| event_for(&message_id, i)).collect()
}

/// Appends `e` to `stream` as a writer racing others does: with the exact
/// expectation `expected`, then after each conflict with the version the
/// store reported. Returns the result and the expectation that succeeded.
pub(crate) async fn append_racing(
    store: &dyn EventStore,
    stream: &str,
    mut expected: u64,
    e: &EventData,
) -> (AppendResult, u64) {
    loop {
        match store
            .append(stream, ExpectedVersion::Exact(expected), vec![e.clone()])
            .await
        {
            Ok(result) => return (result, expected),
            Err(StoreError::WrongExpectedVersion { actual, .. }) => expected = actual,
            Err(other) => panic!("append failed: {other}"),
        }
    }
}

/// Asserts that `result` is a conflict on `stream` reporting `actual`.
#[track_caller]
pub(crate) fn assert_conflict(
    result: Result<AppendResult, StoreError>,
    stream: &str,
    expected: ExpectedVersion,
    actual: u64,
) {
    match result {
        Err(StoreError::WrongExpectedVersion {
            stream: s,
            expected: e,
            actual: a,
        }) => {
            assert_eq!(s, stream, "conflict names the stream");
            assert_eq!(e, expected, "conflict reports the expectation");
            assert_eq!(a, actual, "conflict reports the actual version");
        }
        other => panic!("expected a conflict at version {actual}, got {other:?}"),
    }
}

/// Asserts that a stored event is `sent`, at `version`.
#[track_caller]
pub(crate) fn assert_stored(stored: &RecordedEvent, stream: &str, version: u64, sent: &EventData) {
    assert_eq!(stored.stream, stream);
    assert_eq!(stored.version, version);
    assert_eq!(stored.event_id, sent.event_id);
    assert_eq!(stored.event_type, sent.event_type);
    assert_eq!(stored.data, sent.data);
    assert_eq!(stored.metadata, sent.metadata);
    assert_eq!(stored.message_id, sent.message_id);
}

/// All of a stream's events.
pub(crate) async fn read_whole(store: &dyn EventStore, stream: &str) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, 1, usize::MAX)
        .await
        .expect("read_stream")
}

// ---------------------------------------------------------------------------
// The suite

/// `Any` creates a stream and extends it.
pub(crate) async fn append_any(store: Arc<dyn EventStore>) {
    let s = new_stream("any");
    let first = store
        .append(&s, ExpectedVersion::Any, vec![event(1)])
        .await
        .expect("append to a new stream");
    assert_eq!(first.version, 1);
    assert!(first.position >= 1, "positions are 1-based");
    let second = store
        .append(&s, ExpectedVersion::Any, events(2))
        .await
        .expect("append to an existing stream");
    assert_eq!(second.version, 3);
    assert!(second.position > first.position);
    assert_eq!(store.stream_version(&s).await.expect("version"), 3);
}

/// `NoStream` succeeds only on a missing stream.
pub(crate) async fn append_no_stream(store: Arc<dyn EventStore>) {
    let s = new_stream("nostream");
    let created = store
        .append(&s, ExpectedVersion::NoStream, events(2))
        .await
        .expect("create");
    assert_eq!(created.version, 2);
    let again = store
        .append(&s, ExpectedVersion::NoStream, vec![event(3)])
        .await;
    assert_conflict(again, &s, ExpectedVersion::NoStream, 2);
    assert_eq!(store.stream_version(&s).await.expect("version"), 2);
    assert_eq!(read_whole(&*store, &s).await.len(), 2);
}

/// `StreamExists` succeeds only on an existing stream.
pub(crate) async fn append_stream_exists(store: Arc<dyn EventStore>) {
    let s = new_stream("exists");
    let missing = store
        .append(&s, ExpectedVersion::StreamExists, vec![event(1)])
        .await;
    assert_conflict(missing, &s, ExpectedVersion::StreamExists, 0);
    assert_eq!(store.stream_version(&s).await.expect("version"), 0);
    assert!(read_whole(&*store, &s).await.is_empty());

    store
        .append(&s, ExpectedVersion::Any, vec![event(1)])
        .await
        .expect("create");
    let extended = store
        .append(&s, ExpectedVersion::StreamExists, vec![event(2)])
        .await
        .expect("append to an existing stream");
    assert_eq!(extended.version, 2);
}

/// `Exact(n)` succeeds only at version n (0 meaning a missing stream).
pub(crate) async fn append_exact(store: Arc<dyn EventStore>) {
    let s = new_stream("exact");
    let created = store
        .append(&s, ExpectedVersion::Exact(0), events(2))
        .await
        .expect("create at 0");
    assert_eq!(created.version, 2);
    let next = store
        .append(&s, ExpectedVersion::Exact(2), vec![event(3)])
        .await
        .expect("append at 2");
    assert_eq!(next.version, 3);

    for wrong in [0, 1, 2, 4, 100] {
        let result = store
            .append(&s, ExpectedVersion::Exact(wrong), vec![event(9)])
            .await;
        assert_conflict(result, &s, ExpectedVersion::Exact(wrong), 3);
    }
    let stored = read_whole(&*store, &s).await;
    assert_eq!(
        stored.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

/// A rejected append writes none of its events: not in the stream, not in
/// the global order, and its ids stay free for a later append.
pub(crate) async fn conflict_writes_nothing(store: Arc<dyn EventStore>) {
    let s = new_stream("conflict");
    let before = store
        .append(&s, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .expect("create");
    let rejected = events(3);
    let result = store
        .append(&s, ExpectedVersion::Exact(0), rejected.clone())
        .await;
    assert_conflict(result, &s, ExpectedVersion::Exact(0), 1);
    assert_eq!(store.stream_version(&s).await.expect("version"), 1);
    assert_eq!(read_whole(&*store, &s).await.len(), 1);
    let after = store
        .read_all(before.position + 1, 100)
        .await
        .expect("read_all");
    assert!(
        after.iter().all(|e| e.stream != s),
        "a rejected append left events in the global order"
    );

    // Had any of them been stored, this would be taken as a retry.
    let accepted = store
        .append(&s, ExpectedVersion::Exact(1), rejected.clone())
        .await
        .expect("the same events at the right version");
    assert_eq!(accepted.version, 4);
    let stored = read_whole(&*store, &s).await;
    for (i, sent) in rejected.iter().enumerate() {
        assert_stored(&stored[i + 1], &s, i as u64 + 2, sent);
    }
}

/// A multi-event append gets contiguous versions, increasing positions, and
/// reports the last event's version and position.
pub(crate) async fn multi_event_append_is_atomic(store: Arc<dyn EventStore>) {
    let s = new_stream("multi");
    store
        .append(&s, ExpectedVersion::Any, vec![event(0)])
        .await
        .expect("create");
    let sent = events(5);
    let result = store
        .append(&s, ExpectedVersion::Exact(1), sent.clone())
        .await
        .expect("append 5");
    assert_eq!(result.version, 6);
    let stored = read_whole(&*store, &s).await;
    assert_eq!(stored.len(), 6);
    for (i, e) in sent.iter().enumerate() {
        assert_stored(&stored[i + 1], &s, i as u64 + 2, e);
    }
    for pair in stored.windows(2) {
        assert!(pair[0].position < pair[1].position, "positions increase");
    }
    assert_eq!(stored[5].position, result.position);
}

/// Forward reads page by version.
/// `read_stream_to_apply` returns what `read_stream` returns, less the
/// fields loading an aggregate does not need, for every page and from any
/// version, with another stream's events in between.
pub(crate) async fn reads_to_apply_are_the_stream_reads(store: Arc<dyn EventStore>) {
    let s = new_stream("to-apply");
    let other = new_stream("to-apply-other");
    let sent = events(10);
    for (i, event) in sent.iter().enumerate() {
        let mut event = event.clone();
        event.metadata = format!(r#"{{"n":{i},"who":"\u00e9"}}"#).into_bytes();
        store
            .append(&s, ExpectedVersion::Any, vec![event])
            .await
            .expect("append");
        store
            .append(&other, ExpectedVersion::Any, events(1))
            .await
            .expect("append to another stream");
    }
    for (from, limit) in [(1, 10), (1, 3), (4, 3), (0, 2), (10, 5), (11, 5), (1, 0)] {
        let whole: Vec<EventToApply> = store
            .read_stream(&s, from, limit)
            .await
            .expect("read_stream")
            .into_iter()
            .map(EventToApply::from)
            .collect();
        let to_apply = store
            .read_stream_to_apply(&s, from, limit)
            .await
            .expect("read_stream_to_apply");
        assert_eq!(to_apply, whole, "from {from}, limit {limit}");
    }
    let all = store
        .read_stream_to_apply(&s, 1, 100)
        .await
        .expect("the whole stream");
    assert_eq!(all.len(), 10);
    for (event, sent) in all.iter().zip(&sent) {
        assert_eq!(
            (event.event_id, &event.event_type, &event.data),
            (sent.event_id, &sent.event_type, &sent.data)
        );
    }
    assert!(
        store
            .read_stream_to_apply(&new_stream("to-apply-missing"), 1, 10)
            .await
            .expect("a missing stream")
            .is_empty()
    );
}

pub(crate) async fn paged_stream_reads(store: Arc<dyn EventStore>) {
    let s = new_stream("paged");
    let sent = events(10);
    store
        .append(&s, ExpectedVersion::NoStream, sent.clone())
        .await
        .expect("append 10");

    let mut from = 1;
    let mut pages = Vec::new();
    loop {
        let page = store.read_stream(&s, from, 3).await.expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3, "a page respects the limit");
        pages.push(page.iter().map(|e| e.version).collect::<Vec<_>>());
        from = page[page.len() - 1].version + 1;
    }
    assert_eq!(
        pages,
        [vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]
    );

    let middle = store.read_stream(&s, 5, 2).await.expect("middle");
    assert_stored(&middle[0], &s, 5, &sent[4]);
    assert_stored(&middle[1], &s, 6, &sent[5]);
    let from_zero = store.read_stream(&s, 0, 2).await.expect("from 0");
    assert_eq!(
        from_zero.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert!(
        store
            .read_stream(&s, 1, 0)
            .await
            .expect("limit 0")
            .is_empty()
    );
    assert!(
        store
            .read_stream(&s, 11, 5)
            .await
            .expect("past end")
            .is_empty()
    );
    assert!(
        store
            .read_stream(&s, u64::MAX, 5)
            .await
            .expect("far past end")
            .is_empty()
    );
}

/// A missing stream reads empty and has version 0.
pub(crate) async fn missing_stream_is_empty(store: Arc<dyn EventStore>) {
    let s = new_stream("missing");
    assert!(store.read_stream(&s, 1, 10).await.expect("read").is_empty());
    assert_eq!(store.stream_version(&s).await.expect("version"), 0);
    assert!(
        store
            .find_command_events(&s, Uuid::new_v4())
            .await
            .expect("find")
            .is_empty()
    );
}

/// `read_all` returns every stream's events in global (commit) order with
/// strictly increasing positions, in pages.
pub(crate) async fn read_all_in_global_order(store: Arc<dyn EventStore>) {
    let streams = [new_stream("all"), new_stream("all"), new_stream("all")];
    let mut sent: Vec<(String, EventData)> = Vec::new();
    let mut last = AppendResult {
        version: 0,
        position: 0,
    };
    for round in 0..4u32 {
        for (k, s) in streams.iter().enumerate() {
            // Some appends of one event, some of two.
            let batch = events(1 + (round + k as u32) % 2);
            sent.extend(batch.iter().map(|e| (s.clone(), e.clone())));
            let result = store
                .append(s, ExpectedVersion::Any, batch)
                .await
                .expect("append");
            assert!(result.position > last.position, "positions grow per append");
            last = result;
        }
    }

    let first_position = read_whole(&*store, &streams[0]).await[0].position;
    let mut seen = Vec::new();
    let mut from = first_position;
    let mut previous = 0;
    while from <= last.position {
        let page = store.read_all(from, 4).await.expect("read_all page");
        assert!(!page.is_empty(), "events up to {} exist", last.position);
        assert!(page.len() <= 4, "a page respects the limit");
        for e in &page {
            assert!(e.position > previous, "positions strictly increase");
            assert!(e.position >= from, "no event before the page's start");
            previous = e.position;
        }
        from = previous + 1;
        seen.extend(page.into_iter().filter(|e| streams.contains(&e.stream)));
    }
    assert_eq!(seen.len(), sent.len(), "every event appears once");
    for (stored, (stream, e)) in seen.iter().zip(&sent) {
        assert_eq!(&stored.stream, stream);
        assert_eq!(
            stored.event_id, e.event_id,
            "appended order is global order"
        );
    }
    assert_eq!(seen[seen.len() - 1].position, last.position);

    let from_start = store.read_all(0, 1).await.expect("read_all from 0");
    assert!(from_start.len() == 1 && from_start[0].position >= 1);
    assert!(store.read_all(1, 0).await.expect("limit 0").is_empty());
    let after = store
        .read_all(last.position + 1, 100)
        .await
        .expect("read_all after");
    assert!(after.iter().all(|e| !streams.contains(&e.stream)));
}

/// Re-appending events whose ids are stored writes nothing and returns the
/// original append's result, whatever the expectation and however far the
/// stream has moved on.
pub(crate) async fn idempotent_retry(store: Arc<dyn EventStore>) {
    let s = new_stream("retry");
    let first = events(3);
    let original = store
        .append(&s, ExpectedVersion::Exact(0), first.clone())
        .await
        .expect("append");
    for expected in [
        ExpectedVersion::Exact(0),
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(7),
    ] {
        let retried = store
            .append(&s, expected, first.clone())
            .await
            .expect("retry");
        assert_eq!(retried, original, "retry with {expected:?}");
    }
    assert_eq!(store.stream_version(&s).await.expect("version"), 3);

    let second = vec![event(4)];
    let later = store
        .append(&s, ExpectedVersion::Exact(3), second.clone())
        .await
        .expect("append more");
    assert_eq!(later.version, 4);
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Exact(0), first.clone())
            .await
            .expect("old retry"),
        original,
        "a retry answers with the original result, not the current version"
    );
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Exact(3), second)
            .await
            .expect("retry"),
        later
    );

    // The id decides, even if the payload differs.
    let mut changed = first.clone();
    changed[0].data = br#"{"changed":true}"#.to_vec();
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Any, changed)
            .await
            .expect("retry"),
        original
    );

    let stored = read_whole(&*store, &s).await;
    assert_eq!(stored.len(), 4, "retries appended nothing");
    assert_stored(&stored[0], &s, 1, &first[0]);
    let ours = store
        .read_all(stored[0].position, 1000)
        .await
        .expect("read_all")
        .into_iter()
        .filter(|e| e.stream == s)
        .count();
    assert_eq!(ours, 4, "retries appended nothing to the global order");
}

/// A command's events can be found by its first event's id, per stream, and
/// the search stops where the next command's events begin.
pub(crate) async fn find_command_events(store: Arc<dyn EventStore>) {
    let s = new_stream("find");
    let other = new_stream("find");
    let m1 = Uuid::new_v4().to_string();
    let m2 = Uuid::new_v4().to_string();
    let cmd1 = vec![event_for(&m1, 1), event_for(&m1, 2)];
    let cmd2 = vec![event_for(&m2, 3)];
    let elsewhere = vec![event_for(&m1, 9)];
    store
        .append(&s, ExpectedVersion::NoStream, cmd1.clone())
        .await
        .expect("cmd1");
    store
        .append(&other, ExpectedVersion::NoStream, elsewhere.clone())
        .await
        .expect("other stream");
    store
        .append(&s, ExpectedVersion::Exact(2), cmd2.clone())
        .await
        .expect("cmd2");

    let found = store
        .find_command_events(&s, cmd1[0].event_id)
        .await
        .expect("find cmd1");
    assert_eq!(found.len(), 2, "both of cmd1's events, not cmd2's");
    assert_stored(&found[0], &s, 1, &cmd1[0]);
    assert_stored(&found[1], &s, 2, &cmd1[1]);
    let found = store
        .find_command_events(&s, cmd2[0].event_id)
        .await
        .expect("find cmd2");
    assert_eq!(found.len(), 1);
    assert_stored(&found[0], &s, 3, &cmd2[0]);
    let found = store
        .find_command_events(&other, elsewhere[0].event_id)
        .await
        .expect("find in other");
    assert_eq!(found.len(), 1);
    assert_stored(&found[0], &other, 1, &elsewhere[0]);
    assert!(
        store
            .find_command_events(&s, elsewhere[0].event_id)
            .await
            .expect("find another stream's event")
            .is_empty(),
        "an event of another stream is not this stream's"
    );
    assert!(
        store
            .find_command_events(&s, Uuid::new_v4())
            .await
            .expect("find none")
            .is_empty()
    );
}

/// Type, data, metadata and message id come back byte for byte, through
/// every read.
pub(crate) async fn bytes_round_trip(store: Arc<dyn EventStore>) {
    let s = new_stream("bytes");
    let message_id = format!("msg-{}-ünïcødé", Uuid::new_v4());
    let mut odd = event_for(&message_id, 1);
    odd.event_type = "Größe.Geändert_v2".into();
    // Whitespace, key order, escapes and non-ASCII must not be normalised.
    odd.data = "{ \"z\" : 1,\n\t\"a\":\"\\u00e9 é \\\"q\\\" 🦀\" , \"n\": 1.50 }\n".into();
    odd.metadata = format!(
        "{{\"messageId\":\"{message_id}\",  \"$correlationId\":\"c\",\"$causationId\":\"c\",\
         \"plugin\":\"bank@sha256:ab\",\"empty\":{{}}}}"
    )
    .into_bytes();
    let mut empty = event_for(&message_id, 2);
    empty.data = Vec::new();
    empty.metadata = Vec::new();
    let sent = vec![odd, empty];
    store
        .append(&s, ExpectedVersion::NoStream, sent.clone())
        .await
        .expect("append");

    let by_stream = read_whole(&*store, &s).await;
    assert_stored(&by_stream[0], &s, 1, &sent[0]);
    assert_stored(&by_stream[1], &s, 2, &sent[1]);
    let by_position = store
        .read_all(by_stream[0].position, 2)
        .await
        .expect("read_all");
    assert_eq!(by_position, by_stream);
    let by_message = store
        .find_command_events(&s, sent[0].event_id)
        .await
        .expect("find");
    assert_eq!(by_message, by_stream);
}

/// A 1 MiB event is stored and read back whole.
pub(crate) async fn large_event(store: Arc<dyn EventStore>) {
    let s = new_stream("large");
    let mut big = event(1);
    let filler: String = (0..1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    big.data = format!(r#"{{"x":"{filler}"}}"#).into_bytes();
    assert!(big.data.len() >= 1024 * 1024);
    store
        .append(&s, ExpectedVersion::NoStream, vec![big.clone(), event(2)])
        .await
        .expect("append");
    let stored = read_whole(&*store, &s).await;
    assert_eq!(stored.len(), 2);
    assert_stored(&stored[0], &s, 1, &big);
}

const TASKS: u64 = 20;
const APPENDS_PER_TASK: u64 = 50;

/// Many tasks appending to one stream with exact expectations, retrying on
/// conflict: every success gets its own version, with no gaps or duplicates.
pub(crate) async fn concurrent_appends_same_stream(store: Arc<dyn EventStore>) {
    let s = new_stream("contended");
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            let mut expected = 0;
            for n in 0..APPENDS_PER_TASK {
                let e = event((task * 1000 + n) as u32);
                let (result, succeeded_with) = append_racing(&*store, &s, expected, &e).await;
                assert_eq!(result.version, succeeded_with + 1);
                written.push((result.version, e.event_id));
                expected = result.version;
            }
            written
        }));
    }
    let mut written = Vec::new();
    for task in tasks {
        written.extend(task.await.expect("task"));
    }
    let total = TASKS * APPENDS_PER_TASK;
    assert_eq!(written.len() as u64, total);
    assert_eq!(store.stream_version(&s).await.expect("version"), total);

    let stored = read_whole(&*store, &s).await;
    assert_eq!(stored.len() as u64, total);
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "no gaps or duplicates");
    }
    written.sort();
    let stored_pairs: Vec<_> = stored.iter().map(|e| (e.version, e.event_id)).collect();
    assert_eq!(
        written, stored_pairs,
        "each success is stored at its version"
    );
}

/// Many tasks appending to their own streams all succeed.
pub(crate) async fn concurrent_appends_different_streams(store: Arc<dyn EventStore>) {
    let streams: Vec<String> = (0..TASKS).map(|_| new_stream("parallel")).collect();
    let mut tasks = Vec::new();
    for s in &streams {
        let store = Arc::clone(&store);
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..APPENDS_PER_TASK {
                let result = store
                    .append(&s, ExpectedVersion::Exact(n), vec![event(n as u32)])
                    .await
                    .expect("append to own stream");
                assert_eq!(result.version, n + 1);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }

    let mut first = u64::MAX;
    for s in &streams {
        assert_eq!(
            store.stream_version(s).await.expect("version"),
            APPENDS_PER_TASK
        );
        let stored = read_whole(&*store, s).await;
        assert_eq!(stored.len() as u64, APPENDS_PER_TASK);
        first = first.min(stored[0].position);
    }
    let all = store.read_all(first, usize::MAX).await.expect("read_all");
    let ours: Vec<_> = all.iter().filter(|e| streams.contains(&e.stream)).collect();
    assert_eq!(ours.len() as u64, TASKS * APPENDS_PER_TASK);
    for pair in all.windows(2) {
        assert!(pair[0].position < pair[1].position);
    }
    for s in &streams {
        let versions: Vec<u64> = ours
            .iter()
            .filter(|e| &e.stream == s)
            .map(|e| e.version)
            .collect();
        assert_eq!(versions, (1..=APPENDS_PER_TASK).collect::<Vec<_>>());
    }
}

/// An empty append checks the expectation and reports the current version,
/// writing nothing.
pub(crate) async fn empty_append(store: Arc<dyn EventStore>) {
    let s = new_stream("empty");
    for expected in [
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(0),
    ] {
        let result = store
            .append(&s, expected, Vec::new())
            .await
            .expect("empty append on a missing stream");
        assert_eq!(result.version, 0, "{expected:?}");
    }
    assert_conflict(
        store
            .append(&s, ExpectedVersion::StreamExists, Vec::new())
            .await,
        &s,
        ExpectedVersion::StreamExists,
        0,
    );
    assert_conflict(
        store
            .append(&s, ExpectedVersion::Exact(1), Vec::new())
            .await,
        &s,
        ExpectedVersion::Exact(1),
        0,
    );
    assert_eq!(store.stream_version(&s).await.expect("version"), 0);
    assert!(read_whole(&*store, &s).await.is_empty());

    store
        .append(&s, ExpectedVersion::NoStream, events(2))
        .await
        .expect("create");
    for expected in [
        ExpectedVersion::Any,
        ExpectedVersion::StreamExists,
        ExpectedVersion::Exact(2),
    ] {
        let result = store
            .append(&s, expected, Vec::new())
            .await
            .expect("empty append on an existing stream");
        assert_eq!(result.version, 2, "{expected:?}");
    }
    assert_conflict(
        store
            .append(&s, ExpectedVersion::NoStream, Vec::new())
            .await,
        &s,
        ExpectedVersion::NoStream,
        2,
    );
    assert_eq!(read_whole(&*store, &s).await.len(), 2);
}

/// An event id stored in one stream cannot be appended to another; the
/// append is refused as [`StoreError::Corrupt`] (a reused message id is not
/// something a retry fixes) and writes nothing.
pub(crate) async fn event_id_in_another_stream_is_refused(store: Arc<dyn EventStore>) {
    let a = new_stream("ids");
    let b = new_stream("ids");
    let taken = event(1);
    store
        .append(&a, ExpectedVersion::NoStream, vec![taken.clone()])
        .await
        .expect("append to a");

    // As the first event: it looks like a retry, but of another stream's append.
    let result = store
        .append(&b, ExpectedVersion::Any, vec![taken.clone()])
        .await;
    assert!(
        matches!(result, Err(StoreError::Corrupt(ref m)) if m.contains(&a)),
        "got {result:?}"
    );
    // As a later event: the whole batch is refused.
    let fresh = event(2);
    let result = store
        .append(&b, ExpectedVersion::Any, vec![fresh.clone(), taken.clone()])
        .await;
    assert!(
        matches!(result, Err(StoreError::Corrupt(_))),
        "got {result:?}"
    );
    assert_eq!(store.stream_version(&b).await.expect("version"), 0);
    // `fresh` was not stored, so appending it is new, not a retry.
    let ok = store
        .append(&b, ExpectedVersion::NoStream, vec![fresh])
        .await
        .expect("fresh event");
    assert_eq!(ok.version, 1);
    assert_eq!(read_whole(&*store, &a).await.len(), 1);
}

/// A batch with the same id twice is refused whole.
pub(crate) async fn duplicate_ids_in_one_append_are_refused(store: Arc<dyn EventStore>) {
    let s = new_stream("dups");
    let e = event(1);
    let mut twin = event(2);
    twin.event_id = e.event_id;
    let result = store
        .append(&s, ExpectedVersion::NoStream, vec![event(0), e, twin])
        .await;
    assert!(
        matches!(result, Err(StoreError::Corrupt(_))),
        "got {result:?}"
    );
    assert_eq!(store.stream_version(&s).await.expect("version"), 0);
    assert!(read_whole(&*store, &s).await.is_empty());
}

/// The head position is 0 on an empty store and then the position of the
/// last event appended, whichever stream it went to.
pub(crate) async fn head_position_follows_appends(store: Arc<dyn EventStore>) {
    let before = store.head_position().await.expect("head position");
    let a = new_stream("head");
    let b = new_stream("head");
    let first = store
        .append(&a, ExpectedVersion::NoStream, events(2))
        .await
        .expect("append to a");
    assert!(first.position > before, "{first:?} after head {before}");
    assert_eq!(store.head_position().await.expect("head"), first.position);
    let second = store
        .append(&b, ExpectedVersion::NoStream, events(1))
        .await
        .expect("append to b");
    assert_eq!(store.head_position().await.expect("head"), second.position);
    // A refused append moves nothing.
    let _ = store.append(&a, ExpectedVersion::Exact(9), events(1)).await;
    assert_eq!(store.head_position().await.expect("head"), second.position);
}

/// A snapshot for `stream` at `version` of `schema`, with state bytes that
/// name both (and bytes that are not UTF-8, which must survive too).
pub(crate) fn snapshot(stream: &str, schema: u32, version: u64) -> Snapshot {
    let mut state = format!("{{\"schema\":{schema},\"version\":{version}}}").into_bytes();
    state.extend_from_slice(&[0, 0xff, 0xfe]);
    Snapshot {
        stream: stream.to_owned(),
        schema,
        version,
        event_id: Uuid::new_v4(),
        state,
    }
}

/// A saved snapshot loads back byte for byte; a stream without one, or
/// another stream's, loads as none; large state survives.
pub(crate) async fn snapshot_round_trip(store: Arc<dyn EventStore>) {
    let s = new_stream("snap");
    let other = new_stream("snap");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), None);
    let saved = snapshot(&s, 1, 3);
    store.save_snapshot(&saved).await.expect("save");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(saved));
    assert_eq!(store.load_snapshot(&other).await.expect("load"), None);

    // A state of several MiB (the host's default cap is 8 MiB).
    let mut big = snapshot(&other, 7, 1_000_000);
    big.state = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    store.save_snapshot(&big).await.expect("save a large state");
    assert_eq!(store.load_snapshot(&other).await.expect("load"), Some(big));
}

/// One snapshot per stream: a later version replaces it, an older one of
/// the same schema does not (a slow writer never rolls it back), and one of
/// another schema always does (a new plugin version's state must be able to
/// take over).
pub(crate) async fn snapshot_newest_wins(store: Arc<dyn EventStore>) {
    let s = new_stream("snap");
    let v10 = snapshot(&s, 1, 10);
    store.save_snapshot(&v10).await.expect("save v10");
    store
        .save_snapshot(&snapshot(&s, 1, 5))
        .await
        .expect("save an older one");
    assert_eq!(
        store.load_snapshot(&s).await.expect("load"),
        Some(v10.clone())
    );
    store
        .save_snapshot(&v10)
        .await
        .expect("save the same again");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(v10));

    let v20 = snapshot(&s, 1, 20);
    store.save_snapshot(&v20).await.expect("save v20");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(v20));

    let schema2 = snapshot(&s, 2, 15);
    store.save_snapshot(&schema2).await.expect("save schema 2");
    assert_eq!(
        store.load_snapshot(&s).await.expect("load"),
        Some(schema2),
        "a snapshot of another schema replaces a later one"
    );
}

/// Snapshots never show up as events: not in the stream, not in its
/// version, not in the global log or its head.
pub(crate) async fn snapshots_are_not_events(store: Arc<dyn EventStore>) {
    let s = new_stream("snap");
    let appended = store
        .append(&s, ExpectedVersion::NoStream, events(2))
        .await
        .expect("append");
    let head = store.head_position().await.expect("head");
    let fresh = new_stream("snap");
    store
        .save_snapshot(&snapshot(&s, 1, 2))
        .await
        .expect("save for a stream");
    store
        .save_snapshot(&snapshot(&fresh, 1, 4))
        .await
        .expect("save for a stream without events");
    assert_eq!(store.stream_version(&s).await.expect("version"), 2);
    assert_eq!(store.stream_version(&fresh).await.expect("version"), 0);
    assert_eq!(read_whole(store.as_ref(), &s).await.len(), 2);
    assert!(read_whole(store.as_ref(), &fresh).await.is_empty());
    assert_eq!(store.head_position().await.expect("head"), head);
    let after = store
        .read_all(appended.position + 1, 1000)
        .await
        .expect("read all");
    assert!(
        after.is_empty(),
        "the log grew past the append: {:?}",
        after.iter().map(|e| &e.stream).collect::<Vec<_>>()
    );
    // The next append still gets the next version.
    let next = store
        .append(&s, ExpectedVersion::Exact(2), events(1))
        .await
        .expect("append after a snapshot");
    assert_eq!(next.version, 3);
}

/// A backend with a commit signal changes it after an append, so a live
/// subscription waiting on it wakes up.
pub(crate) async fn commit_signal_changes_after_an_append(store: Arc<dyn EventStore>) {
    let mut signal = store
        .commit_signal()
        .expect("this backend has a commit signal");
    signal.borrow_and_update();
    let s = new_stream("signal");
    store
        .append(&s, ExpectedVersion::NoStream, events(1))
        .await
        .expect("append");
    tokio::time::timeout(std::time::Duration::from_secs(10), signal.changed())
        .await
        .expect("the signal changed")
        .expect("the store is alive");
}

// ---------------------------------------------------------------------------
// Runs

mod memory_backend {
    use super::*;
    use crate::store::memory::MemoryStore;

    async fn make() -> (Arc<dyn EventStore>, ()) {
        (Arc::new(MemoryStore::new()), ())
    }

    super::conformance_suite!(make);
    super::unique_event_id_suite!(make);
    super::conformance_tests!(make; commit_signal_changes_after_an_append);
}

mod embedded_backend {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    async fn make() -> (Arc<dyn EventStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).await.expect("open");
        (Arc::new(store), dir)
    }

    super::conformance_suite!(make);
    super::unique_event_id_suite!(make);
    super::conformance_tests!(make; commit_signal_changes_after_an_append);
}

/// The embedded store with an indexer that writes every event as soon as
/// it is durable, so that the suite reads through the index database what
/// the default mostly finds in the unindexed tail.
mod embedded_indexed_backend {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    async fn make() -> (Arc<dyn EventStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open_eagerly_indexed(dir.path())
            .await
            .expect("open");
        (Arc::new(store), dir)
    }

    super::conformance_suite!(make);
    super::unique_event_id_suite!(make);
}

/// Tests only the embedded store needs: what survives a close, who may open a
/// directory, and what it refuses to open.
mod embedded_only {
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::store::embedded::{DB_FILE, EmbeddedStore, SCHEMA_VERSION};

    fn error_text(result: anyhow::Result<EmbeddedStore>) -> String {
        match result {
            Ok(store) => panic!("expected the open to fail, got {store:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    async fn all_events(store: &EmbeddedStore) -> Vec<RecordedEvent> {
        store.read_all(0, usize::MAX).await.expect("read_all")
    }

    #[tokio::test]
    async fn data_and_positions_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).await.expect("open");
        let (a, b) = (new_stream("reopen"), new_stream("reopen"));
        store
            .append(&a, ExpectedVersion::NoStream, events(3))
            .await
            .expect("a");
        let last = store
            .append(&b, ExpectedVersion::NoStream, events(2))
            .await
            .expect("b");
        let before = all_events(&store).await;
        store.close().await;

        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        assert!(
            std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
            "close checkpoints the WAL into the database file"
        );

        let store = EmbeddedStore::open(dir.path()).await.expect("reopen");
        assert_eq!(all_events(&store).await, before);
        assert_eq!(store.stream_version(&a).await.expect("version"), 3);
        let more = store
            .append(&a, ExpectedVersion::Exact(3), vec![event(4)])
            .await
            .expect("append after reopen");
        assert_eq!(more.version, 4);
        assert!(more.position > last.position, "positions continue");
        store.close().await;
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_directory_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = EmbeddedStore::open(dir.path()).await.expect("open");
        let message = error_text(EmbeddedStore::open(dir.path()).await);
        assert!(message.contains("in use"), "{message}");
        assert!(message.contains("LOCK"), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        // The first one is unaffected.
        first
            .append(&new_stream("x"), ExpectedVersion::Any, vec![event(1)])
            .await
            .expect("append");
        first.close().await;
        EmbeddedStore::open(dir.path())
            .await
            .expect("open after close")
            .close()
            .await;
    }

    #[tokio::test]
    async fn dropping_the_store_releases_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = new_stream("drop");
        let store = EmbeddedStore::open(dir.path()).await.expect("open");
        store
            .append(&s, ExpectedVersion::Any, vec![event(1)])
            .await
            .expect("append");
        drop(store);
        // The writer finishes in the background; wait for it (bounded).
        let mut attempts = 0;
        let store = loop {
            match EmbeddedStore::open(dir.path()).await {
                Ok(store) => break store,
                Err(e) if attempts < 500 => {
                    assert!(format!("{e:#}").contains("in use"), "{e:#}");
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("the directory was never released: {e:#}"),
            }
        };
        assert_eq!(store.stream_version(&s).await.expect("version"), 1);
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_commits_what_was_queued_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path()).await.expect("open"));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let store = Arc::clone(&store);
            let acknowledged = Arc::clone(&acknowledged);
            // Appends until the store refuses, so appends are queued when
            // the close begins.
            tasks.push(tokio::spawn(async move {
                let s = new_stream("closing");
                let mut version = 0;
                loop {
                    match store
                        .append(&s, ExpectedVersion::Exact(version), vec![event(1)])
                        .await
                    {
                        Ok(r) => {
                            assert_eq!(r.version, version + 1);
                            version = r.version;
                            acknowledged.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(StoreError::Unavailable(_)) => return (s, version),
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
            }));
        }
        // Bounded wait for the appenders to get going.
        for _ in 0..1000 {
            if acknowledged.load(Ordering::SeqCst) >= 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.close().await;

        let mut committed = Vec::new();
        for task in tasks {
            committed.push(task.await.expect("task"));
        }
        assert!(acknowledged.load(Ordering::SeqCst) >= 200);
        assert!(matches!(
            store
                .append("x-1", ExpectedVersion::Any, vec![event(1)])
                .await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.read_all(0, 10).await,
            Err(StoreError::Unavailable(_))
        ));
        store.close().await; // twice is harmless

        let reopened = EmbeddedStore::open(dir.path()).await.expect("reopen");
        for (s, version) in &committed {
            assert_eq!(
                reopened.stream_version(s).await.expect("version"),
                *version,
                "every acknowledged append is stored, and nothing else"
            );
        }
        reopened.close().await;
    }

    #[tokio::test]
    async fn a_file_path_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"hello").expect("write");
        let message = error_text(EmbeddedStore::open(&file).await);
        assert!(message.contains("is a file"), "{message}");
        assert!(message.contains("directory"), "{message}");
    }

    #[tokio::test]
    async fn a_missing_directory_is_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("a").join("b");
        let store = EmbeddedStore::open(&nested).await.expect("open");
        assert!(nested.join(DB_FILE).is_file());
        assert!(store.describe().contains(&nested.display().to_string()));
        store.close().await;
    }

    fn raw(dir: &Path) -> rusqlite::Connection {
        rusqlite::Connection::open(dir.join(DB_FILE)).expect("raw open")
    }

    fn stored_schema_version(conn: &rusqlite::Connection) -> String {
        conn.query_row(
            "SELECT value FROM rehydra_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .expect("schema version")
    }

    #[tokio::test]
    async fn the_database_is_wal_with_a_schema_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        EmbeddedStore::open(dir.path())
            .await
            .expect("open")
            .close()
            .await;
        let conn = raw(dir.path());
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
        assert_eq!(stored_schema_version(&conn), SCHEMA_VERSION.to_string());
    }

    /// A store written by a build with schema version 1 (the schema below
    /// is that build's, verbatim) opens, loses its indexes (the index
    /// database is built from the log), and keeps its events findable and
    /// appendable.
    #[tokio::test]
    async fn a_version_1_store_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = raw(dir.path());
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE rehydra_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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
             CREATE UNIQUE INDEX events_event_id ON events (event_id);
             CREATE INDEX events_stream_message_id ON events (stream, message_id);
             INSERT INTO rehydra_meta (key, value) VALUES ('schema_version', '1');",
        )
        .expect("a version 1 schema");
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        for (version, id) in [(1, first), (2, second)] {
            conn.execute(
                "INSERT INTO events (stream, version, event_id, event_type, data, metadata, message_id)
                 VALUES ('old-1', ?1, ?2, 'Happened', CAST('{}' AS BLOB), CAST('{}' AS BLOB), 'm-1')",
                rusqlite::params![version, id.as_bytes()],
            )
            .expect("an event written by version 1");
        }
        drop(conn);

        let store = EmbeddedStore::open(dir.path()).await.expect("open");
        let found = store
            .find_command_events("old-1", first)
            .await
            .expect("find the old command's events");
        let ids: Vec<Uuid> = found.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, vec![first, second]);
        let next = store
            .append(
                "old-1",
                ExpectedVersion::Exact(2),
                vec![event_for("m-2", 3)],
            )
            .await
            .expect("append after the migration");
        assert_eq!(next.version, 3);
        // Version 3's snapshots table is there.
        let saved = crate::store::conformance::snapshot("old-1", 1, 3);
        store.save_snapshot(&saved).await.expect("save a snapshot");
        assert_eq!(
            store.load_snapshot("old-1").await.expect("load"),
            Some(saved)
        );
        store.close().await;

        let conn = raw(dir.path());
        assert_eq!(stored_schema_version(&conn), SCHEMA_VERSION.to_string());
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("list indexes");
        // Version 4: the log has no index of its own; the index database
        // holds every event.
        assert!(indexes.is_empty(), "{indexes:?}");
        let index = rusqlite::Connection::open(dir.path().join(crate::store::embedded::INDEX_FILE))
            .expect("the index database");
        let indexed: i64 = index
            .query_row("SELECT count(*) FROM stream_index", [], |r| r.get(0))
            .expect("count");
        assert_eq!(indexed, 3);
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        EmbeddedStore::open(dir.path())
            .await
            .expect("open")
            .close()
            .await;
        raw(dir.path())
            .execute(
                "UPDATE rehydra_meta SET value = '99' WHERE key = 'schema_version'",
                [],
            )
            .expect("bump version");
        let message = error_text(EmbeddedStore::open(dir.path()).await);
        assert!(message.contains("newer rehydra"), "{message}");
        assert!(message.contains("99"), "{message}");
    }

    #[tokio::test]
    async fn a_foreign_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        raw(dir.path())
            .execute_batch("CREATE TABLE something_else (x INTEGER)")
            .expect("foreign table");
        let message = error_text(EmbeddedStore::open(dir.path()).await);
        assert!(message.contains("not a rehydra event store"), "{message}");

        let other = tempfile::tempdir().expect("tempdir");
        std::fs::write(other.path().join(DB_FILE), vec![b'x'; 4096]).expect("junk");
        let message = error_text(EmbeddedStore::open(other.path()).await);
        assert!(
            message.contains("not a usable SQLite database"),
            "{message}"
        );
    }
}
