//! The event store: where aggregates' events live.
//!
//! Every backend implements [`EventStore`]; the rest of the host never knows
//! which one it talks to. Versions are the host's, not a backend's: an
//! aggregate's version is the number of events in its stream (0 = the stream does not exist), and the
//! first event of a stream has version 1. Backends map that to their own
//! numbering.
//!
//! Backends:
//! - [`embedded`]: SQLite in WAL mode, durable, group commit (`embedded://PATH`).
//! - [`memory`]: in process, for tests and benchmarks (`memory://`).
//! - [`kurrentdb`]: a KurrentDB / EventStoreDB cluster over gRPC
//!   (`kurrentdb://`, `esdb://`, `kurrentdb+discover://`, `esdb+discover://`).
//! - [`postgres`]: PostgreSQL, shared by several hosts (`postgres://`,
//!   `postgresql://`, libpq's URL form).

#[cfg(test)]
pub(crate) mod conformance;
pub mod embedded;
pub mod kurrentdb;
#[cfg(test)]
mod kurrentdb_tests;
pub mod memory;
pub mod postgres;
#[cfg(test)]
mod postgres_tests;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

/// What an append expects of the stream's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    Any,
    /// The stream must not exist (version 0).
    NoStream,
    /// The stream must exist (version > 0).
    StreamExists,
    /// The stream must be at exactly this version (0 = must not exist).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` satisfies this expectation.
    pub fn matches(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::StreamExists => actual > 0,
            ExpectedVersion::Exact(v) => v == actual,
        }
    }
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct EventData {
    /// Unique id; derived deterministically from the command's message id so
    /// a retried append is recognised as a duplicate.
    pub event_id: Uuid,
    /// The event's type name.
    pub event_type: String,
    /// The payload (JSON bytes).
    pub data: Vec<u8>,
    /// Metadata (a JSON object, as bytes). Holds `messageId` among others.
    pub metadata: Vec<u8>,
    /// The id of the command that produced it, indexed for idempotency
    /// look-ups (also inside `metadata`).
    pub message_id: String,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// The stream it belongs to.
    pub stream: String,
    /// The stream's version once this event is applied (1-based).
    pub version: u64,
    /// Position in the store's global order (1-based; gaps are allowed). A
    /// reader that has seen position `p` never later finds an event below
    /// `p`: the order is the commit order, or (PostgreSQL) one that readers
    /// can only see grow at its end.
    pub position: u64,
    /// The event's unique id.
    pub event_id: Uuid,
    /// The event's type name.
    pub event_type: String,
    /// The payload (JSON bytes).
    pub data: Vec<u8>,
    /// Metadata (JSON object bytes).
    pub metadata: Vec<u8>,
    /// The id of the command that produced it.
    pub message_id: String,
}

/// A stored event as loading an aggregate needs it: what `apply` is given,
/// and the id that marks how far the aggregate was loaded.
/// [`EventStore::read_stream_to_apply`] reads these, and a store may skip the
/// rest of a [`RecordedEvent`] (its stream, position and message id): on
/// the embedded store those two strings were a sixth of a long stream's
/// read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventToApply {
    /// The stream's version once this event is applied (1-based).
    pub version: u64,
    /// The event's unique id.
    pub event_id: Uuid,
    /// The event's type name.
    pub event_type: String,
    /// The payload (JSON bytes).
    pub data: Vec<u8>,
    /// Metadata (JSON object bytes).
    pub metadata: Vec<u8>,
}

impl From<RecordedEvent> for EventToApply {
    fn from(e: RecordedEvent) -> Self {
        EventToApply {
            version: e.version,
            event_id: e.event_id,
            event_type: e.event_type,
            data: e.data,
            metadata: e.metadata,
        }
    }
}

/// From a stream's events in version order, the ones one command appended:
/// the event with id `first_event_id` and the contiguous events after it with
/// its message id (see [`EventStore::find_command_events`]). For the stores
/// that scan a stream.
pub(crate) fn command_events<E: std::borrow::Borrow<RecordedEvent>>(
    events: impl IntoIterator<Item = E>,
    first_event_id: Uuid,
) -> Vec<RecordedEvent> {
    let mut events = events
        .into_iter()
        .skip_while(|e| e.borrow().event_id != first_event_id);
    let Some(first) = events.next() else {
        return Vec::new();
    };
    let first = first.borrow().clone();
    let rest: Vec<RecordedEvent> = events
        .take_while(|e| e.borrow().message_id == first.message_id)
        .map(|e| e.borrow().clone())
        .collect();
    std::iter::once(first).chain(rest).collect()
}

/// An aggregate's state as of one version of its stream, stored so that a
/// load applies only the events after it instead of the whole stream.
///
/// The state bytes are the plugin's own encoding, tagged with the plugin's
/// state schema; a loader of another schema ignores the snapshot. The id of
/// the event at `version` lets a loader check that the stream still holds
/// the events the state was built from (a KurrentDB stream can be deleted
/// and written again) before trusting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The stream the state was built from.
    pub stream: String,
    /// The plugin's state schema (`state-schema` in its `describe()`).
    pub schema: u32,
    /// The stream's version the state includes: its last event applied.
    pub version: u64,
    /// The id of the event at `version`.
    pub event_id: Uuid,
    /// The state bytes.
    pub state: Vec<u8>,
}

impl Snapshot {
    /// Whether this snapshot replaces `stored` (see
    /// [`EventStore::save_snapshot`]): it does unless `stored` is of the same
    /// schema and at least as recent.
    pub fn replaces(&self, stored: Option<(u32, u64)>) -> bool {
        match stored {
            None => true,
            Some((schema, version)) => schema != self.schema || self.version > version,
        }
    }
}

