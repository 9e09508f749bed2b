//! The tasks that keep the timer index up with the log and send each due
//! timer's command.
//!
//! Two loops. The reader follows the log from the index's checkpoint into
//! the index, woken by each commit, and publishes how far it has read
//! ([`TimerIndex::mark_read`]): a command that changes timers is answered
//! once its change is in the index, so that a list or the per-aggregate cap
//! right after it sees it. The sender takes the log's head position, waits
//! until the reader has passed it, and only then sends the commands of the
//! timers now due: so a cancel stored before a timer came due always wins
//! over it. Then it sleeps until the next is due, or a commit may have
//! brought an earlier one.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::event::{TimersEvent, message_id, unix_ms};
use super::index::{IndexChange, PendingTimer, TimerIndex};
use super::{LATE_AFTER, TIMERS_EVENT};
use crate::actor::Aggregates;
use crate::command::{CommandRequest, TimerFiring};
use crate::error::CommandError;
use crate::metrics::{self, TimerLabels};
use crate::store::{EventStore, RecordedEvent};

/// Events read from the log per page.
const PAGE: usize = 256;
/// Timer changes written to the index per transaction, at most (plus one
/// event's).
const BATCH: usize = 10_000;
/// Due timers taken per round.
const ROUND: usize = 256;
/// How long either loop sleeps at most: the reader, to read the log of a
/// store that cannot signal its commits; the sender, to notice timers that
/// came due.
const POLL: Duration = Duration::from_millis(500);
/// The first wait after a failed attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between attempts to send one timer's command.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Starts the timer runner for `aggregates` (and its store) over `index`;
/// it ends once `stop` turns true and its commands in flight are answered.
pub fn start(
    index: Arc<TimerIndex>,
    aggregates: Aggregates,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let store = aggregates.store().clone();
    let reader = Reader {
        store: store.clone(),
        index: index.clone(),
        checkpoint: 0,
        saved: Instant::now(),
    };
    let sender = Sender {
        store,
        index,
        aggregates,
    };
    tokio::spawn(async move {
        let reading = tokio::spawn(reader.run(stop.clone()));
        sender.run(stop).await;
        if let Err(e) = reading.await {
            tracing::error!("timers: the log reader failed: {e}");
        }
    })
}

/// Sleeps for `wait`, or until a commit or the stop signal.
pub(crate) async fn pause(
    wait: Duration,
    commits: &mut Option<watch::Receiver<u64>>,
    stop: &mut watch::Receiver<bool>,
) {
    let commit = async {
        match commits.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = commit => {}
        _ = stop.changed() => {}
    }
}

/// Logs a loop's failure once per outage, and its recovery.
struct Outage {
    failing: bool,
}

impl Outage {
    fn report(&mut self, what: &str, result: &Result<(), String>) {
        match result {
            Ok(()) if self.failing => {
                tracing::info!("timers: the {what} works again");
                self.failing = false;
            }
            Err(e) if !self.failing => {
                tracing::error!("timers: {e}; retrying every second");
                self.failing = true;
            }
            _ => {}
        }
    }
}

struct Reader {
    store: Arc<dyn EventStore>,
    index: Arc<TimerIndex>,
    /// The last log position read into the index (ahead of the one it
    /// stores while pages brought it nothing).
    checkpoint: u64,
    /// When the index last stored its checkpoint.
    saved: Instant,
}

impl Reader {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            match self.check_checkpoint().await {
                Ok(checkpoint) => {
                    self.checkpoint = checkpoint;
                    break;
                }
                Err(e) => tracing::error!("timers: {e}; retrying in a second"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
        let mut commits = self.store.commit_signal();
        let mut outage = Outage { failing: false };
        loop {
            if *stop.borrow() {
                // What the loop read without storing, so that the next start
                // does not read it again.
                if let Err(e) = self.index.apply(&[], self.checkpoint) {
                    tracing::warn!("timers: {e}");
                }
                return;
            }
            let read = self.catch_up().await;
            outage.report("timer index", &read);
            let wait = if read.is_ok() {
                POLL
            } else {
                Duration::from_secs(1)
            };
            pause(wait, &mut commits, &mut stop).await;
        }
    }

