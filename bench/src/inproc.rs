//! In-process scenarios: command throughput and latency through
//! `Aggregates::execute`, cold rehydration, memory per resident aggregate,
//! and the cost of Wasm: the bank-account component against the same code
//! compiled natively, through the actor path and call by call.
//!
//! Everything runs on one multi-threaded tokio runtime with the real
//! bank-account component and the real stores; the load generator shares
//! the runtime (and the machine's two cores) with the host code it drives.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rehydra::actor::{ActorConfig, Aggregates};
use rehydra::command::CommandRequest;
use rehydra::plugin::engine::SandboxLimits;
use rehydra::plugin::threads::GuestThreads;
use rehydra::plugin::{CommandInput, PluginRegistry};
use rehydra::store::embedded::EmbeddedStore;
use rehydra::store::memory::MemoryStore;
use rehydra::store::postgres::PostgresStore;
use rehydra::store::{EventData, EventStore, ExpectedVersion};
use serde_json::json;

use crate::stats::RunResult;

/// Which event store a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// `memory://`.
    Memory,
    /// `embedded://` (SQLite, fsync per group commit) in a temporary directory.
    Embedded,
    /// `postgres://` on a fresh throwaway server ([`crate::postgres::Server`]),
    /// durable (fsync and synchronous commit on).
    Postgres,
}

impl StoreKind {
    /// The store's URL scheme, for tables.
    pub fn label(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory://",
            StoreKind::Embedded => "embedded://",
            StoreKind::Postgres => "postgres://",
        }
    }
}

/// A store opened for one scenario, with what must outlive it.
pub struct OpenStore {
    /// The store, as the actor layer sees it.
    pub store: Arc<dyn EventStore>,
    embedded: Option<Arc<EmbeddedStore>>,
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL server of a `postgres://` store.
    pub server: Option<crate::postgres::Server>,
}

impl OpenStore {
    /// Opens a fresh, empty store of `kind`.
    pub async fn new(kind: StoreKind) -> OpenStore {
        match kind {
            StoreKind::Memory => OpenStore {
                store: Arc::new(MemoryStore::new()),
                embedded: None,
                _dir: None,
                server: None,
            },
            StoreKind::Embedded => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let store = Arc::new(
                    EmbeddedStore::open(&dir.path().join("data"))
                        .await
                        .expect("opening the embedded store"),
                );
                OpenStore {
                    store: store.clone(),
                    embedded: Some(store),
                    _dir: Some(dir),
                    server: None,
                }
            }
            StoreKind::Postgres => {
                let server = crate::postgres::Server::start().await;
                let store = PostgresStore::open(&server.url())
                    .await
                    .expect("opening the postgres:// store");
                OpenStore {
                    store: Arc::new(store),
                    embedded: None,
                    _dir: None,
                    server: Some(server),
                }
            }
        }
    }

    /// The CPU time the store's database server has used so far; zero for
    /// stores inside this process.
    pub fn server_cpu(&self) -> Duration {
        self.server
            .as_ref()
            .map_or(Duration::ZERO, crate::postgres::Server::cpu)
    }

    /// Closes an embedded store (commits what is queued, releases its
    /// directory) before the temporary directory goes; stops a PostgreSQL
    /// server after its store is gone (the caller drops its other handles
    /// to the store first).
    pub async fn close(self) {
        if let Some(e) = &self.embedded {
            e.close().await;
        }
        let OpenStore { store, server, .. } = self;
        drop(store);
        if let Some(server) = server {
            server.stop().await;
        }
    }
}

/// The workspace's target directory, as the end-to-end harness finds it.
pub use rehydra_e2e::target_dir;

/// `target/plugins/bank-account.wasm`, built by `make plugins`.
pub fn bank_account_wasm() -> PathBuf {
    let path = target_dir().join("plugins").join("bank-account.wasm");
    assert!(
        path.exists(),
        "{} is missing: run `make plugins` (make bench does)",
        path.display()
    );
    path
}

