//! Several `rehydra run` processes on one PostgreSQL store, each with its
//! own compile cache, against real PostgreSQL servers the tests start
//! (`pg-harness`): the same aggregates written through every host; a host
//! killed with SIGKILL under load; a failover to a synchronous standby
//! under load; and the database going away and coming back.
//!
//! Clients behave as the README tells them to: every command carries an
//! `Idempotency-Key`, and an answer that is not a success or a domain
//! refusal (a conflict, `store_unavailable`, a timeout, a dead host) is
//! retried with the same key, on another host if the first is gone. The
//! checks are then the user's: every acknowledged command is in its stream
//! exactly once, versions are contiguous, balances add up, state reads from
//! every host are current, and subscribers on every host see every event
//! once, in one order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rehydra::api::grpc::pb;
use rehydra::api::grpc::pb::streams_client::StreamsClient;
use rehydra::api::grpc::pb::subscribe_request::Start;
use rehydra::api::grpc::pb::subscribe_response::Message;
use rehydra_e2e::{Host, code, hosts_on, pg_server};
use serde_json::{Value, json};

const PLUGIN: &str = "bank-account";

/// What a client learnt of one acknowledged deposit.
#[derive(Debug, Clone)]
struct Ack {
    account: String,
    key: String,
    amount: u64,
}

/// Sends a command with `key` until a host acknowledges it, starting with
/// `hosts[first]` and moving to the next host after any answer that a
/// retry may cure. Returns the body and how many hosts were tried.
async fn until_acknowledged(
    http: &reqwest::Client,
    hosts: &[String],
    first: usize,
    path: &str,
    body: &Value,
    key: &str,
) -> (Value, usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut attempt = 0;
    loop {
        let base = &hosts[(first + attempt) % hosts.len()];
        let sent = http
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .header("Idempotency-Key", key)
            .timeout(Duration::from_secs(15))
            .body(body.to_string())
            .send()
            .await;
        if let Ok(resp) = sent {
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            match (status, code(&answer)) {
                (200, _) => return (answer, attempt + 1),
                (409, "wrong_expected_version") | (503, _) | (504, _) => {}
                _ => panic!("{path} with key {key}: unexpected {status} {text}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} with key {key} was never acknowledged"
        );
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens `accounts` accounts through the first host.
async fn open_accounts(hosts: &[String], prefix: &str, accounts: usize) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for a in 0..accounts {
        let id = format!("{prefix}-{a}");
        until_acknowledged(
            &http,
            hosts,
            0,
            &format!("/v1/aggregates/{PLUGIN}/{id}/commands/open"),
            &json!({"owner": "Ada"}),
            &format!("open-{id}"),
        )
        .await;
        ids.push(id);
    }
    ids
}

/// `clients` clients, each sending `per_client` deposits with keys of its
/// own, client `c` starting at host `c % hosts` and going round the hosts
/// from there; `acked` counts the acknowledged deposits as they come.
/// Returns every acknowledged deposit and how many needed more than one
/// host.
async fn deposit_load(
    hosts: Vec<String>,
    accounts: Vec<String>,
    clients: usize,
    per_client: usize,
    pause: Duration,
    acked: Arc<AtomicUsize>,
) -> (Vec<Ack>, usize) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let hosts = hosts.clone();
        let accounts = accounts.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut acks = Vec::new();
            let mut moved = 0;
            for n in 0..per_client {
                let account = accounts[(c + n) % accounts.len()].clone();
                let amount = (c * per_client + n + 1) as u64;
                let key = format!("deposit-{c}-{n}");
                let first = (c + n) % hosts.len();
                let (_, tried) = until_acknowledged(
                    &http,
                    &hosts,
                    first,
                    &format!("/v1/aggregates/{PLUGIN}/{account}/commands/deposit"),
                    &json!({"amount": amount}),
                    &key,
                )
                .await;
                if tried > 1 {
                    moved += 1;
                }
                acked.fetch_add(1, Ordering::Relaxed);
                acks.push(Ack {
                    account,
                    key,
                    amount,
                });
                tokio::time::sleep(pause).await;
            }
            (acks, moved)
        }));
    }
    let mut acks = Vec::new();
    let mut moved = 0;
    for task in tasks {
        let (a, m) = task.await.expect("a client");
        acks.extend(a);
        moved += m;
    }
    (acks, moved)
}

