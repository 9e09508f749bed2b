//! The embedded store's SQLite schema: the tables a new database gets, the
//! version an existing one must have, and the migrations between versions.

use std::path::Path;

use anyhow::{Context, bail};
use rusqlite::{Connection, OptionalExtension};

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

/// Creates the schema in a new database, checks the version of an existing
/// one, and is where later migrations go.
pub(super) fn migrate(conn: &Connection, db_path: &Path) -> anyhow::Result<()> {
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
    tx.execute_batch(CREATE_SNAPSHOTS)?;
    tx.execute(
        "INSERT INTO rehydra_meta (key, value) VALUES ('schema_version', ?1)",
        [SCHEMA_VERSION.to_string()],
    )?;
    tx.commit()?;
    Ok(())
}
