//! The index database (`index.sqlite3`): where an event is found by
//! `(stream, version)` and by event id, written off the commit path.
//!
//! The log (`events` in `events.sqlite3`) is the truth; this file is
//! derived from it and can always be rebuilt from it. The indexer thread
//! ([`super::indexer`]) writes the events the writer committed, once they
//! are durable, in large transactions of its own, each with its
//! checkpoint: "every position up to P is indexed". Those transactions are
//! never synced on their own; after a crash that lost some, the catch-up at
//! open indexes the log from the checkpoint on. A separate file, so that
//! indexing never holds the log's write lock: the writer keeps committing
//! while the indexer works.
//!
//! Invariants:
//! - The checkpoint is never ahead of the log: only durable events are
//!   indexed, and an index that claims more than the log holds, or was made
//!   from another log, is rebuilt at open rather than trusted.
//! - Nothing waits for the index: what it does not hold yet is in the
//!   tail ([`super::tail`]).
//!
//! The event-id index is keyed by the id's first 64 bits (a third of the
//! bytes of the whole id); a key can match more than one event, so every
//! hit is confirmed against the log.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use uuid::Uuid;

use super::BUSY_TIMEOUT;
use super::rows::{from_sql_int, sql_error, to_sql_int, to_sql_limit};
use super::tail::{Located, TailEvent};
use crate::store::StoreError;

/// The index database's file name inside the data directory.
pub const INDEX_FILE: &str = "index.sqlite3";
/// The layout of the index database this build writes; another one is
/// rebuilt from the log, which costs time but never data.
const INDEX_FORMAT: i64 = 1;
/// The most events one index transaction writes.
pub(super) const INDEX_MAX_BATCH: usize = 65_536;
/// The index connection's page cache, in KiB (SQLite's negative form):
/// large enough to hold the pages one index transaction changes.
const INDEX_CACHE_KIB: i64 = 65_536;
/// Catch-up at open logs progress every this many events.
const PROGRESS_EVERY: u64 = 1_000_000;

/// The 64-bit key of an event id in the event-id index.
pub(super) fn id_key(id: &Uuid) -> i64 {
    let bytes = id.as_bytes();
    i64::from_be_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

fn open_connection(path: &Path, flags: OpenFlags) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("cannot open the index {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// A read-only connection to the index database of `dir`.
pub(super) fn open_reader(dir: &Path) -> anyhow::Result<Connection> {
    open_connection(&dir.join(INDEX_FILE), OpenFlags::SQLITE_OPEN_READ_ONLY)
}

/// Opens (creating it if needed) the index database of `dir`, whose log is
/// `log` with its last event at `log_head`, and indexes whatever of the log
/// it does not hold yet. Returns the indexer's connection; everything up
/// to `log_head` is indexed then.
///
/// `store_id` names the log; an index made from another log (a database
/// file restored beside a newer index) or claiming more than the log holds
/// is rebuilt from scratch, with a warning.
pub(super) fn open_index(
    dir: &Path,
    store_id: &str,
    log: &Connection,
    log_head: u64,
) -> anyhow::Result<Connection> {
    let path = dir.join(INDEX_FILE);
    let conn = open_connection(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    )?;
    let not_usable = || {
        format!(
            "{} is not a usable index database: delete it (rehydra rebuilds it from the log)",
            path.display()
        )
    };
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .with_context(not_usable)?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "cannot switch {} to WAL mode (it stayed in {mode:?} mode)",
            path.display()
        );
    }
    // NORMAL: an index transaction is not synced on its own; losing one in
    // a crash costs a catch-up from the log, never data.
    conn.execute_batch(&format!(
        "PRAGMA synchronous=NORMAL;
         PRAGMA cache_size=-{INDEX_CACHE_KIB};
         PRAGMA journal_size_limit=67108864;"
    ))?;
    create_tables(&conn).with_context(not_usable)?;

    let state = read_state(&conn).with_context(not_usable)?;
    let indexed = match state {
        Some(state) if state.format != INDEX_FORMAT => {
            tracing::warn!(path = %path.display(), format = state.format, "the index has another layout; rebuilding it from the log");
            reset(&conn, store_id)?
        }
        Some(state) if state.store_id != store_id => {
            tracing::warn!(path = %path.display(), "the index was made from another event log; rebuilding it from the log");
            reset(&conn, store_id)?
        }
        Some(state) if !matches_log(log, &state)? => {
            tracing::warn!(
                path = %path.display(),
                indexed_up_to = state.indexed_up_to,
                log_head,
                "the index holds events the log does not (was the database restored from a \
                 backup?); rebuilding it from the log"
            );
            reset(&conn, store_id)?
        }
        Some(state) => state.indexed_up_to,
        None => reset(&conn, store_id)?,
    };
    catch_up(&conn, log, indexed, log_head, &path)?;
    Ok(conn)
}

