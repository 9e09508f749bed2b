//! Plugins: aggregate logic compiled to WebAssembly components.
//!
//! This module is the only part of the host that knows about wasmtime and
//! the WIT bindings. It turns a `.wasm` file into a [`Plugin`] — compiled,
//! validated, described — and exposes plain-Rust calls (`handle`, `apply`)
//! on host types, so the actor and API layers never see a wasm type.
//!
//! - [`engine`]: the shared engine and the sandbox limits.
//! - [`cache`]: the on-disk compile cache.
//! - [`instance`]: a sandboxed instance and the warm pool.
//! - [`registry`]: the loaded plugins, by aggregate type.

pub mod bindings;
pub mod cache;
pub mod engine;
pub mod instance;
pub mod registry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use self::bindings::rehydra::aggregate::types as wit;
use self::engine::SandboxLimits;
use self::instance::{GuestFailure, InstancePool};
use crate::error::{CommandError, FailureKind, FieldError};
use crate::store::RecordedEvent;

pub use self::registry::{LoadFailure, PluginRegistry};

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

/// One loaded, validated version of a plugin.
pub struct Plugin {
    /// The plugin's name: its file name without `.wasm`.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes, hex: identifies this version.
    pub hash: String,
    /// The file's size in bytes.
    pub size: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// What it said about itself.
    pub info: PluginInfo,
    initial_state: StateBytes,
    pool: InstancePool,
    limits: SandboxLimits,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .field("aggregate_type", &self.info.aggregate_type)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The first 12 hex digits of the content hash, for logs.
    pub fn short_hash(&self) -> &str {
        &self.hash[..self.hash.len().min(12)]
    }

    /// The state of an aggregate with no events.
    pub fn initial_state(&self) -> &StateBytes {
        &self.initial_state
    }

    fn failed(&self, f: GuestFailure) -> CommandError {
        CommandError::PluginFailed {
            plugin: self.name.clone(),
            kind: f.kind,
            message: f.message,
        }
    }

    /// Folds `events` into `state` with one guest call.
    pub fn apply(
        &self,
        state: &StateBytes,
        events: &[RecordedEvent],
    ) -> Result<StateBytes, CommandError> {
        let s = wit::State {
            schema: state.schema,
            bytes: state.bytes.clone(),
        };
        let batch: Vec<wit::RecordedEvent> = events.iter().map(to_wit_event).collect();
        let deadline = self.limits.apply_deadline;
        let result = self
            .pool
            .with_instance(|i| i.call(deadline, |agg, store| agg.call_apply(store, &s, &batch)))
            .map_err(|f| self.failed(f))?;
        match result {
            Ok(s) => Ok(StateBytes {
                schema: s.schema,
                bytes: s.bytes,
            }),
            Err(message) => Err(CommandError::PluginFailed {
                plugin: self.name.clone(),
                kind: FailureKind::ApplyRefused,
                message: format!(
                    "apply refused the events from version {}: {message}",
                    events.first().map(|e| e.version).unwrap_or_default()
                ),
            }),
        }
    }

    /// Decides what `command` does to an aggregate at `version` in `state`.
    pub fn handle(
        &self,
        state: &StateBytes,
        version: u64,
        command: &CommandInput<'_>,
    ) -> Result<Result<Decision, Rejection>, CommandError> {
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
        let deadline = self.limits.handle_deadline;
        let result = self
            .pool
            .with_instance(|i| {
                i.call(deadline, |agg, store| {
                    agg.call_handle(store, &s, version, &c)
                })
            })
            .map_err(|f| self.failed(f))?;
        Ok(match result {
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
        })
    }
}

/// Event metadata is a JSON object in the store; the guest sees it as
/// string pairs (non-string values as their JSON text).
fn to_wit_event(e: &RecordedEvent) -> wit::RecordedEvent {
    let metadata =
        match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&e.metadata) {
            Ok(map) => map
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect(),
            Err(_) => Vec::new(),
        };
    wit::RecordedEvent {
        event_type: e.event_type.clone(),
        data: e.data.clone(),
        version: e.version,
        metadata,
    }
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

/// Whether `s` is a valid stream prefix: like a name but without `-`, since
/// KurrentDB's category is everything before the first `-` of a stream name.
pub fn is_valid_stream_prefix(s: &str) -> bool {
    is_valid_name(s) && !s.contains('-')
}

/// Shared by `Arc` everywhere a command runs.
pub type PluginRef = Arc<Plugin>;
