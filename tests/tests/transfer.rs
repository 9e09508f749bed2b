//! Process managers end to end, with the `transfer` example: a transfer
//! between two `bank-account` aggregates debits the source with
//! `withdraw`, credits the target with `deposit`, and refunds the source
//! with a `deposit` when the target refuses the credit (a closed account).
//!
//! What a user relies on: each transfer completes, is compensated or
//! fails exactly once, also when the host is killed (`kill -9`) at any
//! moment and restarted, so that the money in the accounts adds up; a new
//! version of the process manager loaded mid-flight carries on from its
//! checkpoint; an event the process manager fails on is retried, then
//! parked and shown, and the other transfers go on.

use std::collections::BTreeMap;
use std::time::Duration;

use rehydra_e2e::seeded::{Moments, seed};
use rehydra_e2e::{Host, metric, test_plugin, wait_for};
use serde_json::{Value, json};

const PLUGINS: &[&str] = &["bank-account", "transfer"];

const TERMINAL: &[&str] = &["completed", "compensated", "failed", "refund-failed"];

async fn balance(host: &Host, account: &str) -> u64 {
    host.state("bank-account", account).await["balance"]
        .as_u64()
        .expect("a balance")
}

async fn open(host: &Host, account: &str, balance: u64) {
    host.command_ok("bank-account", account, "open", json!({ "owner": account }))
        .await;
    if balance > 0 {
        host.command_ok(
            "bank-account",
            account,
            "deposit",
            json!({ "amount": balance }),
        )
        .await;
    }
}

async fn start(host: &Host, id: &str, from: &str, to: &str, amount: u64) {
    start_with(host, "transfer", id, from, to, amount).await;
}

async fn start_with(host: &Host, pm: &str, id: &str, from: &str, to: &str, amount: u64) {
    host.command_ok(
        pm,
        id,
        "start",
        json!({ "from": from, "to": to, "amount": amount }),
    )
    .await;
}

/// The transfer's status once it has one of `TERMINAL`.
async fn finished(host: &Host, id: &str) -> String {
    finished_with(host, "transfer", id).await
}

