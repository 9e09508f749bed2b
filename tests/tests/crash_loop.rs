//! The embedded store under a loop of `kill -9` at random moments of a
//! load, through the binary. After each kill the store's file is checked
//! while the host is down (SQLite's indexes agree with the table,
//! positions and each stream's versions have no gaps, no event id twice),
//! then the host restarts on the same directory and every account is
//! checked over HTTP: each acknowledged deposit is stored exactly once, at
//! the version it was acknowledged with; no deposit is stored twice; and
//! the state is the fold of exactly the stored events.
//!
//! The kill moments come from a seed printed at the start; set
//! `REHYDRA_CRASH_SEED` to replay a run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rehydra_e2e::{Host, stream_prefix};
use serde_json::{Value, json};

const PLUGIN: &str = "bank-account";
const KILLS: usize = 50;
const ACCOUNTS: usize = 8;

/// A small deterministic generator (xorshift64*), so that a failing run
/// can be replayed from its seed.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, from: u64, to: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        from + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (to - from)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kills_under_load_lose_and_duplicate_nothing_acknowledged() {
    let seed = std::env::var("REHYDRA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("crash loop seed {seed} (REHYDRA_CRASH_SEED={seed} replays it)");
    let mut moments = Moments(seed | 1);

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
        tokio::time::sleep(Duration::from_millis(moments.next_ms(20, 300))).await;
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
        unacknowledged_but_stored = 0;
        for (a, acks) in acked.iter().enumerate() {
            unacknowledged_but_stored += check_account(&host, a, acks, kill).await;
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

/// The store's file right after a kill, before any host opens it again.
fn check_store_file(dir: &Path, kill: usize) {
    let db = rehydra::store::embedded::DB_FILE;
    // Read-write only so that SQLite may rebuild its WAL index after the
    // crash; nothing is written.
    let conn = rusqlite::Connection::open(dir.join(db)).expect("the store's database opens");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("an integrity check");
    assert_eq!(integrity, "ok", "kill {kill}: tables and indexes disagree");
    let (count, first, last, ids): (i64, i64, i64, i64) = conn
        .query_row(
            "SELECT count(*), COALESCE(min(position), 1), COALESCE(max(position), 0), \
             count(DISTINCT event_id) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("the positions");
    assert_eq!(
        (first, last - first + 1),
        (1, count),
        "kill {kill}: positions have gaps"
    );
    assert_eq!(ids, count, "kill {kill}: an event id stored twice");
    let gaps: i64 = conn
        .query_row(
            "SELECT count(*) FROM (SELECT stream FROM events GROUP BY stream \
             HAVING min(version) <> 1 OR max(version) <> count(*))",
            [],
            |r| r.get(0),
        )
        .expect("the versions");
    assert_eq!(gaps, 0, "kill {kill}: a stream's versions have gaps");
}

/// Checks account `a` against what was acknowledged; returns how many of
/// its deposits are stored without having been acknowledged (a kill cut
/// off their answer).
async fn check_account(host: &Host, a: usize, acks: &BTreeMap<u64, u64>, kill: usize) -> usize {
    let id = format!("acc-{a}");
    let stream = format!("{}-{id}", stream_prefix(PLUGIN));
    let events = host.read_stream(&stream).await;
    let deposits: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["type"] == "Deposited")
        .map(|e| {
            (
                e["version"].as_u64().unwrap_or_default(),
                e["data"]["amount"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    for (version, amount) in acks {
        assert!(
            deposits.contains(&(*version, *amount)),
            "kill {kill}: {id}: the deposit of {amount} acknowledged at v{version} is lost"
        );
    }
    let distinct: BTreeSet<u64> = deposits.iter().map(|(_, amount)| *amount).collect();
    assert_eq!(
        distinct.len(),
        deposits.len(),
        "kill {kill}: {id}: a deposit is stored twice"
    );
    let (status, state) = host.get(&format!("/v1/aggregates/{PLUGIN}/{id}")).await;
    assert_eq!(status, 200, "{state}");
    let balance: u64 = deposits.iter().map(|(_, amount)| amount).sum();
    assert_eq!(
        state["state"]["balance"], balance,
        "kill {kill}: {id}: the state is not the fold of the stored events"
    );
    deposits.len() - acks.len()
}