/// Checks every stream against what clients were told, through `reader`,
/// and every host's state read against the stream. Returns the total number
/// of events in the accounts' streams.
async fn check_streams(reader: &Host, hosts: &[&Host], accounts: &[String], acks: &[Ack]) -> usize {
    let mut total = 0;
    for account in accounts {
        let (status, page) = reader
            .get(&format!("/v1/streams/bank_account-{account}?limit=10000"))
            .await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().expect("events");
        total += events.len();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e["version"],
                json!(i + 1),
                "contiguous versions in {account}"
            );
        }
        let mut stored: BTreeMap<String, u64> = BTreeMap::new();
        for e in events.iter().filter(|e| e["type"] == "Deposited") {
            let key = e["metadata"]["messageId"]
                .as_str()
                .expect("a message id")
                .to_owned();
            let amount = e["data"]["amount"].as_u64().expect("an amount");
            assert!(
                stored.insert(key.clone(), amount).is_none(),
                "deposit {key} stored twice in {account}"
            );
        }
        let acknowledged: BTreeMap<String, u64> = acks
            .iter()
            .filter(|a| &a.account == account)
            .map(|a| (a.key.clone(), a.amount))
            .collect();
        assert_eq!(
            stored, acknowledged,
            "{account}: the stored deposits are exactly the acknowledged ones"
        );
        let balance: u64 = acknowledged.values().sum();
        for host in hosts {
            let (status, state) = host
                .get(&format!("/v1/aggregates/{PLUGIN}/{account}"))
                .await;
            assert_eq!(status, 200, "{state}");
            assert_eq!(
                state["version"],
                json!(events.len()),
                "{} reads the current version of {account}",
                host.base
            );
            assert_eq!(
                state["state"]["balance"],
                json!(balance),
                "{account} on {}",
                host.base
            );
        }
    }
    total
}

/// What a subscriber saw: (stream, version, position) per event, in order.
type Seen = Arc<std::sync::Mutex<Vec<(String, u64, u64)>>>;

/// A live subscriber (gRPC, from the beginning, bank accounts only) that
/// collects (stream, version, position) until dropped.
fn subscribe(host: &Host) -> (tokio::task::JoinHandle<()>, Seen) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let endpoint = host.grpc.clone();
    let into = seen.clone();
    let task = tokio::spawn(async move {
        let channel = tonic::transport::Channel::from_shared(endpoint)
            .expect("an endpoint")
            .connect()
            .await
            .expect("gRPC answers");
        let mut streams = StreamsClient::new(channel);
        let mut sub = streams
            .subscribe(pb::SubscribeRequest {
                start: Some(Start::FromBeginning(true)),
                categories: vec!["bank_account".into()],
                event_types: vec![],
            })
            .await
            .expect("subscribe")
            .into_inner();
        while let Ok(Some(message)) = sub.message().await {
            if let Some(Message::Event(e)) = message.message {
                into.lock()
                    .expect("not poisoned")
                    .push((e.stream, e.version, e.position));
            }
        }
    });
    (task, seen)
}

