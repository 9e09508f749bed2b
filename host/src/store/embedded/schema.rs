//! The embedded store's SQLite schema: the tables a new database gets, the
//! version an existing one must have, and the migrations between versions.
//!
//! This is the log's database (`events.sqlite3`); the indexes live in
//! their own file ([`super::index`]), which is derived from the log.

use std::path::Path;

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension};
use uuid::Uuid;

use super::SCHEMA_VERSION;

/// The snapshots table (schema version 3): one row per stream, the newest
/// state a host saved (see [`crate::store::EventStore::save_snapshot`]). A
/// table of its own, so that the events table and its indexes are written
/// only by appends.
const CREATE_SNAPSHOTS: &str = "CREATE TABLE snapshots (
         stream   TEXT PRIMARY KEY,
         state_schema INTEGER NOT NULL,
         version  INTEGER NOT NULL,
         event_id BLOB NOT NULL,
         state    BLOB NOT NULL
     );";

/// The log (schema version 4): events in position order, nothing else. No
/// secondary index and no uniqueness rule, so that an append writes one
/// row at the table's end; the writer checks versions and ids itself.
const CREATE_EVENTS: &str = "CREATE TABLE events (
         position   INTEGER PRIMARY KEY,
         stream     TEXT NOT NULL,
         version    INTEGER NOT NULL,
         event_id   BLOB NOT NULL,
         event_type TEXT NOT NULL,
         data       BLOB NOT NULL,
         metadata   BLOB NOT NULL,
         message_id TEXT NOT NULL
     );";

/// Events copied per statement when a version-3 log is rewritten, so that
/// progress can be reported.
const MIGRATION_CHUNK: i64 = 1_000_000;

/// Creates the schema in a new database, checks the version of an existing
/// one and migrates an older one; returns the store's id, which ties the
/// index database to this log.
pub(super) fn migrate(conn: &Connection, db_path: &Path) -> anyhow::Result<String> {
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
        if version < 3 {
            tx.execute_batch(CREATE_SNAPSHOTS)?;
        }
        if version < 4 {
            rewrite_log(&tx, db_path).with_context(|| {
                format!(
                    "cannot convert {} to schema version 4 (the conversion needs free space \
                     about twice the file's size on its file system); the store is unchanged",
                    db_path.display()
                )
            })?;
            tx.execute(
                "INSERT INTO rehydra_meta (key, value) VALUES ('store_id', ?1)",
                [Uuid::new_v4().to_string()],
            )?;
        }
        let store_id = store_id(&tx, db_path)?;
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
        return Ok(store_id);
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
         );",
    )?;
    tx.execute_batch(CREATE_EVENTS)?;
    tx.execute_batch(CREATE_SNAPSHOTS)?;
    let store_id = Uuid::new_v4().to_string();
    tx.execute(
        "INSERT INTO rehydra_meta (key, value) VALUES ('schema_version', ?1), ('store_id', ?2)",
        [SCHEMA_VERSION.to_string(), store_id.clone()],
    )?;
    tx.commit()?;
    Ok(store_id)
}

fn store_id(conn: &Connection, db_path: &Path) -> anyhow::Result<String> {
    conn.query_row(
        "SELECT value FROM rehydra_meta WHERE key = 'store_id'",
        [],
        |r| r.get(0),
    )
    .optional()?
    .with_context(|| {
        format!(
            "{} has no store id in rehydra_meta; it is damaged or was not written by rehydra",
            db_path.display()
        )
    })
}

/// Rewrites a version-3 log, whose events table carries a `(stream,
/// version)` uniqueness rule and an event-id index, as a table without
/// either (the index database is built from it when the store opens).
/// Inside the caller's transaction: a crash midway leaves version 3.
fn rewrite_log(conn: &Connection, db_path: &Path) -> anyhow::Result<()> {
    let (count, last): (i64, i64) = conn.query_row(
        "SELECT count(*), COALESCE(MAX(position), 0) FROM events",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    tracing::info!(path = %db_path.display(), events = count, "rewriting the event log without its indexes (schema version 4); the store opens when it is done");
    conn.execute_batch("ALTER TABLE events RENAME TO events_v3")?;
    conn.execute_batch(CREATE_EVENTS)?;
    let mut from = 0i64;
    while from < last {
        let to = from.saturating_add(MIGRATION_CHUNK);
        conn.execute(
            "INSERT INTO events (position, stream, version, event_id, event_type, data, metadata, message_id)
             SELECT position, stream, version, event_id, event_type, data, metadata, message_id
             FROM events_v3 WHERE position > ?1 AND position <= ?2 ORDER BY position",
            [from, to],
        )?;
        from = to;
        if from < last {
            tracing::info!(path = %db_path.display(), up_to_position = from, of = last, "rewriting the event log");
        }
    }
    conn.execute_batch("DROP TABLE events_v3")?;
    Ok(())
}
