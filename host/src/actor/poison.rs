//! Fault isolation per aggregate: an aggregate whose commands or loads keep
//! making the plugin fail is rested on its own, so that one client (or one
//! aggregate with events the plugin cannot fold) cannot take the plugin
//! away from every other aggregate.
//!
//! After `after` plugin failures of one aggregate in a row (traps, deadlines,
//! the memory cap, output the host refuses, `apply` refusing its events),
//! the aggregate is *poisoned*: its commands and reads are answered with
//! `aggregate_poisoned` (503, `Retry-After`) without calling the plugin, for
//! a rest that starts at the quarantine backoff and doubles (up to 5
//! minutes) while the failures go on. A success clears it. The plugin-wide
//! quarantine (`plugin/quarantine.rs`) counts only failures spread over
//! several aggregates, so the two never fight over the same cause.
//!
//! Entries live in a map of their own, not in the actor's slot: an aggregate
//! that fails before it has events is never resident, and its failures must
//! still add up. The map is bounded and swept with the idle aggregates.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::error::{CommandError, PluginVerdict};
use crate::plugin::engine::MAX_QUARANTINE;

/// Aggregates with failures on record, at most; past it new ones are not
/// tracked (they still count toward the plugin's quarantine).
const MAX_TRACKED: usize = 100_000;

/// The aggregates that have failed lately.
pub(super) struct Poison {
    after: u32,
    first_rest: Duration,
    entries: DashMap<String, Entry>,
    /// How many `entries` there are, kept beside the map: the command path
    /// asks whether it is empty twice per command, and the map can only
    /// tell by locking each of its shards.
    tracked: AtomicUsize,
}

struct Entry {
    consecutive: u32,
    until: Option<Instant>,
    rest: Duration,
    last_failure: Instant,
    last_error: String,
}

impl Poison {
    /// Poisons an aggregate after `after` failures in a row (0: never), for
    /// `first_rest` at first.
    pub(super) fn new(after: u32, first_rest: Duration) -> Self {
        Poison {
            after,
            first_rest: first_rest.max(Duration::from_millis(1)),
            entries: DashMap::new(),
            tracked: AtomicUsize::new(0),
        }
    }

