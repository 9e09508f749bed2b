//! Several hosts behind nginx: three `rehydra run` processes on one
//! `postgres://` store, nginx in front with the shipped configuration
//! (`deploy/nginx/rehydra.conf`, only the addresses replaced), and load
//! from wrk — deposits on random accounts of 1,000 — once with the
//! configuration's consistent hashing on the aggregate and once with
//! nginx's default round-robin (the `hash` line removed), to show what the
//! routing saves: conflicts between hosts writing the same aggregate.
//!
//! A conflict is an append refused because another host wrote the stream
//! first; the host catches up and runs the command again (up to
//! `--conflict-retries`), and logs each such retry at debug level, which
//! is how they are counted here (each host logs only that module at debug).
//! A fresh server and fresh hosts per run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::http::binary;
use crate::inproc::bank_account_wasm;
use crate::postgres::Server;
use crate::stats::{median, proc_cpu};

/// The hosts behind nginx.
pub const HOSTS: usize = 3;
/// Accounts the load spreads over.
pub const ACCOUNTS: usize = 1000;
/// wrk's connections (two threads).
pub const CONNECTIONS: usize = 64;
/// What each host logs: warnings, and the actor's conflict retries.
const HOST_LOG: &str = "warn,rehydra::actor::aggregate=debug";
/// The line a host logs for each conflict it retries.
const CONFLICT_LINE: &str = "conflict with another writer";

/// How nginx picks a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// `hash $rehydra_route consistent` on the aggregate, as shipped.
    Consistent,
    /// nginx's default: each request to the next host.
    RoundRobin,
}

impl Routing {
    /// For tables.
    pub fn label(self) -> &'static str {
        match self {
            Routing::Consistent => "consistent hashing on the aggregate",
            Routing::RoundRobin => "round-robin",
        }
    }
}

/// What one run (or the medians of several) measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterResult {
    /// Commands answered per second (wrk's requests/s).
    pub per_sec: f64,
    /// wrk's median latency.
    pub p50: Duration,
    /// wrk's 99th percentile.
    pub p99: Duration,
    /// Requests answered with a status other than 2xx/3xx (conflicts that
    /// outlasted the retries, among others), per request.
    pub failed_rate: f64,
    /// Conflicts the hosts retried, per command answered.
    pub conflict_rate: f64,
    /// The three hosts' CPU per command.
    pub hosts_cpu: Duration,
    /// The PostgreSQL server's CPU per command.
    pub server_cpu: Duration,
}

/// A process stopped (by its own pid) when dropped: SIGTERM first, for
/// nginx's master to stop its workers, then SIGKILL after 5 s.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..250 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn cpu(&self) -> Duration {
        proc_cpu(&self.0.id().to_string()).map_or(Duration::ZERO, |c| c.own)
    }
}

/// The shipped nginx configuration.
fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/rehydra.conf")
}

/// The shipped configuration with nginx listening on `listen`, the given
/// hosts as the upstream servers, and, for round-robin, no `hash` line.
fn nginx_config(shipped: &str, listen: u16, hosts: &[String], routing: Routing) -> String {
    let mut out = String::new();
    for line in shipped.lines() {
        let t = line.trim_start();
        if t.starts_with("server 127.0.0.1:") {
            continue;
        }
        if t.starts_with("hash ") && routing == Routing::RoundRobin {
            continue;
        }
        if t.starts_with("listen ") {
            out.push_str(&format!("        listen 127.0.0.1:{listen};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if t.starts_with("upstream rehydra") {
            for h in hosts {
                out.push_str(&format!(
                    "        server {h} max_fails=1 fail_timeout=5s;\n"
                ));
            }
        }
    }
    out
}

/// Conflict lines the hosts have logged so far.
fn conflicts(logs: &[PathBuf]) -> usize {
    logs.iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .matches(CONFLICT_LINE)
                .count()
        })
        .sum()
}

