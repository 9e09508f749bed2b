//! `rehydra-bench`: Rehydra's benchmark suite (issue 8).
//!
//! Runs the scenarios below with the real bank-account component and
//! writes one Markdown table per scenario to stdout or `--out FILE`
//! (progress goes to stderr). Every figure is the median of `--runs`
//! runs; ratios are taken within the same invocation.
//!
//! | name        | what                                                        |
//! |-------------|-------------------------------------------------------------|
//! | `inproc`    | `Aggregates::execute` on `memory://`, `embedded://` and `postgres://`, 1 / 1,000 / 100,000 aggregates |
//! | `store`     | appends straight into `embedded://` and `postgres://`, no actors or plugins: the writer's ceiling; and the same appends written by hand, run by pgbench |
//! | `http`      | the real binary on `embedded://`, POSTs from a load client  |
//! | `cluster`   | three hosts on one `postgres://` behind nginx (`deploy/nginx`), wrk; consistent hashing vs round-robin |
//! | `rehydrate` | cold load of one aggregate with 10 / 1,000 / 100,000 events, with the host's metadata and with `{}` |
//! | `snapshot-cost` | in-process deposits with `--snapshot-every 100` and `0`, alternating: what storing snapshots costs commands |
//! | `verify` | in-process deposits on 10,000 accounts with and without verifications of the next plugin version running: the p99 impact and the verification's rate |
//! | `overload` | HTTP deposits at 16 / 256 / 2,048 clients against `--max-in-flight 64`: accepted rate and latency, `overloaded` rate, host memory |
//! | `snapshot` | cold load of one aggregate with 1,000,000 events from all its events and from its snapshot, alternating |
//! | `memory`    | RSS growth per resident aggregate                            |
//! | `startup`   | binary start to ready, and hot-reload latency, cache cold and warm |
//! | `timers`    | a million pending timers: reading them into the timer index, start-up time and memory with them, against an empty store |
//! | `wasm`      | the bank-account component vs the same code natively: through `Aggregates::execute`, and one `Plugin::handle` call |
//! | `peer`      | the same bank account on `cqrs-es` + `MemStore` vs `memory://` |
//!
//! Usage: `rehydra-bench [--out FILE] [--runs N] [--secs S] [--only a,b] [--memory-aggregates N] [--timers N]`.
//! Needs `make plugins` and `cargo build -p rehydra` first (`make bench`
//! does both), and PostgreSQL's server programs and pgbench (Debian's
//! `postgresql` package) for the `postgres://` rows, which start their own
//! throwaway servers. `--only inproc-postgres` and `--only store-postgres`
//! run just the `postgres://` part of `inproc` and `store`.

mod alloc;
mod cluster;
mod http;
mod inproc;
mod native;
mod peer;
mod postgres;
mod stats;
mod store;
mod timers;
mod wrk;

use std::time::Duration;

use inproc::{SeedMetadata, StoreKind};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;
use stats::{RunResult, fmt_dur, fmt_rate};

/// Where the tables go: `--out FILE`, or stdout. (`cqrs-es`'s `MemStore`
/// prints a line to stdout for every load and store, so `make bench`
/// writes the tables to a file and discards stdout.)
static OUT: std::sync::OnceLock<std::sync::Mutex<Box<dyn std::io::Write + Send>>> =
    std::sync::OnceLock::new();

/// `println!` into the table output.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut w = OUT
            .get()
            .expect("the output is set up first")
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        writeln!(w, $($arg)*).expect("writing the results");
        w.flush().expect("flushing the results");
    }};
}

/// Command-line options.
struct Options {
    runs: usize,
    secs: f64,
    only: Option<Vec<String>>,
    memory_aggregates: usize,
    timers: usize,
    out: Option<std::path::PathBuf>,
}

