//! Test harness for the end-to-end tests: starts the real `rehydra` binary
//! on a temporary directory and a free port, with the real example plugins,
//! and talks to it over HTTP like a user would.
//!
//! Build first (`make test` does): `cargo build -p rehydra` and
//! `make plugins` (the plugins land in `target/plugins/`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod seeded;
pub mod store_files;

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target"),
    }
}

/// The `rehydra` binary under test (`REHYDRA_BIN` overrides).
pub fn binary() -> PathBuf {
    let path = match std::env::var_os("REHYDRA_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join("rehydra"),
    };
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p rehydra` (make test does)",
        path.display()
    );
    path
}

/// A built example plugin, `target/plugins/<name>.wasm`.
pub fn plugin(name: &str) -> PathBuf {
    let path = target_dir().join("plugins").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make plugins` (make test does)",
        path.display()
    );
    path
}

/// The bank-account example in each language it is written in: Rust,
/// JavaScript and Python. They must answer every request alike; the
/// bank-account tests run against each ([`for_each_bank_account!`]).
pub const BANK_ACCOUNTS: [&str; 3] = ["bank-account", "bank-account-js", "bank-account-py"];

/// The stream prefix of an example: its name with `-` turned into `_`
/// (`bank_account_js-<id>`).
pub fn stream_prefix(plugin: &str) -> String {
    plugin.replace('-', "_")
}

/// Defines, for a scenario `async fn NAME(plugin: &str)`, a module `NAME`
/// with one test per bank-account implementation (`NAME::rust`,
/// `NAME::js`, `NAME::python`), so that each language passes or fails on
/// its own.
#[macro_export]
macro_rules! for_each_bank_account {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn rust() {
                super::$scenario($crate::BANK_ACCOUNTS[0]).await
            }
            #[tokio::test]
            async fn js() {
                super::$scenario($crate::BANK_ACCOUNTS[1]).await
            }
            #[tokio::test]
            async fn python() {
                super::$scenario($crate::BANK_ACCOUNTS[2]).await
            }
        }
    )+};
}

/// Where test hosts keep compiled plugins: one cache shared by every test
/// (entries are keyed by content and engine, and written atomically), so
/// that a JS or Python plugin — seconds to compile — is compiled once per
/// build, not once per test.
pub fn compile_cache_dir() -> PathBuf {
    target_dir().join("e2e-compile-cache")
}

/// Held while a host starts: a cold compile then happens in one host only,
/// and the hosts that wait for it find it in the cache.
static STARTING: Mutex<()> = Mutex::new(());

/// A hostile plugin file built by `make test-plugins`,
/// `target/test-plugins/<name>.wasm`.
pub fn test_plugin(name: &str) -> PathBuf {
    let path = target_dir()
        .join("test-plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make test-plugins` (make test does)",
        path.display()
    );
    path
}

/// Waits for a `rehydra run` child (spawned with its stdout piped) to print
/// `listening on http://ADDR` and then `plugins ready` (every plugin file
/// loaded, background compilations included), and returns that URL; `None`
/// if it did not within `timeout` or exited. Keeps draining its stdout
/// afterwards.
pub fn wait_until_listening(child: &mut Child, timeout: Duration) -> Option<String> {
    wait_until_ready(child, timeout).map(|ready| ready.http)
}

/// Where a ready host serves.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The HTTP base URL, `http://127.0.0.1:PORT`.
    pub http: String,
    /// The gRPC endpoint, `http://127.0.0.1:PORT`, if it serves gRPC.
    pub grpc: Option<String>,
}

/// Like [`wait_until_listening`], also returning the gRPC endpoint (the
/// host prints `grpc listening on …` before the HTTP line).
pub fn wait_until_ready(child: &mut Child, timeout: Duration) -> Option<Ready> {
    let lines = stdout_lines(child)?;
    let deadline = Instant::now() + timeout;
    let mut grpc = None;
    let http = wait_for_line(&lines, deadline, |l| {
        if let Some(url) = l.strip_prefix("grpc listening on ") {
            grpc = Some(url.trim().to_string());
        }
        listening_url(l)
    })?;
    wait_for_line(&lines, deadline, plugins_ready)?;
    Some(Ready { http, grpc })
}

/// The HTTP URL in the host's `listening on http://ADDR` line.
pub fn listening_url(line: &str) -> Option<String> {
    line.strip_prefix("listening on ")
        .map(|u| u.trim().to_string())
}