/// A registry holding only the bank-account plugin, loaded from a
/// temporary directory (returned so that it lives as long as the registry).
pub async fn registry() -> (Arc<PluginRegistry>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::copy(bank_account_wasm(), dir.path().join("bank-account.wasm"))
        .expect("copying the plugin");
    let registry = Arc::new(
        PluginRegistry::new(SandboxLimits::default(), None).expect("building the plugin engine"),
    );
    let loaded = registry
        .load_dir(dir.path())
        .await
        .expect("loading the plugin directory");
    assert_eq!(loaded.len(), 1, "the bank-account plugin loads");
    (registry, dir)
}

/// A bank-account command for aggregate `id`.
pub fn cmd(id: &str, command: &str, data: serde_json::Value) -> CommandRequest {
    CommandRequest {
        aggregate_type: "bank-account".into(),
        aggregate_id: id.into(),
        command: command.into(),
        data: data.to_string().into_bytes(),
        ..Default::default()
    }
}

/// The id of the `i`-th benchmark aggregate.
pub fn agg_id(i: usize) -> String {
    format!("acc-{i}")
}

/// The accounts client `t` of `clients` sends to, round-robin: a share of
/// the `n` accounts disjoint from the other clients' when `n >= clients`,
/// otherwise one account shared with others.
pub fn client_accounts(t: usize, clients: usize, n: usize) -> Vec<usize> {
    let mine: Vec<usize> = (t..n).step_by(clients.max(1)).collect();
    if mine.is_empty() { vec![t % n] } else { mine }
}

/// Opens `n` accounts through the actor layer, `parallel` at a time.
pub async fn open_accounts(aggregates: &Arc<Aggregates>, n: usize, parallel: usize) {
    let mut tasks = Vec::new();
    for p in 0..parallel.min(n) {
        let aggregates = aggregates.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = p;
            while i < n {
                aggregates
                    .execute(cmd(&agg_id(i), "open", json!({"owner": "bench"})))
                    .await
                    .expect("opening an account");
                i += parallel;
            }
        }));
    }
    for t in tasks {
        t.await.expect("an opening task");
    }
}

