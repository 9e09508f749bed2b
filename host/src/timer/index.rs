//! The timer index: the pending timers, derived from the log's `$timers`
//! events, in a SQLite file of the host's (`timers.sqlite3` beside an
//! embedded store; see `--timer-index`).
//!
//! The same file keeps the process managers' checkpoints and parked
//! events ([`super::process_state`]): state derived from the log too.
//!
//! One table holds each pending timer with its due time (indexed, so the
//! next due timers are found without reading the others) and one row holds
//! the log position the index has read up to. Start-up reads that row and
//! nothing per timer, so a million pending timers cost their file, not
//! start-up time or memory. Because the index is derived, it can be
//! deleted: the next start rebuilds it from the log.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::event::{StoredChange, StoredTimer, unix_ms};
use crate::plugin::AggregateRef;

/// The layout of the index file; another is rebuilt from the log.
const FORMAT: i64 = 1;

/// Why the timer index failed.
#[derive(Debug, thiserror::Error)]
pub enum TimerIndexError {
    /// The file cannot be opened or set up.
    #[error(
        "cannot open the timer index {path}: {source}; check that its directory exists and is \
         writable, or pass --timer-index PATH"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A statement failed.
    #[error("the timer index failed while {doing}: {source}")]
    Sqlite {
        /// What it was doing.
        doing: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
}

/// A pending timer, as `GET /v1/timers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingTimer {
    /// The timer's id.
    pub id: String,
    /// Its key among the timers of the aggregate that scheduled it.
    pub key: String,
    /// The aggregate that scheduled it.
    pub scheduled_by: AggregateRef,
    /// The aggregate the command is for.
    pub target: AggregateRef,
    /// The command's name.
    pub command: String,
    /// The command's payload.
    pub data: serde_json::Value,
    /// When it is due, RFC 3339 UTC.
    pub due: String,
    /// Failed attempts to send it so far (the store was unavailable, the
    /// target's plugin was not loaded, ...).
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it is tried again, after a failed attempt (RFC 3339 UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    /// The id of the `$timers` event that scheduled it: the fired
    /// command's causation id.
    pub scheduled_in: String,
    /// The correlation id of the command that scheduled it, which the
    /// fired command carries on.
    pub correlation_id: String,
}

/// Which pending timers to list.
#[derive(Debug, Clone, Default)]
pub struct TimerQuery {
    /// Only the timers this aggregate scheduled or that are for it.
    pub aggregate: Option<AggregateRef>,
    /// The most to return (in the order they will be sent).
    pub limit: usize,
}

/// A change the index takes from the log.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexChange {
    /// A `$timers` event's change, made by `source` in event `event_id`.
    Timers {
        /// The aggregate that made it.
        source: AggregateRef,
        /// The `$timers` event's id.
        event_id: String,
        /// The correlation id of the command that made it, which the
        /// timer's command carries on.
        correlation_id: String,
        /// The `$timers` event's log position and the change's place in it:
        /// timers due at the same time fire in this order.
        order: (u64, u32),
        /// The change.
        change: Box<StoredChange>,
    },
    /// An event a timer's command stored: the timer has fired.
    Fired {
        /// The timer's id.
        id: String,
    },
}

/// The index file behind one lock (its statements take microseconds, a
/// page of the log a few milliseconds).
pub struct TimerIndex {
    conn: Mutex<Connection>,
    path: Option<PathBuf>,
    /// The log position up to which every change is in the index (read
    /// by the runner, which may be ahead of the stored checkpoint).
    read_up_to: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for TimerIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerIndex")
            .field("path", &self.path)
            .finish()
    }
}

pub(super) fn sql(doing: &'static str) -> impl FnOnce(rusqlite::Error) -> TimerIndexError {
    move |source| TimerIndexError::Sqlite { doing, source }
}

