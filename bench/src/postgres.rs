//! PostgreSQL for the benchmarks: throwaway servers (pg-harness) with the
//! settings a user would run the `postgres://` store on — durable, with
//! `fsync` and `synchronous_commit` on — what they do during a run (their
//! CPU time, transactions, WAL), and the hand-written baseline the store is
//! measured against: pgbench running one-event appends as a user would
//! write them, one transaction each, against a fresh server with the same
//! settings.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pg_harness::PgServer;

use crate::inproc::SeedMetadata;
use crate::stats::{RunResult, percentile, tree_cpu};

/// The server settings of every benchmark server, on top of pg-harness's
/// (trust authentication on loopback). Durability as shipped: `fsync`,
/// `synchronous_commit` and `full_page_writes` on (stated, though they are
/// the defaults). Memory and checkpoints as a user with a write-heavy load
/// would set them: more shared buffers than pg-harness's test-sized 32 MB,
/// and no checkpoint during a run. Enough connections for pgbench's 256
/// clients.
pub const SETTINGS: &[&str] = &[
    "fsync=on",
    "synchronous_commit=on",
    "full_page_writes=on",
    "shared_buffers=256MB",
    "max_connections=300",
    "max_wal_size=4GB",
    "checkpoint_timeout=30min",
];

/// The settings, for the report.
pub fn settings_text() -> String {
    SETTINGS
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fresh PostgreSQL server for one run; stopped by [`Server::stop`] (or
/// when dropped).
pub struct Server {
    pg: PgServer,
}

/// What the server had done at one moment, for differences over a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// The next transaction id to be assigned.
    pub next_xid: i64,
    /// The WAL written so far, bytes.
    pub wal_bytes: i64,
}

impl Server {
    /// Initialises and starts a fresh server with [`SETTINGS`].
    pub async fn start() -> Server {
        let pg = tokio::task::spawn_blocking(|| PgServer::start_with(SETTINGS))
            .await
            .expect("the server start task")
            .expect("starting a PostgreSQL server (Debian's postgresql package)");
        Server { pg }
    }

    /// The store URL for the database `postgres`.
    pub fn url(&self) -> String {
        self.pg.url("postgres")
    }

    /// The CPU time the server's processes have used so far: the
    /// postmaster, its live children and the backends that have exited.
    pub fn cpu(&self) -> Duration {
        std::fs::read_to_string(self.pg.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
            .map_or(Duration::ZERO, tree_cpu)
    }

    /// Runs `sql` with psql; its unaligned output.
    pub async fn sql(&self, sql: &str) -> String {
        let (port, sql) = (self.pg.port(), sql.to_string());
        tokio::task::spawn_blocking(move || psql(port, &sql))
            .await
            .expect("a psql task")
    }

    /// The next transaction id and the WAL written so far.
    pub async fn counters(&self) -> Counters {
        let out = self
            .sql(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, \
                 (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint",
            )
            .await;
        let mut parts = out.trim().split('|').map(|p| p.parse::<i64>().unwrap_or(0));
        Counters {
            next_xid: parts.next().unwrap_or(0),
            wal_bytes: parts.next().unwrap_or(0),
        }
    }

    /// Stops the server and deletes its directory.
    pub async fn stop(self) {
        tokio::task::spawn_blocking(move || drop(self.pg))
            .await
            .expect("the server stop task");
    }
}

/// psql as pg-harness's superuser, unaligned, tuples only; panics with
/// psql's message if the statement fails (bench-only setup).
fn psql(port: u16, sql: &str) -> String {
    let bin = pg_harness::bin_dir().expect("PostgreSQL's programs");
    let out = Command::new(bin.join("psql"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", pg_harness::USER, "-d", "postgres"])
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What one run of the `postgres://` store or of pgbench did on the server
/// beyond its client-side figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerWork {
    /// Appends per transaction that wrote events (the store's group size;
    /// 1 for pgbench).
    pub appends_per_commit: f64,
    /// Transactions that were assigned an id (commits that wrote WAL),
    /// per append: the event-writing ones plus any others (the store's
    /// `NOTIFY`s).
    pub xids_per_append: f64,
    /// WAL bytes per append.
    pub wal_per_append: f64,
}

impl ServerWork {
    /// The run-by-run median of each figure.
    pub fn median_of(runs: &[ServerWork]) -> ServerWork {
        let pick =
            |f: &dyn Fn(&ServerWork) -> f64| crate::stats::median(runs.iter().map(f).collect());
        ServerWork {
            appends_per_commit: pick(&|w| w.appends_per_commit),
            xids_per_append: pick(&|w| w.xids_per_append),
            wal_per_append: pick(&|w| w.wal_per_append),
        }
    }
}

/// The store's group sizes over a run that started at `before`: the
/// transaction id is the upper part of every event's position (see
/// `rehydra::store::postgres`), so the events written since then, counted
/// by distinct transaction, say how many appends each commit carried.
pub async fn store_work(server: &Server, before: Counters, appends: usize) -> ServerWork {
    let after = server.counters().await;
    let schema = rehydra::store::postgres::DEFAULT_SCHEMA;
    let out = server
        .sql(&format!(
            "SELECT count(DISTINCT position >> 20) FROM {schema}.events \
             WHERE position >= {}::bigint << 20",
            before.next_xid
        ))
        .await;
    let commits = out.trim().parse::<f64>().unwrap_or(0.0);
    let n = appends.max(1) as f64;
    ServerWork {
        appends_per_commit: n / commits.max(1.0),
        xids_per_append: (after.next_xid - before.next_xid) as f64 / n,
        wal_per_append: (after.wal_bytes - before.wal_bytes) as f64 / n,
    }
}

/// The baseline's tables, as a user would write them: the same columns and
/// unique constraints as the store's (`stream, version` and `event_id`), a
/// `bigserial` for the global order, and `streams` rows holding each
/// stream's version. Seeded like the store scenario: `streams` streams with
/// one event each.
fn baseline_schema(streams: usize) -> String {
    format!(
        "CREATE TABLE streams (stream text PRIMARY KEY, version bigint NOT NULL);
         CREATE TABLE events (
             position   bigserial PRIMARY KEY,
             stream     text   NOT NULL,
             version    bigint NOT NULL,
             event_id   uuid   NOT NULL UNIQUE,
             event_type text   NOT NULL,
             data       bytea  NOT NULL,
             metadata   bytea  NOT NULL,
             message_id text   NOT NULL,
             UNIQUE (stream, version));
         INSERT INTO streams SELECT 'bank_account-acc-' || i, 1 FROM generate_series(0, {last}) i;
         INSERT INTO events (stream, version, event_id, event_type, data, metadata, message_id)
             SELECT 'bank_account-acc-' || i, 1, gen_random_uuid(), 'Opened',
                    '{{\"owner\":\"bench\"}}', '{{}}', gen_random_uuid()::text
             FROM generate_series(0, {last}) i;",
        last = streams - 1
    )
}

/// The pgbench script: one `Deposited` event with the host's metadata
/// (about 300 bytes) appended to a stream of this client's own share, in
/// one transaction: bump the stream's version, insert the event under it.
/// Four round trips (`-M prepared`: each statement prepared once per
/// connection).
fn baseline_script() -> String {
    let metadata =
        String::from_utf8(SeedMetadata::Host.bytes("deposit", &uuid::Uuid::new_v4().to_string()))
            .expect("the metadata is JSON text");
    format!(
        "\\set i :client_id + :clients * random(0, :share - 1)
BEGIN;
UPDATE streams SET version = version + 1 WHERE stream = 'bank_account-acc-' || :i::int RETURNING version \\gset
INSERT INTO events (stream, version, event_id, event_type, data, metadata, message_id) VALUES ('bank_account-acc-' || :i::int, :version, gen_random_uuid(), 'Deposited', '{{\"amount\":1}}', '{metadata}', gen_random_uuid()::text);
COMMIT;
"
    )
}

/// A fresh server set up for the baseline over `streams` streams.
pub async fn baseline_server(streams: usize) -> Server {
    let server = Server::start().await;
    server.sql(&baseline_schema(streams)).await;
    server.sql("VACUUM ANALYZE").await;
    server
}

/// One pgbench run on `server` with `clients` clients for `secs` (whole
/// seconds, at least one), each appending to its own share of `streams`
/// streams as the store scenario's clients do. Throughput is pgbench's
/// `tps` (without connection time); latencies are every transaction's from
/// pgbench's `--log`; CPU per transaction is pgbench's (the client) and the
/// server's.
pub async fn pgbench(
    server: &Server,
    streams: usize,
    clients: usize,
    secs: f64,
) -> (RunResult, ServerWork) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let script = dir.path().join("append.sql");
    std::fs::write(&script, baseline_script()).expect("writing the pgbench script");
    let bin = pg_harness::bin_dir().expect("PostgreSQL's programs");
    let mut command = Command::new(bin.join("pgbench"));
    command
        .args(["-h", "127.0.0.1", "-p", &server.pg.port().to_string()])
        .args(["-U", pg_harness::USER, "-n", "-M", "prepared"])
        .args(["-c", &clients.to_string()])
        .args(["-j", &clients.min(2).to_string()])
        .args(["-T", &(secs.round().max(1.0) as u64).to_string()])
        .arg("-f")
        .arg(&script)
        .args(["-D", &format!("clients={clients}")])
        .args(["-D", &format!("share={}", (streams / clients).max(1))])
        .arg("--log")
        .arg("--log-prefix")
        .arg(dir.path().join("log"))
        .arg("postgres")
        .current_dir(dir.path());
    let before = server.counters().await;
    let server_cpu = server.cpu();
    let client_cpu = crate::stats::proc_cpu("self").unwrap_or_default();
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the pgbench task")
        .expect("running pgbench");
    // The backends of pgbench's connections exit now; let the postmaster
    // reap them, so that their CPU time is counted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server_cpu = server.cpu().saturating_sub(server_cpu);
    let client_cpu = crate::stats::proc_cpu("self")
        .unwrap_or_default()
        .reaped_children
        .saturating_sub(client_cpu.reaped_children);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = server.counters().await;
    let tps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("pgbench reports tps");
    let failed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut nanos = latencies(dir.path());
    nanos.sort_unstable();
    let n = nanos.len().max(1) as f64;
    let run = RunResult {
        per_sec: tps,
        p50: percentile(&nanos, 0.50),
        p99: percentile(&nanos, 0.99),
        p999: percentile(&nanos, 0.999),
        ops: nanos.len(),
        errors: failed,
        ..RunResult::default()
    }
    .with_cpu(client_cpu)
    .with_server_cpu(server_cpu);
    let work = ServerWork {
        appends_per_commit: 1.0,
        xids_per_append: (after.next_xid - before.next_xid) as f64 / n,
        wal_per_append: (after.wal_bytes - before.wal_bytes) as f64 / n,
    };
    (run, work)
}

/// Every transaction's latency (ns) from pgbench's per-transaction logs in
/// `dir` (`log.PID[.THREAD]`: client, transaction, latency in µs, …;
/// failed transactions have no latency and are left out).
fn latencies(dir: &Path) -> Vec<u64> {
    let mut nanos = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("log.") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        nanos.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .filter_map(|us| us.parse::<u64>().ok())
                .map(|us| us * 1000),
        );
    }
    nanos
}
