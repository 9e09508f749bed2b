//! The gRPC API (tonic), generated from `proto/rehydra/v1/*.proto`: the
//! services `Commands`, `Aggregates`, `Streams` and `Plugins`, served on
//! their own address (`--grpc`, default `127.0.0.1:50051`).
//!
//! The semantics are HTTP's: the same core calls, the same checks (see
//! [`super`]), the same error codes. A failed call ends with the gRPC status
//! that [`status_code_of`] maps the error to, the stable code in the
//! trailing metadata key `rehydra-error-code`, and the error's details, if
//! any, as a JSON object in `rehydra-error-details`.

// tonic's API is `Result<_, Status>` throughout, and `Status` is large.
#![allow(clippy::result_large_err)]

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt as _};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Response, Status};

use super::{ApiContext, command_payload, optional_id, read_stream_page};
use crate::auth::{Principal, TokenFile};
use crate::command::CommandRequest;
use crate::error::CommandError;
use crate::plugin::CommandMode;
use crate::store::RecordedEvent;
use crate::subscription::{Filter, Item, Start};

/// The code generated from `proto/rehydra/v1` (messages, clients, servers).
/// Clients in Rust use it too: `rehydra::api::grpc::pb::commands_client`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("rehydra.v1");
}

use pb::aggregates_server::{Aggregates, AggregatesServer};
use pb::commands_server::{Commands, CommandsServer};
use pb::plugins_server::{Plugins, PluginsServer};
use pb::streams_server::{Streams, StreamsServer};
use pb::timers_server::{Timers, TimersServer};

/// The metadata key of the stable error code.
pub const ERROR_CODE_KEY: &str = "rehydra-error-code";
/// The metadata key of the error's details (a JSON object, ASCII).
pub const ERROR_DETAILS_KEY: &str = "rehydra-error-details";

/// The gRPC status code for an error.
pub fn status_code_of(e: &CommandError) -> Code {
    match e {
        CommandError::MalformedRequest(_)
        | CommandError::InvalidCommand(_)
        | CommandError::IdempotencyKeyReused { .. } => Code::InvalidArgument,
        CommandError::UnknownAggregateType(_)
        | CommandError::UnknownCommand { .. }
        | CommandError::AggregateNotFound { .. }
        | CommandError::NotFound(_) => Code::NotFound,
        CommandError::AlreadyExists { .. } => Code::AlreadyExists,
        // A concurrency conflict: re-read and decide again.
        CommandError::WrongExpectedVersion { .. } => Code::Aborted,
        CommandError::Rejected(_) | CommandError::TooManyTimers { .. } => Code::FailedPrecondition,
        CommandError::Forbidden(_) => Code::PermissionDenied,
        CommandError::Unauthenticated(_) => Code::Unauthenticated,
        CommandError::PayloadTooLarge { .. } | CommandError::SubscriberTooSlow { .. } => {
            Code::ResourceExhausted
        }
        CommandError::Overloaded(_)
        | CommandError::StoreUnavailable(_)
        | CommandError::PluginsLoading { .. }
        | CommandError::ShuttingDown { .. }
        | CommandError::AggregatePoisoned { .. } => Code::Unavailable,
        CommandError::Timeout(_) => Code::DeadlineExceeded,
        CommandError::PluginFailed { .. } | CommandError::Internal(_) => Code::Internal,
    }
}

/// An error as a gRPC status, with its code and details in the metadata.
pub fn status_of(e: &CommandError) -> Status {
    let mut status = Status::new(status_code_of(e), e.to_string());
    let metadata = status.metadata_mut();
    metadata.insert(ERROR_CODE_KEY, MetadataValue::from_static(e.code()));
    if let Some(details) = e.details()
        && let Ok(value) = MetadataValue::try_from(ascii_json(&details))
    {
        metadata.insert(ERROR_DETAILS_KEY, value);
    }
    status
}

/// JSON with every non-ASCII character escaped, as metadata values must be
/// ASCII.
fn ascii_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn error(e: CommandError) -> Status {
    status_of(&e)
}

