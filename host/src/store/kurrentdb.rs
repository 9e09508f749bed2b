//! The KurrentDB / EventStoreDB backend (`kurrentdb://`, `esdb://`,
//! `kurrentdb+discover://`, `esdb+discover://`), over gRPC with the official
//! `kurrentdb` client.
//!
//! This file holds the store and its retries; `kurrentdb/wire.rs` the
//! mapping below (positions, revisions, metadata, error classes), and
//! `kurrentdb/live.rs` following `$all` live (the resumable follower, and
//! the commit signal that wakes subscriptions on every host's appends).
//!
//! **Mapping.** A Rehydra stream is a KurrentDB stream of the same name
//! (`<prefix>-<id>`, so `$ce-<prefix>` category streams work). Version `v`
//! is revision `v - 1`; expected version 0 is `NoStream`. A global position
//! is KurrentDB's commit position + 1 (Rehydra positions are 1-based). Data
//! goes as-is, marked `application/json` when it is JSON without surrounding
//! whitespace (so it reads back byte for byte). The event's metadata is the
//! KurrentDB *custom metadata*, written as-is when it is a JSON object
//! carrying the event's `messageId`; otherwise it is wrapped in one that
//! does, so that the message id and the original bytes both come back.
//!
//! **Resilience the client lacks.** The `kurrentdb` client does not retry a
//! failed call, and after a node dies it keeps dialling the same endpoint
//! (only `NotLeader` moves it); once its discovery fails it is closed for
//! good. So every operation here runs under [`Resilience`]: transient
//! failures (unavailable, deadline, not-leader, a reset connection) are
//! retried with exponential backoff and jitter, appends always with the
//! same event ids and expected revision, so the server recognises a retry
//! of an append that did commit; after a closed connection, a timeout, or
//! repeated failures on one connection the client is rebuilt, which runs a
//! fresh gossip discovery. When the time budget is spent the operation
//! fails with [`StoreError::Unavailable`] — it never hangs.
//!
//! **Idempotency.** KurrentDB recognises a retried append by its event ids
//! when the expectation is the original one (or `Any`, from its bounded
//! id cache). An append whose expected version is *ahead* of the stream
//! is also looked up here by its first event id, so a retry with a stale
//! expectation gets the original result as the [`EventStore`] contract
//! says. A retry whose expected version is *behind* the stream and does not
//! point at its own events is a conflict, as in KurrentDB.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use kurrentdb::{
    AppendToStreamOptions, Client, ClientSettings, CurrentRevision, Position, ReadAllOptions,
    ReadStreamOptions, StreamPosition, StreamState, SubscribeToAllOptions, SubscriptionEvent,
    SubscriptionFilter,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{AppendResult, EventData, EventStore, ExpectedVersion, RecordedEvent, StoreError};

mod live;
mod snapshot;
mod wire;

use wire::{
    InvalidPosition, at, classify, convert, is_invalid_position, rehydra_position, stream_state,
    to_wire,
};

/// Whether `stream`'s records are Rehydra events: not one of KurrentDB's
/// system streams (`$…`) nor a snapshot stream. Every read and subscription
/// of `$all` keeps only these.
fn holds_events(stream: &str) -> bool {
    !stream.starts_with('$') && !snapshot::is_snapshot_stream(stream)
}

/// How long and how hard the backend keeps trying.
#[derive(Debug, Clone)]
pub struct Resilience {
    /// Total time one operation may take, retries included, before it fails
    /// with `store_unavailable`.
    pub budget: Duration,
    /// Time one attempt may take before it is abandoned (and the connection
    /// rebuilt).
    pub attempt_timeout: Duration,
    /// The first pause between attempts; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
    /// Consecutive transient failures on one connection after which the
    /// client is rebuilt (fresh discovery).
    pub rebuild_after: u32,
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience {
            budget: Duration::from_secs(8),
            attempt_timeout: Duration::from_secs(4),
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(800),
            rebuild_after: 2,
        }
    }
}

/// Events per page when the backend reads a stream or `$all` in pages.
const PAGE: usize = 1000;

