//! The HTTP API (axum); docs/http-api.md is its contract.
//!
//! - this file: the router, JSON errors, status, feedback, deletion, metrics;
//! - [`wal`]: serving committed WAL (`/wal` byte ranges and whole segments);
//! - [`auth`]: which token each endpoint needs (with `--auth-public-key`).
//!
//! Every error is JSON `{"error": "..."}`; a client's mistake is a 4xx,
//! never a 500.

mod auth;
mod wal;

pub use net::http_server::PeerAddr;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::metrics::TimelineGauges;
use super::registry::{BrokenTimeline, DeleteOutcome, TimelineHandle};
use super::{ServiceState, SHUTDOWN_TIMEOUT};
use postgres_wal::lsn::Lsn;
use safekeeper_api::api::TimelineStatus;
use safekeeper_protocol::ids::{TenantId, TimelineId};

/// The routes; served by [`net::http_server::serve`], which gives handlers
/// the client's address as `ConnectInfo<PeerAddr>`.
pub fn router(state: Arc<ServiceState>) -> Router {
    let timeline = "/v1/tenant/{tenant_id}/timeline/{timeline_id}";
    Router::new()
        .route("/v1/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/v1/status", get(node_status))
        .route("/v1/timelines", get(list_timelines))
        .route("/metrics", get(metrics))
        .route(timeline, get(timeline_status).delete(delete_timeline))
        .route(&format!("{timeline}/feedback"), post(feedback))
        .route(&format!("{timeline}/wal"), get(wal::get_wal))
        .route(&format!("{timeline}/segment/{{name}}"), get(wal::get_segment))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authorize))
        .layer(axum::middleware::map_response(errors_as_json))
        .with_state(state)
}

/// An error answer: status code and a message for the JSON body.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        utils::service::json_error(self.0, self.1)
    }
}

/// axum's own rejections (405 for a wrong method, a path or body it could
/// not decode) come as plain text: give every error the documented JSON form.
async fn errors_as_json(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (_, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_ERROR_TEXT_BYTES).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    ApiError::new(status, text).into_response()
}

/// Longest plain-text error body carried over into the JSON one.
const MAX_ERROR_TEXT_BYTES: usize = 4096;

/// The timeline named by the path, or a 400 (bad id) / 404 (unknown) /
/// 503 (it failed to load at startup; the error says why).
fn lookup(state: &ServiceState, tenant_id: &str, timeline_id: &str) -> Result<Arc<TimelineHandle>, ApiError> {
    let (tenant_id, timeline_id) = parse_ids(tenant_id, timeline_id)?;
    if let Some(broken) = state.timelines.get_broken(tenant_id, timeline_id) {
        let message = format!("timeline {tenant_id}/{timeline_id} failed to load at startup: {}", broken.error);
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message));
    }
    state.timelines.get(tenant_id, timeline_id).ok_or_else(|| unknown_timeline(tenant_id, timeline_id))
}

fn broken_json(broken: &BrokenTimeline) -> Value {
    json!({ "tenant_id": broken.tenant_id, "timeline_id": broken.timeline_id, "error": broken.error })
}

fn unknown_timeline(tenant_id: TenantId, timeline_id: TimelineId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("timeline {tenant_id}/{timeline_id} does not exist on this safekeeper"),
    )
}

fn parse_ids(tenant_id: &str, timeline_id: &str) -> Result<(TenantId, TimelineId), ApiError> {
    let bad_request = |e: safekeeper_protocol::ids::IdParseError| ApiError::bad_request(e.to_string());
    Ok((tenant_id.parse().map_err(bad_request)?, timeline_id.parse().map_err(bad_request)?))
}

/// Parse an LSN given by a client, naming the parameter in the error.
fn parse_lsn(name: &str, text: &str) -> Result<Lsn, ApiError> {
    text.parse().map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
}

async fn node_status(State(state): State<Arc<ServiceState>>) -> Json<Value> {
    let timelines: Vec<Value> = state
        .timelines
        .list()
        .iter()
        .map(|handle| {
            let snapshot = handle.snapshot();
            json!({
                "tenant_id": snapshot.tenant_id,
                "timeline_id": snapshot.timeline_id,
                "term": snapshot.term,
                "flush_lsn": snapshot.flush_lsn,
                "commit_lsn": snapshot.commit_lsn,
                "connected_proposers": handle.connected_proposers(),
            })
        })
        .collect();
    let broken: Vec<Value> = state.timelines.broken().iter().map(broken_json).collect();
    Json(json!({
        "node_id": state.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started_at.elapsed().as_secs(),
        "timelines": timelines,
        "broken_timelines": broken,
    }))
}

