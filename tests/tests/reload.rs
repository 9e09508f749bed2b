//! Hot reload end to end: replacing `bank-account` under load loses and
//! fails nothing and switches versions cleanly; a state-schema change
//! rebuilds state with the new code; a broken file never replaces a working
//! version; removing the file unroutes the type; the same bytes are a
//! no-op; SIGHUP and `POST /v1/plugins/reload` rescan.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rehydra_e2e::{Host, code, test_plugin};
use serde_json::{Value, json};

fn plugin_file(host: &Host) -> PathBuf {
    host.dir.path().join("plugins").join("bank-account.wasm")
}

/// Deploys `bytes` the safe way: write a temporary file, then rename.
fn deploy(host: &Host, bytes: &[u8]) {
    let tmp = host
        .dir
        .path()
        .join("plugins")
        .join("bank-account.wasm.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, plugin_file(host)).unwrap();
}

async fn bank_plugin(host: &Host) -> Value {
    let (_, plugins) = host.get("/v1/plugins").await;
    plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["aggregate_type"] == "bank-account")
        .cloned()
        .unwrap_or(Value::Null)
}

/// Polls `f` until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn replacing_a_plugin_under_load_loses_nothing() {
    let host = Host::start(&["bank-account"]);
    let v1 = bank_plugin(&host).await["hash"]
        .as_str()
        .unwrap()
        .to_string();
    const CLIENTS: usize = 4;
    for c in 0..CLIENTS {
        host.command(
            "bank-account",
            &format!("load-{c}"),
            "open",
            json!({"owner": "Ada"}),
        )
        .await;
        let (status, _) = host
            .command(
                "bank-account",
                &format!("load-{c}"),
                "deposit",
                json!({"amount": 1_000_000}),
            )
            .await;
        assert_eq!(status, 200);
    }

    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let base = host.base.clone();
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            // (sent at, command, answer)
            let mut log: Vec<(Duration, &str, Value)> = Vec::new();
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(4) {
                let command = if n.is_multiple_of(2) {
                    "deposit"
                } else {
                    "withdraw"
                };
                n += 1;
                let sent = started.elapsed();
                let resp = http
                    .post(format!(
                        "{base}/v1/aggregates/bank-account/load-{c}/commands/{command}"
                    ))
                    .body(json!({"amount": 5}).to_string())
                    .send()
                    .await
                    .expect("the host answers");
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.expect("JSON");
                assert_eq!(
                    status, 200,
                    "client {c}, {command} during the reload: {body}"
                );
                log.push((sent, command, body));
            }
            log
        }));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let renamed_at = started.elapsed();
    deploy(
        &host,
        &std::fs::read(test_plugin("bank-account-withdrawal-fee")).unwrap(),
    );

    let mut logs = Vec::new();
    for c in clients {
        logs.push(c.await.expect("client"));
    }
    let plugin = bank_plugin(&host).await;
    let v2 = plugin["hash"].as_str().unwrap().to_string();
    assert_ne!(v1, v2, "the new version is loaded");
    assert_eq!(plugin["previous_hash"], v1.as_str());

    let mut last_v1_sent = Duration::ZERO;
    for (c, log) in logs.iter().enumerate() {
        let id = format!("load-{c}");
        let stream = host.read_stream(&format!("bank_account-{id}")).await;
        let versions: Vec<u64> = stream
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert_eq!(
            versions,
            (1..=stream.len() as u64).collect::<Vec<_>>(),
            "{id}: contiguous versions"
        );
        let by_version: HashMap<u64, &Value> = stream
            .iter()
            .map(|e| (e["version"].as_u64().unwrap(), e))
            .collect();

        let mut acknowledged_events = 2; // open and the first deposit
        let mut seen_v2 = false;
        for (sent, command, answer) in log {
            let events = answer["events"].as_array().unwrap();
            acknowledged_events += events.len();
            let first = by_version[&events[0]["version"].as_u64().unwrap()];
            let hash = first["metadata"]["pluginHash"].as_str().unwrap();
            // Every event of one command names the same version, and that
            // version's behaviour shows: only v2 charges a fee.
            for e in events {
                let stored = by_version[&e["version"].as_u64().unwrap()];
                assert_eq!(
                    stored["metadata"]["pluginHash"], hash,
                    "{id}: one command, one version"
                );
                assert_eq!(
                    stored["type"], e["type"],
                    "{id}: the acknowledged event is the stored one"
                );
            }
            let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
            if hash == v1 {
                assert!(
                    !seen_v2,
                    "{id}: a command ran on the old version after the new one served"
                );
                last_v1_sent = last_v1_sent.max(*sent);
                if *command == "withdraw" {
                    assert_eq!(types, ["Withdrawn"], "{id}: v1 behaviour");
                }
            } else {
                assert_eq!(hash, v2, "{id}: an unknown version handled a command");
                seen_v2 = true;
                if *command == "withdraw" {
                    assert_eq!(types, ["Withdrawn", "FeeCharged"], "{id}: v2 behaviour");
                }
            }
        }
        assert!(seen_v2, "{id}: the new version served");
        assert_eq!(
            acknowledged_events,
            stream.len(),
            "{id}: nothing lost, nothing doubled"
        );
    }
    // Within a bounded time of the rename, every command ran on the new version.
    let switch = last_v1_sent.saturating_sub(renamed_at);
    eprintln!(
        "reload under load: last command on the old version was sent {switch:?} after the rename"
    );
    assert!(
        last_v1_sent < renamed_at + Duration::from_secs(2),
        "old version served until {last_v1_sent:?}, renamed at {renamed_at:?}"
    );
}

