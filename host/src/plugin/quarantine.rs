//! Quarantine: a plugin version whose calls keep failing (traps, deadlines,
//! memory, bad output) is rested for a while instead of burning CPU on every
//! command. The rest doubles while failures go on and resets on success.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::engine::MAX_QUARANTINE;

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

    /// Records a failed call; returns the quarantine it started, if any.
    pub fn failed(&self) -> Option<Duration> {
        let mut s = self.lock();
        s.consecutive = s.consecutive.saturating_add(1);
        s.total_failures += 1;
        if self.after == 0 || s.consecutive < self.after {
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
        assert_eq!(q.failed(), None);
        q.succeeded();
        assert_eq!(q.failed(), None);
        assert_eq!(q.failed(), None);
        assert_eq!(q.failed(), Some(Duration::from_secs(60)));
        assert!(q.remaining().is_some());
        assert!(q.status().quarantined_for_ms > 0);
        assert_eq!(q.status().total_failures, 4);
        q.succeeded();
        assert_eq!(q.remaining(), None);
        assert_eq!(q.status().consecutive_failures, 0);
        assert_eq!(q.failed(), None, "a success resets the count");
    }

    #[test]
    fn the_rest_ends_and_doubles_while_failures_go_on() {
        let q = Quarantine::new(2, Duration::from_millis(20));
        q.failed();
        assert_eq!(q.failed(), Some(Duration::from_millis(20)));
        // Sleeping past the rest always ends it, however busy the machine.
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(q.remaining(), None);
        assert_eq!(
            q.failed(),
            Some(Duration::from_millis(40)),
            "quarantined again at once, twice as long"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(q.failed(), Some(Duration::from_millis(80)));
    }

    #[test]
    fn zero_disables_it() {
        let q = Quarantine::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            assert_eq!(q.failed(), None);
        }
        assert_eq!(q.remaining(), None);
    }
}