/// Runs `concurrency` client tasks issuing `deposit` commands for `secs`,
/// each over its share of the `n` accounts ([`client_accounts`]), and
/// reports throughput and latency.
pub async fn drive(
    aggregates: &Arc<Aggregates>,
    n: usize,
    concurrency: usize,
    secs: f64,
) -> RunResult {
    crate::stats::closed_loop(concurrency, secs, |t, deadline| {
        let aggregates = aggregates.clone();
        async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0usize;
            let mine = client_accounts(t, concurrency, n);
            let mut k = 0;
            while Instant::now() < deadline {
                let req = cmd(
                    &agg_id(mine[k % mine.len()]),
                    "deposit",
                    json!({"amount": 1}),
                );
                k += 1;
                let t0 = Instant::now();
                match aggregates.execute(req).await {
                    Ok(_) => lat.push(t0.elapsed().as_nanos() as u64),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }
    })
    .await
}

/// A fresh store of `kind` and an `Aggregates` over it with `n` accounts
/// opened, as every load run starts.
async fn with_accounts(
    registry: &Arc<PluginRegistry>,
    kind: StoreKind,
    n: usize,
) -> (OpenStore, Arc<Aggregates>) {
    with_accounts_under(registry, kind, n, ActorConfig::default()).await
}

/// [`with_accounts`] with the actors under `config`.
async fn with_accounts_under(
    registry: &Arc<PluginRegistry>,
    kind: StoreKind,
    n: usize,
    config: ActorConfig,
) -> (OpenStore, Arc<Aggregates>) {
    let store = OpenStore::new(kind).await;
    let aggregates = Arc::new(Aggregates::new(
        store.store.clone(),
        registry.clone(),
        config,
    ));
    open_accounts(&aggregates, n, 64).await;
    (store, aggregates)
}

/// Scenario (a): `runs` runs, each on a fresh store with `n` freshly opened
/// accounts, at each concurrency level; one median result per level.
pub async fn throughput(
    registry: &Arc<PluginRegistry>,
    kind: StoreKind,
    n: usize,
    concurrency: &[usize],
    runs: usize,
    secs: f64,
) -> Vec<(usize, RunResult)> {
    let mut per_level: Vec<Vec<RunResult>> = vec![Vec::new(); concurrency.len()];
    for _ in 0..runs {
        // One store per run, reused across levels: the accounts' versions
        // grow, but each command still reads and appends one event.
        let (store, aggregates) = with_accounts(registry, kind, n).await;
        for (i, &c) in concurrency.iter().enumerate() {
            let server_cpu = store.server_cpu();
            let r = drive(&aggregates, n, c, secs)
                .await
                .with_server_cpu(store.server_cpu().saturating_sub(server_cpu));
            eprintln!(
                "  {} n={n} c={c}: {:.0}/s p99 {:?} ({} errors)",
                kind.label(),
                r.per_sec,
                r.p99,
                r.errors
            );
            per_level[i].push(r);
        }
        drop(aggregates);
        store.close().await;
    }
    concurrency
        .iter()
        .zip(per_level)
        .map(|(&c, rs)| (c, RunResult::median_of(&rs)))
        .collect()
}

/// What snapshots cost the command path: deposits on `kind` with `n`
/// accounts and `c` clients, runs alternating between `--snapshot-every
/// 100` (the default) and `0`, each on a fresh store. Median results: (with
/// snapshots, without).
pub async fn snapshot_cost(
    registry: &Arc<PluginRegistry>,
    kind: StoreKind,
    n: usize,
    c: usize,
    runs: usize,
    secs: f64,
) -> (RunResult, RunResult) {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for every in [100, 0] {
            let config = ActorConfig {
                snapshot_every: every,
                ..ActorConfig::default()
            };
            let (store, aggregates) = with_accounts_under(registry, kind, n, config).await;
            let r = drive(&aggregates, n, c, secs).await;
            eprintln!(
                "  snapshot-every {every}: {:.0}/s p99 {:?} CPU/command {:?}",
                r.per_sec, r.p99, r.cpu_per_op
            );
            if every == 0 {
                without.push(r);
            } else {
                with.push(r);
            }
            drop(aggregates);
            store.close().await;
        }
    }
    (RunResult::median_of(&with), RunResult::median_of(&without))
}

/// What the upgrade check measured: commands' results without and with a
/// verification running, and the verification's own rate.
#[derive(Debug, Clone)]
pub struct VerifyCost {
    /// Deposits, no verification running (median of the runs).
    pub quiet: RunResult,
    /// Deposits while verifications of the next version run back to back.
    pub verifying: RunResult,
    /// Aggregates the verifications checked per second.
    pub aggregates_per_sec: f64,
    /// Events they replayed per second.
    pub events_per_sec: f64,
}