/// The services, each behind the authentication interceptor, ready to be
/// added to a tonic server.
pub struct GrpcServices {
    /// `rehydra.v1.Commands`.
    pub commands: InterceptedService<CommandsServer<GrpcApi>, Authenticator>,
    /// `rehydra.v1.Aggregates`.
    pub aggregates: InterceptedService<AggregatesServer<GrpcApi>, Authenticator>,
    /// `rehydra.v1.Streams`.
    pub streams: InterceptedService<StreamsServer<GrpcApi>, Authenticator>,
    /// `rehydra.v1.Plugins`.
    pub plugins: InterceptedService<PluginsServer<GrpcApi>, Authenticator>,
    /// `rehydra.v1.Timers`.
    pub timers: InterceptedService<TimersServer<GrpcApi>, Authenticator>,
}

/// Builds the services over `context`.
pub fn services(context: ApiContext) -> GrpcServices {
    let auth = Authenticator {
        tokens: context.tokens.clone(),
    };
    // A command's payload may be up to the limit, plus the other fields.
    let max_message = context
        .max_command_bytes
        .saturating_add(64 * 1024)
        .max(4 << 20);
    let api = GrpcApi { context };
    GrpcServices {
        commands: InterceptedService::new(
            CommandsServer::new(api.clone()).max_decoding_message_size(max_message),
            auth.clone(),
        ),
        aggregates: InterceptedService::new(AggregatesServer::new(api.clone()), auth.clone()),
        streams: InterceptedService::new(StreamsServer::new(api.clone()), auth.clone()),
        plugins: InterceptedService::new(PluginsServer::new(api.clone()), auth.clone()),
        timers: InterceptedService::new(TimersServer::new(api), auth),
    }
}

/// Checks the bearer token in the `authorization` metadata when tokens are
/// configured, and puts the principal in the request's extensions.
#[derive(Clone)]
pub struct Authenticator {
    tokens: Option<std::sync::Arc<TokenFile>>,
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(request);
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let principal = tokens.authenticate(header).map_err(error)?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The implementation of every service.
#[derive(Clone)]
pub struct GrpcApi {
    context: ApiContext,
}

#[tonic::async_trait]
impl Commands for GrpcApi {
    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let principal = request.extensions().get::<Principal>().map(|p| p.0.clone());
        let r = request.into_inner();
        let data = command_payload(r.payload_json.as_bytes(), self.context.max_command_bytes)
            .map_err(error)?;
        let req = CommandRequest {
            aggregate_type: r.aggregate_type,
            aggregate_id: r.aggregate_id,
            command: r.command,
            data,
            expected_version: r.expected_version,
            idempotency_key: optional_id("idempotency_key", &r.idempotency_key).map_err(error)?,
            correlation_id: optional_id("correlation_id", &r.correlation_id).map_err(error)?,
            causation_id: optional_id("causation_id", &r.causation_id).map_err(error)?,
            principal,
            dry_run: r.dry_run,
            timer: None,
        };
        let outcome = self.context.aggregates.execute(req).await.map_err(error)?;
        Ok(Response::new(pb::ExecuteResponse {
            aggregate_type: outcome.aggregate_type,
            aggregate_id: outcome.id,
            version: outcome.version,
            events: outcome
                .events
                .into_iter()
                .map(|e| pb::CommandEvent {
                    event_type: e.event_type,
                    version: e.version,
                    data_json: e.data.to_string(),
                })
                .collect(),
            reply_json: outcome.reply.map(|r| r.to_string()),
            replayed: outcome.replayed,
            dry_run: outcome.dry_run,
            state_json: outcome.state.map(|s| s.to_string()),
        }))
    }
}