fn create_tables(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS index_state (
             only          INTEGER PRIMARY KEY CHECK (only = 1),
             format        INTEGER NOT NULL,
             store_id      TEXT NOT NULL,
             indexed_up_to INTEGER NOT NULL,
             last_event_id BLOB
         );
         CREATE TABLE IF NOT EXISTS stream_index (
             stream   TEXT NOT NULL,
             version  INTEGER NOT NULL,
             position INTEGER NOT NULL,
             PRIMARY KEY (stream, version)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS event_id_index (
             id_key   INTEGER NOT NULL,
             position INTEGER NOT NULL,
             PRIMARY KEY (id_key, position)
         ) WITHOUT ROWID;",
    )
}

struct State {
    format: i64,
    store_id: String,
    indexed_up_to: u64,
    last_event_id: Option<Vec<u8>>,
}

fn read_state(conn: &Connection) -> anyhow::Result<Option<State>> {
    let row = conn
        .query_row(
            "SELECT format, store_id, indexed_up_to, last_event_id FROM index_state",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((format, store_id, indexed_up_to, last_event_id)) = row else {
        return Ok(None);
    };
    Ok(Some(State {
        format,
        store_id,
        indexed_up_to: u64::try_from(indexed_up_to).context("a negative checkpoint")?,
        last_event_id,
    }))
}

/// Whether the log holds, at the index's checkpoint, the event the index
/// says it indexed last.
fn matches_log(log: &Connection, state: &State) -> anyhow::Result<bool> {
    if state.indexed_up_to == 0 {
        return Ok(true);
    }
    let at: Option<Vec<u8>> = log
        .query_row(
            "SELECT event_id FROM events WHERE position = ?1",
            [to_sql_int(state.indexed_up_to)],
            |r| r.get(0),
        )
        .optional()?;
    Ok(at.is_some() && at == state.last_event_id)
}

/// Empties the index; returns its checkpoint, 0.
fn reset(conn: &Connection, store_id: &str) -> anyhow::Result<u64> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(
        "DELETE FROM stream_index; DELETE FROM event_id_index; DELETE FROM index_state;",
    )?;
    tx.execute(
        "INSERT INTO index_state (only, format, store_id, indexed_up_to, last_event_id)
         VALUES (1, ?1, ?2, 0, NULL)",
        params![INDEX_FORMAT, store_id],
    )?;
    tx.commit()?;
    Ok(0)
}

/// Indexes the log from `indexed` to `log_head`, in transactions of
/// [`INDEX_MAX_BATCH`] events each (so a crash midway keeps what was done),
/// with progress in the log when there is much to do.
fn catch_up(
    conn: &Connection,
    log: &Connection,
    mut indexed: u64,
    log_head: u64,
    path: &Path,
) -> anyhow::Result<()> {
    let total = log_head.saturating_sub(indexed);
    if total == 0 {
        return Ok(());
    }
    let began = Instant::now();
    let loud = total >= PROGRESS_EVERY;
    if loud {
        tracing::info!(path = %path.display(), events = total, "indexing the event log (after an upgrade, a crash or a deleted index); the store opens when it is done");
    }
    let mut done = 0u64;
    let mut next_report = PROGRESS_EVERY;
    let mut select = log.prepare(
        "SELECT position, stream, version, event_id FROM events
         WHERE position > ?1 ORDER BY position LIMIT ?2",
    )?;
    loop {
        let events = select
            .query_map(
                params![to_sql_int(indexed), to_sql_limit(INDEX_MAX_BATCH)],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )?
            .map(|row| {
                let (position, stream, version, id) = row?;
                Ok(TailEvent {
                    position: from_sql_int(position, "position")?,
                    stream: Arc::from(stream),
                    version: from_sql_int(version, "version")?,
                    event_id: Uuid::from_slice(&id)
                        .map_err(|e| StoreError::Corrupt(format!("unreadable event_id: {e}")))?,
                })
            })
            .collect::<anyhow::Result<Vec<TailEvent>>>()?;
        let Some(last) = events.last() else {
            break;
        };
        indexed = last.position;
        write(conn, &events)
            .with_context(|| format!("cannot write the index {}", path.display()))?;
        done += events.len() as u64;
        if loud && done >= next_report {
            next_report += PROGRESS_EVERY;
            tracing::info!(path = %path.display(), indexed = done, of = total, "indexing the event log");
        }
    }
    tracing::info!(
        path = %path.display(),
        events = done,
        duration_ms = began.elapsed().as_millis() as u64,
        "event log indexed"
    );
    Ok(())
}