impl Options {
    fn parse() -> Options {
        let mut o = Options {
            runs: 3,
            secs: 2.0,
            only: None,
            memory_aggregates: 1_000_000,
            timers: 1_000_000,
            out: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .unwrap_or_else(|| panic!("{name} needs a value"))
            };
            match a.as_str() {
                "--out" => o.out = Some(value("--out").into()),
                "--runs" => o.runs = value("--runs").parse().expect("--runs N"),
                "--secs" => o.secs = value("--secs").parse().expect("--secs S"),
                "--only" => o.only = Some(value("--only").split(',').map(str::to_string).collect()),
                "--memory-aggregates" => {
                    o.memory_aggregates = value("--memory-aggregates")
                        .parse()
                        .expect("--memory-aggregates N")
                }
                "--timers" => o.timers = value("--timers").parse().expect("--timers N"),
                "-h" | "--help" => {
                    println!(
                        "rehydra-bench [--out FILE] [--runs N] [--secs S] [--only inproc,inproc-postgres,store,store-postgres,store-postgres-lanes,http,cluster,rehydrate,snapshot,snapshot-cost,verify,overload,memory,startup,wasm,peer,profile,profile-native,profile-embedded,profile-rehydrate,timers] [--memory-aggregates N] [--timers N]"
                    );
                    std::process::exit(0);
                }
                other => panic!("unknown argument {other:?} (try --help)"),
            }
        }
        o
    }

    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == name))
    }

    /// Whether a scenario's `postgres://` part runs: with the scenario, or
    /// alone as `<scenario>-postgres`.
    fn wants_postgres(&self, scenario: &str) -> bool {
        self.wants(scenario) || self.wants(&format!("{scenario}-postgres"))
    }
}

/// The machine, for the report's header.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cpus} CPUs ({model}), {mem_gib:.1} GiB RAM")
}

/// Which build this is, for the report's header.
fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "`dev` profile (dependencies, bench/ and the natively linked plugin at opt-level 2, host opt-level 1, debug assertions on)"
    } else {
        "`bench-release` profile (everything at opt-level 3, no debug assertions)"
    }
}

/// The 1-, 5- and 15-minute load averages: how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// A table row of a load scenario.
fn load_row(what: &str, store: &str, n: usize, c: usize, r: &RunResult) -> String {
    // wrk reports no p999.
    let p999 = if r.p999.is_zero() {
        "—".to_string()
    } else {
        fmt_dur(r.p999)
    };
    format!(
        "| {what} | {store} | {} | {c} | {} | {} | {} | {} | {} | {} |",
        fmt_rate(n as f64),
        fmt_rate(r.per_sec),
        fmt_dur(r.p50),
        fmt_dur(r.p99),
        p999,
        fmt_cpu(r),
        r.errors
    )
}

/// CPU per operation, or a dash where it was not measured (the HTTP host
/// is another process); with a database server, this process's and the
/// server's (`12.00 µs + 34.00 µs PG`).
fn fmt_cpu(r: &RunResult) -> String {
    if r.cpu_per_op.is_zero() {
        "—".to_string()
    } else if r.server_cpu_per_op.is_zero() {
        fmt_dur_precise(r.cpu_per_op)
    } else {
        format!(
            "{} + {} PG",
            fmt_dur_precise(r.cpu_per_op),
            fmt_dur_precise(r.server_cpu_per_op)
        )
    }
}

const LOAD_HEADER: &str = "| path | store | aggregates | clients | commands/s | p50 | p99 | p999 | CPU per command | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|";