#[tonic::async_trait]
impl Aggregates for GrpcApi {
    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::AggregateState>, Status> {
        let r = request.into_inner();
        let state = self
            .context
            .aggregates
            .state(&r.aggregate_type, &r.aggregate_id)
            .await
            .map_err(error)?;
        Ok(Response::new(pb::AggregateState {
            aggregate_type: state.aggregate_type,
            aggregate_id: state.id,
            version: state.version,
            state_json: state.state.to_string(),
        }))
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Streams for GrpcApi {
    async fn read(
        &self,
        request: Request<pb::ReadStreamRequest>,
    ) -> Result<Response<pb::ReadStreamResponse>, Status> {
        let r = request.into_inner();
        let limit = (r.limit > 0).then_some(r.limit as usize);
        let events = read_stream_page(&self.context.aggregates, &r.stream, r.from_version, limit)
            .await
            .map_err(error)?;
        Ok(Response::new(pb::ReadStreamResponse {
            stream: r.stream,
            next_version: events.last().map(|e| e.version + 1),
            events: events.iter().map(recorded).collect(),
        }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<SubscribeStream>, Status> {
        use pb::subscribe_request::Start as PbStart;
        let r = request.into_inner();
        let start = match r.start {
            None | Some(PbStart::FromBeginning(_)) => Start::Beginning,
            Some(PbStart::FromEnd(_)) => Start::End,
            Some(PbStart::FromPosition(p)) => Start::Position(p),
        };
        let filter = Filter::new(r.categories, r.event_types).map_err(error)?;
        let subscription = self
            .context
            .subscriptions
            .subscribe(start, filter)
            .await
            .map_err(error)?;
        let messages = subscription.map(|item| {
            use pb::subscribe_response::Message;
            match item {
                Ok(Item::Event(e)) => Ok(pb::SubscribeResponse {
                    message: Some(Message::Event(recorded(&e))),
                }),
                Ok(Item::CaughtUp { position }) => Ok(pb::SubscribeResponse {
                    message: Some(Message::CaughtUp(pb::CaughtUp { position })),
                }),
                Err(e) => Err(status_of(&e)),
            }
        });
        Ok(Response::new(Box::pin(messages)))
    }
}

fn recorded(e: &RecordedEvent) -> pb::RecordedEvent {
    pb::RecordedEvent {
        stream: e.stream.clone(),
        version: e.version,
        position: e.position,
        event_id: e.event_id.to_string(),
        event_type: e.event_type.clone(),
        data_json: String::from_utf8_lossy(&e.data).into_owned(),
        metadata_json: String::from_utf8_lossy(&e.metadata).into_owned(),
    }
}

#[tonic::async_trait]
impl Timers for GrpcApi {
    async fn list(
        &self,
        request: Request<pb::ListTimersRequest>,
    ) -> Result<Response<pb::ListTimersResponse>, Status> {
        let r = request.into_inner();
        let aggregate = (!r.aggregate.is_empty()).then_some(r.aggregate.as_str());
        let limit = (r.limit != 0).then_some(r.limit as usize);
        let list = super::list_timers(&self.context, aggregate, limit).map_err(error)?;
        let aggregate_ref = |a: crate::plugin::AggregateRef| pb::AggregateRef {
            aggregate_type: a.aggregate_type,
            aggregate_id: a.id,
        };
        Ok(Response::new(pb::ListTimersResponse {
            count: list.count,
            timers: list
                .timers
                .into_iter()
                .map(|t| pb::PendingTimer {
                    payload_json: t.data.to_string(),
                    id: t.id,
                    key: t.key,
                    scheduled_by: Some(aggregate_ref(t.scheduled_by)),
                    target: Some(aggregate_ref(t.target)),
                    command: t.command,
                    due: t.due,
                    attempts: t.attempts,
                    last_error: t.last_error.unwrap_or_default(),
                    next_attempt: t.next_attempt.unwrap_or_default(),
                    scheduled_in: t.scheduled_in,
                    correlation_id: t.correlation_id,
                })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl Plugins for GrpcApi {
    async fn list(
        &self,
        _request: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        let registry = self.context.aggregates.plugins();
        let failures = registry.failures();
        let plugins = registry
            .list()
            .iter()
            .map(|p| {
                let health = p.quarantine_status();
                pb::Plugin {
                    name: p.name.clone(),
                    aggregate_type: p.info.aggregate_type.clone(),
                    stream_prefix: p.info.stream_prefix.clone(),
                    state_schema: p.info.state_schema,
                    commands: p
                        .info
                        .commands
                        .iter()
                        .map(|c| pb::CommandSpec {
                            name: c.name.clone(),
                            mode: match c.mode {
                                CommandMode::Create => pb::CommandMode::Create,
                                CommandMode::Update => pb::CommandMode::Update,
                                CommandMode::Upsert => pb::CommandMode::Upsert,
                            } as i32,
                        })
                        .collect(),
                    event_types: p.info.event_types.clone(),
                    hash: p.hash.clone(),
                    previous_hash: p.previous_hash.clone(),
                    size: p.size,
                    path: p.path.display().to_string(),
                    loaded_at: humantime::format_rfc3339_millis(p.loaded_at).to_string(),
                    last_error: failures
                        .iter()
                        .find(|f| f.path == p.path)
                        .map(|f| f.error.clone()),
                    consecutive_failures: health.consecutive_failures,
                    total_failures: health.total_failures,
                    quarantined_for_ms: health.quarantined_for_ms,
                    verification_json: p.verification().and_then(|r| serde_json::to_string(r).ok()),
                    refused_verification_json: registry
                        .refused_verification(&p.name)
                        .and_then(|r| serde_json::to_string(&r).ok()),
                }
            })
            .collect();
        let failed = failures
            .iter()
            .map(|f| pb::LoadFailure {
                path: f.path.display().to_string(),
                error: f.error.clone(),
            })
            .collect();
        let loading = registry
            .loading()
            .iter()
            .map(|p| pb::LoadingPlugin {
                path: p.path.display().to_string(),
                size: p.size,
                compiling_for_s: p.compiling_for_s(),
            })
            .collect();
        Ok(Response::new(pb::ListPluginsResponse {
            plugins,
            failed,
            loading,
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackPluginRequest>,
    ) -> Result<Response<pb::RollbackPluginResponse>, Status> {
        let name = request.into_inner().name;
        let done = self
            .context
            .aggregates
            .plugins()
            .rollback(&name)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(pb::RollbackPluginResponse {
            plugin: done.plugin,
            from_hash: done.from,
            to_hash: done.to,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes the end-to-end tests cannot provoke on demand map as the
    /// README's table says.
    #[test]
    fn every_code_has_its_status() {
        use std::time::Duration;
        let cases = [
            (
                CommandError::StoreUnavailable("down".into()),
                Code::Unavailable,
            ),
            (CommandError::Overloaded("full".into()), Code::Unavailable),
            (
                CommandError::PluginsLoading {
                    aggregate_type: "t".into(),
                    loading: "t.wasm".into(),
                },
                Code::Unavailable,
            ),
            (
                CommandError::ShuttingDown { resume_from: 7 },
                Code::Unavailable,
            ),
            (
                CommandError::SubscriberTooSlow {
                    buffer: 1,
                    waited: Duration::from_secs(1),
                    resume_from: 3,
                },
                Code::ResourceExhausted,
            ),
            (
                CommandError::Timeout(Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (CommandError::Internal("bug".into()), Code::Internal),
            (
                CommandError::IdempotencyKeyReused {
                    key: "k".into(),
                    earlier: "the command \"open\"".into(),
                },
                Code::InvalidArgument,
            ),
            (CommandError::NotFound("route".into()), Code::NotFound),
            (
                CommandError::Unauthenticated("no".into()),
                Code::Unauthenticated,
            ),
        ];
        for (e, code) in cases {
            let status = status_of(&e);
            assert_eq!(status.code(), code, "{e}");
            assert_eq!(status.metadata().get(ERROR_CODE_KEY).unwrap(), e.code());
        }
        let slow = status_of(&CommandError::SubscriberTooSlow {
            buffer: 1,
            waited: Duration::from_secs(1),
            resume_from: 3,
        });
        assert_eq!(
            slow.metadata().get(ERROR_DETAILS_KEY).unwrap(),
            r#"{"buffer":1,"resume_from":3}"#
        );
    }

    #[test]
    fn the_error_code_and_ascii_details_travel_in_the_metadata() {
        let e = CommandError::InvalidCommand(vec![crate::error::FieldError {
            field: "amount".into(),
            message: "doit être > 0".into(),
        }]);
        let status = status_of(&e);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.metadata().get(ERROR_CODE_KEY).unwrap(),
            "invalid_command"
        );
        let details = status
            .metadata()
            .get(ERROR_DETAILS_KEY)
            .unwrap()
            .to_str()
            .unwrap();
        let parsed: serde_json::Value = serde_json::from_str(details).unwrap();
        assert_eq!(parsed["fields"][0]["message"], "doit être > 0");
    }
}
