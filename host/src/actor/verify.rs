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
//! Neither version runs on the threads that serve commands: the current
//! version is a shadow copy with guest threads of its own, and the new one
//! serves nothing yet.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Instant;

use async_trait::async_trait;

use super::Inner;
use crate::plugin::verify::{
    Difference, Failure, UpgradeVerifier, VerificationReport, VerifyBudget, excerpt,
};
use crate::plugin::{PluginRef, StateBytes};
use crate::store::RecordedEvent;

/// Events of the log read, at most, while looking for streams to sample.
const MAX_LOG_SCAN: usize = 100_000;
/// Characters of each state shown in a difference.
const STATE_EXCERPT: usize = 200;

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
            let Ok(batch) = self.store.read_stream(&stream, from, page).await else {
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

/// Folds `batch` event by event from `a` (current) and `b` (candidate) and
/// returns the first event after which the states differ.
async fn first_difference(
    current: &PluginRef,
    candidate: &PluginRef,
    id: &str,
    a: &StateBytes,
    b: &StateBytes,
    batch: Vec<RecordedEvent>,
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
