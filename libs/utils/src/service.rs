//! Logging setup shared by the binaries, the error body of their HTTP
//! ports, and how those ports check a bearer token.

use std::io::IsTerminal;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Log to stderr with `RUST_LOG` as the filter (default `info`). Colours
/// only when a person watches (stderr is a terminal): log files and test
/// harnesses read plain text.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// SIGHUP: read `--auth-public-key` again (safekeeper, shim), saying in the
/// log what came of it; a file that does not load keeps the keys there are.
pub fn reload_token_keys(verifier: &auth::TokenVerifier) {
    match verifier.reload() {
        Ok(keys) => tracing::info!(keys, "SIGHUP: token keys reloaded"),
        Err(error) => tracing::error!("SIGHUP: token keys not reloaded, the old ones stay: {error}"),
    }
}

/// The error document every HTTP port answers with: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// An HTTP error response: the status and [`ErrorBody`] as JSON.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: message.into() })).into_response()
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, auth::TokenError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Err(auth::TokenError::Missing) };
    let value =
        value.to_str().map_err(|_| auth::TokenError::Malformed("the Authorization header is not text".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err(auth::TokenError::Malformed("expected `Authorization: Bearer <token>`".into())),
    }
}

/// Whether a request with `headers` may do `access` on a port checking
/// tokens with `verifier` (`None`: it checks none): `None` if so, else the
/// refusal to answer with: 401 for a missing or bad token (with the
/// challenge RFC 6750 asks for), 403 for one that may not do this.
pub fn refusal(verifier: Option<&auth::TokenVerifier>, headers: &HeaderMap, access: auth::Access) -> Option<Response> {
    let verifier = verifier?;
    if access == auth::Access::Open {
        return None;
    }
    let claims = match bearer_token(headers).and_then(|token| verifier.verify(token)) {
        Ok(claims) => claims,
        Err(error) => {
            let mut response = json_error(StatusCode::UNAUTHORIZED, error.to_string());
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return Some(response);
        }
    };
    access.check(Some(&claims)).err().map(|denied| json_error(StatusCode::FORBIDDEN, denied.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), Err(auth::TokenError::Missing));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(matches!(bearer_token(&headers), Err(auth::TokenError::Malformed(_))));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer a.b.c"));
        assert_eq!(bearer_token(&headers), Ok("a.b.c"));
    }

    #[test]
    fn error_body_is_the_documented_json() {
        let body = serde_json::to_value(ErrorBody { error: "no such endpoint".into() }).unwrap();
        assert_eq!(body, serde_json::json!({ "error": "no such endpoint" }));
    }
}