/// Keys of the wrapper used when an event's metadata cannot carry its
/// message id itself.
const WRAPPED_UTF8: &str = "$rehydraMetadata";
const WRAPPED_HEX: &str = "$rehydraMetadataHex";

/// The current client and how it has been doing.
#[derive(Clone)]
struct Conn {
    client: Client,
    generation: u64,
    failures: u32,
}

/// The store's last known state, for `/healthz`.
#[derive(Debug, Clone, Default)]
struct Health {
    last_error: Option<String>,
    rebuilds: u64,
}

/// The KurrentDB backend. See the module docs.
pub struct KurrentDbStore {
    settings: ClientSettings,
    described: String,
    resilience: Resilience,
    conn: Mutex<Conn>,
    health: Mutex<Health>,
    /// The commit signal, driven by a live subscription to `$all`
    /// (`live.rs`), started on first use.
    live: std::sync::OnceLock<live::LiveSignal>,
}

impl std::fmt::Debug for KurrentDbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KurrentDbStore")
            .field("at", &self.described)
            .finish()
    }
}

/// One record of a `$all` page: its position, and the event unless it
/// belongs to a system stream (`$…`).
struct AllRecord {
    position: Position,
    event: Option<RecordedEvent>,
}

/// What one append attempt ended with.
enum Appended {
    Written(kurrentdb::WriteResult),
    Conflict(CurrentRevision),
}

/// Why one attempt failed.
enum Failure {
    /// Worth another attempt; `rebuild` asks for a fresh connection first.
    Transient { message: String, rebuild: bool },
    /// Retrying will not help.
    Fatal(StoreError),
}

/// Whether `url` names a KurrentDB store.
pub fn is_kurrentdb_url(url: &str) -> bool {
    [
        "kurrentdb://",
        "kurrentdb+discover://",
        "esdb://",
        "esdb+discover://",
        "kurrent://",
        "kurrent+discover://",
    ]
    .iter()
    .any(|scheme| url.starts_with(scheme))
}