/// One run: a fresh server, [`HOSTS`] hosts, nginx routed by `routing`,
/// [`ACCOUNTS`] accounts opened, then wrk for `secs`.
async fn run_once(routing: Routing, secs: f64) -> ClusterResult {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("the plugin directory");
    std::fs::copy(bank_account_wasm(), plugins.join("bank-account.wasm"))
        .expect("copying the plugin");
    let server = Server::start().await;
    let url = server.url();

    let mut hosts = Vec::new();
    let mut addrs = Vec::new();
    let mut logs = Vec::new();
    for i in 0..HOSTS {
        let log = dir.path().join(format!("host-{i}.log"));
        let (plugins, url, cache, log2) = (
            plugins.clone(),
            url.clone(),
            dir.path().join(format!("cache-{i}")),
            log.clone(),
        );
        let (child, base) = tokio::task::spawn_blocking(move || {
            let mut child = Command::new(binary())
                .arg("run")
                .arg("--plugins")
                .arg(&plugins)
                .args(["--store", &url])
                .arg("--cache-dir")
                .arg(&cache)
                .args(["--http", "127.0.0.1:0", "--grpc", "off", "--no-watch"])
                .env("RUST_LOG", HOST_LOG)
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log2).expect("a host log file"))
                .spawn()
                .expect("starting rehydra");
            let base = rehydra_e2e::wait_until_listening(&mut child, Duration::from_secs(120));
            (Proc(child), base)
        })
        .await
        .expect("a host start task");
        let base = base.expect("a host became ready within 120 s");
        addrs.push(base.trim_start_matches("http://").to_string());
        hosts.push(child);
        logs.push(log);
    }

    let shipped = std::fs::read_to_string(shipped_config()).expect("deploy/nginx/rehydra.conf");
    let port = pg_harness::free_port().expect("a free port");
    std::fs::create_dir_all(dir.path().join("tmp")).expect("nginx's temporary directory");
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, nginx_config(&shipped, port, &addrs, routing))
        .expect("writing the nginx configuration");
    let nginx = Proc(
        Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx (Debian's nginx package)"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http.get(format!("{base}/v1/plugins")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Open the accounts through nginx.
    let base: Arc<str> = base.into();
    crate::http::open_accounts(&http, &base, ACCOUNTS).await;

    let script = dir.path().join("deposit.lua");
    std::fs::write(&script, crate::wrk::deposit_script(ACCOUNTS)).expect("writing the wrk script");
    let conflicts_before = conflicts(&logs);
    let hosts_cpu: Duration = hosts.iter().map(Proc::cpu).sum();
    let server_cpu = server.cpu();
    let report = crate::wrk::run(&base, CONNECTIONS, secs, &script).await;
    let hosts_cpu = hosts
        .iter()
        .map(Proc::cpu)
        .sum::<Duration>()
        .saturating_sub(hosts_cpu);
    let server_cpu = server.cpu().saturating_sub(server_cpu);
    // Let the hosts' logs reach their files.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conflicted = conflicts(&logs) - conflicts_before;

    drop(nginx);
    drop(hosts);
    server.stop().await;

    let requests = report.requests;
    let per = |d: Duration| d.div_f64(requests);
    let r = ClusterResult {
        per_sec: report.per_sec,
        p50: report.p50,
        p99: report.p99,
        failed_rate: report.failed / requests,
        conflict_rate: conflicted as f64 / requests,
        hosts_cpu: per(hosts_cpu),
        server_cpu: per(server_cpu),
    };
    eprintln!(
        "  {}: {:.0}/s p99 {:?}, {:.2} % conflicts, {:.2} % failed",
        routing.label(),
        r.per_sec,
        r.p99,
        r.conflict_rate * 100.0,
        r.failed_rate * 100.0
    );
    r
}

/// `runs` pairs of runs, consistent hashing then round-robin, each of
/// `secs`; the medians of each.
pub async fn compare(runs: usize, secs: f64) -> Vec<(Routing, ClusterResult)> {
    let routings = [Routing::Consistent, Routing::RoundRobin];
    let mut results: Vec<Vec<ClusterResult>> = vec![Vec::new(); routings.len()];
    for _ in 0..runs {
        for (i, &routing) in routings.iter().enumerate() {
            results[i].push(run_once(routing, secs).await);
        }
    }
    routings
        .iter()
        .zip(results)
        .map(|(&routing, rs)| {
            let pick = |f: fn(&ClusterResult) -> f64| median(rs.iter().map(f).collect());
            let dur = |f: fn(&ClusterResult) -> Duration| {
                Duration::from_secs_f64(median(rs.iter().map(|r| f(r).as_secs_f64()).collect()))
            };
            (
                routing,
                ClusterResult {
                    per_sec: pick(|r| r.per_sec),
                    p50: dur(|r| r.p50),
                    p99: dur(|r| r.p99),
                    failed_rate: pick(|r| r.failed_rate),
                    conflict_rate: pick(|r| r.conflict_rate),
                    hosts_cpu: dur(|r| r.hosts_cpu),
                    server_cpu: dur(|r| r.server_cpu),
                },
            )
        })
        .collect()
}
