//! Actors: one per live aggregate.
//!
//! Each live aggregate has a mailbox (a bounded queue) and at most one task
//! draining it, so its commands run strictly one at a time in arrival order.
//! The task exists only while there is work; between commands an aggregate
//! costs its cached state and a slot in the directory. Idle aggregates are
//! passivated after `idle_timeout`, and the resident set is capped at
//! `max_resident` (least recently used go first). A command for an aggregate
//! that is not resident rehydrates it from the store.
//!
//! - this file: the directory of aggregates, the mailbox, passivation;
//! - [`aggregate`]: what happens to one command inside an actor;
//! - [`snapshot`]: persisted snapshots, stored off the command path;
//! - [`poison`]: resting one aggregate that keeps making its plugin fail;
//! - [`verify`]: replaying a sample of aggregates through a new plugin
//!   version before it serves.

mod aggregate;
mod poison;
mod snapshot;
mod timers;
mod verify;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::oneshot;

use crate::command::{AggregateState, CommandOutcome, CommandRequest, validate_id};
use crate::error::CommandError;
use crate::plugin::{PluginRegistry, StateBytes};
use crate::store::EventStore;

/// Limits and timings of the actor layer.
#[derive(Debug, Clone)]
pub struct ActorConfig {
    /// Commands that may wait in one aggregate's mailbox; past it, callers
    /// get `overloaded`.
    pub mailbox_capacity: usize,
    /// Commands and state reads in progress on the whole host at once
    /// (queued or running); past it, callers get `overloaded` at once, so
    /// that memory stays bounded however much is offered.
    pub max_in_flight: usize,
    /// An aggregate with no command for this long is passivated.
    pub idle_timeout: Duration,
    /// The most aggregates kept in memory at once.
    pub max_resident: usize,
    /// The most state bytes kept in memory at once, all aggregates
    /// together; past it the least recently used are evicted, as past
    /// `max_resident`.
    pub max_resident_bytes: u64,
    /// How often a command is re-run after a conflict with another writer.
    pub conflict_retries: u32,
    /// How long a caller waits for its command's outcome.
    pub command_timeout: Duration,
    /// Events read (and passed to one `apply` call) per page on rehydration.
    pub rehydrate_page: usize,
    /// Store a snapshot of an aggregate's state every this many events
    /// (and when it leaves memory); loads start from the newest. 0: no
    /// snapshots are stored or loaded.
    pub snapshot_every: u64,
    /// Plugin failures in a row of one aggregate after which it rests
    /// (`aggregate_poisoned`) on its own; 0: never.
    pub poison_after: u32,
    /// An aggregate's first rest; it doubles while failures go on.
    pub poison_backoff: Duration,
    /// The most pending timers one aggregate may have scheduled; a command
    /// that would leave more is refused (`too_many_timers`).
    pub max_timers_per_aggregate: usize,
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            mailbox_capacity: 512,
            max_in_flight: 4096,
            idle_timeout: Duration::from_secs(300),
            max_resident: 100_000,
            max_resident_bytes: 1 << 30,
            conflict_retries: 5,
            command_timeout: Duration::from_secs(10),
            rehydrate_page: 1000,
            snapshot_every: 100,
            poison_after: 3,
            poison_backoff: Duration::from_secs(1),
            max_timers_per_aggregate: 1000,
        }
    }
}

/// An aggregate's state as its actor holds it between commands.
#[derive(Debug, Clone)]
struct Live {
    state: StateBytes,
    version: u64,
    /// The id of the event at `version` (`None` at version 0), which a
    /// snapshot records so that a load can check the stream still has it.
    head_event_id: Option<uuid::Uuid>,
    /// The version of the last snapshot stored (or queued) of this state.
    snapshot_version: u64,
}

/// Work waiting in a mailbox.
enum Work {
    Command(
        Box<CommandRequest>,
        oneshot::Sender<Result<CommandOutcome, CommandError>>,
        // When it was queued, for the queue-wait metric.
        Instant,
    ),
    State(oneshot::Sender<Result<AggregateState, CommandError>>),
}

/// One aggregate's place in the directory.
struct Slot {
    aggregate_type: String,
    id: String,
    inner: Mutex<SlotInner>,
}

