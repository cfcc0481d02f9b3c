//! Who may call which endpoint (docs/security.md): the method and path of a
//! request mapped onto an [`Access`], checked against its bearer token
//! before any handler runs. Paths the table does not know need an `admin`
//! token (denied by default, so a new endpoint is never open by accident).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use auth::{Access, TokenError};
use safekeeper_protocol::ids::TenantId;

use super::{ApiError, ServiceState};

/// The operation a request is, by method and path.
pub fn access_for(method: &Method, path: &str) -> Access {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let tenant = |text: &str| text.parse::<TenantId>().ok();
    match (method, segments.as_slice()) {
        (&Method::GET, ["metrics"] | ["v1", "healthz"]) => Access::Open,
        (&Method::GET, ["v1", "status"]) => Access::NodeStatus,
        (_, ["v1", "tenant", tenant_id, "timeline", _, rest @ ..]) => match (tenant(tenant_id), method, rest) {
            (Some(tenant_id), &Method::GET, []) => Access::TimelineStatus(tenant_id),
            (Some(tenant_id), &Method::DELETE, []) => Access::DeleteTimeline(tenant_id),
            (Some(tenant_id), &Method::POST, ["feedback"]) => Access::Feedback(tenant_id),
            (Some(tenant_id), &Method::GET, ["wal"] | ["segment", _]) => Access::ReadWal(tenant_id),
            _ => Access::NodeAdmin,
        },
        _ => Access::NodeAdmin,
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer_token(headers: &HeaderMap) -> Result<&str, TokenError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Err(TokenError::Missing) };
    let value = value.to_str().map_err(|_| TokenError::Malformed("the Authorization header is not text".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err(TokenError::Malformed("expected `Authorization: Bearer <token>`".into())),
    }
}

/// 401 for a missing or bad token (with the challenge RFC 6750 asks for),
/// 403 for one that may not do this.
pub async fn authorize(State(state): State<Arc<ServiceState>>, request: Request, next: Next) -> Response {
    let Some(verifier) = &state.auth else { return next.run(request).await };
    let access = access_for(request.method(), request.uri().path());
    if access != Access::Open {
        let claims = match bearer_token(request.headers()).and_then(|token| verifier.verify(token)) {
            Ok(claims) => claims,
            Err(error) => {
                let mut response = ApiError::new(StatusCode::UNAUTHORIZED, error.to_string()).into_response();
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        };
        if let Err(denied) = access.check(Some(&claims)) {
            return ApiError::new(StatusCode::FORBIDDEN, denied.to_string()).into_response();
        }
    }
    next.run(request).await
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
            (Method::GET, "/v1/tenant/not-hex/timeline/x".to_string(), Access::NodeAdmin),
            (Method::GET, "/v2/anything".to_string(), Access::NodeAdmin),
        ];
        for (method, path, expected) in cases {
            assert_eq!(access_for(&method, &path), expected, "{method} {path}");
        }
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), Err(TokenError::Missing));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(matches!(bearer_token(&headers), Err(TokenError::Malformed(_))));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer a.b.c"));
        assert_eq!(bearer_token(&headers), Ok("a.b.c"));
    }
}
