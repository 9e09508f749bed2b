//! Overload and abuse, end to end: past `--max-in-flight` or
//! `--max-guest-queue` a command is refused at once with `overloaded` (503,
//! `Retry-After`) instead of queueing; a command whose caller has gone is
//! dropped before it runs; aggregates that do not exist occupy no cache and
//! the resident set is capped in bytes; past `--max-connections` a new
//! connection waits for room; every number a client sends is checked.

use std::time::{Duration, Instant};

use rehydra_e2e::{Host, code};
use serde_json::json;

/// Waits up to `within` for `condition` on the host's metrics text.
async fn until_metrics(host: &Host, within: Duration, condition: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition(&host.metrics().await) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Sends `command` with `{}` to the `faulty` aggregate `id` in a task of
/// its own; the task answers the status and the JSON body.
fn spawn_command(
    host: &Host,
    id: &str,
    command: &str,
) -> tokio::task::JoinHandle<(u16, serde_json::Value)> {
    let url = format!("{}/v1/aggregates/faulty/{id}/commands/{command}", host.base);
    tokio::spawn(async move {
        let resp = reqwest::Client::new()
            .post(url)
            .body("{}")
            .send()
            .await
            .expect("the host answers");
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.expect("JSON");
        (status, body)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_a_command_is_overloaded_at_once() {
    let host = Host::start_with(
        &["faulty"],
        &["--max-in-flight", "2", "--handle-deadline", "1500ms"],
    );
    // Two commands that hold the guest until their deadline.
    let spins: Vec<_> = ["s1", "s2"]
        .into_iter()
        .map(|id| spawn_command(&host, id, "spin"))
        .collect();
    // Both have reached their actors.
    assert!(
        until_metrics(&host, Duration::from_secs(10), |m| m.lines().any(
            |l| l == "rehydra_command_queue_wait_seconds_count{aggregate_type=\"faulty\"} 2"
        ))
        .await,
        "the two spins started"
    );

    let asked = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/aggregates/faulty/s3/commands/ok", host.base))
        .body("{}")
        .send()
        .await
        .expect("the host answers");
    let answered_in = asked.elapsed();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.expect("JSON");
    assert_eq!(code(&body), "overloaded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-in-flight")),
        "{body}"
    );
    assert!(
        answered_in < Duration::from_secs(1),
        "refused at once, not after {answered_in:?}"
    );

    for spin in spins {
        assert_eq!(
            spin.await.expect("a spin").0,
            500,
            "the spins ran out of time"
        );
    }
    let (status, body) = host.command("faulty", "s3", "ok", json!({})).await;
    assert_eq!(status, 200, "served again once there is room: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_caller_has_gone_is_not_run() {
    let host = Host::start_with(
        &["faulty"],
        &["--command-timeout", "300ms", "--handle-deadline", "2s"],
    );
    // The aggregate's actor is busy for two seconds ...
    let (status, body) = host.command("faulty", "t1", "spin", json!({})).await;
    assert_eq!((status, code(&body)), (504, "timeout"), "{body}");
    // ... so this command waits behind it, and its caller gives up first.
    let (status, body) = host.command("faulty", "t1", "ok", json!({})).await;
    assert_eq!((status, code(&body)), (504, "timeout"), "{body}");

    // Once the spin is over, the actor drops the abandoned command.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host
        .log()
        .contains("dropped a command whose caller has gone")
    {
        assert!(
            Instant::now() < deadline,
            "the abandoned command was not dropped; log:\n{}",
            host.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next command is the aggregate's first: the abandoned one never ran.
    let (status, body) = host.command("faulty", "t1", "ok", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["version"], 1,
        "nothing ran for the caller that had gone: {body}"
    );
}

/// Reads (and refused commands) for aggregates that do not exist leave
/// nothing in memory, so a client asking for random ids cannot push the
/// resident aggregates out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_that_do_not_exist_do_not_occupy_the_cache() {
    let host = Host::start(&["bank-account"]);
    let (status, _) = host
        .command("bank-account", "real", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200);
    for i in 0..300 {
        let (status, body) = host
            .get(&format!("/v1/aggregates/bank-account/ghost-{i}"))
            .await;
        assert_eq!(
            (status, code(&body)),
            (404, "aggregate_not_found"),
            "{body}"
        );
    }
    // An update command for a missing aggregate is refused and not kept either.
    let (status, body) = host
        .command("bank-account", "ghost-x", "deposit", json!({"amount": 1}))
        .await;
    assert_eq!(
        (status, code(&body)),
        (404, "aggregate_not_found"),
        "{body}"
    );

    // Each actor lets go of its empty slot just after answering: wait for
    // the last one.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, health) = host.get("/healthz").await;
        if health["resident_aggregates"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only the real aggregate stays resident: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A ghost that then comes to exist is served as any other.
    let (status, body) = host
        .command("bank-account", "ghost-7", "open", json!({"owner": "Bob"}))
        .await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(1)), "{body}");
    let (status, state) = host.get("/v1/aggregates/bank-account/ghost-7").await;
    assert_eq!(
        (status, state["state"]["owner"].as_str()),
        (200, Some("Bob")),
        "{state}"
    );
}

/// The resident set is capped in bytes of state as well as in count: past
/// `--max-resident-bytes` the least recently used aggregates are evicted,
/// and still load from the store when asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resident_set_is_capped_in_bytes() {
    let host = Host::start_with(&["bank-account"], &["--max-resident-bytes", "2000"]);
    for i in 0..100 {
        let (status, body) = host
            .command(
                "bank-account",
                &format!("b-{i}"),
                "open",
                json!({"owner": "Ada"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let bytes = |text: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix("rehydra_resident_state_bytes "))
            .and_then(|v| v.parse().ok())
    };
    assert!(
        until_metrics(&host, Duration::from_secs(10), |m| bytes(m)
            .is_some_and(|b| b <= 2000.0))
        .await,
        "the state bytes held come down to the cap"
    );
    let (_, health) = host.get("/healthz").await;
    let resident = health["resident_aggregates"].as_u64().expect("a count");
    assert!(resident < 100, "some aggregates were evicted: {health}");
    // An evicted aggregate is loaded again from its events.
    let (status, state) = host.get("/v1/aggregates/bank-account/b-0").await;
    assert_eq!(
        (status, state["state"]["owner"].as_str()),
        (200, Some("Ada")),
        "{state}"
    );
}

/// Guest calls wait for a plugin's threads in a bounded queue: with every
/// thread busy and `--max-guest-queue` calls waiting, the next command is
/// refused at once with `overloaded`, and the waiting one still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_guest_queue_a_command_is_overloaded() {
    let host = Host::start_with(
        &["faulty"],
        &[
            "--max-guest-queue",
            "1",
            "--handle-deadline",
            "1s",
            "--poison-after",
            "0",
        ],
    );
    let post = |id: &str, command: &str| spawn_command(&host, id, command);
    // Four spins hold the plugin's four guest threads to their deadline.
    let spins: Vec<_> = ["s1", "s2", "s3", "s4"]
        .into_iter()
        .map(|id| post(id, "spin"))
        .collect();
    assert!(
        until_metrics(&host, Duration::from_secs(30), |m| m
            .lines()
            .any(|l| l == "rehydra_guest_calls_running{plugin=\"faulty\"} 4"))
        .await,
        "the spins run on all four guest threads"
    );
    let waiting = post("q1", "ok");
    assert!(
        until_metrics(&host, Duration::from_secs(10), |m| m
            .lines()
            .any(|l| l == "rehydra_guest_queue_depth{plugin=\"faulty\"} 1"))
        .await,
        "a call waits for a guest thread: {}",
        host.metrics().await
    );
    let (status, body) = post("q2", "ok").await.expect("join");
    assert_eq!((status, code(&body)), (503, "overloaded"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-guest-queue")),
        "{body}"
    );
    let (status, body) = waiting.await.expect("join");
    assert_eq!(status, 200, "the queued call ran: {body}");
    for spin in spins {
        assert_eq!(
            spin.await.expect("join").0,
            500,
            "the spins ran out of time"
        );
    }
}

/// Past `--max-connections` the host accepts no more connections until one
/// closes: a client holding sockets open cannot grow the host's memory
/// with them. The waiting connection is served once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_connection_waits_for_room() {
    let host = Host::start_with(&["faulty"], &["--max-connections", "2"]);
    let addr = host.base.trim_start_matches("http://").to_owned();
    // Two idle connections take the room.
    let idle1 = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let _idle2 = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let request = {
        let base = host.base.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(format!("{base}/livez"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !request.is_finished(),
        "answered while two connections were open"
    );
    drop(idle1);
    let status = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("served once a connection closed")
        .expect("join")
        .expect("an answer");
    assert_eq!(status, 200);
}

/// Every number a client sends is checked: past `u64`, negative or not a
/// number is `400 malformed_request`; the largest `u64` is an answer, never
/// a panic or a wrapped value; nothing is stored by the refused commands
/// and the host serves on.
#[tokio::test]
async fn numbers_a_client_sends_are_checked() {
    let host = Host::start(&["bank-account"]);
    let (status, body) = host
        .command("bank-account", "n1", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let stream = format!("{}-n1", rehydra_e2e::stream_prefix("bank-account"));
    let too_big = "18446744073709551616";
    for query in [
        format!("/v1/streams/{stream}?from={too_big}"),
        format!("/v1/streams/{stream}?from=-1"),
        format!("/v1/streams/{stream}?limit={too_big}"),
        format!("/v1/streams/{stream}?limit=-1"),
        format!("/v1/subscribe?from={too_big}"),
        "/v1/subscribe?from=-1".to_owned(),
    ] {
        let (status, body) = host.get(&query).await;
        assert_eq!(
            (status, code(&body)),
            (400, "malformed_request"),
            "{query}: {body}"
        );
    }
    // The largest values are read as what they say.
    let (status, body) = host
        .get(&format!(
            "/v1/streams/{stream}?from=18446744073709551615&limit=18446744073709551615"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]), "nothing that far: {body}");

    for if_match in [too_big, "-1", "3.0", "\"\""] {
        let (status, body) = host
            .command_raw(
                "bank-account",
                "n1",
                "deposit",
                r#"{"amount":1}"#,
                &[("If-Match", if_match)],
            )
            .await;
        assert_eq!(
            (status, code(&body)),
            (400, "malformed_request"),
            "If-Match {if_match}: {body}"
        );
    }
    let (status, body) = host
        .command_raw(
            "bank-account",
            "n1",
            "deposit",
            r#"{"amount":1}"#,
            &[("If-Match", "18446744073709551615")],
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (409, "wrong_expected_version"),
        "{body}"
    );
    let (status, body) = host.get("/v1/aggregates/bank-account/n1").await;
    assert_eq!(
        (status, body["version"].as_u64()),
        (200, Some(1)),
        "nothing stored: {body}"
    );
}
