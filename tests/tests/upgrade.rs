//! Upgrade verification end to end (`--upgrade-check`): a new version of
//! `bank-account` is replayed against the stored accounts before it serves.
//! One that folds a deposit differently under the same state schema, or
//! that traps on a withdrawal stored by the old version, is refused with a
//! report naming the account and the event, while the old version keeps
//! serving; a correct one passes and serves with its report; `warn` serves
//! a failing one with its report; `off` checks nothing.

use rehydra_e2e::{Host, test_plugin};
use serde_json::{Value, json};

const PLUGIN: &str = "bank-account";

/// Replaces the plugin file (write, then rename) and rescans at once.
async fn deploy(host: &Host, version: &str) -> Value {
    let dir = host.dir.path().join("plugins");
    let tmp = dir.join("bank-account.wasm.tmp");
    std::fs::write(
        &tmp,
        std::fs::read(test_plugin(version)).expect("the test plugin"),
    )
    .expect("write");
    std::fs::rename(&tmp, dir.join("bank-account.wasm")).expect("rename");
    let (status, report) = host.command_raw_post("/v1/plugins/reload").await;
    assert_eq!(status, 200, "{report}");
    report
}

async fn bank_plugin(host: &Host) -> Value {
    let (_, plugins) = host.get("/v1/plugins").await;
    plugins["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .find(|p| p["aggregate_type"] == PLUGIN)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Three accounts: `a` with deposits and a withdrawal (version 4), `b`
/// only opened, `c` with one deposit.
async fn accounts(host: &Host) {
    let commands = [
        ("a", "open", json!({"owner": "Ada"})),
        ("a", "deposit", json!({"amount": 10})),
        ("a", "deposit", json!({"amount": 20})),
        ("a", "withdraw", json!({"amount": 5})),
        ("b", "open", json!({"owner": "Bob"})),
        ("c", "open", json!({"owner": "Cy"})),
        ("c", "deposit", json!({"amount": 7})),
    ];
    for (id, command, body) in commands {
        let (status, answer) = host.command(PLUGIN, id, command, body).await;
        assert_eq!(status, 200, "{id} {command}: {answer}");
    }
}

async fn balance(host: &Host, id: &str) -> u64 {
    let (status, body) = host.get(&format!("/v1/aggregates/{PLUGIN}/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body["state"]["balance"].as_u64().expect("a balance")
}

#[tokio::test]
async fn a_version_that_folds_an_event_differently_is_refused_and_the_old_one_serves() {
    let host = Host::start_with(&[PLUGIN], &["--no-watch"]);
    accounts(&host).await;
    let serving = bank_plugin(&host).await["hash"].clone();

    let report = deploy(&host, "bank-account-fold-bug").await;
    assert_eq!(report["replaced"], json!([]), "{report}");
    let error = report["failed"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("refused by --upgrade-check enforce"),
        "{error}"
    );
    assert!(
        error.contains("Deposited") && error.contains("event 2"),
        "names the event: {error}"
    );

    let plugin = bank_plugin(&host).await;
    assert_eq!(plugin["hash"], serving, "the old version serves");
    let refused = &plugin["refused_verification"];
    assert_eq!(refused["same_state_schema"], true, "{refused}");
    let differing: Vec<&str> = refused["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| d["aggregate"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(differing.len(), 2, "a and c, not b: {refused}");
    assert!(
        differing.contains(&"a") && differing.contains(&"c"),
        "{refused}"
    );
    let a = refused["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .find(|d| d["aggregate"] == "a")
        .expect("a");
    assert_eq!(
        (a["version"].as_u64(), a["event_type"].as_str()),
        (Some(2), Some("Deposited"))
    );
    assert!(
        a["current"]
            .as_str()
            .unwrap_or_default()
            .contains("\"balance\":10"),
        "{a}"
    );
    assert!(
        a["candidate"]
            .as_str()
            .unwrap_or_default()
            .contains("\"balance\":20"),
        "{a}"
    );
    assert_eq!(refused["aggregates_checked"], 3, "{refused}");

    // Commands run on the old version: a deposit counts once.
    let (status, body) = host
        .command(PLUGIN, "a", "deposit", json!({"amount": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(balance(&host, "a").await, 26);
}

#[tokio::test]
async fn a_version_that_traps_on_an_old_event_is_refused() {
    let host = Host::start_with(&[PLUGIN], &["--no-watch"]);
    accounts(&host).await;
    // Nothing resident: the sample comes from the log.
    let mut host = host;
    host.restart();

    let report = deploy(&host, "bank-account-apply-traps").await;
    let error = report["failed"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot rebuild") && error.contains("\"a\""),
        "names the account: {error}"
    );
    let refused = bank_plugin(&host).await["refused_verification"].clone();
    assert_eq!(refused["failures"][0]["aggregate"], "a", "{refused}");
    assert!(
        refused["failures"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot fold a withdrawal"),
        "the guest's panic message: {refused}"
    );
    assert_eq!(
        refused["aggregates_checked"], 3,
        "found in the log: {refused}"
    );
    assert_eq!(balance(&host, "a").await, 25, "the old version serves");
}

#[tokio::test]
async fn a_correct_version_passes_and_serves_with_its_report() {
    let host = Host::start_with(&[PLUGIN], &["--no-watch"]);
    accounts(&host).await;
    let report = deploy(&host, "bank-account-withdrawal-fee").await;
    assert_eq!(report["failed"], json!([]), "{report}");
    assert_eq!(
        report["replaced"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let plugin = bank_plugin(&host).await;
    let verification = &plugin["verification"];
    assert_eq!(verification["aggregates_checked"], 3, "{plugin}");
    assert_eq!(verification["events_replayed"], 7, "{plugin}");
    assert_eq!(verification["differences"], json!([]), "{plugin}");
    assert_eq!(verification["policy"], "enforce", "{plugin}");
    assert_eq!(plugin["refused_verification"], Value::Null, "{plugin}");
    // A new state schema is checked by rebuilding only.
    let report = deploy(&host, "bank-account-schema-2").await;
    assert_eq!(report["failed"], json!([]), "{report}");
    let plugin = bank_plugin(&host).await;
    assert_eq!(
        plugin["verification"]["same_state_schema"], false,
        "{plugin}"
    );
    assert_eq!(plugin["state_schema"], 2);
}

#[tokio::test]
async fn warn_serves_a_failing_version_with_its_report_and_off_checks_nothing() {
    let host = Host::start_with(&[PLUGIN], &["--no-watch", "--upgrade-check", "warn"]);
    accounts(&host).await;
    let report = deploy(&host, "bank-account-fold-bug").await;
    assert_eq!(report["failed"], json!([]), "{report}");
    let plugin = bank_plugin(&host).await;
    assert_eq!(plugin["verification"]["policy"], "warn", "{plugin}");
    assert_eq!(
        plugin["verification"]["differences"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{plugin}"
    );
    assert!(
        host.log()
            .contains("serves although its verification failed")
    );

    let host = Host::start_with(&[PLUGIN], &["--no-watch", "--upgrade-check", "off"]);
    accounts(&host).await;
    let report = deploy(&host, "bank-account-fold-bug").await;
    assert_eq!(report["failed"], json!([]), "{report}");
    assert_eq!(bank_plugin(&host).await["verification"], Value::Null);
}
