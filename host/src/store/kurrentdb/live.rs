//! Following `$all` live: a resumable subscription
//! ([`KurrentDbStore::subscribe`]) that survives reconnects and failovers.

use super::wire::{convert, rehydra_position};
use super::*;

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
                        if rehydra_position(e.position) < next || e.stream_id().starts_with('$') {
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
