//! Commands as the host receives them, what they produce, and the metadata
//! the host records with every event.

use std::time::SystemTime;

use serde::Serialize;
use uuid::Uuid;

use crate::error::CommandError;

/// A command addressed to one aggregate, as any API hands it to the core.
#[derive(Debug, Clone, Default)]
pub struct CommandRequest {
    /// The aggregate type (selects the plugin).
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The command's name.
    pub command: String,
    /// The payload: valid JSON bytes (`{}` when the client sent none).
    pub data: Vec<u8>,
    /// The version the client requires the aggregate to be at (`If-Match`).
    /// Never retried on a mismatch.
    pub expected_version: Option<u64>,
    /// The client's idempotency key; becomes the message id.
    pub idempotency_key: Option<String>,
    /// The correlation id to record (defaults to the message id).
    pub correlation_id: Option<String>,
    /// The causation id to record (defaults to the message id).
    pub causation_id: Option<String>,
    /// The authenticated caller, passed to the plugin.
    pub principal: Option<String>,
    /// Only report what the command would do: run `handle` on the current
    /// state and return the events, the reply and the state it would
    /// produce, storing nothing (no events, no idempotency key).
    pub dry_run: bool,
    /// Set when a timer sends the command: what the plugin and the stored
    /// events are told about it.
    pub timer: Option<TimerFiring>,
}

impl CommandRequest {
    /// The aggregate the command is for.
    pub fn aggregate(&self) -> crate::plugin::AggregateRef {
        crate::plugin::AggregateRef {
            aggregate_type: self.aggregate_type.clone(),
            id: self.aggregate_id.clone(),
        }
    }
}

/// What the host tells about a command that a timer sent: to the plugin as
/// `timer-*` metadata pairs, and stored in each event's metadata as
/// `timer` (which is how the timer index learns that it fired).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimerFiring {
    /// The timer's id (see [`crate::timer`]).
    pub id: String,
    /// Its key among the timers of the aggregate that scheduled it.
    pub key: String,
    /// When it was due, RFC 3339 UTC.
    pub due: String,
    /// Whether it is sent more than [`crate::timer::LATE_AFTER`] after it
    /// was due.
    pub late: bool,
    /// The aggregate that scheduled it, `type/id`.
    pub scheduled_by: String,
}

/// One event a command appended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutcomeEvent {
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The aggregate's version once this event is applied.
    pub version: u64,
    /// The payload.
    pub data: serde_json::Value,
}

/// What a successful command did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandOutcome {
    /// The aggregate type.
    #[serde(rename = "type")]
    pub aggregate_type: String,
    /// The aggregate's id.
    pub id: String,
    /// The aggregate's version after the command.
    pub version: u64,
    /// The events appended (empty for a no-op).
    pub events: Vec<OutcomeEvent>,
    /// The plugin's reply, if any.
    pub reply: Option<serde_json::Value>,
    /// True when this is the stored outcome of an earlier command with the
    /// same idempotency key; nothing was appended this time.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// True for a dry run: `events` and `version` are what the command
    /// would store, and nothing was stored.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// For a dry run, the state the command would produce (JSON; a string
    /// if the plugin's state is not JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<serde_json::Value>,
}

/// An aggregate's current state, as a query returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateState {
    /// The aggregate type.
    #[serde(rename = "type")]
    pub aggregate_type: String,
    /// The aggregate's id.
    pub id: String,
    /// Its version.
    pub version: u64,
    /// Its state as the plugin encodes it (JSON; a string if it is not JSON).
    pub state: serde_json::Value,
}

/// The longest accepted aggregate id, idempotency key or correlation id.
pub const MAX_ID_LEN: usize = 128;

/// Checks an aggregate id (or any client-supplied id): 1–128 printable
/// ASCII characters, none of `/`, `\`, whitespace or control characters, so
/// it is safe in stream names, URLs and logs.
pub fn validate_id(what: &str, id: &str) -> Result<(), CommandError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(CommandError::MalformedRequest(format!(
            "{what} must be 1 to {MAX_ID_LEN} characters long, got {}",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '/' | '\\'))
    {
        return Err(CommandError::MalformedRequest(format!(
            "{what} {id:?} contains {c:?}; use printable ASCII without '/' or '\\'"
        )));
    }
    Ok(())
}

