//! The sandbox end to end: the `faulty` plugin's every misbehaviour ends in
//! its defined error while `ok` (and every other plugin) carries on, broken
//! plugin files are refused at load, a plugin that keeps failing is
//! quarantined, a plugin that floods the log is held to its log rate, a
//! soak of hostile and healthy commands stores nothing from the failures
//! and keeps memory flat, and random HTTP input never crashes the host or
//! stores anything.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rehydra::plugin::bindings::WIT_PACKAGE;
use rehydra_e2e::{Host, code, plugin, test_plugin};
use serde_json::{Value, json};

/// A fast deadline for `faulty` alone, so that `spin` costs little; the
/// global one is long, so `spin` failing fast shows the override applies.
const ARGS: &[&str] = &[
    "--handle-deadline",
    "5s",
    "--plugin-deadline",
    "faulty=250ms",
];

async fn ok(host: &Host, id: &str, expect_version: u64) {
    let (status, body) = host.command("faulty", id, "ok", json!({})).await;
    assert_eq!(status, 200, "ok after a failure: {body}");
    assert_eq!(body["version"], expect_version, "{body}");
}

#[tokio::test]
async fn every_misbehaviour_ends_in_its_error_and_ok_carries_on() {
    let host = Host::start_with(&["faulty", "bank-account"], ARGS);
    host.command("bank-account", "bystander", "open", json!({"owner": "Ada"}))
        .await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let mut version = 0;
    version += 1;
    ok(&host, "f1", version).await;
    // (command, data, status, code, reason or message fragment)
    let cases: Vec<(&str, Value, u16, &str, &str)> = vec![
        ("spin", json!({}), 500, "plugin_failed", "deadline_exceeded"),
        ("hog", json!({}), 500, "plugin_failed", "memory_limit"),
        ("panic", json!({}), 500, "plugin_failed", "trap"),
        ("read-file", json!({}), 422, "rejected", "read-file failed"),
        (
            "read-env",
            json!({}),
            422,
            "rejected",
            "no environment variables",
        ),
        (
            "connect",
            json!({"port": port}),
            422,
            "rejected",
            "connect failed",
        ),
        ("huge-event", json!({}), 500, "plugin_failed", "bad_output"),
        ("many-events", json!({}), 500, "plugin_failed", "bad_output"),
        (
            "bad-event-type",
            json!({}),
            500,
            "plugin_failed",
            "bad_output",
        ),
        (
            "undeclared-event",
            json!({}),
            500,
            "plugin_failed",
            "bad_output",
        ),
        ("bad-json", json!({}), 500, "plugin_failed", "bad_output"),
        ("big-state", json!({}), 500, "plugin_failed", "bad_output"),
    ];
    for (command, data, want_status, want_code, want) in cases {
        let started = Instant::now();
        let (status, body) = host.command("faulty", "f1", command, data).await;
        assert_eq!(
            (status, code(&body)),
            (want_status, want_code),
            "{command}: {body}"
        );
        if want_code == "plugin_failed" {
            assert_eq!(
                body["error"]["details"]["reason"], want,
                "{command}: {body}"
            );
            assert_eq!(body["error"]["details"]["plugin"], "faulty");
        } else {
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(want), "{command}: {message}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{command} took {:?}",
            started.elapsed()
        );
        // The aggregate is intact, the failure stored nothing, and the
        // bystander of another plugin is unaffected.
        version += 1;
        ok(&host, "f1", version).await;
        let (status, _) = host
            .command("bank-account", "bystander", "deposit", json!({"amount": 1}))
            .await;
        assert_eq!(status, 200, "after {command}");
    }
    let (_, body) = host.command("faulty", "f1", "spin", json!({})).await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains("250ms"),
        "the plugin's own deadline: {body}"
    );
    // The panic message reaches the client.
    let (_, body) = host.command("faulty", "f1", "panic", json!({})).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("panicked on purpose"),
        "{body}"
    );
    // Nothing connected to the listener.
    assert!(listener.accept().is_err(), "the plugin reached the network");
    // The wall clock is frozen at the epoch.
    let (status, body) = host.command("faulty", "f1", "clock", json!({})).await;
    assert_eq!((status, body["reply"].clone()), (200, json!(0)), "{body}");

    // Exactly the `ok` events were stored.
    let (_, stream) = host.get("/v1/streams/faulty-f1?limit=1000").await;
    let events = stream["events"].as_array().unwrap();
    assert_eq!(events.len() as u64, version);
    assert!(events.iter().all(|e| e["type"] == "Happened"));
    let (_, state) = host.get("/v1/aggregates/faulty/f1").await;
    assert_eq!(state["state"], json!(version));
}