    /// `Err(aggregate_poisoned)` while the aggregate rests.
    pub(super) fn check(&self, aggregate_type: &str, id: &str) -> Result<(), CommandError> {
        // The common case, no failures on record, costs no key.
        if self.after == 0 || self.tracked.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let Some(entry) = self.entries.get(&super::slot_key(aggregate_type, id)) else {
            return Ok(());
        };
        let Some(left) = entry
            .until
            .and_then(|u| u.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
        else {
            return Ok(());
        };
        Err(CommandError::AggregatePoisoned {
            aggregate_type: aggregate_type.to_owned(),
            id: id.to_owned(),
            failures: entry.consecutive,
            retry_after: left,
            last_error: entry.last_error.clone(),
        })
    }

    /// Records what a command or read of an aggregate came to.
    pub(super) fn record<T>(
        &self,
        aggregate_type: &str,
        id: &str,
        result: &Result<T, CommandError>,
    ) {
        if self.after == 0 {
            return;
        }
        match PluginVerdict::of(result) {
            PluginVerdict::Failed => {
                let message = match result {
                    Err(e) => e.to_string(),
                    Ok(_) => String::new(),
                };
                self.failed(&super::slot_key(aggregate_type, id), &message);
            }
            PluginVerdict::Worked if self.tracked.load(Ordering::Acquire) > 0 => {
                if self
                    .entries
                    .remove(&super::slot_key(aggregate_type, id))
                    .is_some()
                {
                    self.tracked.fetch_sub(1, Ordering::AcqRel);
                }
            }
            PluginVerdict::Worked | PluginVerdict::Unknown => {}
        }
    }

    fn failed(&self, key: &str, message: &str) {
        let now = Instant::now();
        if !self.entries.contains_key(key) && self.tracked.load(Ordering::Acquire) >= MAX_TRACKED {
            return;
        }
        let mut entry = self.entries.entry(key.to_owned()).or_insert_with(|| {
            self.tracked.fetch_add(1, Ordering::AcqRel);
            Entry {
                consecutive: 0,
                until: None,
                rest: self.first_rest,
                last_failure: now,
                last_error: String::new(),
            }
        });
        entry.consecutive = entry.consecutive.saturating_add(1);
        entry.last_failure = now;
        entry.last_error = message.chars().take(500).collect();
        if entry.consecutive >= self.after {
            let rest = entry.rest;
            entry.until = Some(now + rest);
            entry.rest = (rest * 2).min(MAX_QUARANTINE);
            tracing::warn!(
                aggregate = key,
                failures = entry.consecutive,
                rest_ms = rest.as_millis() as u64,
                error = %entry.last_error,
                "aggregate poisoned: the plugin keeps failing on it; its commands are refused for a while"
            );
        }
    }

    /// Forgets aggregates whose last failure is older than the longest rest
    /// and that are not resting now.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, e| {
            let resting = e.until.is_some_and(|u| u > now);
            let keep = resting || now.duration_since(e.last_failure) < MAX_QUARANTINE;
            if !keep {
                self.tracked.fetch_sub(1, Ordering::AcqRel);
            }
            keep
        });
    }

    /// Aggregates poisoned now, for the metrics.
    pub(super) fn poisoned(&self) -> u64 {
        let now = Instant::now();
        self.entries
            .iter()
            .filter(|e| e.until.is_some_and(|u| u > now))
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FailureKind;

    fn trap() -> Result<(), CommandError> {
        Err(CommandError::PluginFailed {
            plugin: "p".into(),
            kind: FailureKind::Trap,
            message: "boom".into(),
        })
    }

    #[test]
    fn an_aggregate_is_poisoned_after_failures_in_a_row_and_a_success_clears_it() {
        let p = Poison::new(3, Duration::from_secs(60));
        p.record("t", "a", &trap());
        p.record("t", "a", &trap());
        assert!(p.check("t", "a").is_ok());
        p.record("t", "a", &Ok(()));
        p.record("t", "a", &trap());
        p.record("t", "a", &trap());
        assert!(p.check("t", "a").is_ok(), "a success reset the count");
        p.record("t", "a", &trap());
        let err = p.check("t", "a").unwrap_err();
        assert_eq!(err.code(), "aggregate_poisoned");
        assert!(err.to_string().contains("boom"), "{err}");
        assert!(p.check("t", "b").is_ok(), "another aggregate is not");
        assert_eq!(p.poisoned(), 1);
        // A refusal is an answer: the plugin works for this aggregate.
        p.record::<()>("t", "a", &Err(CommandError::Rejected("no".into())));
        assert!(p.check("t", "a").is_ok());
        assert_eq!(
            p.tracked.load(Ordering::Acquire),
            0,
            "the count follows the map"
        );
    }

    #[test]
    fn the_rest_doubles_while_failures_go_on() {
        let p = Poison::new(1, Duration::from_millis(10));
        p.record("t", "k", &trap());
        let first = match p.check("t", "k") {
            Err(CommandError::AggregatePoisoned { retry_after, .. }) => retry_after,
            other => panic!("{other:?}"),
        };
        assert!(first <= Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(20));
        assert!(p.check("t", "k").is_ok(), "the rest ended");
        p.record("t", "k", &trap());
        let second = match p.check("t", "k") {
            Err(CommandError::AggregatePoisoned { retry_after, .. }) => retry_after,
            other => panic!("{other:?}"),
        };
        assert!(second > Duration::from_millis(10), "{second:?}");
    }

    #[test]
    fn zero_disables_it() {
        let p = Poison::new(0, Duration::from_secs(1));
        for _ in 0..10 {
            p.record("t", "k", &trap());
        }
        assert!(p.check("t", "k").is_ok());
    }
}
