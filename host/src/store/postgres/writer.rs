//! Group commit for the PostgreSQL store: writer tasks that take what is
//! queued and commit it as one call of `append_batch` (see the parent
//! module's docs for why this is safe with several hosts).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::schema::DUPLICATE_ID_SQLSTATE;
use super::{MAX_BATCH, MAX_BATCH_BYTES, MAX_BATCH_EVENTS, Shared, to_bigint};
use crate::store::memory::{id_already_stored, id_in_other_stream};
use crate::store::{AppendResult, EventData, ExpectedVersion, StoreError};

/// How often a group that PostgreSQL aborted for a transient reason (a
/// deadlock it broke, a serialisation failure) is sent again before its
/// appends fail.
const TRANSIENT_RETRIES: usize = 3;

/// One append waiting for a writer.
pub(crate) struct AppendRequest {
    stream: String,
    expected: ExpectedVersion,
    events: Vec<EventData>,
    bytes: usize,
    reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

impl AppendRequest {
    pub(crate) fn new(
        stream: String,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        reply: oneshot::Sender<Result<AppendResult, StoreError>>,
    ) -> Self {
        let bytes = events.iter().map(|e| e.data.len() + e.metadata.len()).sum();
        AppendRequest {
            stream,
            expected,
            events,
            bytes,
            reply,
        }
    }

    fn answer(self, result: Result<AppendResult, StoreError>) {
        // The caller may have gone (its command timed out): nothing to do.
        let _ = self.reply.send(result);
    }
}

/// The writers' shared queue, with the one request that did not fit the
/// previous group.
pub(crate) struct Queue {
    rx: mpsc::Receiver<AppendRequest>,
    carried: Option<AppendRequest>,
}

impl Queue {
    pub(crate) fn new(rx: mpsc::Receiver<AppendRequest>) -> Self {
        Queue { rx, carried: None }
    }

