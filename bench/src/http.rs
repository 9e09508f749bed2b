//! Scenarios against the real `rehydra` binary: start-up time with the
//! compile cache cold and warm, hot-reload latency, and command throughput
//! over HTTP on the embedded store with a small closed-loop load generator
//! (loopback only, bounded in time).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::inproc::{agg_id, bank_account_wasm, client_accounts, target_dir};
use crate::stats::RunResult;

/// The host binary, `target/debug/rehydra` (`REHYDRA_BIN` overrides).
pub fn binary() -> PathBuf {
    let path = std::env::var_os("REHYDRA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug").join("rehydra"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p rehydra` (make bench does)",
        path.display()
    );
    path
}

/// A running host; killed (by its own pid) when dropped.
pub struct Host {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// From spawning the process to its `listening on` line.
    pub ready_after: Duration,
}

impl Host {
    /// The host process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory with the bank-account plugin and room for data.
pub struct HostDir {
    dir: tempfile::TempDir,
}

impl HostDir {
    /// A fresh directory holding `plugins/bank-account.wasm`.
    pub fn new() -> HostDir {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins).expect("the plugin directory");
        std::fs::copy(bank_account_wasm(), plugins.join("bank-account.wasm"))
            .expect("copying the plugin");
        HostDir { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the host on `embedded://<dir>/<data>` with the compile cache
    /// in `<dir>/<cache>`, logging warnings only, and waits until it is
    /// ready.
    pub fn start(&self, data: &str, cache: &str) -> Host {
        self.start_watching(data, cache, false)
    }

    /// [`start`](Self::start), with the plugin directory watched for new
    /// versions when `watch` is set.
    pub fn start_watching(&self, data: &str, cache: &str, watch: bool) -> Host {
        self.start_with(data, cache, watch, &[])
    }

    /// [`start_watching`](Self::start_watching) with more `rehydra run`
    /// arguments.
    pub fn start_with(&self, data: &str, cache: &str, watch: bool, extra: &[&str]) -> Host {
        let d = self.path();
        let t0 = Instant::now();
        let mut child = Command::new(binary())
            .arg("run")
            .arg("--plugins")
            .arg(d.join("plugins"))
            .arg("--store")
            .arg(format!("embedded://{}", d.join(data).display()))
            .arg("--cache-dir")
            .arg(d.join(cache))
            .args(["--http", "127.0.0.1:0", "--grpc", "off"])
            .args(if watch { None } else { Some("--no-watch") })
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting rehydra");
        match rehydra_e2e::wait_until_listening(&mut child, Duration::from_secs(120)) {
            Some(base) => Host {
                child,
                base,
                ready_after: t0.elapsed(),
            },
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("rehydra did not become ready within 120 s");
            }
        }
    }
}

/// Scenario (e): `runs` starts with an empty compile cache and `runs`
/// with a warm one, each on a fresh data directory. Median times.
pub fn startup(runs: usize) -> (Duration, Duration) {
    let dir = HostDir::new();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let cache = format!("cache-cold-{i}");
        let host = dir.start(&format!("data-cold-{i}"), &cache);
        cold.push(host.ready_after.as_secs_f64());
        drop(host);
        let host = dir.start(&format!("data-warm-{i}"), &cache);
        warm.push(host.ready_after.as_secs_f64());
    }
    (
        Duration::from_secs_f64(crate::stats::median(cold)),
        Duration::from_secs_f64(crate::stats::median(warm)),
    )
}

/// The second version of bank-account the reload scenario deploys:
/// `target/test-plugins/bank-account-withdrawal-fee.wasm`.
pub fn next_version_wasm() -> PathBuf {
    let path = target_dir()
        .join("test-plugins")
        .join("bank-account-withdrawal-fee.wasm");
    assert!(
        path.exists(),
        "{} is missing: run `make test-plugins` (make bench does)",
        path.display()
    );
    path
}

