//! The plain host types a plugin's calls take and give: what it says about
//! itself, commands, decisions, refusals, states and events. The actor and
//! API layers work with these, never with the WIT bindings.

use serde::Serialize;

use crate::error::FieldError;

/// Whether a command creates its aggregate, updates it, or either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandMode {
    /// The aggregate must not exist yet.
    Create,
    /// The aggregate must exist.
    Update,
    /// Either.
    Upsert,
}

/// A command a plugin accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandSpec {
    /// The command's name.
    pub name: String,
    /// Its mode.
    pub mode: CommandMode,
}

/// What a plugin said about itself in `describe()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginInfo {
    /// The aggregate type, unique among loaded plugins.
    pub aggregate_type: String,
    /// Streams are named `<stream_prefix>-<id>`.
    pub stream_prefix: String,
    /// The version of the state encoding.
    pub state_schema: u32,
    /// Every command the plugin handles.
    pub commands: Vec<CommandSpec>,
    /// Every event type it emits.
    pub event_types: Vec<String>,
    /// What it follows, when it is a process manager.
    pub process: Option<ProcessInfo>,
}

/// Which instance of a process manager an event goes to (see the WIT's
/// `instance-key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceKey {
    /// The id of the aggregate that stored the event.
    AggregateId,
    /// The event's correlation id.
    CorrelationId,
    /// The instance whose timer sent the command that stored the event.
    ScheduledBy,
    /// A top-level string field of the event's data.
    DataField(String),
}

/// An event type a process manager follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Follow {
    /// The aggregate type that stores it.
    pub aggregate_type: String,
    /// The event type.
    pub event_type: String,
    /// Which instance receives it.
    pub instance: InstanceKey,
    /// The process manager's command that receives it.
    pub command: String,
}

/// What a process manager follows and where refusals go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    /// The events it follows.
    pub follows: Vec<Follow>,
    /// Its command that receives its refused commands; `None`: logged only.
    pub on_refused: Option<String>,
    /// Its own event types that finish an instance.
    pub finished_by: Vec<String>,
}

impl PluginInfo {
    /// The spec of the command `name`, if the plugin has it.
    pub fn command(&self, name: &str) -> Option<&CommandSpec> {
        self.commands.iter().find(|c| c.name == name)
    }

    /// The stream of aggregate `id`.
    pub fn stream_name(&self, id: &str) -> String {
        format!("{}-{}", self.stream_prefix, id)
    }
}

/// An aggregate's state as the plugin encoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBytes {
    /// The encoding's version.
    pub schema: u32,
    /// The encoded state.
    pub bytes: Vec<u8>,
}

/// An event a command produced, not yet stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event type.
    pub event_type: String,
    /// The payload (JSON).
    pub data: Vec<u8>,
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Events to append, in order.
    pub events: Vec<NewEvent>,
    /// The state after those events.
    pub state: StateBytes,
    /// The reply for the client (JSON), if any.
    pub reply: Option<Vec<u8>>,
    /// Timers to schedule or cancel, in order.
    pub timers: Vec<TimerChange>,
}

/// When a scheduled command is due, as the plugin said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// At an instant: RFC 3339 text, not yet checked.
    At(String),
    /// This many milliseconds after the command's `now`.
    AfterMs(u64),
}

/// An aggregate, by type and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct AggregateRef {
    /// The aggregate type.
    #[serde(rename = "type")]
    pub aggregate_type: String,
    /// The aggregate's id.
    pub id: String,
}

impl std::fmt::Display for AggregateRef {
    /// `type/id`, as the API's `?aggregate=` and a timer's `scheduledBy`
    /// write it (ids never hold `/`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.id)
    }
}

/// A command a decision asks the host to send later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerRequest {
    /// The timer's name among its aggregate's timers.
    pub key: String,
    /// The aggregate the command is for; `None`: the deciding one.
    pub target: Option<AggregateRef>,
    /// The command's name.
    pub command: String,
    /// The command's payload (JSON).
    pub data: Vec<u8>,
    /// When it is due.
    pub due: Due,
}

/// A change a decision makes to its aggregate's timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    /// Schedule a command (replacing a pending timer of the same key).
    Schedule(TimerRequest),
    /// Cancel the pending timer with this key.
    Cancel(String),
}

impl TimerChange {
    /// The key the change is about.
    pub fn key(&self) -> &str {
        match self {
            TimerChange::Schedule(t) => &t.key,
            TimerChange::Cancel(key) => key,
        }
    }
}

/// Why a plugin refused a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Invalid fields.
    Invalid(Vec<FieldError>),
    /// A domain rule refused it.
    Rejected(String),
    /// The caller may not do this.
    Forbidden(String),
    /// The plugin cannot read state of this schema.
    IncompatibleState(u32),
}

/// A stored event as `apply` receives it: the host-side twin of the WIT
/// `recorded-event`, which both kinds of plugin are given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayEvent {
    /// The event type.
    pub event_type: String,
    /// The payload (JSON).
    pub data: Vec<u8>,
    /// The aggregate's version once this event is applied (1-based).
    pub version: u64,
    /// The stored metadata JSON object, as text and unparsed (see the WIT's
    /// `recorded-event.metadata`; empty when the stored bytes are not UTF-8).
    pub metadata: String,
}

/// A command as the plugin receives it.
#[derive(Debug, Clone)]
pub struct CommandInput<'a> {
    /// The command's name.
    pub command_type: &'a str,
    /// The aggregate's id.
    pub aggregate_id: &'a str,
    /// The payload (JSON).
    pub data: &'a [u8],
    /// Host-supplied metadata (`now`, `message-id`, …).
    pub metadata: &'a [(String, String)],
}

/// Whether `s` is a valid name for an aggregate type, command or event type:
/// 1–64 ASCII letters, digits, `-`, `_` or `.`, starting with a letter.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether an event type is one the host writes for itself (`$timers`):
/// plugin event types start with a letter, so they never start with `$`.
pub fn is_host_event(event_type: &str) -> bool {
    event_type.starts_with('$')
}

/// Whether `s` is a valid stream prefix: like a name but without `-`, since
/// KurrentDB's category is everything before the first `-` of a stream name.
pub fn is_valid_stream_prefix(s: &str) -> bool {
    is_valid_name(s) && !s.contains('-')
}
