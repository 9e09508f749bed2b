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

/// `GET /v1/plugins/bank-account/versions`, answered 200: the list (for
/// messages and further checks) and each version's hash, oldest first.
async fn versions(host: &Host) -> (Value, Vec<Value>) {
    let (status, listed) = host.get(&format!("/v1/plugins/{PLUGIN}/versions")).await;
    assert_eq!(status, 200, "{listed}");
    let hashes = listed["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["hash"].clone())
        .collect();
    (listed, hashes)
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
    // The recent commands re-ran through both versions; the new one charges
    // a fee on the withdrawal, which is reported, not enforced.
    assert_eq!(verification["commands_rerun"], 7, "{plugin}");
    let changed = verification["command_differences"]
        .as_array()
        .expect("command differences");
    assert_eq!(changed.len(), 1, "{plugin}");
    assert_eq!(
        (&changed[0]["aggregate"], &changed[0]["command"]),
        (&json!("a"), &json!("withdraw"))
    );
    assert!(
        changed[0]["candidate"]
            .as_str()
            .unwrap_or_default()
            .contains("FeeCharged"),
        "{plugin}"
    );
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

    // A plugin's own policy wins over the host's.
    let host = Host::start_with(
        &[PLUGIN],
        &["--no-watch", "--plugin-upgrade-check", "bank-account=warn"],
    );
    accounts(&host).await;
    let report = deploy(&host, "bank-account-fold-bug").await;
    assert_eq!(report["failed"], json!([]), "{report}");
    assert_eq!(bank_plugin(&host).await["verification"]["policy"], "warn");
}

/// A rollback serves the previous version again at once, under load, and
/// writes it back to the plugin file: a rescan then finds the file
/// unchanged. No command is lost, each command's events name one version,
/// and the versions are listed with when each served. The CLI and gRPC
/// roll back too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_serves_the_previous_version_and_the_file_agrees() {
    let host = Host::start(&[PLUGIN]);
    accounts(&host).await;
    let first = bank_plugin(&host).await["hash"].clone();
    let report = deploy(&host, "bank-account-withdrawal-fee").await;
    assert_eq!(report["failed"], json!([]), "{report}");
    let second = bank_plugin(&host).await["hash"].clone();
    assert_ne!(first, second);

    // Deposits keep coming while the rollback happens.
    let load = {
        let base = host.base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            for _ in 0..200 {
                let resp = client
                    .post(format!("{base}/v1/aggregates/{PLUGIN}/l/commands/deposit"))
                    .body(r#"{"amount":1}"#)
                    .send()
                    .await
                    .expect("the host answers");
                statuses.push(resp.status().as_u16());
            }
            statuses
        })
    };
    let (status, _) = host
        .command(PLUGIN, "l", "open", json!({"owner": "Load"}))
        .await;
    assert!(status == 200 || status == 409, "{status}");
    let (status, done) = host
        .command_raw_post(&format!("/v1/plugins/{PLUGIN}/rollback"))
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!((&done["from"], &done["to"]), (&second, &first), "{done}");
    let statuses = load.await.expect("the load");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 404),
        "{statuses:?}"
    );
    let deposits = statuses.iter().filter(|s| **s == 200).count() as u64;

    assert_eq!(
        bank_plugin(&host).await["hash"],
        first,
        "the first version serves"
    );
    let on_disk = std::fs::read(host.dir.path().join("plugins").join("bank-account.wasm"))
        .expect("the plugin file");
    assert_eq!(
        on_disk,
        std::fs::read(rehydra_e2e::plugin(PLUGIN)).expect("the first version's file"),
        "the file holds the version that serves"
    );
    let (_, rescan) = host.command_raw_post("/v1/plugins/reload").await;
    assert_eq!(rescan["replaced"], json!([]), "{rescan}");
    assert_eq!(bank_plugin(&host).await["hash"], first);

    // Every deposit is there once, each event names one of the versions.
    assert_eq!(balance(&host, "l").await, deposits);
    let (_, stream) = host
        .get(&format!(
            "/v1/streams/{}-l?limit=1000",
            rehydra_e2e::stream_prefix(PLUGIN)
        ))
        .await;
    for event in stream["events"].as_array().expect("events") {
        let hash = &event["metadata"]["pluginHash"];
        assert!(*hash == first || *hash == second, "{event}");
    }

    let (listed, hashes) = versions(&host).await;
    assert_eq!(
        hashes,
        [first.clone(), second.clone(), first.clone()],
        "{listed}"
    );
    assert_eq!(listed["versions"][2]["serving"], true, "{listed}");
    assert!(
        listed["versions"][1]["served_until"].is_string(),
        "{listed}"
    );
    assert!(listed["versions"][1]["verification"]["aggregates_checked"].as_u64() >= Some(3));

    // The CLI rolls back again (to the second version), gRPC once more.
    let (code, stdout, stderr) = host.cli(&["rollback", PLUGIN]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(bank_plugin(&host).await["hash"], second);
    // gRPC lists the serving version's report too (the second version's,
    // from when it was deployed).
    let channel = tonic::transport::Channel::from_shared(host.grpc.clone())
        .expect("an endpoint")
        .connect()
        .await
        .expect("the gRPC server answers");
    let listed = rehydra::api::grpc::pb::plugins_client::PluginsClient::new(channel)
        .list(rehydra::api::grpc::pb::ListPluginsRequest {})
        .await
        .expect("a gRPC list")
        .into_inner();
    let report: Value = serde_json::from_str(
        listed.plugins[0]
            .verification_json
            .as_deref()
            .expect("the second version's report"),
    )
    .expect("JSON");
    assert_eq!(report["candidate_hash"], second, "{report}");

    let channel = tonic::transport::Channel::from_shared(host.grpc.clone())
        .expect("an endpoint")
        .connect()
        .await
        .expect("the gRPC server answers");
    let done = rehydra::api::grpc::pb::plugins_client::PluginsClient::new(channel)
        .rollback(rehydra::api::grpc::pb::RollbackPluginRequest {
            name: PLUGIN.to_owned(),
        })
        .await
        .expect("a gRPC rollback")
        .into_inner();
    assert_eq!(
        (json!(done.from_hash), json!(done.to_hash)),
        (second, first.clone())
    );
    assert_eq!(bank_plugin(&host).await["hash"], first);

    // A plugin with nothing to roll back to, and one that does not exist.
    let (status, body) = host.command_raw_post("/v1/plugins/nope/rollback").await;
    assert_eq!(
        (status, rehydra_e2e::code(&body)),
        (404, "not_found"),
        "{body}"
    );
}

