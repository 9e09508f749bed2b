//! The PostgreSQL event store (`postgres://…`): durable, shared by any
//! number of hosts, and safe across a failover of the database.
//!
//! **Client.** `tokio-postgres` (the rust-postgres project's async client)
//! with `deadpool-postgres` as the pool. It is the client most Rust services
//! use, is maintained with PostgreSQL's releases, pipelines queries on one
//! connection, delivers `LISTEN/NOTIFY`, and understands libpq's URL form
//! with several hosts and `target_session_attrs=read-write`, which is how a
//! host finds the new primary after a failover. sqlx was the alternative;
//! its compile-time query checking needs a database at build time, and it
//! gives no more control over notifications or pipelining. The URL and the
//! environment are read in `postgres/config.rs`, TLS in `postgres/tls.rs`.
//!
//! **Tables** (`postgres/schema.rs`): `streams (stream, version)`, one row per
//! stream, and `events (position, stream, version, event_id, …)` with
//! unique `(stream, version)` and unique `event_id`. The event-id index
//! answers idempotency look-ups ([`EventStore::find_command_events`])
//! without scanning a stream.
//!
//! **Appends: group commit.** Appends go to a queue; [`WRITERS`] writer
//! tasks each take what is queued (up to [`MAX_BATCH`] appends), sort it by
//! stream and send it as *one* call of the schema's `append_batch` function:
//! one round trip, one transaction, one WAL flush for the whole group. Per
//! command, the function locks the stream's row (`SELECT … FOR UPDATE`, or
//! inserting it), checks the expected version against it, and inserts the
//! events. The row lock is what makes the expected-version check hold
//! against writers on other hosts: a second append to the same stream waits
//! for the first to commit, then sees the new version. Sorting by stream
//! makes every group lock rows in the same order, so two hosts' groups wait
//! for each other but never deadlock. A command that fails its check is
//! answered alone; the rest of the group commits. Two writers let one group
//! be built while another is committing.
//!
//! **Global order that never skips** (positions). An event's position is
//! `(xid << 20) | n`: the 64-bit id of the transaction that wrote it
//! (`pg_current_xact_id()`), then its place in that transaction. A reader
//! of the log (`read_all`, [`EventStore::head_position`]) sees only events
//! whose transaction id is below the *xmin* of its own snapshot
//! (`pg_snapshot_xmin(pg_current_snapshot())`, taken in the same
//! statement): every transaction below that horizon has ended, so the events
//! below it are final, and every transaction that can still commit has an
//! id at or above it, so its events will have positions above everything
//! already read. A reader that has seen position *p* therefore never later
//! finds an event below *p* — by construction, whatever order transactions
//! from several hosts commit in, with no lock shared by all writers (the
//! only serialisation is per stream). A plain sequence would not do: a
//! transaction can take a lower number and commit after a higher one has
//! been read. The cost: the log's visible end waits for the oldest
//! transaction in progress *in the whole PostgreSQL cluster* (transaction
//! ids are cluster-wide), so a long transaction elsewhere delays
//! subscribers (it never makes them skip). Positions are large numbers with
//! gaps; they fit in a `u64` and, until a cluster has used 2^33 transaction
//! ids, in a JavaScript number.
//!
//! **Commit signal.** Writers bump a local signal after each commit and
//! announce the group's last position with `NOTIFY` on a channel named after
//! the schema, outside the transaction (a notifying transaction holds a
//! cluster-wide lock while it commits). A listener task on its own
//! connection turns every notification into a bump, so subscriptions on
//! every host wake without polling. When an announced position is not yet
//! below the horizon, the listener checks the horizon again (10 ms, doubling
//! to 1 s) and bumps once it has passed. When the listening connection is
//! lost the listener bumps every [`POLL_WHILE_DEAF`] (polling) while it
//! reconnects with back-off, and bumps once more when it is back.
//!
//! **Failures.** Every operation has a deadline ([`OPERATION_TIMEOUT`]);
//! an operation that cannot reach the database fails with
//! [`StoreError::Unavailable`] and the connection is discarded, so the next
//! one connects afresh — to whichever host of a multi-host URL is the
//! read-write primary now. An append whose outcome is unknown (the reply
//! was lost) is safe to retry with the same event ids. Sessions also carry
//! a server-side `statement_timeout`, so a transaction whose host vanished
//! does not hold stream locks for long.

