//! HTTP requests to safekeepers (hyper 1, hyper-util's pooled client,
//! HTTPS through hyper-rustls when given a TLS config): timeline status, a
//! streamed WAL body, feedback.
//!
//! Every answer is checked before use; whatever a server sends that does not
//! fit the contract is a [`PullError`], which the caller treats as a failed
//! source. The WAL body is handed out chunk by chunk as it arrives and never
//! buffered whole: a response may be as large as the request's `end_lsn`
//! allows.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use postgres_wal::lsn::Lsn;

use crate::api::{
    error_message, feedback_body, HeaderError, SafekeeperAddress, TimelinePaths, TimelineStatus, WalResponseHeaders,
};

/// A status document is a few KiB; more is not a safekeeper talking.
const MAX_STATUS_BODY_BYTES: usize = 1 << 20;
/// Error bodies are read only for their message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Idle pooled connections are closed after this; a long poll runs every
/// second on the source, so its connection stays warm.
const POOL_IDLE_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("WAL from {start_lsn} is gone (410): {message}")]
    Gone { start_lsn: Lsn, message: String },
    #[error("unusable WAL response: {0}")]
    Header(#[from] HeaderError),
    #[error("reading the body: {0}")]
    Body(String),
    #[error("the body ended at {received_end_lsn}, short of x-end-lsn {end_lsn}")]
    ShortBody { received_end_lsn: Lsn, end_lsn: Lsn },
    #[error("the body runs past x-end-lsn {end_lsn}")]
    LongBody { end_lsn: Lsn },
    #[error("unusable status document: {0}")]
    Json(String),
    #[error("no complete answer within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
}

/// The TLS config of a plain-HTTP client's connector, which never uses it
/// (every URL it is given is "http://"): trusts nothing.
fn plaintext_placeholder_config() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// `error` and its sources on one line: hyper's own message ("client
/// error (Connect)") says little without them.
fn with_sources(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One client for every safekeeper of one timeline. Cloning shares the
/// connection pool.
#[derive(Clone, Debug)]
pub struct SafekeeperClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// "https" when the client was given a TLS config, else "http".
    scheme: &'static str,
    paths: TimelinePaths,
    /// Sent as `Authorization: Bearer`, read from the file at every
    /// request (a rotated token needs no restart).
    auth_token_file: Option<std::path::PathBuf>,
}

impl SafekeeperClient {
    /// Plain HTTP.
    pub fn new(paths: TimelinePaths, connect_timeout_ms: u64) -> SafekeeperClient {
        SafekeeperClient::with_tls(paths, connect_timeout_ms, None)
    }