/// Whether the line is the host's `plugins ready`.
pub fn plugins_ready(line: &str) -> Option<()> {
    (line.trim() == "plugins ready").then_some(())
}

/// Takes a child's piped stdout and hands its lines over a channel, read by
/// a thread that keeps draining it until the child exits.
pub fn stdout_lines(child: &mut Child) -> Option<mpsc::Receiver<String>> {
    let stdout = child.stdout.take()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            // The receiver may be gone; keep draining so the child never blocks.
            let _ = tx.send(line);
        }
    });
    Some(rx)
}

/// Reads `lines` until `matches` accepts one, and returns what it made of
/// it; `None` at `deadline` or when the stream ends.
pub fn wait_for_line<T>(
    lines: &mpsc::Receiver<String>,
    deadline: Instant,
    mut matches: impl FnMut(&str) -> Option<T>,
) -> Option<T> {
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let line = lines.recv_timeout(left).ok()?;
        if let Some(found) = matches(&line) {
            return Some(found);
        }
    }
}

/// A running host and the directory it owns.
pub struct Host {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The gRPC endpoint, `http://127.0.0.1:PORT`.
    pub grpc: String,
    /// The temporary directory: `plugins/`, `data/`, `host.log`.
    pub dir: tempfile::TempDir,
    extra_args: Vec<String>,
    http: reqwest::Client,
}

impl Host {
    /// Starts a host with the given example plugins on an embedded store.
    pub fn start(plugins: &[&str]) -> Host {
        Host::start_with(plugins, &[])
    }

    /// Like [`start`](Self::start), with extra `rehydra run` arguments.
    pub fn start_with(plugins: &[&str], extra_args: &[&str]) -> Host {
        let files: Vec<(String, Vec<u8>)> = plugins
            .iter()
            .map(|name| {
                (
                    format!("{name}.wasm"),
                    std::fs::read(plugin(name)).expect("reading a plugin"),
                )
            })
            .collect();
        Host::start_files(&files, extra_args)
    }

