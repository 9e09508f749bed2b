//! What the sandbox costs per command: one `handle` call of the real
//! bank-account plugin (`make plugins` builds it) with epoch interruption
//! and the pooling allocator each on and off, with a warm instance pool and
//! with a fresh instance per call. Runs of the configurations are
//! interleaved and the median of several runs is reported, because this
//! machine is shared and noisy.
//!
//! ```sh
//! make plugins && cargo run -p rehydra --example sandbox_cost
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rehydra::plugin::engine::SandboxLimits;
use rehydra::plugin::{CommandInput, Plugin, PluginRegistry, StateBytes};

const CALLS: usize = 20_000;
const RUNS: usize = 7;

fn plugin_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("plugins").join("bank-account.wasm")
}

struct Setup {
    label: String,
    plugin: Arc<Plugin>,
    _registry: Arc<PluginRegistry>,
    _dir: tempfile::TempDir,
}

async fn setup(epoch: bool, pooling: bool, pool_size: usize) -> Setup {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::copy(plugin_path(), dir.path().join("bank-account.wasm"))
        .expect("target/plugins/bank-account.wasm: run `make plugins` first");
    let limits = SandboxLimits {
        epoch_interruption: epoch,
        pooling,
        pool_size,
        ..SandboxLimits::default()
    };
    let registry = Arc::new(PluginRegistry::new(limits, None).expect("an engine"));
    registry
        .load_dir(dir.path())
        .await
        .expect("loading the plugin");
    let plugin = registry
        .get("bank-account")
        .expect("bank-account is loaded");
    let label = format!(
        "epoch {:<3} pooling {:<3} {}",
        if epoch { "on" } else { "off" },
        if pooling { "on" } else { "off" },
        if pool_size > 0 {
            "warm instance"
        } else {
            "fresh instance per call"
        }
    );
    Setup {
        label,
        plugin,
        _registry: registry,
        _dir: dir,
    }
}

/// Nanoseconds per `handle` call over `CALLS` calls, on this thread.
fn run(plugin: &Plugin, calls: usize) -> f64 {
    let state = StateBytes {
        schema: 1,
        bytes: br#"{"owner":"Ada","balance":100,"open":true}"#.to_vec(),
    };
    let metadata = vec![("now".to_string(), "2026-01-01T00:00:00Z".to_string())];
    let command = CommandInput {
        command_type: "deposit",
        aggregate_id: "a",
        data: br#"{"amount":5}"#,
        metadata: &metadata,
    };
    let started = Instant::now();
    for _ in 0..calls {
        let decision = plugin
            .handle_blocking(&state, 1, &command)
            .expect("the call succeeds")
            .expect("accepted");
        std::hint::black_box(decision);
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let mut setups = Vec::new();
    for pool_size in [4, 0] {
        for (epoch, pooling) in [(true, true), (false, true), (true, false), (false, false)] {
            setups.push(setup(epoch, pooling, pool_size).await);
        }
    }
    let setups = Arc::new(setups);
    // Guest calls must not run on an async worker thread.
    let results = tokio::task::spawn_blocking({
        let setups = setups.clone();
        move || {
            let mut samples: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
            for s in setups.iter() {
                run(&s.plugin, 500); // warm up
            }
            for _ in 0..RUNS {
                for (i, s) in setups.iter().enumerate() {
                    let calls = if s.label.contains("fresh") {
                        CALLS / 10
                    } else {
                        CALLS
                    };
                    samples[i].push(run(&s.plugin, calls));
                }
            }
            samples
        }
    })
    .await
    .expect("the measurement thread");

    println!("| configuration | median µs per handle call ({RUNS} runs) | vs. full sandbox |");
    println!("|---|---|---|");
    let medians: Vec<f64> = results.into_iter().map(median).collect();
    for (i, s) in setups.iter().enumerate() {
        let base = if s.label.contains("fresh") {
            medians[4]
        } else {
            medians[0]
        };
        println!(
            "| {} | {:.2} | {:.2}× |",
            s.label,
            medians[i] / 1000.0,
            medians[i] / base
        );
    }
}