mod config;
mod listener;
mod schema;
mod tls;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Row;
use uuid::Uuid;

pub use config::{DEFAULT_SCHEMA, PgUrl, SslMode, is_postgres_url};
pub use schema::SCHEMA_VERSION;

use super::memory::id_twice_in_append;
use super::{
    AppendResult, EventData, EventStore, ExpectedVersion, RecordedEvent, Snapshot, StoreError,
};

/// Writer tasks, each committing one group at a time.
pub const WRITERS: usize = 2;
/// The most appends committed in one transaction.
pub const MAX_BATCH: usize = 512;
/// The most events in one transaction, whatever the number of appends.
pub const MAX_BATCH_EVENTS: usize = 16_384;
/// The most event bytes (data + metadata) in one transaction; a single
/// append larger than this goes alone.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// How long one operation (a group's commit, a read) may take before it
/// fails with [`StoreError::Unavailable`].
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How often subscriptions are woken while the notification connection is
/// down.
pub const POLL_WHILE_DEAF: Duration = Duration::from_millis(200);
/// Connections in the pool (reads, and the writers' groups).
pub const POOL_SIZE: usize = 16;
/// Appends waiting for a writer, at most; more make callers wait.
const QUEUE_CAPACITY: usize = 4096;
// A group must fit the position layout (see the module docs).
const _: () = assert!(MAX_BATCH_EVENTS <= schema::MAX_EVENTS_PER_TRANSACTION);

/// The PostgreSQL event store. See the module docs.
pub struct PostgresStore {
    shared: Arc<Shared>,
    queue: mpsc::Sender<writer::AppendRequest>,
    /// The writers, the notifier and the listener; aborted on drop.
    tasks: Vec<JoinHandle<()>>,
}

/// What the store's tasks share.
pub(crate) struct Shared {
    pool: Pool,
    sql: Sql,
    described: String,
    /// Bumped after every commit seen (this host's, or announced by any).
    commits: watch::Sender<u64>,
    /// The last position this host committed, for the notifier to announce.
    announce: watch::Sender<u64>,
    /// The `NOTIFY` channel (the schema's name, prefixed).
    channel: String,
}

/// The statements, with the schema name filled in once.
struct Sql {
    append: String,
    read_stream: String,
    stream_version: String,
    read_all: String,
    find_event: String,
    head: String,
    horizon: &'static str,
    ids_stored: String,
    save_snapshot: String,
    load_snapshot: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        const COLUMNS: &str =
            "stream, version, position, event_id, event_type, data, metadata, message_id";
        // The horizon: positions below it belong to ended transactions.
        const HORIZON: &str = "((pg_snapshot_xmin(pg_current_snapshot())::text::bigint) << 20)";
        Sql {
            append: format!(
                "SELECT r_index, r_outcome, r_version, r_position, r_other \
                 FROM {schema}.append_batch($1::text[], $2::int[], $3::bigint[], $4::int[], \
                 $5::uuid[], $6::text[], $7::bytea[], $8::bytea[], $9::text[])"
            ),
            read_stream: format!(
                "SELECT {COLUMNS} FROM {schema}.events \
                 WHERE stream = $1 AND version >= $2 ORDER BY version LIMIT $3"
            ),
            stream_version: format!("SELECT version FROM {schema}.streams WHERE stream = $1"),
            read_all: format!(
                "SELECT {COLUMNS} FROM {schema}.events \
                 WHERE position >= $1 AND position < (SELECT {HORIZON}) \
                 ORDER BY position LIMIT $2"
            ),
            find_event: format!(
                "SELECT {COLUMNS} FROM {schema}.events WHERE event_id = $1 AND stream = $2"
            ),
            head: format!(
                "SELECT position FROM {schema}.events WHERE position < (SELECT {HORIZON}) \
                 ORDER BY position DESC LIMIT 1"
            ),
            horizon: "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            ids_stored: format!(
                "SELECT event_id, stream FROM {schema}.events WHERE event_id = ANY($1::uuid[])"
            ),
            save_snapshot: format!(
                "INSERT INTO {schema}.snapshots AS s (stream, state_schema, version, event_id, state) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (stream) DO UPDATE SET state_schema = EXCLUDED.state_schema, \
                 version = EXCLUDED.version, event_id = EXCLUDED.event_id, state = EXCLUDED.state \
                 WHERE s.state_schema <> EXCLUDED.state_schema OR EXCLUDED.version > s.version"
            ),
            load_snapshot: format!(
                "SELECT state_schema, version, event_id, state FROM {schema}.snapshots \
                 WHERE stream = $1"
            ),
        }
    }
}

