//! wrk, the HTTP load generator that runs outside the measured process:
//! the deposit script it sends and the report it prints, read back.
//! (Debian's `wrk` package; `scripts/ensure-system-packages --bench`.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct WrkReport {
    /// Requests answered per second.
    pub per_sec: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Requests answered.
    pub requests: f64,
    /// Requests answered with a status other than 2xx or 3xx.
    pub failed: f64,
}

/// The wrk script: one deposit of 1 on a random account of `accounts`
/// (`acc-0` …) per request, each wrk thread with its own random sequence.
pub fn deposit_script(accounts: usize) -> String {
    format!(
        r#"local n = {accounts}
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end
function init(args)
  math.randomseed(seed * 7919 + os.time())
end
local headers = {{ ["Content-Type"] = "application/json" }}
function request()
  local id = math.random(0, n - 1)
  return wrk.format("POST", "/v1/aggregates/bank-account/acc-" .. id .. "/commands/deposit", headers, '{{"amount":1}}')
end
"#
    )
}

/// Runs wrk (two threads, `connections` connections) against `base` for
/// `secs` with `script`, and reads its report.
pub async fn run(base: &str, connections: usize, secs: f64, script: &Path) -> WrkReport {
    let mut wrk = Command::new("wrk");
    wrk.args(["-t2", &format!("-c{connections}")])
        .arg(format!("-d{}s", secs.round().max(1.0) as u64))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(base);
    let out = tokio::task::spawn_blocking(move || wrk.output())
        .await
        .expect("the wrk task")
        .expect("running wrk (Debian's wrk package)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk failed: {text}");
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    let per_sec = field("Requests/sec:")
        .and_then(|v| v.parse::<f64>().ok())
        .expect("wrk reports requests/s");
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        .max(1.0);
    let failed = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let pct = |p: &str| {
        field(p)
            .and_then(|v| duration(&v))
            .unwrap_or(Duration::ZERO)
    };
    WrkReport {
        per_sec,
        p50: pct("50%"),
        p99: pct("99%"),
        requests,
        failed,
    }
}

/// A duration in wrk's form (`812.00us`, `3.47ms`, `1.02s`).
fn duration(s: &str) -> Option<Duration> {
    let (num, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else {
        return None;
    };
    num.parse::<f64>()
        .ok()
        .map(|v| Duration::from_secs_f64(v * scale))
}
