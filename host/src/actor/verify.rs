//! The upgrade check's replay (see [`crate::plugin::verify`]): which
//! aggregates a new plugin version is tried on, and how.
//!
//! The sample is the aggregates of the type resident now (the ones in use),
//! then the oldest streams of the log (the ones most likely to hold events
//! of old shapes), up to the budget's count. Each is folded from its
//! events by the current version and by the new one, a page at a time;
//! with the same state schema the two states must be equal after every
//! page, and at the first page where they are not, the page is folded again
//! event by event to name the first event they differ after. With a new
//! state schema only the new version's rebuild is checked.
//!
//! Then the last few commands of the type that stored events (kept in
//! memory, [`Recent`]) are re-run through both versions' `handle` on the
//! state each version builds up to the command's version — a dry run, that
//! stores nothing — and outcomes that differ are reported, not enforced.
//!
//! Neither version runs on the threads that serve commands: the current
//! version is a shadow copy with guest threads of its own, and the new one
//! serves nothing yet.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use async_trait::async_trait;

use super::Inner;
use crate::plugin::verify::{
    CommandDifference, Difference, Failure, UpgradeVerifier, VerificationReport, VerifyBudget,
    excerpt,
};
use crate::plugin::{CommandInput, Decision, PluginRef, Rejection, StateBytes};
use crate::store::EventToApply;

/// Events of the log read, at most, while looking for streams to sample.
const MAX_LOG_SCAN: usize = 100_000;
/// Characters of each state shown in a difference.
const STATE_EXCERPT: usize = 200;
/// Recent commands kept per aggregate type, for the re-run.
const RECENT_COMMANDS: usize = 10;
/// Commands with a larger payload are not kept.
const RECENT_MAX_BYTES: usize = 64 << 10;

/// A command that stored events, kept to re-run through a new version.
#[derive(Debug, Clone)]
pub(super) struct RecentCommand {
    id: String,
    command: String,
    data: Vec<u8>,
    metadata: Vec<(String, String)>,
    /// The aggregate's version when the command ran.
    version: u64,
}

/// The last [`RECENT_COMMANDS`] commands of each aggregate type that
/// stored events. The first [`RECENT_ALWAYS`] are all kept; after that they
/// are sampled, at most one every [`RECENT_EVERY_MS`] across the host, so
/// that a busy command path pays an atomic load for it, not a lock and a
/// copy per command.
pub(super) struct Recent {
    by_type: Mutex<HashMap<String, VecDeque<RecentCommand>>>,
    started: Instant,
    /// Milliseconds since `started` before which no command is kept.
    next_ms: std::sync::atomic::AtomicU64,
    /// Commands kept so far.
    kept: std::sync::atomic::AtomicUsize,
}

/// Commands kept before sampling starts.
const RECENT_ALWAYS: usize = 64;

/// How often a command is kept, at most (milliseconds).
const RECENT_EVERY_MS: u64 = 10;

