//! Small statistics helpers: percentiles of a latency sample, medians of
//! repeated runs, and human-readable formatting of durations and rates.

use std::time::Duration;

/// One timed run of a load scenario.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunResult {
    /// Completed operations per second over the run.
    pub per_sec: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// 99.9th percentile latency.
    pub p999: Duration,
    /// Operations completed.
    pub ops: usize,
    /// Operations that failed (counted, not timed).
    pub errors: usize,
    /// CPU time this process used per completed operation (all threads,
    /// user and system; the load generator included), or zero when not
    /// measured. Less sensitive than throughput to what else the shared
    /// machine runs.
    pub cpu_per_op: Duration,
    /// CPU time a database server process tree used per completed
    /// operation over the run (`postgres://` and pgbench rows), or zero
    /// when there is no such server.
    pub server_cpu_per_op: Duration,
}

impl RunResult {
    /// Summarises the latencies (nanoseconds) of a run that lasted `elapsed`.
    pub fn from_latencies(mut nanos: Vec<u64>, elapsed: Duration, errors: usize) -> RunResult {
        nanos.sort_unstable();
        let ops = nanos.len();
        RunResult {
            per_sec: ops as f64 / elapsed.as_secs_f64(),
            p50: percentile(&nanos, 0.50),
            p99: percentile(&nanos, 0.99),
            p999: percentile(&nanos, 0.999),
            ops,
            errors,
            cpu_per_op: Duration::ZERO,
            server_cpu_per_op: Duration::ZERO,
        }
    }

    /// The same, with `cpu` (this process's CPU time over the run) spread
    /// over the completed operations.
    pub fn with_cpu(mut self, cpu: Duration) -> RunResult {
        self.cpu_per_op = cpu / self.ops.max(1) as u32;
        self
    }

    /// The same, with `cpu` (a server's CPU time over the run) spread over
    /// the completed operations.
    pub fn with_server_cpu(mut self, cpu: Duration) -> RunResult {
        self.server_cpu_per_op = cpu / self.ops.max(1) as u32;
        self
    }

    /// The run-by-run median of each figure (throughput and every
    /// percentile taken separately); operation and error counts are summed.
    pub fn median_of(runs: &[RunResult]) -> RunResult {
        let pick = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
        let dur = |f: &dyn Fn(&RunResult) -> Duration| {
            Duration::from_nanos(
                median(runs.iter().map(|r| f(r).as_nanos() as f64).collect()) as u64,
            )
        };
        RunResult {
            per_sec: pick(&|r| r.per_sec),
            p50: dur(&|r| r.p50),
            p99: dur(&|r| r.p99),
            p999: dur(&|r| r.p999),
            ops: runs.iter().map(|r| r.ops).sum(),
            errors: runs.iter().map(|r| r.errors).sum(),
            cpu_per_op: dur(&|r| r.cpu_per_op),
            server_cpu_per_op: dur(&|r| r.server_cpu_per_op),
        }
    }
}

/// Waits for closed-loop client tasks, each returning its latencies (ns)
/// and error count, and pools what they measured.
pub async fn join_clients(
    tasks: Vec<tokio::task::JoinHandle<(Vec<u64>, usize)>>,
) -> (Vec<u64>, usize) {
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (lat, e) = t.await.expect("a client task");
        all.extend(lat);
        errors += e;
    }
    (all, errors)
}

/// Runs `concurrency` closed-loop clients until `secs` have passed and
/// reports what they measured, with this process's CPU time per operation.
/// `client(t, deadline)` is client `t`'s task: it returns its latencies (ns)
/// and error count.
pub async fn closed_loop<F, Fut>(concurrency: usize, secs: f64, client: F) -> RunResult
where
    F: Fn(usize, std::time::Instant) -> Fut,
    Fut: std::future::Future<Output = (Vec<u64>, usize)> + Send + 'static,
{
    let start = std::time::Instant::now();
    let cpu_start = process_cpu();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks = (0..concurrency)
        .map(|t| tokio::spawn(client(t, deadline)))
        .collect();
    let (all, errors) = join_clients(tasks).await;
    RunResult::from_latencies(all, start.elapsed(), errors)
        .with_cpu(process_cpu().saturating_sub(cpu_start))
}

/// The CPU time this process has used so far, user and system, all
/// threads; zero if it cannot be read.
pub fn process_cpu() -> Duration {
    proc_cpu("self").map_or(Duration::ZERO, |c| c.own)
}

/// What `/proc/PID/stat` says about a process's CPU time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcCpu {
    /// The parent's pid.
    pub ppid: u32,
    /// User and system time of the process itself, all threads.
    pub own: Duration,
    /// User and system time of its children that have exited and been
    /// waited for.
    pub reaped_children: Duration,
}

/// The CPU times of process `pid` (or `"self"`) from `/proc/PID/stat`, in
/// ticks of 10 ms (Linux reports them in USER_HZ, which is 100); `None` if
/// the process is gone or the file cannot be read.
pub fn proc_cpu(pid: &str) -> Option<ProcCpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, ppid 4, utime 14, stime 15, cutime 16,
    // cstime 17.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ticks = |t: u64| Duration::from_millis(t * 10);
    Some(ProcCpu {
        ppid: u32::try_from(num(1)).unwrap_or(0),
        own: ticks(num(11) + num(12)),
        reaped_children: ticks(num(13) + num(14)),
    })
}

/// The CPU time used so far by process `root`, its live children and every
/// child it has waited for (a PostgreSQL postmaster and its backends,
/// including those of closed connections).
pub fn tree_cpu(root: u32) -> Duration {
    let Some(top) = proc_cpu(&root.to_string()) else {
        return Duration::ZERO;
    };
    let mut total = top.own + top.reaped_children;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some(child) = proc_cpu(pid).filter(|c| c.ppid == root) {
            total += child.own + child.reaped_children;
        }
    }
    total
}

/// The `q` quantile (0..=1) of an ascending sample, nearest-rank; zero for
/// an empty sample.
pub fn percentile(sorted_nanos: &[u64], q: f64) -> Duration {
    if sorted_nanos.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted_nanos.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted_nanos.len()) - 1;
    Duration::from_nanos(sorted_nanos[idx])
}

/// The median of a sample (the mean of the middle two for an even count);
/// zero for an empty sample.
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// A duration as `123 µs` / `4.56 ms` / `1.23 s`.
pub fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// A rate with thousands separators, no decimals.
pub fn fmt_rate(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&xs, 0.5), Duration::from_nanos(500));
        assert_eq!(percentile(&xs, 0.99), Duration::from_nanos(990));
        assert_eq!(percentile(&xs, 0.999), Duration::from_nanos(999));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn medians_and_formatting() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(fmt_rate(1234567.4), "1,234,567");
        assert_eq!(fmt_rate(12.0), "12");
        assert_eq!(fmt_dur(Duration::from_micros(1500)), "1.50 ms");
    }
}
