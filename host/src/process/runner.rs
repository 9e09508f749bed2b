//! One process manager's subscriber: reads the log from its checkpoint,
//! delivers each event it follows to its instance, one after another in
//! log order, and moves the checkpoint past what it has delivered.
//!
//! What becomes of a delivery:
//! - the instance took it, or refused it (an instance that exists already
//!   for a starting event, none for a continuing one, a domain refusal):
//!   done, the next event follows;
//! - the store, the host or the plugin's quarantine made it fail for now:
//!   it is tried again, for as long as that lasts (the events after it
//!   wait: they may depend on it);
//! - the plugin failed on it (a trap, a deadline, bad output): it is tried
//!   [`ATTEMPTS`] times with a doubling wait, then parked — recorded with
//!   its error, listed by `GET /v1/processes` — and the next event follows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::route::{Delivery, route};
use crate::actor::Aggregates;
use crate::error::{CommandError, FailureKind};
use crate::store::RecordedEvent;
use crate::timer::{ParkedEvent, TimerIndex};

/// Events read from the log per page.
const PAGE: usize = 256;
/// How long the loop sleeps at most at the end of the log (a store that
/// cannot signal its commits is read this often).
const POLL: Duration = Duration::from_millis(500);
/// Tries of an event on which the plugin fails before it is parked.
pub const ATTEMPTS: u32 = 4;
/// The wait after the first failure; it doubles.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between tries of an event that cannot run for now.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs process manager `name` until `stop` turns true or its plugin is
/// removed (or no longer a process manager).
pub async fn run(
    name: String,
    index: Arc<TimerIndex>,
    aggregates: Aggregates,
    mut stop: watch::Receiver<bool>,
) {
    let store = aggregates.store().clone();
    // A process manager seen for the first time reads the log from its
    // start, but delivers what happened before it was first run only to
    // instances that exist: continuing events, never starting ones (it
    // does not start processes for events long handled). Instances started
    // by a command in the moment between its deployment and this point
    // are continued all the same.
    let (mut checkpoint, first_seen_at) = loop {
        let found = match (index.process_checkpoint(&name), store.head_position().await) {
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(format!("cannot read the log's head: {e}")),
            (Ok(Some((position, seen))), Ok(head)) if position <= head => Ok((position, seen)),
            // A checkpoint past the log's end is another log's (the store
            // was replaced): start again as if first seen.
            (Ok(Some((position, _))), Ok(head)) => {
                tracing::warn!(
                    process = %name,
                    position,
                    "process manager: its checkpoint is past the log's end (was the store \
                     replaced?); reading the log from its start"
                );
                index
                    .set_process_checkpoint_anew(&name, head)
                    .map(|()| (0, head))
                    .map_err(|e| e.to_string())
            }
            (Ok(None), Ok(head)) => index
                .set_process_checkpoint(&name, 0, head)
                .map(|()| (0, head))
                .map_err(|e| e.to_string()),
        };
        match found {
            Ok(found) => break found,
            Err(e) => {
                tracing::error!(process = %name, "process manager: {e}; retrying in a second")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    };
    let mut commits = store.commit_signal();
    let mut saved = checkpoint;
    let mut last_save = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        let Some(plugin) = aggregates
            .plugins()
            .get(&name)
            .filter(|p| p.info.process.is_some())
        else {
            tracing::info!(process = %name, "process manager removed: no longer following the log");
            break;
        };
        let page = match store.read_all(checkpoint.saturating_add(1), PAGE).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(process = %name, "process manager: cannot read the log: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        let full = page.len() >= PAGE;
        for e in &page {
            if let Some(instance) = finished_instance(&plugin.info, e)
                && let Err(err) = index.mark_finished(&name, instance)
            {
                // Not fatal: the instance's own handlers ignore what
                // comes after its end; only the saving is lost.
                tracing::warn!(process = %name, "process manager: {err}");
            }
            let delivery = route(&plugin.info, aggregates.plugins(), e).filter(|d| {
                e.position > first_seen_at
                    || plugin
                        .info
                        .command(&d.request.command)
                        .is_some_and(|c| c.mode == crate::plugin::CommandMode::Update)
            });
            if let Some(delivery) = delivery {
                if index
                    .is_finished(&name, &delivery.instance)
                    .unwrap_or(false)
                {
                    tracing::debug!(process = %name, instance = %delivery.instance, "event dropped: its instance has finished");
                    count_event(&name, "finished");
                    checkpoint = e.position;
                    continue;
                }
                let delivered = deliver(&name, &index, &aggregates, e, delivery, &mut stop).await;
                if !delivered {
                    // Stopping: this event was not handled.
                    break;
                }
            }
            checkpoint = e.position;
        }
        if checkpoint != saved && (last_save.elapsed() >= Duration::from_secs(1) || !full) {
            match index.set_process_checkpoint(&name, checkpoint, first_seen_at) {
                Ok(()) => {
                    saved = checkpoint;
                    last_save = Instant::now();
                }
                // Delivering again after a restart replays the outcomes.
                Err(e) => tracing::warn!(process = %name, "process manager: {e}"),
            }
        }
        if !full {
            crate::timer::runner::pause(POLL, &mut commits, &mut stop).await;
        }
    }
    if checkpoint != saved
        && let Err(e) = index.set_process_checkpoint(&name, checkpoint, first_seen_at)
    {
        tracing::warn!(process = %name, "process manager: {e}");
    }
}

/// Delivers one event, trying again as the module docs say; `false` only
/// when the host is stopping before it was handled.
async fn deliver(
    name: &str,
    index: &TimerIndex,
    aggregates: &Aggregates,
    e: &RecordedEvent,
    delivery: Delivery,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let span = tracing::info_span!(
        "process",
        process = %name,
        instance = %delivery.instance,
        command = %delivery.request.command,
        event = %e.event_type,
        stream = %e.stream,
        version = e.version,
    );
    let _enter = span.enter();
    let mut failures: u32 = 0;
    let mut waits: u32 = 0;
    let count = |outcome| count_event(name, outcome);
    loop {
        let result = aggregates.execute(delivery.request.clone()).await;
        let error = match result {
            Ok(_) => {
                tracing::debug!("event delivered");
                count("delivered");
                return true;
            }
            Err(e) if e.is_refusal() => {
                tracing::debug!(code = e.code(), "event ignored by the process manager: {e}");
                count("ignored");
                return true;
            }
            Err(e) => e,
        };
        let plugin_failed = matches!(
            &error,
            CommandError::PluginFailed { kind, .. } if *kind != FailureKind::Quarantined
        ) || matches!(error, CommandError::AggregatePoisoned { .. });
        let wait = if plugin_failed {
            failures += 1;
            if failures >= ATTEMPTS {
                tracing::error!(
                    attempts = failures,
                    code = error.code(),
                    "the process manager failed on this event {failures} times; parked it (see \
                     GET /v1/processes) and going on with the next: {error}"
                );
                let parked = ParkedEvent {
                    process: name.to_string(),
                    position: e.position,
                    event_id: e.event_id.to_string(),
                    stream: e.stream.clone(),
                    version: e.version,
                    event_type: e.event_type.clone(),
                    instance: delivery.instance.clone(),
                    command: delivery.request.command.clone(),
                    attempts: failures,
                    error: format!("{error} ({})", error.code()),
                    parked_at: humantime::format_rfc3339_millis(std::time::SystemTime::now())
                        .to_string(),
                };
                if let Err(err) = index.park(&parked) {
                    tracing::error!("cannot record the parked event: {err}");
                }
                count("parked");
                return true;
            }
            FIRST_BACKOFF.saturating_mul(1 << (failures - 1).min(10))
        } else {
            waits += 1;
            FIRST_BACKOFF
                .saturating_mul(1 << (waits - 1).min(10))
                .min(MAX_BACKOFF)
        };
        count("retry");
        tracing::warn!(
            code = error.code(),
            retry_in_ms = wait.as_millis() as u64,
            "the process manager's command could not run; trying again: {error}"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

/// Counts one event of process manager `name` under `outcome`.
fn count_event(name: &str, outcome: &'static str) {
    crate::metrics::global()
        .process_events
        .get_or_create(&crate::metrics::ProcessLabels {
            process: name.to_string(),
            outcome,
        })
        .inc();
}

/// The instance `e` finishes, if it is one of the process manager's own
/// events of a type it declared as finishing (`finished-by`).
fn finished_instance<'e>(pm: &crate::plugin::PluginInfo, e: &'e RecordedEvent) -> Option<&'e str> {
    let process = pm.process.as_ref()?;
    if !process.finished_by.contains(&e.event_type) {
        return None;
    }
    e.stream
        .strip_prefix(pm.stream_prefix.as_str())?
        .strip_prefix('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{CommandMode, CommandSpec, PluginInfo, ProcessInfo};

    fn event(stream: &str, event_type: &str) -> RecordedEvent {
        RecordedEvent {
            stream: stream.into(),
            version: 3,
            position: 9,
            event_id: uuid::Uuid::nil(),
            event_type: event_type.into(),
            data: b"{}".to_vec(),
            metadata: b"{}".to_vec(),
            message_id: "m".into(),
        }
    }

    #[test]
    fn only_its_own_finishing_events_finish_an_instance() {
        let pm = PluginInfo {
            aggregate_type: "transfer".into(),
            stream_prefix: "transfer".into(),
            state_schema: 1,
            commands: vec![CommandSpec {
                name: "start".into(),
                mode: CommandMode::Create,
            }],
            event_types: vec!["Started".into(), "Completed".into()],
            process: Some(ProcessInfo {
                follows: Vec::new(),
                on_refused: None,
                finished_by: vec!["Completed".into()],
            }),
        };
        assert_eq!(
            finished_instance(&pm, &event("transfer-t1", "Completed")),
            Some("t1")
        );
        assert_eq!(
            finished_instance(&pm, &event("transfer-t1", "Started")),
            None
        );
        // Another aggregate's event of the same name finishes nothing.
        assert_eq!(
            finished_instance(&pm, &event("order-t1", "Completed")),
            None
        );
        assert_eq!(
            finished_instance(&pm, &event("transferx-t1", "Completed")),
            None
        );
    }
}