struct SlotInner {
    queue: VecDeque<Work>,
    /// A task is draining the queue.
    running: bool,
    /// Removed from the directory; a new slot must be made.
    evicted: bool,
    /// The cached state; taken by the draining task while it works.
    live: Option<Live>,
    /// The state bytes this slot counts in `Inner::resident_bytes`.
    bytes: u64,
    last_used: Instant,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotInner> {
        // Nothing panics while holding this lock; recover rather than
        // propagate if that ever changes.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_idle_since(&self, cutoff: Instant) -> bool {
        let s = self.lock();
        !s.running && s.queue.is_empty() && s.last_used <= cutoff
    }
}

/// What the actor layer holds, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Footprint {
    /// Aggregates in memory.
    pub resident: u64,
    /// Their state bytes, together.
    pub state_bytes: u64,
    /// Commands and reads waiting in mailboxes.
    pub queued: u64,
    /// Aggregates resting after repeated plugin failures.
    pub poisoned: u64,
}

/// The directory of live aggregates and the entry point for commands.
#[derive(Clone)]
pub struct Aggregates {
    inner: Arc<Inner>,
}

struct Inner {
    slots: DashMap<String, Arc<Slot>>,
    /// One permit per command or read in progress (`max_in_flight`).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The state bytes of every cached aggregate together (each slot's
    /// share is its `SlotInner::bytes`).
    resident_bytes: AtomicU64,
    store: Arc<dyn EventStore>,
    plugins: Arc<PluginRegistry>,
    config: ActorConfig,
    evicting: AtomicBool,
    snapshots: snapshot::Snapshots,
    poison: poison::Poison,
    /// The last commands of each type, for the upgrade check's re-run.
    recent: verify::Recent,
    /// The pending timers, for the per-aggregate cap (set once by
    /// [`Aggregates::use_timer_index`]; without it a command's own changes
    /// are all that is counted).
    timers: std::sync::OnceLock<Arc<crate::timer::TimerIndex>>,
}

