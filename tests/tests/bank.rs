//! The bank-account example end to end over HTTP: the domain flow, 100
//! concurrent commands to one aggregate, idempotent retries, and the error
//! codes for bad requests.

use std::collections::BTreeSet;

use rehydra_e2e::{Host, code};
use serde_json::json;

#[tokio::test]
async fn bank_flow() {
    let host = Host::start(&["bank-account"]);
    let (status, body) = host
        .command("bank-account", "acc-1", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(
        body["events"][0],
        json!({"type": "Opened", "version": 1, "data": {"owner": "Ada"}})
    );

    let (status, body) = host
        .command("bank-account", "acc-1", "deposit", json!({"amount": 100}))
        .await;
    assert_eq!((status, body["version"].clone()), (200, json!(2)), "{body}");
    let (status, body) = host
        .command("bank-account", "acc-1", "withdraw", json!({"amount": 30}))
        .await;
    assert_eq!((status, body["version"].clone()), (200, json!(3)), "{body}");

    let (status, body) = host
        .command("bank-account", "acc-1", "withdraw", json!({"amount": 1000}))
        .await;
    assert_eq!((status, code(&body)), (422, "rejected"), "{body}");
    assert_eq!(body["error"]["message"], "insufficient funds");

    for bad in [
        json!({"amount": 0}),
        json!({"amount": -5}),
        json!({}),
        json!({"amount": "ten"}),
    ] {
        let (status, body) = host
            .command("bank-account", "acc-1", "deposit", bad.clone())
            .await;
        assert_eq!(
            (status, code(&body)),
            (422, "invalid_command"),
            "{bad}: {body}"
        );
        assert_eq!(
            body["error"]["details"]["fields"][0]["field"], "amount",
            "{bad}: {body}"
        );
    }

    let (status, body) = host
        .command("bank-account", "acc-1", "open", json!({"owner": "Bob"}))
        .await;
    assert_eq!((status, code(&body)), (409, "already_exists"), "{body}");
    let (status, body) = host
        .command("bank-account", "nope", "deposit", json!({"amount": 1}))
        .await;
    assert_eq!(
        (status, code(&body)),
        (404, "aggregate_not_found"),
        "{body}"
    );

    // `close` takes no fields: an empty body works.
    let (status, body) = host
        .command_raw("bank-account", "acc-1", "close", "", &[])
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = host
        .command("bank-account", "acc-1", "deposit", json!({"amount": 5}))
        .await;
    assert_eq!((status, code(&body)), (422, "rejected"), "{body}");

    let (status, body) = host.get("/v1/aggregates/bank-account/acc-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 4);
    assert_eq!(
        body["state"],
        json!({"owner": "Ada", "balance": 70, "open": false})
    );

    // Nothing refused was stored.
    let (_, body) = host.get("/v1/streams/bank_account-acc-1").await;
    let types: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Opened", "Deposited", "Withdrawn", "Closed"]);
}

#[tokio::test]
async fn hundred_concurrent_commands_apply_exactly_once() {
    let host = Host::start(&["bank-account"]);
    let (status, _) = host
        .command("bank-account", "hot", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200);

    let mut tasks = Vec::new();
    for i in 0..100 {
        let base = host.base.clone();
        tasks.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(format!(
                    "{base}/v1/aggregates/bank-account/hot/commands/deposit"
                ))
                .header("content-type", "application/json")
                .body(json!({"amount": i + 1}).to_string())
                .send()
                .await
                .expect("the host answers");
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.expect("JSON");
            (status, body)
        }));
    }
    let mut versions = BTreeSet::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, 200, "{body}");
        versions.insert(body["version"].as_u64().unwrap());
    }
    // Every command got its own version: 2..=101, no gaps, no repeats.
    assert_eq!(versions, (2..=101).collect::<BTreeSet<u64>>());

    let (_, body) = host.get("/v1/aggregates/bank-account/hot").await;
    assert_eq!(body["version"], 101);
    assert_eq!(body["state"]["balance"], (1..=100).sum::<u64>());

    let mut stored = Vec::new();
    let mut from = 1;
    loop {
        let (_, page) = host
            .get(&format!(
                "/v1/streams/bank_account-hot?from={from}&limit=40"
            ))
            .await;
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            break;
        }
        from = events.last().unwrap()["version"].as_u64().unwrap() + 1;
        stored.extend(events);
    }
    let stored_versions: Vec<u64> = stored
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(stored_versions, (1..=101).collect::<Vec<u64>>());
    let amounts: BTreeSet<u64> = stored[1..]
        .iter()
        .map(|e| e["data"]["amount"].as_u64().unwrap())
        .collect();
    assert_eq!(
        amounts,
        (1..=100).collect::<BTreeSet<u64>>(),
        "each deposit stored exactly once"
    );
}

