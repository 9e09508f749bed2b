//! Durability: `kill -9` in the middle of a load loses nothing that was
//! acknowledged, and a restart rebuilds identical state and versions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rehydra_e2e::Host;
use serde_json::{Value, json};

const ACCOUNTS: usize = 4;

#[tokio::test]
async fn kill_9_then_restart_keeps_every_acknowledged_command() {
    let mut host = Host::start(&["bank-account", "users"]);
    for a in 0..ACCOUNTS {
        let (status, body) = host
            .command(
                "bank-account",
                &format!("acc-{a}"),
                "open",
                json!({"owner": "Ada"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    // Writers deposit until the host dies under them, recording what was
    // acknowledged: (account, version) -> amount.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for a in 0..ACCOUNTS {
        let base = host.base.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acked: Vec<(u64, u64)> = Vec::new();
            for n in 1..=10_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let sent = client
                    .post(format!(
                        "{base}/v1/aggregates/bank-account/acc-{a}/commands/deposit"
                    ))
                    .header("content-type", "application/json")
                    .body(json!({"amount": n}).to_string())
                    .send()
                    .await;
                let Ok(resp) = sent else { break };
                if resp.status() != 200 {
                    break;
                }
                let Ok(body) = resp.json::<Value>().await else {
                    break;
                };
                acked.push((body["version"].as_u64().expect("version"), n));
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    host.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut acked: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
    for (a, w) in writers.into_iter().enumerate() {
        acked.insert(a, w.await.expect("writer"));
    }
    assert!(
        acked.values().map(Vec::len).sum::<usize>() >= ACCOUNTS,
        "the load made progress: {acked:?}"
    );

    host.restart();
    for (a, acks) in &acked {
        let id = format!("acc-{a}");
        let (status, state) = host.get(&format!("/v1/aggregates/bank-account/{id}")).await;
        assert_eq!(status, 200, "{state}");
        let version = state["version"].as_u64().unwrap();
        let last_acked = acks.last().map(|(v, _)| *v).unwrap_or(1);
        assert!(
            version >= last_acked,
            "{id}: version {version} is below the acknowledged {last_acked}"
        );
        // At most the one command in flight at the kill may have landed
        // without its acknowledgement.
        assert!(
            version <= last_acked + 1,
            "{id}: version {version}, acknowledged {last_acked}"
        );

        let (_, stream) = host
            .get(&format!("/v1/streams/bank_account-{id}?limit=1000"))
            .await;
        let events = stream["events"].as_array().unwrap();
        let versions: Vec<u64> = events
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert_eq!(
            versions,
            (1..=version).collect::<Vec<_>>(),
            "{id}: contiguous versions"
        );
        for (v, amount) in acks {
            assert_eq!(
                events[*v as usize - 1]["data"]["amount"],
                *amount,
                "{id} v{v}: the acknowledged deposit"
            );
        }
        let balance: u64 = events[1..]
            .iter()
            .map(|e| e["data"]["amount"].as_u64().unwrap())
            .sum();
        assert_eq!(
            state["state"]["balance"], balance,
            "{id}: state rebuilt from exactly the stored events"
        );
    }

    // A second restart gives byte-for-byte the same answers.
    let mut before = Vec::new();
    for a in 0..ACCOUNTS {
        before.push(
            host.get(&format!("/v1/aggregates/bank-account/acc-{a}"))
                .await
                .1,
        );
    }
    host.restart();
    for (a, b) in before.iter().enumerate() {
        assert_eq!(
            &host
                .get(&format!("/v1/aggregates/bank-account/acc-{a}"))
                .await
                .1,
            b
        );
    }
    // And the aggregates keep working after recovery.
    let (status, body) = host
        .command("bank-account", "acc-0", "deposit", json!({"amount": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
}
