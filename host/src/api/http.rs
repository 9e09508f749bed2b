//! HTTP/JSON API (axum).
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/aggregates/{type}/{id}/commands/{command}[?dry_run=true]` | run a command (or only report what it would do) |
//! | `GET /v1/aggregates/{type}/{id}` | an aggregate's state and version |
//! | `GET /v1/streams/{stream}?from=&limit=` | read a stream |
//! | `GET /v1/plugins` | loaded plugins and load failures |
//! | `POST /v1/plugins/reload` | rescan the plugin directory now |
//! | `GET /v1/plugins/{name}/versions` | the kept versions of a plugin, when each served, their reports |
//! | `POST /v1/plugins/{name}/rollback` | serve the previous version again |
//! | `GET /v1/subscribe?from=&category=&event_type=` | follow the event log (server-sent events) |
//! | `GET /healthz` | store reachability and counts (kept as it was) |
//! | `GET /livez` | liveness: the process serves |
//! | `GET /metrics` | Prometheus metrics (OpenMetrics text) |
//! | `GET /readyz` | readiness: plugins loaded and store reachable |
//!
//! Every response body is JSON, except the event stream of `/v1/subscribe`;
//! errors are `{"error":{"code":…,"message":…,"details":…}}` with the codes
//! of the error model ([`crate::error`]). With tokens configured, every route but
//! the probes (`/healthz`, `/livez`, `/readyz`) needs
//! `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_stream::StreamExt as _;

use super::{ApiContext, command_payload, json_or_text, read_stream_page};
use crate::auth::Principal;
use crate::command::{CommandRequest, validate_id};
use crate::error::CommandError;
use crate::store::RecordedEvent;
use crate::subscription::{Filter, Item, Start};

/// Settings of the HTTP API.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The largest accepted command body, in bytes.
    pub max_command_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_command_bytes: 1 << 20,
        }
    }
}

type AppState = ApiContext;

/// The API's router.
pub fn router(context: ApiContext) -> Router {
    let limit = context.max_command_bytes;
    Router::new()
        .route(
            "/v1/aggregates/{aggregate_type}/{id}/commands/{command}",
            post(execute),
        )
        .route("/v1/aggregates/{aggregate_type}/{id}", get(aggregate_state))
        .route("/v1/streams/{stream}", get(read_stream))
        .route("/v1/plugins", get(plugins))
        .route("/v1/plugins/reload", post(reload_plugins))
        .route("/v1/plugins/{name}/versions", get(plugin_versions))
        .route("/v1/plugins/{name}/rollback", post(rollback_plugin))
        .route("/v1/subscribe", get(subscribe))
        .route("/v1/timers", get(timers))
        .route("/v1/processes", get(processes))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            context.clone(),
            authenticate,
        ))
        .with_state(context)
}

/// Checks the bearer token when tokens are configured, and hands the
/// principal to the handlers. `/healthz` stays open: load balancers and
/// orchestrators probe it without credentials, and it tells nothing about
/// the data.
/// The routes that answer without a token.
const PROBES: [&str; 3] = ["/healthz", "/livez", "/readyz"];

async fn authenticate(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    // Probes stay open: load balancers and orchestrators carry no token.
    if let Some(tokens) = &app.tokens
        && !PROBES.contains(&request.uri().path())
    {
        let header = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match tokens.authenticate(header) {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
            }
            Err(e) => return ApiError(e).into_response(),
        }
    }
    next.run(request).await
}

/// An error as an HTTP response.
pub struct ApiError(pub CommandError);

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        ApiError(e)
    }
}

/// The HTTP status for an error code.
pub fn status_of(e: &CommandError) -> StatusCode {
    match e {
        CommandError::MalformedRequest(_) => StatusCode::BAD_REQUEST,
        CommandError::UnknownAggregateType(_)
        | CommandError::UnknownCommand { .. }
        | CommandError::AggregateNotFound { .. }
        | CommandError::NotFound(_) => StatusCode::NOT_FOUND,
        CommandError::AlreadyExists { .. } | CommandError::WrongExpectedVersion { .. } => {
            StatusCode::CONFLICT
        }
        CommandError::InvalidCommand(_)
        | CommandError::Rejected(_)
        | CommandError::TooManyTimers { .. }
        | CommandError::IdempotencyKeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        CommandError::Forbidden(_) => StatusCode::FORBIDDEN,
        CommandError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        CommandError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        CommandError::Overloaded(_)
        | CommandError::StoreUnavailable(_)
        | CommandError::SubscriberTooSlow { .. }
        | CommandError::ShuttingDown { .. }
        | CommandError::PluginsLoading { .. }
        | CommandError::AggregatePoisoned { .. } => StatusCode::SERVICE_UNAVAILABLE,
        CommandError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        CommandError::PluginFailed { .. } | CommandError::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = status_of(&e);
        let body = error_json(&e);
        let mut response = (status, axum::Json(json!({ "error": body }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Whole seconds, rounded up: a client that waits that long finds
            // the rest over.
            let seconds = e
                .retry_after()
                .map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                .max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"rehydra\""),
            );
        }
        response
    }
}

