//! Durability: `kill -9` in the middle of a load loses nothing that was
//! acknowledged, and a restart rebuilds identical state and versions — with
//! the bank account in each of its languages (`::rust`, `::js`, `::python`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rehydra_e2e::{Host, for_each_bank_account, stream_prefix};
use serde_json::{Value, json};

const ACCOUNTS: usize = 4;

for_each_bank_account!(kill_9_then_restart_keeps_every_acknowledged_command);

async fn kill_9_then_restart_keeps_every_acknowledged_command(plugin: &str) {
    let mut host = Host::start(&[plugin, "users"]);
    for a in 0..ACCOUNTS {
        let (status, body) = host
            .command(plugin, &format!("acc-{a}"), "open", json!({"owner": "Ada"}))
            .await;
        assert_eq!(status, 200, "{plugin}: {body}");
    }

    // Writers deposit until the host dies under them, recording what was
    // acknowledged: (account, version) -> amount.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for a in 0..ACCOUNTS {
        let url = format!(
            "{}/v1/aggregates/{plugin}/acc-{a}/commands/deposit",
            host.base
        );
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acked: Vec<(u64, u64)> = Vec::new();
            for n in 1..=10_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let sent = client
                    .post(&url)
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
        "{plugin}: the load made progress: {acked:?}"
    );

    host.restart();
    for (a, acks) in &acked {
        let id = format!("acc-{a}");
        let (status, state) = host.get(&format!("/v1/aggregates/{plugin}/{id}")).await;
        assert_eq!(status, 200, "{plugin}: {state}");
        let version = state["version"].as_u64().unwrap_or_default();
        let last_acked = acks.last().map(|(v, _)| *v).unwrap_or(1);
        assert!(
            version >= last_acked,
            "{plugin} {id}: version {version} is below the acknowledged {last_acked}"
        );
        // At most the one command in flight at the kill may have landed
        // without its acknowledgement.
        assert!(
            version <= last_acked + 1,
            "{plugin} {id}: version {version}, acknowledged {last_acked}"
        );

        let events = host
            .read_stream(&format!("{}-{id}", stream_prefix(plugin)))
            .await;
        let versions: Vec<u64> = events
            .iter()
            .map(|e| e["version"].as_u64().unwrap_or_default())
            .collect();
        assert_eq!(
            versions,
            (1..=version).collect::<Vec<_>>(),
            "{plugin} {id}: contiguous versions"
        );
        for (v, amount) in acks {
            assert_eq!(
                events[*v as usize - 1]["data"]["amount"],
                *amount,
                "{plugin} {id} v{v}: the acknowledged deposit"
            );
        }
        let balance: u64 = events[1..]
            .iter()
            .map(|e| e["data"]["amount"].as_u64().unwrap_or_default())
            .sum();
        assert_eq!(
            state["state"]["balance"], balance,
            "{plugin} {id}: state rebuilt from exactly the stored events"
        );
    }

    // A second restart gives byte-for-byte the same answers.
    let mut before = Vec::new();
    for a in 0..ACCOUNTS {
        before.push(
            host.get(&format!("/v1/aggregates/{plugin}/acc-{a}"))
                .await
                .1,
        );
    }
    host.restart();
    for (a, b) in before.iter().enumerate() {
        assert_eq!(
            &host
                .get(&format!("/v1/aggregates/{plugin}/acc-{a}"))
                .await
                .1,
            b,
            "{plugin} acc-{a}: the same answer after a second restart"
        );
    }
    // And the aggregates keep working after recovery.
    let (status, body) = host
        .command(plugin, "acc-0", "deposit", json!({"amount": 1}))
        .await;
    assert_eq!(status, 200, "{plugin}: {body}");
}