/// Scenario: `n` accounts (opened, resident), deposits from `c` clients for
/// `secs`, runs alternating between no verification and verifications of
/// the next bank-account version (`withdrawal-fee`: same state schema)
/// against every account, back to back through the actor layer's
/// verifier, as a reload would run them.
pub async fn verification(
    registry: &Arc<PluginRegistry>,
    kind: StoreKind,
    n: usize,
    c: usize,
    runs: usize,
    secs: f64,
) -> VerifyCost {
    use rehydra::plugin::verify::VerifyBudget;
    let candidate: rehydra::plugin::PluginRef = Arc::new(
        registry
            .load_file(&crate::http::next_version_wasm())
            .expect("loading the next version"),
    );
    let current = registry
        .get("bank-account")
        .expect("bank-account is loaded");
    let (mut quiet, mut verifying) = (Vec::new(), Vec::new());
    let (mut checked, mut events, mut busy) = (0usize, 0u64, Duration::ZERO);
    for _ in 0..runs {
        for with_check in [false, true] {
            let (store, aggregates) = with_accounts(registry, kind, n).await;
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let checker = with_check.then(|| {
                let (verifier, done) = (aggregates.upgrade_verifier(), done.clone());
                let (current, candidate) = (current.clone(), candidate.clone());
                tokio::spawn(async move {
                    let mut reports = Vec::new();
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        let budget = VerifyBudget {
                            aggregates: n,
                            time: Duration::from_secs(600),
                        };
                        let report = verifier
                            .verify(current.clone(), candidate.clone(), budget)
                            .await;
                        assert!(report.passed(), "{}", report.summary());
                        reports.push(report);
                    }
                    reports
                })
            });
            let r = drive(&aggregates, n, c, secs).await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(checker) = checker {
                for report in checker.await.expect("the verifications") {
                    checked += report.aggregates_checked;
                    events += report.events_replayed;
                    busy += Duration::from_millis(report.duration_ms);
                }
            }
            eprintln!(
                "  verification {}: {:.0}/s p99 {:?}",
                if with_check { "running" } else { "off" },
                r.per_sec,
                r.p99
            );
            if with_check {
                verifying.push(r);
            } else {
                quiet.push(r);
            }
            drop(aggregates);
            store.close().await;
        }
    }
    let seconds = busy.as_secs_f64().max(1e-9);
    VerifyCost {
        quiet: RunResult::median_of(&quiet),
        verifying: RunResult::median_of(&verifying),
        aggregates_per_sec: checked as f64 / seconds,
        events_per_sec: events as f64 / seconds,
    }
}

/// The metadata seeded events carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedMetadata {
    /// What the host writes with every event: seven keys (ids, command,
    /// plugin, content hash, timestamp), about 300 bytes. The guest's
    /// `apply` receives them as one JSON string (contract 0.2.0; as 14
    /// separate strings before).
    Host,
    /// `{}`: what the first cut of this suite seeded.
    Empty,
}

impl SeedMetadata {
    /// For tables.
    pub fn label(self) -> &'static str {
        match self {
            SeedMetadata::Host => "as the host writes it (7 keys)",
            SeedMetadata::Empty => "`{}`",
        }
    }

    /// The metadata bytes of an event written for `command`.
    pub fn bytes(self, command: &str, message_id: &str) -> Vec<u8> {
        match self {
            SeedMetadata::Empty => b"{}".to_vec(),
            SeedMetadata::Host => json!({
                "$causationId": message_id,
                "$correlationId": message_id,
                "commandType": command,
                "messageId": message_id,
                "plugin": "bank-account",
                "pluginHash": "5f".repeat(32),
                "timestamp": "2026-01-01T00:00:00.000Z",
            })
            .to_string()
            .into_bytes(),
        }
    }
}

/// An event as another writer would append it.
fn event(
    event_type: &str,
    data: serde_json::Value,
    message_id: &str,
    metadata: SeedMetadata,
) -> EventData {
    let command = if event_type == "Opened" {
        "open"
    } else {
        "deposit"
    };
    EventData {
        event_id: uuid::Uuid::new_v4(),
        event_type: event_type.into(),
        data: data.to_string().into_bytes(),
        metadata: metadata.bytes(command, message_id),
        message_id: message_id.into(),
    }
}

/// Appends an account with `events` events (one `Opened`, then
/// `Deposited`s) straight into `store`, in batches of 1,000.
async fn seed_stream(store: &Arc<dyn EventStore>, id: &str, events: usize, metadata: SeedMetadata) {
    let stream = format!("bank_account-{id}");
    let mut written = 0usize;
    while written < events {
        let batch_len = (events - written).min(1000);
        let message_id = uuid::Uuid::new_v4().to_string();
        let batch: Vec<EventData> = (written..written + batch_len)
            .map(|i| {
                if i == 0 {
                    event("Opened", json!({"owner": "bench"}), &message_id, metadata)
                } else {
                    event("Deposited", json!({"amount": 1}), &message_id, metadata)
                }
            })
            .collect();
        store
            .append(&stream, ExpectedVersion::Exact(written as u64), batch)
            .await
            .expect("seeding a stream");
        written += batch_len;
    }
}

