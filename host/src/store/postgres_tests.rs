//! The PostgreSQL backend's tests, against real PostgreSQL servers that
//! each test starts in a temporary directory (`pg-harness`): the
//! conformance suite, the global order under interleaved transactions,
//! several stores ("hosts") on one database, the commit signal across
//! them and its polling fallback, the schema's versioning, and an outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_harness::PgServer;
use uuid::Uuid;

use super::conformance::{append_racing, event, events, new_stream, read_whole};
use super::postgres::{PostgresStore, SCHEMA_VERSION};
use super::{EventStore, ExpectedVersion, StoreError};

/// A fresh server; a failure to start one fails the test with what to do.
pub(crate) async fn server() -> PgServer {
    tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("join")
        .expect("a throwaway PostgreSQL server (install Debian's postgresql: make test does)")
}

async fn open(url: &str) -> PostgresStore {
    PostgresStore::open(url).await.expect("open the store")
}

async fn make() -> (Arc<dyn EventStore>, PgServer) {
    let server = server().await;
    let store = open(&server.url("postgres")).await;
    (Arc::new(store), server)
}

mod conformance {
    crate::store::conformance::conformance_suite!(super::make);
    crate::store::conformance::unique_event_id_suite!(super::make);
    crate::store::conformance::conformance_tests!(super::make; commit_signal_changes_after_an_append);
}

/// Waits up to `within` for `condition`, polling.
async fn eventually<F, Fut>(within: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A transaction that started writing before a later one committed is
/// read *before* it, once it commits: a reader that has passed the later
/// event's position never misses the earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_transaction_is_never_skipped_by_readers() {
    let (store, server) = make().await;
    let (slow, connection) =
        tokio_postgres::connect(&server.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("a raw connection");
    tokio::spawn(connection);
    let head_before = store.head_position().await.expect("head");

    // The slow writer: its transaction takes its id (and so its positions)
    // first, appends, and stays open.
    slow.batch_execute("BEGIN").await.expect("begin");
    let slow_stream = new_stream("slow");
    let e = event(1);
    slow.query(
        "SELECT * FROM rehydra.append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &vec![slow_stream.as_str()],
            &vec![1i32],
            &vec![0i64],
            &vec![1i32],
            &vec![e.event_id],
            &vec![e.event_type.as_str()],
            &vec![e.data.as_slice()],
            &vec![e.metadata.as_slice()],
            &vec![e.message_id.as_str()],
        ],
    )
    .await
    .expect("the slow append");

    // A fast writer commits meanwhile, with a higher transaction id.
    let fast_stream = new_stream("fast");
    let fast = store
        .append(&fast_stream, ExpectedVersion::NoStream, vec![event(2)])
        .await
        .expect("the fast append");
    assert_eq!(
        store.stream_version(&fast_stream).await.expect("version"),
        1,
        "the fast append is committed and readable in its stream"
    );
    // The log does not show it yet: the slow transaction could still put an
    // event before it.
    let visible = store
        .read_all(head_before + 1, 100)
        .await
        .expect("read_all");
    assert!(
        visible.is_empty(),
        "nothing past an open older transaction is visible: {visible:?}"
    );
    assert_eq!(store.head_position().await.expect("head"), head_before);

    slow.batch_execute("COMMIT").await.expect("commit");
    let all = store
        .read_all(head_before + 1, 100)
        .await
        .expect("read_all");
    let streams: Vec<&str> = all.iter().map(|e| e.stream.as_str()).collect();
    assert_eq!(
        streams,
        [slow_stream.as_str(), fast_stream.as_str()],
        "the slow transaction's event comes first, and nothing is skipped"
    );
    assert_eq!(all[1].position, fast.position);
    assert!(all[0].position < all[1].position);
    assert_eq!(store.head_position().await.expect("head"), fast.position);
}

/// Two stores on one database, as two hosts: appends to the same streams
/// from both keep every stream's versions contiguous, with every
/// acknowledged event stored once, and both read one global order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_one_database_agree() {
    let server = server().await;
    let a: Arc<dyn EventStore> = Arc::new(open(&server.url("postgres")).await);
    let b: Arc<dyn EventStore> = Arc::new(open(&server.url("postgres")).await);
    let streams: Vec<String> = (0..5).map(|_| new_stream("shared")).collect();
    let mut tasks = Vec::new();
    for (n, host) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        let streams = streams.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for round in 0..40usize {
                let stream = &streams[(round + n) % streams.len()];
                let expected = host.stream_version(stream).await.expect("version");
                let e = event((n * 1000 + round) as u32);
                let (result, _) = append_racing(&*host, stream, expected, &e).await;
                acknowledged.push((stream.clone(), result.version, e.event_id));
            }
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.expect("task"));
    }
    assert_eq!(acknowledged.len(), 160);
    for stream in &streams {
        let stored = read_whole(&*a, stream).await;
        for (i, e) in stored.iter().enumerate() {
            assert_eq!(e.version, i as u64 + 1, "contiguous versions in {stream}");
        }
        let mut ours: Vec<(u64, Uuid)> = acknowledged
            .iter()
            .filter(|(s, _, _)| s == stream)
            .map(|(_, v, id)| (*v, *id))
            .collect();
        ours.sort();
        let stored: Vec<(u64, Uuid)> = stored.iter().map(|e| (e.version, e.event_id)).collect();
        assert_eq!(
            ours, stored,
            "every acknowledged append, once, at its version"
        );
    }
    let from_a = a.read_all(0, 10_000).await.expect("read_all a");
    let from_b = b.read_all(0, 10_000).await.expect("read_all b");
    assert_eq!(from_a.len(), 160);
    assert_eq!(from_a, from_b, "one global order for both hosts");
}

