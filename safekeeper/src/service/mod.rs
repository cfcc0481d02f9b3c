//! The safekeeper service: the Postgres-wire port proposers push WAL to, the
//! HTTP status port, and one owner task per timeline. docs/service.md
//! describes the behaviour; this module only wires the parts together.
//!
//! Table of contents:
//! - [`pg_wire`]: server side of the Postgres v3 protocol (framing, bounds).
//! - [`errors`]: ErrorResponse values and their SQLSTATEs.
//! - [`connection`]: one connection: startup and simple queries.
//! - [`commands`]: the simple-query commands, parsed.
//! - [`push`]: START_WAL_PUSH, the CopyBoth phase.
//! - [`replication`]: START_REPLICATION for pg_receivewal and standbys.
//! - [`owner`]: a timeline's owner task, which drives its node.
//! - [`replies`]: how replies get from an owner onto a connection's socket.
//! - [`registry`]: the timelines: recovery at startup, atomic creation.
//! - [`http`]: the HTTP API (status, WAL, segments, feedback, metrics).
//! - [`consumers`]: who is reading a timeline's WAL.
//! - [`wal_reader`]: reading committed WAL for consumers.
//! - [`metrics`]: Prometheus metrics.
//! - [`peer_recovery`]: copying committed WAL from a peer when behind.

mod commands;
mod connection;
mod consumers;
mod errors;
mod http;
mod metrics;
mod owner;
mod peer_recovery;
mod pg_wire;
mod push;
mod registry;
mod replication;
mod replies;
mod wal_reader;

/// The timelines a data directory holds (`safekeeper status`).
pub use registry::list_timelines;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};

use crate::datadir::{ensure_node_id, lock_data_dir};
use errors::{sqlstate, PgError};
use net::tls::ServerTls;
use registry::Timelines;
use safekeeper_api::api::SafekeeperAddress;
use safekeeper_core::retention::RetentionPolicy;
use safekeeper_protocol::ids::NodeId;

/// Open pg connections at once unless `--max-pg-connections` says
/// otherwise; more are refused with SQLSTATE 53300. With at most one frame
/// of `MAX_MESSAGE_BYTES` buffered per connection this also bounds the
/// memory held by partially read messages.
pub const DEFAULT_MAX_PG_CONNECTIONS: usize = 512;
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 1024;
/// How long each owner may take to finish its batch at shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ServiceConfig {
    pub node_id: NodeId,
    pub datadir: PathBuf,
    pub listen_pg: String,
    pub listen_http: String,
    pub retention: RetentionPolicy,
    /// HTTP addresses of the other safekeepers: peer recovery copies
    /// committed WAL from them.
    pub peers: Vec<SafekeeperAddress>,
    /// `--max-timelines`: most timelines held (see `registry`).
    pub max_timelines: usize,
    /// `--max-pg-connections`.
    pub max_pg_connections: usize,
    /// Where the bound addresses are reported (see [`utils::listen_addrs`]).
    pub listen_addrs_file: Option<PathBuf>,
    /// `--auth-public-key`: every client needs a token (docs/security.md).
    pub auth: Option<auth::TokenVerifier>,
    /// `--max-http-connections`.
    pub max_http_connections: usize,
    /// `--peer-auth-token-file`: the `safekeeper_data` token peer recovery
    /// presents to the peers.
    pub peer_auth_token_file: Option<PathBuf>,
    /// `--fault-sync-delay-ms`: fault injection for tests, never set in
    /// production (zero: off).
    pub fault_sync_delay: Duration,
    /// `--tls-cert`/`--tls-key`/`--allow-plaintext`: TLS on both ports.
    pub tls: Option<Arc<ServiceTls>>,
    /// `--tls-ca`: peer recovery reaches the peers over HTTPS, trusting it.
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
}

/// Both ports' TLS: one certificate, loaded per port (each offers its own
/// application protocol), reloaded together on SIGHUP.
pub struct ServiceTls {
    pub pg: Arc<ServerTls>,
    pub http: Arc<ServerTls>,
    pub allow_plaintext: bool,
}

impl ServiceTls {
    /// Load the certificate for both ports (`None` without --tls-cert).
    pub fn load(args: &net::args::ServerTlsArgs) -> Result<Option<Arc<ServiceTls>>, net::tls::TlsConfigError> {
        let Some(pg) = args.load(&[PG_ALPN])? else { return Ok(None) };
        let http = args.load(&[b"http/1.1"])?.expect("loaded once already");
        Ok(Some(Arc::new(ServiceTls { pg, http, allow_plaintext: args.allow_plaintext })))
    }

    fn reload(&self) {
        self.pg.reload_logged("pg");
        self.http.reload_logged("http");
    }
}

/// The ALPN protocol PostgreSQL 17's clients offer on a TLS connection.
const PG_ALPN: &[u8] = b"postgresql";

