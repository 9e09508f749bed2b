//! The `deploy/` example, tested as shipped: `deploy/nginx/rehydra.conf`
//! (with its host addresses and port replaced) in front of three hosts on
//! one real PostgreSQL server. Each aggregate is served by one host; when
//! that host dies, its aggregates move to another and keep working.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rehydra_e2e::{hosts_on, pg_server};
use serde_json::{Value, json};

const PLUGIN: &str = "bank-account";

/// nginx running the example's configuration; stopped on drop.
struct Nginx {
    child: Child,
    port: u16,
    _prefix: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `deploy/nginx/rehydra.conf`, its upstream list
    /// replaced by `hosts` (`127.0.0.1:PORT`) and its listener by a free
    /// port.
    fn start(hosts: &[String]) -> Nginx {
        let example = repo_root().join("deploy/nginx/rehydra.conf");
        let text = std::fs::read_to_string(&example).expect("deploy/nginx/rehydra.conf");
        let port = pg_harness::free_port().expect("a free port");
        let mut lines = Vec::new();
        let mut servers_written = false;
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("server 127.0.0.1:808") {
                if !servers_written {
                    for h in hosts {
                        lines.push(format!("        server {h} max_fails=1 fail_timeout=5s;"));
                    }
                    servers_written = true;
                }
            } else if trimmed.starts_with("listen 127.0.0.1:8080;") {
                lines.push(format!("        listen 127.0.0.1:{port};"));
            } else {
                lines.push(line.to_owned());
            }
        }
        assert!(servers_written, "the example names its upstream servers");
        let prefix = tempfile::tempdir().expect("a prefix directory");
        let tmp = prefix.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp/");
        // The workers run as an unprivileged user when started by root.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o777)).expect("chmod tmp/");
        let conf = prefix.path().join("rehydra.conf");
        std::fs::write(&conf, lines.join("\n")).expect("writing the configuration");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(prefix.path())
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx (Debian's nginx package; make test installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen; its error log:\n{}",
                std::fs::read_to_string(prefix.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            port,
            _prefix: prefix,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_path_buf()
}

fn nginx_binary() -> PathBuf {
    for candidate in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(candidate).is_file() {
            return candidate.into();
        }
    }
    panic!(
        "no nginx binary: install Debian's nginx package (make test does: scripts/ensure-system-packages)"
    );
}

/// A command through the load balancer with an idempotency key, retried
/// (same key) while the answer is one a retry may cure. Returns the final
/// answer and the upstream that gave it.
async fn through(
    http: &reqwest::Client,
    lb: &str,
    id: &str,
    command: &str,
    body: Value,
    key: &str,
) -> (Value, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = http
            .post(format!(
                "{lb}/v1/aggregates/{PLUGIN}/{id}/commands/{command}"
            ))
            .header("content-type", "application/json")
            .header("Idempotency-Key", key)
            .body(body.to_string())
            .send()
            .await
            .expect("nginx answers");
        let status = resp.status().as_u16();
        let upstream = resp
            .headers()
            .get("x-rehydra-upstream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = resp.text().await.unwrap_or_default();
        match status {
            200 => return (serde_json::from_str(&text).expect("JSON"), upstream),
            409 | 502 | 503 | 504 => {
                assert!(
                    Instant::now() < deadline,
                    "{id} {command}: still {status} {text}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("{id} {command}: unexpected {status} {text}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_routes_each_aggregate_to_one_host_and_moves_it_when_the_host_dies() {
    let server = pg_server().await;
    let (mut hosts, _caches) = hosts_on(&[PLUGIN], &server.url("postgres"), 3);
    let addrs: Vec<String> = hosts
        .iter()
        .map(|h| h.base.trim_start_matches("http://").to_owned())
        .collect();
    let nginx = tokio::task::block_in_place(|| Nginx::start(&addrs));
    let lb = nginx.base();
    let http = reqwest::Client::new();

    // Every command of one aggregate lands on one host.
    let ids: Vec<String> = (0..24).map(|i| format!("lb-{i}")).collect();
    let mut served_by: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for id in &ids {
        let (_, upstream) = through(
            &http,
            &lb,
            id,
            "open",
            json!({"owner": "Ada"}),
            &format!("open-{id}"),
        )
        .await;
        served_by.entry(id.clone()).or_default().insert(upstream);
        for n in 0..4 {
            let (_, upstream) = through(
                &http,
                &lb,
                id,
                "deposit",
                json!({"amount": 10}),
                &format!("{id}-d{n}"),
            )
            .await;
            served_by.entry(id.clone()).or_default().insert(upstream);
        }
    }
    for (id, upstreams) in &served_by {
        assert_eq!(upstreams.len(), 1, "{id} was served by {upstreams:?}");
    }
    let used: BTreeSet<&String> = served_by.values().flatten().collect();
    assert!(
        used.len() >= 2,
        "the aggregates spread over the hosts: {used:?}"
    );

    // Kill the host that serves lb-0; its aggregates move and keep working.
    let victim_addr = served_by["lb-0"]
        .iter()
        .next()
        .expect("an upstream")
        .clone();
    let victim = addrs
        .iter()
        .position(|a| *a == victim_addr)
        .expect("the upstream is one of the hosts");
    hosts[victim].kill9();
    let moved: Vec<&String> = ids
        .iter()
        .filter(|id| served_by[*id].contains(&victim_addr))
        .collect();
    for id in &moved {
        let (body, upstream) = through(
            &http,
            &lb,
            id,
            "deposit",
            json!({"amount": 1}),
            &format!("{id}-after"),
        )
        .await;
        assert_ne!(upstream, victim_addr, "{id} moved off the dead host");
        assert_eq!(
            body["version"], 6,
            "{id}: nothing lost or applied twice: {body}"
        );
        let (status, state) = {
            let resp = http
                .get(format!("{lb}/v1/aggregates/{PLUGIN}/{id}"))
                .send()
                .await
                .expect("nginx answers");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("JSON"))
        };
        assert_eq!(status, 200);
        assert_eq!(state["state"]["balance"], 41, "{id}: {state}");
    }
    // Aggregates of the surviving hosts stay where they were.
    for id in ids
        .iter()
        .filter(|id| !served_by[*id].contains(&victim_addr))
    {
        let (_, upstream) = through(
            &http,
            &lb,
            id,
            "deposit",
            json!({"amount": 1}),
            &format!("{id}-after"),
        )
        .await;
        assert!(served_by[id].contains(&upstream), "{id} stayed on its host");
    }
}