/// Waits until every subscriber has `total` events, then checks that they
/// saw the same events in the same strictly increasing order, once each.
async fn check_subscribers(seen: &[Seen], total: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in seen {
        while s.lock().expect("not poisoned").len() < total {
            assert!(
                Instant::now() < deadline,
                "a subscriber saw {} of {total} events",
                s.lock().expect("not poisoned").len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = seen[0].lock().expect("not poisoned").clone();
    assert_eq!(first.len(), total, "no event delivered twice");
    for pair in first.windows(2) {
        assert!(pair[0].2 < pair[1].2, "positions strictly increase");
    }
    let distinct: BTreeSet<(String, u64)> = first.iter().map(|(s, v, _)| (s.clone(), *v)).collect();
    assert_eq!(distinct.len(), total, "every event once");
    for other in &seen[1..] {
        assert_eq!(
            *other.lock().expect("not poisoned"),
            first,
            "subscribers on different hosts see one order"
        );
    }
}

/// Waits until `acked` reaches `n`.
async fn wait_for_acks(acked: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "the load made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Three hosts on the store at `url`, six clients depositing
/// `per_client` times each into the same four accounts through all of them,
/// live subscribers on two hosts; then every check of the module docs.
async fn three_hosts_write_the_same_aggregates(url: &str, prefix: &str, per_client: usize) {
    let (hosts, _caches) = hosts_on(&[PLUGIN], url, 3);
    let bases: Vec<String> = hosts.iter().map(|h| h.base.clone()).collect();
    let (sub_a, seen_a) = subscribe(&hosts[1]);
    let (sub_b, seen_b) = subscribe(&hosts[2]);

    let accounts = open_accounts(&bases, prefix, 4).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let (acks, _) = deposit_load(
        bases,
        accounts.clone(),
        6,
        per_client,
        Duration::ZERO,
        acked,
    )
    .await;
    assert_eq!(acks.len(), 6 * per_client);

    let all: Vec<&Host> = hosts.iter().collect();
    let total = check_streams(&hosts[0], &all, &accounts, &acks).await;
    check_subscribers(&[seen_a, seen_b], total).await;
    sub_a.abort();
    sub_b.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hosts_on_one_database_keep_every_acknowledged_command_once() {
    let server = pg_server().await;
    three_hosts_write_the_same_aggregates(&server.url("postgres"), "shared", 40).await;
}

/// The same scenario on `kurrentdb://`, against the in-process KurrentDB
/// **test double** (no KurrentDB server can run here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hosts_on_one_kurrentdb_double_keep_every_acknowledged_command_once() {
    let double =
        kurrentdb_double::KurrentDbDouble::start(kurrentdb_double::DoubleConfig::default())
            .await
            .expect("the KurrentDB test double");
    three_hosts_write_the_same_aggregates(&double.connection_string(), "kdb", 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_killed_under_load_loses_nothing_and_applies_nothing_twice() {
    let server = pg_server().await;
    let (mut hosts, _caches) = hosts_on(&[PLUGIN], &server.url("postgres"), 3);
    let bases: Vec<String> = hosts.iter().map(|h| h.base.clone()).collect();
    let accounts = open_accounts(&bases, "killed", 4).await;

    let acked = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(deposit_load(
        bases,
        accounts.clone(),
        6,
        60,
        Duration::from_millis(20),
        acked.clone(),
    ));
    // Kill a host once a sixth of the load is acknowledged.
    wait_for_acks(&acked, 60).await;
    let killed_at = Instant::now();
    hosts[0].kill9();
    let (acks, moved) = load.await.expect("the load");
    eprintln!(
        "kill -9 under load: {} deposits acknowledged, {moved} retried on another host, \
         load finished {:?} after the kill",
        acks.len(),
        killed_at.elapsed()
    );
    assert_eq!(
        acks.len(),
        360,
        "every deposit acknowledged by a surviving host"
    );
    assert!(moved > 0, "some clients had to move to another host");
    let survivors: Vec<&Host> = hosts[1..].iter().collect();
    check_streams(&hosts[1], &survivors, &accounts, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_to_a_synchronous_standby_loses_no_acknowledged_command() {
    let mut primary = pg_server().await;
    let standby =
        tokio::task::block_in_place(|| primary.start_standby(true)).expect("a synchronous standby");
    let url = format!(
        "postgres://{}@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        pg_harness::USER,
        primary.port(),
        standby.port()
    );
    let (hosts, _caches) = hosts_on(&[PLUGIN], &url, 2);
    let bases: Vec<String> = hosts.iter().map(|h| h.base.clone()).collect();
    let accounts = open_accounts(&bases, "failover", 4).await;

    let acked = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(deposit_load(
        bases.clone(),
        accounts.clone(),
        4,
        80,
        Duration::from_millis(20),
        acked.clone(),
    ));
    wait_for_acks(&acked, 60).await;
    // The primary dies; the standby is promoted; the hosts find it by the
    // multi-host URL.
    let failed_at = Instant::now();
    tokio::task::block_in_place(|| primary.kill()).expect("kill the primary");
    tokio::task::block_in_place(|| standby.promote()).expect("promote the standby");
    let promoted_after = failed_at.elapsed();
    // The first command acknowledged after the promotion.
    let http = reqwest::Client::new();
    until_acknowledged(
        &http,
        &bases,
        0,
        &format!("/v1/aggregates/{PLUGIN}/{}/commands/deposit", accounts[0]),
        &json!({"amount": 1_000_000}),
        "after-failover",
    )
    .await;
    let recovered_after = failed_at.elapsed();
    let (mut acks, moved) = load.await.expect("the load");
    eprintln!(
        "failover under load: promoted {promoted_after:?} after the primary died, first command \
         acknowledged {recovered_after:?} after; {} deposits acknowledged, {moved} needed a retry",
        acks.len()
    );
    acks.push(Ack {
        account: accounts[0].clone(),
        key: "after-failover".into(),
        amount: 1_000_000,
    });
    assert_eq!(acks.len(), 321);
    let all: Vec<&Host> = hosts.iter().collect();
    // Read on the promoted server: every acknowledged deposit is there.
    check_streams(&hosts[0], &all, &accounts, &acks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_going_away_is_store_unavailable_and_the_host_recovers() {
    let mut server = pg_server().await;
    let (hosts, _caches) = hosts_on(&[PLUGIN], &server.url("postgres"), 1);
    let host = &hosts[0];
    let (status, _) = host
        .command(PLUGIN, "outage", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200);
    let (status, health) = host.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));

    tokio::task::block_in_place(|| server.stop()).expect("stop the database");
    let asked = Instant::now();
    let (status, body) = host
        .command(PLUGIN, "outage", "deposit", json!({"amount": 5}))
        .await;
    let answered_in = asked.elapsed();
    assert_eq!((status, code(&body)), (503, "store_unavailable"), "{body}");
    assert!(
        answered_in < Duration::from_secs(20),
        "answered within a bounded time, not {answered_in:?}"
    );
    let (status, health) = host.get("/healthz").await;
    assert_eq!(
        (status, health["status"].as_str()),
        (503, Some("degraded")),
        "{health}"
    );
    let shown = health.to_string();
    assert!(shown.contains("PostgreSQL"), "{shown}");
    // Alive (no reason to restart it), not ready (send traffic elsewhere).
    let (status, _) = host.get("/livez").await;
    assert_eq!(status, 200);
    let (status, ready) = host.get("/readyz").await;
    assert_eq!(
        (status, ready["status"].as_str()),
        (503, Some("not_ready")),
        "{ready}"
    );
    assert!(
        ready["reasons"][0]
            .as_str()
            .is_some_and(|r| r.starts_with("store")),
        "{ready}"
    );

    tokio::task::block_in_place(|| server.start_again()).expect("start the database again");
    let back = Instant::now();
    let deadline = back + Duration::from_secs(30);
    loop {
        let (status, body) = host
            .command(PLUGIN, "outage", "deposit", json!({"amount": 7}))
            .await;
        if status == 200 {
            assert_eq!(
                body["version"], 2,
                "the refused deposit wrote nothing: {body}"
            );
            break;
        }
        assert_eq!(code(&body), "store_unavailable", "{body}");
        assert!(Instant::now() < deadline, "the host did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "database back: the host served again {:?} after the restart",
        back.elapsed()
    );
    let (status, health) = host.get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, _) = host.get("/readyz").await;
    assert_eq!(status, 200, "ready again");
}
