//! The HTTP status API (axum): node status and one timeline's status.
//! Every error is JSON `{"error": "..."}` with a fitting status code.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::ServiceState;
use crate::ids::{TenantId, TimelineId};

pub fn router(state: Arc<ServiceState>) -> Router {
    Router::new()
        .route("/v1/status", get(node_status))
        .route("/v1/tenant/{tenant_id}/timeline/{timeline_id}", get(timeline_status))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".to_string()) })
        .with_state(state)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
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
    Json(json!({
        "node_id": state.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started_at.elapsed().as_secs(),
        "timelines": timelines,
    }))
}

async fn timeline_status(
    State(state): State<Arc<ServiceState>>,
    Path((tenant_id, timeline_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let bad_request = |e: crate::ids::IdParseError| ApiError(StatusCode::BAD_REQUEST, e.to_string());
    let tenant_id: TenantId = tenant_id.parse().map_err(bad_request)?;
    let timeline_id: TimelineId = timeline_id.parse().map_err(bad_request)?;
    let handle = state.timelines.get(tenant_id, timeline_id).ok_or_else(|| {
        ApiError(StatusCode::NOT_FOUND, format!("timeline {tenant_id}/{timeline_id} does not exist on this safekeeper"))
    })?;
    let mut body = serde_json::to_value(handle.snapshot())
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    body["connected_proposers"] = json!(handle.connected_proposers());
    Ok(Json(body))
}
