//! [`Timer`]: a command the host sends later, scheduled by a decision
//! ([`Decision::schedule`](crate::Decision::schedule)) and stored
//! atomically with the decision's events.

use std::time::Duration;

use serde::Serialize;

/// When a scheduled command is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// At an instant: RFC 3339 in UTC, as the command's `now` is written
    /// (`2026-12-01T09:00:00Z`).
    At(String),
    /// This many milliseconds after the command's `now`.
    AfterMs(u64),
}

/// A command for the host to send once, later: a durable timer.
///
/// The host sends it with a message id derived from the decision that
/// scheduled it, so it takes effect once across crashes and restarts; a
/// timer that came due while no host ran is sent at the next start, with
/// `timer-late` = `true` in the command's metadata
/// ([`Context::timer`](crate::Context::timer)).
///
/// ```
/// use std::time::Duration;
/// use rehydra_guest::{Decision, Timer};
///
/// enum Event { Placed }
///
/// // Cancel the order if it is still unpaid in 30 minutes ...
/// let d: Decision<Event> = Decision::emit(Event::Placed).schedule(Timer::after(
///     "payment-deadline",
///     "expire",
///     serde_json::json!({}),
///     Duration::from_secs(30 * 60),
/// ));
/// assert_eq!(d.timers().len(), 1);
///
/// // ... and forget that once it is paid.
/// let paid: Decision<Event> = Decision::none().cancel_timer("payment-deadline");
/// assert_eq!(paid.timers().len(), 1);
///
/// // A command for another aggregate, at a fixed time.
/// let t = Timer::at("reminder", "remind", 1, "2026-12-01T09:00:00Z").for_aggregate("user", "u1");
/// assert_eq!(t.target(), Some(("user", "u1")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    key: String,
    target: Option<(String, String)>,
    command: String,
    /// The payload as JSON, or why it could not be encoded.
    data: Result<Vec<u8>, String>,
    due: Due,
}

impl Timer {
    /// Sends `command` with `data` to this aggregate `delay` after the
    /// command's `now` (to the millisecond). `key` names the timer among
    /// this aggregate's: scheduling a key that is pending replaces that
    /// timer, and [`Decision::cancel_timer`](crate::Decision::cancel_timer)
    /// takes it.
    pub fn after(
        key: impl Into<String>,
        command: impl Into<String>,
        data: impl Serialize,
        delay: Duration,
    ) -> Timer {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        Timer::new(key, command, data, Due::AfterMs(ms))
    }

    /// Sends `command` with `data` to this aggregate at `at`, an RFC 3339
    /// UTC time (the host checks it; a time that does not parse fails the
    /// command as a plugin error).
    pub fn at(
        key: impl Into<String>,
        command: impl Into<String>,
        data: impl Serialize,
        at: impl Into<String>,
    ) -> Timer {
        Timer::new(key, command, data, Due::At(at.into()))
    }

    /// Sends `command` with `data` to another aggregate at once: how a
    /// [`ProcessManager`](crate::ProcessManager) sends commands. It is
    /// stored with the decision's events and sent once, after they are.
    pub fn send(
        key: impl Into<String>,
        aggregate_type: impl Into<String>,
        id: impl Into<String>,
        command: impl Into<String>,
        data: impl Serialize,
    ) -> Timer {
        Timer::new(key, command, data, Due::AfterMs(0)).for_aggregate(aggregate_type, id)
    }

    fn new(
        key: impl Into<String>,
        command: impl Into<String>,
        data: impl Serialize,
        due: Due,
    ) -> Timer {
        let key = key.into();
        let data = serde_json::to_vec(&data)
            .map_err(|err| format!("the data of timer `{key}` cannot be encoded as JSON: {err}"));
        Timer {
            key,
            target: None,
            command: command.into(),
            data,
            due,
        }
    }

    /// Sends the command to another aggregate (of any type the host
    /// serves) instead of this one.
    pub fn for_aggregate(
        mut self,
        aggregate_type: impl Into<String>,
        id: impl Into<String>,
    ) -> Timer {
        self.target = Some((aggregate_type.into(), id.into()));
        self
    }

    /// The timer's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The aggregate the command is for (type, id); `None`: this one.
    pub fn target(&self) -> Option<(&str, &str)> {
        self.target.as_ref().map(|(t, i)| (t.as_str(), i.as_str()))
    }

    /// The command's name.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// When it is due.
    pub fn due(&self) -> &Due {
        &self.due
    }
}

/// A change a decision makes to its aggregate's timers, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    /// Schedule a command.
    Schedule {
        /// The timer's key.
        key: String,
        /// The target (type, id); `None`: the deciding aggregate.
        target: Option<(String, String)>,
        /// The command's name.
        command: String,
        /// The command's JSON payload.
        data: Vec<u8>,
        /// When it is due.
        due: Due,
    },
    /// Cancel the pending timer with this key.
    Cancel(String),
}

/// A change as a decision holds it, before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PendingChange {
    Schedule(Timer),
    Cancel(String),
}

impl PendingChange {
    /// The change encoded, or why its data could not be.
    pub(crate) fn encode(self) -> Result<TimerChange, String> {
        Ok(match self {
            PendingChange::Schedule(t) => TimerChange::Schedule {
                data: t.data?,
                key: t.key,
                target: t.target,
                command: t.command,
                due: t.due,
            },
            PendingChange::Cancel(key) => TimerChange::Cancel(key),
        })
    }
}
