//! [`Context`]: what the host tells `handle` about a command besides its
//! data — the aggregate's id and version, and the command's metadata.

/// The aggregate a command is for, and what the host knows about the
/// command.
///
/// The host always sends `now`, `message-id`, `correlation-id` and
/// `causation-id`, and `principal` when the caller is authenticated. A
/// plugin has no clock of its own: use [`now`](Context::now).
///
/// Build one yourself to test `handle` natively:
///
/// ```
/// use rehydra_guest::Context;
///
/// let ctx = Context::new("acc-1", 3)
///     .with_metadata(Context::NOW, "2024-05-01T12:00:00Z")
///     .with_metadata(Context::PRINCIPAL, "alice");
/// assert_eq!(ctx.aggregate_id(), "acc-1");
/// assert_eq!(ctx.version(), 3);
/// assert!(!ctx.is_new());
/// assert_eq!(ctx.principal(), Some("alice"));
/// assert_eq!(ctx.message_id(), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    aggregate_id: String,
    version: u64,
    metadata: Vec<(String, String)>,
}

impl Context {
    /// Metadata key: RFC 3339 UTC time at which the host received the command.
    pub const NOW: &'static str = "now";
    /// Metadata key: the command's unique id.
    pub const MESSAGE_ID: &'static str = "message-id";
    /// Metadata key: the id shared by every message of one conversation.
    pub const CORRELATION_ID: &'static str = "correlation-id";
    /// Metadata key: the id of the message that caused this one.
    pub const CAUSATION_ID: &'static str = "causation-id";
    /// Metadata key: the authenticated caller.
    pub const PRINCIPAL: &'static str = "principal";

    /// A context for aggregate `aggregate_id` at `version`, without
    /// metadata.
    pub fn new(aggregate_id: impl Into<String>, version: u64) -> Self {
        Context {
            aggregate_id: aggregate_id.into(),
            version,
            metadata: Vec::new(),
        }
    }

    /// A context with all its parts, as the host sends them.
    pub fn from_parts(aggregate_id: String, version: u64, metadata: Vec<(String, String)>) -> Self {
        Context {
            aggregate_id,
            version,
            metadata,
        }
    }

    /// Adds (or replaces) one metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// The id of the aggregate the command is for.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    /// The aggregate's version: the number of events in its stream.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether the aggregate has no events yet (version 0).
    pub fn is_new(&self) -> bool {
        self.version == 0
    }

    /// The metadata entry `key`, if the host sent it.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every metadata entry, in the order the host sent them.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// When the host received the command (RFC 3339, UTC).
    pub fn now(&self) -> Option<&str> {
        self.metadata(Self::NOW)
    }

    /// The command's unique id.
    pub fn message_id(&self) -> Option<&str> {
        self.metadata(Self::MESSAGE_ID)
    }

    /// The id shared by every message of the conversation.
    pub fn correlation_id(&self) -> Option<&str> {
        self.metadata(Self::CORRELATION_ID)
    }

    /// The id of the message that caused this command.
    pub fn causation_id(&self) -> Option<&str> {
        self.metadata(Self::CAUSATION_ID)
    }

    /// The authenticated caller, if any.
    pub fn principal(&self) -> Option<&str> {
        self.metadata(Self::PRINCIPAL)
    }

    /// When a timer sent this command: its key, when it was due (RFC 3339
    /// UTC), whether it was sent late (more than a second after that, e.g.
    /// because no host ran then), and the aggregate that scheduled it
    /// (`type/id`). `None` for a command a client sent.
    pub fn timer(&self) -> Option<TimerFiring<'_>> {
        Some(TimerFiring {
            key: self.metadata("timer-key")?,
            due: self.metadata("timer-due")?,
            late: self.metadata("timer-late") == Some("true"),
            scheduled_by: self.metadata("scheduled-by")?,
        })
    }
}

/// What [`Context::timer`] tells about a command a timer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerFiring<'a> {
    /// The timer's key.
    pub key: &'a str,
    /// When it was due, RFC 3339 UTC.
    pub due: &'a str,
    /// Whether it was sent more than a second after it was due.
    pub late: bool,
    /// The aggregate that scheduled it, `type/id`.
    pub scheduled_by: &'a str,
}
