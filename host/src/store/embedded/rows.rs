//! Reading rows of the embedded store's tables into the store's types, and
//! the mapping of SQLite's integers and errors.

use rusqlite::{ErrorCode, Row};
use uuid::Uuid;

use crate::store::{EventToApply, RecordedEvent, StoreError};

/// The rows of `rows`, each read by `decode`, of which `expected` is how
/// many there should be (so that the list is allocated once).
pub(super) fn collect<T>(
    mut rows: rusqlite::Rows<'_>,
    expected: usize,
    decode: fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut found = Vec::with_capacity(expected);
    while let Some(row) = rows.next().map_err(sql_error)? {
        found.push(decode(row)?);
    }
    Ok(found)
}

/// Decodes a row selected with `select_to_apply!`.
pub(super) fn event_to_apply_from_row(row: &Row<'_>) -> Result<EventToApply, StoreError> {
    Ok(EventToApply {
        version: from_sql_int(row.get(0).map_err(sql_error)?, "version")?,
        event_id: event_id_at(row, 1)?,
        event_type: row.get(2).map_err(sql_error)?,
        data: row.get(3).map_err(sql_error)?,
        metadata: row.get(4).map_err(sql_error)?,
    })
}

/// The event id in column `column` of `row`.
fn event_id_at(row: &Row<'_>, column: usize) -> Result<Uuid, StoreError> {
    let id_bytes = row.get_ref(column).map_err(sql_error)?;
    let id_bytes = id_bytes.as_blob().map_err(|e| corrupt("event_id", e))?;
    Uuid::from_slice(id_bytes).map_err(|e| corrupt("event_id", e))
}

/// Decodes a row selected with `select_events!`.
pub(super) fn event_from_row(row: &Row<'_>) -> Result<RecordedEvent, StoreError> {
    let event_id = event_id_at(row, 3)?;
    Ok(RecordedEvent {
        stream: row.get(0).map_err(sql_error)?,
        version: from_sql_int(row.get(1).map_err(sql_error)?, "version")?,
        position: from_sql_int(row.get(2).map_err(sql_error)?, "position")?,
        event_id,
        event_type: row.get(4).map_err(sql_error)?,
        data: row.get(5).map_err(sql_error)?,
        metadata: row.get(6).map_err(sql_error)?,
        message_id: row.get(7).map_err(sql_error)?,
    })
}

pub(super) fn corrupt(column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("unreadable {column}: {e}"))
}

pub(super) fn from_sql_int(value: i64, column: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(column, format!("negative value {value}")))
}

/// SQLite integers are signed; anything beyond is "past every event".
pub(super) fn to_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn to_sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Maps a SQLite error: unreadable data is `Corrupt`, anything else (I/O,
/// disk full, locked by a `sqlite3` shell, ...) is `Unavailable` with
/// SQLite's message.
pub(super) fn sql_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match &e {
        E::FromSqlConversionFailure(..)
        | E::InvalidColumnType(..)
        | E::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
        _ => match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Unavailable(describe(&e)),
        },
    }
}

/// SQLite's message for `e`, and what to do when that is not obvious from
/// it: a full disk and a database locked by someone else are different
/// troubles with different remedies.
pub(super) fn describe(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => format!(
            "the disk holding the event store is full ({e}): free space on its file system; \
             the store takes appends again as soon as there is room"
        ),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => format!(
            "the event store's database is locked by another program ({e}): close any sqlite3 \
             shell that has a transaction open on it"
        ),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_error(code: std::ffi::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    /// A full disk and a database someone else has locked are told apart,
    /// each with what to do; other errors keep SQLite's message.
    #[test]
    fn errors_say_what_to_do() {
        let full = describe(&sqlite_error(rusqlite::ffi::SQLITE_FULL));
        assert!(
            full.contains("disk") && full.contains("full") && full.contains("free space"),
            "{full}"
        );
        let busy = describe(&sqlite_error(rusqlite::ffi::SQLITE_BUSY));
        assert!(
            busy.contains("locked by another program") && busy.contains("sqlite3 shell"),
            "{busy}"
        );
        let io = sqlite_error(rusqlite::ffi::SQLITE_IOERR);
        assert_eq!(describe(&io), io.to_string());
        assert!(matches!(
            sql_error(sqlite_error(rusqlite::ffi::SQLITE_FULL)),
            StoreError::Unavailable(m) if m.contains("free space")
        ));
    }
}