/// What the rehydration scenario measured, medians.
#[derive(Debug, Clone, Copy)]
pub struct Rehydration {
    /// The first `state()` of the aggregate: reading and applying.
    pub replay: Duration,
    /// Reading the same events from the store alone, in the same pages and
    /// as a replay reads them (`read_stream_to_apply`).
    pub read: Duration,
}

/// Scenario (c): the first `state()` of an account with `events` events
/// carrying `metadata` on a fresh `Aggregates` (so nothing is cached in the
/// actor layer; the store's own caches are warm after the first run), and
/// the store's share of it: the same pages read with no `apply`.
pub async fn rehydrate(
    registry: &Arc<PluginRegistry>,
    kind: StoreKind,
    events: usize,
    metadata: SeedMetadata,
    runs: usize,
) -> Rehydration {
    let store = OpenStore::new(kind).await;
    let id = format!("long-{events}");
    seed_stream(&store.store, &id, events, metadata).await;
    let stream = format!("bank_account-{id}");
    let page = ActorConfig::default().rehydrate_page;
    let (mut replays, mut reads) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // Replay is what this measures: no snapshot is stored or used.
        let aggregates = Aggregates::new(
            store.store.clone(),
            registry.clone(),
            ActorConfig {
                snapshot_every: 0,
                ..ActorConfig::default()
            },
        );
        let t0 = Instant::now();
        let state = aggregates
            .state("bank-account", &id)
            .await
            .expect("rehydrating");
        let took = t0.elapsed();
        assert_eq!(state.version, events as u64, "every event replayed");
        replays.push(took.as_secs_f64());

        let t0 = Instant::now();
        let mut next = 1u64;
        loop {
            let batch = store
                .store
                .read_stream_to_apply(&stream, next, page)
                .await
                .expect("reading the stream");
            next += batch.len() as u64;
            if batch.len() < page {
                break;
            }
        }
        reads.push(t0.elapsed().as_secs_f64());
        assert_eq!(next, events as u64 + 1, "every event read");
    }
    store.close().await;
    let median = |v: Vec<f64>| Duration::from_secs_f64(crate::stats::median(v));
    Rehydration {
        replay: median(replays),
        read: median(reads),
    }
}

/// What the snapshot scenario measured: median cold-load times of one
/// aggregate, and the CPU time of this process per load.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotLoad {
    /// From all its events, no snapshot used.
    pub replay: Duration,
    /// From its snapshot (taken at its last event).
    pub from_snapshot: Duration,
    /// Process CPU time per replay load.
    pub replay_cpu: Duration,
    /// Process CPU time per load from the snapshot.
    pub snapshot_cpu: Duration,
}

