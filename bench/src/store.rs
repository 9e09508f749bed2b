//! The event store alone: appends straight into `embedded://`, without
//! actors or plugins, so the durable figures can be split into what the
//! store's writer can take and what the command path adds on top.
//!
//! Each client owns a disjoint share of the streams, knows their versions,
//! and appends one `Deposited` event with the host's metadata at a time,
//! with an exact expected version — what an actor does after its plugin
//! decided. A fresh store per run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rehydra::store::{EventData, EventStore, ExpectedVersion};
use serde_json::json;

use crate::inproc::{OpenStore, SeedMetadata, StoreKind, client_accounts};
use crate::stats::RunResult;

/// One `Deposited` event as the host would append it for a deposit.
fn deposited(message_id: &str) -> EventData {
    EventData {
        event_id: uuid::Uuid::new_v4(),
        event_type: "Deposited".into(),
        data: json!({"amount": 1}).to_string().into_bytes(),
        metadata: SeedMetadata::Host.bytes("deposit", message_id),
        message_id: message_id.into(),
    }
}

/// Runs `concurrency` clients appending for `secs` over `streams` streams
/// that already hold one event each.
async fn drive(
    store: &Arc<dyn EventStore>,
    versions: &Arc<Vec<AtomicU64>>,
    streams: usize,
    concurrency: usize,
    secs: f64,
) -> RunResult {
    crate::stats::closed_loop(concurrency, secs, |t, deadline| {
        let store = store.clone();
        let versions = versions.clone();
        async move {
            let mine = client_accounts(t, concurrency, streams);
            // A client that owns its streams knows their versions, as an
            // actor does.
            let owned = streams >= concurrency;
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0usize;
            let mut k = 0;
            while Instant::now() < deadline {
                let i = mine[k % mine.len()];
                k += 1;
                let stream = format!("bank_account-acc-{i}");
                let message_id = uuid::Uuid::new_v4().to_string();
                // Clients sharing a stream would race; `Any` keeps them
                // appending instead of counting conflicts.
                let expected = if owned {
                    ExpectedVersion::Exact(versions[i].load(Ordering::Relaxed))
                } else {
                    ExpectedVersion::Any
                };
                let t0 = Instant::now();
                match store
                    .append(&stream, expected, vec![deposited(&message_id)])
                    .await
                {
                    Ok(done) => {
                        versions[i].store(done.version, Ordering::Relaxed);
                        lat.push(t0.elapsed().as_nanos() as u64);
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }
    })
    .await
}

/// `runs` runs at each concurrency level over `streams` streams, each run
/// on a fresh `embedded://` store; one median result per level.
pub async fn appends(
    streams: usize,
    concurrency: &[usize],
    runs: usize,
    secs: f64,
) -> Vec<(usize, RunResult)> {
    let mut per_level: Vec<Vec<RunResult>> = vec![Vec::new(); concurrency.len()];
    for _ in 0..runs {
        let open = OpenStore::new(StoreKind::Embedded).await;
        for i in 0..streams {
            let message_id = uuid::Uuid::new_v4().to_string();
            open.store
                .append(
                    &format!("bank_account-acc-{i}"),
                    ExpectedVersion::NoStream,
                    vec![deposited(&message_id)],
                )
                .await
                .expect("creating a stream");
        }
        // Every stream holds one event now; the runs carry the versions on.
        let versions: Arc<Vec<AtomicU64>> =
            Arc::new((0..streams).map(|_| AtomicU64::new(1)).collect());
        for (i, &c) in concurrency.iter().enumerate() {
            let r = drive(&open.store, &versions, streams, c, secs).await;
            eprintln!(
                "  store n={streams} c={c}: {:.0}/s p99 {:?} ({} errors)",
                r.per_sec, r.p99, r.errors
            );
            per_level[i].push(r);
        }
        open.close().await;
    }
    concurrency
        .iter()
        .zip(per_level)
        .map(|(&c, rs)| (c, RunResult::median_of(&rs)))
        .collect()
}