impl Aggregates {
    /// A directory over `store` and `plugins`. Starts the passivation
    /// sweeper; call from within a tokio runtime.
    pub fn new(
        store: Arc<dyn EventStore>,
        plugins: Arc<PluginRegistry>,
        config: ActorConfig,
    ) -> Self {
        let snapshots = snapshot::Snapshots::start(store.clone(), config.snapshot_every);
        let poison = poison::Poison::new(config.poison_after, config.poison_backoff);
        let inner = Arc::new(Inner {
            snapshots,
            poison,
            recent: verify::Recent::default(),
            slots: DashMap::new(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1))),
            resident_bytes: AtomicU64::new(0),
            store,
            plugins,
            config,
            evicting: AtomicBool::new(false),
            timers: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&inner);
        let period = (inner.config.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.passivate_idle();
            }
        });
        Aggregates { inner }
    }

    /// What verifies new plugin versions against this host's aggregates
    /// and store, for [`PluginRegistry::set_verifier`].
    pub fn upgrade_verifier(&self) -> Arc<dyn crate::plugin::verify::UpgradeVerifier> {
        Arc::new(verify::Verifier(Arc::downgrade(&self.inner)))
    }

    /// Counts the timers an aggregate has pending in `index` for the cap of
    /// `max_timers_per_aggregate`. Only the first call has an effect.
    pub fn use_timer_index(&self, index: Arc<crate::timer::TimerIndex>) {
        let _ = self.inner.timers.set(index);
    }

    /// The timer index in use, if any.
    pub fn timer_index(&self) -> Option<&Arc<crate::timer::TimerIndex>> {
        self.inner.timers.get()
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The plugin registry.
    pub fn plugins(&self) -> &Arc<PluginRegistry> {
        &self.inner.plugins
    }

    /// How many aggregates are in memory.
    pub fn resident(&self) -> usize {
        self.inner.slots.len()
    }

    /// Resident aggregates, their state bytes (the running total the bytes
    /// cap is checked against), the work waiting in their mailboxes and the
    /// aggregates resting, for the metrics. Walks every slot and poison
    /// entry: for a scrape, not for the command path.
    pub fn footprint(&self) -> Footprint {
        let queued = self
            .inner
            .slots
            .iter()
            .map(|slot| slot.value().lock().queue.len() as u64)
            .sum();
        Footprint {
            resident: self.inner.slots.len() as u64,
            state_bytes: self.inner.resident_bytes.load(Ordering::Acquire),
            queued,
            poisoned: self.inner.poison.poisoned(),
        }
    }

    /// The error for an aggregate type no loaded plugin handles: "unknown",
    /// or "not yet" while plugin files are still compiling at start-up.
    fn no_plugin(&self, aggregate_type: &str) -> CommandError {
        let loading = self.inner.plugins.loading();
        if loading.is_empty() {
            return CommandError::UnknownAggregateType(aggregate_type.to_string());
        }
        let files: Vec<String> = loading
            .iter()
            .map(|p| {
                format!(
                    "{} ({:.1} MB, {} s so far)",
                    p.path.file_name().unwrap_or_default().to_string_lossy(),
                    p.size as f64 / 1e6,
                    p.compiling_for_s()
                )
            })
            .collect();
        CommandError::PluginsLoading {
            aggregate_type: aggregate_type.to_string(),
            loading: files.join(", "),
        }
    }

    /// Runs a command on its aggregate and waits for the outcome.
    pub async fn execute(&self, req: CommandRequest) -> Result<CommandOutcome, CommandError> {
        // A dry run counts toward nothing.
        if req.dry_run {
            return self.execute_counted(req).await;
        }
        let started = Instant::now();
        let (aggregate_type, command) = (req.aggregate_type.clone(), req.command.clone());
        let result = self.execute_counted(req).await;
        let metrics = crate::metrics::global();
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        // Unknown types and commands are counted under what was asked for,
        // which a client chooses: keep the label set bounded.
        let (aggregate_type, command) = match &result {
            Err(CommandError::UnknownAggregateType(_)) => {
                ("<unknown>".to_owned(), "<unknown>".to_owned())
            }
            Err(CommandError::UnknownCommand { .. }) => (aggregate_type, "<unknown>".to_owned()),
            _ => (aggregate_type, command),
        };
        crate::metrics::Metrics::observe(
            &metrics.command_seconds,
            &aggregate_type,
            started.elapsed(),
        );
        metrics
            .commands
            .get_or_create(&crate::metrics::CommandLabels {
                aggregate_type,
                command,
                outcome: outcome.to_owned(),
            })
            .inc();
        result
    }

    async fn execute_counted(&self, req: CommandRequest) -> Result<CommandOutcome, CommandError> {
        let _in_flight = self.admit()?;
        validate_id("aggregate id", &req.aggregate_id)?;
        let plugin = self
            .inner
            .plugins
            .get(&req.aggregate_type)
            .ok_or_else(|| self.no_plugin(&req.aggregate_type))?;
        if plugin.info.command(&req.command).is_none() {
            return Err(unknown_command(
                &plugin.info,
                &req.aggregate_type,
                &req.command,
            ));
        }
        let (tx, rx) = oneshot::channel();
        let (t, id) = (req.aggregate_type.clone(), req.aggregate_id.clone());
        self.inner.poison.check(&t, &id)?;
        self.inner
            .enqueue(&t, &id, Work::Command(Box::new(req), tx, Instant::now()))?;
        self.wait(rx).await
    }

    /// The aggregate's current state (loading it if needed).
    pub async fn state(
        &self,
        aggregate_type: &str,
        id: &str,
    ) -> Result<AggregateState, CommandError> {
        let _in_flight = self.admit()?;
        validate_id("aggregate id", id)?;
        if self.inner.plugins.get(aggregate_type).is_none() {
            return Err(self.no_plugin(aggregate_type));
        }
        self.inner.poison.check(aggregate_type, id)?;
        let (tx, rx) = oneshot::channel();
        self.inner.enqueue(aggregate_type, id, Work::State(tx))?;
        self.wait(rx).await
    }

    /// A place among the work in progress on this host, held until the
    /// caller has its answer; `overloaded` at once when there is none.
    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, CommandError> {
        Arc::clone(&self.inner.in_flight)
            .try_acquire_owned()
            .map_err(|_| {
                CommandError::Overloaded(format!(
                    "{} commands and reads are in progress on this host, the most it takes \
                     (--max-in-flight)",
                    self.inner.config.max_in_flight
                ))
            })
    }

    async fn wait<T>(
        &self,
        rx: oneshot::Receiver<Result<T, CommandError>>,
    ) -> Result<T, CommandError> {
        let limit = self.inner.config.command_timeout;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CommandError::Internal(
                "the aggregate's actor stopped unexpectedly".into(),
            )),
            Err(_) => Err(CommandError::Timeout(limit)),
        }
    }
}

