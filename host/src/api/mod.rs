//! The network APIs. Each one translates its protocol into calls on
//! [`Aggregates`](crate::actor::Aggregates) and
//! [`Subscriptions`](crate::subscription::Subscriptions), and maps
//! [`CommandError`] codes to its own statuses; none holds domain logic.
//! The checks both protocols make alike (payloads, stream pages) live here.
//!
//! - [`http`]: HTTP/JSON with axum, and server-sent events for subscriptions.
//! - [`grpc`]: gRPC with tonic, from `proto/rehydra/v1`.
//! - [`connections`]: the cap on open connections both servers accept.

pub mod connections;
pub mod grpc;
pub mod http;

use std::sync::Arc;

use crate::actor::Aggregates;
use crate::auth::TokenFile;
use crate::command::{MAX_ID_LEN, validate_id};
use crate::error::CommandError;
use crate::store::RecordedEvent;
use crate::subscription::Subscriptions;

/// What every API serves from.
#[derive(Clone)]
pub struct ApiContext {
    /// The aggregates commands and state queries go to.
    pub aggregates: Aggregates,
    /// Where subscriptions are opened.
    pub subscriptions: Subscriptions,
    /// The accepted tokens; `None`: no authentication.
    pub tokens: Option<Arc<TokenFile>>,
    /// The largest accepted command payload, in bytes.
    pub max_command_bytes: usize,
}

/// The pending timers a list returns when the client does not say.
pub const DEFAULT_TIMERS: usize = 100;
/// Most pending timers returned by one list.
pub const MAX_TIMERS: usize = 1000;

/// A page of pending timers, as both APIs return it.
#[derive(Debug, serde::Serialize)]
pub struct TimerList {
    /// The timers, in the order they will be sent.
    pub timers: Vec<crate::timer::PendingTimer>,
    /// How many pending timers match, in all.
    pub count: u64,
}

/// Lists pending timers: of one aggregate (`type/id`: those it scheduled
/// and those for it) or all, at most `limit` (default [`DEFAULT_TIMERS`],
/// at most [`MAX_TIMERS`]).
pub fn list_timers(
    ctx: &ApiContext,
    aggregate: Option<&str>,
    limit: Option<usize>,
) -> Result<TimerList, CommandError> {
    let aggregate = match aggregate {
        None => None,
        Some(text) => {
            let Some((aggregate_type, id)) = text.split_once('/') else {
                return Err(CommandError::MalformedRequest(format!(
                    "aggregate {text:?} is not TYPE/ID, e.g. order/o-17"
                )));
            };
            if !crate::plugin::is_valid_name(aggregate_type) {
                return Err(CommandError::MalformedRequest(format!(
                    "aggregate {text:?} has an invalid type {aggregate_type:?}"
                )));
            }
            validate_id("the aggregate id", id)?;
            Some(crate::plugin::AggregateRef {
                aggregate_type: aggregate_type.to_string(),
                id: id.to_string(),
            })
        }
    };
    let limit = limit.unwrap_or(DEFAULT_TIMERS);
    if limit == 0 || limit > MAX_TIMERS {
        return Err(CommandError::MalformedRequest(format!(
            "limit must be 1 to {MAX_TIMERS}, got {limit}"
        )));
    }
    let Some(index) = ctx.aggregates.timer_index() else {
        return Ok(TimerList {
            timers: Vec::new(),
            count: 0,
        });
    };
    let (timers, count) = index
        .list(&crate::timer::TimerQuery { aggregate, limit })
        .map_err(|e| CommandError::Internal(e.to_string()))?;
    Ok(TimerList { timers, count })
}

/// The parked events listed per process manager, at most.
pub const MAX_PARKED: usize = 100;

/// A process manager as `GET /v1/processes` shows it.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessView {
    /// Its name: the aggregate type of its instances.
    pub name: String,
    /// The plugin (file name) that serves it.
    pub plugin: String,
    /// What it follows and where refusals go.
    pub process: crate::plugin::ProcessInfo,
    /// The log position it has handled up to (`None`: not started yet).
    pub checkpoint: Option<u64>,
    /// Events it parked (the first [`MAX_PARKED`]), in log order.
    pub parked: Vec<crate::timer::ParkedEvent>,
    /// How many events it parked in all.
    pub parked_count: u64,
    /// How many of its instances have finished (stored an event of a type
    /// in its `finished_by`).
    pub finished_count: u64,
}

/// The process managers the host serves.
pub fn list_processes(ctx: &ApiContext) -> Result<Vec<ProcessView>, CommandError> {
    let internal = |e: crate::timer::TimerIndexError| CommandError::Internal(e.to_string());
    let mut views = Vec::new();
    let mut plugins = ctx.aggregates.plugins().list();
    plugins.sort_by(|a, b| a.info.aggregate_type.cmp(&b.info.aggregate_type));
    for p in plugins {
        let Some(process) = p.info.process.clone() else {
            continue;
        };
        let name = p.info.aggregate_type.clone();
        let (checkpoint, (parked, parked_count), finished_count) =
            match ctx.aggregates.timer_index() {
                Some(index) => (
                    index
                        .process_checkpoint(&name)
                        .map_err(internal)?
                        .map(|(position, _)| position),
                    index.parked(&name, MAX_PARKED).map_err(internal)?,
                    index.finished_count(&name).map_err(internal)?,
                ),
                None => (None, (Vec::new(), 0), 0),
            };
        views.push(ProcessView {
            name,
            plugin: p.name.clone(),
            process,
            checkpoint,
            parked,
            parked_count,
            finished_count,
        });
    }
    Ok(views)
}

/// Events a stream read returns when the client does not say.
pub const DEFAULT_PAGE: usize = 100;
/// Most events returned by one stream read.
pub const MAX_PAGE: usize = 1000;

/// Checks a command's payload: at most `limit` bytes, and a JSON object.
/// An empty (or all-whitespace) payload is the empty object.
pub fn command_payload(body: &[u8], limit: usize) -> Result<Vec<u8>, CommandError> {
    if body.len() > limit {
        return Err(CommandError::PayloadTooLarge { limit });
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(b"{}".to_vec());
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        CommandError::MalformedRequest(format!("the payload is not valid JSON: {e}"))
    })?;
    if !value.is_object() {
        return Err(CommandError::MalformedRequest(
            "the payload must be a JSON object (the command's fields)".into(),
        ));
    }
    Ok(body.to_vec())
}

/// Reads one page of `stream` from version `from` (0 is read as 1), at most
/// `limit` events (`None`: [`DEFAULT_PAGE`]; capped at [`MAX_PAGE`]).
pub async fn read_stream_page(
    aggregates: &Aggregates,
    stream: &str,
    from: u64,
    limit: Option<usize>,
) -> Result<Vec<RecordedEvent>, CommandError> {
    if stream.is_empty() || stream.len() > 2 * MAX_ID_LEN {
        return Err(CommandError::MalformedRequest(format!(
            "the stream name must be 1 to {} characters long",
            2 * MAX_ID_LEN
        )));
    }
    validate_id("stream name", stream)?;
    let limit = limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    Ok(aggregates
        .store()
        .read_stream(stream, from.max(1), limit)
        .await?)
}

/// Event bytes as JSON: the value if they parse, else a string of them.
pub fn json_or_text(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// An optional id (idempotency key, correlation or causation id): empty
/// means absent; otherwise it must be a valid id.
pub fn optional_id(what: &str, value: &str) -> Result<Option<String>, CommandError> {
    if value.is_empty() {
        return Ok(None);
    }
    validate_id(what, value)?;
    Ok(Some(value.to_string()))
}