impl PostgresStore {
    /// Connects to the store named by `url` (libpq's URL form, see
    /// [`PgUrl`]), creates or checks its schema, and starts the writers and
    /// the listener. Fails, with what to do, if the database cannot be
    /// reached or the schema is not one this host can use.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let parsed = PgUrl::parse(url)?;
        Self::open_parsed(parsed).await
    }

    /// [`PostgresStore::open`] with an already parsed URL.
    pub async fn open_parsed(parsed: PgUrl) -> anyhow::Result<Self> {
        let PgUrl {
            mut config,
            schema,
            ssl_mode,
            ssl_root_cert,
            redacted,
        } = parsed;
        config.ssl_mode(tls::tokio_mode(ssl_mode));
        // Server-side limits, so that a statement or transaction whose host
        // vanished does not hold stream locks for long.
        let limits = format!(
            "-c statement_timeout={}ms -c idle_in_transaction_session_timeout=30000",
            OPERATION_TIMEOUT.as_millis() * 2
        );
        let options = match config.get_options() {
            Some(existing) if !existing.is_empty() => format!("{existing} {limits}"),
            _ => limits,
        };
        config.options(&options);
        config.tcp_user_timeout(OPERATION_TIMEOUT * 2);
        let connector = tls::connector(ssl_mode, ssl_root_cert.as_deref())?;

        let manager = Manager::from_config(
            config.clone(),
            connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OPERATION_TIMEOUT))
            .create_timeout(Some(OPERATION_TIMEOUT * 2))
            .recycle_timeout(Some(OPERATION_TIMEOUT))
            .build()
            .context("creating the PostgreSQL connection pool")?;

        let described = format!("PostgreSQL store at {redacted} (schema {schema})");
        {
            let mut client = pool.get().await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot connect to PostgreSQL at {redacted}: {}; check that the server runs and \
                     accepts connections at that address, and the user, password and database in \
                     the URL (or PGUSER, PGPASSWORD, PGDATABASE)",
                    pool_error_text(&e)
                )
            })?;
            schema::migrate(&mut client, &schema)
                .await
                .with_context(|| format!("preparing the store in {redacted}"))?;
        }

        let (commits, _) = watch::channel(0);
        let (announce, announced) = watch::channel(0);
        let shared = Arc::new(Shared {
            pool,
            sql: Sql::new(&schema),
            described,
            commits,
            announce,
            channel: format!("rehydra_{schema}"),
        });
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        let rx = Arc::new(tokio::sync::Mutex::new(writer::Queue::new(rx)));
        let mut tasks = Vec::new();
        for _ in 0..WRITERS {
            tasks.push(tokio::spawn(writer::run(
                Arc::clone(&shared),
                Arc::clone(&rx),
            )));
        }
        tasks.push(tokio::spawn(listener::announce(
            Arc::clone(&shared),
            announced,
        )));
        tasks.push(tokio::spawn(listener::listen(
            Arc::clone(&shared),
            config,
            connector,
        )));
        Ok(PostgresStore {
            shared,
            queue,
            tasks,
        })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("store", &self.shared.described)
            .finish()
    }
}

