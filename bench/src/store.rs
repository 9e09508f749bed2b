//! The event store alone: appends straight into `embedded://` and
//! `postgres://`, without actors or plugins, so the durable figures can be
//! split into what the store's writer can take and what the command path
//! adds on top; and, for `postgres://`, the same appends written by hand
//! and run by pgbench against a server with the same settings, alternating
//! with the store's runs.
//!
//! Each client owns a disjoint share of the streams, knows their versions,
//! and appends one `Deposited` event with the host's metadata at a time,
//! with an exact expected version — what an actor does after its plugin
//! decided. A fresh store (and a fresh server) per run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rehydra::store::{EventData, EventStore, ExpectedVersion};
use serde_json::json;

use crate::inproc::{OpenStore, SeedMetadata, StoreKind, client_accounts};
use crate::postgres::ServerWork;
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
    drive_spread(
        std::slice::from_ref(store),
        versions,
        streams,
        concurrency,
        secs,
    )
    .await
}

/// [`drive`] with client `t` appending through `stores[t % stores.len()]`
/// (stores over one database, as several hosts are).
async fn drive_spread(
    stores: &[Arc<dyn EventStore>],
    versions: &Arc<Vec<AtomicU64>>,
    streams: usize,
    concurrency: usize,
    secs: f64,
) -> RunResult {
    crate::stats::closed_loop(concurrency, secs, |t, deadline| {
        let store = stores[t % stores.len()].clone();
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

/// A fresh store of `kind` holding `streams` streams of one event each, and
/// the versions the clients start from.
async fn seeded(kind: StoreKind, streams: usize) -> (OpenStore, Arc<Vec<AtomicU64>>) {
    let open = OpenStore::new(kind).await;
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
    let versions = Arc::new((0..streams).map(|_| AtomicU64::new(1)).collect());
    (open, versions)
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
        let (open, versions) = seeded(StoreKind::Embedded, streams).await;
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

/// One run (or the medians of several) of the `postgres://` store and
/// the pgbench baseline at one concurrency level.
#[derive(Debug, Clone, Copy)]
pub struct PgLevel {
    /// Clients (and pgbench clients).
    pub clients: usize,
    /// The store's appends.
    pub store: RunResult,
    /// What the store's appends cost the server.
    pub store_work: ServerWork,
    /// pgbench's transactions.
    pub pgbench: RunResult,
    /// What pgbench's transactions cost the server.
    pub pgbench_work: ServerWork,
    /// The store's appends/s over pgbench's transactions/s (of medians:
    /// the median of the runs' ratios).
    pub ratio: f64,
}

impl PgLevel {
    /// Each figure's run-by-run median.
    fn median_of(runs: &[PgLevel]) -> PgLevel {
        let results = |f: fn(&PgLevel) -> RunResult| {
            RunResult::median_of(&runs.iter().map(f).collect::<Vec<_>>())
        };
        let work = |f: fn(&PgLevel) -> ServerWork| {
            ServerWork::median_of(&runs.iter().map(f).collect::<Vec<_>>())
        };
        PgLevel {
            clients: runs.first().map_or(0, |r| r.clients),
            store: results(|r| r.store),
            store_work: work(|r| r.store_work),
            pgbench: results(|r| r.pgbench),
            pgbench_work: work(|r| r.pgbench_work),
            ratio: crate::stats::median(runs.iter().map(|r| r.ratio).collect()),
        }
    }
}

/// `runs` runs over `streams` streams: in each, a fresh server with the
/// `postgres://` store and another with the baseline's tables, then at each
/// concurrency level the store's appends followed by pgbench's; one median
/// per level.
pub async fn postgres_vs_pgbench(
    streams: usize,
    concurrency: &[usize],
    runs: usize,
    secs: f64,
) -> Vec<PgLevel> {
    let mut per_level: Vec<Vec<PgLevel>> = vec![Vec::new(); concurrency.len()];
    for _ in 0..runs {
        let (open, versions) = seeded(StoreKind::Postgres, streams).await;
        let baseline = crate::postgres::baseline_server(streams).await;
        let server = open
            .server
            .as_ref()
            .expect("a postgres:// store has a server");
        for (i, &clients) in concurrency.iter().enumerate() {
            let before = server.counters().await;
            let cpu = server.cpu();
            let store = drive(&open.store, &versions, streams, clients, secs)
                .await
                .with_server_cpu(server.cpu().saturating_sub(cpu));
            let store_work = crate::postgres::store_work(server, before, store.ops).await;
            let (pgbench, pgbench_work) =
                crate::postgres::pgbench(&baseline, streams, clients, secs).await;
            let level = PgLevel {
                clients,
                store,
                store_work,
                pgbench,
                pgbench_work,
                ratio: store.per_sec / pgbench.per_sec,
            };
            eprintln!(
                "  postgres:// c={clients}: {:.0}/s p99 {:?} ({} errors, {:.1} appends per commit); pgbench {:.0}/s p99 {:?} ({} failed): {:.2}×",
                store.per_sec,
                store.p99,
                store.errors,
                store_work.appends_per_commit,
                pgbench.per_sec,
                pgbench.p99,
                pgbench.errors,
                level.ratio
            );
            per_level[i].push(level);
        }
        baseline.stop().await;
        open.close().await;
    }
    per_level.iter().map(|l| PgLevel::median_of(l)).collect()
}

/// How the `postgres://` store's throughput depends on the groups it can
/// have in flight: `clients` clients spread over 1, 2 and 4 stores opened
/// on one fresh server (each store has its own
/// [`rehydra::store::postgres::WRITERS`] writers), `runs` runs of `secs`
/// each; `(stores, median result, median appends per commit)` per count.
pub async fn postgres_lanes(
    streams: usize,
    clients: usize,
    runs: usize,
    secs: f64,
) -> Vec<(usize, RunResult, f64)> {
    let counts = [1, 2, 4];
    let mut per_count: Vec<Vec<(RunResult, ServerWork)>> = vec![Vec::new(); counts.len()];
    for _ in 0..runs {
        let (open, versions) = seeded(StoreKind::Postgres, streams).await;
        let server = open
            .server
            .as_ref()
            .expect("a postgres:// store has a server");
        let mut stores = vec![open.store.clone()];
        for _ in 1..counts[counts.len() - 1] {
            let extra = rehydra::store::postgres::PostgresStore::open(&server.url())
                .await
                .expect("opening another postgres:// store");
            stores.push(Arc::new(extra));
        }
        for (i, &k) in counts.iter().enumerate() {
            let before = server.counters().await;
            let cpu = server.cpu();
            let r = drive_spread(&stores[..k], &versions, streams, clients, secs)
                .await
                .with_server_cpu(server.cpu().saturating_sub(cpu));
            let work = crate::postgres::store_work(server, before, r.ops).await;
            eprintln!(
                "  postgres:// c={clients} over {k} stores: {:.0}/s p99 {:?} ({} errors, {:.1} appends per commit)",
                r.per_sec, r.p99, r.errors, work.appends_per_commit
            );
            per_count[i].push((r, work));
        }
        drop(stores);
        open.close().await;
    }
    counts
        .iter()
        .zip(per_count)
        .map(|(&k, rs)| {
            let results: Vec<RunResult> = rs.iter().map(|r| r.0).collect();
            let works: Vec<ServerWork> = rs.iter().map(|r| r.1).collect();
            (
                k,
                RunResult::median_of(&results),
                ServerWork::median_of(&works).appends_per_commit,
            )
        })
        .collect()
}
