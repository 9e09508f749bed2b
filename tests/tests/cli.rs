//! The CLI as a client of a running host: `send`, `state`, `stream`,
//! `plugins`, and its exit codes.

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