    /// HTTPS only with `tls` (the CA it trusts and the host-name check it
    /// makes are the config's), plain HTTP without.
    pub fn with_tls(
        paths: TimelinePaths,
        connect_timeout_ms: u64,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> SafekeeperClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(connect_timeout_ms)));
        connector.set_nodelay(true);
        // hyper-rustls's connector refuses "http://" URLs once https-only.
        connector.enforce_http(false);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let connector = match tls {
            Some(config) => hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(Arc::unwrap_or_clone(config))
                .https_only()
                .enable_http1()
                .wrap_connector(connector),
            None => hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(plaintext_placeholder_config())
                .https_or_http()
                .enable_http1()
                .wrap_connector(connector),
        };
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(POOL_IDLE_TIMEOUT_MS))
            .build(connector);
        SafekeeperClient { http, scheme, paths, auth_token_file: None }
    }

    fn url(&self, address: &SafekeeperAddress, path: &str) -> String {
        address.url_with_scheme(self.scheme, path)
    }

    /// Present the token in `path` to safekeepers that check tokens.
    pub fn with_auth_token_file(mut self, path: Option<std::path::PathBuf>) -> SafekeeperClient {
        self.auth_token_file = path;
        self
    }

    /// One request; `json` is the body of a POST.
    async fn send(&self, method: Method, url: String, json: Option<String>) -> Result<Response<Incoming>, PullError> {
        let mut builder = Request::builder().method(method).uri(url);
        if let Some(path) = &self.auth_token_file {
            let token = auth::token::read_token_file(path).map_err(PullError::Request)?;
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match json {
            Some(text) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(text))
            }
            None => Full::default(),
        };
        let request = builder.body(body).map_err(|e| PullError::Request(with_sources(&e)))?;
        self.http.request(request).await.map_err(|e| PullError::Request(with_sources(&e)))
    }

    /// `GET /v1/tenant/{t}/timeline/{tl}`, all of it within `timeout_ms`.
    pub async fn timeline_status(
        &self,
        address: &SafekeeperAddress,
        timeout_ms: u64,
    ) -> Result<TimelineStatus, PullError> {
        let fetch = async {
            let url = self.url(address, &self.paths.status());
            let response = self.send(Method::GET, url, None).await?;
            let body = read_success_body(response, MAX_STATUS_BODY_BYTES).await?;
            serde_json::from_slice(&body).map_err(|e| PullError::Json(e.to_string()))
        };
        within(timeout_ms, fetch).await
    }

    /// `POST .../feedback` with `remote_consistent_lsn`, within `timeout_ms`.
    pub async fn send_feedback(
        &self,
        address: &SafekeeperAddress,
        remote_consistent_lsn: Lsn,
        timeout_ms: u64,
    ) -> Result<(), PullError> {
        let post = async {
            let url = self.url(address, &self.paths.feedback());
            let response = self.send(Method::POST, url, Some(feedback_body(remote_consistent_lsn))).await?;
            read_success_body(response, MAX_STATUS_BODY_BYTES).await.map(drop)
        };
        within(timeout_ms, post).await
    }

    /// `GET .../wal`: committed WAL from `start_lsn`, at most up to
    /// `limit_lsn`, long-polling up to `wait_ms` when there is none yet.
    /// Returns once the headers are in; the caller bounds the wait.
    pub async fn open_wal(
        &self,
        address: &SafekeeperAddress,
        start_lsn: Lsn,
        limit_lsn: Lsn,
        wait_ms: u64,
    ) -> Result<WalBody, PullError> {
        let url = self.url(address, &self.paths.wal(start_lsn, limit_lsn, wait_ms));
        let response = self.send(Method::GET, url, None).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::GONE => {
                let message = read_error_message(response).await;
                return Err(PullError::Gone { start_lsn, message });
            }
            status => {
                let message = read_error_message(response).await;
                return Err(PullError::Status { status: status.as_u16(), message });
            }
        }
        let headers = WalResponseHeaders::parse(response.headers(), start_lsn, limit_lsn)?;
        Ok(WalBody { headers, body: response.into_body(), next_lsn: start_lsn })
    }
}

/// Run `request` within `timeout_ms`.
async fn within<T>(
    timeout_ms: u64,
    request: impl std::future::Future<Output = Result<T, PullError>>,
) -> Result<T, PullError> {
    tokio::time::timeout(Duration::from_millis(timeout_ms), request)
        .await
        .unwrap_or(Err(PullError::Timeout { timeout_ms }))
}

async fn read_success_body(response: Response<Incoming>, limit_bytes: usize) -> Result<Bytes, PullError> {
    let status = response.status();
    if status != StatusCode::OK {
        let message = read_error_message(response).await;
        return Err(PullError::Status { status: status.as_u16(), message });
    }
    let collected = Limited::new(response.into_body(), limit_bytes)
        .collect()
        .await
        .map_err(|e| PullError::Body(with_sources(e.as_ref())))?;
    Ok(collected.to_bytes())
}

/// The message of an error response; a body that cannot be read becomes
/// part of the message rather than hiding the status code.
async fn read_error_message(response: Response<Incoming>) -> String {
    match Limited::new(response.into_body(), MAX_ERROR_BODY_BYTES).collect().await {
        Ok(collected) => error_message(&collected.to_bytes()),
        Err(e) => format!("(body unreadable: {})", with_sources(e.as_ref())),
    }
}

/// One WAL request in flight: first its headers, then its body, as events.
pub struct WalPull {
    stage: PullStage,
}

enum PullStage {
    Opening(Pin<Box<dyn Future<Output = Result<WalBody, PullError>> + Send>>),
    Streaming(WalBody),
    Complete,
    /// The request failed; its future must not be polled again.
    Failed,
}