#[tokio::main]
async fn main() {
    let o = Options::parse();
    let sink: Box<dyn std::io::Write + Send> = match &o.out {
        Some(path) => Box::new(std::fs::File::create(path).expect("creating the --out file")),
        None => Box::new(std::io::stdout()),
    };
    let _ = OUT.set(std::sync::Mutex::new(sink));
    out!(
        "Machine: {}. Build: {}. Medians of {} runs of {} s. Load average at start: {}.\n",
        machine(),
        build_profile(),
        o.runs,
        o.secs,
        load_average()
    );
    let (registry, _plugin_dir) = inproc::registry().await;
    let levels = [1, 16, 256];

    let inproc_kinds: Vec<StoreKind> = if o.wants("inproc") {
        vec![StoreKind::Memory, StoreKind::Embedded, StoreKind::Postgres]
    } else if o.wants_postgres("inproc") {
        vec![StoreKind::Postgres]
    } else {
        Vec::new()
    };
    if !inproc_kinds.is_empty() {
        eprintln!("in-process throughput…");
        out!("### In-process: deposits through `Aggregates::execute`\n\n{LOAD_HEADER}");
        for kind in inproc_kinds {
            for n in [1, 1000, 100_000] {
                for (c, r) in inproc::throughput(&registry, kind, n, &levels, o.runs, o.secs).await
                {
                    out!("{}", load_row("in-process", kind.label(), n, c, &r));
                }
            }
        }
        out!();
    }

    if o.wants_postgres("store") {
        eprintln!("store appends…");
        out!(
            "### The store alone: one-event appends into `embedded://` and `postgres://`, no actors or plugins\n\n{LOAD_HEADER}"
        );
        if o.wants("store") {
            for (c, r) in store::appends(1000, &levels, o.runs, o.secs).await {
                out!("{}", load_row("store append", "embedded://", 1000, c, &r));
            }
        }
        let pg = store::postgres_vs_pgbench(1000, &levels, o.runs, o.secs).await;
        for l in &pg {
            out!(
                "{}",
                load_row("store append", "postgres://", 1000, l.clients, &l.store)
            );
        }
        out!();
        out!(
            "### PostgreSQL: the `postgres://` store against the same appends written by hand (pgbench), 1,000 streams, runs alternating\n\nEach on a fresh server with {}. pgbench: one transaction per append (`BEGIN`; `UPDATE streams … RETURNING version`; `INSERT INTO events …`; `COMMIT`), `-M prepared`, the same number of clients, each on its own share of the streams.\n\n| clients | postgres:// appends/s | postgres:// p99 | pgbench transactions/s | pgbench p99 | postgres:// / pgbench |\n|---:|---:|---:|---:|---:|---:|",
            postgres::settings_text()
        );
        for l in &pg {
            out!(
                "| {} | {} | {} | {} | {} | {:.2}× |",
                l.clients,
                fmt_rate(l.store.per_sec),
                fmt_dur(l.store.p99),
                fmt_rate(l.pgbench.per_sec),
                fmt_dur(l.pgbench.p99),
                l.ratio
            );
        }
        out!();
        out!(
            "### PostgreSQL: where the appends' time goes\n\n| what | clients | appends/s | p50 | p99 | p999 | appends per commit | transactions with an id per append | WAL per append | client CPU per append | server CPU per append | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for l in &pg {
            for (what, r, w) in [
                ("postgres:// store", &l.store, &l.store_work),
                ("pgbench", &l.pgbench, &l.pgbench_work),
            ] {
                out!(
                    "| {what} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.0} B | {} | {} | {} |",
                    l.clients,
                    fmt_rate(r.per_sec),
                    fmt_dur(r.p50),
                    fmt_dur(r.p99),
                    fmt_dur(r.p999),
                    w.appends_per_commit,
                    w.xids_per_append,
                    w.wal_per_append,
                    fmt_dur_precise(r.cpu_per_op),
                    fmt_dur_precise(r.server_cpu_per_op),
                    r.errors
                );
            }
        }
        out!();
    }

    // Not in the default run: one in-process level for profiling under
    // `valgrind --tool=callgrind` (see BENCHMARKS.md): `profile` on
    // `memory://` with 16 clients, `profile-native` the same with the
    // native twin of the plugin, `profile-embedded` on `embedded://` with
    // 256 clients, all over 1,000 aggregates.
    for (name, kind, clients) in [
        ("profile", StoreKind::Memory, 16),
        ("profile-native", StoreKind::Memory, 16),
        ("profile-embedded", StoreKind::Embedded, 256),
    ] {
        if o.only
            .as_ref()
            .is_some_and(|only| only.iter().any(|x| x == name))
        {
            eprintln!("{name} run…");
            let registry = if name == "profile-native" {
                native::registry()
            } else {
                registry.clone()
            };
            out!("{LOAD_HEADER}");
            for (c, r) in inproc::throughput(&registry, kind, 1000, &[clients], 1, o.secs).await {
                out!("{}", load_row("in-process", kind.label(), 1000, c, &r));
            }
        }
    }

    // Not in the default run either: the `postgres://` store with 16
    // clients spread over 1, 2 and 4 stores on one server, to see whether
    // more groups in flight raise its throughput.
    if o.only
        .as_ref()
        .is_some_and(|only| only.iter().any(|x| x == "store-postgres-lanes"))
    {
        eprintln!("postgres:// groups in flight…");
        out!(
            "### `postgres://` with 16 clients spread over several stores on one server ({} writers each)\n\n| stores | writers | appends/s | p50 | p99 | appends per commit | CPU per append | errors |\n|---:|---:|---:|---:|---:|---:|---:|---:|",
            rehydra::store::postgres::WRITERS
        );
        for (k, r, per_commit) in store::postgres_lanes(1000, 16, o.runs, o.secs).await {
            out!(
                "| {k} | {} | {} | {} | {} | {per_commit:.1} | {} | {} |",
                k * rehydra::store::postgres::WRITERS,
                fmt_rate(r.per_sec),
                fmt_dur(r.p50),
                fmt_dur(r.p99),
                fmt_cpu(&r),
                r.errors
            );
        }
        out!();
    }

    // Not in the default run either: one cold load of a 10,000-event
    // account with the host's metadata on `memory://`, for profiling the
    // replay path.
    if o.only
        .as_ref()
        .is_some_and(|only| only.iter().any(|x| x == "profile-rehydrate"))
    {
        eprintln!("profile-rehydrate run…");
        let t =
            inproc::rehydrate(&registry, StoreKind::Memory, 10_000, SeedMetadata::Host, 1).await;
        out!("10,000 events replayed in {}", fmt_dur(t.replay));
    }

    if o.wants("http") {
        eprintln!("HTTP throughput…");
        out!("### Over HTTP: the `rehydra` binary on `embedded://`, loopback\n\n{LOAD_HEADER}");
        for n in [1, 1000] {
            for (c, r) in http::throughput(n, &levels, o.runs, o.secs).await {
                out!("{}", load_row("HTTP", "embedded://", n, c, &r));
            }
        }
        // The same route driven by wrk, a process of its own: the rows
        // above share this process's cores with their load generator.
        let r = http::wrk_throughput(o.runs, o.secs).await;
        out!(
            "{}",
            load_row(
                "HTTP, wrk",
                "embedded://",
                http::WRK_ACCOUNTS,
                http::WRK_CONNECTIONS,
                &r
            )
        );
        out!();
    }

    if o.wants("cluster") {
        eprintln!("three hosts behind nginx…");
        out!(
            "### Several hosts: {} `rehydra` hosts on one `postgres://` behind nginx (`deploy/nginx/rehydra.conf`), wrk with {} connections, deposits on random accounts of {}, runs alternating\n\n| routing | commands/s | p50 | p99 | conflicts retried per command | non-2xx responses | hosts' CPU per command | PostgreSQL CPU per command |\n|---|---:|---:|---:|---:|---:|---:|---:|",
            cluster::HOSTS,
            cluster::CONNECTIONS,
            fmt_rate(cluster::ACCOUNTS as f64)
        );
        for (routing, r) in cluster::compare(o.runs, o.secs).await {
            out!(
                "| {} | {} | {} | {} | {:.2} % | {:.2} % | {} | {} |",
                routing.label(),
                fmt_rate(r.per_sec),
                fmt_dur(r.p50),
                fmt_dur(r.p99),
                r.conflict_rate * 100.0,
                r.failed_rate * 100.0,
                fmt_dur_precise(r.hosts_cpu),
                fmt_dur_precise(r.server_cpu)
            );
        }
        out!();
    }

    if o.wants("rehydrate") {
        eprintln!("rehydration…");
        out!(
            "### Rehydration: first `state()` of one aggregate on a fresh `Aggregates`\n\n| store | event metadata | events | time | events/s | store read alone | read / replay |\n|---|---|---:|---:|---:|---:|---:|"
        );
        for metadata in [SeedMetadata::Host, SeedMetadata::Empty] {
            for kind in [StoreKind::Memory, StoreKind::Embedded] {
                for events in [10, 1000, 100_000] {
                    let r = inproc::rehydrate(&registry, kind, events, metadata, o.runs).await;
                    out!(
                        "| {} | {} | {} | {} | {} | {} | {:.2} |",
                        kind.label(),
                        metadata.label(),
                        fmt_rate(events as f64),
                        fmt_dur(r.replay),
                        fmt_rate(events as f64 / r.replay.as_secs_f64()),
                        fmt_dur(r.read),
                        r.read.as_secs_f64() / r.replay.as_secs_f64()
                    );
                }
            }
        }
        out!();
    }

    if o.wants("verify") {
        eprintln!("what verifying a new plugin version costs…");
        let v =
            inproc::verification(&registry, StoreKind::Memory, 10_000, 64, o.runs, o.secs).await;
        out!(
            "### Upgrade check: deposits on `memory://`, 10,000 resident accounts, 64 clients, with and without verifications of the next version running, runs alternating\n\n{LOAD_HEADER}"
        );
        out!(
            "{}",
            load_row("no verification", "memory://", 10_000, 64, &v.quiet)
        );
        out!(
            "{}",
            load_row(
                "verifying 10,000 accounts",
                "memory://",
                10_000,
                64,
                &v.verifying
            )
        );
        out!(
            "\nVerification ran at {} aggregates/s and {} events/s while the deposits ran.\n",
            fmt_rate(v.aggregates_per_sec),
            fmt_rate(v.events_per_sec)
        );
    }

    if o.wants("snapshot-cost") {
        eprintln!("what snapshots cost the command path…");
        out!(
            "### Snapshots on the command path: deposits through `Aggregates::execute`, 1,000 accounts, 64 clients, runs alternating\n\n{LOAD_HEADER}"
        );
        for kind in [StoreKind::Memory, StoreKind::Embedded] {
            let (with, without) =
                inproc::snapshot_cost(&registry, kind, 1000, 64, o.runs, o.secs).await;
            out!(
                "{}",
                load_row("`--snapshot-every 100`", kind.label(), 1000, 64, &with)
            );
            out!(
                "{}",
                load_row("`--snapshot-every 0`", kind.label(), 1000, 64, &without)
            );
        }
        out!();
    }

    if o.wants("overload") {
        let cap = 64;
        eprintln!("overload (--max-in-flight {cap})…");
        out!(
            "### Overload: deposits over HTTP to one host on `embedded://` with `--max-in-flight {cap}`, {secs} s per level, clients in this process (latency from the client's send, connection wait included)\n\n| clients | accepted/s | accepted p50 | accepted p99 | overloaded/s | other answers | host RSS: start, most in 1st half, most in 2nd half |\n|---:|---:|---:|---:|---:|---:|---:|",
            secs = o.secs * 5.0
        );
        for r in http::overload(cap, &[16, 256, 2048], o.secs * 5.0).await {
            out!(
                "| {} | {} | {} | {} | {} | {} | {:.1}, {:.1}, {:.1} MiB |",
                r.clients,
                fmt_rate(r.accepted.per_sec),
                fmt_dur(r.accepted.p50),
                fmt_dur(r.accepted.p99),
                fmt_rate(r.overloaded_per_sec),
                r.other,
                r.rss_start_kib as f64 / 1024.0,
                r.rss_first_half_kib as f64 / 1024.0,
                r.rss_second_half_kib as f64 / 1024.0
            );
        }
        out!();
    }

    if o.wants("snapshot") {
        let events = 1_000_000;
        eprintln!("cold load of {events} events, with and without a snapshot…");
        out!(
            "### Snapshots: cold load of one aggregate of 1,000,000 events on a fresh `Aggregates`, runs alternating\n\n| store | loaded from | time (median) | process CPU per load | events replayed |\n|---|---|---:|---:|---:|"
        );
        for kind in [StoreKind::Memory, StoreKind::Embedded] {
            let r = inproc::snapshot_load(&registry, kind, events, o.runs).await;
            out!(
                "| {} | all its events (`--snapshot-every 0`) | {} | {} | {} |",
                kind.label(),
                fmt_dur(r.replay),
                fmt_dur(r.replay_cpu),
                fmt_rate(events as f64)
            );
            // The kernel counts CPU time in 10 ms ticks.
            let cpu = |d: Duration| {
                if d.is_zero() {
                    "< 10 ms".to_owned()
                } else {
                    fmt_dur(d)
                }
            };
            out!(
                "| {} | its snapshot at the last event | {} | {} | 0 |",
                kind.label(),
                fmt_dur(r.from_snapshot),
                cpu(r.snapshot_cpu)
            );
            out!(
                "| {} | ratio | {:.0}× faster | | |",
                kind.label(),
                r.replay.as_secs_f64() / r.from_snapshot.as_secs_f64().max(1e-9)
            );
        }
        out!();
    }

    if o.wants("memory") {
        eprintln!("memory per aggregate ({} aggregates)…", o.memory_aggregates);
        let m = inproc::memory_per_aggregate(&registry, o.memory_aggregates).await;
        out!(
            "### Memory: resident aggregates on `memory://` (one run)\n\n| aggregates | heap growth per aggregate | RSS growth per aggregate | heap blocks per aggregate | state bytes | host overhead per aggregate (heap − state) | cold loads/s |\n|---:|---:|---:|---:|---:|---:|---:|"
        );
        out!(
            "| {} | {:.0} B | {:.0} B | {:.1} | {} B | {:.0} B | {} |\n",
            fmt_rate(m.aggregates as f64),
            m.heap_per_aggregate,
            m.bytes_per_aggregate,
            m.blocks_per_aggregate,
            m.state_bytes,
            m.heap_per_aggregate - m.state_bytes as f64,
            fmt_rate(m.loads_per_sec)
        );
    }

    if o.wants("startup") {
        eprintln!("start-up…");
        let (cold, warm) = tokio::task::spawn_blocking(move || http::startup(o.runs))
            .await
            .expect("the start-up scenario");
        out!(
            "### Start-up: process spawn to `plugins ready`, one 166 KB plugin\n\n| compile cache | time to ready |\n|---|---:|\n| cold | {} |\n| warm | {} |\n",
            fmt_dur(cold),
            fmt_dur(warm)
        );
        eprintln!("hot reload…");
        let (cold, warm) = http::reload(o.runs).await;
        out!(
            "### Hot reload: renaming a new version of bank-account into the watched plugin directory, until `/v1/plugins` serves it\n\n| the new version in the compile cache | time until served |\n|---|---:|\n| no (compiled) | {} |\n| yes (a rollback) | {} |\n",
            fmt_dur(cold),
            fmt_dur(warm)
        );
    }

    if o.wants("timers") {
        eprintln!("pending timers…");
        let t = timers::pending_timers(o.timers, o.runs).await;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        out!(
            "### Pending timers: {} timers due in a day, in an embedded store; the real binary started on it, and on an empty store, alternately (medians of {})\n\n| | value |\n|---|---:|\n| writing them into the store (set-up) | {} |\n| first start: until the timer index lists them all | {} |\n| RSS right after that | {:.1} MiB |\n| start to ready, index up to date | {} |\n| start to ready, empty store | {} |\n| ratio | {:.2} |\n| RSS after start, index up to date | {:.1} MiB |\n| RSS after start, empty store | {:.1} MiB |\n| `GET /v1/timers?limit=100` | {} |\n| timer index file | {:.0} MiB |\n",
            fmt_rate(t.timers as f64),
            o.runs.max(1),
            fmt_dur(t.write),
            fmt_dur(t.first_index),
            mib(t.rss_after_first_index),
            fmt_dur(t.start_with),
            fmt_dur(t.start_without),
            t.start_with.as_secs_f64() / t.start_without.as_secs_f64().max(1e-9),
            mib(t.rss_with),
            mib(t.rss_without),
            fmt_dur_precise(t.list_100),
            mib(t.index_bytes)
        );
    }

    if o.wants("wasm") {
        eprintln!("the cost of Wasm…");
        let native = native::registry();
        let n = 1000;
        out!(
            "### The cost of Wasm: the bank-account code as a component and natively, through `Aggregates::execute` on `memory://`, {} accounts, runs alternating\n\n| clients | component commands/s | component time per command | component CPU per command | component p99 | native commands/s | native time per command | native CPU per command | native p99 | component / native, time | component / native, CPU |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            fmt_rate(n as f64)
        );
        for (c, w, nat) in
            inproc::wasm_vs_native(&registry, &native, n, &[1, 16], o.runs, o.secs).await
        {
            out!(
                "| {c} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2}× | {:.2}× |",
                fmt_rate(w.per_sec),
                fmt_dur_precise(Duration::from_secs_f64(1.0 / w.per_sec)),
                fmt_cpu(&w),
                fmt_dur(w.p99),
                fmt_rate(nat.per_sec),
                fmt_dur_precise(Duration::from_secs_f64(1.0 / nat.per_sec)),
                fmt_cpu(&nat),
                fmt_dur(nat.p99),
                nat.per_sec / w.per_sec,
                w.cpu_per_op.as_secs_f64() / nat.cpu_per_op.as_secs_f64()
            );
        }
        out!();
        let iters = 20_000;
        let c = inproc::call_cost(&registry, &native, iters, o.runs).await;
        let ratio = |d: Duration| d.as_secs_f64() / c.native.as_secs_f64();
        out!(
            "### The cost of Wasm, one call: a deposit through `Plugin::handle`, sequential, {iters} calls per run\n\n| what | time per call | ratio to native |\n|---|---:|---:|\n| the component | {} | {:.1}× |\n| the native twin (same code) | {} | 1.0× |\n| for reference: an empty call on guest threads (the hand-off a guest call makes) | {} | {:.1}× |\n| for reference: an empty `spawn_blocking` round trip (the hand-off before) | {} | {:.1}× |\n",
            fmt_dur_precise(c.wasm),
            ratio(c.wasm),
            fmt_dur_precise(c.native),
            fmt_dur_precise(c.guest_thread),
            ratio(c.guest_thread),
            fmt_dur_precise(c.spawn_blocking),
            ratio(c.spawn_blocking),
        );
    }
    if o.wants("peer") {
        eprintln!("cqrs-es peer…");
        out!(
            "### Peer: `cqrs-es` 0.4 with `MemStore` vs Rehydra on `memory://`, 1,000 fresh accounts, runs alternating\n\n| clients | cqrs-es commands/s | cqrs-es p99 | cqrs-es CPU per command | Rehydra commands/s | Rehydra p99 | Rehydra CPU per command | Rehydra / cqrs-es |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (c, p, r) in peer::compare(&registry, 1000, &[1, 16], o.runs, o.secs).await {
            out!(
                "| {c} | {} | {} | {} | {} | {} | {} | {:.2}× |",
                fmt_rate(p.per_sec),
                fmt_dur(p.p99),
                fmt_cpu(&p),
                fmt_rate(r.per_sec),
                fmt_dur(r.p99),
                fmt_cpu(&r),
                r.per_sec / p.per_sec
            );
        }
        out!();
    }
    out!("Load average at the end: {}.", load_average());
}

/// A short duration with two decimals of microseconds.
fn fmt_dur_precise(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}