/// The hash of the bank-account version the host serves now.
async fn served_hash(http: &reqwest::Client, base: &str) -> Option<String> {
    let body: serde_json::Value = http
        .get(format!("{base}/v1/plugins"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["aggregate_type"] == "bank-account")?["hash"]
        .as_str()
        .map(str::to_string)
}

/// Renames `bytes` over the plugin file (as a deploy should) and returns
/// the time until the host serves a version other than `old_hash`.
async fn deploy_and_wait(
    http: &reqwest::Client,
    host: &Host,
    plugins: &Path,
    bytes: &[u8],
    old_hash: &str,
) -> Duration {
    let tmp = plugins.join("bank-account.wasm.tmp");
    std::fs::write(&tmp, bytes).expect("writing the new version");
    let t0 = Instant::now();
    std::fs::rename(&tmp, plugins.join("bank-account.wasm")).expect("deploying it");
    loop {
        match served_hash(http, &host.base).await {
            Some(h) if h != old_hash => return t0.elapsed(),
            _ if t0.elapsed() > Duration::from_secs(120) => {
                panic!("the new version was not served within 120 s")
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Scenario (e, continued): hot-reload latency, from renaming a new
/// version into the watched plugin directory until `/v1/plugins` shows it
/// served (the watcher's debounce, reading, hashing, compiling or taking
/// from the cache, validating, swapping). Cold: the version is not in the
/// compile cache; warm: it is (rolling back to the version the host
/// started with). Median times of `runs`, each on a fresh directory.
pub async fn reload(runs: usize) -> (Duration, Duration) {
    let v1 = std::fs::read(bank_account_wasm()).expect("reading bank-account");
    let v2 = std::fs::read(next_version_wasm()).expect("reading its next version");
    let http = reqwest::Client::new();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let dir = HostDir::new();
        let plugins = dir.path().join("plugins");
        let host = dir.start_watching("data", "cache", true);
        let first = served_hash(&http, &host.base)
            .await
            .expect("bank-account is served");
        let took = deploy_and_wait(&http, &host, &plugins, &v2, &first).await;
        cold.push(took.as_secs_f64());
        let second = served_hash(&http, &host.base).await.expect("still served");
        let took = deploy_and_wait(&http, &host, &plugins, &v1, &second).await;
        warm.push(took.as_secs_f64());
    }
    (
        Duration::from_secs_f64(crate::stats::median(cold)),
        Duration::from_secs_f64(crate::stats::median(warm)),
    )
}

/// POSTs a bank-account command; Ok if the host answered 200.
async fn post(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    command: &str,
    body: &serde_json::Value,
) -> Result<(), String> {
    let url = format!("{base}/v1/aggregates/bank-account/{id}/commands/{command}");
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        // Read the body so that the connection goes back to the pool.
        resp.bytes().await.map_err(|e| e.to_string())?;
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status()))
    }
}

/// Opens accounts `agg_id(0..n)` over HTTP, 32 at a time.
pub async fn open_accounts(client: &reqwest::Client, base: &Arc<str>, n: usize) {
    let mut tasks = Vec::new();
    for p in 0..32.min(n) {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = p;
            while i < n {
                post(
                    &client,
                    &base,
                    &agg_id(i),
                    "open",
                    &json!({"owner": "bench"}),
                )
                .await
                .expect("opening an account over HTTP");
                i += 32;
            }
        }));
    }
    for t in tasks {
        t.await.expect("an opening task");
    }
}