pub(crate) fn unknown_command(
    info: &crate::plugin::PluginInfo,
    aggregate_type: &str,
    command: &str,
) -> CommandError {
    CommandError::UnknownCommand {
        aggregate_type: aggregate_type.to_string(),
        command: command.to_string(),
        known: info
            .commands
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

impl Inner {
    fn enqueue(
        self: &Arc<Self>,
        aggregate_type: &str,
        id: &str,
        work: Work,
    ) -> Result<(), CommandError> {
        let key = slot_key(aggregate_type, id);
        let mut work = Some(work);
        loop {
            let mut created = false;
            let slot = self
                .slots
                .entry(key.clone())
                .or_insert_with(|| {
                    created = true;
                    Arc::new(Slot {
                        aggregate_type: aggregate_type.to_string(),
                        id: id.to_string(),
                        inner: Mutex::new(SlotInner {
                            queue: VecDeque::new(),
                            running: false,
                            evicted: false,
                            live: None,
                            bytes: 0,
                            last_used: Instant::now(),
                        }),
                    })
                })
                .clone();
            if created && self.slots.len() > self.config.max_resident {
                self.evict_least_recently_used();
            }
            let mut s = slot.lock();
            if s.evicted {
                // Passivated between the look-up and the lock: look again.
                continue;
            }
            if s.queue.len() >= self.config.mailbox_capacity {
                return Err(CommandError::Overloaded(format!(
                    "the mailbox of {aggregate_type} {id:?} is full ({} commands waiting)",
                    self.config.mailbox_capacity
                )));
            }
            if let Some(w) = work.take() {
                s.queue.push_back(w);
            }
            if !s.running {
                s.running = true;
                drop(s);
                tokio::spawn(self.clone().drain(slot));
            }
            return Ok(());
        }
    }

    /// The actor: runs the slot's queued work one item at a time, then ends.
    async fn drain(self: Arc<Self>, slot: Arc<Slot>) {
        let mut guard = DrainGuard {
            slot: &slot,
            resident_bytes: &self.resident_bytes,
            finished: false,
        };
        loop {
            let (work, live) = {
                let mut s = slot.lock();
                match s.queue.pop_front() {
                    Some(w) => {
                        let live = s.live.take();
                        (w, live)
                    }
                    None => {
                        s.running = false;
                        s.last_used = Instant::now();
                        guard.finished = true;
                        // An aggregate with no events (a read, or a refused
                        // command, for an id that does not exist) is not
                        // kept: reads of random ids must not push resident
                        // aggregates out.
                        let empty = s.live.as_ref().is_some_and(|l| l.version == 0);
                        if empty {
                            s.evicted = true;
                            uncount(&self.resident_bytes, &mut s);
                        }
                        drop(s);
                        if empty {
                            // The directory's lock is taken after the
                            // slot's is released, never inside it (the
                            // sweeper takes them the other way round).
                            let key = slot_key(&slot.aggregate_type, &slot.id);
                            self.slots.remove_if(&key, |_, v| Arc::ptr_eq(v, &slot));
                        }
                        return;
                    }
                }
            };
            let live = match work {
                // The caller has gone (it timed out, or hung up): nobody
                // would learn the outcome, so the command is not run.
                Work::Command(req, reply, _) if reply.is_closed() => {
                    tracing::debug!(
                        aggregate = %req.aggregate_id,
                        command = %req.command,
                        "dropped a command whose caller has gone"
                    );
                    live
                }
                Work::State(reply) if reply.is_closed() => live,
                Work::Command(req, reply, queued) => {
                    if !req.dry_run {
                        crate::metrics::Metrics::observe(
                            &crate::metrics::global().queue_wait_seconds,
                            &req.aggregate_type,
                            queued.elapsed(),
                        );
                    }
                    let (result, live) = self.run_command(&req, live).await;
                    self.poison.record(&slot.aggregate_type, &slot.id, &result);
                    let _ = reply.send(result);
                    live
                }
                Work::State(reply) => {
                    let (result, live) =
                        self.read_state(&slot.aggregate_type, &slot.id, live).await;
                    self.poison.record(&slot.aggregate_type, &slot.id, &result);
                    let _ = reply.send(result);
                    live
                }
            };
            let mut live = live;
            if let Some(l) = live.as_mut() {
                let schema = l.state.schema;
                self.snapshots.after_work(
                    &slot.aggregate_type,
                    || self.stream_of(&slot.aggregate_type, &slot.id, schema),
                    l,
                );
            }
            let size = live.as_ref().map_or(0, |l| l.state.bytes.len() as u64);
            let over = {
                let mut s = slot.lock();
                s.live = live;
                let before = std::mem::replace(&mut s.bytes, size);
                if size >= before {
                    let grown = size - before;
                    self.resident_bytes
                        .fetch_add(grown, Ordering::AcqRel)
                        .saturating_add(grown)
                } else {
                    let shrunk = before - size;
                    self.resident_bytes
                        .fetch_sub(shrunk, Ordering::AcqRel)
                        .saturating_sub(shrunk)
                }
            } > self.config.max_resident_bytes;
            if over {
                self.evict_least_recently_used();
            }
        }
    }

    fn passivate_idle(&self) {
        self.poison.sweep();
        let cutoff = Instant::now()
            .checked_sub(self.config.idle_timeout)
            .unwrap_or_else(Instant::now);
        self.slots.retain(|_, slot| !self.try_evict(slot, cutoff));
    }

    /// Evicts the least recently used idle aggregates, down to 90% of the
    /// count cap and of the bytes cap, in the background. One eviction pass
    /// runs at a time.
    fn evict_least_recently_used(self: &Arc<Self>) {
        if self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let target = this.config.max_resident - this.config.max_resident / 10;
            let target_bytes = this.config.max_resident_bytes - this.config.max_resident_bytes / 10;
            let mut excess = this.slots.len().saturating_sub(target);
            let mut candidates: Vec<(Instant, String)> = this
                .slots
                .iter()
                .filter_map(|e| {
                    let s = e.value().lock();
                    (!s.running && s.queue.is_empty()).then(|| (s.last_used, e.key().clone()))
                })
                .collect();
            candidates.sort_unstable();
            let now = Instant::now();
            for (_, key) in candidates {
                let over_bytes = this.resident_bytes.load(Ordering::Acquire) > target_bytes;
                if excess == 0 && !over_bytes {
                    break;
                }
                if this
                    .slots
                    .remove_if(&key, |_, slot| this.try_evict(slot, now))
                    .is_some()
                {
                    excess = excess.saturating_sub(1);
                }
            }
            this.evicting.store(false, Ordering::Release);
        });
    }
}

