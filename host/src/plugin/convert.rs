//! Between the host types ([`super::types`]) and the WIT bindings: the
//! arguments of a `handle` call, what it returned, and stored events as
//! `apply` receives them.

use super::bindings::rehydra::aggregate::types as wit;
use super::types::{
    AggregateRef, CommandInput, Decision, Due, NewEvent, Rejection, ReplayEvent, StateBytes,
    TimerChange, TimerRequest,
};
use crate::error::FieldError;
use crate::store::EventToApply;

impl From<EventToApply> for ReplayEvent {
    fn from(e: EventToApply) -> Self {
        ReplayEvent {
            event_type: e.event_type,
            data: e.data,
            version: e.version,
            metadata: metadata_text(e.metadata),
        }
    }
}

/// What `handle` returned, in host types.
pub(super) fn from_wit_outcome(
    result: Result<wit::Decision, wit::Rejection>,
) -> Result<Decision, Rejection> {
    match result {
        Ok(d) => Ok(Decision {
            events: d
                .events
                .into_iter()
                .map(|e| NewEvent {
                    event_type: e.event_type,
                    data: e.data,
                })
                .collect(),
            state: StateBytes {
                schema: d.state.schema,
                bytes: d.state.bytes,
            },
            reply: d.reply,
            timers: d.timers.into_iter().map(from_wit_timer_change).collect(),
        }),
        Err(wit::Rejection::Invalid(fields)) => Err(Rejection::Invalid(
            fields
                .into_iter()
                .map(|f| FieldError {
                    field: f.field,
                    message: f.message,
                })
                .collect(),
        )),
        Err(wit::Rejection::Rejected(m)) => Err(Rejection::Rejected(m)),
        Err(wit::Rejection::Forbidden(m)) => Err(Rejection::Forbidden(m)),
        Err(wit::Rejection::IncompatibleState(s)) => Err(Rejection::IncompatibleState(s)),
    }
}

/// A timer change in host types.
fn from_wit_timer_change(change: wit::TimerChange) -> TimerChange {
    match change {
        wit::TimerChange::Schedule(t) => TimerChange::Schedule(TimerRequest {
            key: t.key,
            target: t.target.map(|r| AggregateRef {
                aggregate_type: r.aggregate_type,
                id: r.aggregate_id,
            }),
            command: t.command_type,
            data: t.data,
            due: match t.due {
                wit::Due::At(at) => Due::At(at),
                wit::Due::AfterMs(ms) => Due::AfterMs(ms),
            },
        }),
        wit::TimerChange::Cancel(key) => TimerChange::Cancel(key),
    }
}

/// The WIT arguments of a `handle` call (owned: they cross to a guest
/// thread).
pub(super) fn handle_args(
    state: &StateBytes,
    command: &CommandInput<'_>,
) -> (wit::State, wit::Command) {
    let s = wit::State {
        schema: state.schema,
        bytes: state.bytes.clone(),
    };
    let c = wit::Command {
        command_type: command.command_type.to_string(),
        aggregate_id: command.aggregate_id.to_string(),
        data: command.data.to_vec(),
        metadata: command.metadata.to_vec(),
    };
    (s, c)
}

/// A stored event as the WIT `recorded-event`: every field moves, none is
/// copied or parsed.
pub(super) fn to_wit_event(e: EventToApply) -> wit::RecordedEvent {
    wit::RecordedEvent {
        event_type: e.event_type,
        data: e.data,
        version: e.version,
        metadata: metadata_text(e.metadata),
    }
}

/// An event's stored metadata as the text `apply` is given: the bytes
/// themselves, after a UTF-8 check and without a copy. The host writes
/// UTF-8 JSON, so only an event another tool wrote (into a KurrentDB
/// stream) can fail the check; its metadata becomes the empty string. A
/// WIT `string` cannot carry such bytes, and a lossy conversion would give
/// the plugin altered values that look genuine.
pub(super) fn metadata_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(metadata: &[u8]) -> EventToApply {
        EventToApply {
            version: 7,
            event_id: uuid::Uuid::nil(),
            event_type: "Deposited".into(),
            data: br#"{"amount":5}"#.to_vec(),
            metadata: metadata.to_vec(),
        }
    }

    /// The metadata reaches the guest byte for byte: not parsed, so not
    /// reordered, reformatted or stripped of non-string values.
    #[test]
    fn stored_metadata_reaches_the_guest_unchanged() {
        let cases: [&[u8]; 5] = [
            br#"{"$causationId":"c","$correlationId":"c","commandType":"deposit","messageId":"m-1","plugin":"bank-account","pluginHash":"ab12","reply":{"balance":5},"timestamp":"2026-01-01T00:00:00.000Z"}"#,
            "{ \"z\": 1,\n  \"a\": [true, null, 1.50], \"\u{e9}\": \"\\u00e9\" }".as_bytes(),
            b"{}",
            // Another tool's metadata: text that is not a JSON object.
            b"written by a tool",
            b"",
        ];
        for metadata in cases {
            let e = to_wit_event(stored(metadata));
            assert_eq!(e.metadata.as_bytes(), metadata);
            assert_eq!(
                (e.event_type.as_str(), e.data.as_slice(), e.version),
                ("Deposited", &br#"{"amount":5}"#[..], 7)
            );
        }
    }

    /// Bytes a WIT `string` cannot carry arrive as the empty string; the
    /// rest of the event is untouched.
    #[test]
    fn metadata_that_is_not_utf8_arrives_empty() {
        for metadata in [&b"\xff\xfe"[..], b"{\"k\":\"\xc3\x28\"}"] {
            let e = to_wit_event(stored(metadata));
            assert_eq!(e.metadata, "");
            assert_eq!((e.event_type.as_str(), e.version), ("Deposited", 7));
        }
    }

    /// The native seam gets what a component gets.
    #[test]
    fn native_logic_sees_the_events_as_a_component_does() {
        for metadata in [&br#"{"messageId":"m-1"}"#[..], b"\xff"] {
            let wit = to_wit_event(stored(metadata));
            let native = ReplayEvent::from(stored(metadata));
            assert_eq!(
                native,
                ReplayEvent {
                    event_type: wit.event_type,
                    data: wit.data,
                    version: wit.version,
                    metadata: wit.metadata,
                }
            );
        }
    }
}
