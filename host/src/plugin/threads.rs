//! The threads that run one plugin version's guest calls.
//!
//! Guest code never runs as part of an async task: wasmtime-wasi's
//! synchronous WASI bindings run a guest's blocking WASI calls (a Rust
//! guest printing its panic message, say) through `Handle::block_on`, which
//! panics on an async worker, and a guest spinning to its deadline must not
//! hold up the tasks queued behind it. So each call is handed to a thread
//! outside the runtime, and the actor awaits the result.
//!
//! Why our own threads rather than tokio's blocking pool: the blocking pool
//! starts a new thread whenever none is idle, so under load every busy
//! moment added threads (about 70 with 16-256 clients on two cores), and
//! every call paid for waking one. These threads are few — at most one per
//! warm instance — and a thread that finishes a call takes the next queued
//! one without sleeping. In alternating runs on two cores that cut the CPU
//! per command by about a tenth on `embedded://` and by 13 % or more on
//! `memory://`, where throughput rose 1.25× (BENCHMARKS.md). The price: a
//! plugin version's calls
//! beyond its thread count wait in its queue; they would have waited for a
//! core anyway, and one plugin's calls never wait for another's. The queue
//! is bounded (`--max-guest-queue`): past it a call is refused at once
//! ([`GuestThreadError::Full`], `overloaded` to the client), so that a
//! plugin that cannot keep up sheds load instead of making every accepted
//! command wait longer.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A queued call.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// A small, lazily started set of threads running one plugin version's
/// guest calls in arrival order. The threads end when it is dropped (after
/// the calls already queued).
pub struct GuestThreads {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    /// For thread names.
    plugin: String,
    max_threads: usize,
    max_queued: usize,
    /// The runtime that guest threads enter, so that wasmtime-wasi's
    /// `block_on` uses it rather than starting a runtime of its own.
    runtime: Option<tokio::runtime::Handle>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    threads: usize,
    idle: usize,
    /// Threads running a call now.
    busy: usize,
    closed: bool,
}

/// Why a call did not run to completion on a guest thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestThreadError {
    /// The host's side of the call panicked; the message, if any.
    Panicked(String),
    /// No thread could run it (none could be started, or they stopped).
    Unavailable(String),
    /// The queue holds the most calls it may; this one was not queued.
    Full(usize),
}

impl GuestThreads {
    /// Threads for `plugin`, at most `max_threads` (at least one), with at
    /// most `max_queued` calls waiting for them (at least one). Captures
    /// the current tokio runtime, if any, for the threads to enter.
    pub fn new(plugin: &str, max_threads: usize, max_queued: usize) -> Self {
        GuestThreads {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                plugin: plugin.to_string(),
                max_threads: max_threads.max(1),
                max_queued: max_queued.max(1),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Runs `f` on a guest thread and waits for its result without
    /// blocking the caller's thread.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, GuestThreadError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(f))
                .map_err(|p| GuestThreadError::Panicked(panic_message(&*p)));
            // The caller may have stopped waiting (its command timed out).
            let _ = tx.send(result);
        }))?;
        rx.await.unwrap_or_else(|_| {
            Err(GuestThreadError::Unavailable(
                "the guest thread stopped before answering".into(),
            ))
        })
    }

    /// Calls running on a thread now.
    pub fn running(&self) -> usize {
        self.shared.lock().busy
    }

    /// Calls waiting for a thread now (not counting those a free thread
    /// is about to take).
    pub fn queued(&self) -> usize {
        let state = self.shared.lock();
        let free = self.shared.max_threads.saturating_sub(state.busy);
        state.queue.len().saturating_sub(free)
    }

    fn submit(&self, job: Job) -> Result<(), GuestThreadError> {
        let shared = &self.shared;
        let mut state = shared.lock();
        // Calls that a free (or starting) thread will take at once are not
        // waiting; only those beyond are bounded.
        let free = shared.max_threads.saturating_sub(state.busy);
        let waiting = state.queue.len().saturating_sub(free);
        if waiting >= shared.max_queued {
            return Err(GuestThreadError::Full(waiting));
        }
        state.queue.push_back(job);
        if state.idle > 0 {
            // A sleeping thread takes it. A thread that is busy would take
            // it too once done, but might be busy for long.
            drop(state);
            shared.work.notify_one();
            return Ok(());
        }
        if state.threads >= shared.max_threads {
            // Every thread is busy; the first to finish takes it.
            return Ok(());
        }
        state.threads += 1;
        drop(state);
        let worker = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("guest {}", shared.plugin))
            .spawn(move || worker.serve());
        if let Err(e) = spawned {
            let mut state = shared.lock();
            state.threads -= 1;
            if state.threads == 0 {
                // Nobody will ever take the queue: fail it now.
                let orphans: Vec<Job> = state.queue.drain(..).collect();
                drop(state);
                // Dropping a job drops its sender: its caller is answered.
                drop(orphans);
                return Err(GuestThreadError::Unavailable(format!(
                    "cannot start a thread for plugin {}: {e}",
                    shared.plugin
                )));
            }
        }
        Ok(())
    }
}

