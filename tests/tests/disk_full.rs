//! The embedded store on a disk that fills up under load, through the
//! binary: a real file system of 8 MiB (a `tmpfs` this test mounts, so it
//! runs as root, as CI does), deposits from 8 writers until the store
//! refuses them. The refusal must be a clear `store_unavailable` that says
//! the disk is full; the host must stay up and keep serving reads; and
//! once there is room again (the file system grown, the host restarted),
//! every acknowledged deposit is there exactly once and new ones are taken.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rehydra_e2e::{Host, code, stream_prefix};
use serde_json::{Value, json};

const PLUGIN: &str = "bank-account";
const WRITERS: usize = 8;

/// A `tmpfs` mounted for the test's life.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).expect("the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs at {} failed: this test needs root (CAP_SYS_ADMIN), as CI has",
            at.display()
        );
        SmallDisk(at.to_path_buf())
    }

    fn grow(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("running mount");
        assert!(status.success(), "growing the tmpfs failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_appends_clearly_and_loses_nothing_acknowledged() {
    let mount_dir = tempfile::tempdir().expect("tempdir");
    let disk = SmallDisk::mount(&mount_dir.path().join("disk"), "8m");
    let store = format!("embedded://{}", disk.0.join("data").display());
    let mut host = Host::start_with(&[PLUGIN], &["--store", &store]);

    for a in 0..WRITERS {
        let (status, body) = host
            .command(PLUGIN, &format!("acc-{a}"), "open", json!({"owner": "Ada"}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // Each writer deposits 1, 2, 3, ... until the store refuses one.
    let full = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for a in 0..WRITERS {
        let url = format!(
            "{}/v1/aggregates/{PLUGIN}/acc-{a}/commands/deposit",
            host.base
        );
        let full = full.clone();
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acked: Vec<u64> = Vec::new();
            let mut refusal = None;
            let mut amount = 1u64;
            while !full.load(Ordering::Relaxed) && amount < 1_000_000 {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(json!({ "amount": amount }).to_string())
                    .send()
                    .await
                    .expect("the host answers");
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.expect("a JSON body");
                if status == 200 {
                    acked.push(amount);
                } else {
                    full.store(true, Ordering::Relaxed);
                    refusal = Some((status, body));
                }
                amount += 1;
            }
            (acked, refusal)
        }));
    }
    let mut acked: Vec<Vec<u64>> = Vec::new();
    let mut refusals = Vec::new();
    for writer in writers {
        let (a, refusal) = writer.await.expect("a writer");
        acked.push(a);
        refusals.extend(refusal);
    }
    let (status, body) = refusals.first().expect("the disk filled up").clone();
    assert_eq!((status, code(&body)), (503, "store_unavailable"), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("disk") && message.contains("full") && message.contains("free"),
        "the refusal says the disk is full and what to do: {message}"
    );
    let total: usize = acked.iter().map(Vec::len).sum();
    assert!(total > 1000, "only {total} deposits before the disk filled");
    eprintln!("disk full after {total} acknowledged deposits; refused with {status}: {message}");

    // Still up: reads are served while the disk is full.
    let (status, health) = host.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let stream = format!("{}-acc-0", stream_prefix(PLUGIN));
    assert!(host.read_stream(&stream).await.len() > acked[0].len());

    // Room again: everything acknowledged is there once, and the store
    // takes new deposits.
    disk.grow("64m");
    host.restart();
    for (a, amounts) in acked.iter().enumerate() {
        let stream = format!("{}-acc-{a}", stream_prefix(PLUGIN));
        let stored: Vec<u64> = host
            .read_stream(&stream)
            .await
            .iter()
            .filter(|e| e["type"] == "Deposited")
            .map(|e| e["data"]["amount"].as_u64().expect("an amount"))
            .collect();
        let distinct: BTreeSet<u64> = stored.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            stored.len(),
            "acc-{a}: a deposit stored twice"
        );
        for amount in amounts {
            assert!(
                distinct.contains(amount),
                "acc-{a}: the acknowledged deposit of {amount} is lost"
            );
        }
        let (status, body) = host
            .command(PLUGIN, &format!("acc-{a}"), "deposit", json!({"amount": 7}))
            .await;
        assert_eq!(status, 200, "acc-{a} after the disk has room: {body}");
    }
    host.kill9();
}