    /// The index's checkpoint. An index that has read further than the log
    /// reaches belongs to another log (the store was replaced): it is
    /// emptied, to be rebuilt.
    async fn check_checkpoint(&self) -> Result<u64, String> {
        let checkpoint = self.index.checkpoint().map_err(|e| e.to_string())?;
        let head = self
            .store
            .head_position()
            .await
            .map_err(|e| format!("cannot read the log's head: {e}"))?;
        if checkpoint > head {
            tracing::warn!(
                checkpoint,
                head,
                "timers: the timer index has read further than the log reaches (was the store \
                 replaced?); rebuilding it from the log"
            );
            self.index.reset().map_err(|e| e.to_string())?;
            return Ok(0);
        }
        Ok(checkpoint)
    }

    /// Reads the log from the index's checkpoint to its end into the index.
    async fn catch_up(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut read: u64 = 0;
        loop {
            let page = self
                .store
                .read_all(self.checkpoint.saturating_add(1), PAGE)
                .await
                .map_err(|e| format!("cannot read the log for timers: {e}"))?;
            let Some(last) = page.last() else {
                break;
            };
            let last_position = last.position;
            // Changes go to the index a batch at a time, each batch in a
            // transaction with the position of the last event it holds
            // whole, so that neither memory nor a transaction grows with a
            // page of events that schedule many timers each.
            let mut changes: Vec<IndexChange> = Vec::new();
            for e in &page {
                changes.extend(index_changes(e));
                if changes.len() >= BATCH {
                    self.index
                        .apply(&changes, e.position)
                        .map_err(|e| e.to_string())?;
                    self.saved = Instant::now();
                    changes.clear();
                }
            }
            // A page with nothing for the index moves the checkpoint in
            // memory, written with the next change or within a second: a
            // restart reads those events again, which changes nothing.
            if !changes.is_empty() || self.saved.elapsed() >= Duration::from_secs(1) {
                self.index
                    .apply(&changes, last_position)
                    .map_err(|e| e.to_string())?;
                self.saved = Instant::now();
            }
            self.checkpoint = last_position;
            self.index.mark_read(last_position);
            read += page.len() as u64;
            if last_report.elapsed() >= Duration::from_secs(10) {
                tracing::info!(
                    events = read,
                    position = self.checkpoint,
                    "timers: reading the log into the timer index"
                );
                last_report = Instant::now();
            }
            if page.len() < PAGE {
                break;
            }
        }
        // Nothing (more) to read: everything up to the head is in.
        self.index.mark_read(self.checkpoint);
        if started.elapsed() >= Duration::from_secs(10) {
            tracing::info!(
                events = read,
                seconds = started.elapsed().as_secs(),
                "timers: the timer index is up with the log"
            );
        }
        Ok(())
    }
}

struct Sender {
    store: Arc<dyn EventStore>,
    index: Arc<TimerIndex>,
    aggregates: Aggregates,
}

impl Sender {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut commits = self.store.commit_signal();
        let mut outage = Outage { failing: false };
        loop {
            if *stop.borrow() {
                return;
            }
            let round = self.round(&mut stop).await;
            let wait = match &round {
                Ok(wait) => *wait,
                Err(_) => Duration::from_secs(1),
            };
            outage.report("timer sender", &round.map(|_| ()));
            pause(wait.min(POLL), &mut commits, &mut stop).await;
        }
    }

    /// Waits until the index has read the log up to its head as of now,
    /// then sends what is due; returns how long until the next is due.
    async fn round(&self, stop: &mut watch::Receiver<bool>) -> Result<Duration, String> {
        let head = self
            .store
            .head_position()
            .await
            .map_err(|e| format!("cannot read the log's head: {e}"))?;
        tokio::select! {
            read = self.index.wait_until_read(head, Duration::from_secs(5)) => {
                if !read {
                    return Err(format!(
                        "the timer index has not read the log up to position {head} within 5 \
                         s; no timer is sent until it has"
                    ));
                }
            }
            _ = stop.changed() => return Ok(POLL),
        }
        self.fire_due().await
    }

