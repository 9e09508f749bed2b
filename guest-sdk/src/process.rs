//! [`ProcessManager`]: an aggregate that follows other aggregates' events
//! and sends commands — a workflow across aggregates, such as a money
//! transfer that debits one account, credits another, and refunds the
//! first if the credit is refused.
//!
//! Its instances are aggregates of its own type. Each event it follows
//! arrives at one instance as one of its commands, whose data is
//! `{"event": FollowedEvent}`; it sends commands as [`Timer`](crate::Timer)s
//! due at once ([`Timer::send`](crate::Timer::send)), which the host stores
//! with its events and sends once; a command it sent that is refused comes
//! back as its [`ON_REFUSED`](ProcessManager::ON_REFUSED) command, with
//! data `{"refusal": Refusal}`.

use serde::Deserialize;
use serde_json::Value;

use crate::Aggregate;

/// Which instance receives an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKey {
    /// The id of the aggregate that stored the event: one instance per
    /// aggregate.
    AggregateId,
    /// The event's correlation id.
    CorrelationId,
    /// The instance whose timer sent the command that stored the event;
    /// events no instance of this type caused are ignored.
    ScheduledBy,
    /// A top-level string field of the event's data; events without it are
    /// ignored.
    DataField(&'static str),
}

/// An event type a process manager follows, and the command of its own
/// that receives each: a `create` command starts an instance (an event for
/// one that exists is ignored), an `update` command continues one (an event
/// for none is ignored), an `upsert` command does either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Follow {
    /// The aggregate type that stores the event.
    pub aggregate_type: &'static str,
    /// The event type.
    pub event_type: &'static str,
    /// Which instance receives it.
    pub instance: InstanceKey,
    /// The command that receives it.
    pub command: &'static str,
}

impl Follow {
    /// Follows `event_type` of `aggregate_type`, delivered to the instance
    /// `instance` names as `command`.
    pub const fn new(
        aggregate_type: &'static str,
        event_type: &'static str,
        instance: InstanceKey,
        command: &'static str,
    ) -> Follow {
        Follow {
            aggregate_type,
            event_type,
            instance,
            command,
        }
    }
}

/// An aggregate that follows events of others: implement it beside
/// [`Aggregate`] and export with
/// [`export_process_manager!`](crate::export_process_manager).
pub trait ProcessManager: Aggregate {
    /// The events it follows.
    const FOLLOWS: &'static [Follow];
    /// Its command that receives the refusal of a command it sent (data
    /// `{"refusal": Refusal}`); `None`: refusals are only logged.
    const ON_REFUSED: Option<&'static str> = None;
    /// Its own event types that finish an instance: once an instance has
    /// stored one, the host delivers it nothing more.
    const FINISHED_BY: &'static [&'static str] = &[];
}

/// An aggregate, by type and id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AggregateRef {
    /// The aggregate type.
    #[serde(rename = "type")]
    pub aggregate_type: String,
    /// Its id.
    pub id: String,
}

/// An event a process manager follows, as its command receives it (field
/// `event` of the data).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FollowedEvent {
    /// The aggregate that stored it.
    pub aggregate: AggregateRef,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Its version in the aggregate's stream.
    pub version: u64,
    /// Its position in the log.
    pub position: u64,
    /// Its id.
    pub id: String,
    /// Its data.
    pub data: Value,
    /// Its metadata (see the README's *Event metadata*).
    pub metadata: Value,
}

impl FollowedEvent {
    /// The key of the timer whose command stored this event, if a timer
    /// sent it (`metadata.timer.key`).
    pub fn timer_key(&self) -> Option<&str> {
        self.metadata["timer"]["key"].as_str()
    }
}

/// A command a process manager sent that its target refused, as its
/// [`ON_REFUSED`](ProcessManager::ON_REFUSED) command receives it (field
/// `refusal` of the data).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Refusal {
    /// The key of the timer that sent it.
    pub key: String,
    /// The aggregate that refused it.
    pub target: AggregateRef,
    /// The command.
    pub command: String,
    /// Its data.
    pub data: Value,
    /// The refusal's code (`rejected`, `aggregate_not_found`, ...).
    pub code: String,
    /// The refusal's message.
    pub message: String,
}

/// What a process manager declares, checked.
#[derive(Debug, Clone)]
pub struct ProcessDescription {
    /// The events it follows.
    pub follows: &'static [Follow],
    /// Its refusal command.
    pub on_refused: Option<&'static str>,
    /// Its event types that finish an instance.
    pub finished_by: &'static [&'static str],
}

/// Checks `P`'s declarations: every command it names is one of
/// [`COMMANDS`](Aggregate::COMMANDS), and every event type that finishes
/// an instance is one of its events.
pub fn process_info<P: ProcessManager>() -> Result<ProcessDescription, String> {
    let has = |name: &str| P::COMMANDS.iter().any(|c| c.name == name);
    for f in P::FOLLOWS {
        if !has(f.command) {
            return Err(format!(
                "FOLLOWS sends {}/{} to `{}`, which is not in COMMANDS",
                f.aggregate_type, f.event_type, f.command
            ));
        }
    }
    if let Some(command) = P::ON_REFUSED
        && !has(command)
    {
        return Err(format!(
            "ON_REFUSED names `{command}`, which is not in COMMANDS"
        ));
    }
    let description = crate::dispatch::describe::<P>()?;
    for event_type in P::FINISHED_BY {
        if !description.event_types.contains(event_type) {
            return Err(format!(
                "FINISHED_BY names `{event_type}`, which is not one of its event types"
            ));
        }
    }
    Ok(ProcessDescription {
        follows: P::FOLLOWS,
        on_refused: P::ON_REFUSED,
        finished_by: P::FINISHED_BY,
    })
}