/// The versions that served survive a restart (kept in the compile cache):
/// after a `kill -9`, the list still shows them with the report the
/// serving one passed, and a rollback loads the earlier version from its
/// kept file, serves it and writes it back to the plugin file. A second
/// restart serves what the file holds and keeps the list.
#[tokio::test]
async fn versions_and_rollback_survive_a_restart() {
    let mut host = Host::start_with(&[PLUGIN], &["--no-watch"]);
    accounts(&host).await;
    let first = bank_plugin(&host).await["hash"].clone();
    let report = deploy(&host, "bank-account-withdrawal-fee").await;
    assert_eq!(report["failed"], json!([]), "{report}");
    let second = bank_plugin(&host).await["hash"].clone();

    host.restart();
    let (listed, hashes) = versions(&host).await;
    assert_eq!(hashes, [first.clone(), second.clone()], "{listed}");
    let entries = listed["versions"].as_array().expect("versions");
    assert_eq!(
        (&entries[0]["serving"], &entries[1]["serving"]),
        (&json!(false), &json!(true)),
        "{listed}"
    );
    assert!(entries[0]["served_until"].is_string(), "{listed}");
    assert_eq!(
        entries[1]["verification"]["aggregates_checked"], 3,
        "{listed}"
    );
    // The serving version shows the report it passed before the restart.
    assert_eq!(
        bank_plugin(&host).await["verification"]["candidate_hash"],
        second
    );

    let (status, done) = host
        .command_raw_post(&format!("/v1/plugins/{PLUGIN}/rollback"))
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!((&done["from"], &done["to"]), (&second, &first), "{done}");
    assert_eq!(bank_plugin(&host).await["hash"], first);
    let plugin_file = host.dir.path().join("plugins").join("bank-account.wasm");
    let first_bytes = std::fs::read(rehydra_e2e::plugin(PLUGIN)).expect("the first version");
    assert_eq!(
        std::fs::read(&plugin_file).expect("the plugin file"),
        first_bytes,
        "the file holds the version that serves"
    );
    // The stored accounts fold on the version rolled back to, and it
    // takes commands.
    assert_eq!(balance(&host, "a").await, 25);
    let (status, answer) = host
        .command(PLUGIN, "c", "deposit", json!({"amount": 3}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(balance(&host, "c").await, 10);

    host.restart();
    assert_eq!(bank_plugin(&host).await["hash"], first);
    let (listed, hashes) = versions(&host).await;
    assert_eq!(
        hashes,
        [first.clone(), second.clone(), first.clone()],
        "{listed}"
    );
    assert_eq!(listed["versions"][2]["serving"], true, "{listed}");
}
