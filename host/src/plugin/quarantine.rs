//! Quarantine: a plugin version whose calls keep failing (traps, deadlines,
//! memory, bad output) is rested for a while instead of burning CPU on every
//! command. The rest doubles while failures go on and resets on success.
//!
//! Only failures spread over several aggregates count: `after` failures in
//! a row quarantine the plugin only if they came from at least
//! [`DISTINCT_AGGREGATES`] different aggregates (or `after`, if fewer).
//! Failures that follow one aggregate rest that aggregate alone
//! (`actor/poison.rs`), so one client cannot take a plugin away from
//! everyone by sending it commands that trap.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::engine::MAX_QUARANTINE;

/// How many different aggregates a run of failures must span before it
/// quarantines the plugin.
pub const DISTINCT_AGGREGATES: usize = 3;

/// One plugin version's recent failures.
#[derive(Debug)]
pub struct Quarantine {
    after: u32,
    first_backoff: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    consecutive: u32,
    /// Hashes of the aggregates among the consecutive failures (a few).
    aggregates: Vec<u64>,
    until: Option<Instant>,
    backoff: Duration,
    total_failures: u64,
}

/// What `/v1/plugins` shows of it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QuarantineStatus {
    /// Failed calls since the last success.
    pub consecutive_failures: u32,
    /// Failed calls since the plugin was loaded.
    pub total_failures: u64,
    /// Milliseconds of quarantine left; 0 when the plugin is serving.
    pub quarantined_for_ms: u64,
}

impl Quarantine {
    /// Quarantines after `after` consecutive failures (0 disables it), first
    /// for `backoff`.
    pub fn new(after: u32, backoff: Duration) -> Self {
        Quarantine {
            after,
            first_backoff: backoff,
            state: Mutex::new(State {
                consecutive: 0,
                aggregates: Vec::new(),
                until: None,
                backoff,
                total_failures: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the plugin must still rest, if it must.
    pub fn remaining(&self) -> Option<Duration> {
        let s = self.lock();
        s.until
            .and_then(|u| u.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Records a failed call for `aggregate` (any key that names it);
    /// returns the quarantine it started, if any.
    pub fn failed(&self, aggregate: &str) -> Option<Duration> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let needed = DISTINCT_AGGREGATES.min(self.after as usize);
        let key = BuildHasherDefault::<DefaultHasher>::default().hash_one(aggregate);
        let mut s = self.lock();
        s.consecutive = s.consecutive.saturating_add(1);
        s.total_failures += 1;
        if !s.aggregates.contains(&key) && s.aggregates.len() < needed {
            s.aggregates.push(key);
        }
        if self.after == 0 || s.consecutive < self.after || s.aggregates.len() < needed {
            return None;
        }
        let rest = s.backoff;
        s.until = Some(Instant::now() + rest);
        s.backoff = (s.backoff * 2).min(MAX_QUARANTINE);
        // The next failure after the rest quarantines again at once.
        s.consecutive = self.after - 1;
        Some(rest)
    }

    /// Records a successful call.
    pub fn succeeded(&self) {
        let mut s = self.lock();
        if s.consecutive > 0 || s.until.is_some() {
            s.consecutive = 0;
            s.aggregates.clear();
            s.until = None;
            s.backoff = self.first_backoff;
        }
    }

    /// The current status.
    pub fn status(&self) -> QuarantineStatus {
        let remaining = self.remaining();
        let s = self.lock();
        QuarantineStatus {
            consecutive_failures: s.consecutive,
            total_failures: s.total_failures,
            quarantined_for_ms: remaining.map(|d| d.as_millis() as u64).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantines_after_consecutive_failures() {
        // A rest far longer than any stall of a busy machine.
        let q = Quarantine::new(3, Duration::from_secs(60));
        assert_eq!(q.failed("a"), None);
        q.succeeded();
        assert_eq!(q.failed("a"), None);
        assert_eq!(q.failed("b"), None);
        assert_eq!(q.failed("c"), Some(Duration::from_secs(60)));
        assert!(q.remaining().is_some());
        assert!(q.status().quarantined_for_ms > 0);
        assert_eq!(q.status().total_failures, 4);
        q.succeeded();
        assert_eq!(q.remaining(), None);
        assert_eq!(q.status().consecutive_failures, 0);
        assert_eq!(q.failed("a"), None, "a success resets the count");
    }

    #[test]
    fn failures_of_one_aggregate_never_quarantine_the_plugin() {
        let q = Quarantine::new(3, Duration::from_secs(60));
        for _ in 0..100 {
            assert_eq!(q.failed("one"), None);
        }
        assert_eq!(q.failed("two"), None);
        assert_eq!(
            q.failed("three"),
            Some(Duration::from_secs(60)),
            "a third aggregate makes the run span enough"
        );
    }

    #[test]
    fn the_rest_ends_and_doubles_while_failures_go_on() {
        let q = Quarantine::new(2, Duration::from_millis(20));
        q.failed("a");
        assert_eq!(q.failed("b"), Some(Duration::from_millis(20)));
        // Sleeping past the rest always ends it, however busy the machine.
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(q.remaining(), None);
        assert_eq!(
            q.failed("a"),
            Some(Duration::from_millis(40)),
            "quarantined again at once, twice as long"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(q.failed("b"), Some(Duration::from_millis(80)));
    }

    #[test]
    fn zero_disables_it() {
        let q = Quarantine::new(0, Duration::from_secs(1));
        for i in 0..100 {
            assert_eq!(q.failed(&i.to_string()), None);
        }
        assert_eq!(q.remaining(), None);
    }
}
