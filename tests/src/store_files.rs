//! Checks of an embedded store's files made while no process has the store
//! open (right after a `kill -9`), for the crash loops (`crash_loop.rs`
//! through the binary, `store_crash_loop.rs` through the store's API).

use std::path::Path;

/// Checks the embedded store's files in `dir` right after a kill, before
/// anything opens the store again: the log's integrity, positions and each
/// stream's versions without gaps, no event id twice, and the index
/// database against the log. `kill` numbers the round in failure messages.
pub fn check_store_file(dir: &Path, kill: usize) {
    let db = rehydra::store::embedded::DB_FILE;
    // Read-write only so that SQLite may rebuild its WAL index after the
    // crash; nothing is written.
    let conn = rusqlite::Connection::open(dir.join(db)).expect("the store's database opens");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("an integrity check");
    assert_eq!(integrity, "ok", "kill {kill}: tables and indexes disagree");
    let (count, first, last, ids): (i64, i64, i64, i64) = conn
        .query_row(
            "SELECT count(*), COALESCE(min(position), 1), COALESCE(max(position), 0), \
             count(DISTINCT event_id) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("the positions");
    assert_eq!(
        (first, last - first + 1),
        (1, count),
        "kill {kill}: positions have gaps"
    );
    assert_eq!(ids, count, "kill {kill}: an event id stored twice");
    let gaps: i64 = conn
        .query_row(
            "SELECT count(*) FROM (SELECT stream FROM events GROUP BY stream \
             HAVING min(version) <> 1 OR max(version) <> count(*))",
            [],
            |r| r.get(0),
        )
        .expect("the versions");
    assert_eq!(gaps, 0, "kill {kill}: a stream's versions have gaps");
    check_index_file(dir, &conn, last, kill);
}

/// The index database right after a kill: consistent with the log, and
/// its checkpoint never ahead of it. (It may be behind: the catch-up at
/// open indexes the rest.)
fn check_index_file(dir: &Path, log: &rusqlite::Connection, log_head: i64, kill: usize) {
    let path = dir.join(rehydra::store::embedded::INDEX_FILE);
    if !path.exists() {
        return; // killed before the first open made it
    }
    let index = rusqlite::Connection::open(&path).expect("the index database opens");
    let integrity: String = index
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("an integrity check");
    assert_eq!(
        integrity, "ok",
        "kill {kill}: the index database is damaged"
    );
    let checkpoint: i64 = index
        .query_row("SELECT indexed_up_to FROM index_state", [], |r| r.get(0))
        .expect("the checkpoint");
    assert!(
        checkpoint <= log_head,
        "kill {kill}: the index claims position {checkpoint}, the log ends at {log_head}"
    );
    // Each index holds every position up to the checkpoint, once, and
    // nothing above it.
    for table in ["stream_index", "event_id_index"] {
        let (count, distinct, max): (i64, i64, i64) = index
            .query_row(
                &format!(
                    "SELECT count(*), count(DISTINCT position), COALESCE(max(position), 0) \
                     FROM {table}"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("the index's positions");
        assert_eq!(
            (count, distinct, max),
            (checkpoint, checkpoint, checkpoint),
            "kill {kill}: {table} does not hold exactly the positions up to {checkpoint}"
        );
    }
    // And each entry says what the log holds at its position.
    log.execute("ATTACH DATABASE ?1 AS idx", [path.to_string_lossy()])
        .expect("attach the index");
    let agreeing: i64 = log
        .query_row(
            "SELECT count(*) FROM idx.stream_index i JOIN events e ON e.position = i.position \
             WHERE e.stream = i.stream AND e.version = i.version",
            [],
            |r| r.get(0),
        )
        .expect("the stream index against the log");
    assert_eq!(
        agreeing, checkpoint,
        "kill {kill}: the stream index disagrees with the log"
    );
    let mut by_id = log
        .prepare(
            "SELECT x.id_key, x.position, e.event_id FROM idx.event_id_index x \
             LEFT JOIN events e ON e.position = x.position",
        )
        .expect("select");
    let rows = by_id
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })
        .expect("rows");
    for row in rows {
        let (key, position, id) = row.expect("row");
        let logged_key = id
            .as_deref()
            .and_then(|id| id.get(..8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(i64::from_be_bytes);
        assert_eq!(
            logged_key,
            Some(key),
            "kill {kill}: the event-id index disagrees with the log at {position}"
        );
    }
    drop(by_id);
    log.execute_batch("DETACH DATABASE idx")
        .expect("detach the index");
}
