//! A **test double** of the KurrentDB gRPC API, in process, for Rehydra's
//! tests. It is not KurrentDB and stores nothing on disk.
//!
//! No KurrentDB server can run on the machines Rehydra is developed on, so
//! the KurrentDB store backend is tested against this double. It serves the
//! server side of the protocol generated from the `.proto` files inside the
//! `kurrentdb` client crate (see `build.rs`), and only the calls the backend
//! makes:
//!
//! - `Streams.Append`: expected revision (`any`, `no_stream`,
//!   `stream_exists`, an exact revision), `WrongExpectedVersion` with the
//!   current revision, idempotent re-appends of the same event ids within a
//!   stream (answered with the original revisions and *no position*, as the
//!   server does), and a maximum append size;
//! - `Streams.Read`: one stream forwards or backwards (a missing stream
//!   answers `StreamNotFound`), `$all` forwards or backwards from a position
//!   with an optional stream-name or event-type *prefix* filter, and
//!   catch-up-then-live subscriptions to `$all`;
//! - `Gossip.Read` and `ServerFeatures.GetSupportedMethods`, which the client
//!   calls to discover nodes.
//!
//! A [`KurrentDbDouble`] can run one node or a cluster. The cluster shares
//! one log that stands for the quorum-replicated log: an append the leader
//! acknowledged is on every surviving node. Writes sent to a follower are
//! refused with `NotLeader` and the leader's endpoint, as KurrentDB does;
//! reads that carry `requires-leader: true` are refused the same way. A
//! node can be killed (its listener closes and every open connection is
//! reset) and restarted; killing the leader starts an election that makes
//! the lowest-numbered live node leader after a configurable delay.
//! Faults can be injected (unavailability, an append whose reply is lost
//! after it was committed) to test a client's retries.
//!
//! What this double does *not* model is listed in the README section on
//! KurrentDB: follower lag, persistence, projections, ACLs, TLS, scavenging,
//! stream metadata and the bounded size of the server's event-id cache.

// `tonic::Status` is the error type of every gRPC handler; boxing it would
// only add conversions at each `?`.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

/// The code generated from the KurrentDB protos (server side only).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    /// `event_store.client` and its sub-packages.
    pub mod event_store {
        /// Shared messages (`shared.proto`).
        pub mod client {
            tonic::include_proto!("event_store.client");
            /// `streams.proto`.
            pub mod streams {
                tonic::include_proto!("event_store.client.streams");
            }
            /// `gossip.proto`.
            pub mod gossip {
                tonic::include_proto!("event_store.client.gossip");
            }
            /// `serverfeatures.proto`.
            pub mod server_features {
                tonic::include_proto!("event_store.client.server_features");
            }
        }
    }
    /// `google.rpc`, used by `streams.proto`.
    pub mod google {
        /// `status.proto` and `code.proto`.
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
}

use proto::event_store::client as wire;
use wire::gossip::gossip_server::{Gossip, GossipServer};
use wire::server_features::server_features_server::{ServerFeatures, ServerFeaturesServer};
use wire::streams::streams_server::{Streams, StreamsServer};
use wire::streams::{append_req, append_resp, read_req, read_resp};

/// How to run the double.
#[derive(Debug, Clone)]
pub struct DoubleConfig {
    /// Number of nodes: 1 for a single node, 3 for a cluster.
    pub nodes: usize,
    /// Largest total size of one append's data and metadata, in bytes.
    /// KurrentDB's default is 1 MiB.
    pub max_append_size: usize,
    /// How long the cluster has no leader after the leader dies.
    pub election_delay: Duration,
    /// The version the double reports in `ServerFeatures`.
    pub server_version: String,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        DoubleConfig {
            nodes: 1,
            max_append_size: 1024 * 1024,
            election_delay: Duration::from_millis(300),
            server_version: "24.10.0".into(),
        }
    }
}

/// A fault to inject into the next calls served by the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer the next call (append or read) with `UNAVAILABLE`, doing
    /// nothing.
    Unavailable,
    /// Commit the next append, then answer `UNAVAILABLE` as if the reply had
    /// been lost on the way back.
    LoseAppendReply,
}

/// One stored event.
#[derive(Debug, Clone)]
struct Stored {
    stream: String,
    revision: u64,
    position: u64,
    id: Uuid,
    event_type: String,
    content_type: String,
    created: i64,
    data: Vec<u8>,
    custom_metadata: Vec<u8>,
}

impl Stored {
    fn size(&self) -> u64 {
        // Roughly what a prepare record takes: a header, the names and the
        // payloads. Positions are byte offsets, so they have gaps, as in
        // KurrentDB.
        (96 + self.stream.len()
            + self.event_type.len()
            + self.data.len()
            + self.custom_metadata.len()) as u64
    }
}

