//! Timers and process managers on a store shared by hosts: two hosts on
//! one real PostgreSQL server (and on the KurrentDB test double), each with
//! its own timer index, each sending due timers and delivering followed
//! events. Every timer and
//! every delivery must take effect once: the second host's sending is
//! answered by the message id.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rehydra_e2e::{hosts_on, pg_server, wait_for};
use serde_json::json;

const PLUGINS: &[&str] = &["bank-account", "transfer", "order", "inventory"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_one_database_fire_each_timer_and_end_each_transfer_once() {
    let server = pg_server().await;
    two_hosts_fire_each_timer_and_end_each_transfer_once(&server.url("postgres")).await;
}

/// The same on the KurrentDB **test double** (no KurrentDB server can run
/// here): the `$timers` events live in the aggregates' own streams and are
/// read back through `$all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_one_kurrentdb_double_fire_each_timer_and_end_each_transfer_once() {
    let double =
        kurrentdb_double::KurrentDbDouble::start(kurrentdb_double::DoubleConfig::default())
            .await
            .expect("the KurrentDB test double");
    two_hosts_fire_each_timer_and_end_each_transfer_once(&double.connection_string()).await;
}

async fn two_hosts_fire_each_timer_and_end_each_transfer_once(url: &str) {
    let (hosts, _caches) = hosts_on(PLUGINS, url, 2);
    let host = |i: usize| &hosts[i % 2];

    for account in ["a", "b"] {
        host(0)
            .command_ok("bank-account", account, "open", json!({ "owner": account }))
            .await;
        host(1)
            .command_ok("bank-account", account, "deposit", json!({ "amount": 500 }))
            .await;
    }
    host(0)
        .command_ok("bank-account", "closed", "open", json!({ "owner": "x" }))
        .await;
    host(1)
        .command_ok("bank-account", "closed", "close", json!({}))
        .await;
    host(0)
        .command_ok("inventory", "sku", "restock", json!({ "quantity": 100 }))
        .await;

    const TRANSFERS: usize = 20;
    for i in 0..TRANSFERS {
        let (from, to) = match i % 4 {
            0 => ("a", "b"),
            1 => ("b", "a"),
            2 => ("a", "closed"),
            _ => ("b", "closed"),
        };
        host(i)
            .command_ok(
                "transfer",
                &format!("t{i}"),
                "start",
                json!({ "from": from, "to": to, "amount": 1 + i as u64 }),
            )
            .await;
    }
    const ORDERS: usize = 10;
    let mut paid = BTreeSet::new();
    for i in 0..ORDERS {
        let id = format!("o{i}");
        host(i)
            .command_ok(
                "order",
                &id,
                "place",
                json!({ "sku": "sku", "quantity": 1, "pay_within_ms": 300 + 100 * i as u64 }),
            )
            .await;
        if i % 3 == 0 {
            host(i + 1).command_ok("order", &id, "pay", json!({})).await;
            paid.insert(id);
        }
    }

    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..TRANSFERS {
        let id = format!("t{i}");
        let end = wait_for(Duration::from_secs(60), &format!("{id} to end"), || async {
            let status = host(i + 1).state("transfer", &id).await["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ["completed", "compensated", "failed"]
                .contains(&status.as_str())
                .then_some(status)
        })
        .await;
        *ends.entry(end).or_default() += 1;
    }
    assert_eq!(ends.get("completed"), Some(&(TRANSFERS / 2)), "{ends:?}");
    assert_eq!(ends.get("compensated"), Some(&(TRANSFERS / 2)), "{ends:?}");
    for i in 0..ORDERS {
        let id = format!("o{i}");
        let want = if paid.contains(&id) {
            "paid"
        } else {
            "cancelled"
        };
        wait_for(Duration::from_secs(60), &format!("{id} {want}"), || async {
            (host(i).state("order", &id).await["status"] == want).then_some(())
        })
        .await;
    }
    let sold = paid.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stock = host(0).state("inventory", "sku").await;
        if stock == json!({"on_hand": 100 - sold, "reserved": {}}) {
            break;
        }
        if Instant::now() > deadline {
            // What the item's stream holds, to compare with its state.
            for e in host(0).read_stream("inventory-sku").await {
                println!("{} {} {}", e["type"], e["data"], e["metadata"]["timer"]);
            }
            panic!("the stock did not settle: {stock}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each timer took effect once, whichever host sent it (or both did).
    let mut fired = BTreeSet::new();
    let mut streams: Vec<String> = ["a", "b", "closed"]
        .iter()
        .map(|a| format!("bank_account-{a}"))
        .collect();
    streams.push("inventory-sku".into());
    streams.extend((0..ORDERS).map(|i| format!("order-o{i}")));
    streams.extend((0..TRANSFERS).map(|i| format!("transfer-t{i}")));
    for stream in &streams {
        // The plugin's events (a command's `$timers` event carries the same
        // timer metadata as the events before it).
        let events = host(0).read_stream(stream).await;
        for e in events
            .iter()
            .filter(|e| e["type"].as_str().is_some_and(|t| !t.starts_with('$')))
        {
            if let Some(id) = e["metadata"]["timer"]["id"].as_str() {
                assert!(
                    fired.insert(id.to_string()),
                    "timer {id} took effect twice in {stream}"
                );
            }
        }
    }
    // What stores events: per transfer a debit and a credit, or a debit
    // and a refund (a refused credit stores nothing); per order a
    // reservation, then its expiry and release, or its sale.
    let storing = 2 * TRANSFERS + 3 * (ORDERS - paid.len()) + 2 * paid.len();
    println!(
        "two hosts: {} timers took effect, {storing} expected; transfers {ends:?}",
        fired.len()
    );
    assert_eq!(fired.len(), storing);
    let a = host(0).state("bank-account", "a").await["balance"].as_u64();
    let b = host(1).state("bank-account", "b").await["balance"].as_u64();
    assert_eq!(
        a.zip(b).map(|(a, b)| a + b),
        Some(1000),
        "the money adds up"
    );
}
