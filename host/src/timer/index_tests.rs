//! The timer index on its own: what the log's changes do to it, the order
//! timers come due in, retries, listing, and a file that outlives a host.

use super::event::{StoredChange, StoredTimer};
use super::index::{IndexChange, TimerIndex, TimerQuery};
use crate::plugin::AggregateRef;

fn aggregate(t: &str, id: &str) -> AggregateRef {
    AggregateRef {
        aggregate_type: t.into(),
        id: id.into(),
    }
}

/// A schedule by `source` of `key` (timer `id`) for `target`, due at
/// `due_s` seconds past 2026-01-01, stored at log position `position`.
fn schedule(
    source: &AggregateRef,
    key: &str,
    id: &str,
    target: &AggregateRef,
    due_s: u64,
    position: u64,
) -> IndexChange {
    let due = humantime::parse_rfc3339("2026-01-01T00:00:00Z").expect("time")
        + std::time::Duration::from_secs(due_s);
    IndexChange::Timers {
        source: source.clone(),
        event_id: format!("event-{position}"),
        correlation_id: "corr".into(),
        order: (position, 0),
        change: Box::new(StoredChange::Schedule(StoredTimer {
            id: id.into(),
            key: key.into(),
            target: target.clone(),
            command: "expire".into(),
            data: serde_json::json!({"n": due_s}),
            due: humantime::format_rfc3339_millis(due).to_string(),
        })),
    }
}

fn cancel(source: &AggregateRef, key: &str, position: u64) -> IndexChange {
    IndexChange::Timers {
        source: source.clone(),
        event_id: format!("event-{position}"),
        correlation_id: "corr".into(),
        order: (position, 0),
        change: Box::new(StoredChange::Cancel { key: key.into() }),
    }
}

/// Unix ms of `s` seconds past 2026-01-01.
fn at(s: u64) -> u64 {
    1_767_225_600_000 + s * 1000
}

fn ids(timers: &[super::PendingTimer]) -> Vec<&str> {
    timers.iter().map(|t| t.id.as_str()).collect()
}

#[test]
fn schedules_replace_by_key_cancels_remove_and_fired_timers_go() {
    let index = TimerIndex::open(None).expect("opens");
    let o1 = aggregate("order", "o1");
    let inv = aggregate("inventory", "sku-1");
    index
        .apply(
            &[
                schedule(&o1, "deadline", "t1", &o1, 60, 1),
                schedule(&o1, "reserve", "t2", &inv, 0, 1),
                schedule(&o1, "reminder", "t3", &o1, 30, 2),
            ],
            2,
        )
        .expect("applied");
    let mut keys = index.pending_keys(&o1).expect("keys");
    keys.sort();
    assert_eq!(keys, ["deadline", "reminder", "reserve"]);
    assert_eq!(index.checkpoint().expect("checkpoint"), 2);

    // Scheduling a pending key again replaces that timer.
    index
        .apply(&[schedule(&o1, "deadline", "t4", &o1, 90, 3)], 3)
        .expect("applied");
    let (all, count) = index
        .list(&TimerQuery {
            aggregate: None,
            limit: 10,
        })
        .expect("listed");
    assert_eq!(count, 3);
    assert_eq!(ids(&all), ["t2", "t3", "t4"], "earliest due first");
    // A cancel takes the key; a fired timer goes by id; a cancel of a key
    // that is not pending changes nothing.
    index
        .apply(
            &[
                cancel(&o1, "reminder", 4),
                IndexChange::Fired { id: "t2".into() },
                cancel(&o1, "never-scheduled", 4),
            ],
            4,
        )
        .expect("applied");
    assert_eq!(index.pending_keys(&o1).expect("keys"), ["deadline"]);
    assert_eq!(index.pending().expect("count"), 1);
    // Reading the same changes again (after a crash) counts nothing twice.
    index
        .apply(&[schedule(&o1, "deadline", "t4", &o1, 90, 3)], 5)
        .expect("applied");
    assert_eq!(index.pending().expect("count"), 1);
    // A fired id of a replaced timer does not touch its replacement.
    index
        .apply(&[IndexChange::Fired { id: "t1".into() }], 5)
        .expect("applied");
    assert_eq!(index.pending_keys(&o1).expect("keys"), ["deadline"]);
}

