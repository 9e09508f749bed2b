//! Durable timers end to end, with the `order` and `inventory` example
//! plugins: an order reserves stock by timer at once, must be paid before a
//! deadline timer fires, and releases its stock when that timer cancels it.
//!
//! What a user relies on: a timer fires once in effect, also when the host
//! is killed (`kill -9`) and restarted around it, and when it came due while
//! no host ran (then it is marked late); a cancelled timer never fires;
//! pending timers are visible over HTTP, gRPC and the CLI; bad timers and
//! too many timers are refused with nothing stored.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rehydra::api::grpc::pb;
use rehydra::api::grpc::pb::timers_client::TimersClient;
use rehydra_e2e::seeded::{Moments, seed};
use rehydra_e2e::{Host, code, metric, wait_for};
use serde_json::{Value, json};

const PLUGINS: &[&str] = &["order", "inventory"];

async fn order_status(host: &Host, id: &str) -> String {
    host.state("order", id).await["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The events of `stream` that are the plugin's (not the host's `$timers`).
async fn domain_events(host: &Host, stream: &str) -> Vec<Value> {
    host.read_stream(stream)
        .await
        .into_iter()
        .filter(|e| !e["type"].as_str().unwrap_or("$").starts_with('$'))
        .collect()
}

async fn restock(host: &Host, sku: &str, quantity: u64) {
    let (status, body) = host
        .command("inventory", sku, "restock", json!({ "quantity": quantity }))
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn place(host: &Host, id: &str, sku: &str, quantity: u64, pay_within_ms: u64) -> Value {
    let (status, body) = host
        .command(
            "order",
            id,
            "place",
            json!({ "sku": sku, "quantity": quantity, "pay_within_ms": pay_within_ms }),
        )
        .await;
    assert_eq!(status, 200, "placing {id}: {body}");
    body
}

async fn pending_timers(host: &Host, query: &str) -> Value {
    let (status, body) = host.get(&format!("/v1/timers{query}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The tour of the README: an unpaid order is cancelled at its deadline
/// and its stock released; a paid one keeps its stock, and its deadline
/// timer, cancelled by the payment, never fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_is_cancelled_at_its_deadline_and_a_paid_one_is_not() {
    let host = Host::start(PLUGINS);
    restock(&host, "sku-1", 10).await;

    let placed = place(&host, "o1", "sku-1", 2, 1500).await;
    // The command's answer shows the timers it stored, after its events.
    let events = placed["events"].as_array().expect("events");
    assert_eq!(events.len(), 2, "{placed}");
    assert_eq!(events[0]["type"], "Placed");
    assert_eq!(events[1]["type"], "$timers");
    let changes = events[1]["data"]["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 2, "{placed}");
    assert_eq!(changes[0]["schedule"]["key"], "reserve");
    assert_eq!(
        changes[0]["schedule"]["target"],
        json!({"type": "inventory", "id": "sku-1"})
    );
    assert_eq!(changes[1]["schedule"]["key"], "payment-deadline");

    place(&host, "o2", "sku-1", 3, 1500).await;
    // Both deadlines are pending, visible per aggregate and in all.
    let o2 = pending_timers(&host, "?aggregate=order/o2").await;
    assert!(
        o2["timers"]
            .as_array()
            .expect("timers")
            .iter()
            .any(|t| t["key"] == "payment-deadline" && t["command"] == "expire"),
        "{o2}"
    );
    let (status, paid) = host.command("order", "o2", "pay", json!({})).await;
    assert_eq!(status, 200, "{paid}");
    let o2 = pending_timers(&host, "?aggregate=order/o2").await;
    assert!(
        !o2["timers"]
            .as_array()
            .expect("timers")
            .iter()
            .any(|t| t["key"] == "payment-deadline"),
        "paying cancels the deadline: {o2}"
    );

    // o1's deadline cancels it, and its cancellation releases its stock.
    wait_for(Duration::from_secs(20), "o1 to be cancelled", || async {
        (order_status(&host, "o1").await == "cancelled").then_some(())
    })
    .await;
    let stock = wait_for(Duration::from_secs(20), "the stock to settle", || async {
        let stock = host.state("inventory", "sku-1").await;
        (stock["reserved"] == json!({}) && stock["on_hand"] == 7).then_some(stock)
    })
    .await;
    assert_eq!(stock, json!({"on_hand": 7, "reserved": {}}));
    assert_eq!(order_status(&host, "o2").await, "paid");

    // The Cancelled event says which timer sent its command, on time.
    let o1 = domain_events(&host, "order-o1").await;
    let cancelled = o1
        .iter()
        .find(|e| e["type"] == "Cancelled")
        .expect("o1 cancelled");
    assert_eq!(cancelled["data"]["late"], false, "{cancelled}");
    let timer = &cancelled["metadata"]["timer"];
    assert_eq!(timer["key"], "payment-deadline", "{cancelled}");
    assert_eq!(timer["scheduledBy"], "order/o1", "{cancelled}");
    assert_eq!(timer["late"], false, "{cancelled}");

    // Wait past o2's cancelled deadline: nothing is pending, and exactly
    // the five expected commands were sent (o1: reserve, expire, release;
    // o2: reserve, commit), not o2's expire.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let all = pending_timers(&host, "").await;
    assert_eq!(all["count"], 0, "{all}");
    let metrics = host.metrics().await;
    let done = metric(
        &metrics,
        "rehydra_timers_fired_total{outcome=\"done\",late=\"false\"}",
    );
    assert_eq!(done, Some(5.0), "{metrics}");
    let inventory = domain_events(&host, "inventory-sku-1").await;
    let kinds: Vec<&str> = inventory
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["Restocked", "Reserved", "Reserved", "Sold", "Released"],
        "{inventory:?}"
    );
}

/// A timer that came due while no host ran fires once at the next start,
/// marked late, and the host counts it late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_due_while_the_host_was_down_fires_at_start_marked_late() {
    let mut host = Host::start(PLUGINS);
    restock(&host, "sku-1", 5).await;
    place(&host, "o3", "sku-1", 1, 1000).await;
    // The reservation fires at once; the deadline must fall while the host
    // is down.
    wait_for(Duration::from_secs(20), "the reservation", || async {
        (host.state("inventory", "sku-1").await["reserved"] == json!({"o3": 1})).then_some(())
    })
    .await;
    host.kill9();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    host.restart();

    wait_for(Duration::from_secs(20), "o3 to be cancelled", || async {
        (order_status(&host, "o3").await == "cancelled").then_some(())
    })
    .await;
    let o3 = domain_events(&host, "order-o3").await;
    let cancelled: Vec<&Value> = o3.iter().filter(|e| e["type"] == "Cancelled").collect();
    assert_eq!(cancelled.len(), 1, "{o3:?}");
    assert_eq!(cancelled[0]["data"]["late"], true, "{o3:?}");
    assert_eq!(cancelled[0]["metadata"]["timer"]["late"], true, "{o3:?}");
    wait_for(Duration::from_secs(20), "the release", || async {
        (host.state("inventory", "sku-1").await == json!({"on_hand": 5, "reserved": {}}))
            .then_some(())
    })
    .await;
    let metrics = host.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "rehydra_timers_fired_total{outcome=\"done\",late=\"true\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// Orders placed and paid, then the host killed with SIGKILL at moments
/// drawn from a printed seed while their timers come due, and restarted:
/// every timer takes effect exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_take_effect_once_across_kill9_restarts() {
    let mut moments = Moments::new(seed("REHYDRA_TIMER_SEED"));

    let mut host = Host::start(PLUGINS);
    const ORDERS: usize = 40;
    const KILLS: usize = 6;
    const STOCK: u64 = 1000;
    restock(&host, "sku-1", STOCK).await;
    let mut paid = BTreeSet::new();
    let mut quantities = BTreeMap::new();
    for i in 0..ORDERS {
        let id = format!("c{i}");
        let quantity = 1 + moments.below(5);
        place(&host, &id, "sku-1", quantity, 300 + moments.below(3000)).await;
        quantities.insert(id.clone(), quantity);
        if i % 3 == 0 {
            let (status, body) = host.command("order", &id, "pay", json!({})).await;
            assert_eq!(status, 200, "{body}");
            paid.insert(id);
        }
    }
    for round in 0..KILLS {
        let wait = 100 + moments.below(900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        println!("kill -9 {round} after {wait} ms");
        host.kill9();
        host.restart();
    }

    // Every unpaid order ends cancelled, every paid one paid.
    for id in quantities.keys() {
        let want = if paid.contains(id) {
            "paid"
        } else {
            "cancelled"
        };
        wait_for(
            Duration::from_secs(60),
            &format!("{id} to be {want}"),
            || async { (order_status(&host, id).await == want).then_some(()) },
        )
        .await;
    }
    let sold: u64 = paid.iter().map(|id| quantities[id]).sum();
    wait_for(Duration::from_secs(60), "the stock to settle", || async {
        (host.state("inventory", "sku-1").await == json!({"on_hand": STOCK - sold, "reserved": {}}))
            .then_some(())
    })
    .await;

    // Each timer's command stored its events once: one Cancelled per unpaid
    // order, and per order one Reserved and one Released or Sold.
    let mut effects: BTreeMap<String, usize> = BTreeMap::new();
    let mut fired_ids = BTreeSet::new();
    for id in quantities.keys() {
        let events = domain_events(&host, &format!("order-{id}")).await;
        let cancelled = events.iter().filter(|e| e["type"] == "Cancelled").count();
        assert_eq!(
            cancelled,
            usize::from(!paid.contains(id)),
            "{id}: {events:?}"
        );
        for e in &events {
            if let Some(t) = e["metadata"]["timer"]["id"].as_str() {
                assert!(
                    fired_ids.insert(t.to_string()),
                    "timer {t} took effect twice"
                );
            }
        }
    }
    for e in domain_events(&host, "inventory-sku-1").await {
        if let Some(order) = e["data"]["order"].as_str() {
            *effects
                .entry(format!("{order} {}", e["type"].as_str().unwrap_or("?")))
                .or_default() += 1;
        }
        if let Some(t) = e["metadata"]["timer"]["id"].as_str() {
            assert!(
                fired_ids.insert(t.to_string()),
                "timer {t} took effect twice"
            );
        }
    }
    for id in quantities.keys() {
        let last = if paid.contains(id) {
            "Sold"
        } else {
            "Released"
        };
        for kind in ["Reserved", last] {
            assert_eq!(
                effects.get(&format!("{id} {kind}")),
                Some(&1),
                "{id}: {effects:?}"
            );
        }
    }
    let expected = 3 * (ORDERS - paid.len()) + 2 * paid.len();
    println!(
        "timers that took effect: {} of {expected} expected ({} orders, {} paid, {KILLS} kills)",
        fired_ids.len(),
        ORDERS,
        paid.len()
    );
    assert_eq!(fired_ids.len(), expected);
    let all = pending_timers(&host, "").await;
    assert_eq!(all["count"], 0, "{all}");
}

/// Pending timers over gRPC and the CLI, and bad queries on every API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_timers_are_listed_on_every_api() {
    let host = Host::start(PLUGINS);
    // No stock: the reservation is refused, which is final.
    place(&host, "o9", "sku-9", 1, 3_600_000).await;

    let (code_, out, err) = host.cli(&["timers", "--aggregate", "order/o9"]);
    assert_eq!(code_, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    let timers = listed["timers"].as_array().expect("timers");
    assert!(
        timers.iter().any(|t| t["key"] == "payment-deadline"
            && t["scheduledBy"] == json!({"type": "order", "id": "o9"})),
        "{listed}"
    );

    let channel = tonic::transport::Channel::from_shared(host.grpc.clone())
        .expect("an endpoint")
        .connect()
        .await
        .expect("gRPC answers");
    let mut client = TimersClient::new(channel);
    let list = client
        .list(pb::ListTimersRequest {
            aggregate: "order/o9".into(),
            limit: 0,
        })
        .await
        .expect("listed")
        .into_inner();
    let deadline = list
        .timers
        .iter()
        .find(|t| t.key == "payment-deadline")
        .expect("the deadline over gRPC");
    assert_eq!(deadline.command, "expire");
    assert_eq!(
        deadline.target.as_ref().map(|t| t.aggregate_id.as_str()),
        Some("o9")
    );
    let bad = client
        .list(pb::ListTimersRequest {
            aggregate: "no-slash".into(),
            limit: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    for query in ["?aggregate=no-slash", "?limit=0", "?limit=5000", "?limit=x"] {
        let (status, body) = host.get(&format!("/v1/timers{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(code(&body), "malformed_request", "{query}: {body}");
    }

    // The refused reservation is gone from the pending timers (it was
    // final), and the order still waits for its payment.
    wait_for(
        Duration::from_secs(20),
        "the reservation to be tried",
        || async {
            let all = pending_timers(&host, "?aggregate=inventory/sku-9").await;
            (all["count"] == 0).then_some(())
        },
    )
    .await;
    let metrics = host.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "rehydra_timers_fired_total{outcome=\"refused\",late=\"false\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(order_status(&host, "o9").await, "placed");
}

/// A plugin's bad timer is a plugin failure with nothing stored; a command
/// that would pass the per-aggregate cap is refused with nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_timers_and_too_many_timers_store_nothing() {
    let host = Host::start_with(
        &["faulty", "order", "inventory"],
        &["--max-timers-per-aggregate", "1"],
    );
    for case in ["key", "at", "command"] {
        let (status, body) = host
            .command("faulty", "f1", "bad-timer", json!({ "case": case }))
            .await;
        assert_eq!(status, 500, "{case}: {body}");
        assert_eq!(code(&body), "plugin_failed", "{case}: {body}");
        assert_eq!(body["error"]["details"]["reason"], "bad_output", "{body}");
    }
    assert!(host.read_stream("faulty-f1").await.is_empty());

    // `place` schedules two timers; one is allowed.
    let (status, body) = host
        .command(
            "order",
            "o1",
            "place",
            json!({ "sku": "s", "quantity": 1, "pay_within_ms": 60000 }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(code(&body), "too_many_timers", "{body}");
    assert_eq!(body["error"]["details"], json!({"pending": 2, "limit": 1}));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--max-timers-per-aggregate"), "{message}");
    assert!(host.read_stream("order-o1").await.is_empty());
    assert_eq!(pending_timers(&host, "").await["count"], 0);
    // A dry run answers as the command would.
    let (status, body) = host
        .command_raw(
            "order",
            "o1",
            "place?dry_run=true",
            r#"{"sku":"s","quantity":1,"pay_within_ms":60000}"#,
            &[],
        )
        .await;
    assert_eq!((status, code(&body)), (422, "too_many_timers"), "{body}");
}
