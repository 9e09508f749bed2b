//! What the host counts and measures, for `GET /metrics` (Prometheus /
//! OpenMetrics text, every name `rehydra_…`).
//!
//! One process-wide set of metrics ([`global`]): the places that count —
//! the actors, the store writers, the compile cache, the plugins' log
//! limits — are far apart and a process serves one host, so threading a
//! handle through every layer would buy nothing. Figures that are a state rather than an event (resident
//! aggregates, mailbox depth, open subscriptions, plugin quarantine) are
//! read when `/metrics` is scraped ([`Snapshot`]), not kept up to date on
//! every command.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A command's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The command's name.
    pub command: String,
    /// `ok`, or the error code.
    pub outcome: String,
}

/// An aggregate type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// The aggregate type.
    pub aggregate_type: String,
}

/// A store backend.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `embedded` or `postgres`.
    pub backend: &'static str,
}

/// A plugin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// The plugin's name.
    pub plugin: String,
}

/// A compile-cache look-up's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit` or `compiled`.
    pub result: &'static str,
}

/// What became of a snapshot, or of the look for one at a load.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SnapshotLabels {
    /// The aggregate type.
    pub aggregate_type: String,
    /// Saves: `written`, `failed`, `dropped` (the queue was full). Loads:
    /// `used`, `none`, `ignored` (another schema, a stream that no longer
    /// matches it, or state the plugin could not read), `failed`.
    pub outcome: &'static str,
}

/// What became of one attempt to send a timer's command.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimerLabels {
    /// `done` (the command stored its outcome), `refused` (the target
    /// refused it: final), `retry` (it could not run now: tried again
    /// later).
    pub outcome: &'static str,
    /// Whether it was sent late (see `timer-late`).
    pub late: bool,
}

/// What became of one event a process manager follows.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessLabels {
    /// The process manager.
    pub process: String,
    /// `delivered`, `ignored` (the instance refused it: none to continue,
    /// one already started, a domain refusal), `finished` (dropped: its
    /// instance has finished), `retry` (a try that failed for now or in the
    /// plugin), `parked`.
    pub outcome: &'static str,
}

/// Every metric the host exports.
pub struct Metrics {
    registry: Registry,
    /// Commands answered, by type, command and outcome.
    pub commands: Family<CommandLabels, Counter>,
    /// From a command's arrival to its answer.
    pub command_seconds: Family<TypeLabels, Histogram>,
    /// Time a command waited in its aggregate's mailbox.
    pub queue_wait_seconds: Family<TypeLabels, Histogram>,
    /// Time in the plugin's `handle`.
    pub guest_seconds: Family<TypeLabels, Histogram>,
    /// Time appending a command's events to the store.
    pub store_append_seconds: Family<TypeLabels, Histogram>,
    /// Aggregates loaded from their events.
    pub rehydrations: Family<TypeLabels, Counter>,
    /// Events applied while loading or catching up.
    pub events_replayed: Family<TypeLabels, Counter>,
    /// One group commit of the store.
    pub store_commit_seconds: Family<StoreLabels, Histogram>,
    /// Appends per group commit.
    pub store_group_appends: Family<StoreLabels, Histogram>,
    /// Events the embedded store's indexer has not written yet.
    pub store_unindexed_events: Gauge,
    /// Compile-cache look-ups.
    pub compile_cache: Family<CacheLabels, Counter>,
    /// Snapshots saved, failed or dropped.
    pub snapshots_saved: Family<SnapshotLabels, Counter>,
    /// Loads by what the snapshot look-up gave.
    pub snapshot_loads: Family<SnapshotLabels, Counter>,
    /// A plugin's log lines dropped over `--plugin-log-rate`.
    pub plugin_log_lines_dropped: Family<PluginLabels, Counter>,
    /// Attempts to send a timer's command, by what became of them.
    pub timers_fired: Family<TimerLabels, Counter>,
    /// Events process managers handled, by what became of them.
    pub process_events: Family<ProcessLabels, Counter>,
    resident_aggregates: Gauge,
    resident_state_bytes: Gauge,
    mailbox_depth: Gauge,
    aggregates_poisoned: Gauge,
    subscriptions: Gauge,
    subscription_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    plugin_quarantined: Family<PluginLabels, Gauge>,
    plugin_failures: Family<PluginLabels, Gauge>,
    guest_queue: Family<PluginLabels, Gauge>,
    guest_running: Family<PluginLabels, Gauge>,
}

