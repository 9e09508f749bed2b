//! An in-process event store (`memory://`): the same semantics as the
//! durable backends, kept in a `Vec` behind one mutex and lost when the
//! process exits.
//!
//! It exists for tests and benchmarks, where a disk would only add noise, so
//! every operation is a few hash-map look-ups and clones under a short-held
//! lock. It follows the embedded store's rules exactly (the conformance suite
//! runs against both), including its choice of [`StoreError::Corrupt`] for an
//! event id that is already stored in another stream.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use uuid::Uuid;

use super::{
    AppendResult, EventData, EventStore, EventToApply, ExpectedVersion, RecordedEvent, Snapshot,
    StoreError,
};

/// An event store held in memory; not durable. See the module docs.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// Bumped after every append that stored something.
    commits: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Every event in global order; an event's position is its index + 1, so
    /// `read_all` is a slice with no search.
    events: Vec<RecordedEvent>,
    /// Each stream's events as indices into `events`, in version order; the
    /// stream's version is the length.
    streams: HashMap<String, Vec<usize>>,
    /// Every stored event id, for idempotent retries and uniqueness.
    by_id: HashMap<Uuid, usize>,
    /// Each stream's snapshot.
    snapshots: HashMap<String, Snapshot>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        // A poisoned lock means an earlier append panicked half-way; the data
        // may be inconsistent, so refuse rather than serve it.
        self.inner.lock().map_err(|_| {
            StoreError::Unavailable("memory store is unusable after a panic inside it".into())
        })
    }
}

impl Inner {
    fn stream_events(&self, stream: &str) -> &[usize] {
        self.streams.get(stream).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Up to `limit` of the stream's events from `from_version` on.
    fn stream_slice(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> impl Iterator<Item = &RecordedEvent> {
        // Version v sits at index v - 1; version 0 reads from the start.
        let start = usize::try_from(from_version.saturating_sub(1)).unwrap_or(usize::MAX);
        self.stream_events(stream)
            .iter()
            .skip(start)
            .take(limit)
            .map(|&i| &self.events[i])
    }

    /// The stream's version and the position of its last event (0, 0 if the
    /// stream does not exist).
    fn head(&self, stream: &str) -> (u64, u64) {
        let indices = self.stream_events(stream);
        match indices.last() {
            Some(&i) => (indices.len() as u64, i as u64 + 1),
            None => (0, 0),
        }
    }

    fn append(
        &mut self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        // A retry is recognised before the expectation is checked: the
        // original append already moved the version on.
        if let Some(first) = events.first()
            && let Some(&i) = self.by_id.get(&first.event_id)
        {
            let stored = &self.events[i];
            if stored.stream != stream {
                return Err(id_in_other_stream(first.event_id, &stored.stream, stream));
            }
            return Ok(self.retry_result(stream, &events));
        }

        let (version, last_position) = self.head(stream);
        if !expected.matches(version) {
            return Err(StoreError::WrongExpectedVersion {
                stream: stream.to_owned(),
                expected,
                actual: version,
            });
        }
        if events.is_empty() {
            return Ok(AppendResult {
                version,
                position: last_position,
            });
        }

        // Check every id before writing anything, so a bad batch writes none.
        for (n, event) in events.iter().enumerate() {
            if let Some(&i) = self.by_id.get(&event.event_id) {
                return Err(id_already_stored(
                    event.event_id,
                    &self.events[i].stream,
                    stream,
                ));
            }
            if events[..n].iter().any(|e| e.event_id == event.event_id) {
                return Err(id_twice_in_append(event.event_id, stream));
            }
        }

        let indices = self.streams.entry(stream.to_owned()).or_default();
        let mut result = AppendResult {
            version,
            position: last_position,
        };
        for event in events {
            let index = self.events.len();
            result.version += 1;
            result.position = index as u64 + 1;
            self.by_id.insert(event.event_id, index);
            indices.push(index);
            self.events.push(RecordedEvent {
                stream: stream.to_owned(),
                version: result.version,
                position: result.position,
                event_id: event.event_id,
                event_type: event.event_type,
                data: event.data,
                metadata: event.metadata,
                message_id: event.message_id,
            });
        }
        Ok(result)
    }

    /// The outcome of the original append that a retry repeats: the last of
    /// the stored events (in this stream) that carry the batch's ids.
    fn retry_result(&self, stream: &str, events: &[EventData]) -> AppendResult {
        let mut result = AppendResult {
            version: 0,
            position: 0,
        };
        for event in events {
            if let Some(&i) = self.by_id.get(&event.event_id) {
                let stored = &self.events[i];
                if stored.stream == stream && stored.version > result.version {
                    result = AppendResult {
                        version: stored.version,
                        position: stored.position,
                    };
                }
            }
        }
        result
    }
}

/// The error for a first event id that lives in another stream: either a
/// message id was reused for a different aggregate or ids are not unique.
/// Retrying cannot help, so it is not `Unavailable`.
pub(crate) fn id_in_other_stream(id: Uuid, stored_in: &str, appending_to: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "event id {id} is already stored in stream {stored_in:?}, so it cannot be appended to \
         {appending_to:?}: event ids must be unique across the store (was a message id reused \
         for a different aggregate?)"
    ))
}