    /// Sends the commands of the timers due now; returns how long until the
    /// next one is due.
    async fn fire_due(&self) -> Result<Duration, String> {
        loop {
            let now = now_ms();
            let due = self.index.due(now, ROUND).map_err(|e| e.to_string())?;
            if due.is_empty() {
                break;
            }
            let full = due.len() >= ROUND;
            // Commands for one aggregate go in the order their timers came
            // due (and were scheduled); different aggregates' go at once.
            let mut by_target: std::collections::BTreeMap<_, Vec<PendingTimer>> =
                Default::default();
            for timer in due {
                by_target
                    .entry(timer.target.clone())
                    .or_default()
                    .push(timer);
            }
            let mut sending = tokio::task::JoinSet::new();
            for (_, timers) in by_target {
                let aggregates = self.aggregates.clone();
                let index = self.index.clone();
                sending.spawn(async move {
                    for timer in timers {
                        fire(&aggregates, &index, timer).await;
                    }
                });
            }
            while sending.join_next().await.is_some() {}
            if !full {
                break;
            }
        }
        let next = self.index.next_attempt_ms().map_err(|e| e.to_string())?;
        Ok(match next {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => POLL,
        })
    }
}

/// What the index learns from one event of the log.
fn index_changes(e: &RecordedEvent) -> Vec<IndexChange> {
    if e.event_type == TIMERS_EVENT {
        let event: TimersEvent = match serde_json::from_slice(&e.data) {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(stream = %e.stream, version = e.version, error = %err, "timers: a $timers event that does not read; ignored");
                return Vec::new();
            }
        };
        let correlation_id = correlation_of(&e.metadata).unwrap_or_else(|| e.message_id.clone());
        return event
            .changes
            .into_iter()
            .enumerate()
            .map(|(i, change)| IndexChange::Timers {
                source: event.aggregate.clone(),
                event_id: e.event_id.to_string(),
                correlation_id: correlation_id.clone(),
                order: (e.position, u32::try_from(i).unwrap_or(u32::MAX)),
                change: Box::new(change),
            })
            .collect();
    }
    match fired_timer(&e.metadata) {
        Some(id) => vec![IndexChange::Fired { id }],
        None => Vec::new(),
    }
}