/// Figures read at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Aggregates in memory.
    pub resident_aggregates: u64,
    /// Their state bytes, together.
    pub resident_state_bytes: u64,
    /// Commands and reads waiting in mailboxes.
    pub mailbox_depth: u64,
    /// Aggregates resting after repeated plugin failures.
    pub aggregates_poisoned: u64,
    /// Subscriptions open.
    pub subscriptions: u64,
    /// The largest lag of an open subscription, in seconds.
    pub subscription_lag_seconds: f64,
    /// Per plugin.
    pub plugins: Vec<PluginFigures>,
}

/// One plugin's scrape-time figures.
#[derive(Debug, Default)]
pub struct PluginFigures {
    /// The plugin's name.
    pub name: String,
    /// Whether it is quarantined now.
    pub quarantined: bool,
    /// Failed calls since its version was loaded.
    pub failures: u64,
    /// Guest calls waiting for its threads now.
    pub queued_calls: u64,
    /// Guest calls running on its threads now.
    pub running_calls: u64,
}

fn seconds() -> Histogram {
    // 50 µs to about 26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

fn sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("rehydra");
        let commands = Family::<CommandLabels, Counter>::default();
        registry.register(
            "commands",
            "Commands answered, by aggregate type, command and outcome (ok or the error code)",
            commands.clone(),
        );
        let hist = || Family::<TypeLabels, Histogram>::new_with_constructor(seconds);
        let command_seconds = hist();
        registry.register(
            "command_duration_seconds",
            "From a command's arrival to its answer",
            command_seconds.clone(),
        );
        let queue_wait_seconds = hist();
        registry.register(
            "command_queue_wait_seconds",
            "Time a command waited in its aggregate's mailbox",
            queue_wait_seconds.clone(),
        );
        let guest_seconds = hist();
        registry.register(
            "command_guest_seconds",
            "Time in the plugin's handle",
            guest_seconds.clone(),
        );
        let store_append_seconds = hist();
        registry.register(
            "command_store_seconds",
            "Time appending a command's events to the store",
            store_append_seconds.clone(),
        );
        let timers_fired = Family::<TimerLabels, Counter>::default();
        registry.register(
            "timers_fired",
            "Attempts to send a timer's command: done, refused (final) or retry, and whether late",
            timers_fired.clone(),
        );
        let process_events = Family::<ProcessLabels, Counter>::default();
        registry.register(
            "process_events",
            "Events process managers handled: delivered, ignored, retry (one try that failed) or parked",
            process_events.clone(),
        );
        let rehydrations = Family::<TypeLabels, Counter>::default();
        registry.register(
            "rehydrations",
            "Aggregates loaded from their events",
            rehydrations.clone(),
        );
        let events_replayed = Family::<TypeLabels, Counter>::default();
        registry.register(
            "events_replayed",
            "Events applied while loading or catching up an aggregate",
            events_replayed.clone(),
        );
        let store_commit_seconds = Family::<StoreLabels, Histogram>::new_with_constructor(seconds);
        registry.register(
            "store_commit_seconds",
            "One group commit of the event store, durable",
            store_commit_seconds.clone(),
        );
        let store_group_appends = Family::<StoreLabels, Histogram>::new_with_constructor(sizes);
        registry.register(
            "store_group_appends",
            "Appends committed together in one group",
            store_group_appends.clone(),
        );
        let store_unindexed_events = Gauge::default();
        registry.register(
            "store_unindexed_events",
            "Events of the embedded store committed but not yet in its index database (found in memory meanwhile)",
            store_unindexed_events.clone(),
        );
        let compile_cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "compile_cache_lookups",
            "Plugin loads by whether the compile cache had the component (hit) or it was compiled",
            compile_cache.clone(),
        );
        let snapshots_saved = Family::<SnapshotLabels, Counter>::default();
        registry.register(
            "snapshot_saves",
            "Snapshots written off the command path, by outcome (written, failed, dropped when the queue was full)",
            snapshots_saved.clone(),
        );
        let snapshot_loads = Family::<SnapshotLabels, Counter>::default();
        registry.register(
            "snapshot_loads",
            "Aggregate loads by what the snapshot look-up gave (used, none, ignored, failed)",
            snapshot_loads.clone(),
        );
        let plugin_log_lines_dropped = Family::<PluginLabels, Counter>::default();
        registry.register(
            "plugin_log_lines_dropped",
            "Log lines of the plugin (log calls, stdout and stderr lines) dropped over --plugin-log-rate",
            plugin_log_lines_dropped.clone(),
        );
        let resident_aggregates = Gauge::default();
        registry.register(
            "resident_aggregates",
            "Aggregates held in memory",
            resident_aggregates.clone(),
        );
        let resident_state_bytes = Gauge::default();
        registry.register(
            "resident_state_bytes",
            "State bytes of the aggregates held in memory",
            resident_state_bytes.clone(),
        );
        let mailbox_depth = Gauge::default();
        registry.register(
            "mailbox_depth",
            "Commands and reads waiting in aggregates' mailboxes",
            mailbox_depth.clone(),
        );
        let aggregates_poisoned = Gauge::default();
        registry.register(
            "aggregates_poisoned",
            "Aggregates resting (aggregate_poisoned) after repeated plugin failures on them",
            aggregates_poisoned.clone(),
        );
        let subscription_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "subscription_lag_seconds",
            "The open subscription furthest behind: how long it has had events to read or to hand to its full buffer without catching up (0: every subscription is live)",
            subscription_lag.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register(
            "subscriptions_open",
            "Subscriptions to the event log open now",
            subscriptions.clone(),
        );
        let plugin_quarantined = Family::<PluginLabels, Gauge>::default();
        registry.register(
            "plugin_quarantined",
            "1 while the plugin is quarantined after repeated failures",
            plugin_quarantined.clone(),
        );
        let plugin_failures = Family::<PluginLabels, Gauge>::default();
        registry.register(
            "plugin_failed_calls",
            "Failed guest calls since the plugin version was loaded",
            plugin_failures.clone(),
        );
        let guest_queue = Family::<PluginLabels, Gauge>::default();
        registry.register(
            "guest_queue_depth",
            "Guest calls waiting for the plugin's threads (bounded by --max-guest-queue)",
            guest_queue.clone(),
        );
        let guest_running = Family::<PluginLabels, Gauge>::default();
        registry.register(
            "guest_calls_running",
            "Guest calls running on the plugin's threads now (at most its pool size)",
            guest_running.clone(),
        );
        Metrics {
            registry,
            commands,
            command_seconds,
            queue_wait_seconds,
            guest_seconds,
            store_append_seconds,
            rehydrations,
            events_replayed,
            store_commit_seconds,
            store_group_appends,
            store_unindexed_events,
            compile_cache,
            snapshots_saved,
            snapshot_loads,
            plugin_log_lines_dropped,
            timers_fired,
            process_events,
            resident_aggregates,
            resident_state_bytes,
            mailbox_depth,
            aggregates_poisoned,
            subscriptions,
            subscription_lag,
            plugin_quarantined,
            plugin_failures,
            guest_queue,
            guest_running,
        }
    }

    /// The labels of an aggregate type.
    pub fn of_type(aggregate_type: &str) -> TypeLabels {
        TypeLabels {
            aggregate_type: aggregate_type.to_owned(),
        }
    }

    /// Records a duration in `family` for `aggregate_type`.
    pub fn observe(family: &Family<TypeLabels, Histogram>, aggregate_type: &str, took: Duration) {
        family
            .get_or_create(&Self::of_type(aggregate_type))
            .observe(took.as_secs_f64());
    }

    /// Counts a snapshot save's or load's outcome in `family`.
    pub fn snapshot(
        family: &Family<SnapshotLabels, Counter>,
        aggregate_type: &str,
        outcome: &'static str,
    ) {
        family
            .get_or_create(&SnapshotLabels {
                aggregate_type: aggregate_type.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Records one group commit of `backend`.
    pub fn group_commit(&self, backend: &'static str, appends: usize, took: Duration) {
        let labels = StoreLabels { backend };
        self.store_commit_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.store_group_appends
            .get_or_create(&labels)
            .observe(appends as f64);
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The metrics as OpenMetrics text, with the scrape-time figures set from
/// `snapshot`.
pub fn encode(snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
    let m = global();
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    m.resident_aggregates
        .set(gauge(snapshot.resident_aggregates));
    m.resident_state_bytes
        .set(gauge(snapshot.resident_state_bytes));
    m.mailbox_depth.set(gauge(snapshot.mailbox_depth));
    m.aggregates_poisoned
        .set(gauge(snapshot.aggregates_poisoned));
    m.subscriptions.set(gauge(snapshot.subscriptions));
    m.subscription_lag.set(snapshot.subscription_lag_seconds);
    // Plugins that were removed keep their last values; those still here
    // are set afresh.
    for figures in &snapshot.plugins {
        let labels = PluginLabels {
            plugin: figures.name.clone(),
        };
        m.plugin_quarantined
            .get_or_create(&labels)
            .set(i64::from(figures.quarantined));
        m.plugin_failures
            .get_or_create(&labels)
            .set(gauge(figures.failures));
        m.guest_queue
            .get_or_create(&labels)
            .set(gauge(figures.queued_calls));
        m.guest_running
            .get_or_create(&labels)
            .set(gauge(figures.running_calls));
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &m.registry)?;
    Ok(text)
}