/// The error for a later event of a batch whose id is already stored while the
/// first event's is not (so the batch is not a retry).
pub(crate) fn id_already_stored(id: Uuid, stored_in: &str, appending_to: &str) -> StoreError {
    if stored_in == appending_to {
        StoreError::Corrupt(format!(
            "event id {id} is already stored in stream {appending_to:?}, but the append's first \
             event is new, so it is not a retry: event ids must be unique"
        ))
    } else {
        id_in_other_stream(id, stored_in, appending_to)
    }
}

/// The error for a batch that carries the same event id twice.
pub(crate) fn id_twice_in_append(id: Uuid, stream: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "event id {id} appears more than once in one append to stream {stream:?}: event ids must \
         be unique"
    ))
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let result = self.lock()?.append(stream, expected, events);
        if result.is_ok() {
            self.commits.send_modify(|n| *n = n.wrapping_add(1));
        }
        result
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let inner = self.lock()?;
        Ok(inner
            .stream_slice(stream, from_version, limit)
            .cloned()
            .collect())
    }

    async fn read_stream_to_apply(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventToApply>, StoreError> {
        let inner = self.lock()?;
        // Copies only what `apply` needs, not the stream name and message
        // id of every event.
        Ok(inner
            .stream_slice(stream, from_version, limit)
            .map(|e| EventToApply {
                version: e.version,
                event_id: e.event_id,
                event_type: e.event_type.clone(),
                data: e.data.clone(),
                metadata: e.metadata.clone(),
            })
            .collect())
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        Ok(self.lock()?.head(stream).0)
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let inner = self.lock()?;
        let start = usize::try_from(from_position.saturating_sub(1))
            .unwrap_or(usize::MAX)
            .min(inner.events.len());
        let end = start.saturating_add(limit).min(inner.events.len());
        Ok(inner.events[start..end].to_vec())
    }

    async fn find_command_events(
        &self,
        stream: &str,
        first_event_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let inner = self.lock()?;
        let Some(&at) = inner.by_id.get(&first_event_id) else {
            return Ok(Vec::new());
        };
        // Versions are 1-based indices into the stream's list.
        let from =
            usize::try_from(inner.events[at].version.saturating_sub(1)).unwrap_or(usize::MAX);
        let in_stream = inner.stream_events(stream);
        Ok(super::command_events(
            in_stream
                .get(from..)
                .unwrap_or(&[])
                .iter()
                .map(|&i| &inner.events[i]),
            first_event_id,
        ))
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        Ok(self.lock()?.events.len() as u64)
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let stored = inner
            .snapshots
            .get(&snapshot.stream)
            .map(|s| (s.schema, s.version));
        if snapshot.replaces(stored) {
            inner
                .snapshots
                .insert(snapshot.stream.clone(), snapshot.clone());
        }
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.lock()?.snapshots.get(stream).cloned())
    }

    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.commits.subscribe())
    }

    fn describe(&self) -> String {
        "in-memory store (not durable)".to_owned()
    }
}
