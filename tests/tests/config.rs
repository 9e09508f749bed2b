//! `rehydra run --config FILE` with the real binary: the file's settings
//! take effect, a flag overrides one of them, and a bad file stops the
//! host before it starts, saying what is wrong and where. (The precedence
//! of every source and the messages are unit-tested in `cli`.)

use std::process::Command;

use rehydra_e2e::{Host, binary, code};
use serde_json::json;

/// A file in a directory of its own (the host's directory is made when it
/// starts, after the file is needed).
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("rehydra.toml");
    std::fs::write(&path, text).expect("writing the configuration file");
    (dir, path.display().to_string())
}

#[tokio::test]
async fn the_file_configures_the_host_and_a_flag_overrides_it() {
    // The host's store, HTTP and gRPC addresses are given as flags by the
    // harness, so the file's would be overridden: this file's `store`
    // would fail to open if it were used.
    let (_dir, path) =
        config_file("max-command-bytes = 64\nstore = \"postgres://nobody@127.0.0.1:1/nothing\"\n");
    let big = json!({"owner": "x".repeat(100)});

    let host = Host::start_with(&["bank-account"], &["--config", &path]);
    let (status, body) = host
        .command("bank-account", "c1", "open", big.clone())
        .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(code(&body), "payload_too_large");
    let (status, body) = host
        .command("bank-account", "c1", "open", json!({"owner": "Ada"}))
        .await;
    assert_eq!(status, 200, "{body}");
    drop(host);

    let host = Host::start_with(
        &["bank-account"],
        &["--config", &path, "--max-command-bytes", "4096"],
    );
    let (status, body) = host.command("bank-account", "c2", "open", big).await;
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_bad_file_stops_the_host_with_exit_code_2_and_says_why() {
    let run = |path: &str| {
        let out = Command::new(binary())
            .args(["run", "--config", path, "--store", "memory://"])
            .output()
            .expect("running rehydra");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (_dir, path) = config_file("store = \"memory://\"\nmax-inflight = 10\n");
    let (status, stderr) = run(&path);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "rehydra: {path}, line 2: unknown key `max-inflight`: did you mean `max-in-flight`?"
        )),
        "{stderr}"
    );

    let (_dir, path) = config_file("idle-timeout = 5\n");
    let (status, stderr) = run(&path);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("line 1: idle-timeout = 5: ")
            && stderr.contains("expected DURATION, e.g. idle-timeout = \"5m\""),
        "{stderr}"
    );

    let (status, stderr) = run("/nonexistent/rehydra.toml");
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot read the configuration file /nonexistent/rehydra.toml"),
        "{stderr}"
    );
}
