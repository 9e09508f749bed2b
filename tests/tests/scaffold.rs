//! `rehydra new` end to end, for each language: create a project in a
//! temporary directory, run its generated tests (`make test`), build it with
//! its one command (`make`), and load the component in a host that then
//! answers commands.
//!
//! The JS and Python projects install their pinned build tools from the npm
//! registry and PyPI (cached after the first run). The Rust project builds
//! in `target/scaffold-e2e`, kept between runs so that only the first one
//! compiles its dependencies.

use std::path::Path;
use std::process::Command;

use rehydra_e2e::{Host, binary, target_dir};
use serde_json::json;

/// Runs `program args` in `dir`; panics with its output if it fails.
fn run(dir: &Path, program: &str, args: &[&str], what: &str) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir().join("scaffold-e2e"))
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: `{program} {}` failed ({}):\n{stdout}\n{stderr}",
        args.join(" "),
        out.status
    );
    stdout
}

async fn new_project_builds_passes_its_tests_and_loads(lang: &str) {
    let name = format!("tally-{lang}");
    let parent = tempfile::tempdir().expect("a temporary directory");
    let rehydra = binary().display().to_string();
    let dir_arg = parent.path().display().to_string();
    let said = run(
        parent.path(),
        &rehydra,
        &["new", "--lang", lang, &name, "--dir", &dir_arg],
        &name,
    );
    assert!(said.contains("make test"), "{name}: {said}");
    let project = parent.path().join(&name);

    // Twice refuses: the directory is in use.
    let again = Command::new(&rehydra)
        .args(["new", "--lang", lang, &name, "--dir", &dir_arg])
        .output()
        .expect("running rehydra new");
    assert!(
        !again.status.success(),
        "{name}: a second `new` must refuse"
    );

    run(&project, "make", &["test"], &format!("{name}: make test"));
    run(&project, "make", &[], &format!("{name}: make"));
    let wasm = std::fs::read(project.join(format!("{name}.wasm")))
        .unwrap_or_else(|e| panic!("{name}: make wrote no {name}.wasm: {e}"));

    let host = Host::start_files(&[(format!("{name}.wasm"), wasm)], &[]);
    let (status, body) = host
        .command(&name, "c1", "start", json!({"label": "hits"}))
        .await;
    assert_eq!(status, 200, "{name}: {body}");
    let (status, body) = host
        .command(&name, "c1", "increment", json!({"by": 2}))
        .await;
    assert_eq!(
        (status, body["reply"].clone()),
        (200, json!(2)),
        "{name}: {body}"
    );
    let (status, body) = host
        .command(&name, "c1", "increment", json!({"by": 0}))
        .await;
    assert_eq!(
        (status, body["error"]["details"]["fields"][0].clone()),
        (
            422,
            json!({"field": "by", "message": "must be greater than 0"})
        ),
        "{name}: {body}"
    );
    let (_, body) = host.get(&format!("/v1/aggregates/{name}/c1")).await;
    assert_eq!(
        body["state"],
        json!({"label": "hits", "total": 2}),
        "{name}: {body}"
    );
    let (_, body) = host
        .get(&format!("/v1/streams/{}-c1", name.replace('-', "_")))
        .await;
    assert_eq!(body["events"][1]["type"], "Incremented", "{name}: {body}");
}

#[tokio::test]
async fn rust_project() {
    new_project_builds_passes_its_tests_and_loads("rust").await
}

#[tokio::test]
async fn js_project() {
    new_project_builds_passes_its_tests_and_loads("js").await
}

#[tokio::test]
async fn python_project() {
    new_project_builds_passes_its_tests_and_loads("python").await
}