/// The state every node shares: the replicated log and the cluster's roles.
#[derive(Debug)]
struct State {
    log: Vec<Arc<Stored>>,
    /// Index into `log` of each revision, per stream.
    streams: HashMap<String, Vec<usize>>,
    /// Where each event id was stored: (stream, revision).
    ids: HashMap<Uuid, (String, u64)>,
    /// Log position of the next record.
    next_position: u64,
    alive: Vec<bool>,
    leader: Option<usize>,
    faults: VecDeque<Fault>,
    /// Bumped on every membership change, so stale election timers give up.
    term: u64,
    appends: u64,
}

struct Shared {
    state: Mutex<State>,
    /// The log's length after each commit, for subscriptions.
    committed: watch::Sender<usize>,
    config: DoubleConfig,
    addrs: Vec<SocketAddr>,
    instance_ids: Vec<Uuid>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in the double; the state is
        // still consistent enough for a test to report it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One node's server task and the token that kills it.
struct NodeRun {
    kill: CancellationToken,
}

/// The running double: one node or a cluster, on loopback ports.
///
/// Dropping it stops every node.
pub struct KurrentDbDouble {
    shared: Arc<Shared>,
    runs: Mutex<Vec<Option<NodeRun>>>,
}

impl std::fmt::Debug for KurrentDbDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KurrentDbDouble")
            .field("addrs", &self.shared.addrs)
            .finish()
    }
}

impl KurrentDbDouble {
    /// Starts a single-node double with default settings.
    pub async fn single() -> std::io::Result<Self> {
        Self::start(DoubleConfig::default()).await
    }

    /// Starts a three-node cluster double with default settings.
    pub async fn cluster() -> std::io::Result<Self> {
        Self::start(DoubleConfig {
            nodes: 3,
            ..DoubleConfig::default()
        })
        .await
    }