/// Writes `events` (in position order, each above the checkpoint) to the
/// index, with the checkpoint raised to the last one, in one transaction.
pub(super) fn write(conn: &Connection, events: &[TailEvent]) -> Result<(), StoreError> {
    let Some(last) = events.last() else {
        return Ok(());
    };
    let tx = conn.unchecked_transaction().map_err(sql_error)?;
    {
        let mut by_stream = tx
            .prepare_cached(
                "INSERT INTO stream_index (stream, version, position) VALUES (?1, ?2, ?3)",
            )
            .map_err(sql_error)?;
        let mut by_id = tx
            .prepare_cached("INSERT INTO event_id_index (id_key, position) VALUES (?1, ?2)")
            .map_err(sql_error)?;
        for event in events {
            let position = to_sql_int(event.position);
            by_stream
                .execute(params![&*event.stream, to_sql_int(event.version), position])
                .map_err(|e| duplicate_or(e, event))?;
            by_id
                .execute(params![id_key(&event.event_id), position])
                .map_err(sql_error)?;
        }
        tx.prepare_cached("UPDATE index_state SET indexed_up_to = ?1, last_event_id = ?2")
            .map_err(sql_error)?
            .execute(params![
                to_sql_int(last.position),
                last.event_id.as_bytes().as_slice()
            ])
            .map_err(sql_error)?;
    }
    tx.commit().map_err(sql_error)
}

/// A `(stream, version)` indexed twice means the log holds two events with
/// one version: damage no retry repairs.
fn duplicate_or(e: rusqlite::Error, event: &TailEvent) -> StoreError {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
        StoreError::Corrupt(format!(
            "the event log holds version {} of stream {:?} twice (again at position {})",
            event.version, event.stream, event.position
        ))
    } else {
        sql_error(e)
    }
}

/// The stream's last indexed event at or below position `up_to`:
/// (version, position).
pub(super) fn head(
    index: &Connection,
    stream: &str,
    up_to: u64,
) -> Result<Option<(u64, u64)>, StoreError> {
    let head = index
        .prepare_cached(
            "SELECT version, position FROM stream_index WHERE stream = ?1 AND position <= ?2 \
             ORDER BY version DESC LIMIT 1",
        )
        .map_err(sql_error)?
        .query_row(params![stream, to_sql_int(up_to)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()
        .map_err(sql_error)?;
    head.map(version_position).transpose()
}

/// The stream's indexed events from `from_version` on, at or below position
/// `up_to`, at most `limit`: (version, position), in version order.
pub(super) fn stream_from(
    index: &Connection,
    stream: &str,
    from_version: u64,
    up_to: u64,
    limit: usize,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let mut stmt = index
        .prepare_cached(
            "SELECT version, position FROM stream_index
             WHERE stream = ?1 AND version >= ?2 AND position <= ?3
             ORDER BY version LIMIT ?4",
        )
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(
            params![
                stream,
                to_sql_int(from_version),
                to_sql_int(up_to),
                to_sql_limit(limit)
            ],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .map_err(sql_error)?;
    rows.map(|row| version_position(row.map_err(sql_error)?))
        .collect()
}

/// A `(version, position)` row of the stream index, as the store's numbers.
fn version_position((version, position): (i64, i64)) -> Result<(u64, u64), StoreError> {
    Ok((
        from_sql_int(version, "version")?,
        from_sql_int(position, "position")?,
    ))
}

/// Where the indexed event with `id` is, at or below position `up_to`,
/// confirmed against the log `log`.
pub(super) fn locate(
    index: &Connection,
    log: &Connection,
    id: &Uuid,
    up_to: u64,
) -> Result<Option<Located>, StoreError> {
    let mut candidates = index
        .prepare_cached("SELECT position FROM event_id_index WHERE id_key = ?1 AND position <= ?2")
        .map_err(sql_error)?;
    let positions = candidates
        .query_map(params![id_key(id), to_sql_int(up_to)], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(sql_error)?
        .collect::<Result<Vec<i64>, _>>()
        .map_err(sql_error)?;
    for position in positions {
        let row = log
            .prepare_cached("SELECT stream, version, event_id FROM events WHERE position = ?1")
            .map_err(sql_error)?
            .query_row([position], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .optional()
            .map_err(sql_error)?;
        let Some((stream, version, event_id)) = row else {
            return Err(StoreError::Corrupt(format!(
                "the index points at position {position}, which the log does not hold: delete \
                 {INDEX_FILE} (rehydra rebuilds it from the log)"
            )));
        };
        if event_id.as_slice() == id.as_bytes() {
            return Ok(Some(Located {
                stream: Arc::from(stream),
                version: from_sql_int(version, "version")?,
                position: from_sql_int(position, "position")?,
            }));
        }
    }
    Ok(None)
}
