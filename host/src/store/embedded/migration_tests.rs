//! A store written by the last build with schema version 3 (a real file,
//! `testdata/schema3.sqlite3`: 10 bank accounts opened and deposited to
//! over HTTP, then a clean stop) opens as version 4: its events are all
//! there, found by stream and by id through the index database built from
//! the log, and the rules that indexes enforced still hold.

use super::{DB_FILE, EmbeddedStore, INDEX_FILE, SCHEMA_VERSION};
use crate::store::conformance::event;
use crate::store::{EventStore, ExpectedVersion, StoreError};
use rusqlite::Connection;

const SCHEMA_3: &[u8] = include_bytes!("testdata/schema3.sqlite3");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_store_is_rewritten_and_indexed() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(DB_FILE), SCHEMA_3).expect("the version 3 file");
    let before: Vec<(i64, String, i64, Vec<u8>, String)> = {
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
        let mut stmt = conn
            .prepare("SELECT position, stream, version, event_id, message_id FROM events ORDER BY position")
            .expect("select");
        stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows")
    };
    assert_eq!(before.len(), 61, "the fixture's events");

    let store = EmbeddedStore::open(dir.path()).await.expect("open");
    // Every event, in the same order, at the same place.
    let all = store.read_all(1, 1000).await.expect("read all");
    assert_eq!(all.len(), before.len());
    for (event, (position, stream, version, id, message_id)) in all.iter().zip(&before) {
        assert_eq!(event.position as i64, *position);
        assert_eq!(&event.stream, stream);
        assert_eq!(event.version as i64, *version);
        assert_eq!(event.event_id.as_bytes().as_slice(), id.as_slice());
        assert_eq!(&event.message_id, message_id);
    }
    // By stream, through the index database.
    let account = "bank_account-acc-3";
    let stream = store.read_stream(account, 1, 100).await.expect("read");
    assert_eq!(
        stream.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(store.stream_version(account).await.expect("version"), 7);
    // By id: the command sent with an idempotency key.
    let keyed = all.last().expect("the last event");
    assert_eq!(keyed.message_id, "fixture-key-1");
    let found = store
        .find_command_events(account, keyed.event_id)
        .await
        .expect("find");
    assert_eq!(found, vec![keyed.clone()]);
    // The rules the old indexes enforced: a retry is recognised, a stale
    // expectation refused, an id of another stream refused.
    let retry = crate::store::EventData {
        event_id: keyed.event_id,
        event_type: keyed.event_type.clone(),
        data: keyed.data.clone(),
        metadata: keyed.metadata.clone(),
        message_id: keyed.message_id.clone(),
    };
    let again = store
        .append(account, ExpectedVersion::Exact(6), vec![retry.clone()])
        .await
        .expect("a retry");
    assert_eq!((again.version, again.position), (7, 61));
    let stale = store
        .append(account, ExpectedVersion::Exact(6), vec![event(1)])
        .await;
    assert!(matches!(
        stale,
        Err(StoreError::WrongExpectedVersion { actual: 7, .. })
    ));
    let elsewhere = store
        .append("bank_account-acc-4", ExpectedVersion::Any, vec![retry])
        .await;
    assert!(
        matches!(elsewhere, Err(StoreError::Corrupt(_))),
        "{elsewhere:?}"
    );
    let next = store
        .append(account, ExpectedVersion::Exact(7), vec![event(2)])
        .await
        .expect("append after the migration");
    assert_eq!((next.version, next.position), (8, 62));
    store.close().await;

    let conn = Connection::open(dir.path().join(DB_FILE)).expect("open");
    let version: String = conn
        .query_row(
            "SELECT value FROM rehydra_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .expect("version");
    assert_eq!(version, SCHEMA_VERSION.to_string());
    let indexes: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index'",
            [],
            |r| r.get(0),
        )
        .expect("indexes");
    // Only the automatic ones of rehydra_meta's and snapshots' keys.
    assert_eq!(indexes, 2, "the log lost its indexes");
    let index = Connection::open(dir.path().join(INDEX_FILE)).expect("the index database");
    let (entries, checkpoint): (i64, i64) = index
        .query_row(
            "SELECT (SELECT count(*) FROM stream_index), indexed_up_to FROM index_state",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("index state");
    assert_eq!(
        (entries, checkpoint),
        (62, 62),
        "every event indexed at close"
    );
}