    /// Waits for the next group: the first request, then whatever else is
    /// queued, within the group's limits. `None` once the store is gone.
    async fn next_group(&mut self) -> Option<Vec<AppendRequest>> {
        let first = match self.carried.take() {
            Some(request) => request,
            None => self.rx.recv().await?,
        };
        let mut events = first.events.len();
        let mut bytes = first.bytes;
        let mut group = vec![first];
        while group.len() < MAX_BATCH {
            let Ok(next) = self.rx.try_recv() else { break };
            if events + next.events.len() > MAX_BATCH_EVENTS || bytes + next.bytes > MAX_BATCH_BYTES
            {
                self.carried = Some(next);
                break;
            }
            events += next.events.len();
            bytes += next.bytes;
            group.push(next);
        }
        Some(group)
    }
}

/// A writer task: commits groups until the store is dropped.
pub(crate) async fn run(shared: Arc<Shared>, queue: Arc<tokio::sync::Mutex<Queue>>) {
    loop {
        // Hold the queue only while taking a group, so that the other
        // writer gathers the next one while this one commits.
        let group = queue.lock().await.next_group().await;
        let Some(mut group) = group else { return };
        // Every host locks stream rows in this order (stable: appends to one
        // stream keep their order).
        group.sort_by(|a, b| a.stream.cmp(&b.stream));
        commit(&shared, group).await;
    }
}

/// Why a group was not committed.
enum GroupError {
    /// The command at this index carries an event id already stored; the
    /// transaction was undone.
    DuplicateId(usize),
    /// Aborted by PostgreSQL for a reason that sending it again cures.
    Transient(StoreError),
    /// The database could not be reached, or refused; outcome unknown for a
    /// lost reply.
    Failed(StoreError),
}

/// Commits `group`, answering every request in it.
async fn commit(shared: &Shared, mut group: Vec<AppendRequest>) {
    let mut transient = 0;
    while !group.is_empty() {
        let began = std::time::Instant::now();
        match run_group(shared, &group).await {
            Ok(outcomes) => {
                crate::metrics::global().group_commit("postgres", group.len(), began.elapsed());
                let mut last_position = 0;
                for (request, outcome) in group.into_iter().zip(outcomes) {
                    if let Ok(result) = &outcome
                        && !request.events.is_empty()
                    {
                        last_position = last_position.max(result.position);
                    }
                    request.answer(outcome);
                }
                if last_position > 0 {
                    shared.commits.send_modify(|p| *p = (*p).max(last_position));
                    shared
                        .announce
                        .send_modify(|p| *p = (*p).max(last_position));
                }
                return;
            }
            Err(GroupError::DuplicateId(index)) if index < group.len() => {
                let request = group.remove(index);
                let error = explain_duplicate(shared, &request).await;
                request.answer(Err(error));
            }
            Err(GroupError::Transient(e)) if transient < TRANSIENT_RETRIES => {
                transient += 1;
                tracing::debug!(error = %e, attempt = transient, "PostgreSQL aborted a group; sending it again");
            }
            Err(GroupError::DuplicateId(index)) => {
                let message = format!(
                    "PostgreSQL reported a duplicate event id for append {index} of a group of {}",
                    group.len()
                );
                for request in group {
                    request.answer(Err(StoreError::Corrupt(message.clone())));
                }
                return;
            }
            // Every append of the group shares the error: refused data
            // stays `Corrupt`, anything else is `Unavailable` (outcome
            // unknown; a retry with the same ids is safe).
            Err(GroupError::Transient(e) | GroupError::Failed(e)) => {
                for request in group {
                    request.answer(Err(match &e {
                        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
                        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                        other => StoreError::Unavailable(other.to_string()),
                    }));
                }
                return;
            }
        }
    }
}

/// One call of `append_batch` for the whole group, in one transaction.
async fn run_group(
    shared: &Shared,
    group: &[AppendRequest],
) -> Result<Vec<Result<AppendResult, StoreError>>, GroupError> {
    let mut streams = Vec::with_capacity(group.len());
    let mut kinds = Vec::with_capacity(group.len());
    let mut expected = Vec::with_capacity(group.len());
    let mut counts = Vec::with_capacity(group.len());
    let total: usize = group.iter().map(|r| r.events.len()).sum();
    let mut ids: Vec<Uuid> = Vec::with_capacity(total);
    let mut types: Vec<&str> = Vec::with_capacity(total);
    let mut data: Vec<&[u8]> = Vec::with_capacity(total);
    let mut metadata: Vec<&[u8]> = Vec::with_capacity(total);
    let mut messages: Vec<&str> = Vec::with_capacity(total);
    for request in group {
        streams.push(request.stream.as_str());
        let (kind, version): (i32, i64) = match request.expected {
            ExpectedVersion::Any => (0, 0),
            ExpectedVersion::NoStream => (1, 0),
            ExpectedVersion::StreamExists => (2, 0),
            ExpectedVersion::Exact(v) => (3, to_bigint(v)),
        };
        kinds.push(kind);
        expected.push(version);
        // At most MAX_EVENTS_PER_TRANSACTION, checked when queued.
        counts.push(i32::try_from(request.events.len()).unwrap_or(i32::MAX));
        for e in &request.events {
            ids.push(e.event_id);
            types.push(&e.event_type);
            data.push(&e.data);
            metadata.push(&e.metadata);
            messages.push(&e.message_id);
        }
    }

    let answer = shared
        .query_raw(
            &shared.sql.append,
            &[
                &streams, &kinds, &expected, &counts, &ids, &types, &data, &metadata, &messages,
            ],
        )
        .await
        .map_err(GroupError::Failed)?;
    let rows = answer.map_err(|e| group_error(shared, &e))?;
    if rows.len() != group.len() {
        return Err(GroupError::Failed(StoreError::Corrupt(format!(
            "append_batch answered {} rows for {} appends",
            rows.len(),
            group.len()
        ))));
    }
    let mut outcomes = Vec::with_capacity(group.len());
    for (request, row) in group.iter().zip(&rows) {
        outcomes.push(outcome(request, row));
    }
    Ok(outcomes)
}

/// One command's result from its `append_batch` row.
fn outcome(request: &AppendRequest, row: &tokio_postgres::Row) -> Result<AppendResult, StoreError> {
    let bad = |e: tokio_postgres::Error| StoreError::Corrupt(format!("append_batch's answer: {e}"));
    let code: i32 = row.try_get("r_outcome").map_err(bad)?;
    let version: Option<i64> = row.try_get("r_version").map_err(bad)?;
    let position: Option<i64> = row.try_get("r_position").map_err(bad)?;
    let number = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
    match code {
        0 | 2 => Ok(AppendResult {
            version: number(version),
            position: number(position),
        }),
        1 => Err(StoreError::WrongExpectedVersion {
            stream: request.stream.clone(),
            expected: request.expected,
            actual: number(version),
        }),
        3 => {
            let other: Option<String> = row.try_get("r_other").map_err(bad)?;
            let first = request.events.first().map_or(Uuid::nil(), |e| e.event_id);
            Err(id_in_other_stream(
                first,
                other.as_deref().unwrap_or("?"),
                &request.stream,
            ))
        }
        other => Err(StoreError::Corrupt(format!(
            "append_batch answered outcome {other}, which this host does not know"
        ))),
    }
}

fn group_error(shared: &Shared, e: &tokio_postgres::Error) -> GroupError {
    use tokio_postgres::error::SqlState;
    if let Some(db) = e.as_db_error() {
        if db.code().code() == DUPLICATE_ID_SQLSTATE
            && let Ok(index) = db.message().trim().parse::<usize>()
        {
            return GroupError::DuplicateId(index);
        }
        if [
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
        ]
        .contains(db.code())
        {
            return GroupError::Transient(shared.error(e));
        }
    }
    GroupError::Failed(shared.error(e))
}

/// The error for an append that carried an event id already stored: which
/// id, and where it is.
async fn explain_duplicate(shared: &Shared, request: &AppendRequest) -> StoreError {
    let ids: Vec<Uuid> = request.events.iter().map(|e| e.event_id).collect();
    match shared.query(&shared.sql.ids_stored, &[&ids]).await {
        Ok(rows) => {
            for e in &request.events {
                if let Some(row) = rows
                    .iter()
                    .find(|r| r.try_get::<_, Uuid>(0).is_ok_and(|id| id == e.event_id))
                {
                    let stored_in: String = row.try_get(1).unwrap_or_default();
                    return id_already_stored(e.event_id, &stored_in, &request.stream);
                }
            }
            // The other writer of that id rolled back: the outcome is
            // unknown to this caller, who may simply retry.
            StoreError::Unavailable(format!(
                "an event id of this append to {:?} was being written by another transaction; \
                 retry the append",
                request.stream
            ))
        }
        Err(e) => e,
    }
}