#[tokio::test]
async fn broken_plugin_files_are_refused_and_the_rest_load() {
    let bank = std::fs::read(plugin("bank-account")).unwrap();
    let mut noise = vec![0u8; 4096];
    let mut x: u32 = 0x9e37_79b9;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let files = vec![
        ("bank-account.wasm".to_string(), bank.clone()),
        ("copy-of-bank-account.wasm".to_string(), bank),
        ("noise.wasm".to_string(), noise),
        // The smallest valid core module: a module, not a component.
        ("core-module.wasm".to_string(), b"\0asm\x01\0\0\0".to_vec()),
        (
            "other-world.wasm".to_string(),
            std::fs::read(test_plugin("faulty-other-world")).unwrap(),
        ),
        (
            "describe-traps.wasm".to_string(),
            std::fs::read(test_plugin("faulty-describe-traps")).unwrap(),
        ),
        // A working plugin, built against the previous contract.
        (
            "contract-0-1.wasm".to_string(),
            std::fs::read(test_plugin("faulty-contract-0-1")).unwrap(),
        ),
        ("README.txt".to_string(), b"not a plugin".to_vec()),
    ];
    let host = Host::start_files(&files, &[]);
    let (_, plugins) = host.get("/v1/plugins").await;
    let loaded: Vec<&str> = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(loaded, ["bank-account"]);
    let failed: HashMap<String, String> = plugins["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let name = f["path"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string();
            (name, f["error"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(failed.len(), 6, "{failed:#?}");
    let speaks = format!("this host speaks {WIT_PACKAGE}");
    let expect = [
        ("copy-of-bank-account.wasm", "already provided"),
        ("noise.wasm", "not a WebAssembly component"),
        ("core-module.wasm", "not a WebAssembly component"),
        ("other-world.wasm", WIT_PACKAGE),
        ("describe-traps.wasm", "describe() failed (trap)"),
        // Which contract it has, which one the host has, what to do.
        (
            "contract-0-1.wasm",
            "built against the contract rehydra:aggregate@0.1.0",
        ),
        ("contract-0-1.wasm", &speaks),
        (
            "contract-0-1.wasm",
            "rebuild the plugin against the current Rehydra SDK",
        ),
    ];
    for (file, fragment) in expect {
        let error = failed
            .get(file)
            .unwrap_or_else(|| panic!("{file} not reported: {failed:#?}"));
        assert!(error.contains(fragment), "{file}: {error}");
    }
    assert!(
        failed["describe-traps.wasm"].contains("on purpose"),
        "the panic message is reported"
    );
    // The host serves the plugin that did load.
    let (status, body) = host
        .command("bank-account", "a", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_plugin_that_keeps_failing_is_quarantined_then_recovers() {
    let args = ["--quarantine-after", "3", "--quarantine-backoff", "1500ms"];
    let host = Host::start_with(&["faulty", "bank-account"], &args);
    // Failures on three different aggregates: the plugin, not one
    // aggregate, is what fails.
    for id in ["q1", "q2", "q3"] {
        let (status, body) = host.command("faulty", id, "panic", json!({})).await;
        assert_eq!(
            (status, body["error"]["details"]["reason"].as_str()),
            (500, Some("trap")),
            "{body}"
        );
    }
    let (status, body) = host.command("faulty", "q", "ok", json!({})).await;
    assert_eq!(
        (status, body["error"]["details"]["reason"].as_str()),
        (500, Some("quarantined")),
        "{body}"
    );
    let faulty = faulty_plugin(&host).await;
    assert!(
        faulty["health"]["quarantined_for_ms"].as_u64().unwrap() > 0,
        "{faulty}"
    );
    assert_eq!(faulty["health"]["total_failures"], 3);
    // Other plugins are not affected.
    let (status, _) = host
        .command("bank-account", "b", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200);

    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (status, body) = host.command("faulty", "q", "ok", json!({})).await;
    assert_eq!(status, 200, "served again after the rest: {body}");
    assert_eq!(body["version"], 1, "nothing from the failures was stored");
    let faulty = faulty_plugin(&host).await;
    assert_eq!(faulty["health"]["consecutive_failures"], 0, "{faulty}");
}

/// One client sending commands that make the plugin trap, all to one
/// aggregate, rests that aggregate alone: it gets `aggregate_poisoned`
/// (503, Retry-After) after three failures, the plugin is never
/// quarantined, and clients of other aggregates of the same plugin are
/// served throughout — before, during and after the attack.
#[tokio::test]
async fn traps_on_one_aggregate_rest_that_aggregate_not_the_plugin() {
    let args = ["--quarantine-backoff", "2s"];
    let host = Host::start_with(&["faulty"], &args);
    // Twenty traps in a row, nobody else about: once enough to quarantine
    // a plugin (the default is ten).
    let mut codes = Vec::new();
    for _ in 0..20 {
        let (status, body) = host.command("faulty", "victim", "panic", json!({})).await;
        codes.push((status, rehydra_e2e::code(&body).to_owned()));
    }
    assert_eq!(
        codes[..3],
        vec![(500, "plugin_failed".to_owned()); 3],
        "the first three reach the plugin"
    );
    assert!(
        codes[3..]
            .iter()
            .all(|c| *c == (503, "aggregate_poisoned".to_owned())),
        "then the aggregate rests: {codes:?}"
    );
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/aggregates/faulty/victim/commands/panic",
            host.base
        ))
        .body("{}")
        .send()
        .await
        .expect("the host answers");
    assert_eq!(resp.status(), 503);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    let body: Value = resp.json().await.expect("JSON");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("victim") && message.contains("on purpose"),
        "{message}"
    );

    // Other aggregates, while the attacker goes on.
    let attacker = {
        let base = host.base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for _ in 0..200 {
                let _ = client
                    .post(format!("{base}/v1/aggregates/faulty/victim/commands/panic"))
                    .body("{}")
                    .send()
                    .await;
            }
        })
    };
    for n in 0..30 {
        let id = format!("bystander-{}", n % 3);
        let (status, body) = host.command("faulty", &id, "ok", json!({})).await;
        assert_eq!(status, 200, "{id}: {body}");
    }
    attacker.await.expect("the attacker ran");
    let faulty = faulty_plugin(&host).await;
    assert_eq!(faulty["health"]["quarantined_for_ms"], 0, "{faulty}");
    let metrics = host.metrics().await;
    assert_eq!(
        rehydra_e2e::metric(&metrics, "rehydra_aggregates_poisoned"),
        Some(1.0),
        "{metrics}"
    );
    assert!(host.log().contains("aggregate poisoned"), "logged");

    // The rest ends; the aggregate is served again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = host.command("faulty", "victim", "ok", json!({})).await;
        if status == 200 {
            break;
        }
        assert_eq!(rehydra_e2e::code(&body), "aggregate_poisoned", "{body}");
        assert!(Instant::now() < deadline, "the aggregate never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_plugin_that_floods_the_log_is_held_to_its_rate_and_the_drops_are_counted() {
    const RATE: u64 = 50;
    let host = Host::start_with(
        &["faulty", "bank-account"],
        &["--plugin-log-rate", &RATE.to_string()],
    );
    let started = Instant::now();
    let (status, body) = host
        .command("faulty", "flood", "log-flood", json!({"count": 10_000}))
        .await;
    assert_eq!(status, 200, "{body}");
    // The host serves on, the flooding plugin and the others alike.
    let (status, body) = host
        .command("bank-account", "a", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{body}");
    ok(&host, "f", 1).await;
    let (status, _) = host.get("/healthz").await;
    assert_eq!(status, 200);

    // Of 10,000 lines through `log` and a stdout's worth, a burst of RATE
    // and RATE a second since reached the log; the rest were counted.
    let allowed = RATE + RATE * (started.elapsed().as_secs() + 1);
    let dropped = dropped_log_lines(&host, "faulty").await;
    assert!(
        dropped >= (10_000 - allowed) as f64,
        "{dropped} lines dropped, at most {allowed} may have been logged"
    );
    let logged = host
        .log()
        .lines()
        .filter(|l| l.contains("log-flood line"))
        .count() as u64;
    assert!(
        logged <= allowed,
        "{logged} flood lines logged, past {allowed}"
    );
    assert!(logged >= RATE, "the burst was logged: {logged}");
    assert_eq!(dropped_log_lines(&host, "bank-account").await, 0.0);

    // Once a second has passed, the plugin's next line brings the summary.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = host
        .command("faulty", "flood", "log-flood", json!({"count": 10}))
        .await;
    assert_eq!(status, 200);
    let log = host.log();
    assert!(
        log.lines().any(|l| l.contains("plugin faulty: ")
            && l.contains("log lines dropped in the last")
            && l.contains("--plugin-log-rate")),
        "no summary of the dropped lines in the log:\n{}",
        &log[log.len().saturating_sub(4000)..]
    );
}

/// `rehydra_plugin_log_lines_dropped_total` of `plugin` (0 before any drop).
async fn dropped_log_lines(host: &Host, plugin: &str) -> f64 {
    let text = host.metrics().await;
    let name = format!("rehydra_plugin_log_lines_dropped_total{{plugin=\"{plugin}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&name))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(0.0)
}

/// The `faulty` entry of `GET /v1/plugins`.
async fn faulty_plugin(host: &Host) -> Value {
    let (_, plugins) = host.get("/v1/plugins").await;
    plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "faulty")
        .cloned()
        .unwrap_or(Value::Null)
}

/// What a hostile soak command must answer: (command, status, reason).
const HOSTILE: &[(&str, u16, &str)] = &[
    ("panic", 500, "trap"),
    ("bad-json", 500, "bad_output"),
    ("undeclared-event", 500, "bad_output"),
    ("huge-event", 500, "bad_output"),
    ("read-file", 422, ""),
    ("spin", 500, "deadline_exceeded"),
    ("hog", 500, "memory_limit"),
];

#[tokio::test]
async fn soak_of_healthy_and_hostile_commands() {
    // Quarantine has its own test; here every command must reach the plugin.
    let args = [
        "--handle-deadline",
        "250ms",
        "--quarantine-after",
        "0",
        "--poison-after",
        "0",
    ];
    let host = Host::start_with(&["faulty"], &args);
    const WORKERS: usize = 8;
    const PER_WORKER: usize = 1250; // 10,000 commands in all
    let started = Instant::now();

    // Sample the host's memory while the soak runs.
    let pid = host.pid();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(usize, u64)> = Vec::new();
            while done.load(std::sync::atomic::Ordering::Relaxed) < WORKERS * PER_WORKER {
                samples.push((
                    done.load(std::sync::atomic::Ordering::Relaxed),
                    rehydra_e2e::rss_kib_of(pid),
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        })
    };

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let base = host.base.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let ids: Vec<String> = (0..3).map(|i| format!("soak-{w}-{i}")).collect();
            let mut oks: HashMap<String, u64> = HashMap::new();
            for n in 0..PER_WORKER {
                let id = &ids[n % ids.len()];
                // One command in five is hostile; spin and hog rarely (they cost time).
                let hostile = match n % 5 {
                    4 => {
                        let pick = (n / 5) % 40;
                        Some(match pick {
                            0 => HOSTILE[5],
                            1 => HOSTILE[6],
                            p => HOSTILE[p % 5],
                        })
                    }
                    _ => None,
                };
                let command = hostile.map(|h| h.0).unwrap_or("ok");
                let resp = client
                    .post(format!(
                        "{base}/v1/aggregates/faulty/{id}/commands/{command}"
                    ))
                    .body("{}")
                    .send()
                    .await
                    .expect("the host stays up");
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.expect("JSON");
                match hostile {
                    None => {
                        assert_eq!(status, 200, "{id} ok: {body}");
                        let v = oks.entry(id.clone()).or_insert(0);
                        *v += 1;
                        assert_eq!(body["version"], *v, "{id}: contiguous versions");
                    }
                    Some((cmd, want_status, reason)) => {
                        assert_eq!(status, want_status, "{id} {cmd}: {body}");
                        if !reason.is_empty() {
                            assert_eq!(
                                body["error"]["details"]["reason"], reason,
                                "{id} {cmd}: {body}"
                            );
                        }
                    }
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            oks
        }));
    }
    let mut oks = HashMap::new();
    for w in workers {
        oks.extend(w.await.expect("worker"));
    }
    let samples = sampler.await.unwrap();
    let elapsed = started.elapsed();

    // Every stream holds exactly its `ok` events.
    for (id, count) in &oks {
        let (_, state) = host.get(&format!("/v1/aggregates/faulty/{id}")).await;
        assert_eq!(state["version"], *count, "{id}: {state}");
        let (_, stream) = host
            .get(&format!("/v1/streams/faulty-{id}?from={count}"))
            .await;
        assert_eq!(stream["events"][0]["type"], "Happened");
        assert_eq!(stream["next"], count + 1, "{id}: nothing past the last ok");
    }

    // Memory plateaus: the second half of the run does not climb past the
    // first half's peak by more than a margin (one hog is 64 MiB of guest
    // memory, released with its instance).
    let half = WORKERS * PER_WORKER / 2;
    let first: u64 = samples
        .iter()
        .filter(|(d, _)| *d < half)
        .map(|(_, r)| *r)
        .max()
        .unwrap_or(0);
    let second: u64 = samples
        .iter()
        .filter(|(d, _)| *d >= half)
        .map(|(_, r)| *r)
        .max()
        .unwrap_or(0);
    eprintln!(
        "soak: {} commands in {elapsed:?}; RSS peak first half {} MiB, second half {} MiB",
        WORKERS * PER_WORKER,
        first / 1024,
        second / 1024
    );
    assert!(first > 0 && second > 0, "memory was sampled: {samples:?}");
    assert!(
        second <= first + 48 * 1024,
        "host memory keeps growing: {samples:?}"
    );
    let (status, _) = host.get("/healthz").await;
    assert_eq!(status, 200);
}