/// What every connection and HTTP handler shares (passed in, no globals).
pub struct ServiceState {
    pub node_id: NodeId,
    pub timelines: Arc<Timelines>,
    pub started_at: Instant,
    connection_slots: Arc<Semaphore>,
    /// The size of `connection_slots`, for the refusal.
    max_pg_connections: usize,
    next_connection_id: AtomicU64,
    /// Checks clients' tokens on both ports; `None`: no tokens needed.
    pub auth: Option<auth::TokenVerifier>,
    /// Both ports' certificate; `None`: plaintext only.
    pub tls: Option<Arc<ServiceTls>>,
}

/// Lock the data directory, check the node id, recover every timeline,
/// serve until SIGTERM/SIGINT, then let the owners finish and checkpoint.
pub async fn run(mut config: ServiceConfig) -> anyhow::Result<()> {
    let datadir = &config.datadir;
    std::fs::create_dir_all(datadir).with_context(|| format!("creating {}", datadir.display()))?;
    let _lock = lock_data_dir(datadir)?;
    ensure_node_id(datadir, config.node_id)?;
    // Registered before serving so a signal during startup is not lost.
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // SIGHUP's default action ends the process: handled from the start too.
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let timelines = Arc::new(Timelines::recover_all(datadir, timelines_config(&config))?);
    let pg_listener =
        TcpListener::bind(&config.listen_pg).await.with_context(|| format!("listening on {}", config.listen_pg))?;
    let http_listener =
        TcpListener::bind(&config.listen_http).await.with_context(|| format!("listening on {}", config.listen_http))?;
    if let Some(path) = &config.listen_addrs_file {
        let addrs = [("pg", pg_listener.local_addr()?), ("http", http_listener.local_addr()?)];
        utils::listen_addrs::write_listen_addrs(path, &addrs)?;
    }
    let state = Arc::new(ServiceState {
        node_id: config.node_id,
        timelines: timelines.clone(),
        started_at: Instant::now(),
        connection_slots: Arc::new(Semaphore::new(config.max_pg_connections)),
        max_pg_connections: config.max_pg_connections,
        next_connection_id: AtomicU64::new(1),
        auth: config.auth.take(),
        tls: config.tls.clone(),
    });
    tracing::info!(
        node_id = %config.node_id,
        pg = %pg_listener.local_addr()?,
        http = %http_listener.local_addr()?,
        timelines = timelines.list().len(),
        "safekeeper serving"
    );

    let (stop, stopped) = watch::channel(false);
    tokio::spawn(accept_pg(pg_listener, state.clone(), stopped.clone()));
    let http_options = net::http_server::HttpServerOptions::plain(config.max_http_connections).with_tls(
        config.tls.as_ref().map(|tls| tls.http.clone()),
        config.tls.as_ref().is_some_and(|t| t.allow_plaintext),
    );
    tokio::spawn(net::http_server::serve(http_listener, http::router(state.clone()), http_options, stopped));

    loop {
        tokio::select! {
            _ = terminate.recv() => break tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => break tracing::info!("SIGINT: shutting down"),
            _ = hangup.recv() => {
                match &config.tls {
                    Some(tls) => tls.reload(),
                    None => tracing::info!("SIGHUP: no TLS certificate to reload"),
                }
                if let Some(verifier) = &state.auth {
                    utils::service::reload_token_keys(verifier);
                }
            }
        }
    }
    stop.send_replace(true);
    timelines.shutdown(SHUTDOWN_TIMEOUT).await;
    tracing::info!("control files checkpointed; exiting");
    Ok(())
}

async fn accept_pg(listener: TcpListener, state: Arc<ServiceState>, mut stopped: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = state.next_connection_id.fetch_add(1, Ordering::Relaxed);
        match state.connection_slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let state = state.clone();
                tokio::spawn(async move {
                    connection::serve(stream, state, id).await;
                    drop(slot);
                });
            }
            Err(_) => {
                tokio::spawn(refuse_connection(stream, state.max_pg_connections));
            }
        }
    }
}

async fn refuse_connection(mut stream: TcpStream, limit: usize) {
    let error = PgError::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        format!("too many connections (limit {limit}, --max-pg-connections)"),
    );
    let mut out = BytesMut::new();
    pg_wire::encode::error_response(&mut out, &error);
    let _ = tokio::time::timeout(connection::ERROR_FLUSH_TIMEOUT, stream.write_all(&out)).await;
}

fn timelines_config(config: &ServiceConfig) -> registry::TimelinesConfig {
    registry::TimelinesConfig {
        node_id: config.node_id,
        retention: config.retention,
        peers: config.peers.clone().into(),
        peer_auth_token_file: config.peer_auth_token_file.as_deref().map(Arc::from),
        max_timelines: config.max_timelines,
        fault_sync_delay: config.fault_sync_delay,
        peer_tls: config.peer_tls.clone(),
    }
}