#[test]
fn due_timers_come_in_due_then_log_order_and_retries_wait() {
    let index = TimerIndex::open(None).expect("opens");
    let a = aggregate("order", "a");
    let b = aggregate("order", "b");
    index
        .apply(
            &[
                schedule(&b, "k", "late-log", &b, 10, 7),
                schedule(&a, "k", "early-log", &a, 10, 5),
                schedule(&a, "k2", "first", &a, 5, 9),
                schedule(&a, "k3", "future", &a, 100, 9),
            ],
            9,
        )
        .expect("applied");
    assert_eq!(index.next_attempt_ms().expect("next"), Some(at(5)));
    let due = index.due(at(10), 10).expect("due");
    assert_eq!(ids(&due), ["first", "early-log", "late-log"]);
    assert_eq!(
        ids(&index.due(at(10), 2).expect("due")),
        ["first", "early-log"]
    );

    // A failed attempt waits until its next attempt, and says why.
    index
        .retry_later("first", at(50), "store_unavailable")
        .expect("recorded");
    assert_eq!(
        ids(&index.due(at(10), 10).expect("due")),
        ["early-log", "late-log"]
    );
    let retried = index
        .list(&TimerQuery {
            aggregate: Some(a.clone()),
            limit: 10,
        })
        .expect("listed")
        .0
        .into_iter()
        .find(|t| t.id == "first")
        .expect("still pending");
    assert_eq!(retried.attempts, 1);
    assert_eq!(retried.last_error.as_deref(), Some("store_unavailable"));
    assert_eq!(
        retried.next_attempt.as_deref(),
        Some("2026-01-01T00:00:50.000Z")
    );
    assert_eq!(
        retried.due, "2026-01-01T00:00:05.000Z",
        "its due time stays"
    );
    index.remove("early-log").expect("removed");
    assert_eq!(ids(&index.due(at(10), 10).expect("due")), ["late-log"]);
    assert_eq!(index.pending().expect("count"), 3);
}

#[test]
fn an_aggregate_lists_the_timers_it_scheduled_and_those_for_it() {
    let index = TimerIndex::open(None).expect("opens");
    let o1 = aggregate("order", "o1");
    let o2 = aggregate("order", "o2");
    let inv = aggregate("inventory", "sku-1");
    index
        .apply(
            &[
                schedule(&o1, "reserve", "t1", &inv, 1, 1),
                schedule(&o2, "reserve", "t2", &inv, 2, 2),
                schedule(&o2, "deadline", "t3", &o2, 3, 2),
            ],
            2,
        )
        .expect("applied");
    let list = |a: &AggregateRef, limit| {
        index
            .list(&TimerQuery {
                aggregate: Some(a.clone()),
                limit,
            })
            .expect("listed")
    };
    let (timers, count) = list(&inv, 10);
    assert_eq!((ids(&timers), count), (vec!["t1", "t2"], 2));
    let (timers, count) = list(&o2, 1);
    assert_eq!(
        (ids(&timers), count),
        (vec!["t2"], 2),
        "limited, counted in all"
    );
    assert_eq!(timers[0].scheduled_by, o2);
    assert_eq!(timers[0].target, inv);
    assert_eq!(timers[0].data, serde_json::json!({"n": 2}));
    assert_eq!(timers[0].scheduled_in, "event-2");
    assert_eq!(timers[0].correlation_id, "corr");
    assert_eq!(list(&aggregate("order", "o9"), 10).1, 0);
}

#[test]
fn the_file_keeps_its_timers_and_checkpoint_and_another_layout_is_rebuilt() {
    let dir = tempfile::tempdir().expect("a directory");
    let path = dir.path().join("timers.sqlite3");
    let o1 = aggregate("order", "o1");
    {
        let index = TimerIndex::open(Some(&path)).expect("opens");
        index
            .apply(&[schedule(&o1, "k", "t1", &o1, 1, 41)], 42)
            .expect("applied");
    }
    let index = TimerIndex::open(Some(&path)).expect("opens again");
    assert_eq!(index.checkpoint().expect("checkpoint"), 42);
    assert_eq!(index.pending_keys(&o1).expect("keys"), ["k"]);
    index.reset().expect("reset");
    assert_eq!(index.checkpoint().expect("checkpoint"), 0);
    assert!(index.pending_keys(&o1).expect("keys").is_empty());
    index
        .apply(&[schedule(&o1, "k", "t1", &o1, 1, 41)], 42)
        .expect("applied");
    drop(index);

    // A file of another layout (a later host's, say) is emptied, to be read
    // from the log again.
    let conn = rusqlite::Connection::open(&path).expect("opens");
    conn.execute("UPDATE timer_state SET format = 99", [])
        .expect("updated");
    drop(conn);
    let index = TimerIndex::open(Some(&path)).expect("opens");
    assert_eq!(index.checkpoint().expect("checkpoint"), 0);
    assert!(index.pending_keys(&o1).expect("keys").is_empty());
}

#[test]
fn a_directory_that_does_not_exist_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("a directory");
    let err = TimerIndex::open(Some(&dir.path().join("missing").join("timers.sqlite3")))
        .expect_err("refused");
    let message = err.to_string();
    assert!(message.contains("missing"), "{message}");
    assert!(message.contains("--timer-index"), "{message}");
}

#[tokio::test]
async fn waiting_for_the_index_ends_once_it_has_read_far_enough() {
    let index = std::sync::Arc::new(TimerIndex::open(None).expect("opens"));
    let short = std::time::Duration::from_millis(50);
    assert!(index.wait_until_read(0, short).await);
    assert!(!index.wait_until_read(5, short).await, "nothing read yet");
    let reader = index.clone();
    let waiting = tokio::spawn(async move {
        reader
            .wait_until_read(5, std::time::Duration::from_secs(10))
            .await
    });
    index.mark_read(3);
    index.mark_read(7);
    assert!(waiting.await.expect("joined"));
    index.mark_read(2);
    assert_eq!(index.read_up_to(), 7, "it never moves back");
}
