//! Persisted snapshots, off the command path: deciding when an aggregate's
//! state is worth storing, and the one task that stores it.
//!
//! An actor never waits for a snapshot. When one is due (every
//! `snapshot_every` events, and when an aggregate is passivated or evicted
//! with events its last snapshot lacks), the actor copies its state into a
//! bounded queue and goes on; a task drains the queue into the store. A full
//! queue drops the snapshot (counted in `rehydra_snapshot_saves_total`), a
//! failed save is logged and counted: neither ever fails or delays a
//! command. The next due point tries again.
//!
//! Loading is in `aggregate.rs` (`rehydrate`): it trusts a snapshot only if
//! it is of the plugin's state schema, the stream still holds the event the
//! snapshot was taken at, and the plugin's `apply` accepts the state.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Live;
use crate::metrics::{self, Metrics};
use crate::store::{EventStore, Snapshot};

/// Snapshots waiting to be stored, at most; past it new ones are dropped.
const QUEUE_CAPACITY: usize = 1024;

/// The snapshot policy and the queue to the task that stores them.
pub(super) struct Snapshots {
    /// Events between snapshots; 0 turns snapshots off (saving and loading).
    every: u64,
    queue: Option<mpsc::Sender<Pending>>,
}

struct Pending {
    aggregate_type: String,
    snapshot: Snapshot,
}

impl Snapshots {
    /// The policy; with `every > 0`, starts the task that stores snapshots
    /// into `store` (it ends when this is dropped).
    pub(super) fn start(store: Arc<dyn EventStore>, every: u64) -> Self {
        if every == 0 {
            return Snapshots { every, queue: None };
        }
        let (tx, mut rx) = mpsc::channel::<Pending>(QUEUE_CAPACITY);
        tokio::spawn(async move {
            while let Some(Pending {
                aggregate_type,
                snapshot,
            }) = rx.recv().await
            {
                let outcome = match store.save_snapshot(&snapshot).await {
                    Ok(()) => "written",
                    Err(e) => {
                        tracing::warn!(
                            stream = %snapshot.stream,
                            version = snapshot.version,
                            error = %e,
                            "snapshot not stored; the aggregate will be loaded from its events until a later one is"
                        );
                        "failed"
                    }
                };
                Metrics::snapshot(&metrics::global().snapshots_saved, &aggregate_type, outcome);
            }
        });
        Snapshots {
            every,
            queue: Some(tx),
        }
    }

    /// Whether snapshots are loaded at all.
    pub(super) fn enabled(&self) -> bool {
        self.every > 0
    }

    /// After a command or a load: stores a snapshot if `every` events have
    /// come since the last one.
    /// `stream` names the aggregate's stream (asked only when one is due).
    pub(super) fn after_work(
        &self,
        aggregate_type: &str,
        stream: impl FnOnce() -> Option<String>,
        live: &mut Live,
    ) {
        if self.every > 0
            && live.version >= live.snapshot_version.saturating_add(self.every)
            && let Some(stream) = stream()
        {
            self.offer(aggregate_type, &stream, live);
        }
    }

    /// When an aggregate leaves memory: stores a snapshot if it has events
    /// the last one lacks, unless the stream is shorter than `every` (a
    /// short stream loads as fast from its events).
    pub(super) fn on_passivation(
        &self,
        aggregate_type: &str,
        stream: impl FnOnce() -> Option<String>,
        live: &mut Live,
    ) {
        if self.every > 0
            && live.version > live.snapshot_version
            && live.version >= self.every
            && let Some(stream) = stream()
        {
            self.offer(aggregate_type, &stream, live);
        }
    }

    fn offer(&self, aggregate_type: &str, stream: &str, live: &mut Live) {
        let Some(queue) = &self.queue else { return };
        let Some(event_id) = live.head_event_id else {
            return;
        };
        let pending = Pending {
            aggregate_type: aggregate_type.to_owned(),
            snapshot: Snapshot {
                stream: stream.to_owned(),
                schema: live.state.schema,
                version: live.version,
                event_id,
                state: live.state.bytes.clone(),
            },
        };
        match queue.try_send(pending) {
            // Counted as taken when queued: a failed save is not retried
            // before the next due point.
            Ok(()) => live.snapshot_version = live.version,
            Err(_) => Metrics::snapshot(
                &metrics::global().snapshots_saved,
                aggregate_type,
                "dropped",
            ),
        }
    }
}