/// A commit on one host wakes subscriptions on another (NOTIFY); when the
/// listening connection is lost the other host polls, and it listens again
/// by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_on_one_host_wake_another_and_polling_covers_a_lost_listener() {
    let server = server().await;
    let a = open(&server.url("postgres")).await;
    let b = open(&server.url("postgres")).await;
    let mut signal = a.commit_signal().expect("a commit signal");
    let listeners = || {
        server
            .sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'")
            .expect("count listeners")
            .trim()
            .parse::<u32>()
            .expect("a count")
    };
    assert!(
        eventually(Duration::from_secs(10), || async { listeners() == 2 }).await,
        "both stores listen"
    );

    signal.borrow_and_update();
    b.append(&new_stream("wake"), ExpectedVersion::NoStream, events(1))
        .await
        .expect("append on b");
    tokio::time::timeout(Duration::from_secs(5), signal.changed())
        .await
        .expect("a's signal changes after b's commit")
        .expect("alive");

    // Cut both listening connections from the server's side.
    server
        .sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'")
        .expect("terminate the listeners");
    // Deaf, a's signal still changes (polling) ...
    signal.borrow_and_update();
    tokio::time::timeout(Duration::from_secs(5), signal.changed())
        .await
        .expect("a polls while it cannot listen")
        .expect("alive");
    // ... and both listen again by themselves.
    assert!(
        eventually(Duration::from_secs(15), || async { listeners() == 2 }).await,
        "the listeners reconnect"
    );
}

/// `?schema=` keeps each store in its own schema; a schema version newer
/// than this build, or a schema holding foreign tables, is refused with
/// what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_versioned_and_separate() {
    let server = server().await;
    let base = server.url("postgres");
    let one = open(&format!("{base}?schema=one")).await;
    let two = open(&format!("{base}?schema=two")).await;
    let s = new_stream("schema");
    one.append(&s, ExpectedVersion::NoStream, events(2))
        .await
        .expect("append");
    assert_eq!(one.stream_version(&s).await.expect("version"), 2);
    assert_eq!(
        two.stream_version(&s).await.expect("version"),
        0,
        "another schema, another store"
    );
    assert_eq!(
        server
            .sql("SELECT value FROM one.meta WHERE key = 'schema_version'")
            .expect("meta")
            .trim(),
        SCHEMA_VERSION.to_string()
    );
    // Reopening finds the store as it was.
    drop(one);
    let one = open(&format!("{base}?schema=one")).await;
    assert_eq!(one.stream_version(&s).await.expect("version"), 2);

    // A store of schema version 1 (no snapshots table) is migrated on open.
    drop(one);
    server
        .sql(
            "DROP TABLE one.snapshots; \
             UPDATE one.meta SET value = '1' WHERE key = 'schema_version'",
        )
        .expect("make it a version 1 store");
    let one = open(&format!("{base}?schema=one")).await;
    let saved = super::conformance::snapshot(&s, 1, 2);
    one.save_snapshot(&saved).await.expect("save a snapshot");
    assert_eq!(one.load_snapshot(&s).await.expect("load"), Some(saved));
    assert_eq!(one.stream_version(&s).await.expect("version"), 2);
    assert_eq!(
        server
            .sql("SELECT value FROM one.meta WHERE key = 'schema_version'")
            .expect("meta")
            .trim(),
        SCHEMA_VERSION.to_string()
    );

    server
        .sql("UPDATE two.meta SET value = '99' WHERE key = 'schema_version'")
        .expect("pretend a newer host wrote it");
    let newer = PostgresStore::open(&format!("{base}?schema=two"))
        .await
        .unwrap_err();
    let text = format!("{newer:#}");
    assert!(text.contains("newer") && text.contains("99"), "{text}");

    server
        .sql("CREATE SCHEMA app; CREATE TABLE app.orders (id int)")
        .expect("a foreign schema");
    let foreign = PostgresStore::open(&format!("{base}?schema=app"))
        .await
        .unwrap_err();
    let text = format!("{foreign:#}");
    assert!(text.contains("not a Rehydra store"), "{text}");
}