/// Scenario: one account of `events` events on `kind`, loaded cold (a fresh
/// `Aggregates`) from all its events and from its snapshot, alternating
/// `runs` times each. The snapshot is the one the host stores after the
/// first replay (a replay of at least `snapshot_every` events leaves one).
pub async fn snapshot_load(
    registry: &Arc<PluginRegistry>,
    kind: StoreKind,
    events: usize,
    runs: usize,
) -> SnapshotLoad {
    let store = OpenStore::new(kind).await;
    let id = format!("snap-{events}");
    seed_stream(&store.store, &id, events, SeedMetadata::Host).await;
    let stream = format!("bank_account-{id}");
    let load = |snapshot_every: u64| {
        let aggregates = Aggregates::new(
            store.store.clone(),
            registry.clone(),
            ActorConfig {
                snapshot_every,
                ..ActorConfig::default()
            },
        );
        let id = id.clone();
        async move {
            let cpu0 = process_cpu();
            let t0 = Instant::now();
            let state = aggregates
                .state("bank-account", &id)
                .await
                .expect("loading the account");
            let took = (t0.elapsed(), process_cpu().saturating_sub(cpu0));
            assert_eq!(
                state.version, events as u64,
                "the whole stream is in the state"
            );
            took
        }
    };
    // The first replay with snapshots on stores one; wait for it.
    load(100).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while store
        .store
        .load_snapshot(&stream)
        .await
        .expect("reading the snapshot")
        .is_none_or(|s| s.version != events as u64)
    {
        assert!(Instant::now() < deadline, "no snapshot was stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut replay, mut snap, mut replay_cpu, mut snap_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, cpu) = load(0).await;
        replay.push(t.as_secs_f64());
        replay_cpu.push(cpu.as_secs_f64());
        let (t, cpu) = load(100).await;
        snap.push(t.as_secs_f64());
        snap_cpu.push(cpu.as_secs_f64());
    }
    store.close().await;
    let median = |v: Vec<f64>| Duration::from_secs_f64(crate::stats::median(v));
    SnapshotLoad {
        replay: median(replay),
        from_snapshot: median(snap),
        replay_cpu: median(replay_cpu),
        snapshot_cpu: median(snap_cpu),
    }
}

/// This process's CPU time (user + system) so far, in 10 ms ticks.
fn process_cpu() -> Duration {
    crate::stats::proc_cpu("self").map_or(Duration::ZERO, |c| c.own)
}

/// The resident set size of this process, from `/proc/self/status`.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// What scenario (d) measured.
#[derive(Debug, Clone, Copy)]
pub struct MemoryResult {
    /// Aggregates loaded.
    pub aggregates: usize,
    /// RSS growth per aggregate while loading them, bytes.
    pub bytes_per_aggregate: f64,
    /// Live heap growth per aggregate while loading them, bytes.
    pub heap_per_aggregate: f64,
    /// Live heap blocks (allocations) added per aggregate.
    pub blocks_per_aggregate: f64,
    /// The state bytes of one aggregate (its JSON encoding).
    pub state_bytes: usize,
    /// Aggregates loaded (cold, one event each) per second.
    pub loads_per_sec: f64,
}

/// Scenario (d): seeds `n` one-event accounts straight into `memory://`,
/// then loads every one of them with `state()`, and divides the RSS growth
/// by `n`. The store's memory is allocated before the first reading.
pub async fn memory_per_aggregate(registry: &Arc<PluginRegistry>, n: usize) -> MemoryResult {
    let store = OpenStore::new(StoreKind::Memory).await;
    for i in 0..n {
        seed_stream(&store.store, &agg_id(i), 1, SeedMetadata::Empty).await;
    }
    let config = ActorConfig {
        max_resident: n + 1000,
        idle_timeout: Duration::from_secs(3600),
        ..ActorConfig::default()
    };
    let aggregates = Arc::new(Aggregates::new(
        store.store.clone(),
        registry.clone(),
        config,
    ));
    // One load first, so that the pool's first instance is not counted.
    let first = aggregates
        .state("bank-account", &agg_id(0))
        .await
        .expect("loading an account");
    let state_bytes = serde_json::to_vec(&first.state).map_or(0, |v| v.len());
    let before = rss_bytes();
    let window = crate::alloc::Window::open();
    let heap_before = crate::alloc::live_bytes();
    let blocks_before = crate::alloc::live_blocks();
    let t0 = Instant::now();
    let parallel = 64;
    let mut tasks = Vec::new();
    for p in 0..parallel {
        let aggregates = aggregates.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 1 + p;
            while i < n {
                aggregates
                    .state("bank-account", &agg_id(i))
                    .await
                    .expect("loading an account");
                i += parallel;
            }
        }));
    }
    for t in tasks {
        t.await.expect("a loading task");
    }
    let took = t0.elapsed();
    let after = rss_bytes();
    let heap_after = crate::alloc::live_bytes();
    let blocks_after = crate::alloc::live_blocks();
    drop(window);
    assert_eq!(aggregates.resident(), n, "every account resident");
    let loaded = n - 1;
    MemoryResult {
        aggregates: n,
        bytes_per_aggregate: after.saturating_sub(before) as f64 / loaded as f64,
        heap_per_aggregate: (heap_after - heap_before) as f64 / loaded as f64,
        blocks_per_aggregate: (blocks_after - blocks_before) as f64 / loaded as f64,
        state_bytes,
        loads_per_sec: loaded as f64 / took.as_secs_f64(),
    }
}