/// What a [`WalPull`] produced next.
#[derive(Debug)]
pub enum WalEvent {
    /// The headers checked out; the body follows.
    Opened(WalResponseHeaders),
    /// The next body bytes.
    Chunk(Bytes),
    /// The body ended exactly at `x-end-lsn`.
    Complete,
}

impl WalPull {
    /// Send `GET .../wal` (see [`SafekeeperClient::open_wal`]).
    pub fn start(
        client: &SafekeeperClient,
        address: &SafekeeperAddress,
        start_lsn: Lsn,
        limit_lsn: Lsn,
        wait_ms: u64,
    ) -> WalPull {
        let (client, address) = (client.clone(), address.clone());
        let open = async move { client.open_wal(&address, start_lsn, limit_lsn, wait_ms).await };
        WalPull { stage: PullStage::Opening(Box::pin(open)) }
    }

    /// The next event. Cancel safe: the request lives in `self`, so a
    /// `select!` that drops this future loses nothing.
    pub async fn next(&mut self) -> Result<WalEvent, PullError> {
        match &mut self.stage {
            PullStage::Opening(open) => match open.as_mut().await {
                Ok(body) => {
                    let headers = body.headers();
                    self.stage = PullStage::Streaming(body);
                    Ok(WalEvent::Opened(headers))
                }
                Err(error) => {
                    self.stage = PullStage::Failed;
                    Err(error)
                }
            },
            PullStage::Streaming(body) => match body.next_chunk().await? {
                Some(bytes) => Ok(WalEvent::Chunk(bytes)),
                None => {
                    self.stage = PullStage::Complete;
                    Ok(WalEvent::Complete)
                }
            },
            PullStage::Complete => Ok(WalEvent::Complete),
            PullStage::Failed => Err(PullError::Request("this request already failed".to_string())),
        }
    }
}

/// A WAL response whose headers checked out; the body arrives by chunks.
#[derive(Debug)]
pub struct WalBody {
    headers: WalResponseHeaders,
    body: Incoming,
    /// LSN of the next body byte.
    next_lsn: Lsn,
}

impl WalBody {
    pub fn headers(&self) -> WalResponseHeaders {
        self.headers
    }