/// With the server down, operations fail with `Unavailable` within a
/// bounded time and the health check says so; once it is back the same
/// store works again by itself, and the append that failed wrote nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_then_recovers_by_itself() {
    let mut server = server().await;
    let store = open(&server.url("postgres")).await;
    let s = new_stream("outage");
    store
        .append(&s, ExpectedVersion::NoStream, events(1))
        .await
        .expect("append");
    assert!(store.health().await.is_ok());

    tokio::task::block_in_place(|| server.stop()).expect("stop the server");
    let started = Instant::now();
    let failed = store.append(&s, ExpectedVersion::Exact(1), events(1)).await;
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "got {failed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failed within a bounded time, not after {:?}",
        started.elapsed()
    );
    assert!(matches!(
        store.health().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.read_stream(&s, 1, 10).await,
        Err(StoreError::Unavailable(_))
    ));

    tokio::task::block_in_place(|| server.start_again()).expect("start the server again");
    assert!(
        eventually(Duration::from_secs(30), || async {
            store.health().await.is_ok()
        })
        .await,
        "healthy again"
    );
    let after = store
        .append(&s, ExpectedVersion::Exact(1), events(1))
        .await
        .expect("append after the outage");
    assert_eq!(after.version, 2, "the failed append wrote nothing");
    assert_eq!(read_whole(&store, &s).await.len(), 2);
}

/// The password never shows in the store's description (logs, `/healthz`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_is_masked() {
    let server = server().await;
    let url = server
        .url("postgres")
        .replace("rehydra@", "rehydra:not-the-password@");
    // Trust authentication ignores the password; the URL still carries it.
    let store = open(&url).await;
    let described = store.describe();
    assert!(!described.contains("not-the-password"), "{described}");
    assert!(described.contains("rehydra:***@"), "{described}");
}

/// `sslmode` means what it means to libpq: `require` encrypts without
/// verifying, `verify-full` checks the chain against `sslrootcert` and the
/// host name, and a certificate from another CA is refused with a message
/// that names TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_encrypts_and_verifies_as_libpq_does() {
    let (server, ca) = tokio::task::spawn_blocking(PgServer::start_with_tls)
        .await
        .expect("join")
        .expect("a PostgreSQL server with TLS");
    let base = server.url("postgres");
    let encrypted = || {
        server
            .sql(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                 WHERE ssl AND application_name = 'rehydra'",
            )
            .expect("pg_stat_ssl")
            .trim()
            .parse::<u32>()
            .expect("a count")
    };

    let required = open(&format!("{base}?sslmode=require")).await;
    let s = new_stream("tls");
    required
        .append(&s, ExpectedVersion::NoStream, events(1))
        .await
        .expect("append over TLS");
    assert!(encrypted() > 0, "the store's connections are encrypted");
    drop(required);

    let verified = open(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    ))
    .await;
    assert_eq!(verified.stream_version(&s).await.expect("version"), 1);
    drop(verified);

    // Another CA: the server's certificate does not chain to it.
    let (_other, other_ca) = tokio::task::spawn_blocking(PgServer::start_with_tls)
        .await
        .expect("join")
        .expect("a second server, for its CA");
    let refused = PostgresStore::open(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        other_ca.display()
    ))
    .await
    .unwrap_err();
    let text = format!("{refused:#}");
    assert!(
        text.to_lowercase().contains("certificate"),
        "the error says why: {text}"
    );
}

/// A database that stops answering without closing anything (the network
/// cut, simulated by freezing every server process) fails operations with
/// `Unavailable` within the operation deadline, not never; once it answers
/// again the store works by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_is_unavailable_within_the_deadline() {
    let mut server = server().await;
    let store = open(&server.url("postgres")).await;
    let s = new_stream("silent");
    store
        .append(&s, ExpectedVersion::NoStream, events(1))
        .await
        .expect("append");

    server.freeze().expect("freeze the server");
    // Its outcome is unknown (the server may run it once it answers again),
    // so it is retried with the same event ids, as the actor does.
    let second = events(1);
    let started = Instant::now();
    let failed = store
        .append(&s, ExpectedVersion::Exact(1), second.clone())
        .await;
    let took = started.elapsed();
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "got {failed:?}"
    );
    assert!(
        took < super::postgres::OPERATION_TIMEOUT * 3,
        "gave up within the deadline, not after {took:?}"
    );
    assert!(store.health().await.is_err(), "health reports it");

    server.thaw().expect("thaw the server");
    assert!(
        eventually(Duration::from_secs(30), || async {
            store
                .append(&s, ExpectedVersion::Exact(1), second.clone())
                .await
                .is_ok()
        })
        .await,
        "the store recovers by itself"
    );
    let stored = read_whole(&store, &s).await;
    assert_eq!(
        stored.len(),
        2,
        "stored once, whether the first try or the retry wrote it"
    );
    assert_eq!(stored[1].event_id, second[0].event_id);
}