/// The outcome of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append.
    pub version: u64,
    /// The global position of the last event appended.
    pub position: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream's version did not match what the append expected. Nothing
    /// was written.
    #[error("stream {stream} is at version {actual}, expected {expected:?}")]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's actual version.
        actual: u64,
    },
    /// The store cannot be reached or cannot write right now; the caller may
    /// retry later.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The store's data is not what this host can read.
    #[error("event store data is corrupt: {0}")]
    Corrupt(String),
}

/// A backend that stores events in streams, with optimistic concurrency.
///
/// All methods are cancel-safe in the sense that dropping the future never
/// leaves a half-written append: an append is atomic, all events or none.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically if its version matches
    /// `expected`. Acknowledges only once the events are durable (for
    /// durable backends). Appending an empty batch checks the expectation and
    /// returns the current version.
    ///
    /// Idempotency: if the first event's id is already stored in `stream`,
    /// the append is a retry of one that succeeded; the backend appends
    /// nothing and returns the version and position that append produced.
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError>;

    /// Reads up to `limit` events of `stream` with version >= `from_version`
    /// (1-based), in version order. A missing stream reads as empty.
    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// [`read_stream`](Self::read_stream) with only what loading an
    /// aggregate needs of each event. The default reads whole events and
    /// drops the rest; a store that can read less overrides it.
    async fn read_stream_to_apply(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<EventToApply>, StoreError> {
        let events = self.read_stream(stream, from_version, limit).await?;
        Ok(events.into_iter().map(EventToApply::from).collect())
    }

    /// The stream's current version (0 if it does not exist).
    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError>;

    /// Reads up to `limit` events of all streams with global position >=
    /// `from_position`, in global order.
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The events one command appended to `stream`, in version order: the
    /// event with id `first_event_id` and the events right after it that
    /// carry the same message id (an append is atomic, so a command's events
    /// are contiguous). Empty if `stream` holds no event with that id. Used
    /// to answer a repeated idempotency key with the original outcome; the
    /// caller knows the id because event ids are derived from the message id
    /// ([`crate::command::event_id`]), and a store with an event-id index
    /// finds it without a per-message index, which would cost every append
    /// a random index write.
    async fn find_command_events(
        &self,
        stream: &str,
        first_event_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Stores `snapshot` as the stream's snapshot, replacing the one stored
    /// unless that one is of the same schema and a later version (hosts and
    /// passivation race; the newest state wins). One snapshot per stream is
    /// kept. Snapshots are not events: no read of the log returns them.
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError>;

    /// The snapshot stored for `stream`, of whatever schema, if any.
    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError>;

    /// The global position of the last event stored (0 when there is none).
    /// A subscription that starts "from the end" starts after it.
    async fn head_position(&self) -> Result<u64, StoreError>;

    /// A signal that changes after every commit, so that live subscriptions
    /// read as soon as there is something to read: this process's commits,
    /// and for a store shared by hosts the others' too (PostgreSQL's
    /// `NOTIFY`, KurrentDB's live subscription), changing periodically while
    /// the backend cannot hear them. A change is only a wake-up: readers
    /// read the log from their own positions. `None` when the backend has no
    /// way to tell: subscriptions then poll.
    fn commit_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Whether other processes (other hosts) may write to this store too,
    /// so that what this host has cached can be behind the store. A host
    /// then checks a stream's version in the store before it answers a
    /// state read from its cache.
    fn shared_by_hosts(&self) -> bool {
        false
    }

    /// A short human-readable description (backend and location) for logs.
    fn describe(&self) -> String;

    /// Finishes what the store still has to do before the process exits
    /// (the embedded store commits what is queued, indexes the rest of its
    /// log and folds its WAL into the database), so that the next start has
    /// nothing to recover. Later calls fail with
    /// [`StoreError::Unavailable`]. The default does nothing.
    async fn close(&self) {}

    /// Checks quickly, without long retries, that the store answers (for
    /// `/healthz`). The default reads one stream's version.
    async fn health(&self) -> Result<(), StoreError> {
        self.stream_version("$healthz").await.map(|_| ())
    }
}

/// Opens the store named by `url`: `embedded://PATH`, `memory://`, a
/// PostgreSQL URL (`postgres://`, `postgresql://`), or a KurrentDB
/// connection string (`kurrentdb://`, `esdb://`, `kurrentdb+discover://`,
/// `esdb+discover://`).
pub async fn open(url: &str) -> anyhow::Result<Arc<dyn EventStore>> {
    if let Some(path) = url.strip_prefix("embedded://") {
        let store = embedded::EmbeddedStore::open(std::path::Path::new(path)).await?;
        Ok(Arc::new(store))
    } else if url == "memory://" || url == "memory:" {
        Ok(Arc::new(memory::MemoryStore::new()))
    } else if kurrentdb::is_kurrentdb_url(url) {
        Ok(Arc::new(kurrentdb::KurrentDbStore::open(url).await?))
    } else if postgres::is_postgres_url(url) {
        Ok(Arc::new(postgres::PostgresStore::open(url).await?))
    } else {
        anyhow::bail!(
            "unsupported store URL {:?}: use embedded://PATH (for example embedded://./rehydra-data), memory://, \
             postgres://USER@HOST:PORT/DATABASE, or a KurrentDB connection string such as \
             kurrentdb://localhost:2113?tls=false",
            redact_url(url)
        )
    }
}

/// `url` (any backend's: `scheme://user:password@hosts/…?…`) with its
/// password replaced by `***`, and a `password=` parameter too, for
/// messages, logs and `/healthz`.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            match authority.rsplit_once('@') {
                Some((userinfo, hosts)) if userinfo.contains(':') => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}:***@{hosts}{path}")
                }
                _ => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    match query {
        None => base,
        Some(query) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
    }
}
