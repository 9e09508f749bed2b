//! The error model: every way a command or query can fail, with the stable
//! machine-readable code clients rely on (the README's table of codes lists
//! them with their HTTP and gRPC statuses).
//!
//! The core returns [`CommandError`]; each API (HTTP, gRPC, and the CLI
//! through HTTP) maps it to its own status codes, but the code string is the
//! same everywhere.

use serde::Serialize;

/// One invalid field of a command, as reported by the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field's name.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Why a plugin call failed outright (as opposed to refusing a command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The guest trapped (a panic, `unreachable`, a bad memory access).
    Trap,
    /// The guest ran past its CPU deadline.
    DeadlineExceeded,
    /// The guest tried to grow its memory past the cap.
    MemoryLimit,
    /// The guest returned something the host refuses to store.
    BadOutput,
    /// The guest's `apply` refused stored events.
    ApplyRefused,
    /// The plugin failed too often in a row and is resting; nothing ran.
    Quarantined,
}

impl FailureKind {
    /// The reason string used in error details.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::DeadlineExceeded => "deadline_exceeded",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::BadOutput => "bad_output",
            FailureKind::ApplyRefused => "apply_refused",
            FailureKind::Quarantined => "quarantined",
        }
    }
}

/// Every way a command or query can fail. Each variant has a stable code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    /// The request is not well formed (bad JSON, header or id).
    #[error("{0}")]
    MalformedRequest(String),
    /// No plugin handles this aggregate type.
    #[error("no plugin handles aggregate type {0:?}; see GET /v1/plugins for the loaded ones")]
    UnknownAggregateType(String),
    /// No loaded plugin handles this aggregate type yet, but plugin files
    /// are still compiling at start-up: one of them may be the one.
    #[error(
        "no plugin handles aggregate type {aggregate_type:?} yet; still compiling: {loading}; retry shortly"
    )]
    PluginsLoading {
        /// The aggregate type asked for.
        aggregate_type: String,
        /// The files still compiling, with their size and time so far.
        loading: String,
    },
    /// The plugin has no command of this name.
    #[error("aggregate type {aggregate_type:?} has no command {command:?}; it accepts: {known}")]
    UnknownCommand {
        /// The aggregate type.
        aggregate_type: String,
        /// The command asked for.
        command: String,
        /// The commands it does accept, comma separated.
        known: String,
    },
    /// An `update` command (or a query) for an aggregate with no events.
    #[error("{aggregate_type} {id:?} does not exist")]
    AggregateNotFound {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        id: String,
    },
    /// A `create` command for an aggregate that already has events.
    #[error("{aggregate_type} {id:?} already exists (version {version})")]
    AlreadyExists {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        id: String,
        /// Its current version.
        version: u64,
    },
    /// The client's expected version (`If-Match`) differs from the actual
    /// one, or a conflict with another writer persisted through every retry.
    #[error("expected version {expected}, but the aggregate is at version {actual}")]
    WrongExpectedVersion {
        /// The version the command expected.
        expected: u64,
        /// The aggregate's actual version.
        actual: u64,
    },
    /// An idempotency key already used for another request (another command,
    /// or another payload): answering with the first request's outcome would
    /// tell the client its new request was done when it was not.
    #[error(
        "Idempotency-Key {key:?} was already used for {earlier}; a key names one request: \
         send a new request with a new key"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: String,
        /// What it was first used for (the command's name, and whether the
        /// payload differs).
        earlier: String,
    },
    /// The plugin found invalid fields in the command.
    #[error("the command is invalid: {}", describe_fields(.0))]
    InvalidCommand(Vec<FieldError>),
    /// The plugin refused the command under a domain rule.
    #[error("{0}")]
    Rejected(String),
    /// The plugin (or the API's auth) refused the caller.
    #[error("{0}")]
    Forbidden(String),
    /// The command would leave its aggregate with more pending timers than
    /// `--max-timers-per-aggregate` allows. Nothing is stored.
    #[error(
        "{aggregate_type}/{id} would have {pending} pending timers, over the limit of {limit} per \
         aggregate; cancel timers it no longer needs, or raise --max-timers-per-aggregate"
    )]
    TooManyTimers {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate's id.
        id: String,
        /// The pending timers the command would leave.
        pending: usize,
        /// The limit.
        limit: usize,
    },
    /// The command's body is over the configured limit.
    #[error(
        "the command is over the limit of {limit} bytes; raise --max-command-bytes if this is intended"
    )]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The aggregate's mailbox (or an in-flight limit) is full.
    #[error("{0}; retry shortly")]
    Overloaded(String),
    /// The event store cannot be reached or cannot write.
    #[error("the event store is unavailable: {0}")]
    StoreUnavailable(String),
    /// The command did not finish in time. It may still complete: retry with
    /// the same `Idempotency-Key` to learn its outcome safely.
    #[error(
        "the command did not finish within {0:?}; retry with the same Idempotency-Key to learn its outcome"
    )]
    Timeout(std::time::Duration),
    /// The plugin trapped, ran out of time or memory, or produced output the
    /// host refuses. Nothing was stored.
    #[error("plugin {plugin} failed ({}): {message}", kind.as_str())]
    PluginFailed {
        /// The plugin's name.
        plugin: String,
        /// The kind of failure.
        kind: FailureKind,
        /// What happened, including the guest's panic message when known.
        message: String,
    },
    /// The plugin failed on this aggregate several times in a row, so its
    /// commands and reads rest for a while without calling the plugin.
    /// Other aggregates of the type are served as usual.
    #[error(
        "{aggregate_type} {id:?} is resting: the plugin failed on it {failures} times in a row \
         (last: {last_error}); its commands are refused for another {} ms. Other aggregates are \
         served. Fix the plugin or the aggregate's data, or retry later",
        retry_after.as_millis()
    )]
    AggregatePoisoned {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate's id.
        id: String,
        /// Failures in a row.
        failures: u32,
        /// How long it rests still.
        retry_after: std::time::Duration,
        /// The last failure's message.
        last_error: String,
    },
    /// A subscriber left its buffer full for too long and was disconnected.
    /// Everything before `resume_from` was delivered.
    #[error(
        "the subscriber read too slowly: its buffer of {buffer} events stayed full for {waited:?}; \
         resume from position {resume_from}"
    )]
    SubscriberTooSlow {
        /// The buffer's size in events.
        buffer: usize,
        /// How long it stayed full.
        waited: std::time::Duration,
        /// The position to resume from: nothing before it is lost.
        resume_from: u64,
    },
    /// The host is shutting down; a subscription ends with this. Everything
    /// before `resume_from` was delivered.
    #[error("the host is shutting down; resume from position {resume_from}")]
    ShuttingDown {
        /// The position to resume from.
        resume_from: u64,
    },
    /// The caller did not present a valid token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A route that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A bug or unexpected condition in the host.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe_fields(fields: &[FieldError]) -> String {
    fields
        .iter()
        .map(|f| format!("{}: {}", f.field, f.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl CommandError {
    /// How long a client should wait before it tries again, when the error
    /// knows (HTTP `Retry-After`).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            CommandError::AggregatePoisoned { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::MalformedRequest(_) => "malformed_request",
            CommandError::UnknownAggregateType(_) => "unknown_aggregate_type",
            CommandError::PluginsLoading { .. } => "plugins_loading",
            CommandError::UnknownCommand { .. } => "unknown_command",
            CommandError::AggregateNotFound { .. } => "aggregate_not_found",
            CommandError::AlreadyExists { .. } => "already_exists",
            CommandError::WrongExpectedVersion { .. } => "wrong_expected_version",
            CommandError::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            CommandError::InvalidCommand(_) => "invalid_command",
            CommandError::Rejected(_) => "rejected",
            CommandError::Forbidden(_) => "forbidden",
            CommandError::TooManyTimers { .. } => "too_many_timers",
            CommandError::PayloadTooLarge { .. } => "payload_too_large",
            CommandError::Overloaded(_) => "overloaded",
            CommandError::StoreUnavailable(_) => "store_unavailable",
            CommandError::Timeout(_) => "timeout",
            CommandError::PluginFailed { .. } => "plugin_failed",
            CommandError::AggregatePoisoned { .. } => "aggregate_poisoned",
            CommandError::SubscriberTooSlow { .. } => "subscriber_too_slow",
            CommandError::Unauthenticated(_) => "unauthenticated",
            CommandError::ShuttingDown { .. } => "shutting_down",
            CommandError::NotFound(_) => "not_found",
            CommandError::Internal(_) => "internal",
        }
    }

    /// Whether this is the command's answer — the target refused it, or
    /// it does not fit the target — as opposed to a failure to run it now
    /// that may pass (the store, overload, a plugin failing or loading).
    /// A timer or a process manager takes the first as final and tries
    /// the second again.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            CommandError::MalformedRequest(_)
                | CommandError::UnknownCommand { .. }
                | CommandError::AggregateNotFound { .. }
                | CommandError::AlreadyExists { .. }
                | CommandError::IdempotencyKeyReused { .. }
                | CommandError::InvalidCommand(_)
                | CommandError::Rejected(_)
                | CommandError::Forbidden(_)
                | CommandError::TooManyTimers { .. }
                | CommandError::PayloadTooLarge { .. }
        )
    }

    /// Structured details for the error body, where the variant has any.
    pub fn details(&self) -> Option<serde_json::Value> {
        use serde_json::json;
        match self {
            CommandError::WrongExpectedVersion { expected, actual } => {
                Some(json!({ "expected": expected, "actual": actual }))
            }
            CommandError::AlreadyExists { version, .. } => Some(json!({ "version": version })),
            CommandError::InvalidCommand(fields) => Some(json!({ "fields": fields })),
            CommandError::PluginFailed { plugin, kind, .. } => {
                Some(json!({ "plugin": plugin, "reason": kind.as_str() }))
            }
            CommandError::PayloadTooLarge { limit } => Some(json!({ "limit": limit })),
            CommandError::TooManyTimers { pending, limit, .. } => {
                Some(json!({ "pending": pending, "limit": limit }))
            }
            CommandError::AggregatePoisoned {
                failures,
                retry_after,
                ..
            } => Some(json!({
                "failures": failures,
                "retry_after_ms": u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
            })),
            CommandError::IdempotencyKeyReused { key, .. } => Some(json!({ "key": key })),
            CommandError::SubscriberTooSlow {
                buffer,
                resume_from,
                ..
            } => Some(json!({ "buffer": buffer, "resume_from": resume_from })),
            CommandError::ShuttingDown { resume_from } => {
                Some(json!({ "resume_from": resume_from }))
            }
            _ => None,
        }
    }
}

