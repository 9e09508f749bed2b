//! The gRPC API end to end, through the Rust client generated from
//! `proto/` (`rehydra::api::grpc::pb`): every call and every error code a
//! client can provoke; subscriptions under concurrent writers (every event
//! exactly once, in global order, across the catch-up-to-live switch and
//! across a disconnect and resume); server-sent events; authentication on
//! both protocols; and subscriptions ending cleanly at shutdown.

use std::collections::BTreeMap;
use std::time::Duration;

use rehydra::api::grpc::pb;
use rehydra::api::grpc::pb::aggregates_client::AggregatesClient;
use rehydra::api::grpc::pb::commands_client::CommandsClient;
use rehydra::api::grpc::pb::plugins_client::PluginsClient;
use rehydra::api::grpc::pb::streams_client::StreamsClient;
use rehydra::api::grpc::pb::subscribe_request::Start;
use rehydra::api::grpc::pb::subscribe_response::Message;
use rehydra_e2e::{Host, code};
use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

async fn channel(host: &Host) -> Channel {
    Channel::from_shared(host.grpc.clone())
        .expect("a gRPC endpoint")
        .connect()
        .await
        .expect("the gRPC server answers")
}

fn cmd(aggregate_type: &str, id: &str, command: &str, payload: Value) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        aggregate_type: aggregate_type.into(),
        aggregate_id: id.into(),
        command: command.into(),
        payload_json: payload.to_string(),
        ..Default::default()
    }
}

/// The status's gRPC code, its `rehydra-error-code` and its details.
fn parts(status: &Status) -> (Code, String, Value) {
    let code = status
        .metadata()
        .get("rehydra-error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<none>")
        .to_string();
    let details = status
        .metadata()
        .get("rehydra-error-details")
        .and_then(|v| v.to_str().ok())
        .map(|d| serde_json::from_str(d).expect("details are JSON"))
        .unwrap_or(Value::Null);
    (status.code(), code, details)
}

async fn fails(
    client: &mut CommandsClient<Channel>,
    request: pb::ExecuteRequest,
) -> (Code, String, Value) {
    let status = client
        .execute(request.clone())
        .await
        .expect_err(&format!("{request:?} should fail"));
    parts(&status)
}

