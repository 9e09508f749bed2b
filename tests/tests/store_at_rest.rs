//! A host stopped with SIGTERM leaves its embedded store at rest: every
//! answered command stored, the index database holding the whole log (the
//! next start has nothing to catch up), and both WAL files folded into
//! their databases.

use std::time::Duration;

use rehydra_e2e::Host;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_the_store_indexed_and_at_rest() {
    let mut host = Host::start(&["bank-account"]);
    let (status, body) = host
        .command("bank-account", "rest-1", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{body}");
    for amount in 1..=20 {
        let (status, body) = host
            .command(
                "bank-account",
                "rest-1",
                "deposit",
                json!({ "amount": amount }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &host.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert!(
        host.wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "the host exits cleanly; its log:\n{}",
        host.log()
    );

    let data = host.dir.path().join("data");
    let log =
        rusqlite::Connection::open(data.join(rehydra::store::embedded::DB_FILE)).expect("the log");
    let head: i64 = log
        .query_row("SELECT max(position) FROM events", [], |r| r.get(0))
        .expect("the log's head");
    assert_eq!(head, 21, "every answered command is stored");
    let index = rusqlite::Connection::open(data.join(rehydra::store::embedded::INDEX_FILE))
        .expect("the index");
    let indexed: i64 = index
        .query_row("SELECT indexed_up_to FROM index_state", [], |r| r.get(0))
        .expect("the checkpoint");
    assert_eq!(indexed, head, "the index holds the whole log");
    drop((log, index));
    for file in ["events.sqlite3-wal", "index.sqlite3-wal"] {
        assert!(
            !data.join(file).exists(),
            "{file} is left behind: the store was not closed"
        );
    }
}
