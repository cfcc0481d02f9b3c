//! Who may call which endpoint (docs/security.md): the method and path of a
//! request mapped onto an [`Access`], checked against its bearer token
//! before any handler runs. Paths the table does not know need an `admin`
//! token (denied by default, so a new endpoint is never open by accident).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use auth::Access;
use safekeeper_protocol::ids::TenantId;

use super::ServiceState;

/// The operation a request is, by method and path; or the 400 message for
/// a tenant id that does not parse (a clear error whatever the token;
/// nothing is served for it).
pub fn access_for(method: &Method, path: &str) -> Result<Access, String> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    Ok(match (method, segments.as_slice()) {
        (&Method::GET, ["metrics"] | ["v1", "healthz"]) => Access::Open,
        (&Method::GET, ["v1", "status"]) => Access::NodeStatus,
        (_, ["v1", "tenant", tenant_id, "timeline", _, rest @ ..]) => {
            let tenant_id = tenant_id.parse::<TenantId>().map_err(|e| e.to_string())?;
            match (method, rest) {
                (&Method::GET, []) => Access::TimelineStatus(tenant_id),
                (&Method::DELETE, []) => Access::DeleteTimeline(tenant_id),
                (&Method::POST, ["feedback"]) => Access::Feedback(tenant_id),
                (&Method::GET, ["wal"] | ["segment", _]) => Access::ReadWal(tenant_id),
                _ => Access::NodeAdmin,
            }
        }
        _ => Access::NodeAdmin,
    })
}

/// Check the request's token against the endpoint's row of the table.
pub async fn authorize(State(state): State<Arc<ServiceState>>, request: Request, next: Next) -> Response {
    let access = match access_for(request.method(), request.uri().path()) {
        Ok(access) => access,
        Err(message) => return super::ApiError::bad_request(message).into_response(),
    };
    match utils::service::refusal(state.auth.as_ref(), request.headers(), access) {
        None => next.run(request).await,
        Some(refusal) => refusal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0123456789abcdef0123456789abcdef";

    /// Every route of the router, and what it takes.
    #[test]
    fn every_endpoint_maps_to_its_access() {
        let tenant: TenantId = T.parse().unwrap();
        let timeline = format!("/v1/tenant/{T}/timeline/fedcba9876543210fedcba9876543210");
        let cases = [
            (Method::GET, "/metrics".to_string(), Access::Open),
            (Method::GET, "/v1/healthz".to_string(), Access::Open),
            (Method::GET, "/v1/status".to_string(), Access::NodeStatus),
            (Method::GET, "/v1/timelines".to_string(), Access::NodeAdmin),
            (Method::GET, timeline.clone(), Access::TimelineStatus(tenant)),
            (Method::DELETE, timeline.clone(), Access::DeleteTimeline(tenant)),
            (Method::POST, format!("{timeline}/feedback"), Access::Feedback(tenant)),
            (Method::GET, format!("{timeline}/wal"), Access::ReadWal(tenant)),
            (Method::GET, format!("{timeline}/segment/000000010000000000000001"), Access::ReadWal(tenant)),
            // Not in the table: admin only.
            (Method::POST, "/metrics".to_string(), Access::NodeAdmin),
            (Method::PUT, timeline.clone(), Access::NodeAdmin),
            (Method::GET, "/v2/anything".to_string(), Access::NodeAdmin),
        ];
        for (method, path, expected) in cases {
            assert_eq!(access_for(&method, &path), Ok(expected), "{method} {path}");
        }
        let malformed = access_for(&Method::GET, "/v1/tenant/not-hex/timeline/x").unwrap_err();
        assert!(malformed.contains("not-hex") || malformed.contains("hex"), "{malformed}");
    }
}
