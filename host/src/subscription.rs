//! Following the event log: every event in global order from a starting
//! position (catch-up), then new events as they are committed (live), for
//! the HTTP (server-sent events) and gRPC subscriptions.
//!
//! A subscription is one task that reads the store's global order a page at
//! a time ([`EventStore::read_all`]) into a bounded buffer that the API
//! drains towards the client. Catch-up and live are the same loop: once a
//! read comes back short, the task waits for the store's commit signal (or
//! polls, for a store that has none) and reads again from the next
//! position. So there is no switch-over where an event could be missed or
//! sent twice, and positions only ever go up.
//!
//! Memory is bounded per subscriber: the task reads only when the buffer
//! has room, so a slow client slows its own reads (backpressure), never the
//! writers. A client that leaves the buffer full for longer than
//! [`SubscriptionConfig::slow_timeout`] is disconnected with
//! `subscriber_too_slow`, which says the position to resume from; the
//! events already buffered are delivered before that error, so resuming
//! from it loses and repeats nothing.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;

use crate::error::CommandError;
use crate::plugin::{is_valid_name, is_valid_stream_prefix};
use crate::store::{EventStore, RecordedEvent};

/// Events read from the store per page.
const PAGE: usize = 512;

/// How often a live subscription re-reads a store that has no commit signal
/// (KurrentDB, which other hosts may write to).
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long a live subscription trusts the commit signal before reading
/// anyway; a safety net, not the normal path.
const SIGNAL_SAFETY_NET: Duration = Duration::from_secs(5);

/// Limits for subscriptions.
#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    /// Events read ahead for one subscriber, at most.
    pub buffer: usize,
    /// How long a subscriber may leave its buffer full before it is
    /// disconnected with `subscriber_too_slow`.
    pub slow_timeout: Duration,
    /// Subscriptions open at once, at most; more get `overloaded`.
    pub max_subscriptions: usize,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            buffer: 1024,
            slow_timeout: Duration::from_secs(30),
            max_subscriptions: 256,
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// From the first event in the store.
    Beginning,
    /// After the last event stored when the subscription starts.
    End,
    /// From this global position, inclusive.
    Position(u64),
}

/// Which events a subscription delivers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    categories: Vec<String>,
    event_types: Vec<String>,
}

impl Filter {
    /// Events of streams in `categories` (stream prefixes; empty: all) and
    /// of `event_types` (empty: all). Fails on a name that no plugin could
    /// have declared, so that a typo is an error, not a silent nothing.
    pub fn new(categories: Vec<String>, event_types: Vec<String>) -> Result<Self, CommandError> {
        if let Some(bad) = categories.iter().find(|c| !is_valid_stream_prefix(c)) {
            return Err(CommandError::MalformedRequest(format!(
                "{bad:?} is not a category: use a stream prefix as plugins declare it \
                 (GET /v1/plugins shows each plugin's stream_prefix), for example bank_account"
            )));
        }
        if let Some(bad) = event_types.iter().find(|t| !is_valid_name(t)) {
            return Err(CommandError::MalformedRequest(format!(
                "{bad:?} is not an event type name (1-64 ASCII letters, digits, '-', '_' or '.')"
            )));
        }
        Ok(Filter {
            categories,
            event_types,
        })
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        let in_category = self.categories.is_empty()
            || self.categories.iter().any(|c| {
                event.stream.len() > c.len()
                    && event.stream.starts_with(c.as_str())
                    && event.stream.as_bytes()[c.len()] == b'-'
            });
        in_category && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
    }
}

/// One message of a subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An event, in global order.
    Event(RecordedEvent),
    /// Sent once: everything stored when the subscription started has been
    /// delivered; from here on it is live. `position` is the last global
    /// position looked at.
    CaughtUp {
        /// The last position looked at.
        position: u64,
    },
}