impl KurrentDbStore {
    /// Connects to the store named by `url` (a KurrentDB connection string)
    /// with the default [`Resilience`]. Fails if the string is malformed;
    /// the cluster itself is dialled on first use.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        Self::open_with(url, Resilience::default()).await
    }

    /// Like [`KurrentDbStore::open`], with explicit retry settings.
    pub async fn open_with(url: &str, resilience: Resilience) -> anyhow::Result<Self> {
        let settings: ClientSettings = url.parse().map_err(|e: kurrentdb::ClientSettingsParseError| {
            anyhow::anyhow!(
                "cannot parse the KurrentDB connection string {}: {}; write it as \
                 kurrentdb://[user:password@]host:port[,host:port...][?tls=false&nodePreference=leader] \
                 or kurrentdb+discover://host:port",
                super::redact_url(url),
                e.message()
            )
        })?;
        let client = Client::new(settings.clone()).map_err(|e| {
            anyhow::anyhow!(
                "cannot create a KurrentDB client for {}: {e}",
                super::redact_url(url)
            )
        })?;
        Ok(KurrentDbStore {
            settings,
            described: format!("kurrentdb {}", super::redact_url(url)),
            resilience,
            conn: Mutex::new(Conn {
                client,
                generation: 0,
                failures: 0,
            }),
            health: Mutex::new(Health::default()),
            live: std::sync::OnceLock::new(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn health_state(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times the client has been rebuilt (fresh discovery).
    pub fn rebuilds(&self) -> u64 {
        self.health_state().rebuilds
    }

    /// Notes a transient failure on connection `generation`; rebuilds the
    /// client if asked to or if that connection keeps failing. Concurrent
    /// callers that saw the same connection fail rebuild it only once.
    fn note_failure(&self, generation: u64, message: &str, rebuild: bool) {
        let mut conn = self.conn();
        if conn.generation != generation {
            return; // Someone already replaced it.
        }
        conn.failures += 1;
        if !(rebuild || conn.failures >= self.resilience.rebuild_after) {
            return;
        }
        match Client::new(self.settings.clone()) {
            Ok(client) => {
                tracing::info!(
                    store = %self.described,
                    "reconnecting to KurrentDB with a fresh discovery after: {message}"
                );
                *conn = Conn {
                    client,
                    generation: generation + 1,
                    failures: 0,
                };
                drop(conn);
                self.health_state().rebuilds += 1;
            }
            Err(e) => {
                tracing::warn!(store = %self.described, "cannot rebuild the KurrentDB client: {e}")
            }
        }
    }

    fn note_success(&self, generation: u64) {
        let mut conn = self.conn();
        if conn.generation == generation {
            conn.failures = 0;
        }
        drop(conn);
        self.health_state().last_error = None;
    }

    /// Runs `op` until it succeeds, fails for good, or the budget is spent.
    async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let deadline = started + self.resilience.budget;
        let mut backoff = self.resilience.first_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (client, generation) = {
                let conn = self.conn();
                (conn.client.clone(), conn.generation)
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = self.resilience.attempt_timeout.min(left);
            let (message, rebuild) = match tokio::time::timeout(limit, op(client)).await {
                Ok(Ok(value)) => {
                    self.note_success(generation);
                    return Ok(value);
                }
                Ok(Err(Failure::Fatal(e))) => return Err(e),
                Ok(Err(Failure::Transient { message, rebuild })) => (message, rebuild),
                Err(_) => (format!("no answer within {limit:?}"), true),
            };
            tracing::debug!(store = %self.described, attempts, "{what} failed, will retry: {message}");
            self.note_failure(generation, &message, rebuild);
            // Full jitter keeps a crowd of retrying actors from moving in step.
            let pause = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            backoff = (backoff * 2).min(self.resilience.max_backoff);
            if Instant::now() + pause >= deadline {
                let text = format!(
                    "KurrentDB ({}) did not complete {what} within {:?} ({attempts} attempts; last error: {message}). \
                     Check that the cluster is running and reachable from this host; a command that failed this way \
                     can be retried safely with the same Idempotency-Key",
                    self.described, self.resilience.budget
                );
                self.health_state().last_error = Some(text.clone());
                return Err(StoreError::Unavailable(text));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Checks, with one quick call and no retries, that the cluster answers.
    /// Used by `/healthz`.
    pub async fn check_health(&self) -> Result<(), StoreError> {
        let client = self.conn().client.clone();
        let options = ReadAllOptions::default()
            .backwards()
            .position(StreamPosition::End)
            .max_count(1)
            .requires_leader(true)
            .deadline(Duration::from_secs(2));
        let attempt = async {
            let mut page = client.read_all(&options).await?;
            page.next().await.map(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "KurrentDB ({}) does not answer: {e}",
                self.described
            ))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "KurrentDB ({}) did not answer within 3s",
                self.described
            ))),
        }
    }

    /// The stream's events from `revision` on (at most `count`), in order.
    async fn read_revisions(
        &self,
        stream: &str,
        revision: u64,
        count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_page(stream, StreamPosition::Position(revision), count, true)
            .await
    }

    /// Up to `count` events of `stream` from `start`, forwards or backwards
    /// (newest first).
    async fn read_page(
        &self,
        stream: &str,
        start: StreamPosition<u64>,
        count: usize,
        forwards: bool,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let deadline = self.resilience.attempt_timeout;
        self.run("a stream read", |client| async move {
            let options = ReadStreamOptions::default()
                .position(start)
                .max_count(count)
                .requires_leader(true)
                .deadline(deadline);
            let options = if forwards {
                options.forwards()
            } else {
                options.backwards()
            };
            let mut read = match client.read_stream(stream, &options).await {
                Ok(read) => read,
                Err(kurrentdb::Error::ResourceNotFound) => return Ok(Vec::new()),
                Err(e) => return Err(classify(e)),
            };
            let mut out = Vec::new();
            loop {
                match read.next().await {
                    Ok(Some(e)) => out.push(convert(e.get_original_event())?),
                    Ok(None) => return Ok(out),
                    Err(kurrentdb::Error::ResourceNotFound) => return Ok(Vec::new()),
                    Err(e) => return Err(classify(e)),
                }
            }
        })
        .await
    }

    /// The last event of `stream`, if any.
    async fn last_event(&self, stream: &str) -> Result<Option<RecordedEvent>, StoreError> {
        let deadline = self.resilience.attempt_timeout;
        self.run("a stream read", |client| async move {
            let options = ReadStreamOptions::default()
                .backwards()
                .position(StreamPosition::End)
                .max_count(1)
                .requires_leader(true)
                .deadline(deadline);
            let mut read = match client.read_stream(stream, &options).await {
                Ok(read) => read,
                Err(kurrentdb::Error::ResourceNotFound) => return Ok(None),
                Err(e) => return Err(classify(e)),
            };
            match read.next().await {
                Ok(Some(e)) => Ok(Some(convert(e.get_original_event())?)),
                Ok(None) | Err(kurrentdb::Error::ResourceNotFound) => Ok(None),
                Err(e) => Err(classify(e)),
            }
        })
        .await
    }

    /// One page of `$all` from KurrentDB position `from` (inclusive), with an
    /// optional stream-prefix filter. Returns the events and whether the
    /// read reached the end of the log.
    async fn read_all_page(
        &self,
        from: StreamPosition<Position>,
        count: usize,
        prefixes: &[String],
    ) -> Result<Result<Vec<AllRecord>, InvalidPosition>, StoreError> {
        let deadline = self.resilience.attempt_timeout;
        self.run("a read of $all", |client| async move {
            let mut options = ReadAllOptions::default()
                .forwards()
                .position(from)
                .max_count(count)
                .requires_leader(true)
                .deadline(deadline);
            if !prefixes.is_empty() {
                let mut filter = SubscriptionFilter::on_stream_name();
                for p in prefixes {
                    filter = filter.add_prefix(p);
                }
                options = options.filter(filter);
            }
            let mut read = match client.read_all(&options).await {
                Ok(read) => read,
                Err(e) if is_invalid_position(&e) => return Ok(Err(InvalidPosition)),
                Err(e) => return Err(classify(e)),
            };
            let mut out = Vec::new();
            loop {
                match read.next().await {
                    Ok(Some(e)) => {
                        let e = e.get_original_event();
                        let event = if !holds_events(e.stream_id()) {
                            None
                        } else {
                            Some(convert(e)?)
                        };
                        out.push(AllRecord {
                            position: e.position,
                            event,
                        });
                    }
                    Ok(None) => return Ok(Ok(out)),
                    Err(e) if is_invalid_position(&e) => return Ok(Err(InvalidPosition)),
                    Err(e) => return Err(classify(e)),
                }
            }
        })
        .await
    }

    /// Reads `$all` from Rehydra position `from` (inclusive): up to `limit`
    /// events of streams that are not system streams (`$…`) and, if
    /// `prefixes` is not empty, whose names start with one of them. Also
    /// returns the KurrentDB position of the last record looked at.
    async fn read_all_from(
        &self,
        from: u64,
        limit: usize,
        prefixes: &[String],
    ) -> Result<(Vec<RecordedEvent>, Option<Position>), StoreError> {
        let mut out = Vec::new();
        let mut last_seen = None;
        if limit == 0 {
            return Ok((out, last_seen));
        }
        // A Rehydra position p is KurrentDB position p - 1. KurrentDB reads
        // only from the start of a record: p - 1 is one when p came from an
        // event; p - 2 is one when p is an event's position + 1 (the usual
        // "resume after" value). Try the first, then the second.
        let mut start = if from <= 1 {
            StreamPosition::Start
        } else {
            at(from - 1)
        };
        let mut fell_back = false;
        loop {
            let want = (limit - out.len()).saturating_add(1).min(PAGE);
            let page = match self.read_all_page(start, want, prefixes).await? {
                Ok(page) => page,
                Err(InvalidPosition) if !fell_back && from > 2 => {
                    fell_back = true;
                    start = at(from - 2);
                    continue;
                }
                Err(InvalidPosition) => {
                    return Err(StoreError::Unavailable(format!(
                        "KurrentDB refuses to read $all from position {from}: it is neither the position of an \
                         event nor one past it; resume from a position Rehydra returned"
                    )));
                }
            };
            let reached_end = page.len() < want;
            for record in page {
                if rehydra_position(record.position) < from
                    || last_seen.is_some_and(|p: Position| record.position <= p)
                {
                    continue;
                }
                last_seen = Some(record.position);
                let Some(event) = record.event else {
                    continue;
                };
                out.push(event);
                if out.len() == limit {
                    return Ok((out, last_seen));
                }
            }
            match (reached_end, last_seen) {
                (false, Some(p)) => start = StreamPosition::Position(p),
                _ => return Ok((out, last_seen)),
            }
        }
    }

    /// Where the append that stored `first` at `revision` left the stream,
    /// if the `count` events from there are `events`.
    async fn original_result(
        &self,
        stream: &str,
        revision: u64,
        events: &[EventData],
    ) -> Result<AppendResult, StoreError> {
        let stored = self.read_revisions(stream, revision, events.len()).await?;
        let same = stored.len() == events.len()
            && stored
                .iter()
                .zip(events)
                .all(|(s, e)| s.event_id == e.event_id);
        match stored.last() {
            Some(last) if same => Ok(AppendResult {
                version: last.version,
                position: last.position,
            }),
            _ => Err(StoreError::Corrupt(format!(
                "the append to {stream} repeats the id of a stored event ({}) but not the events stored with it; \
                 a message id was reused for different events",
                events[0].event_id
            ))),
        }
    }

    /// Looks for `id` in `stream` (up to `version`); its revision if found.
    async fn find_event_id(
        &self,
        stream: &str,
        id: uuid::Uuid,
        version: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut revision = 0;
        while revision < version {
            let page = self.read_revisions(stream, revision, PAGE).await?;
            if let Some(hit) = page.iter().find(|e| e.event_id == id) {
                return Ok(Some(hit.version - 1));
            }
            match page.last() {
                Some(last) if page.len() == PAGE => revision = last.version,
                _ => break,
            }
        }
        Ok(None)
    }

    async fn empty_append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
    ) -> Result<AppendResult, StoreError> {
        let (version, position) = match self.last_event(stream).await? {
            Some(e) => (e.version, e.position),
            None => (0, 0),
        };
        if expected.matches(version) {
            Ok(AppendResult { version, position })
        } else {
            Err(StoreError::WrongExpectedVersion {
                stream: stream.to_owned(),
                expected,
                actual: version,
            })
        }
    }

    /// The position of the last event in `$all` that is not a system or
    /// snapshot record, looking back at most a page; if the whole page is
    /// such records, the newest one's (a subscription "from the end" then
    /// starts after records that are not events: it misses nothing).
    async fn last_position(&self) -> Result<Option<Position>, StoreError> {
        let deadline = self.resilience.attempt_timeout;
        self.run("a read of $all", |client| async move {
            let options = ReadAllOptions::default()
                .backwards()
                .position(StreamPosition::End)
                .max_count(PAGE)
                .requires_leader(true)
                .deadline(deadline);
            let mut read = client.read_all(&options).await.map_err(classify)?;
            let mut newest = None;
            loop {
                match read.next().await {
                    Ok(Some(e)) => {
                        let e = e.get_original_event();
                        newest = newest.or(Some(e.position));
                        let stream = e.stream_id();
                        if holds_events(stream) {
                            return Ok(Some(e.position));
                        }
                    }
                    Ok(None) => return Ok(newest),
                    Err(e) => return Err(classify(e)),
                }
            }
        })
        .await
    }
}

#[async_trait]
impl EventStore for KurrentDbStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        if events.is_empty() {
            return self.empty_append(stream, expected).await;
        }
        let state = stream_state(expected);
        let wire: Vec<kurrentdb::EventData> = events.iter().map(to_wire).collect();
        let deadline = self.resilience.attempt_timeout;
        let outcome = self
            .run("an append", |client| {
                let wire = wire.clone();
                async move {
                    let options = AppendToStreamOptions::default()
                        .stream_state(state)
                        .deadline(deadline);
                    match client.append_to_stream(stream, &options, wire).await {
                        Ok(w) => Ok(Appended::Written(w)),
                        Err(kurrentdb::Error::WrongExpectedVersion { current, .. }) => {
                            Ok(Appended::Conflict(current))
                        }
                        Err(e) => Err(classify(e)),
                    }
                }
            })
            .await?;
        match outcome {
            Appended::Written(w) if w.position == Position::start() => {
                // KurrentDB answers a recognised retry with the original
                // revisions but no position; read it.
                let first = (w.next_expected_version + 1).saturating_sub(events.len() as u64);
                self.original_result(stream, first, &events).await
            }
            Appended::Written(w) => Ok(AppendResult {
                version: w.next_expected_version + 1,
                position: rehydra_position(w.position),
            }),
            Appended::Conflict(current) => {
                let actual = match current {
                    CurrentRevision::Current(r) => r + 1,
                    CurrentRevision::NoStream => 0,
                };
                // An expectation ahead of the stream cannot be a live writer's
                // view: it may be a retry with a stale expectation. Look for
                // the append's first event.
                if let ExpectedVersion::Exact(v) = expected
                    && v > actual
                    && let Some(revision) = self
                        .find_event_id(stream, events[0].event_id, actual)
                        .await?
                {
                    return self.original_result(stream, revision, &events).await;
                }
                Err(StoreError::WrongExpectedVersion {
                    stream: stream.to_owned(),
                    expected,
                    actual,
                })
            }
        }
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        // Revisions are signed 64-bit on the server; nothing lives that far.
        if limit == 0 || from_version > i64::MAX as u64 {
            return Ok(Vec::new());
        }
        self.read_revisions(stream, from_version.saturating_sub(1), limit)
            .await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        Ok(self.last_event(stream).await?.map_or(0, |e| e.version))
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        Ok(self.read_all_from(from_position, limit, &[]).await?.0)
    }

    async fn find_command_events(
        &self,
        stream: &str,
        first_event_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        // KurrentDB cannot look an event up by id. A repeated key is almost
        // always a recent command's (a client retrying after a timeout or a
        // lost host), so read the stream backwards from its end, a page at
        // a time, until the command's first event; then read forwards from
        // it for the rest of the command. A key that is not there costs a
        // read of the whole stream (one page in memory at a time).
        let mut start = StreamPosition::End;
        let first_version = loop {
            let page = self.read_page(stream, start, PAGE, false).await?;
            if let Some(e) = page.iter().find(|e| e.event_id == first_event_id) {
                break e.version;
            }
            match page.last().map(|e| e.version) {
                // Revisions are versions - 1: the next page ends just
                // before this one's oldest event.
                Some(oldest) if page.len() == PAGE && oldest > 1 => {
                    start = StreamPosition::Position(oldest - 2);
                }
                _ => return Ok(Vec::new()),
            }
        };
        let mut scanned: Vec<RecordedEvent> = Vec::new();
        let mut revision = first_version.saturating_sub(1);
        loop {
            let page = self.read_revisions(stream, revision, PAGE).await?;
            let full = page.len() == PAGE;
            if let Some(last) = page.last() {
                revision = last.version;
            }
            scanned.extend(page);
            let found = super::command_events(&scanned, first_event_id);
            match found.last() {
                Some(last) if !full || last.version < revision => return Ok(found),
                Some(_) => {}
                None => return Ok(Vec::new()),
            }
        }
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        Ok(self.last_position().await?.map_or(0, rehydra_position))
    }

    async fn save_snapshot(&self, snapshot: &crate::store::Snapshot) -> Result<(), StoreError> {
        self.save_snapshot_to_stream(snapshot).await
    }

    async fn load_snapshot(
        &self,
        stream: &str,
    ) -> Result<Option<crate::store::Snapshot>, StoreError> {
        self.load_snapshot_from_stream(stream).await
    }

    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.live_signal())
    }

    fn shared_by_hosts(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.described.clone()
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.check_health().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_recognised_and_redacted() {
        let redact = crate::store::redact_url;
        assert!(is_kurrentdb_url("esdb://localhost:2113?tls=false"));
        assert!(is_kurrentdb_url(
            "kurrentdb+discover://cluster.example:2113"
        ));
        assert!(!is_kurrentdb_url("embedded://x"));
        assert_eq!(
            redact("kurrentdb://admin:changeit@h1:2113,h2:2113?tls=true"),
            "kurrentdb://admin:***@h1:2113,h2:2113?tls=true"
        );
        assert_eq!(redact("esdb://h:2113"), "esdb://h:2113");
    }
}