    /// Starts the double as `config` says. Node 0 is the first leader.
    pub async fn start(config: DoubleConfig) -> std::io::Result<Self> {
        let nodes = config.nodes.max(1);
        let mut listeners = Vec::with_capacity(nodes);
        let mut addrs = Vec::with_capacity(nodes);
        for _ in 0..nodes {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?);
            listeners.push(listener);
        }
        let mut state = State {
            log: Vec::new(),
            streams: HashMap::new(),
            ids: HashMap::new(),
            // The first records of a real log are the epoch and system
            // records; user events never start at 0.
            next_position: 4096,
            alive: vec![true; nodes],
            leader: Some(0),
            faults: VecDeque::new(),
            term: 0,
            appends: 0,
        };
        // A real server writes system events first; readers of `$all` must
        // step over them.
        for (stream, event_type) in [
            ("$settings", "$settings"),
            ("$scavenges", "$scavengeIndexInitialized"),
        ] {
            commit_one(
                &mut state,
                stream,
                Uuid::new_v4(),
                event_type,
                "application/json",
                b"{}".to_vec(),
                Vec::new(),
            );
        }
        let (committed, _) = watch::channel(state.log.len());
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            committed,
            config,
            addrs,
            instance_ids: (0..nodes).map(|_| Uuid::new_v4()).collect(),
        });
        let double = KurrentDbDouble {
            shared,
            runs: Mutex::new((0..nodes).map(|_| None).collect()),
        };
        for (index, listener) in listeners.into_iter().enumerate() {
            double.serve(index, listener);
        }
        Ok(double)
    }

    fn runs(&self) -> MutexGuard<'_, Vec<Option<NodeRun>>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serve(&self, index: usize, listener: TcpListener) {
        let kill = CancellationToken::new();
        let node = Node {
            index,
            shared: Arc::clone(&self.shared),
        };
        let incoming = accept_until_killed(listener, kill.clone());
        let server = tonic::transport::Server::builder()
            .add_service(
                StreamsServer::new(node.clone())
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .max_encoding_message_size(64 * 1024 * 1024),
            )
            .add_service(GossipServer::new(node.clone()))
            .add_service(ServerFeaturesServer::new(node))
            .serve_with_incoming_shutdown(incoming, kill.clone().cancelled_owned());
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::debug!(node = index, "double node stopped: {e}");
            }
        });
        self.runs()[index] = Some(NodeRun { kill });
    }

    /// The node addresses, in node order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.shared.addrs
    }

    /// A connection string for the `kurrentdb` client: the node for one
    /// node, the gossip seeds of all nodes for a cluster; no TLS, leader
    /// preferred.
    pub fn connection_string(&self) -> String {
        let hosts: Vec<String> = self.shared.addrs.iter().map(|a| a.to_string()).collect();
        format!("esdb://{}?tls=false&nodePreference=leader", hosts.join(","))
    }

    /// The current leader's index, if there is one.
    pub fn leader(&self) -> Option<usize> {
        self.shared.lock().leader
    }

    /// Waits (bounded) until some node is leader, and returns it.
    pub async fn wait_for_leader(&self, within: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills node `index`: its listener closes and every connection to it is
    /// reset. Killing the leader starts an election.
    pub fn kill(&self, index: usize) {
        if let Some(run) = self.runs()[index].take() {
            run.kill.cancel();
        }
        let mut state = self.shared.lock();
        state.alive[index] = false;
        state.term += 1;
        if state.leader == Some(index) {
            state.leader = None;
            let term = state.term;
            drop(state);
            self.schedule_election(term);
        }
    }

    /// Kills the current leader and returns its index, if there is one.
    pub fn kill_leader(&self) -> Option<usize> {
        let leader = self.leader()?;
        self.kill(leader);
        Some(leader)
    }

    /// Restarts a killed node on its old address. It rejoins as a follower,
    /// or becomes leader if there is none.
    pub async fn restart(&self, index: usize) -> std::io::Result<()> {
        if self.runs()[index].is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.shared.addrs[index]).await?;
        {
            let mut state = self.shared.lock();
            state.alive[index] = true;
            state.term += 1;
            if state.leader.is_none() {
                state.leader = Some(index);
            }
        }
        self.serve(index, listener);
        Ok(())
    }

    fn schedule_election(&self, term: u64) {
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            tokio::time::sleep(shared.config.election_delay).await;
            let mut state = shared.lock();
            if state.term == term && state.leader.is_none() {
                state.leader = state.alive.iter().position(|a| *a);
                tracing::debug!(leader = ?state.leader, "double elected a leader");
            }
        });
    }

    /// Queues `fault` for the next call the leader serves.
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    /// How many appends the double has committed (idempotent re-appends do
    /// not count).
    pub fn committed_appends(&self) -> u64 {
        self.shared.lock().appends
    }

    /// Every event of `stream`, as (event id, revision), for assertions.
    pub fn stream_ids(&self, stream: &str) -> Vec<(Uuid, u64)> {
        let state = self.shared.lock();
        state
            .streams
            .get(stream)
            .map(|idx| {
                idx.iter()
                    .map(|&i| (state.log[i].id, state.log[i].revision))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for KurrentDbDouble {
    fn drop(&mut self) {
        for run in self.runs().iter_mut() {
            if let Some(run) = run.take() {
                run.kill.cancel();
            }
        }
    }
}

/// Appends one event to the log (the caller checked everything).
fn commit_one(
    state: &mut State,
    stream: &str,
    id: Uuid,
    event_type: &str,
    content_type: &str,
    data: Vec<u8>,
    custom_metadata: Vec<u8>,
) -> Arc<Stored> {
    let revision = state.streams.get(stream).map_or(0, |s| s.len() as u64);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_nanos() / 100) as i64)
        .unwrap_or_default();
    let stored = Arc::new(Stored {
        stream: stream.to_owned(),
        revision,
        position: state.next_position,
        id,
        event_type: event_type.to_owned(),
        content_type: content_type.to_owned(),
        created,
        data,
        custom_metadata,
    });
    state.next_position += stored.size();
    state
        .streams
        .entry(stream.to_owned())
        .or_default()
        .push(state.log.len());
    state.ids.insert(id, (stream.to_owned(), revision));
    state.log.push(Arc::clone(&stored));
    stored
}

// ---------------------------------------------------------------------------
// Connections that die with their node

fn accept_until_killed(
    listener: TcpListener,
    kill: CancellationToken,
) -> impl Stream<Item = std::io::Result<KillableIo>> {
    futures::stream::unfold((listener, kill), |(listener, kill)| async move {
        tokio::select! {
            _ = kill.cancelled() => None,
            accepted = listener.accept() => {
                let item = accepted.map(|(io, _)| {
                    let _ = io.set_nodelay(true);
                    KillableIo { io, killed: Box::pin(kill.clone().cancelled_owned()) }
                });
                Some((item, (listener, kill)))
            }
        }
    })
}

/// A TCP connection that fails every read and write once its node is
/// killed, so the server drops it and the client sees it reset.
struct KillableIo {
    io: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableIo {
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if self.killed.as_mut().poll(cx).is_ready() {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the double's node was killed",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for KillableIo {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

// ---------------------------------------------------------------------------
// The services

#[derive(Clone)]
struct Node {
    index: usize,
    shared: Arc<Shared>,
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<wire::streams::ReadResp, Status>> + Send>>;

impl Node {
    /// `NotLeader` with the leader's endpoint, or `UNAVAILABLE` while the
    /// cluster has no leader.
    fn not_leader(&self, leader: Option<usize>) -> Status {
        match leader {
            Some(l) => {
                let addr = self.shared.addrs[l];
                let mut status = Status::not_found("Leader info available");
                let md = status.metadata_mut();
                md.insert("exception", MetadataValue::from_static("not-leader"));
                if let Ok(v) = MetadataValue::try_from(addr.ip().to_string()) {
                    md.insert("leader-endpoint-host", v);
                }
                if let Ok(v) = MetadataValue::try_from(addr.port().to_string()) {
                    md.insert("leader-endpoint-port", v);
                }
                status
            }
            None => Status::unavailable("Server Is Not Ready: no leader has been elected"),
        }
    }

    /// Checks that this node may serve the call, and takes a queued fault.
    fn admit(&self, state: &mut State, needs_leader: bool) -> Result<Option<Fault>, Status> {
        if !state.alive[self.index] {
            return Err(Status::unavailable("node is shutting down"));
        }
        let is_leader = state.leader == Some(self.index);
        if needs_leader && !is_leader {
            return Err(self.not_leader(state.leader));
        }
        if is_leader {
            return Ok(state.faults.pop_front());
        }
        Ok(None)
    }
}

fn requires_leader<T>(request: &Request<T>) -> bool {
    request
        .metadata()
        .get("requires-leader")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn uuid_from_wire(id: Option<wire::Uuid>) -> Result<Uuid, Status> {
    let Some(value) = id.and_then(|u| u.value) else {
        return Err(Status::invalid_argument("an event has no id"));
    };
    match value {
        wire::uuid::Value::Structured(s) => {
            let bits = ((s.most_significant_bits as u64 as u128) << 64)
                | (s.least_significant_bits as u64 as u128);
            Ok(Uuid::from_u128(bits))
        }
        wire::uuid::Value::String(s) => s
            .parse()
            .map_err(|_| Status::invalid_argument(format!("bad event id {s:?}"))),
    }
}

fn stream_name(id: Option<wire::StreamIdentifier>) -> Result<String, Status> {
    let id = id.ok_or_else(|| Status::invalid_argument("no stream identifier"))?;
    String::from_utf8(id.stream_name)
        .map_err(|_| Status::invalid_argument("the stream name is not UTF-8"))
}

fn empty() -> wire::Empty {
    wire::Empty {}
}

/// What an append expected, in KurrentDB's terms.
#[derive(Debug, Clone, Copy)]
enum Expected {
    Any,
    NoStream,
    StreamExists,
    Revision(u64),
}

/// The outcome of KurrentDB's commit check.
enum Decision {
    /// Write the events.
    Write,
    /// The same events are already stored at these revisions: answer
    /// success, write nothing.
    Idempotent { last_revision: u64 },
    /// Wrong expected version; the stream's current revision (None = no
    /// stream).
    Wrong { current: Option<u64> },
    /// Some of the ids match what is stored and some do not.
    Corrupted,
}

/// KurrentDB's commit check: the expected revision against the stream, and
/// idempotency by event id.
fn check(state: &State, stream: &str, expected: Expected, ids: &[Uuid]) -> Decision {
    let current = state
        .streams
        .get(stream)
        .and_then(|s| (s.len() as u64).checked_sub(1));
    // With `any` (and `stream_exists` on a stream that exists) the server
    // recognises a retry by the first event id in its id cache.
    let by_cache = |state: &State| -> Option<Decision> {
        let (first_stream, first_rev) = state.ids.get(ids.first()?)?;
        if first_stream != stream {
            return Some(Decision::Write);
        }
        for (k, id) in ids.iter().enumerate() {
            match state.ids.get(id) {
                Some((s, r)) if s == stream && *r == first_rev + k as u64 => {}
                _ if k == 0 => return Some(Decision::Write),
                _ => return Some(Decision::Corrupted),
            }
        }
        Some(Decision::Idempotent {
            last_revision: first_rev + ids.len() as u64 - 1,
        })
    };
    let expected_rev: Option<u64> = match expected {
        Expected::Any => return by_cache(state).unwrap_or(Decision::Write),
        Expected::StreamExists => {
            if let Some(d) = by_cache(state).filter(|d| !matches!(d, Decision::Write)) {
                return d;
            }
            return if current.is_some() {
                Decision::Write
            } else {
                Decision::Wrong { current }
            };
        }
        Expected::NoStream => None,
        Expected::Revision(r) => Some(r),
    };
    let behind = match (expected_rev, current) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(e), Some(c)) => e < c,
    };
    if behind {
        // A retry of an append made at this expected revision finds its
        // events right after it.
        let first = expected_rev.map_or(0, |e| e + 1);
        let stored = &state.streams[stream];
        for (k, id) in ids.iter().enumerate() {
            let rev = first + k as u64;
            let same = stored
                .get(rev as usize)
                .is_some_and(|&i| state.log[i].id == *id);
            if !same {
                return if k == 0 {
                    Decision::Wrong { current }
                } else {
                    Decision::Corrupted
                };
            }
        }
        return Decision::Idempotent {
            last_revision: first + ids.len() as u64 - 1,
        };
    }
    if expected_rev == current {
        Decision::Write
    } else {
        Decision::Wrong { current }
    }
}

fn wrong_expected_version(
    expected: Expected,
    current: Option<u64>,
) -> append_resp::WrongExpectedVersion {
    use append_resp::wrong_expected_version::{
        CurrentRevisionOption, CurrentRevisionOption2060, ExpectedRevisionOption,
        ExpectedRevisionOption2060,
    };
    let (cur, cur_old) = match current {
        Some(r) => (
            CurrentRevisionOption::CurrentRevision(r),
            CurrentRevisionOption2060::CurrentRevision2060(r),
        ),
        None => (
            CurrentRevisionOption::CurrentNoStream(empty()),
            CurrentRevisionOption2060::NoStream2060(empty()),
        ),
    };
    let (exp, exp_old) = match expected {
        Expected::Any => (
            ExpectedRevisionOption::ExpectedAny(empty()),
            Some(ExpectedRevisionOption2060::Any2060(empty())),
        ),
        Expected::StreamExists => (
            ExpectedRevisionOption::ExpectedStreamExists(empty()),
            Some(ExpectedRevisionOption2060::StreamExists2060(empty())),
        ),
        Expected::NoStream => (ExpectedRevisionOption::ExpectedNoStream(empty()), None),
        Expected::Revision(r) => (
            ExpectedRevisionOption::ExpectedRevision(r),
            Some(ExpectedRevisionOption2060::ExpectedRevision2060(r)),
        ),
    };
    append_resp::WrongExpectedVersion {
        current_revision_option_20_6_0: Some(cur_old),
        expected_revision_option_20_6_0: exp_old,
        current_revision_option: Some(cur),
        expected_revision_option: Some(exp),
    }
}

fn success(current: Option<u64>, position: Option<u64>) -> append_resp::Success {
    use append_resp::success::{CurrentRevisionOption, PositionOption};
    append_resp::Success {
        current_revision_option: Some(match current {
            Some(r) => CurrentRevisionOption::CurrentRevision(r),
            None => CurrentRevisionOption::NoStream(empty()),
        }),
        position_option: Some(match position {
            Some(p) => PositionOption::Position(append_resp::Position {
                commit_position: p,
                prepare_position: p,
            }),
            None => PositionOption::NoPosition(empty()),
        }),
    }
}

fn to_read_event(e: &Stored) -> read_resp::ReadEvent {
    let mut metadata = HashMap::new();
    metadata.insert("type".to_owned(), e.event_type.clone());
    metadata.insert("content-type".to_owned(), e.content_type.clone());
    metadata.insert("created".to_owned(), e.created.to_string());
    read_resp::ReadEvent {
        event: Some(read_resp::read_event::RecordedEvent {
            id: Some(wire::Uuid {
                value: Some(wire::uuid::Value::String(e.id.to_string())),
            }),
            stream_identifier: Some(wire::StreamIdentifier {
                stream_name: e.stream.as_bytes().to_vec(),
            }),
            stream_revision: e.revision,
            prepare_position: e.position,
            commit_position: e.position,
            metadata,
            custom_metadata: e.custom_metadata.clone(),
            data: e.data.clone(),
        }),
        link: None,
        position: Some(read_resp::read_event::Position::CommitPosition(e.position)),
    }
}

fn event_resp(e: &Stored) -> wire::streams::ReadResp {
    wire::streams::ReadResp {
        content: Some(read_resp::Content::Event(to_read_event(e))),
    }
}

/// A stream-name or event-type prefix filter.
#[derive(Debug, Clone)]
enum Filter {
    None,
    Stream(Vec<String>),
    EventType(Vec<String>),
}

impl Filter {
    fn from_wire(option: Option<read_req::options::FilterOption>) -> Result<Self, Status> {
        use read_req::options::filter_options::Filter as F;
        let Some(read_req::options::FilterOption::Filter(f)) = option else {
            return Ok(Filter::None);
        };
        let (expr, on_stream) = match f.filter {
            Some(F::StreamIdentifier(e)) => (e, true),
            Some(F::EventType(e)) => (e, false),
            None => return Ok(Filter::None),
        };
        if !expr.regex.is_empty() {
            return Err(Status::unimplemented(
                "the KurrentDB test double supports prefix filters only, not regex",
            ));
        }
        Ok(if on_stream {
            Filter::Stream(expr.prefix)
        } else {
            Filter::EventType(expr.prefix)
        })
    }

    fn accepts(&self, e: &Stored) -> bool {
        match self {
            Filter::None => true,
            Filter::Stream(p) => p.iter().any(|p| e.stream.starts_with(p.as_str())),
            Filter::EventType(p) => p.iter().any(|p| e.event_type.starts_with(p.as_str())),
        }
    }
}

/// The index in the log of the first record at or after `position`, or an
/// error if `position` falls inside a record (KurrentDB refuses such reads
/// as an invalid position).
fn seek(state: &State, position: u64) -> Result<usize, Status> {
    let i = state.log.partition_point(|e| e.position < position);
    let exact = state.log.get(i).is_some_and(|e| e.position == position);
    if exact || position == 0 || i == state.log.len() && position >= state.next_position {
        Ok(i)
    } else {
        let mut status = Status::invalid_argument(format!(
            "Invalid position C:{position}/P:{position}: it is not the start of a record"
        ));
        status
            .metadata_mut()
            .insert("exception", MetadataValue::from_static("invalid-position"));
        Err(status)
    }
}

#[tonic::async_trait]
impl Streams for Node {
    type ReadStream = ReadStream;
    type BatchAppendStream =
        Pin<Box<dyn Stream<Item = Result<wire::streams::BatchAppendResp, Status>> + Send>>;

    async fn read(
        &self,
        request: Request<wire::streams::ReadReq>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let needs_leader = requires_leader(&request);
        let options = request
            .into_inner()
            .options
            .ok_or_else(|| Status::invalid_argument("no read options"))?;
        {
            let mut state = self.shared.lock();
            if let Some(Fault::Unavailable) = self.admit(&mut state, needs_leader)? {
                return Err(Status::unavailable("injected fault: unavailable"));
            }
        }
        let backwards =
            options.read_direction == read_req::options::ReadDirection::Backwards as i32;
        let filter = Filter::from_wire(options.filter_option)?;
        let subscription = matches!(
            options.count_option,
            Some(read_req::options::CountOption::Subscription(_))
        );
        let count = match options.count_option {
            Some(read_req::options::CountOption::Count(c)) => c,
            _ => u64::MAX,
        };
        use read_req::options::StreamOption;
        match options.stream_option {
            Some(StreamOption::Stream(s)) if !subscription => {
                let stream = stream_name(s.stream_identifier)?;
                Ok(Response::new(self.read_stream(
                    &stream,
                    s.revision_option,
                    backwards,
                    count,
                )))
            }
            Some(StreamOption::All(a)) if subscription => {
                Ok(Response::new(self.subscribe_all(a.all_option, filter)?))
            }
            Some(StreamOption::All(a)) => Ok(Response::new(self.read_all(
                a.all_option,
                backwards,
                count,
                &filter,
            )?)),
            Some(StreamOption::Stream(_)) => Err(Status::unimplemented(
                "the KurrentDB test double does not serve stream subscriptions",
            )),
            None => Err(Status::invalid_argument("no stream option")),
        }
    }

    async fn append(
        &self,
        request: Request<Streaming<wire::streams::AppendReq>>,
    ) -> Result<Response<wire::streams::AppendResp>, Status> {
        let mut incoming = request.into_inner();
        let header = match incoming.message().await?.and_then(|m| m.content) {
            Some(append_req::Content::Options(o)) => o,
            _ => {
                return Err(Status::invalid_argument(
                    "an append starts with its options",
                ));
            }
        };
        let stream = stream_name(header.stream_identifier)?;
        use append_req::options::ExpectedStreamRevision as E;
        let expected = match header.expected_stream_revision {
            Some(E::Revision(r)) => Expected::Revision(r),
            Some(E::NoStream(_)) => Expected::NoStream,
            Some(E::Any(_)) => Expected::Any,
            Some(E::StreamExists(_)) => Expected::StreamExists,
            None => return Err(Status::invalid_argument("no expected stream revision")),
        };
        let mut proposed = Vec::new();
        let mut size = 0usize;
        while let Some(message) = incoming.message().await? {
            match message.content {
                Some(append_req::Content::ProposedMessage(m)) => {
                    size += m.data.len() + m.custom_metadata.len();
                    if size > self.shared.config.max_append_size {
                        let mut status = Status::invalid_argument(format!(
                            "Maximum Append Size of {} Exceeded.",
                            self.shared.config.max_append_size
                        ));
                        status.metadata_mut().insert(
                            "exception",
                            MetadataValue::from_static("maximum-append-size-exceeded"),
                        );
                        return Err(status);
                    }
                    proposed.push(m);
                }
                _ => return Err(Status::invalid_argument("options sent twice")),
            }
        }
        let ids = proposed
            .iter()
            .map(|m| uuid_from_wire(m.id.clone()))
            .collect::<Result<Vec<_>, _>>()?;

        let mut state = self.shared.lock();
        let fault = self.admit(&mut state, true)?;
        if fault == Some(Fault::Unavailable) {
            return Err(Status::unavailable("injected fault: unavailable"));
        }
        let result = match check(&state, &stream, expected, &ids) {
            Decision::Wrong { current } => {
                append_resp::Result::WrongExpectedVersion(wrong_expected_version(expected, current))
            }
            Decision::Corrupted => {
                return Err(Status::invalid_argument(
                    "Idempotent write failed: some of the event ids match stored events and some do not",
                ));
            }
            Decision::Idempotent { last_revision } => {
                append_resp::Result::Success(success(Some(last_revision), None))
            }
            Decision::Write if proposed.is_empty() => {
                let current = state
                    .streams
                    .get(&stream)
                    .and_then(|s| (s.len() as u64).checked_sub(1));
                append_resp::Result::Success(success(current, None))
            }
            Decision::Write => {
                let mut last = None;
                for (m, id) in proposed.into_iter().zip(ids) {
                    let event_type = m.metadata.get("type").cloned().unwrap_or_default();
                    let content_type = m
                        .metadata
                        .get("content-type")
                        .cloned()
                        .unwrap_or_else(|| "application/octet-stream".into());
                    let stored = commit_one(
                        &mut state,
                        &stream,
                        id,
                        &event_type,
                        &content_type,
                        m.data,
                        m.custom_metadata,
                    );
                    last = Some(stored);
                }
                state.appends += 1;
                let len = state.log.len();
                self.shared.committed.send_replace(len);
                let last = last.map(|s| (s.revision, s.position));
                append_resp::Result::Success(success(last.map(|l| l.0), last.map(|l| l.1)))
            }
        };
        drop(state);
        if fault == Some(Fault::LoseAppendReply) {
            return Err(Status::unavailable("injected fault: the reply was lost"));
        }
        Ok(Response::new(wire::streams::AppendResp {
            result: Some(result),
        }))
    }

    async fn delete(
        &self,
        _request: Request<wire::streams::DeleteReq>,
    ) -> Result<Response<wire::streams::DeleteResp>, Status> {
        Err(Status::unimplemented(
            "the KurrentDB test double does not delete streams",
        ))
    }

    async fn tombstone(
        &self,
        _request: Request<wire::streams::TombstoneReq>,
    ) -> Result<Response<wire::streams::TombstoneResp>, Status> {
        Err(Status::unimplemented(
            "the KurrentDB test double does not tombstone streams",
        ))
    }

    async fn batch_append(
        &self,
        _request: Request<Streaming<wire::streams::BatchAppendReq>>,
    ) -> Result<Response<Self::BatchAppendStream>, Status> {
        Err(Status::unimplemented(
            "the KurrentDB test double does not serve BatchAppend",
        ))
    }
}

impl Node {
    fn read_stream(
        &self,
        stream: &str,
        from: Option<read_req::options::stream_options::RevisionOption>,
        backwards: bool,
        count: u64,
    ) -> ReadStream {
        use read_req::options::stream_options::RevisionOption as R;
        let state = self.shared.lock();
        let Some(revisions) = state.streams.get(stream) else {
            let not_found = wire::streams::ReadResp {
                content: Some(read_resp::Content::StreamNotFound(
                    read_resp::StreamNotFound {
                        stream_identifier: Some(wire::StreamIdentifier {
                            stream_name: stream.as_bytes().to_vec(),
                        }),
                    },
                )),
            };
            return Box::pin(futures::stream::iter([Ok(not_found)]));
        };
        let len = revisions.len() as u64;
        let count = count.min(len) as usize;
        let picked: Vec<Arc<Stored>> = if backwards {
            let start = match from {
                Some(R::Revision(r)) => r.min(len.saturating_sub(1)),
                _ => len.saturating_sub(1),
            };
            if len == 0 {
                Vec::new()
            } else {
                (0..=start)
                    .rev()
                    .take(count)
                    .map(|r| Arc::clone(&state.log[revisions[r as usize]]))
                    .collect()
            }
        } else {
            let start = match from {
                Some(R::Revision(r)) => r,
                Some(R::End(_)) => len,
                _ => 0,
            };
            (start..len)
                .take(count)
                .map(|r| Arc::clone(&state.log[revisions[r as usize]]))
                .collect()
        };
        drop(state);
        Box::pin(futures::stream::iter(
            picked
                .into_iter()
                .map(|e| Ok(event_resp(&e)))
                .collect::<Vec<_>>(),
        ))
    }

    fn read_all(
        &self,
        from: Option<read_req::options::all_options::AllOption>,
        backwards: bool,
        count: u64,
        filter: &Filter,
    ) -> Result<ReadStream, Status> {
        use read_req::options::all_options::AllOption as A;
        let state = self.shared.lock();
        let picked: Vec<Arc<Stored>> = if backwards {
            // Backwards from a position: the records before it.
            let end = match from {
                Some(A::Position(p)) => seek(&state, p.commit_position)?,
                Some(A::Start(_)) => 0,
                _ => state.log.len(),
            };
            state.log[..end]
                .iter()
                .rev()
                .filter(|e| filter.accepts(e))
                .take(count.min(usize::MAX as u64) as usize)
                .cloned()
                .collect()
        } else {
            let start = match from {
                Some(A::Position(p)) => seek(&state, p.commit_position)?,
                Some(A::End(_)) => state.log.len(),
                _ => 0,
            };
            state.log[start..]
                .iter()
                .filter(|e| filter.accepts(e))
                .take(count.min(usize::MAX as u64) as usize)
                .cloned()
                .collect()
        };
        drop(state);
        Ok(Box::pin(futures::stream::iter(
            picked
                .into_iter()
                .map(|e| Ok(event_resp(&e)))
                .collect::<Vec<_>>(),
        )))
    }

    /// A catch-up subscription to `$all`: the events *after* the start
    /// position, then `CaughtUp`, then live events as they are committed.
    fn subscribe_all(
        &self,
        from: Option<read_req::options::all_options::AllOption>,
        filter: Filter,
    ) -> Result<ReadStream, Status> {
        use read_req::options::all_options::AllOption as A;
        let mut next = {
            let state = self.shared.lock();
            match from {
                Some(A::Position(p)) => {
                    let i = seek(&state, p.commit_position)?;
                    // Subscriptions start after the given position.
                    if state
                        .log
                        .get(i)
                        .is_some_and(|e| e.position == p.commit_position)
                    {
                        i + 1
                    } else {
                        i
                    }
                }
                Some(A::End(_)) => state.log.len(),
                _ => 0,
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let shared = Arc::clone(&self.shared);
        let index = self.index;
        tokio::spawn(async move {
            let confirmation = wire::streams::ReadResp {
                content: Some(read_resp::Content::Confirmation(
                    read_resp::SubscriptionConfirmation {
                        subscription_id: Uuid::new_v4().to_string(),
                    },
                )),
            };
            if tx.send(Ok(confirmation)).await.is_err() {
                return;
            }
            let mut committed = shared.committed.subscribe();
            let mut caught_up = false;
            loop {
                let (batch, alive) = {
                    let state = shared.lock();
                    let end = state.log.len().min(next + 256);
                    let batch: Vec<Arc<Stored>> = state.log[next..end].to_vec();
                    (batch, state.alive[index])
                };
                if !alive {
                    return;
                }
                if batch.is_empty() {
                    if !caught_up {
                        caught_up = true;
                        let msg = wire::streams::ReadResp {
                            content: Some(read_resp::Content::CaughtUp(read_resp::CaughtUp {
                                timestamp: None,
                                stream_revision: None,
                                position: None,
                            })),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    tokio::select! {
                        changed = committed.changed() => if changed.is_err() { return },
                        _ = tx.closed() => return,
                    }
                    continue;
                }
                next += batch.len();
                for e in batch.iter().filter(|e| filter.accepts(e)) {
                    if tx.send(Ok(event_resp(e))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl Gossip for Node {
    async fn read(
        &self,
        _request: Request<wire::Empty>,
    ) -> Result<Response<wire::gossip::ClusterInfo>, Status> {
        use wire::gossip::member_info::VNodeState;
        let state = self.shared.lock();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let members = self
            .shared
            .addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let node_state = if !state.alive[i] {
                    VNodeState::Shutdown
                } else if state.leader == Some(i) {
                    VNodeState::Leader
                } else if state.leader.is_some() {
                    VNodeState::Follower
                } else {
                    VNodeState::Unknown
                };
                let id = self.shared.instance_ids[i].as_u128();
                wire::gossip::MemberInfo {
                    instance_id: Some(wire::Uuid {
                        value: Some(wire::uuid::Value::Structured(wire::uuid::Structured {
                            most_significant_bits: (id >> 64) as u64 as i64,
                            least_significant_bits: id as u64 as i64,
                        })),
                    }),
                    time_stamp: now,
                    state: node_state as i32,
                    is_alive: state.alive[i],
                    http_end_point: Some(wire::gossip::EndPoint {
                        address: addr.ip().to_string(),
                        port: u32::from(addr.port()),
                    }),
                }
            })
            .collect();
        Ok(Response::new(wire::gossip::ClusterInfo { members }))
    }
}

#[tonic::async_trait]
impl ServerFeatures for Node {
    async fn get_supported_methods(
        &self,
        _request: Request<wire::Empty>,
    ) -> Result<Response<wire::server_features::SupportedMethods>, Status> {
        let method = |name: &str, service: &str| wire::server_features::SupportedMethod {
            method_name: name.into(),
            service_name: service.into(),
            features: Vec::new(),
        };
        Ok(Response::new(wire::server_features::SupportedMethods {
            methods: vec![
                method("read", "event_store.client.streams.streams"),
                method("append", "event_store.client.streams.streams"),
                method("read", "event_store.client.gossip.gossip"),
            ],
            event_store_server_version: self.shared.config.server_version.clone(),
        }))
    }
}