/// Deadlines are the guest thread's CPU time: with every core busy with
/// other threads, a call that needs a fifth of its deadline in CPU but far
/// more than its deadline on the wall clock still succeeds, and a call that
/// never ends still fails with `deadline_exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_count_cpu_time_not_the_wall_clock_of_a_busy_machine() {
    let deadline = Duration::from_millis(300);
    let args = [
        "--handle-deadline",
        "300ms",
        "--quarantine-after",
        "0",
        "--poison-after",
        "0",
    ];
    let host = Host::start_with(&["faulty"], &args);
    // Calibrate, on a quiet machine: rounds of `busy` worth about a fifth of
    // the deadline.
    let busy = |n: u64| {
        let host = &host;
        async move {
            let started = Instant::now();
            let (status, body) = host
                .command("faulty", "busy", "busy", json!({ "n": n }))
                .await;
            (status, body, started.elapsed())
        }
    };
    let mut n: u64 = 1 << 20;
    loop {
        let (status, body, took) = busy(n).await;
        assert_eq!(status, 200, "calibrating with {n} rounds: {body}");
        if took >= deadline / 5 {
            break;
        }
        n = n.checked_mul(2).expect("calibration ends");
    }

    // Load: many more spinning threads than cores, in this process.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let burners: Vec<_> = (0..cores * 12)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let (status, body, took) = busy(n).await;
        slowest = slowest.max(took);
        outcomes.push((status, rehydra_e2e::code(&body).to_owned(), took));
    }
    let (spin_status, spin_body) = host.command("faulty", "spinner", "spin", json!({})).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in burners {
        b.join().expect("a burner thread");
    }

    assert!(
        outcomes.iter().all(|(status, _, _)| *status == 200),
        "healthy calls under load: {outcomes:?}"
    );
    assert!(
        slowest > deadline,
        "the load never stretched a call past its deadline on the wall clock ({slowest:?}), \
         so this run proves nothing: {outcomes:?}"
    );
    assert_eq!(
        (
            spin_status,
            spin_body["error"]["details"]["reason"].as_str()
        ),
        (500, Some("deadline_exceeded")),
        "{spin_body}"
    );
}
