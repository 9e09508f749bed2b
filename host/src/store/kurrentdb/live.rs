//! Following `$all` live: a resumable subscription
//! ([`KurrentDbStore::subscribe`]) that survives reconnects and failovers,
//! and the store's commit signal, which one such subscription drives.
//!
//! **The commit signal.** Other hosts write to the cluster too, so only the
//! cluster can say when something was committed. The first call of
//! [`EventStore::commit_signal`] starts one task per store that subscribes
//! to `$all` from its end and bumps the signal on every event that appears
//! (from any host), so the host's subscriptions (`subscription.rs`) wake at
//! once instead of polling `read_all`. The subscription only wakes them; they
//! still read `$all` from their own positions, so nothing depends on it
//! delivering every event. When it breaks, the task bumps the signal every
//! [`POLL_WHILE_DEAF`] (subscriptions poll) while it resubscribes with
//! back-off, through a freshly built client (a fresh discovery, which finds
//! a new leader), and bumps once more when it is back.

use tokio::sync::watch;

use super::wire::{convert, rehydra_position};
use super::*;

/// How often subscriptions are woken while the live subscription to `$all`
/// is down.
pub const POLL_WHILE_DEAF: Duration = Duration::from_millis(200);
/// The longest pause between attempts to resubscribe.
const RESUBSCRIBE_MAX_WAIT: Duration = Duration::from_secs(5);

/// The commit signal and the task that drives it, started on first use.
pub(super) struct LiveSignal {
    signal: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LiveSignal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KurrentDbStore {
    /// The commit signal, starting the task that drives it on first use.
    pub(super) fn live_signal(&self) -> watch::Receiver<u64> {
        self.live
            .get_or_init(|| {
                let (signal, _) = watch::channel(0);
                let task = tokio::spawn(drive_signal(
                    self.settings.clone(),
                    self.conn().client.clone(),
                    signal.clone(),
                    self.resilience.first_backoff,
                    self.described.clone(),
                ));
                LiveSignal { signal, task }
            })
            .signal
            .subscribe()
    }
}

/// Bumps `signal` for every event appended to the cluster; see the module
/// docs.
async fn drive_signal(
    settings: ClientSettings,
    mut client: Client,
    signal: watch::Sender<u64>,
    first_backoff: Duration,
    described: String,
) {
    let bump = || signal.send_modify(|n| *n = n.wrapping_add(1));
    let mut wait = first_backoff;
    let mut was_live = true;
    loop {
        let options = SubscribeToAllOptions::default().position(StreamPosition::End);
        let mut subscription = client.subscribe_to_all(&options).await;
        let mut confirmed = false;
        let error = loop {
            match subscription.next_subscription_event().await {
                Ok(SubscriptionEvent::EventAppeared(e)) => {
                    if holds_events(e.get_original_event().stream_id()) {
                        bump();
                    }
                }
                Ok(SubscriptionEvent::Confirmed(_)) => {
                    confirmed = true;
                    wait = first_backoff;
                    if !was_live {
                        tracing::info!(store = %described, "live subscription to $all is back");
                        was_live = true;
                    }
                    // Whatever was committed while nobody listened.
                    bump();
                }
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        if was_live {
            tracing::warn!(
                store = %described, error = %error, confirmed,
                "the live subscription to $all broke; subscriptions poll every {} ms until it is back",
                POLL_WHILE_DEAF.as_millis()
            );
            was_live = false;
        }
        let until = Instant::now() + wait;
        while Instant::now() < until {
            bump();
            tokio::time::sleep(POLL_WHILE_DEAF).await;
        }
        wait = (wait * 2).min(RESUBSCRIBE_MAX_WAIT);
        if let Ok(fresh) = Client::new(settings.clone()) {
            client = fresh;
        }
    }
}

impl KurrentDbStore {
    /// Follows `$all` from Rehydra position `from` (inclusive): first the
    /// stored events, then new ones as they are committed, for streams whose
    /// names start with one of `prefixes` (all non-system streams if empty).
    ///
    /// Uses KurrentDB's `subscribe_to_all` with a stream-prefix filter. When
    /// the connection drops it resubscribes from the last position it
    /// delivered, so no event is lost or repeated. The receiver gets an
    /// error, and nothing more, if the store stays unreachable for longer
    /// than the retry budget. Dropping the receiver ends the subscription.
    pub fn subscribe(
        self: &Arc<Self>,
        from: u64,
        prefixes: Vec<String>,
    ) -> mpsc::Receiver<Result<RecordedEvent, StoreError>> {
        let (tx, rx) = mpsc::channel(256);
        let store = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = store.follow(from, &prefixes, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    async fn follow(
        &self,
        from: u64,
        prefixes: &[String],
        tx: &mpsc::Sender<Result<RecordedEvent, StoreError>>,
    ) -> Result<(), StoreError> {
        // Catch up by reading, to learn a record position to subscribe from.
        let mut next = from.max(1);
        let mut resume: Option<Position> = None;
        loop {
            let (page, last) = self.read_all_from(next, PAGE, prefixes).await?;
            if let Some(p) = last {
                resume = Some(p);
                next = rehydra_position(p) + 1;
            }
            let done = page.len() < PAGE;
            for e in page {
                if tx.send(Ok(e)).await.is_err() {
                    return Ok(());
                }
            }
            if done {
                break;
            }
        }
        if resume.is_none() {
            resume = self.last_position().await?;
        }
        // Then live, resubscribing after every drop.
        let mut failing_since: Option<Instant> = None;
        loop {
            let client = self.conn().client.clone();
            let mut options = SubscribeToAllOptions::default().position(match resume {
                Some(p) => StreamPosition::Position(p),
                None => StreamPosition::Start,
            });
            let mut filter = SubscriptionFilter::on_stream_name();
            for p in prefixes {
                filter = filter.add_prefix(p);
            }
            if !prefixes.is_empty() {
                options = options.filter(filter);
            }
            let mut sub = client.subscribe_to_all(&options).await;
            let error = loop {
                match sub.next_subscription_event().await {
                    Ok(SubscriptionEvent::EventAppeared(e)) => {
                        failing_since = None;
                        let e = e.get_original_event();
                        resume = Some(e.position);
                        if rehydra_position(e.position) < next || !holds_events(e.stream_id()) {
                            continue;
                        }
                        if tx.send(Ok(convert(e)?)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(SubscriptionEvent::Checkpoint(p)) => resume = Some(p),
                    Ok(_) => failing_since = None,
                    Err(e) => break e,
                }
            };
            let since = *failing_since.get_or_insert_with(Instant::now);
            let generation = self.conn().generation;
            let message = error.to_string();
            self.note_failure(generation, &message, true);
            if since.elapsed() > self.resilience.budget {
                return Err(StoreError::Unavailable(format!(
                    "the subscription to KurrentDB ({}) could not be resumed within {:?}: {message}",
                    self.described, self.resilience.budget
                )));
            }
            tokio::time::sleep(self.resilience.first_backoff * 5).await;
        }
    }
}