#[tokio::test]
async fn idempotent_retry_returns_the_original_outcome() {
    let mut host = Host::start(&["bank-account"]);
    host.command("bank-account", "acc-9", "open", json!({"owner": "Ada"}))
        .await;
    let headers = [("idempotency-key", "deposit-0001")];
    let (status, first) = host
        .command_raw(
            "bank-account",
            "acc-9",
            "deposit",
            r#"{"amount":25}"#,
            &headers,
        )
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["version"], 2);

    // Another command in between, then the retry.
    host.command("bank-account", "acc-9", "deposit", json!({"amount": 1}))
        .await;
    let (status, again) = host
        .command_raw(
            "bank-account",
            "acc-9",
            "deposit",
            r#"{"amount":25}"#,
            &headers,
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["version"], 2);
    assert_eq!(again["events"], first["events"]);
    assert_eq!(again["replayed"], true);

    // Still after a crash and restart.
    host.restart();
    let (status, after) = host
        .command_raw(
            "bank-account",
            "acc-9",
            "deposit",
            r#"{"amount":25}"#,
            &headers,
        )
        .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["events"], first["events"]);

    let (_, body) = host.get("/v1/aggregates/bank-account/acc-9").await;
    assert_eq!(body["version"], 3, "the retries appended nothing");
    assert_eq!(body["state"]["balance"], 26);
    let (_, stream) = host.get("/v1/streams/bank_account-acc-9").await;
    assert_eq!(stream["events"][1]["metadata"]["messageId"], "deposit-0001");
}

#[tokio::test]
async fn bad_requests_get_their_codes() {
    let host = Host::start_with(&["bank-account"], &["--max-command-bytes", "4096"]);
    host.command("bank-account", "acc-1", "open", json!({"owner": "Ada"}))
        .await;

    // (type, id, command, body, headers, status, code)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "bank-account",
            "acc-1",
            "deposit",
            "{not json",
            vec![],
            400,
            "malformed_request",
        ),
        (
            "bank-account",
            "acc-1",
            "deposit",
            "[1,2]",
            vec![],
            400,
            "malformed_request",
        ),
        (
            "bank-account",
            "acc-1",
            "deposit",
            "{\"amount\":1}",
            vec![("if-match", "seven")],
            400,
            "malformed_request",
        ),
        (
            "bank-account",
            "acc-1",
            "deposit",
            "{\"amount\":1}",
            vec![("idempotency-key", "has space")],
            400,
            "malformed_request",
        ),
        (
            "bank-account",
            "bad%20id",
            "deposit",
            "{\"amount\":1}",
            vec![],
            400,
            "malformed_request",
        ),
        (
            "no-such-type",
            "x",
            "deposit",
            "{}",
            vec![],
            404,
            "unknown_aggregate_type",
        ),
        (
            "bank-account",
            "acc-1",
            "transfer",
            "{}",
            vec![],
            404,
            "unknown_command",
        ),
    ];
    for (t, id, cmd, body, headers, want_status, want_code) in cases {
        let (status, resp) = host.command_raw(t, id, cmd, body, &headers).await;
        assert_eq!(
            (status, code(&resp)),
            (want_status, want_code),
            "{t}/{id}/{cmd} {body} {headers:?}: {resp}"
        );
        assert!(
            resp["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    let big = json!({"amount": 1, "note": "x".repeat(8000)}).to_string();
    let (status, resp) = host
        .command_raw("bank-account", "acc-1", "deposit", &big, &[])
        .await;
    assert_eq!((status, code(&resp)), (413, "payload_too_large"), "{resp}");

    let (status, resp) = host.get("/v1/nothing-here").await;
    assert_eq!((status, code(&resp)), (404, "not_found"), "{resp}");

    // None of it was stored; the aggregate is still at version 1 and works.
    let (status, resp) = host
        .command("bank-account", "acc-1", "deposit", json!({"amount": 2}))
        .await;
    assert_eq!((status, resp["version"].clone()), (200, json!(2)), "{resp}");

    let (status, plugins) = host.get("/v1/plugins").await;
    assert_eq!(status, 200);
    let p = &plugins["plugins"][0];
    assert_eq!(p["aggregate_type"], "bank-account");
    assert_eq!(p["stream_prefix"], "bank_account");
    assert_eq!(p["hash"].as_str().unwrap().len(), 64);
    let commands: Vec<(&str, &str)> = p["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        commands,
        [
            ("open", "create"),
            ("deposit", "update"),
            ("withdraw", "update"),
            ("close", "update")
        ]
    );

    let (status, health) = host.get("/healthz").await;
    assert_eq!(
        (status, health["status"].as_str()),
        (200, Some("ok")),
        "{health}"
    );
}
