//! The bank-account example end to end over HTTP: the domain flow, 100
//! concurrent commands to one aggregate, idempotent retries, and the error
//! codes for bad requests.
//!
//! One behaviour suite, three implementations: every scenario runs against
//! the Rust, JavaScript and Python bank accounts (`<scenario>::rust`,
//! `::js`, `::python`), and one more test checks that the three give the
//! very same answer to a long list of requests, also after a restart.

use std::collections::BTreeSet;

use rehydra_e2e::{BANK_ACCOUNTS, Host, code, for_each_bank_account, stream_prefix};
use serde_json::{Value, json};

for_each_bank_account!(
    bank_flow,
    hundred_concurrent_commands_apply_exactly_once,
    idempotent_retry_returns_the_original_outcome,
    bad_requests_get_their_codes,
    a_dry_run_reports_what_would_happen_and_stores_nothing,
);

/// `?dry_run=true` runs `handle` on the current state and answers with the
/// events, reply and state the command would produce; nothing is stored,
/// and the aggregate's next real command sees the state as it was.
async fn a_dry_run_reports_what_would_happen_and_stores_nothing(plugin: &str) {
    let host = Host::start(&[plugin]);
    host.command(plugin, "dry-1", "open", json!({"owner": "Ada"}))
        .await;
    host.command(plugin, "dry-1", "deposit", json!({"amount": 100}))
        .await;
    let dry =
        |command: &'static str, body: &'static str, headers: Vec<(&'static str, &'static str)>| {
            let host = &host;
            async move {
                let resp = reqwest::Client::new()
                    .post(format!(
                        "{}/v1/aggregates/{plugin}/dry-1/commands/{command}?dry_run=true",
                        host.base
                    ))
                    .header("content-type", "application/json")
                    .headers(
                        headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    reqwest::header::HeaderName::from_static(k),
                                    reqwest::header::HeaderValue::from_static(v),
                                )
                            })
                            .collect(),
                    )
                    .body(body)
                    .send()
                    .await
                    .expect("the host answers");
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.expect("JSON"))
            }
        };

    let (status, body) = dry("withdraw", r#"{"amount":30}"#, vec![]).await;
    assert_eq!(status, 200, "{plugin}: {body}");
    assert_eq!(body["dry_run"], true, "{plugin}: {body}");
    assert_eq!(
        body["version"], 3,
        "{plugin}: the version it would reach: {body}"
    );
    assert_eq!(
        body["events"],
        json!([{"type": "Withdrawn", "version": 3, "data": {"amount": 30}}]),
        "{plugin}"
    );
    assert_eq!(
        body["state"]["balance"], 70,
        "{plugin}: the state it would produce: {body}"
    );

    // Nothing was stored, and the cached state is untouched.
    let (_, state) = host.get(&format!("/v1/aggregates/{plugin}/dry-1")).await;
    assert_eq!(
        (
            state["version"].as_u64(),
            state["state"]["balance"].as_u64()
        ),
        (Some(2), Some(100)),
        "{plugin}: {state}"
    );
    let (_, stream) = host
        .get(&format!("/v1/streams/{}-dry-1", stream_prefix(plugin)))
        .await;
    assert_eq!(
        stream["events"].as_array().map(Vec::len),
        Some(2),
        "{plugin}: {stream}"
    );

    // Refusals and failed checks are answered as for a real command.
    let (status, body) = dry("withdraw", r#"{"amount":1000}"#, vec![]).await;
    assert_eq!((status, code(&body)), (422, "rejected"), "{plugin}: {body}");
    let (status, body) = dry("deposit", r#"{"amount":1}"#, vec![("if-match", "1")]).await;
    assert_eq!(
        (status, code(&body)),
        (409, "wrong_expected_version"),
        "{plugin}: {body}"
    );
    // An idempotency key is neither recorded nor replayed by a dry run.
    let (status, body) = dry(
        "deposit",
        r#"{"amount":5}"#,
        vec![("idempotency-key", "dry-key")],
    )
    .await;
    assert_eq!(
        (status, &body["dry_run"]),
        (200, &json!(true)),
        "{plugin}: {body}"
    );
    let (status, real) = host
        .command_raw(
            plugin,
            "dry-1",
            "deposit",
            r#"{"amount":7}"#,
            &[("idempotency-key", "dry-key")],
        )
        .await;
    assert_eq!(status, 200, "{plugin}: {real}");
    assert_eq!(
        (real["version"].as_u64(), real.get("replayed")),
        (Some(3), None),
        "{plugin}: {real}"
    );

    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/aggregates/{plugin}/dry-1/commands/deposit?dry_run=maybe",
            host.base
        ))
        .body(r#"{"amount":1}"#)
        .send()
        .await
        .expect("the host answers");
    assert_eq!(resp.status().as_u16(), 400, "{plugin}");
}

async fn bank_flow(plugin: &str) {
    let host = Host::start(&[plugin]);
    let (status, body) = host
        .command(plugin, "acc-1", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{plugin}: {body}");
    assert_eq!(body["version"], 1, "{plugin}: {body}");
    assert_eq!(
        body["events"][0],
        json!({"type": "Opened", "version": 1, "data": {"owner": "Ada"}}),
        "{plugin}"
    );

    let (status, body) = host
        .command(plugin, "acc-1", "deposit", json!({"amount": 100}))
        .await;
    assert_eq!(
        (status, body["version"].clone()),
        (200, json!(2)),
        "{plugin}: {body}"
    );
    let (status, body) = host
        .command(plugin, "acc-1", "withdraw", json!({"amount": 30}))
        .await;
    assert_eq!(
        (status, body["version"].clone()),
        (200, json!(3)),
        "{plugin}: {body}"
    );

    let (status, body) = host
        .command(plugin, "acc-1", "withdraw", json!({"amount": 1000}))
        .await;
    assert_eq!((status, code(&body)), (422, "rejected"), "{plugin}: {body}");
    assert_eq!(
        body["error"]["message"], "insufficient funds",
        "{plugin}: {body}"
    );

    for bad in [
        json!({"amount": 0}),
        json!({"amount": -5}),
        json!({}),
        json!({"amount": "ten"}),
    ] {
        let (status, body) = host.command(plugin, "acc-1", "deposit", bad.clone()).await;
        assert_eq!(
            (status, code(&body)),
            (422, "invalid_command"),
            "{plugin}: {bad}: {body}"
        );
        assert_eq!(
            body["error"]["details"]["fields"][0]["field"], "amount",
            "{plugin}: {bad}: {body}"
        );
    }

    let (status, body) = host
        .command(plugin, "acc-1", "open", json!({"owner": "Bob"}))
        .await;
    assert_eq!(
        (status, code(&body)),
        (409, "already_exists"),
        "{plugin}: {body}"
    );
    let (status, body) = host
        .command(plugin, "nope", "deposit", json!({"amount": 1}))
        .await;
    assert_eq!(
        (status, code(&body)),
        (404, "aggregate_not_found"),
        "{plugin}: {body}"
    );

    // `close` takes no fields: an empty body works.
    let (status, body) = host.command_raw(plugin, "acc-1", "close", "", &[]).await;
    assert_eq!(status, 200, "{plugin}: {body}");
    let (status, body) = host
        .command(plugin, "acc-1", "deposit", json!({"amount": 5}))
        .await;
    assert_eq!((status, code(&body)), (422, "rejected"), "{plugin}: {body}");

    let (status, body) = host.get(&format!("/v1/aggregates/{plugin}/acc-1")).await;
    assert_eq!(status, 200, "{plugin}: {body}");
    assert_eq!(body["version"], 4, "{plugin}: {body}");
    assert_eq!(
        body["state"],
        json!({"owner": "Ada", "balance": 70, "open": false}),
        "{plugin}"
    );

    // Nothing refused was stored.
    let (_, body) = host
        .get(&format!("/v1/streams/{}-acc-1", stream_prefix(plugin)))
        .await;
    let types: Vec<&str> = body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{plugin}: no events in {body}"))
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        types,
        ["Opened", "Deposited", "Withdrawn", "Closed"],
        "{plugin}"
    );
}

async fn hundred_concurrent_commands_apply_exactly_once(plugin: &str) {
    let host = Host::start(&[plugin]);
    let (status, body) = host
        .command(plugin, "hot", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{plugin}: {body}");

    let mut tasks = Vec::new();
    for i in 0..100 {
        let url = format!("{}/v1/aggregates/{plugin}/hot/commands/deposit", host.base);
        tasks.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(json!({"amount": i + 1}).to_string())
                .send()
                .await
                .expect("the host answers");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("JSON");
            (status, body)
        }));
    }
    let mut versions = BTreeSet::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, 200, "{plugin}: {body}");
        versions.insert(body["version"].as_u64().unwrap_or_default());
    }
    // Every command got its own version: 2..=101, no gaps, no repeats.
    assert_eq!(versions, (2..=101).collect::<BTreeSet<u64>>(), "{plugin}");

    let (_, body) = host.get(&format!("/v1/aggregates/{plugin}/hot")).await;
    assert_eq!(body["version"], 101, "{plugin}: {body}");
    assert_eq!(
        body["state"]["balance"],
        (1..=100).sum::<u64>(),
        "{plugin}: {body}"
    );

    let mut stored = Vec::new();
    let mut from = 1;
    loop {
        let (_, page) = host
            .get(&format!(
                "/v1/streams/{}-hot?from={from}&limit=40",
                stream_prefix(plugin)
            ))
            .await;
        let events = page["events"]
            .as_array()
            .unwrap_or_else(|| panic!("{plugin}: no events in {page}"))
            .clone();
        let Some(last) = events.last() else { break };
        from = last["version"].as_u64().unwrap_or_default() + 1;
        stored.extend(events);
    }
    let stored_versions: Vec<u64> = stored
        .iter()
        .map(|e| e["version"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(stored_versions, (1..=101).collect::<Vec<u64>>(), "{plugin}");
    let amounts: BTreeSet<u64> = stored[1..]
        .iter()
        .map(|e| e["data"]["amount"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(
        amounts,
        (1..=100).collect::<BTreeSet<u64>>(),
        "{plugin}: each deposit stored exactly once"
    );
}

async fn idempotent_retry_returns_the_original_outcome(plugin: &str) {
    let mut host = Host::start(&[plugin]);
    host.command(plugin, "acc-9", "open", json!({"owner": "Ada"}))
        .await;
    let headers = [("idempotency-key", "deposit-0001")];
    let (status, first) = host
        .command_raw(plugin, "acc-9", "deposit", r#"{"amount":25}"#, &headers)
        .await;
    assert_eq!(status, 200, "{plugin}: {first}");
    assert_eq!(first["version"], 2, "{plugin}: {first}");

    // Another command in between, then the retry.
    host.command(plugin, "acc-9", "deposit", json!({"amount": 1}))
        .await;
    let (status, again) = host
        .command_raw(plugin, "acc-9", "deposit", r#"{"amount":25}"#, &headers)
        .await;
    assert_eq!(status, 200, "{plugin}: {again}");
    assert_eq!(again["version"], 2, "{plugin}: {again}");
    assert_eq!(again["events"], first["events"], "{plugin}");
    assert_eq!(again["replayed"], true, "{plugin}: {again}");

    // Still after a crash and restart.
    host.restart();
    let (status, after) = host
        .command_raw(plugin, "acc-9", "deposit", r#"{"amount":25}"#, &headers)
        .await;
    assert_eq!(status, 200, "{plugin}: {after}");
    assert_eq!(after["events"], first["events"], "{plugin}");

    // The same request written differently is the same request ...
    let (status, respaced) = host
        .command_raw(plugin, "acc-9", "deposit", "{ \"amount\" : 25 }", &headers)
        .await;
    assert_eq!(
        (status, &respaced["replayed"]),
        (200, &json!(true)),
        "{plugin}: {respaced}"
    );
    // ... but the key cannot be reused for another payload or another
    // command, also after the restart: that would report a deposit done
    // that never was.
    for (command, body) in [
        ("deposit", r#"{"amount":26}"#),
        ("withdraw", r#"{"amount":25}"#),
    ] {
        let (status, refused) = host
            .command_raw(plugin, "acc-9", command, body, &headers)
            .await;
        assert_eq!(
            (status, code(&refused)),
            (422, "idempotency_key_reused"),
            "{plugin} {command} {body}: {refused}"
        );
        assert_eq!(
            refused["error"]["details"]["key"], "deposit-0001",
            "{plugin}: {refused}"
        );
    }

    let (_, body) = host.get(&format!("/v1/aggregates/{plugin}/acc-9")).await;
    assert_eq!(
        body["version"], 3,
        "{plugin}: the retries appended nothing: {body}"
    );
    assert_eq!(body["state"]["balance"], 26, "{plugin}: {body}");
    let (_, stream) = host
        .get(&format!("/v1/streams/{}-acc-9", stream_prefix(plugin)))
        .await;
    assert_eq!(
        stream["events"][1]["metadata"]["messageId"], "deposit-0001",
        "{plugin}: {stream}"
    );
}

async fn bad_requests_get_their_codes(plugin: &str) {
    let host = Host::start_with(&[plugin], &["--max-command-bytes", "4096"]);
    host.command(plugin, "acc-1", "open", json!({"owner": "Ada"}))
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
            plugin,
            "acc-1",
            "deposit",
            "{not json",
            vec![],
            400,
            "malformed_request",
        ),
        (
            plugin,
            "acc-1",
            "deposit",
            "[1,2]",
            vec![],
            400,
            "malformed_request",
        ),
        (
            plugin,
            "acc-1",
            "deposit",
            "{\"amount\":1}",
            vec![("if-match", "seven")],
            400,
            "malformed_request",
        ),
        (
            plugin,
            "acc-1",
            "deposit",
            "{\"amount\":1}",
            vec![("idempotency-key", "has space")],
            400,
            "malformed_request",
        ),
        (
            plugin,
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
            plugin,
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
            "{plugin}: {t}/{id}/{cmd} {body} {headers:?}: {resp}"
        );
        assert!(
            resp["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{plugin}: {t}/{id}/{cmd}: {resp}"
        );
    }

    let big = json!({"amount": 1, "note": "x".repeat(8000)}).to_string();
    let (status, resp) = host
        .command_raw(plugin, "acc-1", "deposit", &big, &[])
        .await;
    assert_eq!(
        (status, code(&resp)),
        (413, "payload_too_large"),
        "{plugin}: {resp}"
    );

    let (status, resp) = host.get("/v1/nothing-here").await;
    assert_eq!(
        (status, code(&resp)),
        (404, "not_found"),
        "{plugin}: {resp}"
    );

    // None of it was stored; the aggregate is still at version 1 and works.
    let (status, resp) = host
        .command(plugin, "acc-1", "deposit", json!({"amount": 2}))
        .await;
    assert_eq!(
        (status, resp["version"].clone()),
        (200, json!(2)),
        "{plugin}: {resp}"
    );

    let (status, plugins) = host.get("/v1/plugins").await;
    assert_eq!(status, 200, "{plugin}: {plugins}");
    let p = &plugins["plugins"][0];
    assert_eq!(p["aggregate_type"], plugin, "{plugin}: {p}");
    assert_eq!(p["stream_prefix"], stream_prefix(plugin), "{plugin}: {p}");
    assert_eq!(p["hash"].as_str().map(str::len), Some(64), "{plugin}: {p}");
    let commands: Vec<(&str, &str)> = p["commands"]
        .as_array()
        .unwrap_or_else(|| panic!("{plugin}: no commands in {p}"))
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default(),
                c["mode"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        commands,
        [
            ("open", "create"),
            ("deposit", "update"),
            ("withdraw", "update"),
            ("close", "update")
        ],
        "{plugin}"
    );
    assert_eq!(
        p["event_types"],
        json!(["Opened", "Deposited", "Withdrawn", "Closed"]),
        "{plugin}: {p}"
    );

    let (status, health) = host.get("/healthz").await;
    assert_eq!(
        (status, health["status"].as_str()),
        (200, Some("ok")),
        "{plugin}: {health}"
    );
}

/// Amounts that exercise every branch of the field decoding: each kind of
/// JSON value, integers at and beyond the u64 and i64 limits, floats in
/// both notations, and strings that Rust's `Debug` escapes.
const AMOUNTS: &[&str] = &[
    "0",
    "1",
    "5",
    "\"ten\"",
    "-5",
    "1.5",
    "1.0",
    "true",
    "null",
    "[]",
    "{}",
    "1e20",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1.5e300",
    "0.0000001",
    "-0",
    "-0.0",
    "1E2",
    "100e-2",
    "1e15",
    "1e16",
    "1e-5",
    "1e-6",
    "123e-20",
    r#""a\"b\n\u0001é😀""#,
    r#""e\u0301x\u00a0\ufeff\ue000\u2028\u0085\u0378\u0903 '""#,
];

/// Owners for `open`: missing, of the wrong type, blank, and padded with
/// the whitespace Rust's `trim` removes (and one it keeps, U+FEFF).
const OWNERS: &[&str] = &[
    "{}",
    r#"{"owner":5}"#,
    r#"{"owner":null}"#,
    r#"{"owner":["Ada"]}"#,
    r#"{"owner":"  "}"#,
    r#"{"owner":" \u00a0Bob\ufeff "}"#,
    r#"{"owner":"\u0085Cy\u0085"}"#,
    r#"{"owner":"Ada","extra":1}"#,
];

/// Every answer the host gives `plugin` for the same sequence of requests,
/// with the aggregate type blanked out so the three can be compared.
async fn answers(host: &Host, plugin: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, owner) in OWNERS.iter().enumerate() {
        let (status, body) = host
            .command_raw(plugin, &format!("o-{i}"), "open", owner, &[])
            .await;
        out.push(json!([status, body]));
    }
    host.command(plugin, "a", "open", json!({"owner": "Ada"}))
        .await;
    let (status, body) = host
        .command(plugin, "a", "withdraw", json!({"amount": 1}))
        .await;
    out.push(json!([status, body]));
    for amount in AMOUNTS {
        for command in ["deposit", "withdraw"] {
            let body = format!(r#"{{"amount":{amount}}}"#);
            let (status, resp) = host.command_raw(plugin, "a", command, &body, &[]).await;
            out.push(json!([command, amount, status, resp]));
        }
    }
    // Fill the account to the top: one more cent is too much.
    for amount in ["18446744073709551615", "1"] {
        let body = format!(r#"{{"amount":{amount}}}"#);
        let (status, resp) = host.command_raw(plugin, "a", "deposit", &body, &[]).await;
        out.push(json!([amount, status, resp]));
    }
    for body in ["", "{}"] {
        let (status, resp) = host.command_raw(plugin, "a", "close", body, &[]).await;
        out.push(json!([status, resp]));
    }
    for id in ["a", "o-5", "o-6", "o-7"] {
        out.push(host.get(&format!("/v1/aggregates/{plugin}/{id}")).await.1);
        let stream = format!("/v1/streams/{}-{id}", stream_prefix(plugin));
        let (_, mut page) = host.get(&stream).await;
        // Event ids and metadata name the plugin; keep what the plugin decided.
        if let Some(events) = page["events"].as_array_mut() {
            for e in events {
                *e = json!({"type": e["type"], "version": e["version"], "data": e["data"]});
            }
        }
        out.push(page["events"].clone());
    }
    let text = serde_json::to_string(&out).unwrap_or_default();
    let blanked = text
        .replace(&stream_prefix(plugin), "PREFIX")
        .replace(plugin, "TYPE");
    serde_json::from_str(&blanked).unwrap_or_default()
}

/// Rebuilt state after a restart, per implementation.
async fn states(host: &Host) -> Vec<Value> {
    let mut out = Vec::new();
    for plugin in BANK_ACCOUNTS {
        for id in ["a", "o-5", "o-6", "o-7"] {
            let (_, mut body) = host.get(&format!("/v1/aggregates/{plugin}/{id}")).await;
            body["type"] = json!("TYPE");
            out.push(body);
        }
    }
    out
}

#[tokio::test]
async fn every_implementation_answers_alike() {
    let mut host = Host::start(&BANK_ACCOUNTS);
    let reference = answers(&host, BANK_ACCOUNTS[0]).await;
    assert!(reference.len() > 60, "the suite ran: {reference:?}");
    let text = serde_json::to_string(&reference).unwrap_or_default();
    for expected in [
        "the balance would be too large",
        "insufficient funds",
        "account is already closed",
        "must not be empty",
        "must be greater than 0",
        "is required",
    ] {
        assert!(
            text.contains(expected),
            "the suite reached {expected:?}: {text}"
        );
    }
    for plugin in &BANK_ACCOUNTS[1..] {
        let got = answers(&host, plugin).await;
        assert_eq!(got.len(), reference.len(), "{plugin}");
        for (want, got) in reference.iter().zip(&got) {
            assert_eq!(
                got, want,
                "{plugin} answers differently from the Rust plugin"
            );
        }
    }

    // Restart: every aggregate is rehydrated from its events by its own
    // plugin, and the three still agree.
    host.restart();
    let after = states(&host).await;
    for (i, plugin) in BANK_ACCOUNTS.iter().enumerate().skip(1) {
        assert_eq!(
            after[i * 4..(i + 1) * 4],
            after[..4],
            "{plugin}: rebuilt state differs from the Rust plugin's"
        );
    }
    assert_eq!(
        after[0]["state"],
        json!({"owner": "Ada", "balance": 18446744073709551615u64, "open": false}),
        "rehydrated: {after:?}"
    );
}
