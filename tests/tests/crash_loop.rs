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
    check_index_file(dir, &conn, last, kill);
}

/// The index database right after a kill: consistent with the log, and
/// its checkpoint never ahead of it. (It may be behind: the catch-up at
/// open indexes the rest.)
fn check_index_file(dir: &Path, log: &rusqlite::Connection, log_head: i64, kill: usize) {
    let path = dir.join(rehydra::store::embedded::INDEX_FILE);
    if !path.exists() {
        return; // killed before the first open made it
    }
    let index = rusqlite::Connection::open(&path).expect("the index database opens");
    let integrity: String = index
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("an integrity check");
    assert_eq!(
        integrity, "ok",
        "kill {kill}: the index database is damaged"
    );
    let checkpoint: i64 = index
        .query_row("SELECT indexed_up_to FROM index_state", [], |r| r.get(0))
        .expect("the checkpoint");
    assert!(
        checkpoint <= log_head,
        "kill {kill}: the index claims position {checkpoint}, the log ends at {log_head}"
    );
    // Each index holds every position up to the checkpoint, once, and
    // nothing above it.
    for table in ["stream_index", "event_id_index"] {
        let (count, distinct, max): (i64, i64, i64) = index
            .query_row(
                &format!(
                    "SELECT count(*), count(DISTINCT position), COALESCE(max(position), 0) \
                     FROM {table}"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("the index's positions");
        assert_eq!(
            (count, distinct, max),
            (checkpoint, checkpoint, checkpoint),
            "kill {kill}: {table} does not hold exactly the positions up to {checkpoint}"
        );
    }
    // And each entry says what the log holds at its position.
    log.execute("ATTACH DATABASE ?1 AS idx", [path.to_string_lossy()])
        .expect("attach the index");
    let agreeing: i64 = log
        .query_row(
            "SELECT count(*) FROM idx.stream_index i JOIN events e ON e.position = i.position \
             WHERE e.stream = i.stream AND e.version = i.version",
            [],
            |r| r.get(0),
        )
        .expect("the stream index against the log");
    assert_eq!(
        agreeing, checkpoint,
        "kill {kill}: the stream index disagrees with the log"
    );
    let mut by_id = log
        .prepare(
            "SELECT x.id_key, x.position, e.event_id FROM idx.event_id_index x \
             LEFT JOIN events e ON e.position = x.position",
        )
        .expect("select");
    let rows = by_id
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })
        .expect("rows");
    for row in rows {
        let (key, position, id) = row.expect("row");
        let logged_key = id
            .as_deref()
            .and_then(|id| id.get(..8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(i64::from_be_bytes);
        assert_eq!(
            logged_key,
            Some(key),
            "kill {kill}: the event-id index disagrees with the log at {position}"
        );
    }
    drop(by_id);
    log.execute_batch("DETACH DATABASE idx")
        .expect("detach the index");
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
