//! The indexer thread: writes the tail's durable events to the index
//! database ([`super::index`]) in large transactions, off the commit path,
//! and lets the tail ([`super::tail`]) drop them once each is committed.
//!
//! It writes once [`INDEX_MIN_BATCH`] durable events wait, or whatever
//! waits once [`INDEX_IDLE`] has passed since its last write, up to
//! [`INDEX_MAX_BATCH`] per transaction. A write that fails (a full disk) is retried; meanwhile the
//! tail grows, and the writer stops at the tail's limit with the indexer's
//! error. At close it writes what is left, so the next open has nothing to
//! catch up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::index::{INDEX_MAX_BATCH, write};
use super::tail::{self, TAIL_LIMIT, Tail};

/// The indexer writes once this many durable events wait for it. Larger
/// transactions write each hot index page once for more events.
pub(super) const INDEX_MIN_BATCH: usize = 32_768;

/// After this long without a write, the indexer writes whatever waits, so a
/// quiet store's tail empties.
const INDEX_IDLE: Duration = Duration::from_millis(500);

/// How often the indexer looks at the tail.
const INDEX_POLL: Duration = Duration::from_millis(20);

/// After a failed index write, the indexer waits this long before trying
/// again.
const INDEX_RETRY: Duration = Duration::from_secs(1);

/// When the indexer writes: once `min_batch` durable events wait, or
/// after `idle` without a write; and how far it may fall behind.
#[derive(Debug, Clone, Copy)]
pub(super) struct Indexing {
    pub(super) min_batch: usize,
    pub(super) idle: Duration,
    /// The most events the tail holds ([`TAIL_LIMIT`]).
    pub(super) tail_limit: usize,
    /// Tests only: the index database may grow to this many pages, which
    /// is how SQLite reports a full disk.
    pub(super) max_pages: Option<u32>,
}

impl Default for Indexing {
    fn default() -> Self {
        Indexing {
            min_batch: INDEX_MIN_BATCH,
            idle: INDEX_IDLE,
            tail_limit: TAIL_LIMIT,
            max_pages: None,
        }
    }
}

impl Indexing {
    /// Writes every event as soon as it is durable: tests use it to read
    /// through the index what the default would read from the tail.
    #[cfg(test)]
    pub(super) fn eager() -> Self {
        Indexing {
            min_batch: 1,
            idle: Duration::ZERO,
            ..Indexing::default()
        }
    }
}

/// How the store talks to its indexer thread.
#[derive(Default)]
pub(super) struct IndexerControl {
    state: Mutex<ControlState>,
    wake: Condvar,
}

#[derive(Default)]
struct ControlState {
    closing: bool,
    /// The last index write's failure, until one succeeds.
    error: Option<String>,
}

impl IndexerControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks the indexer to index everything durable and stop.
    pub(super) fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_all();
    }

    /// Why the indexer cannot write, if it cannot.
    pub(super) fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }
}

/// The indexer thread: writes the tail's durable events to the index (see
/// the module docs), until it is asked to close; then it writes what is
/// left and checkpoints its file.
pub(super) fn indexer_main(
    conn: Connection,
    tail: Arc<Mutex<Tail>>,
    durable: Arc<AtomicU64>,
    control: Arc<IndexerControl>,
    indexing: Indexing,
) {
    if let Some(pages) = indexing.max_pages
        && let Err(e) = conn.execute_batch(&format!("PRAGMA max_page_count = {pages}"))
    {
        tracing::warn!(error = %e, "cannot limit the index's size");
    }
    let mut last_write = Instant::now();
    loop {
        let closing = {
            let state = control.lock();
            if state.closing {
                true
            } else {
                let (state, _) = control
                    .wake
                    .wait_timeout(state, INDEX_POLL)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                state.closing
            }
        };
        let up_to = durable.load(Ordering::SeqCst);
        let (waiting, batch) = {
            let tail = tail::lock(&tail);
            let waiting = tail.waiting(up_to);
            crate::metrics::global()
                .store_unindexed_events
                .set(i64::try_from(tail.len()).unwrap_or(i64::MAX));
            let due = closing
                || waiting >= indexing.min_batch
                || (waiting > 0 && last_write.elapsed() >= indexing.idle);
            (
                waiting,
                if due {
                    tail.oldest(up_to, INDEX_MAX_BATCH)
                } else {
                    Vec::new()
                },
            )
        };
        if let Some(last) = batch.last().map(|e| e.position) {
            match write(&conn, &batch) {
                Ok(()) => {
                    tail::lock(&tail).indexed_up_to(last);
                    last_write = Instant::now();
                    let recovered = control.lock().error.take();
                    if recovered.is_some() {
                        tracing::info!("the event index is being written again");
                    }
                }
                Err(e) => {
                    let first = control.lock().error.replace(e.to_string()).is_none();
                    if first {
                        tracing::error!(error = %e, "writing the event index failed; retrying (the log is unaffected, but the writer stops once the unindexed tail is full)");
                    }
                    if closing {
                        break;
                    }
                    std::thread::sleep(INDEX_RETRY);
                }
            }
            // More may be due at once.
            if waiting > batch.len() {
                continue;
            }
        }
        if closing {
            break;
        }
    }
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(error = %e, "checkpointing the event index at close failed");
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the event index failed");
    }
}
