//! Where an event goes: which of a process manager's follows it matches,
//! which instance receives it, and the command that delivers it.

use crate::command::{CommandRequest, validate_id};
use crate::plugin::{Follow, InstanceKey, PluginInfo, PluginRegistry};
use crate::store::RecordedEvent;

/// An event on its way to a process manager's instance.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The instance's id.
    pub instance: String,
    /// The command that carries the event.
    pub request: CommandRequest,
}

/// The message id of the command that delivers the event `event_id`.
pub fn message_id(event_id: &uuid::Uuid) -> String {
    format!("event-{event_id}")
}

/// Where `e` goes for the process manager `pm`, if anywhere: the follow
/// that matches its aggregate type (by stream prefix, through `plugins`)
/// and event type, and the instance its key names. `None` for events it
/// does not follow, host events, and events whose key is missing or not a
/// usable id.
pub fn route(pm: &PluginInfo, plugins: &PluginRegistry, e: &RecordedEvent) -> Option<Delivery> {
    if crate::plugin::is_host_event(&e.event_type) {
        return None;
    }
    let process = pm.process.as_ref()?;
    let (follow, aggregate_id) = process.follows.iter().find_map(|f| {
        if f.event_type != e.event_type {
            return None;
        }
        let prefix = plugins.get(&f.aggregate_type)?.info.stream_prefix.clone();
        let id = e.stream.strip_prefix(&prefix)?.strip_prefix('-')?;
        Some((f, id.to_string()))
    })?;
    let metadata: serde_json::Value = serde_json::from_slice(&e.metadata).unwrap_or_default();
    let data: serde_json::Value = serde_json::from_slice(&e.data).unwrap_or_default();
    let instance = instance_of(follow, &pm.aggregate_type, &aggregate_id, &metadata, &data)?;
    if validate_id("an instance id", &instance).is_err() {
        tracing::debug!(process = %pm.aggregate_type, instance, "event ignored: its instance key is not a usable id");
        return None;
    }
    let correlation_id = metadata["$correlationId"]
        .as_str()
        .filter(|c| validate_id("a correlation id", c).is_ok())
        .map(str::to_string);
    let payload = serde_json::json!({
        "event": {
            "aggregate": { "type": follow.aggregate_type, "id": aggregate_id },
            "type": e.event_type,
            "version": e.version,
            "position": e.position,
            "id": e.event_id,
            "data": data,
            "metadata": metadata,
        }
    });
    Some(Delivery {
        request: CommandRequest {
            aggregate_type: pm.aggregate_type.clone(),
            aggregate_id: instance.clone(),
            command: follow.command.clone(),
            data: serde_json::to_vec(&payload).unwrap_or_else(|_| b"{}".to_vec()),
            idempotency_key: Some(message_id(&e.event_id)),
            correlation_id,
            causation_id: Some(e.event_id.to_string()),
            ..CommandRequest::default()
        },
        instance,
    })
}

/// The instance `follow` sends an event to, if its key is there.
fn instance_of(
    follow: &Follow,
    pm_type: &str,
    aggregate_id: &str,
    metadata: &serde_json::Value,
    data: &serde_json::Value,
) -> Option<String> {
    match &follow.instance {
        InstanceKey::AggregateId => Some(aggregate_id.to_string()),
        InstanceKey::CorrelationId => metadata["$correlationId"].as_str().map(str::to_string),
        InstanceKey::ScheduledBy => {
            let by = metadata["timer"]["scheduledBy"].as_str()?;
            let (t, id) = by.split_once('/')?;
            (t == pm_type).then(|| id.to_string())
        }
        InstanceKey::DataField(field) => data.get(field)?.as_str().map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn follow(instance: InstanceKey) -> Follow {
        Follow {
            aggregate_type: "bank-account".into(),
            event_type: "Withdrawn".into(),
            instance,
            command: "debited".into(),
        }
    }

    #[test]
    fn each_key_finds_its_instance_or_none() {
        let metadata = json!({
            "$correlationId": "c-1",
            "timer": { "scheduledBy": "transfer/t-7", "key": "debit" }
        });
        let data = json!({ "amount": 5, "transfer": "t-9" });
        let of = |key| instance_of(&follow(key), "transfer", "a1", &metadata, &data);
        assert_eq!(of(InstanceKey::AggregateId).as_deref(), Some("a1"));
        assert_eq!(of(InstanceKey::CorrelationId).as_deref(), Some("c-1"));
        assert_eq!(of(InstanceKey::ScheduledBy).as_deref(), Some("t-7"));
        assert_eq!(
            of(InstanceKey::DataField("transfer".into())).as_deref(),
            Some("t-9")
        );
        // A number is not an id; a missing field or another type's timer
        // is no instance.
        assert_eq!(of(InstanceKey::DataField("amount".into())), None);
        assert_eq!(of(InstanceKey::DataField("nope".into())), None);
        assert_eq!(
            instance_of(
                &follow(InstanceKey::ScheduledBy),
                "order",
                "a1",
                &metadata,
                &data
            ),
            None
        );
        assert_eq!(
            instance_of(
                &follow(InstanceKey::ScheduledBy),
                "transfer",
                "a1",
                &json!({}),
                &data
            ),
            None
        );
    }
}
