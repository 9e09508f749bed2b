//! The embedded store under a loop of `kill -9` at random moments of a
//! load, through the binary. After each kill the store's files are checked
//! while the host is down (the log: positions and each stream's versions
//! have no gaps, no event id twice; the index database: its checkpoint is
//! not ahead of the log, it holds every position up to it once, and every
//! entry says what the log holds there), then the host restarts on the same directory and every account is
//! checked over HTTP: each acknowledged deposit is stored exactly once, at
//! the version it was acknowledged with; no deposit is stored twice; and
//! the state is the fold of exactly the stored events.
//!
//! The kill moments come from a seed printed at the start; set
//! `REHYDRA_CRASH_SEED` to replay a run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rehydra_e2e::seeded::{Moments, seed};
use rehydra_e2e::store_files::check_store_file;
use rehydra_e2e::{Host, stream_prefix};
use serde_json::{Value, json};

const PLUGIN: &str = "bank-account";
const KILLS: usize = 50;
const ACCOUNTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kills_under_load_lose_and_duplicate_nothing_acknowledged() {
    let mut moments = Moments::new(seed("REHYDRA_CRASH_SEED"));

    let mut host = Host::start(&[PLUGIN]);
    for a in 0..ACCOUNTS {
        let (status, body) = host
            .command(PLUGIN, &format!("acc-{a}"), "open", json!({"owner": "Ada"}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // Per account: the version each acknowledged deposit got -> its
    // amount. Amounts count up per account over the whole run, so a
    // deposit stored twice shows as an amount seen twice.
    let mut acked: Vec<BTreeMap<u64, u64>> = vec![BTreeMap::new(); ACCOUNTS];
    let mut next_amount: Vec<u64> = vec![1; ACCOUNTS];
    let mut unacknowledged_but_stored = 0usize;
    let mut checked: Vec<Checked> = (0..ACCOUNTS).map(|_| Checked::default()).collect();

    for kill in 0..KILLS {
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for (a, first) in next_amount.iter().copied().enumerate() {
            let url = format!(
                "{}/v1/aggregates/{PLUGIN}/acc-{a}/commands/deposit",
                host.base
            );
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut amount = first;
                let mut acks: Vec<(u64, u64)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(json!({ "amount": amount }).to_string())
                        .send()
                        .await;
                    // Every amount sent is used up, answered or not.
                    amount += 1;
                    let Ok(resp) = sent else { break };
                    if resp.status() != 200 {
                        break;
                    }
                    let Ok(body) = resp.json::<Value>().await else {
                        break;
                    };
                    acks.push((body["version"].as_u64().expect("a version"), amount - 1));
                }
                (acks, amount)
            }));
        }
        // Up to 700 ms: past the indexer's first write (it writes at least
        // every 500 ms), so that some kills land while it works.
        tokio::time::sleep(Duration::from_millis(moments.next_ms(20, 700))).await;
        host.kill9();
        stop.store(true, Ordering::Relaxed);
        for (a, writer) in writers.into_iter().enumerate() {
            let (acks, next) = writer.await.expect("a writer");
            next_amount[a] = next;
            for (version, amount) in acks {
                let earlier = acked[a].insert(version, amount);
                assert_eq!(
                    earlier, None,
                    "kill {kill}: acc-{a} v{version} acknowledged twice"
                );
            }
        }

        check_store_file(&host.dir.path().join("data"), kill);
        host.restart();
        // Each kill checks what was stored since the last check; the last
        // one checks every account from its first event again.
        let full = kill + 1 == KILLS;
        if full {
            unacknowledged_but_stored = 0;
        }
        for (a, acks) in acked.iter().enumerate() {
            unacknowledged_but_stored +=
                check_account(&host, a, acks, &mut checked[a], full, kill).await;
        }
        assert!(
            unacknowledged_but_stored <= (kill + 1) * ACCOUNTS,
            "kill {kill}: {unacknowledged_but_stored} deposits stored without an acknowledgement, \
             more than one per account per kill"
        );
    }
    let total: usize = acked.iter().map(BTreeMap::len).sum();
    assert!(total >= KILLS, "the load made progress: {total} deposits");
    eprintln!(
        "crash loop: {KILLS} kills, {total} deposits acknowledged, all stored once; \
         {unacknowledged_but_stored} stored whose answer the kill cut off; 0 lost, 0 duplicated"
    );
}

/// What the checks of one account have verified so far.
#[derive(Default)]
struct Checked {
    /// The account's version up to which its events were checked.
    version: u64,
    /// Every deposit's amount seen in those events.
    amounts: BTreeSet<u64>,
    /// Their sum: the balance the account's state must show.
    balance: u64,
}

/// Checks account `a`'s events since `checked` (all of them if `full`)
/// against what was acknowledged; returns how many of those deposits are
/// stored without having been acknowledged (a kill cut off their answer).
async fn check_account(
    host: &Host,
    a: usize,
    acks: &BTreeMap<u64, u64>,
    checked: &mut Checked,
    full: bool,
    kill: usize,
) -> usize {
    if full {
        *checked = Checked::default();
    }
    let id = format!("acc-{a}");
    let stream = format!("{}-{id}", stream_prefix(PLUGIN));
    let from = checked.version + 1;
    let mut deposits: BTreeSet<(u64, u64)> = BTreeSet::new();
    for event in host.read_stream_from(&stream, from).await {
        let version = event["version"].as_u64().expect("a version");
        assert_eq!(version, checked.version + 1, "kill {kill}: {id}: a gap");
        checked.version = version;
        if event["type"] == "Deposited" {
            let amount = event["data"]["amount"].as_u64().expect("an amount");
            assert!(
                checked.amounts.insert(amount),
                "kill {kill}: {id}: the deposit of {amount} is stored twice"
            );
            checked.balance += amount;
            deposits.insert((version, amount));
        }
    }
    let mut acknowledged = 0;
    for (version, amount) in acks.range(from..) {
        assert!(
            deposits.contains(&(*version, *amount)),
            "kill {kill}: {id}: the deposit of {amount} acknowledged at v{version} is lost"
        );
        acknowledged += 1;
    }
    let (status, state) = host.get(&format!("/v1/aggregates/{PLUGIN}/{id}")).await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(
        state["state"]["balance"], checked.balance,
        "kill {kill}: {id}: the state is not the fold of the stored events"
    );
    deposits.len() - acknowledged
}
