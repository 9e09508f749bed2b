//! The CLI as a client of a running host: `send`, `state`, `stream`,
//! `plugins`, `subscribe`, tokens, and its exit codes.

use rehydra_e2e::Host;
use serde_json::Value;

#[tokio::test]
async fn cli_drives_a_running_host() {
    let host = Host::start(&["bank-account", "users"]);

    let (code, out, err) = host.cli(&[
        "send",
        "bank-account",
        "acc-7",
        "open",
        "--data",
        r#"{"owner":"Ada"}"#,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let body: Value = serde_json::from_str(&out).expect("JSON on stdout");
    assert_eq!(body["version"], 1);

    let (code, out, _) = host.cli(&[
        "send",
        "bank-account",
        "acc-7",
        "deposit",
        "--data",
        r#"{"amount":40}"#,
        "--expect-version",
        "1",
        "--idempotency-key",
        "cli-1",
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = host.cli(&[
        "send",
        "bank-account",
        "acc-7",
        "deposit",
        "--data",
        r#"{"amount":40}"#,
        "--idempotency-key",
        "cli-1",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["version"], 2);

    // --dry-run: what the command would do, nothing stored.
    let (code, out, _) = host.cli(&[
        "send",
        "bank-account",
        "acc-7",
        "withdraw",
        "--data",
        r#"{"amount":15}"#,
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{out}");
    let would: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            would["dry_run"].as_bool(),
            would["state"]["balance"].as_u64()
        ),
        (Some(true), Some(25))
    );

    // A refused command: non-zero exit, the error body on stdout, the code on stderr.
    let (code, out, err) = host.cli(&[
        "send",
        "bank-account",
        "acc-7",
        "deposit",
        "--data",
        r#"{"amount":1}"#,
        "--expect-version",
        "1",
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["error"]["code"],
        "wrong_expected_version"
    );
    assert!(err.contains("wrong_expected_version"), "{err}");

    let (code, out, _) = host.cli(&["state", "bank-account", "acc-7"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"]["balance"],
        40
    );

    let (code, out, _) = host.cli(&["stream", "bank_account-acc-7"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["events"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let (code, out, _) = host.cli(&["plugins"]);
    assert_eq!(code, 0);
    let plugins: Value = serde_json::from_str(&out).unwrap();
    let types: Vec<&str> = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["aggregate_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bank-account", "user"]);

    let (code, _, err) = host.cli(&["state", "nope", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_aggregate_type"), "{err}");

    // An unreachable server is its own exit code with a hint.
    let (code, _, err) = host.cli(&["plugins", "--server", "http://127.0.0.1:9"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("rehydra run"), "{err}");
}

#[tokio::test]
async fn cli_subscribe_prints_events_as_json_lines_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "cli-token-0123456789 ops\n").unwrap();
    let host = Host::start_with(
        &["bank-account", "users"],
        &["--auth-tokens", tokens.to_str().unwrap()],
    );
    let send = |id: &str, command: &str, data: &str| {
        host.cli(&[
            "send",
            "bank-account",
            id,
            command,
            "--data",
            data,
            "--token",
            "cli-token-0123456789",
        ])
    };
    assert_eq!(send("c1", "open", r#"{"owner":"Ada"}"#).0, 0);
    assert_eq!(send("c1", "deposit", r#"{"amount":3}"#).0, 0);
    assert_eq!(send("c2", "open", r#"{"owner":"Bob"}"#).0, 0);

    // Without the token: refused, exit code 1.
    let (code, _, err) = host.cli(&["subscribe", "--until-caught-up"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unauthenticated"), "{err}");

    let (code, out, err) = host.cli(&[
        "subscribe",
        "--category",
        "bank_account",
        "--event-type",
        "Opened",
        "--until-caught-up",
        "--token",
        "cli-token-0123456789",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("caught up at position 3"), "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let streams: Vec<&str> = lines
        .iter()
        .map(|e| e["stream"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["bank_account-c1", "bank_account-c2"]);
    assert_eq!(lines[0]["metadata"]["principal"], "ops");

    let (code, out, _) = host.cli(&[
        "subscribe",
        "--from",
        "2",
        "--until-caught-up",
        "--token",
        "cli-token-0123456789",
    ]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "positions 2 and 3: {out}");

    let (code, _, err) = host.cli(&[
        "subscribe",
        "--from",
        "later",
        "--token",
        "cli-token-0123456789",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("malformed_request"), "{err}");
}