impl TimerIndex {
    /// Opens (or creates) the index at `path`, or one in memory for `None`
    /// (rebuilt from the log at every start). An index of another layout
    /// is emptied, so that it is rebuilt from the log.
    pub fn open(path: Option<&Path>) -> Result<TimerIndex, TimerIndexError> {
        let (conn, shown) = match path {
            Some(p) => (Connection::open(p), p.display().to_string()),
            None => (Connection::open_in_memory(), ":memory:".to_string()),
        };
        let open_err = |source| TimerIndexError::Open {
            path: PathBuf::from(&shown),
            source,
        };
        let conn = conn.map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        // The index is derived from the log: a write lost in a crash is
        // read from the log again, so it is never synced on its own.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS timer_state (
                 one INTEGER PRIMARY KEY CHECK (one = 1),
                 format INTEGER NOT NULL,
                 checkpoint INTEGER NOT NULL,
                 pending INTEGER NOT NULL DEFAULT 0
             );",
        )
        .map_err(open_err)?;
        let format: Option<i64> = conn
            .query_row("SELECT format FROM timer_state", [], |r| r.get(0))
            .optional()
            .map_err(open_err)?;
        if format.is_some_and(|f| f != FORMAT) {
            tracing::warn!(
                file = %shown,
                "the timer index has another layout; rebuilding it from the log"
            );
            conn.execute_batch(
                "DROP TABLE IF EXISTS timers; DROP TABLE IF EXISTS process_checkpoints; \
                 DROP TABLE IF EXISTS parked_events; DROP TABLE IF EXISTS finished_instances; \
                 DELETE FROM timer_state;",
            )
            .map_err(open_err)?;
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS timers (
                 id TEXT PRIMARY KEY,
                 source_type TEXT NOT NULL,
                 source_id TEXT NOT NULL,
                 key TEXT NOT NULL,
                 target_type TEXT NOT NULL,
                 target_id TEXT NOT NULL,
                 command TEXT NOT NULL,
                 data TEXT NOT NULL,
                 due TEXT NOT NULL,
                 due_ms INTEGER NOT NULL,
                 scheduled_in TEXT NOT NULL,
                 correlation_id TEXT NOT NULL,
                 scheduled_position INTEGER NOT NULL,
                 change_index INTEGER NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 last_error TEXT,
                 next_attempt_ms INTEGER NOT NULL,
                 UNIQUE (source_type, source_id, key)
             );
             CREATE INDEX IF NOT EXISTS timers_by_next_attempt
                 ON timers (next_attempt_ms, scheduled_position, change_index);
             CREATE INDEX IF NOT EXISTS timers_by_target ON timers (target_type, target_id);
             CREATE TABLE IF NOT EXISTS process_checkpoints (
                 process TEXT PRIMARY KEY,
                 position INTEGER NOT NULL,
                 first_seen_at INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS finished_instances (
                 process TEXT NOT NULL,
                 instance TEXT NOT NULL,
                 PRIMARY KEY (process, instance)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS parked_events (
                 process TEXT NOT NULL,
                 position INTEGER NOT NULL,
                 event_id TEXT NOT NULL,
                 stream TEXT NOT NULL,
                 version INTEGER NOT NULL,
                 event_type TEXT NOT NULL,
                 instance TEXT NOT NULL,
                 command TEXT NOT NULL,
                 attempts INTEGER NOT NULL,
                 error TEXT NOT NULL,
                 parked_at TEXT NOT NULL,
                 PRIMARY KEY (process, position, event_id)
             );",
        )
        .map_err(open_err)?;
        conn.execute(
            "INSERT OR IGNORE INTO timer_state (one, format, checkpoint) VALUES (1, ?1, 0)",
            [FORMAT],
        )
        .map_err(open_err)?;
        Ok(TimerIndex {
            conn: Mutex::new(conn),
            path: path.map(Path::to_path_buf),
            read_up_to: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Records that every change up to log position `position` is in the
    /// index (the runner's catch-up calls it).
    pub fn mark_read(&self, position: u64) {
        self.read_up_to.send_if_modified(|p| {
            let moved = position > *p;
            *p = (*p).max(position);
            moved
        });
    }

    /// The log position up to which every change is in the index.
    pub fn read_up_to(&self) -> u64 {
        *self.read_up_to.borrow()
    }

    /// Waits until the index holds every change up to log position
    /// `position`, for at most `limit`; whether it does.
    pub async fn wait_until_read(&self, position: u64, limit: std::time::Duration) -> bool {
        let mut rx = self.read_up_to.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|p| *p >= position))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The file, if the index has one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (a
        // transaction not committed is rolled back when it is dropped).
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The last log position the index has read.
    pub fn checkpoint(&self) -> Result<u64, TimerIndexError> {
        let n: i64 = self
            .lock()
            .query_row("SELECT checkpoint FROM timer_state", [], |r| r.get(0))
            .map_err(sql("reading its checkpoint"))?;
        Ok(n as u64)
    }

    /// Forgets every timer and the checkpoint, so that the index is rebuilt
    /// from the start of the log.
    pub fn reset(&self) -> Result<(), TimerIndexError> {
        self.lock()
            .execute_batch(
                "BEGIN; DELETE FROM timers; UPDATE timer_state SET checkpoint = 0; COMMIT;",
            )
            .map_err(sql("emptying it"))
    }

    /// Applies changes read from the log, in log order, and moves the
    /// checkpoint to `checkpoint`, in one transaction. Callers keep a batch
    /// to a few thousand changes, so that a transaction (and the WAL it
    /// writes) stays small: re-applying changes is harmless, so a batch
    /// split over transactions needs only its last to move the checkpoint.
    pub fn apply(&self, changes: &[IndexChange], checkpoint: u64) -> Result<(), TimerIndexError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let mut pending: i64 = 0;
        for change in changes {
            match change {
                IndexChange::Timers {
                    source,
                    event_id,
                    correlation_id,
                    order,
                    change,
                } => match change.as_ref() {
                    StoredChange::Schedule(t) => {
                        pending += schedule(&tx, source, (event_id, correlation_id), *order, t)?
                    }
                    StoredChange::Cancel { key } => {
                        pending -=
                            tx.execute(
                                "DELETE FROM timers \
                                 WHERE source_type = ?1 AND source_id = ?2 AND key = ?3",
                                params![source.aggregate_type, source.id, key],
                            )
                            .map_err(sql("cancelling a timer"))? as i64;
                    }
                },
                IndexChange::Fired { id } => {
                    pending -=
                        tx.execute("DELETE FROM timers WHERE id = ?1", [id])
                            .map_err(sql("removing a fired timer"))? as i64;
                }
            }
        }
        tx.execute(
            "UPDATE timer_state SET checkpoint = ?1, pending = MAX(0, pending + ?2)",
            params![i64::try_from(checkpoint).unwrap_or(i64::MAX), pending],
        )
        .map_err(sql("moving its checkpoint"))?;
        tx.commit().map_err(sql("committing"))
    }

    /// How many timers are pending, in all (kept as a count, so that it
    /// costs nothing with a million of them).
    pub fn pending(&self) -> Result<u64, TimerIndexError> {
        let n: i64 = self
            .lock()
            .query_row("SELECT pending FROM timer_state", [], |r| r.get(0))
            .map_err(sql("counting timers"))?;
        Ok(n.max(0) as u64)
    }

    /// The keys of the timers `source` scheduled that are pending.
    pub fn pending_keys(&self, source: &AggregateRef) -> Result<Vec<String>, TimerIndexError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT key FROM timers WHERE source_type = ?1 AND source_id = ?2")
            .map_err(sql("reading an aggregate's timers"))?;
        let keys = stmt
            .query_map(params![source.aggregate_type, source.id], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(sql("reading an aggregate's timers"))?;
        Ok(keys)
    }

    /// Up to `limit` timers whose next attempt is at or before `now_ms`,
    /// the earliest first.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<PendingTimer>, TimerIndexError> {
        self.select(
            "WHERE next_attempt_ms <= ?1 \
             ORDER BY next_attempt_ms, scheduled_position, change_index LIMIT ?2",
            params![ms(now_ms), limit as i64],
        )
    }

    /// When the next timer is to be tried (Unix ms), if any is pending.
    pub fn next_attempt_ms(&self) -> Result<Option<u64>, TimerIndexError> {
        let n: Option<i64> = self
            .lock()
            .query_row("SELECT MIN(next_attempt_ms) FROM timers", [], |r| r.get(0))
            .map_err(sql("finding the next due timer"))?;
        Ok(n.map(|n| n.max(0) as u64))
    }

    /// The pending timers `query` asks for, in the order they will be sent
    /// (due time, or the next attempt after a failed one), and how many
    /// match in all.
    pub fn list(&self, query: &TimerQuery) -> Result<(Vec<PendingTimer>, u64), TimerIndexError> {
        let limit = query.limit as i64;
        let (timers, count) = match &query.aggregate {
            None => {
                let timers = self.select(NEXT_FIRST, params![limit])?;
                (timers, self.pending()? as i64)
            }
            Some(a) => {
                let filter = "WHERE (source_type = ?1 AND source_id = ?2) \
                              OR (target_type = ?1 AND target_id = ?2)";
                let timers = self.select(
                    &format!("{filter} ORDER BY next_attempt_ms, scheduled_position, change_index LIMIT ?3"),
                    params![a.aggregate_type, a.id, limit],
                )?;
                let count: i64 = self
                    .lock()
                    .query_row(
                        &format!("SELECT COUNT(*) FROM timers {filter}"),
                        params![a.aggregate_type, a.id],
                        |r| r.get(0),
                    )
                    .map_err(sql("counting timers"))?;
                (timers, count)
            }
        };
        Ok((timers, count.max(0) as u64))
    }

    /// Removes a timer whose command has an outcome.
    pub fn remove(&self, id: &str) -> Result<(), TimerIndexError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let removed = tx
            .execute("DELETE FROM timers WHERE id = ?1", [id])
            .map_err(sql("removing a fired timer"))?;
        tx.execute(
            "UPDATE timer_state SET pending = MAX(0, pending - ?1)",
            [removed as i64],
        )
        .map_err(sql("counting timers"))?;
        tx.commit().map_err(sql("committing"))
    }

    /// Records a failed attempt to send a timer's command, to be tried
    /// again at `next_ms`.
    pub fn retry_later(&self, id: &str, next_ms: u64, error: &str) -> Result<(), TimerIndexError> {
        self.lock()
            .execute(
                "UPDATE timers SET attempts = attempts + 1, last_error = ?2, next_attempt_ms = ?3 \
                 WHERE id = ?1",
                params![id, error, ms(next_ms)],
            )
            .map_err(sql("recording a failed attempt"))?;
        Ok(())
    }

    fn select(
        &self,
        rest: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<PendingTimer>, TimerIndexError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT id, key, source_type, source_id, target_type, target_id, command, data, \
                 due, attempts, last_error, next_attempt_ms, scheduled_in, correlation_id \
                 FROM timers {rest}"
            ))
            .map_err(sql("reading timers"))?;
        let rows = stmt
            .query_map(params, |r| {
                let data: String = r.get(7)?;
                let attempts: u32 = r.get(9)?;
                let next: i64 = r.get(11)?;
                Ok(PendingTimer {
                    id: r.get(0)?,
                    key: r.get(1)?,
                    scheduled_by: AggregateRef {
                        aggregate_type: r.get(2)?,
                        id: r.get(3)?,
                    },
                    target: AggregateRef {
                        aggregate_type: r.get(4)?,
                        id: r.get(5)?,
                    },
                    command: r.get(6)?,
                    data: serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
                    due: r.get(8)?,
                    attempts,
                    last_error: r.get(10)?,
                    next_attempt: (attempts > 0).then(|| {
                        let at = std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(next.max(0) as u64);
                        humantime::format_rfc3339_millis(at).to_string()
                    }),
                    scheduled_in: r.get(12)?,
                    correlation_id: r.get(13)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(sql("reading timers"))?;
        Ok(rows)
    }
}

/// The order timers are listed and sent in: by their next attempt (their
/// due time until one failed), then where they were scheduled in the log.
const NEXT_FIRST: &str = "ORDER BY next_attempt_ms, scheduled_position, change_index LIMIT ?1";

/// A Unix-ms time as SQLite's integer (times past 2^63 ms do not occur:
/// due times end in year 9999).
pub(super) fn ms(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// Inserts a scheduled timer, replacing a pending one of the same key (or
/// the same timer read again); the change in the number pending (0 or 1).
fn schedule(
    tx: &rusqlite::Transaction<'_>,
    source: &AggregateRef,
    (event_id, correlation_id): (&str, &str),
    (position, change_index): (u64, u32),
    t: &StoredTimer,
) -> Result<i64, TimerIndexError> {
    let Some(due_ms) = unix_ms(&t.due) else {
        tracing::warn!(timer = %t.id, due = %t.due, "a stored timer has a due time that does not parse; ignored");
        return Ok(0);
    };
    // The same key pending (or this very timer, read again): replaced, so
    // the number pending does not grow.
    let replaced: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM timers \
             WHERE source_type = ?1 AND source_id = ?2 AND key = ?3)",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![source.aggregate_type, source.id, t.key], |r| {
                r.get(0)
            })
        })
        .map_err(sql("replacing a timer"))?;
    let data = serde_json::to_string(&t.data).unwrap_or_else(|_| "{}".to_string());
    tx.prepare_cached(
        "INSERT OR REPLACE INTO timers (id, source_type, source_id, key, target_type, target_id, \
         command, data, due, due_ms, scheduled_in, correlation_id, scheduled_position, \
         change_index, attempts, last_error, next_attempt_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 0, NULL, ?10)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            t.id,
            source.aggregate_type,
            source.id,
            t.key,
            t.target.aggregate_type,
            t.target.id,
            t.command,
            data,
            t.due,
            ms(due_ms),
            event_id,
            correlation_id,
            ms(position),
            change_index,
        ])
    })
    .map_err(sql("scheduling a timer"))?;
    Ok(if replaced { 0 } else { 1 })
}