impl Drop for GuestThreads {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock and catch their panics; recover rather
        // than propagate if that ever changes.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guest thread: takes queued calls until the set is closed and the
    /// queue is empty.
    fn serve(&self) {
        let _runtime = self.runtime.as_ref().map(|r| r.enter());
        let mut state = self.lock();
        loop {
            if let Some(job) = state.queue.pop_front() {
                state.busy += 1;
                drop(state);
                job();
                state = self.lock();
                state.busy -= 1;
                continue;
            }
            if state.closed {
                state.threads -= 1;
                return;
            }
            state.idle += 1;
            state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
            state.idle -= 1;
        }
    }
}

/// The message of a caught panic, when it is a string.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_and_panics_are_reported() {
        let threads = GuestThreads::new("t", 2, 64);
        assert_eq!(threads.run(|| 2 + 2).await, Ok(4));
        let all: Vec<_> = (0..20).map(|i| threads.run(move || i * 2)).collect();
        for (i, call) in all.into_iter().enumerate() {
            assert_eq!(call.await, Ok(i * 2));
        }
        let panicked = threads.run(|| -> u32 { panic!("boom") }).await;
        assert_eq!(panicked, Err(GuestThreadError::Panicked("boom".into())));
        // The thread survived the panic.
        assert_eq!(threads.run(|| 1).await, Ok(1));
        assert!(threads.shared.lock().threads <= 2);
    }

    /// Past its bound the queue refuses a call at once, and the calls it
    /// took all run.
    #[tokio::test]
    async fn a_full_queue_refuses_calls() {
        let threads = Arc::new(GuestThreads::new("t", 1, 2));
        // Hold the one thread until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let busy = {
            let threads = threads.clone();
            tokio::spawn(async move {
                threads
                    .run(move || {
                        let _ = started_tx.send(());
                        let _ = held.recv();
                        0
                    })
                    .await
            })
        };
        started.await.expect("the thread started");
        let queued: Vec<_> = (1..=2)
            .map(|i| {
                let threads = threads.clone();
                tokio::spawn(async move { threads.run(move || i).await })
            })
            .collect();
        while threads.queued() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(threads.run(|| 3).await, Err(GuestThreadError::Full(2)));
        release.send(()).expect("release");
        assert_eq!(busy.await.expect("join"), Ok(0));
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.expect("join"), Ok(i + 1));
        }
    }

    #[test]
    fn threads_end_when_dropped() {
        let threads = GuestThreads::new("t", 1, 1);
        let shared = threads.shared.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        assert_eq!(runtime.block_on(threads.run(|| 7)), Ok(7));
        drop(threads);
        // The thread sees `closed` and leaves; wait for it without a clock.
        while shared.lock().threads > 0 {
            std::thread::yield_now();
        }
    }
}
