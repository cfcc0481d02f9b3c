//! The shim's HTTP port: `GET /v1/status` (JSON, LSNs as "X/Y").

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

use super::ShimStatus;

pub fn router(status: watch::Receiver<ShimStatus>) -> Router {
    Router::new()
        .route("/v1/status", get(shim_status))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({ "error": "no such endpoint" }))) })
        .with_state(status)
}

async fn shim_status(State(status): State<watch::Receiver<ShimStatus>>) -> Json<ShimStatus> {
    Json(status.borrow().clone())
}