fn malformed(message: impl Into<String>) -> ApiError {
    ApiError(CommandError::MalformedRequest(message.into()))
}

fn path_error(e: PathRejection) -> ApiError {
    malformed(format!("bad path: {e}"))
}

/// The command route's query: `?dry_run=true`.
#[derive(Debug, Deserialize)]
struct CommandQuery {
    dry_run: Option<String>,
}

async fn execute(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    query: Result<Query<CommandQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((aggregate_type, id, command)) = path.map_err(path_error)?;
    let Query(query) = query.map_err(|e| {
        malformed(format!(
            "bad query: {e}; the only parameter is dry_run=true"
        ))
    })?;
    let dry_run = match query.dry_run.as_deref().map(str::trim) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(malformed(format!(
                "dry_run={other:?}: use dry_run=true (run handle and report, store nothing) or leave it out"
            )));
        }
    };
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError(CommandError::PayloadTooLarge {
                limit: app.max_command_bytes,
            })
        } else {
            malformed(format!("could not read the body: {e}"))
        }
    })?;
    let data = command_payload(&body, app.max_command_bytes)?;
    let req = CommandRequest {
        aggregate_type,
        aggregate_id: id,
        command,
        data,
        expected_version: expected_version(&headers)?,
        idempotency_key: id_header(&headers, "idempotency-key")?,
        correlation_id: id_header(&headers, "x-correlation-id")?,
        causation_id: id_header(&headers, "x-causation-id")?,
        principal: principal.map(|Extension(p)| p.0),
        dry_run,
        timer: None,
    };
    let outcome = app.aggregates.execute(req).await?;
    let etag = HeaderValue::from_str(&format!("\"{}\"", outcome.version)).ok();
    let mut response = axum::Json(outcome).into_response();
    if let Some(etag) = etag {
        response.headers_mut().insert(header::ETAG, etag);
    }
    Ok(response)
}

/// `If-Match: 3` or `If-Match: "3"` (the form our ETag has).
fn expected_version(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| malformed("If-Match must be ASCII"))?
        .trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    text.parse::<u64>().map(Some).map_err(|_| {
        malformed(format!("If-Match must be the aggregate's expected version, a whole number such as 3; got {text:?}"))
    })
}

fn id_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| malformed(format!("{name} must be printable ASCII")))?;
    validate_id(name, text)?;
    Ok(Some(text.to_string()))
}

async fn aggregate_state(
    State(app): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((aggregate_type, id)) = path.map_err(path_error)?;
    let state = app.aggregates.state(&aggregate_type, &id).await?;
    let etag = HeaderValue::from_str(&format!("\"{}\"", state.version)).ok();
    let mut response = axum::Json(state).into_response();
    if let Some(etag) = etag {
        response.headers_mut().insert(header::ETAG, etag);
    }
    Ok(response)
}

#[derive(Deserialize)]
struct StreamQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

async fn read_stream(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(stream) = path.map_err(path_error)?;
    let Query(q) =
        query.map_err(|e| malformed(format!("bad query: {e}; use ?from=VERSION&limit=N")))?;
    let events = read_stream_page(&app.aggregates, &stream, q.from.unwrap_or(1), q.limit).await?;
    let next = events.last().map(|e| e.version + 1);
    let events: Vec<serde_json::Value> = events.iter().map(event_json).collect();
    Ok(axum::Json(json!({ "stream": stream, "events": events, "next": next })).into_response())
}