impl Shared {
    /// A pooled connection, or `Unavailable` within the pool's deadlines.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot reach PostgreSQL ({}): {}",
                self.described,
                pool_error_text(&e)
            ))
        })
    }

    /// Runs a query with the operation deadline, errors classified.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        match self.query_raw(sql, params).await? {
            Ok(rows) => Ok(rows),
            Err(e) => Err(self.error(&e)),
        }
    }

    /// Runs a query on a pooled connection with the operation deadline.
    /// The outer error is a connection that could not be had or a deadline
    /// (the connection is then discarded); the inner one is PostgreSQL's
    /// answer, for a caller that looks at its SQLSTATE.
    async fn query_raw(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Result<Vec<Row>, tokio_postgres::Error>, StoreError> {
        let client = self.client().await?;
        let run = async {
            let statement = client.prepare_cached(sql).await?;
            client.query(&statement, params).await
        };
        match tokio::time::timeout(OPERATION_TIMEOUT, run).await {
            Ok(answer) => Ok(answer),
            Err(_) => {
                // The connection may be cut off: do not hand it out again.
                drop(deadpool_postgres::Object::take(client));
                Err(self.timed_out())
            }
        }
    }

    fn error(&self, e: &tokio_postgres::Error) -> StoreError {
        classify(e, &self.described)
    }

    fn timed_out(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "PostgreSQL did not answer within {} s ({})",
            OPERATION_TIMEOUT.as_secs(),
            self.described
        ))
    }

    /// The log's visible end: positions below it are final.
    async fn horizon(&self) -> Result<u64, StoreError> {
        let rows = self.query(self.sql.horizon, &[]).await?;
        let xmin: i64 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| self.error(&e))?
            .unwrap_or(0);
        Ok(u64::try_from(xmin).unwrap_or(0) << schema::ORDINAL_BITS)
    }
}

/// A store error for a failed query: a database that is going away, a
/// connection that broke or a deadline is `Unavailable` (retry later);
/// data this host cannot read is `Corrupt`.
fn classify(e: &tokio_postgres::Error, described: &str) -> StoreError {
    use tokio_postgres::error::SqlState;
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let transient = [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::QUERY_CANCELED,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::DISK_FULL,
            SqlState::OUT_OF_MEMORY,
            SqlState::LOCK_NOT_AVAILABLE,
        ];
        if transient.contains(code) || code.code().starts_with("08") {
            return StoreError::Unavailable(format!("PostgreSQL: {} ({described})", db.message()));
        }
        return StoreError::Corrupt(format!(
            "PostgreSQL refused a query: {} (SQLSTATE {}) ({described})",
            db.message(),
            code.code()
        ));
    }
    StoreError::Unavailable(format!("PostgreSQL connection: {e} ({described})"))
}

fn pool_error_text(e: &deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => error_chain(e),
        PoolError::Timeout(_) => "timed out waiting for a connection".to_owned(),
        other => other.to_string(),
    }
}

/// An error with its sources, which is where tokio_postgres says why a
/// connection failed.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn event_from_row(row: &Row) -> Result<RecordedEvent, StoreError> {
    let int = |name: &str| -> Result<u64, StoreError> {
        let value: i64 = row
            .try_get(name)
            .map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))?;
        u64::try_from(value)
            .map_err(|_| StoreError::Corrupt(format!("column {name} holds {value}, below 0")))
    };
    let get = |e: tokio_postgres::Error| StoreError::Corrupt(format!("reading an event row: {e}"));
    Ok(RecordedEvent {
        stream: row.try_get("stream").map_err(get)?,
        version: int("version")?,
        position: int("position")?,
        event_id: row.try_get("event_id").map_err(get)?,
        event_type: row.try_get("event_type").map_err(get)?,
        data: row.try_get("data").map_err(get)?,
        metadata: row.try_get("metadata").map_err(get)?,
        message_id: row.try_get("message_id").map_err(get)?,
    })
}

fn events_from_rows(rows: &[Row]) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.iter().map(event_from_row).collect()
}