impl Default for Recent {
    fn default() -> Self {
        Recent {
            by_type: Mutex::default(),
            started: Instant::now(),
            next_ms: std::sync::atomic::AtomicU64::new(0),
            kept: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl Recent {
    /// Keeps a command of `aggregate_type` that ran at `version`.
    pub(super) fn record(&self, aggregate_type: &str, input: &CommandInput<'_>, version: u64) {
        use std::sync::atomic::Ordering;
        if input.data.len() > RECENT_MAX_BYTES {
            return;
        }
        let warming_up = self.kept.load(Ordering::Relaxed) < RECENT_ALWAYS;
        let mut all = if warming_up {
            self.by_type.lock().unwrap_or_else(|e| e.into_inner())
        } else {
            let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            if now < self.next_ms.load(Ordering::Relaxed) {
                return;
            }
            self.next_ms
                .store(now.saturating_add(RECENT_EVERY_MS), Ordering::Relaxed);
            let Ok(all) = self.by_type.try_lock() else {
                return;
            };
            all
        };
        self.kept.fetch_add(1, Ordering::Relaxed);
        let kept = match all.get_mut(aggregate_type) {
            Some(kept) => kept,
            None => all.entry(aggregate_type.to_owned()).or_default(),
        };
        if kept.len() >= RECENT_COMMANDS {
            kept.pop_front();
        }
        kept.push_back(RecentCommand {
            id: input.aggregate_id.to_owned(),
            command: input.command_type.to_owned(),
            data: input.data.to_vec(),
            metadata: input.metadata.to_vec(),
            version,
        });
    }

    fn of(&self, aggregate_type: &str) -> Vec<RecentCommand> {
        self.by_type
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(aggregate_type)
            .map(|kept| kept.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The actor layer's [`UpgradeVerifier`]. Holds the directory weakly: the
/// registry it is given to is held by the directory.
pub(super) struct Verifier(pub(super) Weak<Inner>);

#[async_trait]
impl UpgradeVerifier for Verifier {
    async fn verify(
        &self,
        current: PluginRef,
        candidate: PluginRef,
        budget: VerifyBudget,
    ) -> VerificationReport {
        let started = Instant::now();
        let mut report = VerificationReport {
            current_hash: current.hash.clone(),
            candidate_hash: candidate.hash.clone(),
            same_state_schema: current.info.state_schema == candidate.info.state_schema,
            aggregates_checked: 0,
            events_replayed: 0,
            duration_ms: 0,
            truncated: false,
            differences: Vec::new(),
            failures: Vec::new(),
            commands_rerun: 0,
            command_differences: Vec::new(),
            policy: String::new(),
        };
        let Some(inner) = self.0.upgrade() else {
            return report;
        };
        let shadow: PluginRef = Arc::new(current.shadow());
        let ids = inner.sample(&current, budget, started).await;
        for id in ids {
            if started.elapsed() >= budget.time {
                report.truncated = true;
                break;
            }
            inner.check_one(&shadow, &candidate, &id, &mut report).await;
        }
        for recent in inner.recent.of(&current.info.aggregate_type) {
            if started.elapsed() >= budget.time {
                report.truncated = true;
                break;
            }
            inner.rerun(&shadow, &candidate, &recent, &mut report).await;
        }
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        report
    }
}

impl Inner {
    /// The ids to check: resident aggregates of the type first, then the
    /// oldest streams of the log.
    async fn sample(
        &self,
        current: &PluginRef,
        budget: VerifyBudget,
        started: Instant,
    ) -> Vec<String> {
        let aggregate_type = &current.info.aggregate_type;
        let mut ids = Vec::new();
        let mut seen = HashSet::new();
        for entry in self.slots.iter() {
            if ids.len() >= budget.aggregates {
                return ids;
            }
            let slot = entry.value();
            let has_events = slot.lock().live.as_ref().is_some_and(|l| l.version > 0);
            if slot.aggregate_type == *aggregate_type && has_events && seen.insert(slot.id.clone())
            {
                ids.push(slot.id.clone());
            }
        }
        let prefix = format!("{}-", current.info.stream_prefix);
        let (mut from, mut scanned) = (1, 0);
        while ids.len() < budget.aggregates
            && scanned < MAX_LOG_SCAN
            && started.elapsed() < budget.time
        {
            let Ok(page) = self.store.read_all(from, 1000).await else {
                break;
            };
            let Some(last) = page.last() else { break };
            from = last.position.saturating_add(1);
            scanned += page.len();
            for event in &page {
                if let Some(id) = event.stream.strip_prefix(prefix.as_str())
                    && seen.insert(id.to_owned())
                {
                    ids.push(id.to_owned());
                    if ids.len() >= budget.aggregates {
                        break;
                    }
                }
            }
        }
        ids
    }

    /// Folds aggregate `id` with both versions and adds what it finds to
    /// `report`. An aggregate whose events cannot be read, or that the
    /// current version cannot fold either, is not counted.
    async fn check_one(
        &self,
        current: &PluginRef,
        candidate: &PluginRef,
        id: &str,
        report: &mut VerificationReport,
    ) {
        let stream = current.info.stream_name(id);
        let page = self.config.rehydrate_page;
        let (mut a, mut b) = (
            current.initial_state().clone(),
            candidate.initial_state().clone(),
        );
        let mut from = 1;
        let mut replayed = 0u64;
        let outcome = loop {
            let Ok(batch) = self.store.read_stream_to_apply(&stream, from, page).await else {
                return;
            };
            let Some(last) = batch.last() else {
                break None;
            };
            let (last_version, full) = (last.version, batch.len() >= page);
            replayed += batch.len() as u64;
            let b2 = match candidate.apply(&b, batch.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    break Some(Err(Failure {
                        aggregate: id.to_owned(),
                        error: e.to_string(),
                    }));
                }
            };
            if report.same_state_schema {
                let Ok(a2) = current.apply(&a, batch.clone()).await else {
                    return;
                };
                if !same_state(&a2, &b2) {
                    break first_difference(current, candidate, id, &a, &b, batch)
                        .await
                        .map(Ok)
                        .or(Some(Ok(Difference {
                            aggregate: id.to_owned(),
                            version: last_version,
                            event_type: String::new(),
                            current: excerpt(&text(&a2), STATE_EXCERPT),
                            candidate: excerpt(&text(&b2), STATE_EXCERPT),
                        })));
                }
                a = a2;
            }
            b = b2;
            from = last_version.saturating_add(1);
            if !full {
                break None;
            }
        };
        report.aggregates_checked += 1;
        report.events_replayed += replayed;
        match outcome {
            Some(Ok(difference)) => report.differences.push(difference),
            Some(Err(failure)) => report.failures.push(failure),
            None => {}
        }
    }
}

impl Inner {
    /// Re-runs `recent` through both versions' `handle`, each on the state
    /// it builds from the events before the command, and reports a
    /// different outcome. Nothing is stored.
    async fn rerun(
        &self,
        current: &PluginRef,
        candidate: &PluginRef,
        recent: &RecentCommand,
        report: &mut VerificationReport,
    ) {
        let stream = current.info.stream_name(&recent.id);
        let (Some(a), Some(b)) = (
            self.state_at(current, &stream, recent.version).await,
            self.state_at(candidate, &stream, recent.version).await,
        ) else {
            return;
        };
        let input = CommandInput {
            command_type: &recent.command,
            aggregate_id: &recent.id,
            data: &recent.data,
            metadata: &recent.metadata,
        };
        let decided_a = outcome(current.handle(&a, recent.version, &input).await);
        let decided_b = outcome(candidate.handle(&b, recent.version, &input).await);
        report.commands_rerun += 1;
        if decided_a != decided_b {
            report.command_differences.push(CommandDifference {
                aggregate: recent.id.clone(),
                command: recent.command.clone(),
                version: recent.version,
                current: excerpt(&decided_a, STATE_EXCERPT),
                candidate: excerpt(&decided_b, STATE_EXCERPT),
            });
        }
    }

    /// The state `plugin` builds from the first `version` events of
    /// `stream`; `None` if they cannot be read or folded.
    async fn state_at(&self, plugin: &PluginRef, stream: &str, version: u64) -> Option<StateBytes> {
        let mut state = plugin.initial_state().clone();
        let page = self.config.rehydrate_page;
        let mut from = 1;
        while from <= version {
            let limit = usize::try_from(version - from + 1).map_or(page, |left| left.min(page));
            let batch = self
                .store
                .read_stream_to_apply(stream, from, limit)
                .await
                .ok()?;
            let last = batch.last()?.version;
            state = plugin.apply(&state, batch).await.ok()?;
            from = last.saturating_add(1);
        }
        Some(state)
    }
}

/// A decision as text to compare: the events (type and data) and the reply,
/// or the refusal. The state is left out: its encoding may change with the
/// version.
fn outcome(decided: Result<Result<Decision, Rejection>, crate::error::CommandError>) -> String {
    match decided {
        Ok(Ok(d)) => {
            let events: Vec<String> = d
                .events
                .iter()
                .map(|e| format!("{} {}", e.event_type, String::from_utf8_lossy(&e.data)))
                .collect();
            let reply = d
                .reply
                .map(|r| String::from_utf8_lossy(&r).into_owned())
                .unwrap_or_else(|| "none".to_owned());
            format!("events [{}], reply {reply}", events.join(", "))
        }
        Ok(Err(rejection)) => format!("refused: {rejection:?}"),
        Err(e) => format!("failed: {e}"),
    }
}

/// Folds `batch` event by event from `a` (current) and `b` (candidate) and
/// returns the first event after which the states differ.
async fn first_difference(
    current: &PluginRef,
    candidate: &PluginRef,
    id: &str,
    a: &StateBytes,
    b: &StateBytes,
    batch: Vec<EventToApply>,
) -> Option<Difference> {
    let (mut a, mut b) = (a.clone(), b.clone());
    for event in batch {
        let (version, event_type) = (event.version, event.event_type.clone());
        let next_a = current.apply(&a, vec![event.clone()]).await.ok()?;
        let next_b = candidate.apply(&b, vec![event]).await.ok()?;
        if !same_state(&next_a, &next_b) {
            return Some(Difference {
                aggregate: id.to_owned(),
                version,
                event_type,
                current: excerpt(&text(&next_a), STATE_EXCERPT),
                candidate: excerpt(&text(&next_b), STATE_EXCERPT),
            });
        }
        (a, b) = (next_a, next_b);
    }
    None
}

/// Whether two states are the same: the same schema, and the same bytes or
/// the same JSON value (key order and spacing aside).
fn same_state(a: &StateBytes, b: &StateBytes) -> bool {
    if a.schema != b.schema {
        return false;
    }
    if a.bytes == b.bytes {
        return true;
    }
    match (
        serde_json::from_slice::<serde_json::Value>(&a.bytes),
        serde_json::from_slice::<serde_json::Value>(&b.bytes),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn text(state: &StateBytes) -> String {
    String::from_utf8_lossy(&state.bytes).into_owned()
}
