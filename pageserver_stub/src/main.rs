//! `pageserver_stub`: follows a timeline's safekeepers, pulls and decodes
//! its committed WAL, and reports how far it got (docs/pageserver-stub.md).
//! Logs go to stderr; nothing is printed on stdout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pageserver_stub::api::SafekeeperAddress;
use pageserver_stub::{StubConfig, Tuning};
use safekeeper_protocol::ids::{TenantId, TimelineId};
use tokio::signal::unix::{signal, SignalKind};

/// Worker threads: decoding takes one core at full speed; the other keeps
/// the status port and the pollers responsive meanwhile.
const WORKER_THREADS: usize = 2;

#[derive(Parser)]
#[command(
    version,
    about = "Pulls a timeline's committed WAL from its safekeepers and decodes every record",
    long_about = "Pulls a timeline's committed WAL from whichever safekeeper has the highest commit LSN, \
                  switching on errors, silence or lag without a gap or a duplicate record; decodes and \
                  checks every record (CRC, xl_prev chain, page headers), counts them per resource \
                  manager, saves its position in --datadir and reports it to the safekeepers as \
                  remote_consistent_lsn. Exits 0 on SIGTERM/SIGINT (after saving), non-zero on \
                  undecodable WAL, WAL gone from every safekeeper, or a state file that is corrupt or \
                  belongs to another cluster."
)]
struct Cli {
    /// The safekeepers' HTTP addresses, comma separated.
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',', required = true)]
    safekeepers_http: Vec<SafekeeperAddress>,
    /// Tenant id (32 hex characters).
    #[arg(long)]
    tenant_id: TenantId,
    /// Timeline id (32 hex characters).
    #[arg(long)]
    timeline_id: TimelineId,
    /// Directory for the state file (created if missing).
    #[arg(long, value_name = "DIR")]
    datadir: PathBuf,
    /// Address of the HTTP status port (GET /v1/status).
    #[arg(long, default_value = "127.0.0.1:7678", value_name = "HOST:PORT")]
    listen_http: SocketAddr,
    /// Once the HTTP port is bound, write its address to FILE (a line
    /// `http=HOST:PORT`, replaced atomically): how a supervisor learns the
    /// port picked for port 0.
    #[arg(long, value_name = "FILE")]
    listen_addrs_file: Option<std::path::PathBuf>,
    /// A file holding the token safekeepers started with --auth-public-key
    /// ask for (`safekeeper_data`: WAL, status and feedback); read at every
    /// request, so a rotated token needs no restart (docs/security.md).
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: net::args::ClientTlsArgs,
    /// TLS on the status port.
    #[command(flatten)]
    status_tls: net::args::ServerTlsArgs,
}

fn main() -> ExitCode {
    utils::service::init_logging();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(WORKER_THREADS).enable_all().build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pageserver_stub: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pageserver_stub: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cli.listen_http)
        .await
        .with_context(|| format!("binding the HTTP port {}", cli.listen_http))?;
    if let Some(path) = &cli.listen_addrs_file {
        utils::listen_addrs::write_listen_addrs(path, &[("http", listener.local_addr()?)])?;
    }
    let status_tls = cli.status_tls.load(&[b"http/1.1"]).context("--tls-cert/--tls-key")?;
    // SIGHUP reloads the status port's certificate (and, whatever the
    // configuration, must not end the process: its default action does).
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let reloading = status_tls.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match &reloading {
                Some(tls) => tls.reload_logged("http"),
                None => tracing::info!("SIGHUP: no TLS certificate to reload"),
            }
        }
    });
    let config = StubConfig {
        safekeepers: cli.safekeepers_http,
        tenant_id: cli.tenant_id,
        timeline_id: cli.timeline_id,
        datadir: cli.datadir,
        tuning: Tuning::default(),
        record_observer: None,
        auth_token_file: cli.auth_token_file,
        tls: cli.tls.client_config().context("--tls-ca")?,
        status_tls,
        status_allow_plaintext: cli.status_tls.allow_plaintext,
    };
    let shutdown = shutdown_signal()?;
    let summary = pageserver_stub::run(config, listener, shutdown).await?;
    tracing::info!(saved = ?summary.saved_lsn, records = summary.stats.total().records,
        bytes = summary.stats.total().bytes, switches = summary.switches, "stopped");
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down: saving the position");
    })
}
