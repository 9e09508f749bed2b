//! The unindexed tail: the events the writer committed that the index
//! database does not hold yet, indexed in memory.
//!
//! The commit path writes only the log (`events`); the `(stream, version)`
//! and event-id indexes are written afterwards by the indexer thread
//! ([`super::index`]) in large transactions of their own. Until then an
//! event is found here: the writer checks expected versions and event ids
//! against the tail first and the index database second, and a read takes
//! the positions above the index's checkpoint from here. So nothing ever
//! waits for the index.
//!
//! The tail holds only what the indexer has not reached, never the whole
//! store: it is bounded ([`TAIL_LIMIT`]), and empty after a clean close.
//!
//! Invariant: every event is in exactly one of the two, by position. The
//! index holds every position up to [`Tail::indexed`] and this tail every
//! committed one above it; the indexer raises `indexed` only after its
//! transaction is committed, and drops the entries in the same step.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

/// The most events the tail holds. At that size the writer stops committing
/// until the indexer has caught up (it falls behind only when its disk
/// fails or is far slower than the log's), so memory stays bounded.
pub(super) const TAIL_LIMIT: usize = 262_144;

/// Where an event is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Located {
    pub(super) stream: Arc<str>,
    pub(super) version: u64,
    pub(super) position: u64,
}

/// One event of the tail, by position.
#[derive(Debug, Clone)]
pub(super) struct TailEvent {
    pub(super) position: u64,
    pub(super) stream: Arc<str>,
    pub(super) version: u64,
    pub(super) event_id: Uuid,
}

impl TailEvent {
    /// Where this event is stored.
    fn located(&self) -> Located {
        Located {
            stream: self.stream.clone(),
            version: self.version,
            position: self.position,
        }
    }
}

/// Locks the tail shared by the writer, the indexer and the readers. A
/// thread that panicked while holding it left it whole (every change is
/// one call), so a poisoned lock is taken as it is.
pub(super) fn lock(tail: &Mutex<Tail>) -> MutexGuard<'_, Tail> {
    tail.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The events above the index's checkpoint. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Tail {
    /// Every position up to this one is in the index database.
    indexed: u64,
    /// The events above `indexed`, in position order.
    events: VecDeque<TailEvent>,
    /// Each stream's events in the tail: (version, position), in order.
    streams: HashMap<Arc<str>, VecDeque<(u64, u64)>>,
    /// Each event id in the tail.
    ids: HashMap<Uuid, Located>,
}

impl Tail {
    /// An empty tail above an index that holds every position up to
    /// `indexed`.
    pub(super) fn new(indexed: u64) -> Tail {
        Tail {
            indexed,
            ..Tail::default()
        }
    }

    /// The index's checkpoint: every position up to it is indexed.
    pub(super) fn indexed(&self) -> u64 {
        self.indexed
    }

    /// How many events wait for the indexer.
    pub(super) fn len(&self) -> usize {
        self.events.len()
    }

    /// How many events at or below position `up_to` wait for the indexer.
    pub(super) fn waiting(&self, up_to: u64) -> usize {
        self.events.partition_point(|e| e.position <= up_to)
    }

    /// The stream's last event in the tail at or below position `up_to`:
    /// (version, position).
    pub(super) fn head(&self, stream: &str, up_to: u64) -> Option<(u64, u64)> {
        self.streams
            .get(stream)?
            .iter()
            .rev()
            .find(|(_, position)| *position <= up_to)
            .copied()
    }

    /// The stream's events in the tail from `from_version` on, at or below
    /// position `up_to`, at most `limit`: (version, position).
    pub(super) fn stream_from(
        &self,
        stream: &str,
        from_version: u64,
        up_to: u64,
        limit: usize,
    ) -> Vec<(u64, u64)> {
        let Some(entries) = self.streams.get(stream) else {
            return Vec::new();
        };
        entries
            .iter()
            .filter(|(version, position)| *version >= from_version && *position <= up_to)
            .take(limit)
            .copied()
            .collect()
    }

    /// Where the event with `id` is, if it is in the tail.
    pub(super) fn locate(&self, id: &Uuid) -> Option<&Located> {
        self.ids.get(id)
    }

    /// Adds events the writer committed, in position order, above every
    /// event already here.
    pub(super) fn extend(&mut self, committed: impl IntoIterator<Item = TailEvent>) {
        for event in committed {
            debug_assert!(self.events.back().map_or(self.indexed, |e| e.position) < event.position);
            self.streams
                .entry(event.stream.clone())
                .or_default()
                .push_back((event.version, event.position));
            self.ids.insert(event.event_id, event.located());
            self.events.push_back(event);
        }
    }

