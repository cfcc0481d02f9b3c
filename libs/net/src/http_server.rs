//! The accept loop of every HTTP port (safekeeper, shim, page server stub):
//! axum's router behind hyper's HTTP/1 server, with what `axum::serve`
//! does not give:
//!
//! - **TLS** ([`ServerTls`]), reloadable; with a certificate configured a
//!   connection that does not start a TLS handshake is answered 400 and
//!   closed, unless plaintext is allowed (`--allow-plaintext`), in which
//!   case the same port serves both;
//! - **a connection cap**: one past `max_connections` is closed at once, so
//!   idle or slow clients cannot take every file descriptor;
//! - **a header-read timeout**: a request's head (and a TLS handshake) must
//!   arrive within `header_read_timeout`, so a client that opens a
//!   connection and sends half a request does not hold its slot forever;
//!   the head is capped at [`MAX_REQUEST_HEAD_BYTES`];
//! - **a write-stall timeout** ([`StallGuard`]) for clients that stop
//!   reading a response.
//!
//! Handlers see the client's address as `ConnectInfo<PeerAddr>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower_service::Service;

use crate::stall_guard::StallGuard;
use crate::stream::Stream;
use crate::tls::ServerTls;

/// The default time a request head may take to arrive.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response write may make no progress before the connection
/// is dropped (a reader that stopped, a peer that vanished without a FIN).
pub const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head (request line and headers) read; hyper answers a
/// larger one with 431.
pub const MAX_REQUEST_HEAD_BYTES: usize = 64 << 10;
/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The client's address, for handlers (`ConnectInfo<PeerAddr>`).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

#[derive(Clone)]
pub struct HttpServerOptions {
    /// Serve HTTPS with this certificate.
    pub tls: Option<Arc<ServerTls>>,
    /// With `tls`: also serve plain HTTP on the same port.
    pub allow_plaintext: bool,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_stall_timeout: Duration,
}

impl HttpServerOptions {
    /// Plain HTTP with the default limits.
    pub fn plain(max_connections: usize) -> Self {
        HttpServerOptions {
            tls: None,
            allow_plaintext: true,
            max_connections,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            write_stall_timeout: DEFAULT_WRITE_STALL_TIMEOUT,
        }
    }

    pub fn with_tls(mut self, tls: Option<Arc<ServerTls>>, allow_plaintext: bool) -> Self {
        self.tls = tls;
        self.allow_plaintext = allow_plaintext;
        self
    }
}

/// Serve `router` on `listener` until `shutdown` turns true; connections
/// then finish the request they are on.
pub async fn serve(listener: TcpListener, router: Router, options: HttpServerOptions, shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut stopping = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop_requested(&mut stopping) => return,
        };
        let (tcp, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!("HTTP accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client = %addr, "HTTP connection refused: {} already open", options.max_connections);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (router, options, shutdown) = (router.clone(), options.clone(), shutdown.clone());
        tokio::spawn(async move {
            serve_connection(tcp, addr, router, &options, shutdown).await;
            drop(slot);
        });
    }
}

async fn serve_connection(
    tcp: TcpStream,
    addr: SocketAddr,
    router: Router,
    options: &HttpServerOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = match tokio::time::timeout(options.header_read_timeout, secure(tcp, options)).await {
        Ok(Ok(Some(stream))) => stream,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => return tracing::debug!(client = %addr, "HTTP connection closed: {error}"),
        Err(_) => return tracing::debug!(client = %addr, "HTTP connection closed: no TLS handshake in time"),
    };
    let io = TokioIo::new(StallGuard::new(stream, options.write_stall_timeout));
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(PeerAddr(addr)));
        let mut router = router.clone();
        async move { router.call(request).await }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let stopping = async move { stop_requested(&mut shutdown).await };
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = stopping => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(client = %addr, "HTTP connection ended: {error}");
    }
}

/// Completes once `shutdown` turns true; never if its sender is gone
/// (nobody can ask any more).
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The connection as the port serves it: TLS when configured and the
/// client starts a handshake, plain when allowed, else `None` after
/// answering 400.
async fn secure(tcp: TcpStream, options: &HttpServerOptions) -> std::io::Result<Option<Stream>> {
    let Some(tls) = &options.tls else { return Ok(Some(Stream::Plain(tcp))) };
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        let session = tls.acceptor().accept(tcp).await?;
        return Ok(Some(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(session)))));
    }
    if options.allow_plaintext {
        return Ok(Some(Stream::Plain(tcp)));
    }
    refuse_plaintext(tcp).await;
    Ok(None)
}

/// Answer a plain-HTTP request on a TLS-only port with 400 and close (read
/// what it sent first, so closing does not reset the answer away).
async fn refuse_plaintext(mut tcp: TcpStream) {
    let mut request = [0u8; 4096];
    let _ = tcp.read(&mut request).await;
    let body = serde_json::json!({
        "error": "this port serves HTTPS only (a TLS certificate is configured and plaintext is not allowed): use https://"
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}
