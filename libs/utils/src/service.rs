//! Logging setup shared by the binaries, and the error body of their HTTP
//! ports.

use std::io::IsTerminal;

use axum::http::StatusCode;
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

/// The error document every HTTP port answers with: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// An HTTP error response: the status and [`ErrorBody`] as JSON.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: message.into() })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_the_documented_json() {
        let body = serde_json::to_value(ErrorBody { error: "no such endpoint".into() }).unwrap();
        assert_eq!(body, serde_json::json!({ "error": "no such endpoint" }));
    }
}
