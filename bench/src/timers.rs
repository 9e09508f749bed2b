//! Scenario `timers`: what a million pending timers cost a host. The
//! timers are written straight into an embedded store as `$timers` events
//! (1,000 per event, far in the future), then the real binary starts on
//! it: once to read them into its timer index, and again with the index
//! up to date, next to the same host on an empty store in the same run.

use std::time::{Duration, Instant, SystemTime};

use rehydra::plugin::AggregateRef;
use rehydra::store::{EventData, ExpectedVersion};
use rehydra::timer::TIMERS_EVENT;
use rehydra::timer::event::{StoredChange, StoredTimer, TimersEvent};

use crate::http::HostDir;

/// Timers per `$timers` event (the most one command may schedule).
const PER_EVENT: usize = 1000;

/// What the scenario measured.
#[derive(Debug, Clone, Copy)]
pub struct TimersResult {
    /// Pending timers.
    pub timers: usize,
    /// Writing them into the store (not a host's work: set-up).
    pub write: Duration,
    /// From the first start on that store until the index lists them all.
    pub first_index: Duration,
    /// Process spawn to ready, with the index up to date (median).
    pub start_with: Duration,
    /// The same on an empty store (median).
    pub start_without: Duration,
    /// RSS after start, with the index up to date (median).
    pub rss_with: u64,
    /// RSS after start on an empty store (median).
    pub rss_without: u64,
    /// RSS right after the first start has indexed them all.
    pub rss_after_first_index: u64,
    /// `GET /v1/timers?limit=100` with them pending (median of 20).
    pub list_100: Duration,
    /// The index file's size.
    pub index_bytes: u64,
}

/// The resident set size of process `pid`, bytes.
fn rss_of(pid: u32) -> u64 {
    rehydra_e2e::rss_kib_of(pid) * 1024
}

/// The pending timers a host lists, in all.
async fn count(http: &reqwest::Client, base: &str) -> Option<u64> {
    let body: serde_json::Value = http
        .get(format!("{base}/v1/timers?limit=1"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["count"].as_u64()
}

/// Writes `n` pending timers into a fresh embedded store at `path`.
async fn write_timers(path: &std::path::Path, n: usize) {
    let store = rehydra::store::open(&format!("embedded://{}", path.display()))
        .await
        .expect("the store opens");
    let due = SystemTime::now() + Duration::from_secs(86_400);
    let mut written = 0;
    let mut batch = 0;
    while written < n {
        let aggregate = AggregateRef {
            aggregate_type: "order".into(),
            id: format!("b{batch}"),
        };
        let changes = (0..PER_EVENT.min(n - written))
            .map(|i| {
                let at = due + Duration::from_millis((written + i) as u64);
                StoredChange::Schedule(StoredTimer {
                    id: uuid::Uuid::new_v4().to_string(),
                    key: format!("k{i}"),
                    target: aggregate.clone(),
                    command: "expire".into(),
                    data: serde_json::json!({}),
                    due: humantime::format_rfc3339_millis(at).to_string(),
                })
            })
            .collect::<Vec<_>>();
        written += changes.len();
        let event = TimersEvent {
            aggregate: aggregate.clone(),
            changes,
        };
        let message_id = uuid::Uuid::new_v4().to_string();
        store
            .append(
                &format!("order-b{batch}"),
                ExpectedVersion::Any,
                vec![EventData {
                    event_id: uuid::Uuid::new_v4(),
                    event_type: TIMERS_EVENT.into(),
                    data: serde_json::to_vec(&event).expect("encodes"),
                    metadata: format!(r#"{{"$correlationId":"{message_id}"}}"#).into_bytes(),
                    message_id,
                }],
            )
            .await
            .expect("appended");
        batch += 1;
    }
    store.close().await;
}

/// Runs the scenario with `n` timers, `runs` starts of each kind.
pub async fn pending_timers(n: usize, runs: usize) -> TimersResult {
    let dir = HostDir::new();
    let t0 = Instant::now();
    write_timers(&dir.path().join("data-timers"), n).await;
    let write = t0.elapsed();
    let http = reqwest::Client::new();

    // The first start reads the log into the index.
    let host = dir.start("data-timers", "cache");
    let t0 = Instant::now();
    loop {
        if count(&http, &host.base).await == Some(n as u64) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1800),
            "the timer index did not list {n} timers within 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_index = t0.elapsed() + host.ready_after;
    let rss_after_first_index = rss_of(host.pid());
    drop(host);

    let (mut start_with, mut start_without) = (Vec::new(), Vec::new());
    let (mut rss_with, mut rss_without) = (Vec::new(), Vec::new());
    let mut list_100 = Vec::new();
    for i in 0..runs.max(1) {
        // Alternate, so that both see the same machine.
        let host = dir.start(&format!("data-empty-{i}"), "cache");
        start_without.push(host.ready_after.as_secs_f64());
        rss_without.push(rss_of(host.pid()) as f64);
        drop(host);

        let host = dir.start("data-timers", "cache");
        start_with.push(host.ready_after.as_secs_f64());
        rss_with.push(rss_of(host.pid()) as f64);
        assert_eq!(count(&http, &host.base).await, Some(n as u64));
        for _ in 0..20 {
            let t = Instant::now();
            let resp = http
                .get(format!("{}/v1/timers?limit=100", host.base))
                .send()
                .await
                .expect("listed");
            assert!(resp.status().is_success());
            let _ = resp.bytes().await;
            list_100.push(t.elapsed().as_secs_f64());
        }
        drop(host);
    }
    let median = crate::stats::median;
    TimersResult {
        timers: n,
        write,
        first_index,
        start_with: Duration::from_secs_f64(median(start_with)),
        start_without: Duration::from_secs_f64(median(start_without)),
        rss_with: median(rss_with) as u64,
        rss_without: median(rss_without) as u64,
        rss_after_first_index,
        list_100: Duration::from_secs_f64(median(list_100)),
        index_bytes: std::fs::metadata(dir.path().join("data-timers").join("timers.sqlite3"))
            .map_or(0, |m| m.len()),
    }
}