    /// The next non-empty chunk, starting at [`WalBody::next_lsn`];
    /// `None` once the body ended exactly at `x-end-lsn`. A chunk that would
    /// run past `x-end-lsn` is an error and none of it is returned: bytes
    /// past what the safekeeper promised as committed are never decoded.
    ///
    /// Cancel safe: the only await is the read of one frame, and state
    /// changes only after it completed.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, PullError> {
        let end_lsn = self.headers.end_lsn;
        loop {
            let Some(frame) = self.body.frame().await else {
                if self.next_lsn < end_lsn {
                    return Err(PullError::ShortBody { received_end_lsn: self.next_lsn, end_lsn });
                }
                return Ok(None);
            };
            let frame = frame.map_err(|e| PullError::Body(with_sources(&e)))?;
            // Trailers carry nothing for us.
            let Ok(data) = frame.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            if end_lsn - self.next_lsn < data.len() as u64 {
                return Err(PullError::LongBody { end_lsn });
            }
            self.next_lsn = self.next_lsn + data.len() as u64;
            return Ok(Some(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode as AxumStatus;
    use axum::response::{IntoResponse, Response as AxumResponse};
    use axum::routing::get;
    use axum::Router;

    const TENANT: &str = "0123456789abcdef0123456789abcdef";
    const TIMELINE: &str = "fedcba9876543210fedcba9876543210";

    fn paths() -> TimelinePaths {
        TimelinePaths { tenant_id: TENANT.parse().unwrap(), timeline_id: TIMELINE.parse().unwrap() }
    }

    /// Serve `answer` for every WAL request and `status_body` for the
    /// status, on a free loopback port.
    async fn serve(answer: fn() -> AxumResponse, status_body: &'static str) -> SafekeeperAddress {
        let timeline = format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}");
        let app = Router::new()
            .route(&format!("{timeline}/wal"), get(move || async move { answer() }))
            .route(&timeline, get(move || async move { status_body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        address
    }

    fn wal_answer(end_lsn: &str, body: Vec<u8>) -> AxumResponse {
        AxumResponse::builder()
            .header("x-start-lsn", "0/100")
            .header("x-end-lsn", end_lsn)
            .header("x-commit-lsn", "0/1000")
            .body(Body::from_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(body))])))
            .unwrap()
    }

    /// Pull every event until the end or an error; the chunks delivered.
    async fn pull_all(address: &SafekeeperAddress) -> (Vec<u8>, Result<(), PullError>) {
        let client = SafekeeperClient::new(paths(), 1000);
        let mut pull = WalPull::start(&client, address, Lsn(0x100), Lsn(0x10000), 0);
        let mut delivered = Vec::new();
        loop {
            match pull.next().await {
                Ok(WalEvent::Opened(_)) => {}
                Ok(WalEvent::Chunk(bytes)) => delivered.extend_from_slice(&bytes),
                Ok(WalEvent::Complete) => return (delivered, Ok(())),
                Err(error) => return (delivered, Err(error)),
            }
        }
    }

    #[tokio::test]
    async fn a_body_of_exactly_the_promised_length_completes() {
        let address = serve(|| wal_answer("0/110", vec![7; 16]), "{}").await;
        let (delivered, outcome) = pull_all(&address).await;
        outcome.unwrap();
        assert_eq!(delivered, vec![7; 16]);
    }

    /// Bytes past `x-end-lsn` might be uncommitted: none of them is handed out.
    #[tokio::test]
    async fn a_body_longer_than_promised_is_an_error_and_not_delivered() {
        let address = serve(|| wal_answer("0/110", vec![7; 20]), "{}").await;
        let (delivered, outcome) = pull_all(&address).await;
        assert!(matches!(outcome, Err(PullError::LongBody { end_lsn: Lsn(0x110) })), "{outcome:?}");
        assert!(delivered.is_empty());
    }

    #[tokio::test]
    async fn a_body_shorter_than_promised_is_an_error() {
        let address = serve(|| wal_answer("0/120", vec![7; 16]), "{}").await;
        let (delivered, outcome) = pull_all(&address).await;
        let error = outcome.unwrap_err();
        assert!(matches!(error, PullError::ShortBody { received_end_lsn: Lsn(0x110), end_lsn: Lsn(0x120) }), "{error}");
        assert_eq!(delivered.len(), 16, "the bytes that did arrive are good and kept");
    }

    #[tokio::test]
    async fn malformed_headers_gone_and_other_statuses_are_errors() {
        let address = serve(|| wal_answer("0/1G0", vec![]), "{}").await;
        let (_, outcome) = pull_all(&address).await;
        assert!(matches!(outcome, Err(PullError::Header(HeaderError::Malformed { .. }))), "{outcome:?}");

        let gone = || (AxumStatus::GONE, r#"{"error": "WAL below 0/200 was removed"}"#).into_response();
        let (_, outcome) = pull_all(&serve(gone, "{}").await).await;
        let error = outcome.unwrap_err();
        assert!(matches!(&error, PullError::Gone { message, .. } if message == "WAL below 0/200 was removed"));

        let busy = || (AxumStatus::SERVICE_UNAVAILABLE, r#"{"error": "shutting down"}"#).into_response();
        let (_, outcome) = pull_all(&serve(busy, "{}").await).await;
        assert_eq!(outcome.unwrap_err().to_string(), "answered 503: shutting down");
    }

    #[tokio::test]
    async fn a_garbled_status_document_is_an_error() {
        let address = serve(|| AxumStatus::OK.into_response(), r#"{"commit_lsn": "nope"}"#).await;
        let client = SafekeeperClient::new(paths(), 1000);
        let error = client.timeline_status(&address, 1000).await.unwrap_err();
        assert!(matches!(error, PullError::Json(_)), "{error}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_that_names_the_cause() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address: SafekeeperAddress = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let (_, outcome) = pull_all(&address).await;
        let error = outcome.unwrap_err();
        assert!(error.to_string().contains("Connection refused"), "{error}");
    }
}
