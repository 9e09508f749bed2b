//! The embedded store's reads: what one read-only connection pair (the log
//! and the index database) and the unindexed tail show, up to the durable
//! position.
//!
//! A stream's events are found in two places: the index database for the
//! positions up to its checkpoint, the tail ([`super::tail`]) for the ones
//! above. A read takes the tail's part and the checkpoint under one lock
//! first and asks the index second, bounded by that checkpoint: the index
//! committed at least that much before the tail let go of it, so the two
//! parts neither miss nor repeat an event, whatever the indexer does
//! meanwhile. Nothing beyond the durable position is shown: events
//! committed but not yet synced could still vanish in a crash.

use std::rc::Rc;
use std::sync::{Mutex, MutexGuard};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::index;
use super::rows::{
    collect, corrupt, event_from_row, event_to_apply_from_row, from_sql_int, sql_error, to_sql_int,
};
use super::tail::{self, Located, Tail};
use crate::store::{EventToApply, RecordedEvent, Snapshot, StoreError};

/// A list of SQL values bound as one parameter (`rarray`).
type Array = Rc<Vec<Value>>;

/// `SELECT <every column> FROM events <rest>`, as one literal so that
/// `prepare_cached` finds it without building a string per read.
macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT stream, version, position, event_id, event_type, data, metadata, message_id \
             FROM events ",
            $rest
        )
    };
}

/// `SELECT <what apply needs> FROM events <rest>`, for
/// [`View::read_stream_to_apply`]: the columns `event_to_apply_from_row`
/// decodes.
macro_rules! select_to_apply {
    ($rest:literal) => {
        concat!(
            "SELECT version, event_id, event_type, data, metadata FROM events ",
            $rest
        )
    };
}

/// The events a command appended are read in pages of this many.
const COMMAND_PAGE: usize = 64;

/// A read-only connection to the log and one to the index database.
pub(super) struct Reader {
    pub(super) log: Connection,
    pub(super) index: Connection,
}

/// What one read sees: a reader's connections, the tail, and the durable
/// position, beyond which it shows nothing.
pub(super) struct View<'a> {
    pub(super) reader: &'a Reader,
    pub(super) tail: &'a Mutex<Tail>,
    pub(super) durable: u64,
}