/// Opens subscriptions on one store, within the configured limits.
#[derive(Clone)]
pub struct Subscriptions {
    store: Arc<dyn EventStore>,
    config: SubscriptionConfig,
    open: Arc<Semaphore>,
    /// Set once the host shuts down: every subscription ends, so that the
    /// servers' graceful shutdown does not wait for endless streams.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// Each open subscription's lag, for the metrics.
    lags: Arc<Mutex<Vec<std::sync::Weak<Lag>>>>,
}

/// How far behind the log one subscription is: since when it has had
/// events to read or deliver without a pause (0: it has read everything
/// and waits for commits). Milliseconds since `base` (its start), plus one.
#[derive(Debug)]
struct Lag {
    base: std::time::Instant,
    behind_since: std::sync::atomic::AtomicU64,
}

impl Lag {
    fn new() -> Self {
        let lag = Lag {
            base: std::time::Instant::now(),
            behind_since: std::sync::atomic::AtomicU64::new(0),
        };
        lag.behind();
        lag
    }

    /// It has events to read or deliver; the clock runs from the first.
    fn behind(&self) {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let _ = self.behind_since.compare_exchange(
            0,
            now,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
    }

    /// It has read everything stored and waits for a commit.
    fn live(&self) {
        self.behind_since
            .store(0, std::sync::atomic::Ordering::Release);
    }

    fn seconds(&self) -> f64 {
        match self.behind_since.load(std::sync::atomic::Ordering::Acquire) {
            0 => 0.0,
            since => {
                let now = self.base.elapsed().as_millis() as u64 + 1;
                now.saturating_sub(since) as f64 / 1000.0
            }
        }
    }
}

impl Subscriptions {
    /// The largest lag of the open subscriptions, in seconds: how long the
    /// one furthest behind has had events to read or deliver without
    /// catching up (0 when every subscription waits for new commits).
    pub fn max_lag_seconds(&self) -> f64 {
        let Ok(mut lags) = self.lags.lock() else {
            return 0.0;
        };
        lags.retain(|l| l.strong_count() > 0);
        lags.iter()
            .filter_map(std::sync::Weak::upgrade)
            .map(|l| l.seconds())
            .fold(0.0, f64::max)
    }

    /// How many subscriptions are open now.
    pub fn open_count(&self) -> usize {
        self.config
            .max_subscriptions
            .saturating_sub(self.open.available_permits())
    }

