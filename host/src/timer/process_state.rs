//! What the process managers keep in the timer index file: each one's
//! checkpoint (the log position it has handled, and the log's head when it
//! first ran), the events it parked, and its finished instances.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::index::{TimerIndex, TimerIndexError, ms, sql};

/// An event a process manager could not handle: its command kept
/// failing in the plugin, so it was set aside and the process manager went
/// on with the next.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedEvent {
    /// The process manager.
    pub process: String,
    /// The event's log position.
    pub position: u64,
    /// The event's id.
    pub event_id: String,
    /// Its stream.
    pub stream: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its type.
    pub event_type: String,
    /// The instance it went to.
    pub instance: String,
    /// The command that received it.
    pub command: String,
    /// How often the command was tried.
    pub attempts: u32,
    /// The last failure.
    pub error: String,
    /// When it was parked, RFC 3339 UTC.
    pub parked_at: String,
}

impl TimerIndex {
    /// Where process manager `process` has read the log up to, and the
    /// log's head when the host first ran it; `None` before that.
    pub fn process_checkpoint(&self, process: &str) -> Result<Option<(u64, u64)>, TimerIndexError> {
        let row: Option<(i64, i64)> = self
            .lock()
            .query_row(
                "SELECT position, first_seen_at FROM process_checkpoints WHERE process = ?1",
                [process],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("reading a process manager's checkpoint"))?;
        Ok(row.map(|(p, f)| (p.max(0) as u64, f.max(0) as u64)))
    }

    /// Records that process manager `process` has handled the log up to
    /// `position`; `first_seen_at` is kept from the first call.
    pub fn set_process_checkpoint(
        &self,
        process: &str,
        position: u64,
        first_seen_at: u64,
    ) -> Result<(), TimerIndexError> {
        self.lock()
            .execute(
                "INSERT INTO process_checkpoints (process, position, first_seen_at) \
                 VALUES (?1, ?2, ?3) \
                 ON CONFLICT (process) DO UPDATE SET position = excluded.position",
                params![process, ms(position), ms(first_seen_at)],
            )
            .map_err(sql("storing a process manager's checkpoint"))?;
        Ok(())
    }

    /// Starts process manager `process` again from the start of the log,
    /// first seen at `head`, forgetting its finished instances.
    pub fn set_process_checkpoint_anew(
        &self,
        process: &str,
        head: u64,
    ) -> Result<(), TimerIndexError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        tx.execute(
            "INSERT INTO process_checkpoints (process, position, first_seen_at) \
             VALUES (?1, 0, ?2) \
             ON CONFLICT (process) DO UPDATE SET position = 0, first_seen_at = excluded.first_seen_at",
            params![process, ms(head)],
        )
        .map_err(sql("resetting a process manager's checkpoint"))?;
        tx.execute(
            "DELETE FROM finished_instances WHERE process = ?1",
            [process],
        )
        .map_err(sql("resetting a process manager's checkpoint"))?;
        tx.commit().map_err(sql("committing"))
    }

    /// Records an event process manager `process` could not handle.
    pub fn park(&self, parked: &ParkedEvent) -> Result<(), TimerIndexError> {
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO parked_events (process, position, event_id, stream, \
                 version, event_type, instance, command, attempts, error, parked_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    parked.process,
                    ms(parked.position),
                    parked.event_id,
                    parked.stream,
                    ms(parked.version),
                    parked.event_type,
                    parked.instance,
                    parked.command,
                    parked.attempts,
                    parked.error,
                    parked.parked_at,
                ],
            )
            .map_err(sql("parking an event"))?;
        Ok(())
    }

    /// The events process manager `process` parked, in log order (at most
    /// `limit`), and how many there are.
    pub fn parked(
        &self,
        process: &str,
        limit: usize,
    ) -> Result<(Vec<ParkedEvent>, u64), TimerIndexError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT process, position, event_id, stream, version, event_type, instance, \
                 command, attempts, error, parked_at FROM parked_events WHERE process = ?1 \
                 ORDER BY position LIMIT ?2",
            )
            .map_err(sql("reading parked events"))?;
        let rows = stmt
            .query_map(params![process, limit as i64], |r| {
                let position: i64 = r.get(1)?;
                let version: i64 = r.get(4)?;
                Ok(ParkedEvent {
                    process: r.get(0)?,
                    position: position.max(0) as u64,
                    event_id: r.get(2)?,
                    stream: r.get(3)?,
                    version: version.max(0) as u64,
                    event_type: r.get(5)?,
                    instance: r.get(6)?,
                    command: r.get(7)?,
                    attempts: r.get(8)?,
                    error: r.get(9)?,
                    parked_at: r.get(10)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(sql("reading parked events"))?;
        let count: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM parked_events WHERE process = ?1",
                [process],
                |r| r.get(0),
            )
            .map_err(sql("counting parked events"))?;
        Ok((rows, count.max(0) as u64))
    }

    /// Records that `instance` of process manager `process` has finished.
    pub fn mark_finished(&self, process: &str, instance: &str) -> Result<(), TimerIndexError> {
        self.lock()
            .execute(
                "INSERT OR IGNORE INTO finished_instances (process, instance) VALUES (?1, ?2)",
                params![process, instance],
            )
            .map_err(sql("recording a finished instance"))?;
        Ok(())
    }

    /// Whether `instance` of process manager `process` has finished.
    pub fn is_finished(&self, process: &str, instance: &str) -> Result<bool, TimerIndexError> {
        self.lock()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM finished_instances \
                 WHERE process = ?1 AND instance = ?2)",
                params![process, instance],
                |r| r.get(0),
            )
            .map_err(sql("looking up a finished instance"))
    }

    /// How many instances of process manager `process` have finished.
    pub fn finished_count(&self, process: &str) -> Result<u64, TimerIndexError> {
        let n: i64 = self
            .lock()
            .query_row(
                "SELECT COUNT(*) FROM finished_instances WHERE process = ?1",
                [process],
                |r| r.get(0),
            )
            .map_err(sql("counting finished instances"))?;
        Ok(n.max(0) as u64)
    }
}