/// Scenario (b): one host with a warm cache; `n` accounts opened over
/// HTTP; then, at each concurrency level, `runs` runs of `secs` with that
/// many client tasks POSTing deposits, each over its share of the
/// accounts ([`client_accounts`]).
pub async fn throughput(
    n: usize,
    concurrency: &[usize],
    runs: usize,
    secs: f64,
) -> Vec<(usize, RunResult)> {
    let dir = HostDir::new();
    let host = dir.start(&format!("data-{n}"), "cache");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("an HTTP client");
    let base: Arc<str> = host.base.clone().into();
    open_accounts(&client, &base, n).await;
    let mut out = Vec::new();
    for &c in concurrency {
        let mut results = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(secs);
            let mut tasks = Vec::new();
            for t in 0..c {
                let (client, base) = (client.clone(), base.clone());
                tasks.push(tokio::spawn(async move {
                    let body = json!({"amount": 1});
                    let mut lat = Vec::with_capacity(4096);
                    let mut errors = 0usize;
                    let mine = client_accounts(t, c, n);
                    let mut k = 0;
                    while Instant::now() < deadline {
                        let id = agg_id(mine[k % mine.len()]);
                        k += 1;
                        let t0 = Instant::now();
                        match post(&client, &base, &id, "deposit", &body).await {
                            Ok(()) => lat.push(t0.elapsed().as_nanos() as u64),
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, errors)
                }));
            }
            let (all, errors) = crate::stats::join_clients(tasks).await;
            let r = RunResult::from_latencies(all, start.elapsed(), errors);
            eprintln!(
                "  http n={n} c={c}: {:.0}/s p99 {:?} ({} errors)",
                r.per_sec, r.p99, r.errors
            );
            results.push(r);
        }
        out.push((c, RunResult::median_of(&results)));
    }
    drop(host);
    out
}

/// Accounts and connections of the wrk scenario (issue 18's figure:
/// 1,000 accounts, 64 connections).
pub const WRK_ACCOUNTS: usize = 1000;
/// wrk's connections in the HTTP scenario.
pub const WRK_CONNECTIONS: usize = 64;

/// Scenario: one host with a warm cache on `embedded://`, [`WRK_ACCOUNTS`]
/// accounts opened over HTTP, then `runs` runs of wrk for `secs` — the
/// load generator in a process of its own, unlike [`throughput`]'s
/// reqwest clients, which share this process's cores and CPU count. The
/// CPU per command is the host's alone. wrk reports no p999 (zero here).
pub async fn wrk_throughput(runs: usize, secs: f64) -> RunResult {
    let dir = HostDir::new();
    let host = dir.start("data-wrk", "cache");
    let client = reqwest::Client::new();
    let base: Arc<str> = host.base.clone().into();
    open_accounts(&client, &base, WRK_ACCOUNTS).await;
    let script = dir.path().join("deposit.lua");
    std::fs::write(&script, crate::wrk::deposit_script(WRK_ACCOUNTS))
        .expect("writing the wrk script");
    let pid = host.child.id().to_string();
    let cpu = || crate::stats::proc_cpu(&pid).map_or(Duration::ZERO, |c| c.own);
    let mut results = Vec::new();
    for _ in 0..runs {
        let before = cpu();
        let report = crate::wrk::run(&base, WRK_CONNECTIONS, secs, &script).await;
        let used = cpu().saturating_sub(before);
        let r = RunResult {
            per_sec: report.per_sec,
            p50: report.p50,
            p99: report.p99,
            p999: Duration::ZERO,
            ops: report.requests as usize,
            errors: report.failed as usize,
            cpu_per_op: used.div_f64(report.requests),
            server_cpu_per_op: Duration::ZERO,
        };
        eprintln!(
            "  http wrk c={WRK_CONNECTIONS}: {:.0}/s p99 {:?} ({} non-2xx)",
            r.per_sec, r.p99, r.errors
        );
        results.push(r);
    }
    drop(host);
    RunResult::median_of(&results)
}