#[derive(Deserialize)]
struct TimersQuery {
    aggregate: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/timers`: the pending timers, in the order they will be sent, with how many
/// there are; `?aggregate=TYPE/ID` keeps those the aggregate scheduled and
/// those for it.
async fn timers(
    State(app): State<AppState>,
    query: Result<Query<TimersQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        query.map_err(|e| malformed(format!("bad query: {e}; use ?aggregate=TYPE/ID&limit=N")))?;
    let list = crate::api::list_timers(&app, q.aggregate.as_deref(), q.limit)?;
    Ok(axum::Json(list).into_response())
}

/// `GET /v1/processes`: each process manager, what it follows, how far it
/// has read the log, and the events it parked.
async fn processes(State(app): State<AppState>) -> Result<Response, ApiError> {
    let list = crate::api::list_processes(&app)?;
    Ok(axum::Json(json!({ "processes": list })).into_response())
}

#[derive(Deserialize)]
struct SubscribeQuery {
    from: Option<String>,
    category: Option<String>,
    event_type: Option<String>,
}

/// `GET /v1/subscribe`: the event log as server-sent events. `event` events
/// carry one stored event each, with its global position as the SSE id, so
/// a reconnecting browser (`Last-Event-ID`) resumes right after it;
/// `caught-up` marks the switch to live; `error` ends the stream with a
/// code (for example `subscriber_too_slow`, whose details say where to
/// resume).
async fn subscribe(
    State(app): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<SubscribeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| {
        malformed(format!(
            "bad query: {e}; use ?from=POSITION|start|end&category=C1,C2&event_type=T1,T2"
        ))
    })?;
    let start = match headers.get("last-event-id") {
        Some(value) => {
            let last = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    malformed("Last-Event-ID must be a global position (a whole number)")
                })?;
            // The event after the last one seen; no event can follow the
            // largest position, so such an id was not one the host sent.
            let next = last.checked_add(1).ok_or_else(|| {
                malformed(format!(
                    "Last-Event-ID {last} is past every position the host can send; \
                     resume from the id of the last event received"
                ))
            })?;
            Start::Position(next)
        }
        None => parse_start(q.from.as_deref())?,
    };
    let filter = Filter::new(list(q.category), list(q.event_type))?;
    let subscription = app.subscriptions.subscribe(start, filter).await?;
    let events = subscription.map(|item| -> Result<Event, Infallible> {
        Ok(match item {
            Ok(Item::Event(e)) => Event::default()
                .event("event")
                .id(e.position.to_string())
                .data(event_json(&e).to_string()),
            Ok(Item::CaughtUp { position }) => Event::default()
                .event("caught-up")
                .data(json!({ "position": position }).to_string()),
            Err(e) => Event::default()
                .event("error")
                .data(error_json(&e).to_string()),
        })
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// `from=`: a global position, `start` (the default) or `end`.
fn parse_start(from: Option<&str>) -> Result<Start, ApiError> {
    match from.map(str::trim) {
        None | Some("") | Some("start") => Ok(Start::Beginning),
        Some("end") => Ok(Start::End),
        Some(n) => n.parse::<u64>().map(Start::Position).map_err(|_| {
            malformed(format!(
                "from={n:?}: use a global position (a whole number), start or end"
            ))
        }),
    }
}

/// A comma-separated query value as a list (absent or empty: none).
fn list(value: Option<String>) -> Vec<String> {
    value
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

/// A stored event as the subscription and stream APIs show it.
fn event_json(e: &RecordedEvent) -> serde_json::Value {
    json!({
        "stream": e.stream,
        "version": e.version,
        "position": e.position,
        "id": e.event_id,
        "type": e.event_type,
        "data": json_or_text(&e.data),
        "metadata": json_or_text(&e.metadata),
    })
}

/// The `error` object of the error model.
fn error_json(e: &CommandError) -> serde_json::Value {
    let mut body = json!({ "code": e.code(), "message": e.to_string() });
    if let Some(details) = e.details() {
        body["details"] = details;
    }
    body
}

async fn plugins(State(app): State<AppState>) -> Response {
    let registry = app.aggregates.plugins();
    let failures = registry.failures();
    let plugins: Vec<serde_json::Value> = registry
        .list()
        .iter()
        .map(|p| {
            // A failed reload of this plugin's file leaves this version serving.
            let last_error = failures
                .iter()
                .find(|f| f.path == p.path)
                .map(|f| f.error.clone());
            json!({
                "name": p.name,
                "aggregate_type": p.info.aggregate_type,
                "stream_prefix": p.info.stream_prefix,
                "state_schema": p.info.state_schema,
                "commands": p.info.commands,
                "event_types": p.info.event_types,
                "process": p.info.process,
                "hash": p.hash,
                "previous_hash": p.previous_hash,
                "size": p.size,
                "path": p.path,
                "loaded_at": humantime::format_rfc3339_millis(p.loaded_at).to_string(),
                "last_error": last_error,
                "health": p.quarantine_status(),
                // The check this version passed (or, under warn, failed)
                // before it served, and the last new version it refused.
                "verification": p.verification(),
                "refused_verification": registry.refused_verification(&p.name),
            })
        })
        .collect();
    let loading: Vec<serde_json::Value> = registry
        .loading()
        .iter()
        .map(|p| json!({ "path": p.path, "size": p.size, "compiling_for_s": p.compiling_for_s() }))
        .collect();
    axum::Json(json!({ "plugins": plugins, "failed": failures, "loading": loading }))
        .into_response()
}

/// `GET /v1/plugins/{name}/versions`.
async fn plugin_versions(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = path.map_err(path_error)?;
    let versions = app.aggregates.plugins().versions(&name);
    if versions.is_empty() {
        return Err(ApiError(CommandError::NotFound(format!(
            "no versions of a plugin named {name:?} are kept (GET /v1/plugins lists the plugins)"
        ))));
    }
    Ok(axum::Json(json!({ "plugin": name, "versions": versions })).into_response())
}

/// `POST /v1/plugins/{name}/rollback`.
async fn rollback_plugin(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = path.map_err(path_error)?;
    let done = app.aggregates.plugins().rollback(&name).await?;
    Ok(axum::Json(done).into_response())
}

async fn reload_plugins(State(app): State<AppState>) -> Result<Response, ApiError> {
    let report = app
        .aggregates
        .plugins()
        .rescan()
        .await
        .map_err(|e| ApiError(CommandError::Internal(format!("{e:#}"))))?;
    Ok(axum::Json(report).into_response())
}

async fn healthz(State(app): State<AppState>) -> Response {
    // The store's own quick check (a cheap read, no long retries).
    let store = app.aggregates.store();
    let (status, store_status) = match store.health().await {
        Ok(_) => (StatusCode::OK, "ok".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "degraded" },
        "store": { "backend": store.describe(), "status": store_status },
        "plugins": app.aggregates.plugins().list().len(),
        "plugins_loading": app.aggregates.plugins().loading().len(),
        "resident_aggregates": app.aggregates.resident(),
    });
    (status, axum::Json(body)).into_response()
}

/// `GET /metrics`: every `rehydra_…` metric, OpenMetrics text.
async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let footprint = app.aggregates.footprint();
    let snapshot = crate::metrics::Snapshot {
        resident_aggregates: footprint.resident,
        resident_state_bytes: footprint.state_bytes,
        mailbox_depth: footprint.queued,
        aggregates_poisoned: footprint.poisoned,
        subscriptions: app.subscriptions.open_count() as u64,
        subscription_lag_seconds: app.subscriptions.max_lag_seconds(),
        plugins: app
            .aggregates
            .plugins()
            .list()
            .iter()
            .map(|p| {
                let status = p.quarantine_status();
                crate::metrics::PluginFigures {
                    name: p.name.clone(),
                    quarantined: status.quarantined_for_ms > 0,
                    failures: status.total_failures,
                    queued_calls: p.queued_calls() as u64,
                    running_calls: p.running_calls() as u64,
                }
            })
            .collect(),
    };
    let text = crate::metrics::encode(&snapshot)
        .map_err(|e| ApiError(CommandError::Internal(format!("encoding the metrics: {e}"))))?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Liveness: the process serves HTTP. Nothing else is checked, so an
/// orchestrator does not restart a host because its database is away.
async fn livez() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// Readiness: send commands here. Every plugin file is loaded (none still
/// compiling) and the store answers its quick check; otherwise 503 with the
/// reasons, so a load balancer sends the traffic elsewhere meanwhile.
async fn readyz(State(app): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    let loading = app.aggregates.plugins().loading().len();
    if loading > 0 {
        reasons.push(format!("{loading} plugin file(s) still compiling"));
    }
    if let Err(e) = app.aggregates.store().health().await {
        reasons.push(format!("store: {e}"));
    }
    if reasons.is_empty() {
        axum::Json(json!({ "status": "ready" })).into_response()
    } else {
        let body = json!({ "status": "not_ready", "reasons": reasons });
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError(CommandError::NotFound(
        "no such route; the API is under /v1 (see GET /v1/plugins) and /healthz".into(),
    ))
}

async fn method_not_allowed() -> Response {
    let body = json!({ "error": { "code": "method_not_allowed", "message": "this route does not accept that method" } });
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}