/// Ids and time the host gives one command.
#[derive(Debug, Clone)]
pub struct CommandIds {
    /// The message id: the idempotency key, or a fresh UUID.
    pub message_id: String,
    /// The correlation id.
    pub correlation_id: String,
    /// The causation id.
    pub causation_id: String,
    /// When the host received the command, RFC 3339 UTC.
    pub now: String,
    /// With an idempotency key: the request's fingerprint
    /// ([`request_fingerprint`]), stored with its events so that the key
    /// cannot be reused for another request.
    pub request_hash: Option<String>,
}

/// What identifies a request beyond its idempotency key: the command's
/// name and its payload as canonical JSON (keys sorted, no insignificant
/// whitespace), hashed (SHA-256, the first 16 bytes in hex). Two requests
/// that differ only in how their JSON is written have one fingerprint.
pub fn request_fingerprint(command: &str, data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let canonical = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok())
        .unwrap_or_else(|| data.to_vec());
    let mut hash = Sha256::new();
    hash.update(command.as_bytes());
    hash.update([0]);
    hash.update(&canonical);
    hex::encode(&hash.finalize()[..16])
}

impl CommandIds {
    /// Assigns ids to `req`.
    pub fn assign(req: &CommandRequest) -> Self {
        let message_id = req
            .idempotency_key
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        CommandIds {
            correlation_id: req
                .correlation_id
                .clone()
                .unwrap_or_else(|| message_id.clone()),
            causation_id: req
                .causation_id
                .clone()
                .unwrap_or_else(|| message_id.clone()),
            message_id,
            now: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            request_hash: req
                .idempotency_key
                .as_ref()
                .map(|_| request_fingerprint(&req.command, &req.data)),
        }
    }

    /// The metadata pairs passed to the plugin's `handle`.
    pub fn guest_metadata(
        &self,
        principal: Option<&str>,
        timer: Option<&TimerFiring>,
    ) -> Vec<(String, String)> {
        let mut m = vec![
            ("now".to_string(), self.now.clone()),
            ("message-id".to_string(), self.message_id.clone()),
            ("correlation-id".to_string(), self.correlation_id.clone()),
            ("causation-id".to_string(), self.causation_id.clone()),
        ];
        if let Some(p) = principal {
            m.push(("principal".to_string(), p.to_string()));
        }
        if let Some(t) = timer {
            m.push(("timer-key".to_string(), t.key.clone()));
            m.push(("timer-due".to_string(), t.due.clone()));
            m.push(("timer-late".to_string(), t.late.to_string()));
            m.push(("scheduled-by".to_string(), t.scheduled_by.clone()));
        }
        m
    }
}

/// Namespace for deterministic event ids (UUID v5).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5b1e_7c1a_83f4_4d8e_9a51_6c2f_0e7d_3a90);

/// The id of the `index`-th event a command with `message_id` appends to
/// `stream`: the same inputs always give the same id, so a retried append is
/// recognised as a duplicate by the store.
pub fn event_id(stream: &str, message_id: &str, index: usize) -> Uuid {
    Uuid::new_v5(
        &EVENT_ID_NAMESPACE,
        format!("{stream}\n{message_id}\n{index}").as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("id", "acc-1").is_ok());
        assert!(validate_id("id", "a:b@c.d+e_f~1").is_ok());
        for bad in ["", "a/b", "a b", "a\\b", "tab\t", "é"] {
            let e = validate_id("id", bad).expect_err(bad);
            assert_eq!(e.code(), "malformed_request", "{bad:?}");
        }
        assert!(validate_id("id", &"x".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_id("id", &"x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn event_ids_are_deterministic_and_distinct() {
        assert_eq!(event_id("s-1", "m", 0), event_id("s-1", "m", 0));
        assert_ne!(event_id("s-1", "m", 0), event_id("s-1", "m", 1));
        assert_ne!(event_id("s-1", "m", 0), event_id("s-2", "m", 0));
        assert_ne!(event_id("s-1", "m", 0), event_id("s-1", "n", 0));
    }

    #[test]
    fn ids_default_to_the_message_id() {
        let req = CommandRequest {
            idempotency_key: Some("k1".into()),
            ..Default::default()
        };
        let ids = CommandIds::assign(&req);
        assert_eq!(ids.message_id, "k1");
        assert_eq!(ids.correlation_id, "k1");
        assert_eq!(ids.causation_id, "k1");
        let md = ids.guest_metadata(Some("alice"), None);
        assert!(md.contains(&("principal".to_string(), "alice".to_string())));
        assert!(md.iter().any(|(k, v)| k == "now" && v.ends_with('Z')));
    }
}