    /// Subscriptions on `store`.
    pub fn new(store: Arc<dyn EventStore>, config: SubscriptionConfig) -> Self {
        let open = Arc::new(Semaphore::new(config.max_subscriptions));
        Subscriptions {
            store,
            config,
            open,
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
            lags: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Ends every subscription, now and to come, with `shutting_down`
    /// (which says where to resume).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// The limits in force.
    pub fn config(&self) -> &SubscriptionConfig {
        &self.config
    }

    /// Starts a subscription. [`Start::End`] is resolved now: the
    /// subscription delivers events committed after this returns (and
    /// possibly some committed while it runs).
    pub async fn subscribe(
        &self,
        start: Start,
        filter: Filter,
    ) -> Result<Subscription, CommandError> {
        let permit = self.open.clone().try_acquire_owned().map_err(|_| {
            CommandError::Overloaded(format!(
                "{} subscriptions are open, the most this host allows (--max-subscriptions)",
                self.config.max_subscriptions
            ))
        })?;
        // `looked_at`: the position the subscription has covered before
        // reading anything, never past the store's head, so that a
        // `caught_up` right away does not claim positions not yet written.
        let (from, looked_at) = match start {
            Start::Beginning => (1, 0),
            Start::Position(p) => {
                let head = self.store.head_position().await?;
                (p.max(1), (p.max(1) - 1).min(head))
            }
            Start::End => {
                let head = self.store.head_position().await?;
                (head + 1, head)
            }
        };
        let (tx, rx) = mpsc::channel(self.config.buffer.max(1));
        let end = Arc::new(Mutex::new(None));
        let lag = Arc::new(Lag::new());
        if let Ok(mut lags) = self.lags.lock() {
            lags.retain(|l| l.strong_count() > 0);
            lags.push(Arc::downgrade(&lag));
        }
        let task = tokio::spawn(follow(
            self.store.clone(),
            (from, looked_at),
            filter,
            Limits {
                slow_timeout: self.config.slow_timeout,
                closing: self.closing.subscribe(),
                lag,
            },
            tx,
            end.clone(),
            permit,
        ));
        tracing::debug!(from, "subscription started");
        Ok(Subscription { rx, end, task })
    }
}

/// A running subscription: a [`Stream`] of items. Dropping it stops it.
pub struct Subscription {
    rx: mpsc::Receiver<Item>,
    end: Arc<Mutex<Option<CommandError>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// The next item; `Some(Err(_))` once, with the reason, when the
    /// subscription ended on an error (after every item buffered before
    /// it); `None` after that.
    pub async fn next(&mut self) -> Option<Result<Item, CommandError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for Subscription {
    type Item = Result<Item, CommandError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(None) => {
                Poll::Ready(self.end.lock().ok().and_then(|mut e| e.take()).map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The subscription's task: reads pages from `next` on, forever, until the
/// subscriber goes away or an error ends it (recorded in `end`).
async fn follow(
    store: Arc<dyn EventStore>,
    from: (u64, u64),
    filter: Filter,
    mut limits: Limits,
    tx: mpsc::Sender<Item>,
    end: Arc<Mutex<Option<CommandError>>>,
    _permit: OwnedSemaphorePermit,
) {
    if let Err(e) = read_on(&*store, from, &filter, &mut limits, &tx).await {
        tracing::info!(code = e.code(), "subscription ended: {e}");
        if let Ok(mut slot) = end.lock() {
            *slot = Some(e);
        }
    }
    // Dropping `tx` here lets the subscriber drain what is buffered, then
    // see the end.
}

/// What ends a subscription besides its subscriber leaving.
struct Limits {
    slow_timeout: Duration,
    closing: tokio::sync::watch::Receiver<bool>,
    /// This subscription's lag, which the metrics read.
    lag: Arc<Lag>,
}

/// The loop of [`follow`]; `Ok` when the subscriber left.
async fn read_on(
    store: &dyn EventStore,
    (mut next, mut looked_at): (u64, u64),
    filter: &Filter,
    limits: &mut Limits,
    tx: &mpsc::Sender<Item>,
) -> Result<(), CommandError> {
    let mut signal = store.commit_signal();
    let mut caught_up = false;
    loop {
        // Mark the signal seen *before* reading: a commit after this point
        // changes it again, so the wait below cannot miss it.
        if let Some(s) = signal.as_mut() {
            s.borrow_and_update();
        }
        let page = store.read_all(next, PAGE).await?;
        let full = page.len() == PAGE;
        if !page.is_empty() {
            limits.lag.behind();
        }
        for event in page {
            let position = event.position;
            if filter.matches(&event) && !deliver(tx, Item::Event(event), limits, position).await? {
                return Ok(());
            }
            next = position + 1;
            looked_at = position;
        }
        if full {
            continue;
        }
        if !caught_up {
            caught_up = true;
            let item = Item::CaughtUp {
                position: looked_at,
            };
            if !deliver(tx, item, limits, next).await? {
                return Ok(());
            }
        }
        if *limits.closing.borrow() {
            return Err(CommandError::ShuttingDown { resume_from: next });
        }
        // Everything stored is read and in the buffer.
        limits.lag.live();
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            _ = limits.closing.changed() => {}
            _ = wait_for_commit(&mut signal) => {}
        }
    }
}

/// Puts `item` in the buffer, waiting up to `slow_timeout` for room.
/// `Ok(false)`: the subscriber is gone. `resume_from` is the position the
/// subscriber should resume from if this fails.
async fn deliver(
    tx: &mpsc::Sender<Item>,
    item: Item,
    limits: &mut Limits,
    resume_from: u64,
) -> Result<bool, CommandError> {
    if *limits.closing.borrow() {
        return Err(CommandError::ShuttingDown { resume_from });
    }
    tokio::select! {
        sent = tokio::time::timeout(limits.slow_timeout, tx.send(item)) => match sent {
            Ok(Ok(())) => Ok(true),
            Ok(Err(_)) => Ok(false),
            Err(_) => Err(CommandError::SubscriberTooSlow {
                buffer: tx.max_capacity(),
                waited: limits.slow_timeout,
                resume_from,
            }),
        },
        _ = limits.closing.changed() => Err(CommandError::ShuttingDown { resume_from }),
    }
}

/// Waits until the store may have committed something new.
async fn wait_for_commit(signal: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match signal {
        Some(s) => {
            match tokio::time::timeout(SIGNAL_SAFETY_NET, s.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                // The store is closing: stop trusting the signal, poll.
                Ok(Err(_)) => {
                    *signal = None;
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        }
        None => tokio::time::sleep(POLL_INTERVAL).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{EventData, ExpectedVersion};
    use uuid::Uuid;

    fn event(event_type: &str) -> EventData {
        EventData {
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            data: b"{}".to_vec(),
            metadata: b"{}".to_vec(),
            message_id: Uuid::new_v4().to_string(),
        }
    }

    async fn append(store: &dyn EventStore, stream: &str, types: &[&str]) {
        store
            .append(
                stream,
                ExpectedVersion::Any,
                types.iter().map(|t| event(t)).collect(),
            )
            .await
            .expect("append");
    }

    async fn next_event(sub: &mut Subscription) -> RecordedEvent {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Ok(Item::Event(e)))) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    async fn caught_up(sub: &mut Subscription) -> u64 {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Ok(Item::CaughtUp { position }))) => position,
            other => panic!("expected caught-up, got {other:?}"),
        }
    }

    fn config(buffer: usize, slow_timeout: Duration) -> SubscriptionConfig {
        SubscriptionConfig {
            buffer,
            slow_timeout,
            max_subscriptions: 2,
        }
    }

    #[test]
    fn categories_match_whole_prefixes_only() {
        let f = Filter::new(vec!["bank".into()], vec![]).unwrap();
        let mut e = RecordedEvent {
            stream: "bank-1".into(),
            version: 1,
            position: 1,
            event_id: Uuid::nil(),
            event_type: "Opened".into(),
            data: vec![],
            metadata: vec![],
            message_id: String::new(),
        };
        assert!(f.matches(&e));
        e.stream = "bank_account-1".into();
        assert!(!f.matches(&e), "bank is not bank_account");
        e.stream = "bank".into();
        assert!(!f.matches(&e));
        assert_eq!(
            Filter::new(vec!["no-dash".into()], vec![])
                .unwrap_err()
                .code(),
            "malformed_request"
        );
        assert_eq!(
            Filter::new(vec![], vec!["bad type!".into()])
                .unwrap_err()
                .code(),
            "malformed_request"
        );
    }

    #[tokio::test]
    async fn catches_up_then_goes_live_with_filters() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        append(&*store, "bank-1", &["Opened", "Deposited"]).await;
        append(&*store, "users-1", &["Registered"]).await;
        let subs = Subscriptions::new(store.clone(), SubscriptionConfig::default());
        let filter = Filter::new(vec!["bank".into()], vec!["Deposited".into()]).unwrap();
        let mut sub = subs.subscribe(Start::Beginning, filter).await.unwrap();
        let e = next_event(&mut sub).await;
        assert_eq!((e.stream.as_str(), e.position), ("bank-1", 2));
        assert_eq!(caught_up(&mut sub).await, 3);
        append(&*store, "users-1", &["Deposited"]).await;
        append(&*store, "bank-2", &["Opened", "Deposited"]).await;
        let e = next_event(&mut sub).await;
        assert_eq!((e.stream.as_str(), e.position), ("bank-2", 6));
    }

    /// A store without a commit signal, as KurrentDB is (other hosts
    /// write to it): a test double over the memory store.
    struct NoSignal(MemoryStore);

    #[async_trait::async_trait]
    impl EventStore for NoSignal {
        async fn append(
            &self,
            stream: &str,
            expected: ExpectedVersion,
            events: Vec<EventData>,
        ) -> Result<crate::store::AppendResult, crate::store::StoreError> {
            self.0.append(stream, expected, events).await
        }
        async fn read_stream(
            &self,
            stream: &str,
            from: u64,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>, crate::store::StoreError> {
            self.0.read_stream(stream, from, limit).await
        }
        async fn stream_version(&self, stream: &str) -> Result<u64, crate::store::StoreError> {
            self.0.stream_version(stream).await
        }
        async fn read_all(
            &self,
            from: u64,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>, crate::store::StoreError> {
            self.0.read_all(from, limit).await
        }
        async fn find_command_events(
            &self,
            stream: &str,
            first_event_id: uuid::Uuid,
        ) -> Result<Vec<RecordedEvent>, crate::store::StoreError> {
            self.0.find_command_events(stream, first_event_id).await
        }
        async fn head_position(&self) -> Result<u64, crate::store::StoreError> {
            self.0.head_position().await
        }
        async fn save_snapshot(
            &self,
            snapshot: &crate::store::Snapshot,
        ) -> Result<(), crate::store::StoreError> {
            self.0.save_snapshot(snapshot).await
        }
        async fn load_snapshot(
            &self,
            stream: &str,
        ) -> Result<Option<crate::store::Snapshot>, crate::store::StoreError> {
            self.0.load_snapshot(stream).await
        }
        fn describe(&self) -> String {
            "memory store without a commit signal (test double)".into()
        }
    }

    #[tokio::test]
    async fn a_store_without_a_commit_signal_is_polled() {
        let store: Arc<dyn EventStore> = Arc::new(NoSignal(MemoryStore::new()));
        assert!(store.commit_signal().is_none());
        let subs = Subscriptions::new(store.clone(), SubscriptionConfig::default());
        let mut sub = subs
            .subscribe(Start::Beginning, Filter::default())
            .await
            .unwrap();
        assert_eq!(caught_up(&mut sub).await, 0);
        append(&*store, "bank-1", &["Opened", "Deposited"]).await;
        assert_eq!(next_event(&mut sub).await.position, 1);
        assert_eq!(next_event(&mut sub).await.position, 2);
    }

    #[tokio::test]
    async fn from_end_skips_what_is_stored() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        append(&*store, "bank-1", &["Opened"]).await;
        let subs = Subscriptions::new(store.clone(), SubscriptionConfig::default());
        let mut sub = subs.subscribe(Start::End, Filter::default()).await.unwrap();
        assert_eq!(caught_up(&mut sub).await, 1);
        append(&*store, "bank-1", &["Deposited"]).await;
        assert_eq!(next_event(&mut sub).await.position, 2);
    }

    #[tokio::test]
    async fn caught_up_never_claims_positions_not_yet_written() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        append(&*store, "bank-1", &["Opened"]).await;
        let subs = Subscriptions::new(store.clone(), SubscriptionConfig::default());
        let mut sub = subs
            .subscribe(Start::Position(1000), Filter::default())
            .await
            .unwrap();
        assert_eq!(caught_up(&mut sub).await, 1, "the head, not 999");
        let mut sub = subs
            .subscribe(
                Start::Position(1),
                Filter::new(vec!["other".into()], vec![]).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            caught_up(&mut sub).await,
            1,
            "looked at, though filtered out"
        );
    }

    #[tokio::test]
    async fn a_subscriber_that_stops_reading_is_cut_off_and_resumes_exactly() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        for _ in 0..10 {
            append(&*store, "bank-1", &["Deposited"; 10]).await;
        }
        let subs = Subscriptions::new(store.clone(), config(8, Duration::from_millis(200)));
        let mut sub = subs
            .subscribe(Start::Beginning, Filter::default())
            .await
            .unwrap();
        // Read nothing until the task has given up on this subscriber.
        while !sub.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut seen = Vec::new();
        let resume_from = loop {
            match sub.next().await {
                Some(Ok(Item::Event(e))) => seen.push(e.position),
                Some(Err(CommandError::SubscriberTooSlow { resume_from, .. })) => {
                    break resume_from;
                }
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(seen, (1..=8).collect::<Vec<_>>(), "the buffer, in order");
        assert_eq!(resume_from, 9);
        assert!(sub.next().await.is_none());
        drop(sub);

        let mut again = subs
            .subscribe(Start::Position(resume_from), Filter::default())
            .await
            .unwrap();
        for expected in 9..=100 {
            assert_eq!(next_event(&mut again).await.position, expected);
        }
        assert_eq!(caught_up(&mut again).await, 100);
    }

    /// A subscriber that does not read has a lag that grows; once it has
    /// read everything and the task waits for commits, the lag is 0.
    #[tokio::test]
    async fn the_lag_grows_while_a_subscriber_is_behind_and_is_0_once_live() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        for _ in 0..5 {
            append(&*store, "bank-1", &["Deposited"; 10]).await;
        }
        let subs = Subscriptions::new(store.clone(), config(4, Duration::from_secs(60)));
        assert_eq!(subs.max_lag_seconds(), 0.0, "no subscription, no lag");
        let mut sub = subs
            .subscribe(Start::Beginning, Filter::default())
            .await
            .unwrap();
        // Not reading: the task waits for room with 46 events to go.
        let started = std::time::Instant::now();
        while subs.max_lag_seconds() < 0.05 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the lag never grew"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for expected in 1..=50 {
            assert_eq!(next_event(&mut sub).await.position, expected);
        }
        assert_eq!(caught_up(&mut sub).await, 50);
        // Live now: the task has read everything and waits.
        let started = std::time::Instant::now();
        while subs.max_lag_seconds() > 0.0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the lag stayed above 0 though the subscription is live"
            );
            tokio::task::yield_now().await;
        }
        drop(sub);
    }

