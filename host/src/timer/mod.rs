//! Durable timers: commands a plugin's decision schedules for later.
//!
//! A decision's timer changes are stored as one host event, `$timers`, at
//! the end of the command's own append ([`event`]), so they are stored
//! atomically with its events on every backend (on KurrentDB, in the
//! aggregate's own stream). Nothing else records a timer: the log is the
//! source of truth.
//!
//! The [`index`] is derived from the log, like a read model: a SQLite
//! table of pending timers ordered by due time, with the log position it
//! has read up to. The [`runner`] follows the log into it, fires each due
//! timer through the same entry point as an API command, with a message id
//! derived from the timer, and removes it once the command has an outcome.
//! Each event a fired command stores carries the timer's id in its
//! metadata (`timer.id`), and the index removes a timer when it reads
//! that, so a timer fired by another host, or before the index was
//! rebuilt, is not fired again; one fired twice anyway (a crash between the
//! command and the removal) is answered by the idempotency of its message
//! id: it takes effect once.

pub mod event;
pub mod index;
pub mod process_state;
pub mod runner;

#[cfg(test)]
mod index_tests;

use std::time::Duration;

/// How long after its due time a timer's command counts as late
/// (`timer-late` = `true`): it was not sent on time, typically because no
/// host ran.
pub const LATE_AFTER: Duration = Duration::from_secs(1);

/// The event type of the host event that carries a decision's timer
/// changes.
pub const TIMERS_EVENT: &str = "$timers";

pub use index::{PendingTimer, TimerIndex, TimerIndexError, TimerQuery};
pub use process_state::ParkedEvent;