/// What one load level of the overload scenario measured.
#[derive(Debug, Clone)]
pub struct OverloadResult {
    /// Client tasks sending commands back to back.
    pub clients: usize,
    /// Accepted (200) commands per second, and their latencies.
    pub accepted: RunResult,
    /// `overloaded` answers per second.
    pub overloaded_per_sec: f64,
    /// Answers that were neither 200 nor `overloaded` (and transport
    /// errors).
    pub other: usize,
    /// The host's resident memory at the start, KiB.
    pub rss_start_kib: u64,
    /// The most resident memory sampled in the first half of the run, KiB.
    pub rss_first_half_kib: u64,
    /// The most resident memory sampled in the second half, KiB: equal to
    /// the first half's when memory is flat under the load.
    pub rss_second_half_kib: u64,
}

/// Scenario: one host on `embedded://` with `--max-in-flight` `cap`; for
/// each client count, `secs` of deposits sent back to back by that many
/// tasks over 1,000 accounts. Reports the accepted commands' rate and
/// latency, the `overloaded` rate, anything else, and the host's memory.
pub async fn overload(cap: usize, clients: &[usize], secs: f64) -> Vec<OverloadResult> {
    let n = 1000;
    let dir = HostDir::new();
    let cap_arg = cap.to_string();
    let host = dir.start_with("data", "cache", false, &["--max-in-flight", &cap_arg]);
    let pid = host.child.id();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .build()
        .expect("an HTTP client");
    let base: Arc<str> = host.base.clone().into();
    open_accounts(&client, &base, n).await;
    let mut out = Vec::new();
    for &c in clients {
        let rss_start_kib = rehydra_e2e::rss_kib_of(pid);
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let start = Instant::now();
        let half = Duration::from_secs_f64(secs / 2.0);
        let sampler = {
            let sampling = sampling.clone();
            tokio::spawn(async move {
                let (mut first, mut second) = (0, 0);
                while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    let rss = rehydra_e2e::rss_kib_of(pid);
                    if start.elapsed() < half {
                        first = first.max(rss);
                    } else {
                        second = second.max(rss);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (first, second)
            })
        };
        let deadline = start + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for t in 0..c {
            let (client, base) = (client.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let body = json!({"amount": 1});
                let (mut lat, mut overloaded, mut other) = (Vec::new(), 0usize, 0usize);
                let mine = client_accounts(t, c, n);
                let mut k = 0;
                while Instant::now() < deadline {
                    let id = agg_id(mine[k % mine.len()]);
                    k += 1;
                    let url = format!("{base}/v1/aggregates/bank-account/{id}/commands/deposit");
                    let t0 = Instant::now();
                    match client.post(url).json(&body).send().await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let text = resp.text().await.unwrap_or_default();
                            if status == 200 {
                                lat.push(t0.elapsed().as_nanos() as u64);
                            } else if status == 503 && text.contains("\"overloaded\"") {
                                overloaded += 1;
                            } else {
                                other += 1;
                            }
                        }
                        Err(_) => other += 1,
                    }
                }
                (lat, overloaded, other)
            }));
        }
        let (mut all, mut overloaded, mut other) = (Vec::new(), 0, 0);
        for t in tasks {
            let (lat, o, e) = t.await.expect("a client task");
            all.extend(lat);
            overloaded += o;
            other += e;
        }
        let elapsed = start.elapsed();
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        let (rss_first_half_kib, rss_second_half_kib) = sampler.await.expect("the sampler");
        let accepted = RunResult::from_latencies(all, elapsed, 0);
        eprintln!(
            "  overload cap={cap} c={c}: {:.0}/s accepted p99 {:?}, {:.0}/s overloaded, {other} other, RSS {rss_start_kib}→{rss_first_half_kib}→{rss_second_half_kib} KiB",
            accepted.per_sec,
            accepted.p99,
            overloaded as f64 / elapsed.as_secs_f64()
        );
        out.push(OverloadResult {
            clients: c,
            accepted,
            overloaded_per_sec: overloaded as f64 / elapsed.as_secs_f64(),
            other,
            rss_start_kib,
            rss_first_half_kib,
            rss_second_half_kib,
        });
    }
    drop(host);
    out
}