async fn list_timelines(State(state): State<Arc<ServiceState>>) -> Json<Value> {
    let ids: Vec<Value> = state
        .timelines
        .list()
        .iter()
        .map(|handle| {
            let snapshot = handle.snapshot();
            json!({ "tenant_id": snapshot.tenant_id, "timeline_id": snapshot.timeline_id })
        })
        .collect();
    Json(Value::Array(ids))
}

/// Everything an operator needs about one timeline.
/// The timeline status document: the owner's last snapshot plus what is
/// live (connections, consumers, peer recovery).
fn timeline_json(handle: &TimelineHandle) -> Json<TimelineStatus> {
    let mut status = handle.snapshot();
    status.connected_proposers = handle.connected_proposers();
    status.consumers = handle.consumers.list();
    status.peer_recovery =
        handle.shared.peer_recovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    Json(status)
}

async fn timeline_status(
    State(state): State<Arc<ServiceState>>,
    Path((tenant_id, timeline_id)): Path<(String, String)>,
) -> Result<Json<TimelineStatus>, ApiError> {
    let handle = lookup(&state, &tenant_id, &timeline_id)?;
    Ok(timeline_json(&handle))
}

#[derive(Deserialize)]
struct Feedback {
    remote_consistent_lsn: String,
}

async fn feedback(
    State(state): State<Arc<ServiceState>>,
    Path((tenant_id, timeline_id)): Path<(String, String)>,
    body: Result<Json<Feedback>, JsonRejection>,
) -> Result<Json<TimelineStatus>, ApiError> {
    let handle = lookup(&state, &tenant_id, &timeline_id)?;
    let Json(feedback) = body.map_err(|e| ApiError::bad_request(format!("feedback body: {}", e.body_text())))?;
    let lsn = parse_lsn("remote_consistent_lsn", &feedback.remote_consistent_lsn)?;
    // A consumer cannot have persisted WAL this safekeeper has not
    // committed: refuse it (409) rather than keep a position from nowhere.
    // A consumer that read from a peer further ahead sends it again later.
    let commit_lsn = handle.snapshot().commit_lsn;
    if lsn > commit_lsn {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "remote_consistent_lsn {lsn} is beyond this safekeeper's commit LSN {commit_lsn}; \
                 send it again once this safekeeper has committed that far"
            ),
        ));
    }
    handle.note_remote_consistent_lsn(lsn);
    Ok(timeline_json(&handle))
}

async fn delete_timeline(
    State(state): State<Arc<ServiceState>>,
    Path((tenant_id, timeline_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (tenant_id, timeline_id) = parse_ids(&tenant_id, &timeline_id)?;
    match state.timelines.delete(tenant_id, timeline_id, SHUTDOWN_TIMEOUT).await {
        Ok(DeleteOutcome::Deleted) => Ok(Json(json!({ "deleted": true }))),
        Ok(DeleteOutcome::NotFound) => Err(unknown_timeline(tenant_id, timeline_id)),
        Ok(DeleteOutcome::OwnerBusy) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the timeline's owner did not stop in time (a slow disk?); nothing was removed, retry",
        )),
        Err(error) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("deleting: {error:#}"))),
    }
}

async fn metrics(State(state): State<Arc<ServiceState>>) -> Response {
    let metrics = &state.timelines.metrics;
    for handle in state.timelines.list() {
        let s = handle.snapshot();
        let gauges = TimelineGauges {
            flush_lsn: s.flush_lsn.0,
            commit_lsn: s.commit_lsn.0,
            remote_consistent_lsn: s.remote_consistent_lsn.0,
            oldest_kept_lsn: s.oldest_kept_lsn.0,
            term: s.term.0,
            disk_bytes: s.disk_bytes,
            connected_proposers: handle.connected_proposers(),
            connected_consumers: handle.consumers.count(),
        };
        metrics.set_gauges(s.tenant_id, s.timeline_id, &gauges);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.encode()).into_response()
}
