//! HTTP/JSON API (axum).
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/aggregates/{type}/{id}/commands/{command}` | run a command |
//! | `GET /v1/aggregates/{type}/{id}` | an aggregate's state and version |
//! | `GET /v1/streams/{stream}?from=&limit=` | read a stream |
//! | `GET /v1/plugins` | loaded plugins and load failures |
//! | `POST /v1/plugins/reload` | rescan the plugin directory now |
//! | `GET /healthz` | liveness and store reachability |
//!
//! Every response body is JSON; errors are
//! `{"error":{"code":…,"message":…,"details":…}}` with the codes of the
//! error model in DESIGN.md.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::actor::Aggregates;
use crate::command::{CommandRequest, MAX_ID_LEN, validate_id};
use crate::error::CommandError;

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

#[derive(Clone)]
struct AppState {
    aggregates: Aggregates,
    config: HttpConfig,
}

/// The API's router.
pub fn router(aggregates: Aggregates, config: HttpConfig) -> Router {
    let limit = config.max_command_bytes;
    Router::new()
        .route(
            "/v1/aggregates/{aggregate_type}/{id}/commands/{command}",
            post(execute),
        )
        .route("/v1/aggregates/{aggregate_type}/{id}", get(aggregate_state))
        .route("/v1/streams/{stream}", get(read_stream))
        .route("/v1/plugins", get(plugins))
        .route("/v1/plugins/reload", post(reload_plugins))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(AppState { aggregates, config })
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
        CommandError::InvalidCommand(_) | CommandError::Rejected(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        CommandError::Forbidden(_) => StatusCode::FORBIDDEN,
        CommandError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        CommandError::Overloaded(_)
        | CommandError::StoreUnavailable(_)
        | CommandError::PluginsLoading { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
        let mut body = json!({ "code": e.code(), "message": e.to_string() });
        if let Some(details) = e.details() {
            body["details"] = details;
        }
        let mut response = (status, axum::Json(json!({ "error": body }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
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

async fn execute(
    State(app): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((aggregate_type, id, command)) = path.map_err(path_error)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError(CommandError::PayloadTooLarge {
                limit: app.config.max_command_bytes,
            })
        } else {
            malformed(format!("could not read the body: {e}"))
        }
    })?;
    if body.len() > app.config.max_command_bytes {
        return Err(ApiError(CommandError::PayloadTooLarge {
            limit: app.config.max_command_bytes,
        }));
    }
    let data = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".to_vec()
    } else {
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| malformed(format!("the body is not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(malformed(
                "the body must be a JSON object (the command's fields)",
            ));
        }
        body.to_vec()
    };
    let req = CommandRequest {
        aggregate_type,
        aggregate_id: id,
        command,
        data,
        expected_version: expected_version(&headers)?,
        idempotency_key: id_header(&headers, "idempotency-key")?,
        correlation_id: id_header(&headers, "x-correlation-id")?,
        causation_id: id_header(&headers, "x-causation-id")?,
        principal: None,
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

/// Most events returned by one stream read.
const MAX_PAGE: usize = 1000;

async fn read_stream(
    State(app): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(stream) = path.map_err(path_error)?;
    let Query(q) =
        query.map_err(|e| malformed(format!("bad query: {e}; use ?from=VERSION&limit=N")))?;
    if stream.is_empty() || stream.len() > 2 * MAX_ID_LEN {
        return Err(malformed(
            "the stream name must be 1 to 256 characters long",
        ));
    }
    validate_id("stream name", &stream)?;
    let from = q.from.unwrap_or(1).max(1);
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let events = app
        .aggregates
        .store()
        .read_stream(&stream, from, limit)
        .await
        .map_err(CommandError::from)?;
    let events: Vec<serde_json::Value> = events
        .into_iter()
        .map(|e| {
            json!({
                "type": e.event_type,
                "version": e.version,
                "position": e.position,
                "id": e.event_id,
                "data": json_or_text(&e.data),
                "metadata": json_or_text(&e.metadata),
            })
        })
        .collect();
    let next = events
        .last()
        .and_then(|e| e["version"].as_u64())
        .map(|v| v + 1);
    Ok(axum::Json(json!({ "stream": stream, "events": events, "next": next })).into_response())
}

fn json_or_text(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
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
                "hash": p.hash,
                "previous_hash": p.previous_hash,
                "size": p.size,
                "path": p.path,
                "loaded_at": humantime::format_rfc3339_millis(p.loaded_at).to_string(),
                "last_error": last_error,
                "health": p.quarantine_status(),
            })
        })
        .collect();
    let loading: Vec<serde_json::Value> = registry
        .loading()
        .iter()
        .map(|p| {
            let secs = p.since.elapsed().map(|d| d.as_secs()).unwrap_or(0);
            json!({ "path": p.path, "size": p.size, "compiling_for_s": secs })
        })
        .collect();
    axum::Json(json!({ "plugins": plugins, "failed": failures, "loading": loading }))
        .into_response()
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

async fn not_found() -> ApiError {
    ApiError(CommandError::NotFound(
        "no such route; the API is under /v1 (see GET /v1/plugins) and /healthz".into(),
    ))
}

async fn method_not_allowed() -> Response {
    let body = json!({ "error": { "code": "method_not_allowed", "message": "this route does not accept that method" } });
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}