async fn finished_with(host: &Host, pm: &str, id: &str) -> String {
    wait_for(
        Duration::from_secs(60),
        &format!("transfer {id} to end"),
        || async {
            let status = host.state(pm, id).await["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            TERMINAL.contains(&status.as_str()).then_some(status)
        },
    )
    .await
}

/// The three ends of a transfer, with the process manager `pm`: the Rust
/// example, or its JavaScript or Python twin (types `transfer-js`,
/// `transfer-py`), which must answer alike.
async fn a_transfer_completes_is_compensated_or_fails(pm: &str) {
    let host = Host::start(&["bank-account", pm]);
    open(&host, "a", 100).await;
    open(&host, "b", 0).await;
    open(&host, "c", 0).await;
    host.command_ok("bank-account", "c", "close", json!({}))
        .await;

    start_with(&host, pm, "t1", "a", "b", 30).await;
    assert_eq!(finished_with(&host, pm, "t1").await, "completed");
    start_with(&host, pm, "t2", "a", "c", 20).await;
    assert_eq!(finished_with(&host, pm, "t2").await, "compensated");
    let t2 = host.state(pm, "t2").await;
    assert!(
        t2["reason"]
            .as_str()
            .is_some_and(|r| r.contains("account is closed")),
        "{t2}"
    );
    assert_eq!(
        t2["reason"], "c refused deposit: account is closed",
        "the same reason in every language: {t2}"
    );
    start_with(&host, pm, "t3", "a", "b", 500).await;
    assert_eq!(finished_with(&host, pm, "t3").await, "failed");
    assert_eq!(
        (
            balance(&host, "a").await,
            balance(&host, "b").await,
            balance(&host, "c").await
        ),
        (70, 30, 0)
    );

    // A bad start is refused with nothing stored.
    let (status, body) = host
        .command(
            pm,
            "t4",
            "start",
            json!({ "from": "a", "to": "a", "amount": 1 }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_command", "{body}");
    let (status, state4) = host.get(&format!("/v1/aggregates/{pm}/t4")).await;
    assert_eq!(status, 404, "nothing stored: {state4}");

    // The process manager is listed with what it follows and nothing parked.
    let (status, processes) = host.get("/v1/processes").await;
    assert_eq!(status, 200, "{processes}");
    let transfer = &processes["processes"][0];
    assert_eq!(transfer["name"], pm, "{processes}");
    assert_eq!(transfer["process"]["on_refused"], "refused", "{processes}");
    assert_eq!(transfer["parkedCount"], 0, "{processes}");
    // t1, t2 and t3 have ended: their last events finish them (the
    // refused t4 never started).
    assert_eq!(transfer["finishedCount"], 3, "{processes}");
    assert_eq!(
        transfer["process"]["finished_by"],
        json!(["Completed", "Compensated", "Failed", "RefundFailed"]),
        "{processes}"
    );
    assert!(
        transfer["checkpoint"].as_u64().is_some_and(|c| c > 0),
        "{processes}"
    );
}

mod three_languages {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rust() {
        super::a_transfer_completes_is_compensated_or_fails("transfer").await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn js() {
        super::a_transfer_completes_is_compensated_or_fails("transfer-js").await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn python() {
        super::a_transfer_completes_is_compensated_or_fails("transfer-py").await
    }
}

/// Transfers between accounts, some to a closed one, while the host is
/// killed with SIGKILL at moments drawn from a printed seed and restarted:
/// each transfer ends once, and the money adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_end_exactly_once_across_kill9_restarts() {
    let mut moments = Moments::new(seed("REHYDRA_TRANSFER_SEED"));

    let mut host = Host::start(PLUGINS);
    const OPEN: [&str; 4] = ["a", "b", "c", "d"];
    const START_BALANCE: u64 = 500;
    for account in OPEN {
        open(&host, account, START_BALANCE).await;
    }
    open(&host, "closed", 0).await;
    host.command_ok("bank-account", "closed", "close", json!({}))
        .await;
    let accounts = ["a", "b", "c", "d", "closed"];
    let total = START_BALANCE * OPEN.len() as u64;

    const TRANSFERS: usize = 60;
    const KILLS: usize = 5;
    let mut started = Vec::new();
    for batch in 0..KILLS {
        for i in 0..TRANSFERS / KILLS {
            let n = batch * (TRANSFERS / KILLS) + i;
            let from = accounts[moments.below(4) as usize];
            let mut to = accounts[moments.below(5) as usize];
            if to == from {
                to = "closed";
            }
            let id = format!("t{n}");
            start(&host, &id, from, to, 1 + moments.below(200)).await;
            started.push(id);
        }
        let wait = 20 + moments.below(400);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        println!("kill -9 {batch} after {wait} ms");
        host.kill9();
        host.restart();
    }

    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for id in &started {
        *ends.entry(finished(&host, id).await).or_default() += 1;
    }
    println!(
        "{} transfers started across {KILLS} kills: {ends:?}",
        started.len()
    );
    assert!(!ends.contains_key("refund-failed"), "{ends:?}");

    // Each transfer's stream ends once; each account was debited and
    // credited exactly as its transfer says.
    let mut effects: BTreeMap<(String, String), usize> = BTreeMap::new();
    for account in accounts {
        for e in host.read_stream(&format!("bank_account-{account}")).await {
            let timer = &e["metadata"]["timer"];
            if let (Some(by), Some(key)) = (timer["scheduledBy"].as_str(), timer["key"].as_str()) {
                *effects
                    .entry((by.to_string(), key.to_string()))
                    .or_default() += 1;
            }
        }
    }
    for id in &started {
        let events = host.read_stream(&format!("transfer-{id}")).await;
        let terminal: Vec<&str> = events
            .iter()
            .filter_map(|e| e["type"].as_str())
            .filter(|t| ["Completed", "Compensated", "Failed", "RefundFailed"].contains(t))
            .collect();
        assert_eq!(terminal.len(), 1, "{id}: {events:?}");
        let by = format!("transfer/{id}");
        let count = |key: &str| effects.get(&(by.clone(), key.to_string())).copied();
        match terminal[0] {
            "Completed" => {
                assert_eq!(
                    (count("debit"), count("credit"), count("refund")),
                    (Some(1), Some(1), None),
                    "{id}"
                )
            }
            "Compensated" => {
                assert_eq!(
                    (count("debit"), count("credit"), count("refund")),
                    (Some(1), None, Some(1)),
                    "{id}"
                )
            }
            _ => assert_eq!(
                (count("debit"), count("credit"), count("refund")),
                (None, None, None),
                "{id}"
            ),
        }
    }
    let mut sum = 0;
    for account in accounts {
        sum += balance(&host, account).await;
    }
    assert_eq!(sum, total, "the money adds up");
    assert_eq!(balance(&host, "closed").await, 0);
}

/// A new version of the process manager, deployed while transfers are in
/// flight, takes over from the checkpoint: every transfer ends once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_manager_reloaded_mid_flight_carries_on() {
    let host = Host::start(PLUGINS);
    open(&host, "a", 1000).await;
    open(&host, "b", 0).await;
    open(&host, "closed", 0).await;
    host.command_ok("bank-account", "closed", "close", json!({}))
        .await;
    for i in 0..20 {
        let to = if i % 4 == 0 { "closed" } else { "b" };
        start(&host, &format!("r{i}"), "a", to, 10).await;
    }
    // Deploy v2 (its refusal reasons start with "v2: ") by renaming it over
    // the watched file.
    let plugins = host.dir.path().join("plugins");
    let staged = plugins.join(".transfer.wasm.new");
    std::fs::copy(test_plugin("transfer-v2"), &staged).expect("copying v2");
    std::fs::rename(&staged, plugins.join("transfer.wasm")).expect("deploying v2");
    wait_for(Duration::from_secs(60), "v2 to serve", || async {
        let (_, body) = host.get("/v1/plugins").await;
        let plugins = body["plugins"].as_array().cloned().unwrap_or_default();
        plugins
            .iter()
            .any(|p| p["name"] == "transfer" && !p["previous_hash"].is_null())
            .then_some(())
    })
    .await;
    for i in 20..30 {
        start(&host, &format!("r{i}"), "a", "closed", 10).await;
    }
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..30 {
        *ends
            .entry(finished(&host, &format!("r{i}")).await)
            .or_default() += 1;
    }
    assert_eq!(ends.get("completed"), Some(&15), "{ends:?}");
    assert_eq!(ends.get("compensated"), Some(&15), "{ends:?}");
    // v2 served the late ones.
    let late = host.state("transfer", "r29").await;
    assert!(
        late["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("v2: ")),
        "{late}"
    );
    assert_eq!(balance(&host, "a").await, 1000 - 15 * 10);
    assert_eq!(balance(&host, "b").await, 15 * 10);
}

/// A process manager that traps on one event: the event is tried a few
/// times, then parked and listed with its error; the other transfers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_process_manager_fails_on_is_parked_and_the_rest_go_on() {
    let bytes = |path: std::path::PathBuf| std::fs::read(path).expect("a plugin file");
    let host = Host::start_files(
        &[
            (
                "bank-account.wasm".to_string(),
                bytes(rehydra_e2e::plugin("bank-account")),
            ),
            (
                "transfer.wasm".to_string(),
                bytes(test_plugin("transfer-trap-on-13")),
            ),
        ],
        &[],
    );
    open(&host, "a", 100).await;
    open(&host, "b", 0).await;
    start(&host, "bad", "a", "b", 13).await;
    start(&host, "good", "a", "b", 5).await;
    assert_eq!(finished(&host, "good").await, "completed");

    let parked = wait_for(
        Duration::from_secs(60),
        "the event to be parked",
        || async {
            let (_, body) = host.get("/v1/processes").await;
            let transfer = body["processes"][0].clone();
            (transfer["parkedCount"] == 1).then_some(transfer)
        },
    )
    .await;
    let event = &parked["parked"][0];
    assert_eq!(event["instance"], "bad", "{parked}");
    assert_eq!(event["eventType"], "Withdrawn", "{parked}");
    assert_eq!(event["command"], "debited", "{parked}");
    assert!(
        event["error"]
            .as_str()
            .is_some_and(|e| e.contains("traps on a debit of 13")),
        "{parked}"
    );
    assert!(
        event["attempts"].as_u64().is_some_and(|a| a >= 2),
        "{parked}"
    );
    let metrics = host.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "rehydra_process_events_total{process=\"transfer\",outcome=\"parked\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let (code, out, err) = host.cli(&["processes"]);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed["processes"][0]["parkedCount"], 1, "{listed}");
    // The bad transfer stays where it was (its stream: read from the store,
    // as the aggregate itself rests after its failures); later transfers
    // still complete.
    let bad: Vec<Value> = host.read_stream("transfer-bad").await;
    let kinds: Vec<&str> = bad.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds, ["Started", "$timers"], "{bad:?}");
    start(&host, "after", "a", "b", 7).await;
    assert_eq!(finished(&host, "after").await, "completed");
    assert_eq!(balance(&host, "b").await, 12);
}
