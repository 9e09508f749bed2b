//! Start-up with a large plugin that is not in the compile cache: the host
//! serves the plugins that are ready at once, answers commands for the one
//! still compiling with `plugins_loading` (503, Retry-After), serves it once
//! it is compiled, and finds it in the cache on the next start.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rehydra_e2e::{
    binary, code, listening_url, plugin, plugins_ready, stdout_lines, wait_for_line,
};
use serde_json::{Value, json};

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url)
        .send()
        .await
        .expect("the host answers")
        .json()
        .await
        .expect("a JSON body")
}

async fn open(
    http: &reqwest::Client,
    base: &str,
    aggregate_type: &str,
) -> (u16, Option<String>, Value) {
    let resp = http
        .post(format!(
            "{base}/v1/aggregates/{aggregate_type}/acc-1/commands/open"
        ))
        .header("content-type", "application/json")
        .body(json!({"owner": "Ada"}).to_string())
        .send()
        .await
        .expect("the host answers");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, retry_after, resp.json().await.expect("a JSON body"))
}

#[tokio::test]
async fn a_cold_javascript_compile_does_not_hold_up_the_other_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for name in ["bank-account", "bank-account-js"] {
        std::fs::copy(plugin(name), plugins.join(format!("{name}.wasm"))).unwrap();
    }
    // A cache of its own, empty: the JS component (12 MB) must compile cold.
    let cache = dir.path().join("cache");
    let args = [
        "run".to_string(),
        "--plugins".into(),
        plugins.display().to_string(),
        "--store".into(),
        format!("embedded://{}", dir.path().join("data").display()),
        "--cache-dir".into(),
        cache.display().to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--grpc".into(),
        "off".into(),
    ];
    let start = || {
        Command::new(binary())
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("host.log")).unwrap(),
            ))
            .spawn()
            .expect("starting rehydra")
    };
    let log = || std::fs::read_to_string(dir.path().join("host.log")).unwrap_or_default();
    let http = reqwest::Client::new();

    let mut child = start();
    let lines = stdout_lines(&mut child).unwrap();
    let base = wait_for_line(
        &lines,
        Instant::now() + Duration::from_secs(120),
        listening_url,
    )
    .unwrap_or_else(|| panic!("the host did not listen; its log:\n{}", log()));

    // The JS compile takes tens of seconds; the host already serves.
    let listed = get(&http, format!("{base}/v1/plugins")).await;
    let loading = listed["loading"].as_array().expect("a loading list");
    assert_eq!(loading.len(), 1, "{listed}");
    assert!(
        loading[0]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("bank-account-js.wasm")),
        "{listed}"
    );
    let served: Vec<&str> = listed["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["aggregate_type"].as_str())
        .collect();
    assert_eq!(served, ["bank-account"]);

    let (status, _, body) = open(&http, &base, "bank-account").await;
    assert_eq!(status, 200, "{body}");

    let (status, retry_after, body) = open(&http, &base, "bank-account-js").await;
    assert_eq!((status, code(&body)), (503, "plugins_loading"), "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("bank-account-js.wasm"), "{message}");

    let health = get(&http, format!("{base}/healthz")).await;
    assert_eq!(health["plugins_loading"], 1, "{health}");
    // Alive, but not ready while a plugin file is still compiling.
    let status = |path: &'static str| {
        let (http, base) = (&http, &base);
        async move {
            let resp = http
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("the host answers");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("JSON"))
        }
    };
    assert_eq!(status("/livez").await.0, 200);
    let (code_, ready) = status("/readyz").await;
    assert_eq!(code_, 503, "{ready}");
    assert!(
        ready["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("compiling")),
        "{ready}"
    );

    // Once compiled it is served, and nothing else was disturbed.
    wait_for_line(
        &lines,
        Instant::now() + Duration::from_secs(300),
        plugins_ready,
    )
    .unwrap_or_else(|| panic!("the JS plugin never became ready; log:\n{}", log()));
    let (status, _, body) = open(&http, &base, "bank-account-js").await;
    assert_eq!(status, 200, "{body}");
    let ready = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("the host answers");
    assert_eq!(
        ready.status().as_u16(),
        200,
        "ready once every plugin is in"
    );
    let listed = get(&http, format!("{base}/v1/plugins")).await;
    assert_eq!(listed["loading"], json!([]), "{listed}");
    assert_eq!(listed["plugins"].as_array().unwrap().len(), 2, "{listed}");
    assert!(
        log().contains("compiling plugin bank-account-js"),
        "the log says what is compiling:\n{}",
        log()
    );
    let _ = child.kill();
    let _ = child.wait();

    // The next start finds the component in the cache: both are served
    // before the host says it listens.
    let mut child = start();
    let lines = stdout_lines(&mut child).unwrap();
    let base = wait_for_line(
        &lines,
        Instant::now() + Duration::from_secs(120),
        listening_url,
    )
    .unwrap_or_else(|| panic!("the host did not listen again; its log:\n{}", log()));
    let listed = get(&http, format!("{base}/v1/plugins")).await;
    assert_eq!(listed["loading"], json!([]), "{listed}");
    let state = get(&http, format!("{base}/v1/aggregates/bank-account-js/acc-1")).await;
    assert_eq!(state["state"]["owner"], "Ada", "{state}");
    let _ = child.kill();
    let _ = child.wait();
}
