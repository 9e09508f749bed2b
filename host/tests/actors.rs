//! The actor layer in process, with the real bank-account plugin (built by
//! `make plugins`) on the real in-memory store: conflicts with another
//! writer, expected versions, the bounded mailbox, passivation, the
//! resident cap and paged rehydration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rehydra::actor::{ActorConfig, Aggregates};
use rehydra::command::CommandRequest;
use rehydra::error::CommandError;
use rehydra::plugin::PluginRegistry;
use rehydra::plugin::engine::SandboxLimits;
use rehydra::store::memory::MemoryStore;
use rehydra::store::{
    AppendResult, EventData, EventStore, ExpectedVersion, RecordedEvent, Snapshot, StoreError,
};
use serde_json::json;
use tokio::sync::Semaphore;
use uuid::Uuid;

fn plugin_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("plugins").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make plugins` (make test does)",
        path.display()
    );
    path
}

async fn registry() -> (Arc<PluginRegistry>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        plugin_path("bank-account"),
        dir.path().join("bank-account.wasm"),
    )
    .unwrap();
    let registry = Arc::new(PluginRegistry::new(SandboxLimits::default(), None).unwrap());
    let loaded = registry.load_dir(dir.path()).await.unwrap();
    assert_eq!(loaded.len(), 1);
    (registry, dir)
}

fn cmd(id: &str, command: &str, data: serde_json::Value) -> CommandRequest {
    CommandRequest {
        aggregate_type: "bank-account".into(),
        aggregate_id: id.into(),
        command: command.into(),
        data: data.to_string().into_bytes(),
        ..Default::default()
    }
}

/// Opens account `id` for Ada and deposits 1, 2, ... `deposits` into it:
/// version `deposits + 1`, balance `deposits * (deposits + 1) / 2`.
async fn open_with_deposits(aggregates: &Aggregates, id: &str, deposits: u64) {
    aggregates
        .execute(cmd(id, "open", json!({"owner": "Ada"})))
        .await
        .unwrap();
    for amount in 1..=deposits {
        aggregates
            .execute(cmd(id, "deposit", json!({"amount": amount})))
            .await
            .unwrap();
    }
}

/// An account's first event as another writer would append it.
fn opened(owner: &str) -> EventData {
    EventData {
        event_type: "Opened".into(),
        data: json!({ "owner": owner }).to_string().into_bytes(),
        ..foreign_deposit(0)
    }
}

/// An event as another writer (another host process) would append it.
fn foreign_deposit(amount: u64) -> EventData {
    EventData {
        event_id: Uuid::new_v4(),
        event_type: "Deposited".into(),
        data: json!({ "amount": amount }).to_string().into_bytes(),
        metadata: b"{}".to_vec(),
        message_id: Uuid::new_v4().to_string(),
    }
}

#[tokio::test]
async fn a_conflict_with_another_writer_is_caught_up_and_retried() {
    let (registry, _dir) = registry().await;
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let aggregates = Aggregates::new(store.clone(), registry, ActorConfig::default());
    aggregates
        .execute(cmd("a", "open", json!({"owner": "Ada"})))
        .await
        .unwrap();
    // The actor now caches version 1. Another writer appends behind its back.
    store
        .append(
            "bank_account-a",
            ExpectedVersion::Exact(1),
            vec![foreign_deposit(50)],
        )
        .await
        .unwrap();

    let outcome = aggregates
        .execute(cmd("a", "withdraw", json!({"amount": 40})))
        .await
        .unwrap();
    assert_eq!(outcome.version, 3, "re-run on top of the foreign event");
    let state = aggregates.state("bank-account", "a").await.unwrap();
    assert_eq!(state.state["balance"], 10);

    // A version the client asked for is never retried: the stale cache is
    // caught up and the mismatch reported with the actual version.
    store
        .append(
            "bank_account-a",
            ExpectedVersion::Exact(3),
            vec![foreign_deposit(5)],
        )
        .await
        .unwrap();
    let mut req = cmd("a", "deposit", json!({"amount": 1}));
    req.expected_version = Some(3);
    let err = aggregates.execute(req).await.unwrap_err();
    assert_eq!(err.code(), "wrong_expected_version");
    assert_eq!(err.details(), Some(json!({"expected": 3, "actual": 4})));
    assert_eq!(
        store.stream_version("bank_account-a").await.unwrap(),
        4,
        "nothing appended"
    );
}

/// A test double around the real memory store whose appends wait for a
/// permit, so a command can be held in flight deterministically, and whose
/// look-ups and reads can be made to miss or fail.
struct GatedStore {
    inner: MemoryStore,
    gate: Semaphore,
    /// Whether `save_snapshot` hangs forever.
    stuck_snapshots: bool,
    /// When set, the next look-up of a command's events misses them (once):
    /// as on a store shared by hosts, where another host stores a command
    /// (a timer or a delivery both hosts send) a moment after this one
    /// looked for it.
    miss_next_lookup: std::sync::atomic::AtomicBool,
    /// A read of a stream from this version on fails as a store outage
    /// would (`u64::MAX`: none does).
    fail_reads_from: std::sync::atomic::AtomicU64,
}

impl GatedStore {
    /// A gate that lets every append through, and nothing stuck, missed or
    /// failing.
    fn open() -> GatedStore {
        GatedStore {
            inner: MemoryStore::new(),
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
            stuck_snapshots: false,
            miss_next_lookup: false.into(),
            fail_reads_from: u64::MAX.into(),
        }
    }
}

#[async_trait]
impl EventStore for GatedStore {
    async fn append(
        &self,
        s: &str,
        e: ExpectedVersion,
        ev: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let permit = self
            .gate
            .acquire()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        permit.forget();
        self.inner.append(s, e, ev).await
    }
    async fn read_stream(
        &self,
        s: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if from
            >= self
                .fail_reads_from
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable("the disk went away".into()));
        }
        self.inner.read_stream(s, from, limit).await
    }
    async fn stream_version(&self, s: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(s).await
    }
    async fn read_all(&self, from: u64, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(from, limit).await
    }
    async fn find_command_events(
        &self,
        s: &str,
        first: uuid::Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if self
            .miss_next_lookup
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(Vec::new());
        }
        self.inner.find_command_events(s, first).await
    }
    async fn head_position(&self) -> Result<u64, StoreError> {
        self.inner.head_position().await
    }
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        if self.stuck_snapshots {
            // A save that never returns: the database is wedged.
            std::future::pending::<()>().await;
        }
        self.inner.save_snapshot(snapshot).await
    }
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream).await
    }
    fn describe(&self) -> String {
        "gated memory store (test double)".into()
    }
}

/// Snapshots are stored off the command path: with every save stuck
/// forever, and one due after every event, each command is still answered
/// at once, none fails, and none waits for a snapshot.
#[tokio::test]
async fn a_stuck_snapshot_store_never_delays_or_fails_a_command() {
    let (registry, _dir) = registry().await;
    let store = Arc::new(GatedStore {
        stuck_snapshots: true,
        ..GatedStore::open()
    });
    let config = ActorConfig {
        snapshot_every: 1,
        command_timeout: Duration::from_secs(5),
        ..ActorConfig::default()
    };
    let aggregates = Aggregates::new(store.clone(), registry, config);
    aggregates
        .execute(cmd("stuck", "open", json!({"owner": "Ada"})))
        .await
        .unwrap();
    // More than the snapshot queue holds (1,024): the rest are dropped.
    for _ in 0..1100 {
        aggregates
            .execute(cmd("stuck", "deposit", json!({"amount": 1})))
            .await
            .unwrap();
    }
    assert_eq!(
        store.stream_version("bank_account-stuck").await.unwrap(),
        1101
    );
    assert_eq!(
        store.load_snapshot("bank_account-stuck").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn a_full_mailbox_answers_overloaded_and_loses_nothing_queued() {
    let (registry, _dir) = registry().await;
    let store = Arc::new(GatedStore {
        gate: Semaphore::new(1),
        ..GatedStore::open()
    });
    let config = ActorConfig {
        mailbox_capacity: 2,
        ..ActorConfig::default()
    };
    let aggregates = Aggregates::new(store.clone(), registry, config);
    aggregates
        .execute(cmd("b", "open", json!({"owner": "Ada"})))
        .await
        .unwrap();

    // One command in flight (its append waits at the gate), two queued.
    let mut waiting = Vec::new();
    for amount in 1..=3u64 {
        let a = aggregates.clone();
        waiting.push(tokio::spawn(async move {
            a.execute(cmd("b", "deposit", json!({"amount": amount})))
                .await
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = aggregates
        .execute(cmd("b", "deposit", json!({"amount": 100})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "overloaded", "{err}");

    store.gate.add_permits(10);
    let mut versions = Vec::new();
    for w in waiting {
        versions.push(w.await.unwrap().unwrap().version);
    }
    assert_eq!(versions, [2, 3, 4], "queued commands ran in arrival order");
    assert_eq!(
        aggregates.state("bank-account", "b").await.unwrap().state["balance"],
        6
    );
}

#[tokio::test]
async fn idle_aggregates_are_passivated_and_come_back() {
    let (registry, _dir) = registry().await;
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let config = ActorConfig {
        idle_timeout: Duration::from_millis(200),
        ..ActorConfig::default()
    };
    let aggregates = Aggregates::new(store, registry, config);
    aggregates
        .execute(cmd("c", "open", json!({"owner": "Ada"})))
        .await
        .unwrap();
    aggregates
        .execute(cmd("c", "deposit", json!({"amount": 7})))
        .await
        .unwrap();
    assert_eq!(aggregates.resident(), 1);

    let mut waited = Duration::ZERO;
    while aggregates.resident() > 0 && waited < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    assert_eq!(
        aggregates.resident(),
        0,
        "passivated after the idle timeout"
    );

    let outcome = aggregates
        .execute(cmd("c", "deposit", json!({"amount": 3})))
        .await
        .unwrap();
    assert_eq!(outcome.version, 3, "rehydrated from the store");
    assert_eq!(
        aggregates.state("bank-account", "c").await.unwrap().state["balance"],
        10
    );
}

#[tokio::test]
async fn the_resident_set_is_capped() {
    let (registry, _dir) = registry().await;
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let config = ActorConfig {
        max_resident: 10,
        ..ActorConfig::default()
    };
    let aggregates = Aggregates::new(store, registry, config);
    for i in 0..40 {
        aggregates
            .execute(cmd(&format!("r{i}"), "open", json!({"owner": "Ada"})))
            .await
            .unwrap();
        aggregates
            .execute(cmd(&format!("r{i}"), "deposit", json!({"amount": i + 1})))
            .await
            .unwrap();
    }
    let mut waited = Duration::ZERO;
    while aggregates.resident() > 10 && waited < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    assert!(
        aggregates.resident() <= 10,
        "resident: {}",
        aggregates.resident()
    );
    // Evicted aggregates load again with their full history.
    for i in 0..40 {
        let s = aggregates
            .state("bank-account", &format!("r{i}"))
            .await
            .unwrap();
        assert_eq!((s.version, s.state["balance"].as_u64()), (2, Some(i + 1)));
    }
}

#[tokio::test]
async fn rehydration_applies_events_in_pages() {
    let (registry, _dir) = registry().await;
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let writer = Aggregates::new(store.clone(), registry.clone(), ActorConfig::default());
    open_with_deposits(&writer, "p", 20).await;
    // A fresh directory (as after a restart) with a page smaller than the
    // stream and not dividing it.
    let config = ActorConfig {
        rehydrate_page: 7,
        ..ActorConfig::default()
    };
    let reader = Aggregates::new(store, registry, config);
    let s = reader.state("bank-account", "p").await.unwrap();
    assert_eq!(s.version, 21);
    assert_eq!(
        s.state,
        json!({"owner": "Ada", "balance": 210, "open": true})
    );
}

/// Rehydration reads a page ahead while the plugin applies the one before.
/// A read ahead that fails fails the load (nothing half-loaded is kept), a
/// page the plugin cannot apply fails it with the plugin's error whatever
/// the read ahead did, and a load after the outage sees every event.
#[tokio::test]
async fn a_failing_read_ahead_or_apply_fails_the_load_and_keeps_nothing() {
    let (registry, _dir) = registry().await;
    let store = Arc::new(GatedStore::open());
    let writer = Aggregates::new(store.clone(), registry.clone(), ActorConfig::default());
    open_with_deposits(&writer, "p", 20).await;
    let config = ActorConfig {
        rehydrate_page: 7,
        snapshot_every: 0,
        ..ActorConfig::default()
    };
    let reader = Aggregates::new(store.clone(), registry.clone(), config.clone());

    // The third page's read (from version 15) fails while the second is
    // being applied.
    store
        .fail_reads_from
        .store(15, std::sync::atomic::Ordering::SeqCst);
    let err = reader.state("bank-account", "p").await.unwrap_err();
    assert!(
        matches!(&err, CommandError::StoreUnavailable(m) if m.contains("the disk went away")),
        "{err:?}"
    );
    store
        .fail_reads_from
        .store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
    let s = reader.state("bank-account", "p").await.unwrap();
    assert_eq!(s.version, 21);
    assert_eq!(s.state["balance"], json!(210));

    // An event the plugin cannot read, on the second page, while the read
    // of the third fails too: the plugin's failure is what is reported.
    let mut bad = foreign_deposit(1);
    bad.data = br#"{"amount": "lots"}"#.to_vec();
    store
        .append(
            "bank_account-q",
            ExpectedVersion::NoStream,
            vec![opened("Bo")],
        )
        .await
        .unwrap();
    for v in 1..20u64 {
        let event = if v == 10 {
            bad.clone()
        } else {
            foreign_deposit(1)
        };
        store
            .append("bank_account-q", ExpectedVersion::Exact(v), vec![event])
            .await
            .unwrap();
    }
    store
        .fail_reads_from
        .store(15, std::sync::atomic::Ordering::SeqCst);
    let fresh = Aggregates::new(store.clone(), registry, config);
    let err = fresh.state("bank-account", "q").await.unwrap_err();
    assert!(
        matches!(&err, CommandError::PluginFailed { message, .. } if message.contains("version 8")),
        "{err:?}"
    );
}

/// Another host stored an event this host has not seen and then the very
/// command this host is about to run (same message id). The store answers
/// this host's append as a retry of that one; the host must then load what
/// is stored, not keep the state it decided on its stale cache (which
/// lacks the other host's first event), and answer with the stored outcome.
#[tokio::test]
async fn a_command_another_host_stored_first_leaves_the_cache_as_stored() {
    let (registry, _dir) = registry().await;
    let store = Arc::new(GatedStore::open());
    let aggregates = Aggregates::new(store.clone(), registry, ActorConfig::default());
    aggregates
        .execute(cmd("a", "open", json!({"owner": "Ada"})))
        .await
        .unwrap();
    // The other host: a deposit of 50 this host does not know of, then the
    // deposit of 5 with the key this host is about to send.
    let stream = "bank_account-a";
    store
        .append(stream, ExpectedVersion::Exact(1), vec![foreign_deposit(50)])
        .await
        .unwrap();
    let mut theirs = foreign_deposit(5);
    theirs.event_id = rehydra::command::event_id(stream, "key-1", 0);
    theirs.message_id = "key-1".into();
    store
        .append(stream, ExpectedVersion::Exact(2), vec![theirs])
        .await
        .unwrap();

    // This host's look-up misses it: it decides on its cache (version 1,
    // balance 0) and appends the same event id.
    store
        .miss_next_lookup
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut req = cmd("a", "deposit", json!({"amount": 5}));
    req.idempotency_key = Some("key-1".into());
    let outcome = aggregates.execute(req).await.unwrap();
    assert!(
        outcome.replayed,
        "answered with the stored outcome: {outcome:?}"
    );
    assert_eq!(outcome.version, 3);
    assert_eq!(
        store.stream_version(stream).await.unwrap(),
        3,
        "nothing appended twice"
    );
    let state = aggregates.state("bank-account", "a").await.unwrap();
    assert_eq!(
        (state.version, state.state["balance"].clone()),
        (3, json!(55)),
        "the cache holds what is stored, the other host's deposit of 50 included"
    );
}
