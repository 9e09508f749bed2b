//! The embedded store under a loop of `kill -9`, written to through its
//! own API by a process of its own (`store-writer`, no host around it): the
//! in-process twin of `crash_loop.rs`, which goes through the binary.
//!
//! Each round starts the writer on the same directory, lets its tasks append
//! for a random moment, and kills it. Then, while nothing has the store
//! open, its files are checked (`rehydra_e2e::store_files`: no gap in
//! positions or versions, no event id twice, the index database consistent
//! with the log and its checkpoint not ahead of it), and every append the
//! writer acknowledged in that round must be in the log, each event at the
//! stream and version it was acknowledged with. At the end the store is
//! opened in this process and every acknowledged event is read back
//! through the store's API, which reads the index that each open caught
//! up from the log.
//!
//! The kill moments come from a seed printed at the start; set
//! `REHYDRA_CRASH_SEED` to replay a run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rehydra::store::EventStore;
use rehydra::store::embedded::EmbeddedStore;
use rehydra_e2e::seeded::{Moments, seed};
use rehydra_e2e::store_files::check_store_file;

const KILLS: usize = 50;
const WRITERS: usize = 4;

/// An acknowledged event: its stream and the version it got.
type Placed = (String, u64);

#[test]
fn fifty_kills_of_a_process_appending_lose_and_duplicate_nothing_acknowledged() {
    let seed = seed("REHYDRA_CRASH_SEED");
    let mut moments = Moments::new(seed);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("data");

    let mut acked: HashMap<String, Placed> = HashMap::new();
    let mut checked_up_to = 0i64;
    for kill in 0..KILLS {
        let round = run_and_kill(&data, moments.next_ms(5, 700), kill);
        check_store_file(&data, kill);
        // This round's appends can only be above what earlier rounds left.
        let stored = log_since(&data, checked_up_to);
        for (id, placed) in &round {
            assert_eq!(
                stored.get(id).map(|(at, _)| at),
                Some(placed),
                "kill {kill}: the acknowledged event {id} is not in the log where it was placed"
            );
        }
        checked_up_to = stored
            .values()
            .map(|(_, position)| *position)
            .max()
            .unwrap_or(checked_up_to);
        for (id, placed) in round {
            let earlier = acked.insert(id, placed);
            assert_eq!(earlier, None, "kill {kill}: an event id acknowledged twice");
        }
    }
    assert!(
        acked.len() >= KILLS * WRITERS,
        "the writer made progress: {} events acknowledged",
        acked.len()
    );

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let (stored, unacknowledged) = runtime.block_on(read_back(&data, &acked));
    eprintln!(
        "store crash loop (seed {seed}): {KILLS} kills, {} events acknowledged, all stored once \
         where acknowledged; {unacknowledged} stored whose acknowledgement the kill cut off; \
         {stored} in the log",
        acked.len()
    );
}

/// Starts the writer on `data`, kills it `after_ms` after it is ready, and
/// returns the events it acknowledged: id -> (stream, version).
fn run_and_kill(data: &Path, after_ms: u64, kill: usize) -> HashMap<String, Placed> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-writer"))
        .arg(data)
        .arg(WRITERS.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the store writer starts");
    let stdout = child.stdout.take().expect("its output");
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let first = received.recv_timeout(Duration::from_secs(60));
    assert_eq!(
        first.as_deref(),
        Ok("ready"),
        "kill {kill}: the writer did not open the store"
    );
    std::thread::sleep(Duration::from_millis(after_ms));
    if let Ok(Some(status)) = child.try_wait() {
        panic!("kill {kill}: the writer stopped on its own ({status}); see its output above");
    }
    child.kill().expect("kill -9");
    child.wait().expect("the writer is reaped");
    reader.join().expect("the output reader");

    let mut round = HashMap::new();
    for line in received.try_iter() {
        // Whatever the kill cut off mid-line was never acknowledged.
        let mut fields = line.split(' ');
        let (Some("ack"), Some(stream), Some(first), Some(ids), None) = (
            fields.next(),
            fields.next(),
            fields.next().and_then(|v| v.parse::<u64>().ok()),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        for (i, id) in ids.split(',').enumerate() {
            let placed = (stream.to_owned(), first + i as u64);
            assert!(
                round.insert(id.to_owned(), placed).is_none(),
                "kill {kill}: {id} acknowledged twice"
            );
        }
    }
    round
}

/// The log's events above position `after`: id -> ((stream, version),
/// position).
fn log_since(data: &Path, after: i64) -> HashMap<String, (Placed, i64)> {
    let log = rusqlite::Connection::open(data.join(rehydra::store::embedded::DB_FILE))
        .expect("the log opens");
    let mut select = log
        .prepare("SELECT event_id, stream, version, position FROM events WHERE position > ?1")
        .expect("select");
    let rows = select
        .query_map([after], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .expect("rows");
    rows.map(|row| {
        let (id, stream, version, position) = row.expect("a row");
        let id = uuid::Uuid::from_slice(&id)
            .expect("an event id")
            .to_string();
        let version = u64::try_from(version).expect("a version");
        (id, ((stream, version), position))
    })
    .collect()
}

/// Opens the store and reads every stream through its API: every
/// acknowledged event is there at its version, and no event twice.
/// Returns how many events are stored, and how many of them were never
/// acknowledged.
async fn read_back(data: &Path, acked: &HashMap<String, Placed>) -> (usize, usize) {
    let store = EmbeddedStore::open(data).await.expect("the store opens");
    let mut seen: HashMap<String, Placed> = HashMap::new();
    for t in 0..WRITERS {
        let stream = format!("s-{t}");
        let mut from = 1;
        loop {
            let page = store
                .read_stream(&stream, from, 1000)
                .await
                .expect("a read");
            for event in &page {
                assert_eq!(event.version, from, "{stream}: a gap at {from}");
                from += 1;
                let placed = (stream.clone(), event.version);
                assert!(
                    seen.insert(event.event_id.to_string(), placed).is_none(),
                    "{stream}: {} read twice",
                    event.event_id
                );
            }
            if page.len() < 1000 {
                break;
            }
        }
    }
    for (id, placed) in acked {
        assert_eq!(
            seen.get(id),
            Some(placed),
            "the acknowledged event {id} does not read back where it was placed"
        );
    }
    store.close().await;
    (seen.len(), seen.len() - acked.len())
}