/// The id of the timer whose command stored an event with this metadata.
fn fired_timer(metadata: &[u8]) -> Option<String> {
    // Most events were not sent by a timer: look for the key before
    // parsing anything.
    const NEEDLE: &[u8] = b"\"timer\":{";
    if !metadata.windows(NEEDLE.len()).any(|w| w == NEEDLE) {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Stored {
        timer: Option<Timer>,
    }
    #[derive(serde::Deserialize)]
    struct Timer {
        id: String,
    }
    let stored: Stored = serde_json::from_slice(metadata).ok()?;
    Some(stored.timer?.id)
}

/// The `$correlationId` of an event's metadata.
fn correlation_of(metadata: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Stored {
        #[serde(rename = "$correlationId")]
        correlation_id: Option<String>,
    }
    serde_json::from_slice::<Stored>(metadata)
        .ok()?
        .correlation_id
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Sends one timer's command and records what became of it.
async fn fire(aggregates: &Aggregates, index: &TimerIndex, timer: PendingTimer) {
    let now = now_ms();
    let due_ms = unix_ms(&timer.due).unwrap_or(now);
    let late = now.saturating_sub(due_ms) > LATE_AFTER.as_millis() as u64;
    let scheduled_by = timer.scheduled_by.to_string();
    let req = CommandRequest {
        aggregate_type: timer.target.aggregate_type.clone(),
        aggregate_id: timer.target.id.clone(),
        command: timer.command.clone(),
        data: serde_json::to_vec(&timer.data).unwrap_or_else(|_| b"{}".to_vec()),
        idempotency_key: Some(message_id(&timer.id)),
        correlation_id: Some(timer.correlation_id.clone()),
        causation_id: Some(timer.scheduled_in.clone()),
        timer: Some(TimerFiring {
            id: timer.id.clone(),
            key: timer.key.clone(),
            due: timer.due.clone(),
            late,
            scheduled_by: scheduled_by.clone(),
        }),
        ..CommandRequest::default()
    };
    let result = aggregates.execute(req).await;
    let outcome = match &result {
        Ok(_) => "done",
        Err(e) if e.is_refusal() => "refused",
        Err(_) => "retry",
    };
    metrics::global()
        .timers_fired
        .get_or_create(&TimerLabels { outcome, late })
        .inc();
    let span = tracing::info_span!(
        "timer",
        id = %timer.id,
        key = %timer.key,
        scheduled_by = %scheduled_by,
        target = %timer.target,
        command = %timer.command,
        late,
    );
    let _enter = span.enter();
    let recorded = match result {
        Ok(_) => {
            tracing::debug!("timer fired");
            index.remove(&timer.id)
        }
        Err(e) if e.is_refusal() => {
            tracing::info!(code = e.code(), "timer fired; its command was refused: {e}");
            match report_refusal(aggregates, &timer, &e).await {
                Ok(()) => index.remove(&timer.id),
                Err(failure) => {
                    // The refusal must reach the process manager: the
                    // command is sent again later (refused again, with the
                    // same message id), and so is the refusal.
                    let wait = backoff(timer.attempts);
                    tracing::warn!(
                        code = failure.code(),
                        "the refusal could not be delivered to {scheduled_by}; trying again: {failure}"
                    );
                    let next =
                        now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
                    index.retry_later(&timer.id, next, &format!("{failure} ({})", failure.code()))
                }
            }
        }
        Err(e) => {
            let wait = backoff(timer.attempts);
            tracing::warn!(
                code = e.code(),
                attempts = timer.attempts + 1,
                retry_in_ms = wait.as_millis() as u64,
                "timer's command could not run; trying again later: {e}"
            );
            let next = now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
            index.retry_later(&timer.id, next, &format!("{} ({})", e, e.code()))
        }
    };
    if let Err(e) = recorded {
        // The timer stays due: it is sent again, and its message id makes
        // that harmless.
        tracing::error!("timers: {e}");
    }
}

/// Hands a refused command back to the aggregate that scheduled it, when
/// that is a process manager that asks for refusals (`on-refused`), with
/// the message id `refused-<timer id>`. An error only when the refusal
/// could not be delivered for now.
async fn report_refusal(
    aggregates: &Aggregates,
    timer: &PendingTimer,
    refused: &CommandError,
) -> Result<(), CommandError> {
    let Some(command) = aggregates
        .plugins()
        .get(&timer.scheduled_by.aggregate_type)
        .and_then(|p| p.info.process.as_ref()?.on_refused.clone())
    else {
        return Ok(());
    };
    let payload = serde_json::json!({
        "refusal": {
            "key": timer.key,
            "target": timer.target,
            "command": timer.command,
            "data": timer.data,
            "code": refused.code(),
            "message": refused.to_string(),
        }
    });
    let req = CommandRequest {
        aggregate_type: timer.scheduled_by.aggregate_type.clone(),
        aggregate_id: timer.scheduled_by.id.clone(),
        command,
        data: serde_json::to_vec(&payload).unwrap_or_else(|_| b"{}".to_vec()),
        idempotency_key: Some(format!("refused-{}", timer.id)),
        correlation_id: Some(timer.correlation_id.clone()),
        causation_id: Some(timer.scheduled_in.clone()),
        ..CommandRequest::default()
    };
    match aggregates.execute(req).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_refusal() => {
            tracing::info!(
                code = e.code(),
                "the process manager refused the refusal: {e}"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The wait before attempt `attempts + 2`: 1 s, doubling, at most 5 min.
fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32.checked_shl(attempts.min(16)).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fired_timer_is_read_from_event_metadata() {
        let md = br#"{"$causationId":"c","messageId":"timer-x","timer":{"id":"t-1","key":"k","due":"2026-01-01T00:00:00.000Z","late":false,"scheduledBy":"order/o1"},"timestamp":"x"}"#;
        assert_eq!(fired_timer(md), Some("t-1".to_string()));
        assert_eq!(fired_timer(br#"{"messageId":"m"}"#), None);
        assert_eq!(fired_timer(b"not json \"timer\":{"), None);
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(9), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