impl View<'_> {
    fn tail(&self) -> MutexGuard<'_, Tail> {
        tail::lock(self.tail)
    }

    /// The stream's version and the position of its last event ((0, 0) if
    /// it has none).
    pub(super) fn head(&self, stream: &str) -> Result<(u64, u64), StoreError> {
        if let Some(head) = self.tail().head(stream, self.durable) {
            return Ok(head);
        }
        // Whatever the tail let go of meanwhile is in the index by now.
        Ok(index::head(&self.reader.index, stream, self.durable)?.unwrap_or((0, 0)))
    }

    /// Up to `limit` of the stream's events from `from_version` on.
    pub(super) fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let positions = self.stream_positions(stream, from_version, limit)?;
        self.events_at(positions.into_iter().map(|(_, position)| position))
    }

    /// [`read_stream`](Self::read_stream) with only what `apply` needs: the
    /// same positions, fewer columns decoded.
    pub(super) fn read_stream_to_apply(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventToApply>, StoreError> {
        let positions = self.stream_positions(stream, from_version, limit)?;
        self.rows_at(
            select_to_apply!("WHERE position IN rarray(?1) ORDER BY position"),
            positions.into_iter().map(|(_, position)| position),
            event_to_apply_from_row,
        )
    }

    /// Where up to `limit` of the stream's events from `from_version` on
    /// are: (version, position), in version order.
    fn stream_positions(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let (indexed, unindexed) = {
            let tail = self.tail();
            (
                tail.indexed(),
                tail.stream_from(stream, from_version, self.durable, limit),
            )
        };
        let mut positions = index::stream_from(
            &self.reader.index,
            stream,
            from_version,
            indexed.min(self.durable),
            limit,
        )?;
        positions.extend(unindexed);
        positions.truncate(limit);
        Ok(positions)
    }

    /// The events at `positions` (ascending), in that order.
    fn events_at(
        &self,
        positions: impl Iterator<Item = u64>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.rows_at(
            select_events!("WHERE position IN rarray(?1) ORDER BY position"),
            positions,
            event_from_row,
        )
    }

    /// The log's rows at `positions` (ascending), in that order, selected
    /// by `sql` (which binds the positions as `?1`) and read by `decode`:
    /// one statement that looks every position up in the log, whose per-row
    /// cost is a tenth of a statement per event.
    fn rows_at<T>(
        &self,
        sql: &str,
        positions: impl Iterator<Item = u64>,
        decode: fn(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let wanted: Vec<Value> = positions
            .map(|position| Value::Integer(to_sql_int(position)))
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let count = wanted.len();
        let mut stmt = self.reader.log.prepare_cached(sql).map_err(sql_error)?;
        let rows = stmt.query([Array::from(wanted)]).map_err(sql_error)?;
        let found = collect(rows, count, decode)?;
        if found.len() != count {
            return Err(StoreError::Corrupt(format!(
                "the index points at {count} positions of which the log holds {}: delete {} \
                 (rehydra rebuilds it from the log)",
                found.len(),
                index::INDEX_FILE
            )));
        }
        Ok(found)
    }

    /// Up to `limit` events from `from_position` on, in position order.
    pub(super) fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut stmt = self
            .reader
            .log
            .prepare_cached(select_events!(
                "WHERE position >= ?1 AND position <= ?3 ORDER BY position LIMIT ?2"
            ))
            .map_err(sql_error)?;
        let rows = stmt
            .query(params![
                to_sql_int(from_position),
                super::rows::to_sql_limit(limit),
                to_sql_int(self.durable)
            ])
            .map_err(sql_error)?;
        // A page of the log; a larger limit is allocated as it fills.
        collect(rows, limit.min(1024), event_from_row)
    }

    /// Where the event with `id` is, if it is durable.
    fn locate(&self, id: &Uuid) -> Result<Option<Located>, StoreError> {
        let in_tail = self
            .tail()
            .locate(id)
            .filter(|found| found.position <= self.durable)
            .cloned();
        if in_tail.is_some() {
            return Ok(in_tail);
        }
        index::locate(&self.reader.index, &self.reader.log, id, self.durable)
    }

    /// The events one command appended to `stream`: the one with
    /// `first_event_id` and those after it with its message id.
    pub(super) fn command_events(
        &self,
        stream: &str,
        first_event_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let Some(first) = self
            .locate(&first_event_id)?
            .filter(|found| &*found.stream == stream)
        else {
            return Ok(Vec::new());
        };
        let mut events: Vec<RecordedEvent> = Vec::new();
        let mut from = first.version;
        loop {
            let page = self.read_stream(stream, from, COMMAND_PAGE)?;
            let full = page.len() == COMMAND_PAGE;
            for event in page {
                if events
                    .first()
                    .is_some_and(|first| first.message_id != event.message_id)
                {
                    return Ok(events);
                }
                from = event.version + 1;
                events.push(event);
            }
            if !full {
                return Ok(events);
            }
        }
    }

    /// The position of the last durable event (0 for an empty store).
    pub(super) fn head_position(&self) -> Result<u64, StoreError> {
        let head: Option<i64> = self
            .reader
            .log
            .query_row(
                "SELECT MAX(position) FROM events WHERE position <= ?1",
                [to_sql_int(self.durable)],
                |row| row.get(0),
            )
            .map_err(sql_error)?;
        head.map_or(Ok(0), |p| from_sql_int(p, "position"))
    }

    /// The stream's snapshot, if one was saved. A snapshot is of events its
    /// actor saw acknowledged, so it needs no durable bound.
    pub(super) fn snapshot(&self, stream: String) -> Result<Option<Snapshot>, StoreError> {
        let row = self
            .reader
            .log
            .prepare_cached(
                "SELECT state_schema, version, event_id, state FROM snapshots WHERE stream = ?1",
            )
            .map_err(sql_error)?
            .query_row([&stream], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .optional()
            .map_err(sql_error)?;
        let Some((schema, version, event_id, state)) = row else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            version: from_sql_int(version, "snapshot version")?,
            event_id: Uuid::from_slice(&event_id).map_err(|e| corrupt("snapshot event_id", e))?,
            stream,
            schema,
            state,
        }))
    }
}
