//! [`Decision`]: what a command produced — events, and an optional reply.

use serde::Serialize;
use serde_json::Value;

use crate::timer::{PendingChange, Timer, TimerChange};

/// The outcome of an accepted command: the events to store, in order, and
/// an optional JSON reply for the client.
///
/// Build one with [`Decision::none`], [`Decision::emit`], or `.into()` from a
/// single event or a `Vec` of events; chain [`and`](Decision::and) and
/// [`with_reply`](Decision::with_reply):
///
/// ```
/// use rehydra_guest::Decision;
///
/// enum Event { Created { id: String }, Named { name: String } }
///
/// let d: Decision<Event> = Decision::emit(Event::Created { id: "u1".into() })
///     .and(Event::Named { name: "Ada".into() })
///     .with_reply(serde_json::json!({ "welcome": true }));
/// assert_eq!(d.events().len(), 2);
///
/// let nothing: Decision<Event> = Decision::none().with_reply(7);
/// assert_eq!(nothing.reply(), Some(serde_json::json!(7)));
///
/// let from_vec: Decision<Event> = vec![Event::Named { name: "Bo".into() }].into();
/// assert_eq!(from_vec.events().len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a decision does nothing unless it is returned from `handle`"]
pub struct Decision<E> {
    events: Vec<E>,
    /// The reply as JSON, or why it could not be encoded.
    reply: Option<Result<Vec<u8>, String>>,
    /// Timers to schedule or cancel, in order.
    timers: Vec<PendingChange>,
}

impl<E> Decision<E> {
    /// No events and no reply: the command changes nothing.
    pub fn none() -> Self {
        Decision {
            events: Vec::new(),
            reply: None,
            timers: Vec::new(),
        }
    }

    /// Exactly one event.
    pub fn emit(event: E) -> Self {
        Self::none().and(event)
    }

    /// Appends one more event.
    pub fn and(mut self, event: E) -> Self {
        self.events.push(event);
        self
    }

    /// Sets the reply for the client, replacing any earlier one.
    ///
    /// The value is encoded as JSON now, keeping the order of a struct's
    /// fields. Should that fail — only possible
    /// with a hand-written `Serialize` that errors, or a map whose keys are
    /// not strings — the command fails as a plugin error (the host reports
    /// `plugin_failed`), since it is a bug in the plugin, not in the command.
    pub fn with_reply(mut self, reply: impl Serialize) -> Self {
        self.reply = Some(
            serde_json::to_vec(&reply)
                .map_err(|err| format!("the reply cannot be encoded as JSON: {err}")),
        );
        self
    }

    /// Schedules a command for later ([`Timer`]), stored atomically with
    /// the events: both are stored or neither is. A pending timer of the
    /// same key is replaced. Should the timer's data not encode as JSON,
    /// the command fails as a plugin error, as for a reply.
    pub fn schedule(mut self, timer: Timer) -> Self {
        self.timers.push(PendingChange::Schedule(timer));
        self
    }

    /// Cancels this aggregate's pending timer `key`, if there is one: it
    /// will never fire. Changes apply in order, so a cancel after a
    /// schedule of the same key in one decision cancels it.
    pub fn cancel_timer(mut self, key: impl Into<String>) -> Self {
        self.timers.push(PendingChange::Cancel(key.into()));
        self
    }

    /// The timer changes, in order: each scheduled [`Timer`], or the key of
    /// a cancel.
    pub fn timers(&self) -> Vec<Result<&Timer, &str>> {
        self.timers
            .iter()
            .map(|c| match c {
                PendingChange::Schedule(t) => Ok(t),
                PendingChange::Cancel(key) => Err(key.as_str()),
            })
            .collect()
    }

    /// The events, in the order they will be stored.
    pub fn events(&self) -> &[E] {
        &self.events
    }

    /// The reply as a JSON value, if one was set (and could be encoded).
    pub fn reply(&self) -> Option<Value> {
        match &self.reply {
            Some(Ok(bytes)) => serde_json::from_slice(bytes).ok(),
            _ => None,
        }
    }

    /// Splits the decision into its events, reply and timer changes; an
    /// error if the reply or a timer's data could not be encoded.
    pub(crate) fn into_parts(self) -> Result<DecisionParts<E>, String> {
        let reply = self.reply.transpose()?;
        let timers = self
            .timers
            .into_iter()
            .map(PendingChange::encode)
            .collect::<Result<_, _>>()?;
        Ok((self.events, reply, timers))
    }
}

/// A decision's events, encoded reply and encoded timer changes.
pub(crate) type DecisionParts<E> = (Vec<E>, Option<Vec<u8>>, Vec<TimerChange>);

impl<E> Default for Decision<E> {
    fn default() -> Self {
        Self::none()
    }
}

impl<E> From<E> for Decision<E> {
    fn from(event: E) -> Self {
        Self::emit(event)
    }
}

impl<E> From<Vec<E>> for Decision<E> {
    fn from(events: Vec<E>) -> Self {
        Decision {
            events,
            reply: None,
            timers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::Due;

    #[test]
    fn timer_changes_are_encoded_in_order() {
        let d: Decision<()> = Decision::emit(())
            .schedule(Timer::after(
                "deadline",
                "expire",
                serde_json::json!({"why": "unpaid"}),
                Duration::from_secs(90),
            ))
            .schedule(
                Timer::at("reserve", "reserve", 3, "2026-12-01T09:00:00Z")
                    .for_aggregate("inventory", "sku-1"),
            )
            .cancel_timer("old");
        let (events, reply, timers) = d.into_parts().expect("encodes");
        assert_eq!((events.len(), reply), (1, None));
        assert_eq!(
            timers,
            vec![
                TimerChange::Schedule {
                    key: "deadline".into(),
                    target: None,
                    command: "expire".into(),
                    data: br#"{"why":"unpaid"}"#.to_vec(),
                    due: Due::AfterMs(90_000),
                },
                TimerChange::Schedule {
                    key: "reserve".into(),
                    target: Some(("inventory".into(), "sku-1".into())),
                    command: "reserve".into(),
                    data: b"3".to_vec(),
                    due: Due::At("2026-12-01T09:00:00Z".into()),
                },
                TimerChange::Cancel("old".into()),
            ]
        );
    }

    #[test]
    fn a_timer_whose_data_cannot_be_json_fails_the_decision() {
        let d: Decision<()> = Decision::none().schedule(Timer::after(
            "bad",
            "expire",
            BTreeMap::from([(vec![1u8], 1u8)]),
            Duration::ZERO,
        ));
        let err = d.into_parts().expect_err("refused");
        assert!(err.contains("timer `bad`"), "{err}");
    }

    #[test]
    fn a_delay_beyond_u64_milliseconds_saturates() {
        let t = Timer::after("k", "c", (), Duration::MAX);
        assert_eq!(t.due(), &Due::AfterMs(u64::MAX));
    }
}