/// A slot's key in the directory.
fn slot_key(aggregate_type: &str, id: &str) -> String {
    format!("{aggregate_type}/{id}")
}

impl Inner {
    /// Marks `slot` evicted if it has been idle since `cutoff`, and stores
    /// a snapshot of what it held if one is due.
    fn try_evict(&self, slot: &Slot, cutoff: Instant) -> bool {
        if !slot.is_idle_since(cutoff) {
            return false;
        }
        let mut s = slot.lock();
        // Re-check under the same lock that marks it.
        if s.running || !s.queue.is_empty() {
            return false;
        }
        s.evicted = true;
        uncount(&self.resident_bytes, &mut s);
        let live = s.live.take();
        drop(s);
        if let Some(mut live) = live {
            let schema = live.state.schema;
            self.snapshots.on_passivation(
                &slot.aggregate_type,
                || self.stream_of(&slot.aggregate_type, &slot.id, schema),
                &mut live,
            );
        }
        true
    }

    /// The stream of aggregate `id` of `aggregate_type`, if a plugin serves
    /// the type with state of `schema`: state cached from a previous plugin
    /// version of another schema is not worth a snapshot (the current
    /// version would ignore it, and it would replace the current one's).
    fn stream_of(&self, aggregate_type: &str, id: &str, schema: u32) -> Option<String> {
        self.plugins
            .get(aggregate_type)
            .filter(|p| p.info.state_schema == schema)
            .map(|p| p.info.stream_name(id))
    }
}

/// Takes a slot's state bytes out of the total.
fn uncount(resident_bytes: &AtomicU64, s: &mut SlotInner) {
    let bytes = std::mem::take(&mut s.bytes);
    resident_bytes.fetch_sub(bytes, Ordering::AcqRel);
}

/// Keeps an aggregate usable if its actor task panics: the slot stops
/// counting as running, the cached state (possibly half-updated) is dropped,
/// and waiting callers are answered (their reply channels close).
struct DrainGuard<'a> {
    slot: &'a Slot,
    resident_bytes: &'a AtomicU64,
    finished: bool,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let mut s = self.slot.lock();
            s.running = false;
            s.live = None;
            uncount(self.resident_bytes, &mut s);
            s.queue.clear();
        }
    }
}