#[tokio::test]
async fn every_call_and_error_code_over_grpc() {
    let host = Host::start_with(
        &["bank-account", "faulty"],
        &["--max-command-bytes", "2000"],
    );
    let ch = channel(&host).await;
    let mut commands = CommandsClient::new(ch.clone());
    let mut aggregates = AggregatesClient::new(ch.clone());
    let mut streams = StreamsClient::new(ch.clone());
    let mut plugins = PluginsClient::new(ch.clone());

    // Commands.Execute: the version, the events and the reply.
    let opened = commands
        .execute(cmd("bank-account", "g1", "open", json!({"owner": "Ada"})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.version, 1);
    assert_eq!(opened.aggregate_id, "g1");
    assert_eq!(opened.events.len(), 1);
    assert_eq!(opened.events[0].event_type, "Opened");
    let data: Value = serde_json::from_str(&opened.events[0].data_json).unwrap();
    assert_eq!(data, json!({"owner": "Ada"}));

    // An idempotency key makes a retry return the original outcome.
    let mut deposit = cmd("bank-account", "g1", "deposit", json!({"amount": 100}));
    deposit.idempotency_key = "grpc-k1".into();
    deposit.correlation_id = "corr-1".into();
    let first = commands
        .execute(deposit.clone())
        .await
        .unwrap()
        .into_inner();
    let again = commands.execute(deposit).await.unwrap().into_inner();
    assert_eq!((first.version, first.replayed), (2, false));
    assert_eq!((again.version, again.replayed), (2, true));
    assert_eq!(again.events, first.events);

    // A dry run: what would happen, with the state it would produce;
    // nothing stored.
    let mut dry = cmd("bank-account", "g1", "withdraw", json!({"amount": 40}));
    dry.dry_run = true;
    let would = commands.execute(dry).await.unwrap().into_inner();
    assert!(would.dry_run);
    assert_eq!((would.version, would.events.len()), (3, 1));
    let state: Value = serde_json::from_str(would.state_json.as_deref().expect("a state")).unwrap();
    assert_eq!(state["balance"], 60);

    // An expected version that matches (the dry run stored nothing).
    let mut withdraw = cmd("bank-account", "g1", "withdraw", json!({"amount": 30}));
    withdraw.expected_version = Some(2);
    assert_eq!(
        commands
            .execute(withdraw)
            .await
            .unwrap()
            .into_inner()
            .version,
        3
    );

    // Aggregates.GetState.
    let state = aggregates
        .get_state(pb::GetStateRequest {
            aggregate_type: "bank-account".into(),
            aggregate_id: "g1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.version, 3);
    let state_json: Value = serde_json::from_str(&state.state_json).unwrap();
    assert_eq!(state_json["balance"], 70);

    // Streams.Read, paged.
    let page = streams
        .read(pb::ReadStreamRequest {
            stream: "bank_account-g1".into(),
            from_version: 1,
            limit: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.events
            .iter()
            .map(|e| (e.version, e.event_type.as_str()))
            .collect::<Vec<_>>(),
        [(1, "Opened"), (2, "Deposited")]
    );
    assert_eq!(page.next_version, Some(3));
    let metadata: Value = serde_json::from_str(&page.events[1].metadata_json).unwrap();
    assert_eq!(metadata["$correlationId"], "corr-1");
    let rest = streams
        .read(pb::ReadStreamRequest {
            stream: "bank_account-g1".into(),
            from_version: 3,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.events.len(), 1);
    assert!(rest.events[0].position > page.events[1].position);
    let missing = streams
        .read(pb::ReadStreamRequest {
            stream: "bank_account-nobody".into(),
            from_version: 1,
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(missing.events.is_empty());
    assert_eq!(missing.next_version, None);

    // Plugins.List.
    let listed = plugins
        .list(pb::ListPluginsRequest {})
        .await
        .unwrap()
        .into_inner();
    let bank = listed
        .plugins
        .iter()
        .find(|p| p.aggregate_type == "bank-account")
        .expect("bank-account is listed");
    assert_eq!(bank.stream_prefix, "bank_account");
    assert_eq!(bank.hash.len(), 64);
    let open = bank.commands.iter().find(|c| c.name == "open").unwrap();
    assert_eq!(open.mode, pb::CommandMode::Create as i32);
    assert!(listed.failed.is_empty() && listed.loading.is_empty());

    // Every error code a client can provoke, with its status.
    let cases: Vec<(pb::ExecuteRequest, Code, &str)> = vec![
        (
            cmd("no-such-type", "x", "open", json!({})),
            Code::NotFound,
            "unknown_aggregate_type",
        ),
        (
            cmd("bank-account", "g1", "fly", json!({})),
            Code::NotFound,
            "unknown_command",
        ),
        (
            cmd("bank-account", "nobody", "deposit", json!({"amount": 1})),
            Code::NotFound,
            "aggregate_not_found",
        ),
        (
            cmd("bank-account", "g1", "open", json!({"owner": "Bob"})),
            Code::AlreadyExists,
            "already_exists",
        ),
        (
            cmd("bank-account", "g1", "deposit", json!({"amount": 0})),
            Code::InvalidArgument,
            "invalid_command",
        ),
        (
            cmd("bank-account", "g1", "withdraw", json!({"amount": 1000})),
            Code::FailedPrecondition,
            "rejected",
        ),
        (
            cmd("faulty", "f1", "admin-only", json!({})),
            Code::PermissionDenied,
            "forbidden",
        ),
        (
            cmd("faulty", "f1", "panic", json!({})),
            Code::Internal,
            "plugin_failed",
        ),
        (
            cmd(
                "bank-account",
                "g1",
                "deposit",
                json!({"amount": 1, "note": "x".repeat(3000)}),
            ),
            Code::ResourceExhausted,
            "payload_too_large",
        ),
        (
            cmd("bank-account", "a/b", "deposit", json!({"amount": 1})),
            Code::InvalidArgument,
            "malformed_request",
        ),
    ];
    for (request, status, error_code) in cases {
        let (got_status, got_code, _) = fails(&mut commands, request.clone()).await;
        assert_eq!(
            (got_status, got_code.as_str()),
            (status, error_code),
            "{request:?}"
        );
    }
    let mut bad_json = cmd("bank-account", "g1", "deposit", json!({}));
    bad_json.payload_json = "{not json".into();
    let (status, error_code, _) = fails(&mut commands, bad_json).await;
    assert_eq!(
        (status, error_code.as_str()),
        (Code::InvalidArgument, "malformed_request")
    );
    let mut not_an_object = cmd("bank-account", "g1", "deposit", json!({}));
    not_an_object.payload_json = "[1]".into();
    assert_eq!(
        fails(&mut commands, not_an_object).await.1,
        "malformed_request"
    );
    let mut bad_key = cmd("bank-account", "g1", "deposit", json!({"amount": 1}));
    bad_key.idempotency_key = "has space".into();
    assert_eq!(fails(&mut commands, bad_key).await.1, "malformed_request");

    // Details travel too: the versions of a conflict, the invalid fields.
    let mut stale = cmd("bank-account", "g1", "deposit", json!({"amount": 1}));
    stale.expected_version = Some(1);
    let (status, error_code, details) = fails(&mut commands, stale).await;
    assert_eq!(
        (status, error_code.as_str()),
        (Code::Aborted, "wrong_expected_version")
    );
    assert_eq!(details, json!({"expected": 1, "actual": 3}));
    let (_, _, details) = fails(
        &mut commands,
        cmd("bank-account", "g1", "deposit", json!({"amount": -1})),
    )
    .await;
    assert_eq!(details["fields"][0]["field"], "amount", "{details}");
    let (_, _, details) = fails(&mut commands, cmd("faulty", "f1", "panic", json!({}))).await;
    assert_eq!(details["reason"], "trap");

    // Errors of the other services.
    let status = aggregates
        .get_state(pb::GetStateRequest {
            aggregate_type: "bank-account".into(),
            aggregate_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(parts(&status).1, "aggregate_not_found");
    let status = aggregates
        .get_state(pb::GetStateRequest {
            aggregate_type: "nope".into(),
            aggregate_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(parts(&status).1, "unknown_aggregate_type");
    let status = streams
        .read(pb::ReadStreamRequest {
            stream: "bad stream".into(),
            from_version: 1,
            limit: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), parts(&status).1.as_str()),
        (Code::InvalidArgument, "malformed_request")
    );
    let status = streams
        .subscribe(pb::SubscribeRequest {
            categories: vec!["not-a-category".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(parts(&status).1, "malformed_request");

    // Nothing that failed left an event behind.
    let all = streams
        .read(pb::ReadStreamRequest {
            stream: "bank_account-g1".into(),
            from_version: 1,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.events.len(), 3);
}

#[tokio::test]
async fn a_command_past_its_timeout_is_deadline_exceeded() {
    let host = Host::start_with(
        &["faulty"],
        &["--command-timeout", "100ms", "--handle-deadline", "2s"],
    );
    let mut commands = CommandsClient::new(channel(&host).await);
    let (status, error_code, _) =
        fails(&mut commands, cmd("faulty", "t1", "spin", json!({}))).await;
    assert_eq!(
        (status, error_code.as_str()),
        (Code::DeadlineExceeded, "timeout")
    );
}

#[tokio::test]
async fn too_many_subscriptions_is_overloaded() {
    let host = Host::start_with(&["bank-account"], &["--max-subscriptions", "1"]);
    let mut streams = StreamsClient::new(channel(&host).await);
    let mut first = streams
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        first.message().await.unwrap().and_then(|m| m.message),
        Some(Message::CaughtUp(_))
    ));
    let status = streams
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), parts(&status).1.as_str()),
        (Code::Unavailable, "overloaded")
    );
}

/// Receives until `want` events have arrived (or the stream ends), and
/// returns them with whether a `caught_up` came.
async fn receive(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    want: usize,
    seen: &mut Vec<pb::RecordedEvent>,
) -> usize {
    let mut caught_up = 0;
    while seen.len() < want {
        let next = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("the subscription keeps delivering")
            .expect("the subscription does not fail");
        match next.and_then(|m| m.message) {
            Some(Message::Event(e)) => seen.push(e),
            Some(Message::CaughtUp(_)) => caught_up += 1,
            None => break,
        }
    }
    caught_up
}

#[tokio::test]
async fn a_subscription_under_concurrent_writers_gets_every_event_once_in_order() {
    let host = Host::start(&["bank-account", "users"]);
    let ch = channel(&host).await;
    let mut commands = CommandsClient::new(ch.clone());

    // Catch-up material: 10 accounts with a few events each, and events of
    // another category the filter must skip.
    for a in 0..10 {
        let id = format!("s{a}");
        commands
            .execute(cmd("bank-account", &id, "open", json!({"owner": "Ada"})))
            .await
            .unwrap();
        for _ in 0..4 {
            commands
                .execute(cmd("bank-account", &id, "deposit", json!({"amount": 1})))
                .await
                .unwrap();
        }
    }
    let users = host
        .command(
            "user",
            "u1",
            "new",
            json!({"email": "ada@example.com", "name": "Ada Lovelace"}),
        )
        .await;
    assert_eq!(users.0, 200, "{users:?}");

    // Subscribe, then write concurrently while it catches up and goes live.
    let mut streams = StreamsClient::new(ch.clone());
    let request = pb::SubscribeRequest {
        start: Some(Start::FromBeginning(true)),
        categories: vec!["bank_account".into()],
        event_types: vec![],
    };
    let mut sub = streams.subscribe(request).await.unwrap().into_inner();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut c = CommandsClient::new(ch.clone());
            tokio::spawn(async move {
                for n in 0..100 {
                    let id = format!("s{}", (w * 3 + n) % 10);
                    c.execute(cmd("bank-account", &id, "deposit", json!({"amount": 1})))
                        .await
                        .expect("a deposit");
                }
            })
        })
        .collect();
    let total = 10 * 5 + 4 * 100;

    // Take part of it, then disconnect mid-way (writers still going) and
    // resume from the last position + 1.
    let mut seen = Vec::new();
    let mut caught_up = receive(&mut sub, 90, &mut seen).await;
    drop(sub);
    let resume = seen.last().unwrap().position + 1;
    let mut sub = streams
        .subscribe(pb::SubscribeRequest {
            start: Some(Start::FromPosition(resume)),
            categories: vec!["bank_account".into()],
            event_types: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    for w in writers {
        w.await.unwrap();
    }
    caught_up += receive(&mut sub, total, &mut seen).await;
    assert!(
        caught_up >= 1,
        "a caught_up message marks the switch to live"
    );

    // Exactly once, in strictly increasing global order, only bank accounts.
    assert_eq!(seen.len(), total);
    assert!(
        seen.windows(2).all(|w| w[0].position < w[1].position),
        "global order"
    );
    assert!(seen.iter().all(|e| e.stream.starts_with("bank_account-")));
    // And exactly the store's events: each stream's versions 1..=n.
    let mut by_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &seen {
        by_stream
            .entry(e.stream.clone())
            .or_default()
            .push(e.version);
    }
    for (stream, versions) in by_stream {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "{stream}");
        let (_, body) = host.get(&format!("/v1/streams/{stream}?limit=1000")).await;
        assert_eq!(body["events"].as_array().unwrap().len(), versions.len());
    }

    // Filter by event type, from a position.
    let mut only_opened = streams
        .subscribe(pb::SubscribeRequest {
            start: Some(Start::FromPosition(1)),
            categories: vec![],
            event_types: vec!["Opened".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut opened = Vec::new();
    receive(&mut only_opened, 10, &mut opened).await;
    assert!(opened.iter().all(|e| e.event_type == "Opened"));
    assert_eq!(opened.len(), 10);
}

/// Reads server-sent events from a response until `stop` says so.
async fn read_sse(
    resp: reqwest::Response,
    mut stop: impl FnMut(&str, &str, &Value) -> bool,
) -> Vec<(String, String, Value)> {
    use tokio_stream::StreamExt as _;
    let mut body = resp.bytes_stream();
    let mut pending = String::new();
    let mut out = Vec::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(30), body.next())
            .await
            .expect("the event stream keeps delivering");
        let Some(chunk) = chunk else { return out };
        pending.push_str(&String::from_utf8_lossy(&chunk.expect("a chunk")));
        while let Some(end) = pending.find("\n\n") {
            let message: String = pending.drain(..end + 2).collect();
            let (mut name, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in message.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().into();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().into();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&data).expect("SSE data is JSON");
            let done = stop(&name, &id, &value);
            out.push((name, id, value));
            if done {
                return out;
            }
        }
    }
}

#[tokio::test]
async fn server_sent_events_catch_up_go_live_and_resume_from_last_event_id() {
    let host = Host::start(&["bank-account"]);
    host.command("bank-account", "e1", "open", json!({"owner": "Ada"}))
        .await;
    host.command("bank-account", "e1", "deposit", json!({"amount": 5}))
        .await;
    let http = reqwest::Client::new();
    let url = format!(
        "{}/v1/subscribe?category=bank_account&event_type=Deposited",
        host.base
    );
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let base = host.base.clone();
    let mut live_sent = false;
    let got = read_sse(resp, |name, _, _| {
        if name == "caught-up" && !live_sent {
            live_sent = true;
            let base = base.clone();
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(format!(
                        "{base}/v1/aggregates/bank-account/e1/commands/deposit"
                    ))
                    .header("content-type", "application/json")
                    .body(r#"{"amount": 7}"#)
                    .send()
                    .await
                    .expect("a live deposit");
            });
        }
        name == "event" && live_sent
    })
    .await;
    let names: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["event", "caught-up", "event"]);
    assert_eq!(got[0].2["data"], json!({"amount": 5}));
    assert_eq!(
        got[0].1,
        got[0].2["position"].to_string(),
        "the SSE id is the position"
    );
    assert_eq!(got[2].2["data"], json!({"amount": 7}));

    // A reconnecting client sends Last-Event-ID and gets only what followed.
    host.command("bank-account", "e1", "deposit", json!({"amount": 9}))
        .await;
    let resp = http
        .get(&url)
        .header("last-event-id", got[2].1.as_str())
        .send()
        .await
        .unwrap();
    let after = read_sse(resp, |name, _, _| name == "caught-up").await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0].2["data"], json!({"amount": 9}));

    // Bad queries are errors, not silent empty streams.
    for bad in [
        "from=soon",
        "category=bad-category",
        "event_type=has%20space",
    ] {
        let (status, body) = host.get(&format!("/v1/subscribe?{bad}")).await;
        assert_eq!((status, code(&body)), (400, "malformed_request"), "{bad}");
    }
    // A Last-Event-ID that no event can follow, or that is no number: a
    // clear 400, not a panic or a wrapped position.
    for bad in ["18446744073709551615", "-1", "soon", "18446744073709551616"] {
        let resp = http
            .get(format!("{}/v1/subscribe", host.base))
            .header("Last-Event-ID", bad)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            (status, code(&body)),
            (400, "malformed_request"),
            "{bad}: {body}"
        );
    }
    let (status, _) = host.get("/healthz").await;
    assert_eq!(status, 200, "the host is still serving");
}

#[tokio::test]
async fn tokens_guard_both_protocols_and_the_principal_reaches_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# test tokens\nadmin-token-0123456789 admin\nalice-token-0123456789 alice\n",
    )
    .unwrap();
    let host = Host::start_with(
        &["bank-account", "faulty"],
        &["--auth-tokens", tokens.to_str().unwrap()],
    );
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", host.base);

    // HTTP: no token, a wrong token, then the right one.
    let deposit_url = url("/v1/aggregates/bank-account/p1/commands/open");
    for auth in [None, Some("Bearer wrong-token-0123456789")] {
        let mut req = http.post(&deposit_url).body(r#"{"owner":"Ada"}"#);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers().contains_key("www-authenticate"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(code(&body), "unauthenticated");
    }
    for path in [
        "/v1/plugins",
        "/v1/streams/bank_account-p1",
        "/v1/subscribe",
    ] {
        let resp = http.get(url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }
    for probe in ["/healthz", "/livez", "/readyz"] {
        let resp = http.get(url(probe)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{probe}: probes need no token");
    }

    let resp = http
        .post(&deposit_url)
        .header("authorization", "Bearer alice-token-0123456789")
        .body(r#"{"owner":"Alice"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events: Value = http
        .get(url("/v1/streams/bank_account-p1"))
        .header("authorization", "Bearer alice-token-0123456789")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(events["events"][0]["metadata"]["principal"], "alice");

    // The plugin decides with the principal: alice is refused, admin not.
    let admin_only = url("/v1/aggregates/faulty/p1/commands/admin-only");
    let as_alice = http
        .post(&admin_only)
        .header("authorization", "Bearer alice-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(as_alice.status(), 403);
    let body: Value = as_alice.json().await.unwrap();
    assert_eq!(code(&body), "forbidden");
    assert!(body["error"]["message"].as_str().unwrap().contains("alice"));
    let as_admin = http
        .post(&admin_only)
        .header("authorization", "Bearer admin-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(as_admin.status(), 200);

    // gRPC: the same rules.
    let ch = channel(&host).await;
    let mut commands = CommandsClient::new(ch.clone());
    let status = commands
        .execute(cmd("bank-account", "p2", "open", json!({"owner": "Eve"})))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), parts(&status).1.as_str()),
        (Code::Unauthenticated, "unauthenticated")
    );
    let status = PluginsClient::new(ch.clone())
        .list(pb::ListPluginsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let with = |token: &str, request: pb::ExecuteRequest| {
        let mut r = Request::new(request);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let ok = commands
        .execute(with(
            "admin-token-0123456789",
            cmd("bank-account", "p2", "open", json!({"owner": "Eve"})),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.version, 1);
    let status = commands
        .execute(with(
            "alice-token-0123456789",
            cmd("faulty", "p2", "admin-only", json!({})),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), parts(&status).1.as_str()),
        (Code::PermissionDenied, "forbidden")
    );
}

#[test]
fn a_bad_token_file_stops_the_host_with_the_line_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "good-token-0123456789 alice\nshort bob\n").unwrap();
    let out = std::process::Command::new(rehydra_e2e::binary())
        .args(["run", "--plugins"])
        .arg(dir.path())
        .args([
            "--store",
            "memory://",
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "off",
        ])
        .arg("--auth-tokens")
        .arg(&tokens)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("too short"), "{stderr}");
}

#[tokio::test]
async fn shutdown_ends_subscriptions_with_where_to_resume() {
    let mut host = Host::start(&["bank-account"]);
    host.command("bank-account", "z1", "open", json!({"owner": "Ada"}))
        .await;
    let mut streams = StreamsClient::new(channel(&host).await);
    let mut sub = streams
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    assert_eq!(receive(&mut sub, 1, &mut seen).await, 0);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &host.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(30), sub.message())
            .await
            .expect("the subscription ends at shutdown")
        {
            Ok(Some(_)) => continue, // the caught_up marker
            Ok(None) => panic!("the stream ended without a reason"),
            Err(status) => break status,
        }
    };
    let (grpc_code, error_code, details) = parts(&ended);
    assert_eq!(
        (grpc_code, error_code.as_str()),
        (Code::Unavailable, "shutting_down")
    );
    assert_eq!(details["resume_from"], seen[0].position + 1);
    assert!(
        host.wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
}

#[tokio::test]
async fn binding_beyond_loopback_without_tokens_is_warned_about() {
    let quiet = Host::start(&["bank-account"]);
    assert!(
        !quiet.log().contains("without --auth-tokens"),
        "loopback: no warning"
    );
    let host = Host::start_with(&["bank-account"], &["--grpc", "0.0.0.0:0"]);
    let log = host.log();
    assert!(
        log.contains("serving gRPC on 0.0.0.0:") && log.contains("without --auth-tokens"),
        "{log}"
    );
    // It still serves.
    let listed = PluginsClient::new(channel(&host).await)
        .list(pb::ListPluginsRequest {})
        .await;
    assert!(listed.is_ok());
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_cut_off_and_resumes_without_loss() {
    // Big events fill HTTP/2's flow-control windows and the socket buffers
    // quickly, so the host's small read-ahead buffer stays full.
    let host = Host::start_with(
        &["faulty"],
        &[
            "--max-event-bytes",
            "2000000",
            "--subscription-buffer",
            "2",
            "--subscriber-timeout",
            "300ms",
        ],
    );
    let ch = channel(&host).await;
    let mut commands = CommandsClient::new(ch.clone());
    let total = 24;
    for n in 0..total {
        commands
            .execute(cmd(
                "faulty",
                &format!("big{}", n % 3),
                "huge-event",
                json!({"bytes": 900_000}),
            ))
            .await
            .expect("a big event");
    }
    let request = pb::SubscribeRequest {
        categories: vec!["faulty".into()],
        ..Default::default()
    };
    let mut streams = StreamsClient::new(ch.clone());
    let mut sub = streams
        .subscribe(request.clone())
        .await
        .unwrap()
        .into_inner();
    // Not reading: the host's buffer fills and stays full past the timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut seen: Vec<u64> = Vec::new();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(60), sub.message())
            .await
            .expect("the subscription delivers or ends")
        {
            Ok(Some(m)) => match m.message {
                Some(Message::Event(e)) => seen.push(e.position),
                other => panic!("cut off before catching up, got {other:?}"),
            },
            Ok(None) => panic!("ended without a reason after {} events", seen.len()),
            Err(status) => break status,
        }
    };
    let (grpc_code, error_code, details) = parts(&ended);
    assert_eq!(
        (grpc_code, error_code.as_str()),
        (Code::ResourceExhausted, "subscriber_too_slow")
    );
    assert!(seen.len() < total, "cut off before the end: {}", seen.len());
    let resume_from = details["resume_from"].as_u64().expect("where to resume");
    assert_eq!(Some(resume_from), seen.last().map(|p| p + 1).or(Some(1)));

    // Resuming from there delivers the rest, nothing twice.
    let mut rest = streams
        .subscribe(pb::SubscribeRequest {
            start: Some(Start::FromPosition(resume_from)),
            ..request
        })
        .await
        .unwrap()
        .into_inner();
    let mut more = Vec::new();
    receive(&mut rest, total - seen.len(), &mut more).await;
    seen.extend(more.iter().map(|e| e.position));
    assert_eq!(seen.len(), total);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
}

#[tokio::test]
async fn sighup_rotates_tokens_and_keeps_them_when_the_file_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "old-token-0123456789 ops\n").unwrap();
    let host = Host::start_with(
        &["bank-account"],
        &["--auth-tokens", tokens.to_str().unwrap()],
    );
    let http = reqwest::Client::new();
    let status_with = |token: &'static str| {
        let (http, url) = (http.clone(), format!("{}/v1/plugins", host.base));
        async move {
            http.get(url)
                .header("authorization", format!("Bearer {token}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &host.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    let wait_for_log = |needle: &str, count: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while host.log().matches(needle).count() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} in:\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(status_with("old-token-0123456789").await, 200);

    std::fs::write(&tokens, "new-token-0123456789 ops\n").unwrap();
    hup();
    wait_for_log("token file reloaded", 1);
    assert_eq!(status_with("old-token-0123456789").await, 401);
    assert_eq!(status_with("new-token-0123456789").await, 200);

    // A broken file is refused; the tokens in force stay.
    std::fs::write(&tokens, "short ops\n").unwrap();
    hup();
    wait_for_log("token file refused", 1);
    assert_eq!(status_with("new-token-0123456789").await, 200);
}

/// A client that holds a connection open and never finishes with it (here
/// one that connects to the gRPC port and sends nothing) does not keep a
/// host that was told to stop: past --command-timeout and a margin of 5 s
/// after SIGTERM, the host closes what is left and exits cleanly.
#[tokio::test]
async fn a_connection_held_open_does_not_keep_a_stopping_host() {
    let mut host = Host::start_with(&["bank-account"], &["--command-timeout", "1s"]);
    let grpc = host.grpc.trim_start_matches("http://").to_string();
    let http = host.base.trim_start_matches("http://").to_string();
    let _silent_grpc = std::net::TcpStream::connect(&grpc).expect("connect to gRPC");
    let _silent_http = std::net::TcpStream::connect(&http).expect("connect to HTTP");
    let stopped_at = std::time::Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &host.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = host.wait_exit(Duration::from_secs(20));
    assert!(
        exited.is_some_and(|s| s.success()),
        "the host did not exit cleanly within 20 s of SIGTERM ({exited:?}); its log:\n{}",
        host.log()
    );
    println!("exited {:?} after SIGTERM", stopped_at.elapsed());
}
