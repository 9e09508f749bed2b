//! The limit on what a plugin may put in the host's log (`--plugin-log-rate`):
//! a token bucket per plugin name, shared by all its instances, guest
//! threads and versions, through which every line passes — its `log`
//! calls and the lines of its stdout and stderr alike.
//!
//! A plugin is untrusted code, and a loop around `log` in it (or a bug that
//! prints on every call) would otherwise fill the disk and drown the host's
//! own lines. Lines past the limit are dropped and counted
//! (`rehydra_plugin_log_lines_dropped_total{plugin}`); at most once a second
//! per plugin one line of the host's says how many were dropped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::metrics::{self, PluginLabels};

/// The shortest time between two summaries of dropped lines of a plugin.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// One plugin's log budget.
pub struct LogLimiter {
    plugin: Arc<str>,
    /// Lines per second, which is also the burst; 0: no limit.
    rate: u32,
    bucket: Mutex<Bucket>,
    /// `rehydra_plugin_log_lines_dropped_total` of this plugin.
    dropped: Counter,
}

struct Bucket {
    /// Lines that may be logged now.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    refilled: Instant,
    /// Lines dropped and not yet reported.
    unreported: u64,
    /// When the first of them was dropped.
    since: Option<Instant>,
}

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Log it (`false`: drop it).
    pub log: bool,
    /// Report now that this many lines were dropped over this long.
    pub report: Option<(u64, Duration)>,
}

impl LogLimiter {
    /// A full budget of `rate` lines per second for `plugin`, as of `now`.
    pub fn new(plugin: &str, rate: u32, now: Instant) -> LogLimiter {
        let dropped = metrics::global()
            .plugin_log_lines_dropped
            .get_or_create(&PluginLabels {
                plugin: plugin.to_owned(),
            })
            .clone();
        LogLimiter {
            plugin: Arc::from(plugin),
            rate,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(rate),
                refilled: now,
                unreported: 0,
                since: None,
            }),
            dropped,
        }
    }

    /// Whether one more line may be logged now. Logs the summary of the
    /// dropped lines when one is due.
    pub fn admit(&self) -> bool {
        let admission = self.admit_at(Instant::now());
        if let Some((dropped, over)) = admission.report {
            tracing::warn!(
                plugin = %self.plugin,
                dropped,
                "plugin {}: {dropped} log lines dropped in the last {:.1}s \
                 (over --plugin-log-rate, {} lines/s)",
                self.plugin,
                over.as_secs_f64(),
                self.rate
            );
        }
        admission.log
    }

    /// [`admit`](Self::admit) at the time `now`, without logging.
    pub fn admit_at(&self, now: Instant) -> Admission {
        if self.rate == 0 {
            return Admission {
                log: true,
                report: None,
            };
        }
        // The bucket holds plain numbers, which a panic cannot leave half
        // updated: a poisoned lock is still good.
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rate = f64::from(self.rate);
        // Guest threads read the clock before they lock, so `now` can be a
        // little older than the last refill: count that as no time.
        if now > bucket.refilled {
            let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
            bucket.refilled = now;
        }
        let log = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            self.dropped.inc();
            bucket.unreported += 1;
            bucket.since.get_or_insert(now);
            false
        };
        let report = match bucket.since {
            Some(since) if now.saturating_duration_since(since) >= SUMMARY_EVERY => {
                bucket.since = None;
                let dropped = std::mem::take(&mut bucket.unreported);
                Some((dropped, now.saturating_duration_since(since)))
            }
            _ => None,
        };
        Admission { log, report }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The plugin's dropped-lines counter as exported.
    fn counted(plugin: &str) -> u64 {
        metrics::global()
            .plugin_log_lines_dropped
            .get_or_create(&PluginLabels {
                plugin: plugin.to_owned(),
            })
            .get()
    }

    #[test]
    fn a_burst_of_the_rate_passes_then_lines_pass_as_the_bucket_refills() {
        let t0 = Instant::now();
        let limiter = LogLimiter::new("log-limit-test-burst", 10, t0);
        let admitted = (0..15).filter(|_| limiter.admit_at(t0).log).count();
        assert_eq!(admitted, 10, "the burst is the rate");
        assert_eq!(counted("log-limit-test-burst"), 5);

        // 150 ms later, one and a half lines' worth has come back.
        assert!(limiter.admit_at(t0 + ms(150)).log);
        assert!(!limiter.admit_at(t0 + ms(150)).log);
        // A long quiet spell refills to the burst, no further.
        let later = t0 + Duration::from_secs(60);
        let admitted = (0..50).filter(|_| limiter.admit_at(later).log).count();
        assert_eq!(admitted, 10);
        assert_eq!(counted("log-limit-test-burst"), 5 + 1 + 40);
    }

    #[test]
    fn dropped_lines_are_reported_at_most_once_a_second() {
        let t0 = Instant::now();
        let limiter = LogLimiter::new("log-limit-test-report", 2, t0);
        let mut reports = Vec::new();
        // 100 lines a second for 3.5 seconds, against a limit of 2.
        for i in 0..350 {
            let now = t0 + ms(10 * i);
            if let Some(report) = limiter.admit_at(now).report {
                reports.push((now - t0, report));
            }
        }
        let times: Vec<Duration> = reports.iter().map(|(at, _)| *at).collect();
        assert_eq!(times.len(), 3, "{reports:?}");
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= SUMMARY_EVERY, "{reports:?}");
        }
        // Each report covers what was dropped since the previous one, so
        // together they and the lines still unreported are every drop.
        let reported: u64 = reports.iter().map(|(_, (n, _))| n).sum();
        let dropped = counted("log-limit-test-report");
        assert!(
            reported <= dropped && dropped - reported < 100,
            "{reports:?}"
        );
        // 2 of burst and 2 a second after it: the rest are dropped.
        assert!((340..=343).contains(&dropped), "{dropped}");
        for (_, (n, over)) in &reports {
            assert!(*over >= SUMMARY_EVERY && *over < ms(1100), "{reports:?}");
            assert!(*n >= 90, "{reports:?}");
        }
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let t0 = Instant::now();
        let limiter = LogLimiter::new("log-limit-test-unlimited", 0, t0);
        assert!((0..10_000).all(|_| limiter.admit_at(t0).log));
        assert_eq!(counted("log-limit-test-unlimited"), 0);
    }

    #[test]
    fn a_clock_read_before_the_last_refill_counts_as_no_time() {
        let t0 = Instant::now();
        let limiter = LogLimiter::new("log-limit-test-skew", 1, t0 + ms(500));
        assert!(limiter.admit_at(t0 + ms(500)).log);
        assert!(!limiter.admit_at(t0).log);
        assert!(!limiter.admit_at(t0 + ms(900)).log);
        assert!(limiter.admit_at(t0 + ms(1600)).log);
    }
}