    #[tokio::test]
    async fn closing_ends_live_subscriptions_with_where_to_resume() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        append(&*store, "bank-1", &["Opened", "Deposited"]).await;
        let subs = Subscriptions::new(store, SubscriptionConfig::default());
        let mut sub = subs
            .subscribe(Start::Beginning, Filter::default())
            .await
            .unwrap();
        next_event(&mut sub).await;
        next_event(&mut sub).await;
        caught_up(&mut sub).await;
        subs.close();
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Err(CommandError::ShuttingDown { resume_from: 3 }))) => {}
            other => panic!("expected shutting_down, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn open_subscriptions_are_limited() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        let subs = Subscriptions::new(store, config(8, Duration::from_secs(5)));
        let a = subs.subscribe(Start::End, Filter::default()).await.unwrap();
        let _b = subs.subscribe(Start::End, Filter::default()).await.unwrap();
        let refused = subs.subscribe(Start::End, Filter::default()).await;
        assert_eq!(refused.err().map(|e| e.code()), Some("overloaded"));
        drop(a);
        // The permit is released when the task notices its subscriber left.
        let mut reopened = None;
        for _ in 0..100 {
            if let Ok(s) = subs.subscribe(Start::End, Filter::default()).await {
                reopened = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(reopened.is_some(), "a closed subscription frees its slot");
    }
}