/// What the outcome of a command or load says about the plugin that ran
/// it, for the plugin's quarantine and an aggregate's poisoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginVerdict {
    /// The plugin failed (trap, deadline, memory, output the host refuses,
    /// `apply` refusing events).
    Failed,
    /// The plugin answered, if only with a refusal: it works.
    Worked,
    /// Nothing is known of the plugin (the store failed, the command timed
    /// out, the plugin is resting and was not called).
    Unknown,
}

impl PluginVerdict {
    /// The verdict on `result`.
    pub fn of<T>(result: &Result<T, CommandError>) -> PluginVerdict {
        match result {
            Err(CommandError::PluginFailed { kind, .. }) if *kind != FailureKind::Quarantined => {
                PluginVerdict::Failed
            }
            Ok(_)
            | Err(
                CommandError::InvalidCommand(_)
                | CommandError::Rejected(_)
                | CommandError::Forbidden(_)
                | CommandError::TooManyTimers { .. }
                | CommandError::AlreadyExists { .. }
                | CommandError::AggregateNotFound { .. }
                | CommandError::WrongExpectedVersion { .. },
            ) => PluginVerdict::Worked,
            Err(_) => PluginVerdict::Unknown,
        }
    }
}

impl From<crate::store::StoreError> for CommandError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::WrongExpectedVersion {
                actual, expected, ..
            } => {
                let expected = match expected {
                    crate::store::ExpectedVersion::Exact(v) => v,
                    _ => 0,
                };
                CommandError::WrongExpectedVersion { expected, actual }
            }
            // The store's own message, without its "unavailable" prefix,
            // which this error's display adds.
            crate::store::StoreError::Unavailable(message) => {
                CommandError::StoreUnavailable(message)
            }
            other => CommandError::StoreUnavailable(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        assert_eq!(
            CommandError::WrongExpectedVersion {
                expected: 1,
                actual: 2
            }
            .code(),
            "wrong_expected_version"
        );
        assert_eq!(
            CommandError::PayloadTooLarge { limit: 1 }.code(),
            "payload_too_large"
        );
        let e = CommandError::InvalidCommand(vec![FieldError {
            field: "amount".into(),
            message: "must be > 0".into(),
        }]);
        assert_eq!(e.code(), "invalid_command");
        assert_eq!(e.to_string(), "the command is invalid: amount: must be > 0");
        assert_eq!(
            e.details(),
            Some(serde_json::json!({"fields": [{"field": "amount", "message": "must be > 0"}]}))
        );
    }
}