/// A bank-account command's input, as `Aggregates` hands it to a plugin.
fn input<'a>(
    command_type: &'a str,
    data: &'a [u8],
    meta: &'a [(String, String)],
) -> CommandInput<'a> {
    CommandInput {
        command_type,
        aggregate_id: "w",
        data,
        metadata: meta,
    }
}

/// What the isolated-call part of the "cost of Wasm" scenario measured:
/// median time per call.
#[derive(Debug, Clone, Copy)]
pub struct CallCost {
    /// One `Plugin::handle` deposit on the component.
    pub wasm: Duration,
    /// The same call on the native twin.
    pub native: Duration,
    /// An empty `spawn_blocking` round trip: the hand-off each guest call
    /// made before it ran on the plugin's own guest threads.
    pub spawn_blocking: Duration,
    /// An empty call on a set of guest threads: the hand-off each guest
    /// call makes now.
    pub guest_thread: Duration,
}

/// `iters` sequential deposits through `Plugin::handle` on the component
/// and on its native twin, and the two hand-offs off the async workers,
/// each empty, in turn within each of `runs` runs; medians. Runs in a
/// spawned task, on a worker thread as an actor does.
pub async fn call_cost(
    wasm: &Arc<PluginRegistry>,
    native: &Arc<PluginRegistry>,
    iters: usize,
    runs: usize,
) -> CallCost {
    let (wasm, native) = (wasm.clone(), native.clone());
    tokio::spawn(async move { call_cost_on_worker(&wasm, &native, iters, runs).await })
        .await
        .expect("the call-cost task")
}

