//! Persisted snapshots against the real binary and the embedded store: a
//! restarted host loads an aggregate from its snapshot and replays only the
//! events after it; snapshots are written every `--snapshot-every` events
//! and when an aggregate is passivated; a snapshot of another state schema,
//! of a stream that no longer matches it, or with state the plugin cannot
//! read, is ignored and the stream replayed; `--snapshot-every 0` stores
//! none.

use std::path::Path;
use std::time::{Duration, Instant};

use rehydra::store::embedded::EmbeddedStore;
use rehydra::store::{EventStore, Snapshot};
use rehydra_e2e::{Host, metric, stream_prefix, test_plugin};
use serde_json::json;

const PLUGIN: &str = "bank-account";

/// Opens an account and makes `deposits` deposits of 1: version
/// `deposits + 1`, balance `deposits`.
async fn account_with(host: &Host, id: &str, deposits: u64) {
    let (status, body) = host
        .command(PLUGIN, id, "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..deposits {
        let (status, body) = host
            .command(PLUGIN, id, "deposit", json!({"amount": 1}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// A counter of `/metrics` for the bank account (0 when absent).
fn counted(text: &str, name: &str, outcome: &str) -> f64 {
    metric(
        text,
        &format!("{name}{{aggregate_type=\"{PLUGIN}\",outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

fn replayed(text: &str) -> f64 {
    metric(
        text,
        &format!("rehydra_events_replayed_total{{aggregate_type=\"{PLUGIN}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Waits until `/metrics` shows `n` snapshots written.
async fn wait_for_written(host: &Host, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = host.metrics().await;
        let written = counted(&text, "rehydra_snapshot_saves_total", "written");
        if written >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{written} snapshots written, waited for {n}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The embedded store in a stopped host's directory, for a look inside.
async fn open_store(host: &Host) -> EmbeddedStore {
    open_stopped(&host.dir.path().join("data")).await
}

/// Opens a stopped host's store in this process. The directory's lock can
/// be held for a moment after this process closed the store: another test
/// of this process spawning a host forks it, and the child holds a copy of
/// every open file (the lock's among them) until it execs. So a refusal
/// for a lock in use is tried again, briefly.
async fn open_stopped(dir: &Path) -> EmbeddedStore {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match EmbeddedStore::open(dir).await {
            Ok(store) => return store,
            Err(e)
                if format!("{e:#}").contains("is in use")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("open the stopped host's store: {e:#}"),
        }
    }
}

fn stream(id: &str) -> String {
    format!("{}-{id}", stream_prefix(PLUGIN))
}

async fn stored_snapshot(host: &Host, id: &str) -> Option<Snapshot> {
    let store = open_store(host).await;
    let found = store.load_snapshot(&stream(id)).await.expect("load");
    store.close().await;
    found
}

/// The balance and version a state read gives.
async fn balance(host: &Host, id: &str) -> (u64, u64) {
    let (status, body) = host.get(&format!("/v1/aggregates/{PLUGIN}/{id}")).await;
    assert_eq!(status, 200, "{body}");
    (
        body["state"]["balance"].as_u64().expect("a balance"),
        body["version"].as_u64().expect("a version"),
    )
}

#[tokio::test]
async fn a_restarted_host_replays_only_the_events_after_the_snapshot() {
    let mut host = Host::start_with(&[PLUGIN], &["--snapshot-every", "10"]);
    account_with(&host, "s1", 24).await; // version 25
    wait_for_written(&host, 2.0).await; // at versions 10 and 20
    host.kill9();
    let snapshot = stored_snapshot(&host, "s1").await.expect("a snapshot");
    assert_eq!((snapshot.version, snapshot.schema), (20, 1));

    host.restart();
    assert_eq!(balance(&host, "s1").await, (24, 25));
    let text = host.metrics().await;
    assert_eq!(counted(&text, "rehydra_snapshot_loads_total", "used"), 1.0);
    assert_eq!(replayed(&text), 5.0, "only the events after version 20");

    // Commands go on from the loaded state.
    let (status, body) = host
        .command(PLUGIN, "s1", "withdraw", json!({"amount": 24}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(balance(&host, "s1").await, (0, 26));
}

#[tokio::test]
async fn a_passivated_aggregate_leaves_a_snapshot_of_its_last_version() {
    let mut host = Host::start_with(
        &[PLUGIN],
        &["--snapshot-every", "10", "--idle-timeout", "300ms"],
    );
    account_with(&host, "p1", 14).await; // version 15: one snapshot at 10
    // Passivation after 300 ms idle stores version 15.
    wait_for_written(&host, 2.0).await;
    host.kill9();
    let snapshot = stored_snapshot(&host, "p1").await.expect("a snapshot");
    assert_eq!(snapshot.version, 15);

    host.restart();
    assert_eq!(balance(&host, "p1").await, (14, 15));
    assert_eq!(replayed(&host.metrics().await), 0.0, "nothing to replay");
}

#[tokio::test]
async fn snapshots_a_plugin_cannot_use_are_ignored_and_the_stream_replayed() {
    let mut host = Host::start_with(&[PLUGIN], &["--snapshot-every", "10"]);
    account_with(&host, "bad", 24).await;
    wait_for_written(&host, 2.0).await;
    host.kill9();
    let good = stored_snapshot(&host, "bad").await.expect("a snapshot");

    // Each spoiled snapshot: the state read still gives the true state,
    // from all 25 events.
    let spoiled = [
        (
            "the stream holds another event at its version",
            Snapshot {
                event_id: uuid_like(&good),
                ..good.clone()
            },
        ),
        (
            "state the plugin cannot read",
            Snapshot {
                state: b"{\"not\": \"an account\"".to_vec(),
                ..good.clone()
            },
        ),
    ];
    for (case, snapshot) in spoiled {
        put_snapshot(host.dir.path(), snapshot).await;
        host.restart();
        assert_eq!(balance(&host, "bad").await, (24, 25), "{case}");
        let text = host.metrics().await;
        assert_eq!(
            counted(&text, "rehydra_snapshot_loads_total", "ignored"),
            1.0,
            "{case}: {text}"
        );
        assert_eq!(replayed(&text), 25.0, "{case}");
        // Loaded from all its events, it gets a good snapshot again.
        wait_for_written(&host, 1.0).await;
        host.kill9();
        let again = stored_snapshot(&host, "bad").await.expect("a snapshot");
        assert_eq!(again.version, 25, "{case}");
        assert_ne!(again.state, b"{\"not\": \"an account\"".to_vec());
    }
    assert!(
        host.log().contains("snapshot ignored"),
        "each is logged:\n{}",
        host.log()
    );
}

/// A snapshot of the previous state schema is not used by a plugin
/// version with a new one: the stream is replayed with the new code, and
/// the new version's snapshot replaces the old.
#[tokio::test]
async fn a_new_state_schema_ignores_the_old_snapshot() {
    let mut host = Host::start_with(&[PLUGIN], &["--snapshot-every", "10"]);
    account_with(&host, "v2", 24).await;
    wait_for_written(&host, 2.0).await;
    host.kill9();
    std::fs::copy(
        test_plugin("bank-account-schema-2"),
        host.dir
            .path()
            .join("plugins")
            .join(format!("{PLUGIN}.wasm")),
    )
    .expect("install the schema-2 version");

    host.restart();
    assert_eq!(balance(&host, "v2").await, (24, 25));
    let text = host.metrics().await;
    assert_eq!(
        counted(&text, "rehydra_snapshot_loads_total", "ignored"),
        1.0
    );
    assert_eq!(replayed(&text), 25.0);
    wait_for_written(&host, 1.0).await;
    host.kill9();
    let snapshot = stored_snapshot(&host, "v2").await.expect("a snapshot");
    assert_eq!((snapshot.schema, snapshot.version), (2, 25));
}

#[tokio::test]
async fn snapshot_every_0_stores_and_uses_none() {
    let mut host = Host::start_with(
        &[PLUGIN],
        &["--snapshot-every", "0", "--idle-timeout", "200ms"],
    );
    account_with(&host, "off", 24).await;
    // Passivated too, and still nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&host.metrics().await, "rehydra_resident_aggregates") != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the account was never passivated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.kill9();
    assert_eq!(stored_snapshot(&host, "off").await, None);
    host.restart();
    assert_eq!(balance(&host, "off").await, (24, 25));
    assert_eq!(replayed(&host.metrics().await), 25.0);
}

/// Another event id than the snapshot's, deterministic for the test.
fn uuid_like(snapshot: &Snapshot) -> uuid::Uuid {
    let mut bytes = *snapshot.event_id.as_bytes();
    bytes[15] ^= 0xff;
    uuid::Uuid::from_bytes(bytes)
}

/// Stores `snapshot` in a stopped host's store in place of the one there
/// (through another schema first: the store keeps the newest of a schema).
async fn put_snapshot(dir: &Path, snapshot: Snapshot) {
    let store = open_stopped(&dir.join("data")).await;
    let other = Snapshot {
        schema: snapshot.schema + 1000,
        ..snapshot.clone()
    };
    store.save_snapshot(&other).await.expect("save");
    store.save_snapshot(&snapshot).await.expect("save");
    assert_eq!(
        store.load_snapshot(&snapshot.stream).await.expect("load"),
        Some(snapshot)
    );
    store.close().await;
}
