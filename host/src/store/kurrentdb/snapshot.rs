//! Snapshots in KurrentDB: a stream of their own per aggregate stream, as
//! other event-sourcing libraries keep them there, whose last event is the
//! snapshot (the state bytes as data, the schema, version and event id in
//! its metadata). The stream is created with `$maxCount = 1`, so the server
//! drops older snapshots when it scavenges.
//!
//! A snapshot stream is named `_rehydra-snapshot-<stream>`. An aggregate's
//! stream prefix starts with a letter, so no aggregate stream has that name,
//! and reads of `$all` skip these streams: snapshots are never events.

use serde::{Deserialize, Serialize};

use super::*;
use crate::store::Snapshot;

/// The prefix of every snapshot stream's name.
pub(super) const SNAPSHOT_STREAM_PREFIX: &str = "_rehydra-snapshot-";
/// The event type of a snapshot.
const SNAPSHOT_EVENT_TYPE: &str = "RehydraSnapshot";

/// What a snapshot event's metadata holds.
#[derive(Serialize, Deserialize)]
struct SnapshotMetadata {
    #[serde(rename = "messageId")]
    message_id: String,
    schema: u32,
    version: u64,
    #[serde(rename = "eventId")]
    event_id: Uuid,
}

/// The snapshot stream of `stream`.
fn snapshot_stream(stream: &str) -> String {
    format!("{SNAPSHOT_STREAM_PREFIX}{stream}")
}

/// Whether `stream` is a snapshot stream, which no read of the log returns.
pub(super) fn is_snapshot_stream(stream: &str) -> bool {
    stream.starts_with(SNAPSHOT_STREAM_PREFIX)
}

fn decode(stream: &str, stored: RecordedEvent) -> Result<Snapshot, StoreError> {
    let metadata: SnapshotMetadata = serde_json::from_slice(&stored.metadata).map_err(|e| {
        StoreError::Corrupt(format!(
            "the snapshot of {stream} (stream {}) has unreadable metadata: {e}",
            stored.stream
        ))
    })?;
    Ok(Snapshot {
        stream: stream.to_owned(),
        schema: metadata.schema,
        version: metadata.version,
        event_id: metadata.event_id,
        state: stored.data,
    })
}

impl KurrentDbStore {
    /// [`EventStore::save_snapshot`]: reads the stream's last snapshot and
    /// appends the new one after it, if it replaces it. Another host that
    /// appended one in between wins (its snapshot is as good).
    pub(super) async fn save_snapshot_to_stream(
        &self,
        snapshot: &Snapshot,
    ) -> Result<(), StoreError> {
        let stream = snapshot_stream(&snapshot.stream);
        let last = self.last_event(&stream).await?;
        let stored = last
            .clone()
            .and_then(|e| decode(&snapshot.stream, e).ok())
            .map(|s| (s.schema, s.version));
        if !snapshot.replaces(stored) {
            return Ok(());
        }
        let expected = match &last {
            Some(e) => ExpectedVersion::Exact(e.version),
            None => ExpectedVersion::NoStream,
        };
        let id = Uuid::new_v4();
        let metadata = serde_json::to_vec(&SnapshotMetadata {
            message_id: id.to_string(),
            schema: snapshot.schema,
            version: snapshot.version,
            event_id: snapshot.event_id,
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot encode snapshot metadata: {e}")))?;
        let event = EventData {
            event_id: id,
            event_type: SNAPSHOT_EVENT_TYPE.to_owned(),
            data: snapshot.state.clone(),
            metadata,
            message_id: id.to_string(),
        };
        match self.append(&stream, expected, vec![event]).await {
            Ok(_) => {}
            Err(StoreError::WrongExpectedVersion { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        if last.is_none() {
            // Only the newest snapshot is ever read; let the server drop
            // the rest. Without it they only cost disk.
            let deadline = self.resilience.attempt_timeout;
            let limited = self
                .run("setting a snapshot stream's $maxCount", |client| {
                    let stream = stream.clone();
                    async move {
                        let options = AppendToStreamOptions::default().deadline(deadline);
                        let metadata = kurrentdb::StreamMetadata::builder().max_count(1).build();
                        client
                            .set_stream_metadata(stream.as_str(), &options, &metadata)
                            .await
                            .map_err(classify)
                    }
                })
                .await;
            if let Err(e) = limited {
                tracing::debug!(stream, error = %e, "could not limit the snapshot stream to one event");
            }
        }
        Ok(())
    }

    /// [`EventStore::load_snapshot`]: the snapshot stream's last event.
    pub(super) async fn load_snapshot_from_stream(
        &self,
        stream: &str,
    ) -> Result<Option<Snapshot>, StoreError> {
        match self.last_event(&snapshot_stream(stream)).await? {
            None => Ok(None),
            Some(stored) => decode(stream, stored).map(Some),
        }
    }
}