async fn call_cost_on_worker(
    wasm: &Arc<PluginRegistry>,
    native: &Arc<PluginRegistry>,
    iters: usize,
    runs: usize,
) -> CallCost {
    let meta = vec![
        ("now".to_string(), "2026-01-01T00:00:00.000Z".to_string()),
        ("message-id".to_string(), uuid::Uuid::new_v4().to_string()),
        (
            "correlation-id".to_string(),
            uuid::Uuid::new_v4().to_string(),
        ),
        ("causation-id".to_string(), uuid::Uuid::new_v4().to_string()),
    ];
    let plugins = [wasm, native].map(|r| r.get("bank-account").expect("the bank-account plugin"));
    let open = input("open", br#"{"owner":"bench"}"#, &meta);
    let deposit = input("deposit", br#"{"amount":1}"#, &meta);
    let mut opened = Vec::new();
    for p in &plugins {
        match p
            .handle(p.initial_state(), 0, &open)
            .await
            .expect("the open call")
        {
            Ok(d) => opened.push(d.state),
            Err(r) => panic!("open rejected: {r:?}"),
        }
    }
    assert_eq!(opened[0], opened[1], "the component and its twin agree");
    let mut times: [Vec<f64>; 4] = Default::default();
    for _ in 0..runs {
        for (i, p) in plugins.iter().enumerate() {
            let t0 = Instant::now();
            for _ in 0..iters {
                let d = p
                    .handle(&opened[i], 1, &deposit)
                    .await
                    .expect("a deposit call");
                std::hint::black_box(d.is_ok());
                // Between two commands an actor waits for its next one.
                tokio::task::yield_now().await;
            }
            times[i].push(t0.elapsed().as_secs_f64() / iters as f64);
        }
        let t0 = Instant::now();
        for i in 0..iters {
            let r = tokio::task::spawn_blocking(move || std::hint::black_box(i))
                .await
                .expect("an empty blocking task");
            std::hint::black_box(r);
        }
        times[2].push(t0.elapsed().as_secs_f64() / iters as f64);
        let threads = GuestThreads::new("bench", 4, SandboxLimits::default().max_queued_calls);
        let t0 = Instant::now();
        for i in 0..iters {
            let r = threads
                .run(move || std::hint::black_box(i))
                .await
                .expect("an empty guest-thread call");
            std::hint::black_box(r);
        }
        times[3].push(t0.elapsed().as_secs_f64() / iters as f64);
    }
    let [w, n, sb, gt] = times.map(|t| Duration::from_secs_f64(crate::stats::median(t)));
    CallCost {
        wasm: w,
        native: n,
        spawn_blocking: sb,
        guest_thread: gt,
    }
}

/// One run on a fresh store of `kind`: `n` accounts opened, then `clients`
/// clients depositing for `secs`.
pub async fn fresh_run(
    registry: &Arc<PluginRegistry>,
    kind: StoreKind,
    n: usize,
    clients: usize,
    secs: f64,
) -> RunResult {
    let (store, aggregates) = with_accounts(registry, kind, n).await;
    let r = drive(&aggregates, n, clients, secs).await;
    drop(aggregates);
    store.close().await;
    r
}

/// What a short bank-account session answers, command by command, through
/// `Aggregates` on `memory://`: the outcome's events and reply (or the
/// error code), then the final state.
async fn session(registry: &Arc<PluginRegistry>) -> Vec<String> {
    let store = OpenStore::new(StoreKind::Memory).await;
    let aggregates = Aggregates::new(
        store.store.clone(),
        registry.clone(),
        ActorConfig::default(),
    );
    let mut answers = Vec::new();
    for (command, data) in [
        ("deposit", json!({"amount": 1})),
        ("open", json!({"owner": " bench "})),
        ("open", json!({"owner": "again"})),
        ("deposit", json!({"amount": 5})),
        ("deposit", json!({"amount": 0})),
        ("withdraw", json!({"amount": 2})),
        ("withdraw", json!({"amount": 10})),
        ("deposit", json!({"amount": "x"})),
        ("close", json!({})),
        ("deposit", json!({"amount": 1})),
    ] {
        answers.push(match aggregates.execute(cmd("s", command, data)).await {
            Ok(o) => format!("{:?} {:?} {:?}", o.version, o.events, o.reply),
            Err(e) => format!("{} {e}", e.code()),
        });
    }
    answers.push(format!("{:?}", aggregates.state("bank-account", "s").await));
    answers
}

/// The "cost of Wasm" scenario through the actor path: for each client
/// count, `runs` pairs of runs — the component, then its native twin, each
/// on a fresh `memory://` store with `n` accounts — and the medians
/// `(clients, component, native)`. First checks that the two answer a
/// session of commands identically.
pub async fn wasm_vs_native(
    wasm: &Arc<PluginRegistry>,
    native: &Arc<PluginRegistry>,
    n: usize,
    clients: &[usize],
    runs: usize,
    secs: f64,
) -> Vec<(usize, RunResult, RunResult)> {
    assert_eq!(
        session(wasm).await,
        session(native).await,
        "the component and its native twin answer alike"
    );
    let mut out = Vec::new();
    for &c in clients {
        let (mut w, mut nat) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let a = fresh_run(wasm, StoreKind::Memory, n, c, secs).await;
            let b = fresh_run(native, StoreKind::Memory, n, c, secs).await;
            eprintln!(
                "  n={n} c={c}: component {:.0}/s, native {:.0}/s",
                a.per_sec, b.per_sec
            );
            w.push(a);
            nat.push(b);
        }
        out.push((c, RunResult::median_of(&w), RunResult::median_of(&nat)));
    }
    out
}
