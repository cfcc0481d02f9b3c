//! The shim's HTTP port (JSON, LSNs as "X/Y"):
//! - `GET /v1/status`: the shim and its proposer;
//! - `GET /v1/membership`: the safekeeper configuration and a change under way;
//! - `POST /v1/membership` `{"safekeepers": ["host:port", ...]}`: change the
//!   safekeeper set (docs/operations.md, "Changing the safekeeper set").
//!
//! With `--auth-public-key` every request needs a token (docs/security.md):
//! reading needs one that may read this tenant's timeline status, a
//! membership change an `admin` one.

use axum::extract::rejection::JsonRejection;
use std::sync::Arc;

use auth::Access;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::{MembershipRequest, ShimStatus};
use crate::proposer::MembershipRequestError;
use safekeeper_protocol::ids::TenantId;

#[derive(Clone)]
struct HttpState {
    status: watch::Receiver<ShimStatus>,
    membership_requests: mpsc::Sender<MembershipRequest>,
    access: HttpAccess,
}

/// Who may call this port.
#[derive(Clone)]
pub struct HttpAccess {
    pub verifier: Option<Arc<auth::TokenVerifier>>,
    /// The shim's tenant: the one a `tenant` token must be for.
    pub tenant_id: TenantId,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembershipBody {
    safekeepers: Vec<String>,
}

pub fn router(
    status: watch::Receiver<ShimStatus>,
    membership_requests: mpsc::Sender<MembershipRequest>,
    access: HttpAccess,
) -> Router {
    let state = HttpState { status, membership_requests, access };
    Router::new()
        .route("/v1/status", get(shim_status))
        .route("/v1/membership", get(membership).post(change_membership))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Reads need the right to this tenant's timeline status; anything else
/// (a membership change, an unknown path) an `admin` token.
async fn authorize(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let access = match (request.method(), request.uri().path()) {
        (&Method::GET, "/v1/status" | "/v1/membership") => Access::TimelineStatus(state.access.tenant_id),
        _ => Access::NodeAdmin,
    };
    match utils::service::refusal(state.access.verifier.as_deref(), request.headers(), access) {
        None => next.run(request).await,
        Some(refusal) => refusal,
    }
}

fn error(code: StatusCode, message: String) -> Response {
    utils::service::json_error(code, message)
}

async fn shim_status(State(state): State<HttpState>) -> Json<ShimStatus> {
    Json(state.status.borrow().clone())
}

async fn membership(State(state): State<HttpState>) -> Response {
    Json(state.status.borrow().proposer.membership.clone()).into_response()
}

/// Taken (202) once the proposer has recorded the request; the change then
/// runs on its own and `GET /v1/membership` shows it. Repeating a request
/// is safe at any time.
async fn change_membership(
    State(state): State<HttpState>,
    body: Result<Json<MembershipBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(body)) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let (reply, answer) = oneshot::channel();
    let request = MembershipRequest { safekeepers: body.safekeepers, reply };
    let unavailable = || {
        let message = "the shim is not running a term (stopping, or waiting for Postgres); retry".to_string();
        error(StatusCode::SERVICE_UNAVAILABLE, message)
    };
    if state.membership_requests.try_send(request).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "too many membership requests at once; retry".into());
    }
    match answer.await {
        Ok(Ok(status)) => (StatusCode::ACCEPTED, Json(status)).into_response(),
        Ok(Err(refused @ MembershipRequestError::Invalid(_))) => error(StatusCode::BAD_REQUEST, refused.to_string()),
        Ok(Err(refused @ MembershipRequestError::ChangeInProgress { .. })) => {
            error(StatusCode::CONFLICT, refused.to_string())
        }
        Err(_) => unavailable(),
    }
}