/// A version or limit the host passes as a `bigint`: past `i64::MAX` it
/// cannot name a stored row, so it is clamped there.
fn to_bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        for e in &events {
            if !seen.insert(e.event_id) {
                return Err(id_twice_in_append(e.event_id, stream));
            }
        }
        if events.len() > schema::MAX_EVENTS_PER_TRANSACTION {
            return Err(StoreError::Unavailable(format!(
                "an append of {} events is more than PostgreSQL's store takes in one \
                 transaction ({}); split the command's events",
                events.len(),
                schema::MAX_EVENTS_PER_TRANSACTION
            )));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = writer::AppendRequest::new(stream.to_owned(), expected, events, reply);
        let gone = || StoreError::Unavailable(format!("{} is closed", self.shared.described));
        self.queue.send(request).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .shared
            .query(
                &self.shared.sql.read_stream,
                &[&stream, &to_bigint(from_version), &to_bigint(limit as u64)],
            )
            .await?;
        events_from_rows(&rows)
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        let rows = self
            .shared
            .query(&self.shared.sql.stream_version, &[&stream])
            .await?;
        match rows.first() {
            None => Ok(0),
            Some(row) => {
                let version: i64 = row
                    .try_get(0)
                    .map_err(|e| StoreError::Corrupt(format!("streams.version: {e}")))?;
                u64::try_from(version)
                    .map_err(|_| StoreError::Corrupt(format!("streams.version is {version}")))
            }
        }
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .shared
            .query(
                &self.shared.sql.read_all,
                &[&to_bigint(from_position), &to_bigint(limit as u64)],
            )
            .await?;
        events_from_rows(&rows)
    }

    async fn find_command_events(
        &self,
        stream: &str,
        first_event_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        // The first event through the event-id index, then the stream from
        // there on, a page at a time, only as far as the command's events go.
        const PAGE: usize = 256;
        let rows = self
            .shared
            .query(&self.shared.sql.find_event, &[&first_event_id, &stream])
            .await?;
        let Some(first) = rows.first().map(event_from_row).transpose()? else {
            return Ok(Vec::new());
        };
        let mut events = vec![first];
        loop {
            let next = events.last().map_or(0, |e| e.version + 1);
            let page = self.read_stream(stream, next, PAGE).await?;
            let full = page.len() == PAGE;
            for e in page {
                if e.message_id != events[0].message_id {
                    return Ok(events);
                }
                events.push(e);
            }
            if !full {
                return Ok(events);
            }
        }
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let rows = self.shared.query(&self.shared.sql.head, &[]).await?;
        match rows.first() {
            None => Ok(0),
            Some(row) => {
                let p: i64 = row
                    .try_get(0)
                    .map_err(|e| StoreError::Corrupt(format!("events.position: {e}")))?;
                Ok(u64::try_from(p).unwrap_or(0))
            }
        }
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.shared
            .query(
                &self.shared.sql.save_snapshot,
                &[
                    &snapshot.stream,
                    &i64::from(snapshot.schema),
                    &to_bigint(snapshot.version),
                    &snapshot.event_id,
                    &snapshot.state,
                ],
            )
            .await?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>, StoreError> {
        let rows = self
            .shared
            .query(&self.shared.sql.load_snapshot, &[&stream])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let get =
            |e: tokio_postgres::Error| StoreError::Corrupt(format!("reading a snapshot: {e}"));
        let schema: i64 = row.try_get("state_schema").map_err(get)?;
        let version: i64 = row.try_get("version").map_err(get)?;
        Ok(Some(Snapshot {
            stream: stream.to_owned(),
            schema: u32::try_from(schema).map_err(|_| {
                StoreError::Corrupt(format!("snapshots.state_schema holds {schema}"))
            })?,
            version: u64::try_from(version)
                .map_err(|_| StoreError::Corrupt(format!("snapshots.version holds {version}")))?,
            event_id: row.try_get("event_id").map_err(get)?,
            state: row.try_get("state").map_err(get)?,
        }))
    }

    fn commit_signal(&self) -> Option<watch::Receiver<u64>> {
        Some(self.shared.commits.subscribe())
    }

    fn shared_by_hosts(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.shared.described.clone()
    }

    async fn health(&self) -> Result<(), StoreError> {
        let client = tokio::time::timeout(Duration::from_secs(2), self.shared.client())
            .await
            .map_err(|_| self.shared.timed_out())??;
        match tokio::time::timeout(Duration::from_secs(2), client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.shared.error(&e)),
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Err(self.shared.timed_out())
            }
        }
    }
}
