//! The gatekeeper of guest output: what the host refuses to store or
//! send on from a plugin's `handle` — too many or too large events, event
//! types that are invalid or undeclared, data that is not JSON, state of
//! another schema or over the cap, a reply that is not JSON, and timers
//! with bad keys, names, targets, payloads or times.

use super::Plugin;
use super::types::{Decision, Due, TimerChange, is_valid_name};

impl Plugin {
    /// What the host refuses to store or send on: too many or too large
    /// events, event types that are invalid or that `describe()` did not
    /// declare, data that is not JSON, state of another schema or over the
    /// cap, a reply that is not JSON.
    pub fn check_decision(&self, d: &Decision) -> Result<(), String> {
        let limits = &self.limits;
        if d.events.len() > limits.max_events_per_command {
            return Err(format!(
                "handle() emitted {} events, over the limit of {} per command",
                d.events.len(),
                limits.max_events_per_command
            ));
        }
        for e in &d.events {
            if !is_valid_name(&e.event_type) {
                return Err(format!(
                    "handle() emitted an event with an invalid type {:?}",
                    e.event_type
                ));
            }
            if !self.info.event_types.contains(&e.event_type) {
                return Err(format!(
                    "handle() emitted {:?}, an event type describe() does not declare ({})",
                    e.event_type,
                    self.info.event_types.join(", ")
                ));
            }
            if e.data.len() > limits.max_event_bytes {
                return Err(format!(
                    "handle() emitted a {} event of {} bytes, over the limit of {}",
                    e.event_type,
                    e.data.len(),
                    limits.max_event_bytes
                ));
            }
            if let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(&e.data) {
                return Err(format!(
                    "handle() emitted a {} event whose data is not JSON: {err}",
                    e.event_type
                ));
            }
        }
        if d.state.schema != self.info.state_schema {
            return Err(format!(
                "handle() returned state of schema {}, but describe() declares {}",
                d.state.schema, self.info.state_schema
            ));
        }
        if d.state.bytes.len() > limits.max_state_bytes {
            return Err(format!(
                "handle() returned {} bytes of state, over the limit of {}",
                d.state.bytes.len(),
                limits.max_state_bytes
            ));
        }
        if d.timers.len() > limits.max_events_per_command {
            return Err(format!(
                "handle() returned {} timer changes, over the limit of {} per command",
                d.timers.len(),
                limits.max_events_per_command
            ));
        }
        for change in &d.timers {
            check_timer_change(change, limits.max_event_bytes)?;
        }
        if let Some(reply) = &d.reply {
            if reply.len() > limits.max_state_bytes {
                return Err(format!(
                    "handle() returned a reply of {} bytes, over the limit of {}",
                    reply.len(),
                    limits.max_state_bytes
                ));
            }
            if let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(reply) {
                return Err(format!("handle() returned a reply that is not JSON: {err}"));
            }
        }
        Ok(())
    }
}

/// Checks one timer change a decision made: a usable key, command name,
/// target and time, and a JSON payload of at most `max_bytes`.
fn check_timer_change(change: &TimerChange, max_bytes: usize) -> Result<(), String> {
    let key = change.key();
    if let Err(e) = crate::command::validate_id("a timer key", key) {
        return Err(format!(
            "handle() returned a timer change with a bad key: {e}"
        ));
    }
    let TimerChange::Schedule(t) = change else {
        return Ok(());
    };
    if !is_valid_name(&t.command) {
        return Err(format!(
            "handle() scheduled timer {key:?} with an invalid command name {:?}",
            t.command
        ));
    }
    if let Some(target) = &t.target {
        if !is_valid_name(&target.aggregate_type) {
            return Err(format!(
                "handle() scheduled timer {key:?} for an invalid aggregate type {:?}",
                target.aggregate_type
            ));
        }
        if let Err(e) = crate::command::validate_id("the target's id", &target.id) {
            return Err(format!(
                "handle() scheduled timer {key:?} for a bad target: {e}"
            ));
        }
    }
    if t.data.len() > max_bytes {
        return Err(format!(
            "handle() scheduled timer {key:?} with {} bytes of data, over the limit of {max_bytes}",
            t.data.len()
        ));
    }
    if let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(&t.data) {
        return Err(format!(
            "handle() scheduled timer {key:?} with data that is not JSON: {err}"
        ));
    }
    if let Due::At(at) = &t.due
        && let Err(err) = humantime::parse_rfc3339(at)
    {
        return Err(format!(
            "handle() scheduled timer {key:?} at {at:?}, which is not an RFC 3339 UTC time \
             such as 2026-12-01T09:00:00Z: {err}"
        ));
    }
    Ok(())
}
