//! The `$timers` host event: the timer changes of one decision, resolved
//! (absolute due times, ids, targets) and stored after the decision's own
//! events in the same append.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::plugin::{AggregateRef, Due, TimerChange};

/// The data of a `$timers` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimersEvent {
    /// The aggregate whose decision made the changes (it owns the keys).
    pub aggregate: AggregateRef,
    /// The changes, in the decision's order.
    pub changes: Vec<StoredChange>,
}

/// One change, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StoredChange {
    /// A timer scheduled (replacing a pending one of the same key).
    Schedule(StoredTimer),
    /// The pending timer with this key cancelled.
    Cancel {
        /// The key.
        key: String,
    },
}

/// A scheduled timer, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTimer {
    /// Derived from the `$timers` event's id and the change's place in it:
    /// the same decision always gives the same id, and the id gives the
    /// fired command's message id ([`message_id`]).
    pub id: String,
    /// The timer's key among its aggregate's timers.
    pub key: String,
    /// The aggregate the command is for.
    pub target: AggregateRef,
    /// The command's name.
    pub command: String,
    /// The command's payload.
    pub data: serde_json::Value,
    /// When it is due, RFC 3339 UTC with milliseconds.
    pub due: String,
}

/// Namespace of timer ids (UUID v5).
const TIMER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x7d3c_51e2_0b9a_4f61_a4c8_2e95_b7f0_16d3);

/// The latest due time a timer may have: RFC 3339 has four-digit years.
const LATEST_DUE_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z

/// The message id of the command a timer sends: its idempotency key, so
/// that sending it again (after a crash, or by a second host) takes effect
/// once.
pub fn message_id(timer_id: &str) -> String {
    format!("timer-{timer_id}")
}

/// Resolves a decision's timer changes for the `$timers` event with id
/// `event_id`, made by `source` at `now`: absolute due times, targets and
/// ids. An error (for the plugin's `bad_output`) when a due time is past
/// year 9999 or the data is not JSON.
pub fn resolve(
    changes: &[TimerChange],
    source: &AggregateRef,
    now: SystemTime,
    event_id: Uuid,
) -> Result<TimersEvent, String> {
    let mut stored = Vec::with_capacity(changes.len());
    for (i, change) in changes.iter().enumerate() {
        let t = match change {
            TimerChange::Cancel(key) => {
                stored.push(StoredChange::Cancel { key: key.clone() });
                continue;
            }
            TimerChange::Schedule(t) => t,
        };
        let due = match &t.due {
            Due::AfterMs(ms) => now.checked_add(Duration::from_millis(*ms)),
            Due::At(at) => humantime::parse_rfc3339(at).ok(),
        };
        let latest = SystemTime::UNIX_EPOCH + Duration::from_secs(LATEST_DUE_SECS);
        let Some(due) = due.filter(|d| *d <= latest) else {
            return Err(format!(
                "handle() scheduled timer {:?} for a time that is not between 1970 and 9999",
                t.key
            ));
        };
        let data = serde_json::from_slice(&t.data).map_err(|err| {
            format!(
                "handle() scheduled timer {:?} with data that is not JSON: {err}",
                t.key
            )
        })?;
        stored.push(StoredChange::Schedule(StoredTimer {
            id: Uuid::new_v5(&TIMER_ID_NAMESPACE, format!("{event_id}\n{i}").as_bytes())
                .to_string(),
            key: t.key.clone(),
            target: t.target.clone().unwrap_or_else(|| source.clone()),
            command: t.command.clone(),
            data,
            due: humantime::format_rfc3339_millis(due).to_string(),
        }));
    }
    Ok(TimersEvent {
        aggregate: source.clone(),
        changes: stored,
    })
}

/// Milliseconds since the Unix epoch of an RFC 3339 time; `None` if it does
/// not parse.
pub fn unix_ms(rfc3339: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    let ms = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::TimerRequest;

    fn order() -> AggregateRef {
        AggregateRef {
            aggregate_type: "order".into(),
            id: "o1".into(),
        }
    }

    fn schedule(key: &str, due: Due) -> TimerChange {
        TimerChange::Schedule(TimerRequest {
            key: key.into(),
            target: None,
            command: "expire".into(),
            data: br#"{"why":"unpaid"}"#.to_vec(),
            due,
        })
    }

    #[test]
    fn changes_resolve_to_absolute_times_ids_and_targets() {
        let now = humantime::parse_rfc3339("2026-11-30T10:00:00Z").expect("time");
        let id = Uuid::from_u128(7);
        let other = AggregateRef {
            aggregate_type: "bank-account".into(),
            id: "a1".into(),
        };
        let mut to_other = schedule("pay", Due::At("2026-12-01T09:00:00.250Z".into()));
        if let TimerChange::Schedule(t) = &mut to_other {
            t.target = Some(other.clone());
        }
        let changes = [
            schedule("deadline", Due::AfterMs(30 * 60 * 1000)),
            to_other,
            TimerChange::Cancel("old".into()),
        ];
        let event = resolve(&changes, &order(), now, id).expect("resolves");
        assert_eq!(event.aggregate, order());
        let StoredChange::Schedule(first) = &event.changes[0] else {
            panic!("a schedule: {event:?}")
        };
        assert_eq!(first.due, "2026-11-30T10:30:00.000Z");
        assert_eq!(first.target, order());
        assert_eq!(first.data, serde_json::json!({"why": "unpaid"}));
        let StoredChange::Schedule(second) = &event.changes[1] else {
            panic!("a schedule: {event:?}")
        };
        assert_eq!(second.due, "2026-12-01T09:00:00.250Z");
        assert_eq!(second.target, other);
        assert_ne!(first.id, second.id);
        assert_eq!(event.changes[2], StoredChange::Cancel { key: "old".into() });
        // The same decision resolves to the same ids.
        let again = resolve(&changes, &order(), now, id).expect("resolves");
        assert_eq!(again, event);
        // It survives the trip through the stored JSON.
        let json = serde_json::to_vec(&event).expect("encodes");
        assert_eq!(
            serde_json::from_slice::<TimersEvent>(&json).expect("decodes"),
            event
        );
        assert_eq!(unix_ms(&first.due), Some(1_796_034_600_000));
    }

    #[test]
    fn a_due_time_past_year_9999_is_refused() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(LATEST_DUE_SECS - 1);
        let err = resolve(
            &[schedule("late", Due::AfterMs(u64::MAX))],
            &order(),
            now,
            Uuid::nil(),
        )
        .expect_err("refused");
        assert!(err.contains("\"late\"") && err.contains("9999"), "{err}");
    }
}