    /// Starts a host whose plugin directory holds exactly `files`
    /// (file name, contents).
    pub fn start_files(files: &[(String, Vec<u8>)], extra_args: &[&str]) -> Host {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugin_dir).expect("the plugin directory");
        for (name, bytes) in files {
            std::fs::write(plugin_dir.join(name), bytes).expect("writing a plugin file");
        }
        let mut host = Host {
            child: None,
            base: String::new(),
            grpc: String::new(),
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            http: reqwest::Client::new(),
        };
        host.spawn();
        host
    }

    /// The arguments of `rehydra run` for this host's directory: the
    /// embedded store in `data/` and the shared compile cache unless the
    /// test passes its own `--store` or `--cache-dir`.
    fn run_args(&self) -> Vec<String> {
        let d = self.dir.path();
        let given = |flag: &str| self.extra_args.iter().any(|a| a == flag);
        let mut args = vec![
            "run".to_string(),
            "--plugins".into(),
            d.join("plugins").display().to_string(),
            "--http".into(),
            "127.0.0.1:0".into(),
        ];
        if !given("--store") {
            args.extend([
                "--store".into(),
                format!("embedded://{}", d.join("data").display()),
            ]);
        }
        if !given("--cache-dir") {
            args.extend([
                "--cache-dir".into(),
                compile_cache_dir().display().to_string(),
            ]);
        }
        // A free loopback port for gRPC, unless the test chose its own.
        if !self.extra_args.iter().any(|a| a == "--grpc") {
            args.extend(["--grpc".to_string(), "127.0.0.1:0".into()]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self) {
        let _starting = STARTING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("host.log"))
            .expect("the host log");
        let mut child = Command::new(binary())
            .args(self.run_args())
            .env("RUST_LOG", "info,rehydra=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting rehydra");
        // A cold compile of a JS or Python plugin takes up to a minute on a
        // busy two-core machine.
        let ready = wait_until_ready(&mut child, Duration::from_secs(300));
        self.child = Some(child);
        match ready {
            Some(ready) => {
                self.base = ready.http;
                self.grpc = ready.grpc.unwrap_or_default();
            }
            None => panic!("rehydra did not become ready; its log:\n{}", self.log()),
        }
    }

    /// The host process's id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the host is running")
    }

    /// The host's resident memory in KiB (Linux `VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.pid())
    }

    /// The host's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("host.log")).unwrap_or_default()
    }

    /// Kills the host with SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on Unix
            let _ = child.wait();
        }
    }

    /// Waits up to `limit` for the host to exit on its own (after a
    /// signal); its exit status, or `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Starts the host again on the same directory (killing it first if it
    /// still runs).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `POST /v1/aggregates/{type}/{id}/commands/{command}` with a JSON body.
    pub async fn command(
        &self,
        aggregate_type: &str,
        id: &str,
        command: &str,
        body: Value,
    ) -> (u16, Value) {
        self.command_raw(aggregate_type, id, command, &body.to_string(), &[])
            .await
    }

    /// A command with a raw body and extra headers.
    pub async fn command_raw(
        &self,
        aggregate_type: &str,
        id: &str,
        command: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!(
            "{}/v1/aggregates/{aggregate_type}/{id}/commands/{command}",
            self.base
        );
        let mut req = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::finish(req).await
    }

    /// `POST` to a path with no body, e.g. `/v1/plugins/reload`.
    pub async fn command_raw_post(&self, path: &str) -> (u16, Value) {
        Self::finish(self.http.post(format!("{}{path}", self.base))).await
    }

    /// The host's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("the host answers")
            .text()
            .await
            .expect("a body")
    }

    /// `GET` a path, e.g. `/v1/plugins`.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        Self::finish(self.http.get(format!("{}{path}", self.base))).await
    }

    /// An aggregate's state (the `state` of `GET /v1/aggregates/…`),
    /// failing the test unless the read answers 200.
    pub async fn state(&self, aggregate_type: &str, id: &str) -> Value {
        let (status, body) = self
            .get(&format!("/v1/aggregates/{aggregate_type}/{id}"))
            .await;
        assert_eq!(status, 200, "{aggregate_type}/{id}: {body}");
        body["state"].clone()
    }

    /// A command that must succeed (200), failing the test otherwise.
    pub async fn command_ok(&self, aggregate_type: &str, id: &str, command: &str, body: Value) {
        let (status, answer) = self.command(aggregate_type, id, command, body).await;
        assert_eq!(status, 200, "{aggregate_type}/{id} {command}: {answer}");
    }

    /// Every event of `stream`, read page after page (a page holds at most
    /// 1,000 events).
    pub async fn read_stream(&self, stream: &str) -> Vec<Value> {
        self.read_stream_from(stream, 1).await
    }

    /// The stream's events from version `first` on, page after page.
    pub async fn read_stream_from(&self, stream: &str, first: u64) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let from = first + events.len() as u64;
            let (status, page) = self
                .get(&format!("/v1/streams/{stream}?from={from}&limit=1000"))
                .await;
            assert_eq!(status, 200, "{stream}: {page}");
            let batch = page["events"]
                .as_array()
                .unwrap_or_else(|| panic!("{stream}: no events in {page}"));
            if batch.is_empty() {
                return events;
            }
            events.extend(batch.iter().cloned());
        }
    }

    async fn finish(req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.expect("the host answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"));
        (status, body)
    }

    /// Runs the `rehydra` CLI against this host; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(binary())
            .args(args)
            .env("REHYDRA_SERVER", &self.base)
            .output()
            .expect("running the rehydra CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A throwaway PostgreSQL server (`pg-harness`), started off the async
/// workers; fails the test with what to install when none can start.
pub async fn pg_server() -> pg_harness::PgServer {
    tokio::task::spawn_blocking(pg_harness::PgServer::start)
        .await
        .expect("join")
        .expect("a throwaway PostgreSQL server (install Debian's postgresql: make test does)")
}

/// `n` hosts with `plugins` on the store at `url`, each with its own
/// compile cache (as several hosts on one store are deployed); keep the
/// returned directories as long as the hosts.
pub fn hosts_on(plugins: &[&str], url: &str, n: usize) -> (Vec<Host>, Vec<tempfile::TempDir>) {
    let mut hosts = Vec::new();
    let mut caches = Vec::new();
    for _ in 0..n {
        let cache = tempfile::tempdir().expect("a cache directory");
        let cache_arg = cache.path().display().to_string();
        hosts.push(Host::start_with(
            plugins,
            &["--store", url, "--cache-dir", &cache_arg],
        ));
        caches.push(cache);
    }
    (hosts, caches)
}

/// The resident memory of process `pid` in KiB (Linux `VmRSS`; 0 if unknown).
pub fn rss_kib_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The value of the sample `name{labels}` (labels as printed, in order) in
/// `/metrics` text, or `None` if there is no such line.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok())?
    })
}

/// Polls `check` every 50 ms until it gives `Some`, for at most `limit`;
/// fails the test naming `what` when it never does.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The error code of an error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}