#[tokio::test]
async fn a_state_schema_change_rebuilds_state_with_the_new_code() {
    let host = Host::start_with(&["bank-account"], &["--no-watch"]);
    host.command("bank-account", "s", "open", json!({"owner": "Ada"}))
        .await;
    for amount in [10, 20, 30] {
        host.command("bank-account", "s", "deposit", json!({"amount": amount}))
            .await;
    }
    host.command("bank-account", "s", "withdraw", json!({"amount": 5}))
        .await;
    let (_, before) = host.get("/v1/aggregates/bank-account/s").await;
    assert_eq!(
        before["state"],
        json!({"owner": "Ada", "balance": 55, "open": true})
    );

    deploy(
        &host,
        &std::fs::read(test_plugin("bank-account-schema-2")).unwrap(),
    );
    let (status, report) = host.command_raw_post("/v1/plugins/reload").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["replaced"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(bank_plugin(&host).await["state_schema"], 2);

    // The cached state (schema 1) is not reused: the new code rebuilt it.
    let (_, after) = host.get("/v1/aggregates/bank-account/s").await;
    assert_eq!(after["version"], 5);
    assert_eq!(
        after["state"],
        json!({"owner": "Ada", "balance": 55, "open": true, "transactions": 4})
    );
    let (status, body) = host
        .command("bank-account", "s", "deposit", json!({"amount": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, after) = host.get("/v1/aggregates/bank-account/s").await;
    assert_eq!(after["state"]["transactions"], 5);
}

#[tokio::test]
async fn a_broken_file_never_replaces_a_working_version() {
    let host = Host::start(&["bank-account"]);
    let good = std::fs::read(plugin_file(&host)).unwrap();
    let v1 = bank_plugin(&host).await["hash"]
        .as_str()
        .unwrap()
        .to_string();
    host.command("bank-account", "b", "open", json!({"owner": "Ada"}))
        .await;

    // Written in place, unsafely: a truncated component, then garbage.
    std::fs::write(plugin_file(&host), &good[..good.len() / 2]).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            bank_plugin(&host).await["last_error"].is_string()
        })
        .await,
        "the failed reload is reported"
    );
    std::fs::write(plugin_file(&host), b"garbage, not a component").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            bank_plugin(&host).await["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("not a WebAssembly component"))
        })
        .await
    );
    let plugin = bank_plugin(&host).await;
    assert_eq!(
        plugin["hash"],
        v1.as_str(),
        "the working version keeps serving"
    );
    let (status, body) = host
        .command("bank-account", "b", "deposit", json!({"amount": 3}))
        .await;
    assert_eq!((status, body["version"].clone()), (200, json!(2)), "{body}");

    // Fixing the file clears the error; the same bytes as before are no new version.
    deploy(&host, &good);
    assert!(
        eventually(Duration::from_secs(10), || async {
            bank_plugin(&host).await["last_error"].is_null()
        })
        .await,
        "the error clears"
    );
    assert_eq!(bank_plugin(&host).await["hash"], v1.as_str());
}

#[tokio::test]
async fn removing_the_file_unroutes_the_type() {
    // A short debounce (the default is 300 ms): the watch still notices.
    let host = Host::start_with(&["bank-account", "users"], &["--watch-debounce", "20ms"]);
    host.command("bank-account", "r", "open", json!({"owner": "Ada"}))
        .await;
    std::fs::remove_file(plugin_file(&host)).unwrap();
    // Commands keep being served until the removal is noticed, then the
    // type is unknown.
    let accepted = std::sync::atomic::AtomicU64::new(0);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (status, body) = host
                .command("bank-account", "r", "deposit", json!({"amount": 1}))
                .await;
            if status == 200 {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            status == 404 && code(&body) == "unknown_aggregate_type"
        })
        .await,
        "the type becomes unknown"
    );
    let accepted = accepted.into_inner();
    // The other plugin is untouched, and the events stay in the store.
    let (status, _) = host
        .command(
            "user",
            "u",
            "new",
            json!({"email": "a@b.c", "name": "Jane Doe"}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, stream) = host.get("/v1/streams/bank_account-r").await;
    assert_eq!(
        stream["events"].as_array().unwrap().len() as u64,
        1 + accepted
    );
}

#[tokio::test]
async fn same_bytes_are_a_no_op_and_sighup_rescans() {
    let host = Host::start_with(&["bank-account"], &["--no-watch"]);
    let before = bank_plugin(&host).await;
    let good = std::fs::read(plugin_file(&host)).unwrap();
    deploy(&host, &good);
    let (status, report) = host.command_raw_post("/v1/plugins/reload").await;
    assert_eq!(status, 200);
    assert_eq!(report["unchanged"], 1, "{report}");
    assert_eq!(report["replaced"], json!([]), "{report}");
    let after = bank_plugin(&host).await;
    assert_eq!(after["loaded_at"], before["loaded_at"], "not reloaded");
    assert_eq!(after["previous_hash"], Value::Null);

    // Without the watch, a new file waits for a rescan; SIGHUP is one.
    deploy(
        &host,
        &std::fs::read(test_plugin("bank-account-withdrawal-fee")).unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        bank_plugin(&host).await["hash"],
        before["hash"],
        "--no-watch: nothing reloads by itself"
    );
    let killed = std::process::Command::new("kill")
        .args(["-HUP", &host.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        eventually(Duration::from_secs(10), || async {
            bank_plugin(&host).await["hash"] != before["hash"]
        })
        .await,
        "SIGHUP reloaded the plugin"
    );
}