    /// A copy of the oldest events, at most `limit`, at or below position
    /// `up_to`: what the indexer writes next.
    pub(super) fn oldest(&self, up_to: u64, limit: usize) -> Vec<TailEvent> {
        self.events
            .iter()
            .take_while(|e| e.position <= up_to)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Drops the events up to position `indexed` (the indexer committed
    /// them) and raises the checkpoint to it.
    pub(super) fn indexed_up_to(&mut self, indexed: u64) {
        while let Some(first) = self.events.front() {
            if first.position > indexed {
                break;
            }
            if let Some(event) = self.events.pop_front() {
                if let Some(entries) = self.streams.get_mut(&event.stream) {
                    entries.pop_front();
                    if entries.is_empty() {
                        self.streams.remove(&event.stream);
                    }
                }
                self.ids.remove(&event.event_id);
            }
        }
        self.indexed = self.indexed.max(indexed);
    }
}

/// What the writer's current group has stored, not yet committed: found
/// before the tail, and added to it only once the group commits.
#[derive(Debug, Default)]
pub(super) struct Pending {
    events: Vec<TailEvent>,
    heads: HashMap<Arc<str>, (u64, u64)>,
    ids: HashMap<Uuid, Located>,
}

impl Pending {
    /// The stream's newest event stored by this group: (version, position).
    pub(super) fn head(&self, stream: &str) -> Option<(u64, u64)> {
        self.heads.get(stream).copied()
    }

    /// Where the event with `id` is, if this group stored it.
    pub(super) fn locate(&self, id: &Uuid) -> Option<&Located> {
        self.ids.get(id)
    }

    /// Records one append's events, all stored.
    pub(super) fn add(&mut self, stored: Vec<TailEvent>) {
        for event in stored {
            self.heads
                .insert(event.stream.clone(), (event.version, event.position));
            self.ids.insert(event.event_id, event.located());
            self.events.push(event);
        }
    }

    /// Takes the group's stream heads: (version, position) of each
    /// stream's newest event in it.
    pub(super) fn take_heads(&mut self) -> HashMap<Arc<str>, (u64, u64)> {
        std::mem::take(&mut self.heads)
    }

    /// Empties it, giving its events in position order.
    pub(super) fn take(&mut self) -> Vec<TailEvent> {
        self.heads.clear();
        self.ids.clear();
        std::mem::take(&mut self.events)
    }

    /// Forgets everything (the group was rolled back).
    pub(super) fn clear(&mut self) {
        self.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: u64, stream: &str, version: u64) -> TailEvent {
        TailEvent {
            position,
            stream: Arc::from(stream),
            version,
            event_id: Uuid::new_v4(),
        }
    }

    #[test]
    fn the_tail_finds_heads_and_ids_until_they_are_indexed() {
        let mut tail = Tail::new(10);
        let events = vec![event(11, "a", 3), event(12, "b", 1), event(13, "a", 4)];
        let id_a4 = events[2].event_id;
        tail.extend(events);

        assert_eq!(tail.head("a", u64::MAX), Some((4, 13)));
        assert_eq!(tail.head("a", 12), Some((3, 11)), "bounded by position");
        assert_eq!(tail.head("c", u64::MAX), None);
        assert_eq!(tail.stream_from("a", 4, u64::MAX, 10), vec![(4, 13)]);
        assert_eq!(tail.locate(&id_a4).map(|l| l.position), Some(13));
        assert_eq!(tail.oldest(12, 10).len(), 2, "only up to the bound");

        tail.indexed_up_to(12);
        assert_eq!(tail.indexed(), 12);
        assert_eq!(tail.len(), 1);
        assert_eq!(tail.head("b", u64::MAX), None, "b is all indexed");
        assert_eq!(tail.head("a", u64::MAX), Some((4, 13)));
        assert_eq!(tail.stream_from("a", 0, u64::MAX, 10), vec![(4, 13)]);

        tail.indexed_up_to(13);
        assert_eq!(tail.len(), 0);
        assert!(tail.locate(&id_a4).is_none());
    }

    #[test]
    fn pending_events_reach_the_tail_only_when_taken() {
        let mut pending = Pending::default();
        pending.add(vec![event(1, "a", 1), event(2, "a", 2)]);
        assert_eq!(pending.head("a"), Some((2, 2)));
        let mut tail = Tail::new(0);
        tail.extend(pending.take());
        assert_eq!(pending.head("a"), None);
        assert_eq!(tail.head("a", u64::MAX), Some((2, 2)));

        pending.add(vec![event(3, "b", 1)]);
        pending.clear();
        assert_eq!(
            pending.head("b"),
            None,
            "a rolled-back group leaves nothing"
        );
    }
}
