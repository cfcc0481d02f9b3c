//! `compute_shim`: streams a Postgres primary's WAL to a group of
//! safekeepers as the proposer of their consensus, and reports the quorum
//! commit LSN back to Postgres as a synchronous standby (docs/proposer.md,
//! docs/operations.md).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::sync::{mpsc, watch};

use compute_shim::driver::exit::{ShimExit, Verdict};
use compute_shim::driver::links::{self, LinkSettings};
use compute_shim::driver::service::{run_service, ServiceEnd};
use compute_shim::driver::startup::{check_safekeeper_list, ShimOptions};
use compute_shim::driver::sync::SyncOptions;
use compute_shim::driver::{self, http, ShimError, ShimStatus};
use compute_shim::node::SteppedDown;
use compute_shim::tcp_liveness::{self, TcpLiveness};
use safekeeper_protocol::ids::{TenantId, TimelineId};

#[derive(Parser)]
#[command(
    version,
    about = "Streams a PostgreSQL 15 primary's WAL to a quorum of safekeepers",
    long_about = "Streams a PostgreSQL 15 primary's WAL to a quorum of safekeepers. Connects to Postgres \
                  as a physical replication client (like pg_receivewal --synchronous), wins an election \
                  among the safekeepers in a term above every term they have seen, and reports as its \
                  flush position the LSN a majority of safekeepers has fsynced. Set Postgres's \
                  synchronous_standby_names to the --application-name so commits wait for that quorum. \
                  A long-running service: a Postgres restart, a broken replication stream or an \
                  unreachable Postgres is retried with a backoff, in a new term. SIGTERM/SIGINT steps \
                  down: no more WAL is taken, what was taken is committed (within \
                  --step-down-timeout-ms), exit 0. Exit statuses: 1 other failure, 2 bad arguments, \
                  3 fenced (another compute_shim took over), 4 the safekeepers refuse this cluster or \
                  --safekeepers is inconsistent, 5 this Postgres is not the primary of the safekeepers' \
                  log (behind, diverged, superseded), 6 WAL the safekeepers need is gone from Postgres, \
                  7 Postgres refuses the role (authentication, permission) (docs/operations.md). After \
                  the primary is gone, `compute_shim sync-safekeepers --help` (docs/failover.md)."
)]
struct Cli {
    #[command(flatten)]
    shim: ShimArgs,
}

/// `compute_shim sync-safekeepers ...` (dispatched on the first argument:
/// the service's own flags are required, a subcommand's are not those).
#[derive(Parser)]
#[command(name = "compute_shim", version)]
enum SyncCli {
    /// After the primary is gone (docs/failover.md): win a term on the
    /// safekeepers with no Postgres, make a quorum hold the log of the most
    /// advanced one, commit it, and print that commit LSN (X/Y) on the last
    /// line of stdout. Every commit any earlier compute_shim acknowledged is
    /// at or below it, and any compute_shim still running for the old
    /// primary is fenced. Safe to repeat. Exits non-zero with one line when
    /// no quorum answers within --timeout-s, or when no safekeeper holds
    /// the timeline.
    SyncSafekeepers(SyncArgs),
}

/// Which safekeepers, and which of their timelines: both forms take these.
#[derive(clap::Args)]
struct TimelineArgs {
    /// The safekeepers' Postgres-protocol addresses, comma separated (an odd
    /// number; commit needs a majority).
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',', required = true)]
    safekeepers: Vec<String>,
    /// Tenant id (32 hex characters).
    #[arg(long)]
    tenant_id: TenantId,
    /// Timeline id (32 hex characters).
    #[arg(long)]
    timeline_id: TimelineId,
    /// A file holding the `tenant` token (for this tenant) that safekeepers
    /// started with --auth-public-key ask for; read at every connection,
    /// so a rotated token is picked up without a restart (docs/security.md).
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    safekeeper_tls: net::args::ClientTlsArgs,
}

#[derive(clap::Args)]
struct SyncArgs {
    #[command(flatten)]
    timeline: TimelineArgs,
    /// Give up (exit non-zero) when the sync has not completed by then.
    #[arg(long, default_value_t = 60, value_name = "N")]
    timeout_s: u64,
}

#[derive(clap::Args)]
struct ShimArgs {
    /// Postgres connection string (keyword/value or postgresql:// URI) of a
    /// role with the REPLICATION attribute; trust, md5 and SCRAM work.
    #[arg(long, value_name = "CONNSTR")]
    pg: String,
    #[command(flatten)]
    timeline: TimelineArgs,
    /// The application_name Postgres sees; put it in synchronous_standby_names.
    #[arg(long, default_value = "safekeepers")]
    application_name: String,
    /// The physical replication slot (created if missing) that keeps
    /// Postgres from recycling WAL the quorum has not committed.
    #[arg(long, default_value = "safekeepers")]
    slot: String,
    /// Address of the HTTP status port (GET /v1/status).
    #[arg(long, default_value = "127.0.0.1:7677", value_name = "HOST:PORT")]
    listen_http: SocketAddr,
    /// Once the HTTP port is bound, write its address to FILE (a line
    /// `http=HOST:PORT`, replaced atomically): how a supervisor learns the
    /// port picked for port 0.
    #[arg(long, value_name = "FILE")]
    listen_addrs_file: Option<std::path::PathBuf>,
    /// Ed25519 public key (PEM) of the tokens this shim's own HTTP port
    /// asks for: reading status needs a token for this tenant (or
    /// safekeeper_data/admin), a membership change an admin one
    /// (docs/security.md). Without it the port asks for none.
    #[arg(long, value_name = "FILE")]
    auth_public_key: Option<std::path::PathBuf>,
    /// TLS on the HTTP port (--tls-cert, --tls-key, --allow-plaintext).
    #[command(flatten)]
    http_tls: net::args::ServerTlsArgs,
    /// WAL held for safekeepers that have not flushed it: the margin a
    /// laggard may fall behind the newest WAL. When it is full, the ones
    /// behind the quorum's commit LSN are released (caught up later from
    /// Postgres or by peer recovery); the quorum itself sets the pace.
    #[arg(long, default_value_t = driver::startup::MAX_BUFFERED_WAL_BYTES >> 20, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    max_buffered_wal_mib: u64,
    /// An idle safekeeper is sent an empty append (the commit LSN) this often;
    /// it answers each.
    #[arg(long, default_value_t = driver::startup::HEARTBEAT_INTERVAL_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    heartbeat_interval_ms: u64,
    /// A connected safekeeper that sends nothing for this long (it answers
    /// every heartbeat) is disconnected and reconnected; at least twice the
    /// heartbeat interval.
    #[arg(long, default_value_t = driver::startup::SILENCE_TIMEOUT_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1000..))]
    silence_timeout_ms: u64,
    /// On SIGTERM/SIGINT: how long to wait for the WAL already taken from
    /// Postgres to be committed before exiting anyway (a restart resends it).
    #[arg(long, default_value_t = driver::startup::STEP_DOWN_TIMEOUT_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    step_down_timeout_ms: u64,
    /// Connect timeout to Postgres; overrides `connect_timeout` in --pg
    /// (default: that, else 10 s).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pg_connect_timeout_ms: Option<u64>,
    /// Connect, start up and enter the WAL push with a safekeeper within this.
    #[arg(long, default_value_t = links::LINK_CONNECT_TIMEOUT_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    safekeeper_connect_timeout_ms: u64,
    /// A failed connection (to a safekeeper, or a run ended by a Postgres
    /// outage) is retried after this, doubling on each failure...
    #[arg(long, default_value_t = links::RECONNECT_BACKOFF_MIN_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    reconnect_backoff_min_ms: u64,
    /// ...up to this.
    #[arg(long, default_value_t = links::RECONNECT_BACKOFF_MAX_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    reconnect_backoff_max_ms: u64,
    /// Every connection (Postgres and safekeepers): TCP keepalive probes
    /// start after it is idle this long...
    #[arg(long, default_value_t = tcp_liveness::KEEPALIVE_IDLE.as_secs(), value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..=7200))]
    tcp_keepalive_idle_s: u64,
    /// ...are sent this often...
    #[arg(long, default_value_t = tcp_liveness::KEEPALIVE_INTERVAL.as_secs(), value_name = "S",
          value_parser = clap::value_parser!(u64).range(1..=600))]
    tcp_keepalive_interval_s: u64,
    /// ...and close it after this many go unanswered.
    #[arg(long, default_value_t = tcp_liveness::KEEPALIVE_PROBES, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    tcp_keepalive_probes: u32,
    /// Data sent and unacknowledged by the peer's kernel this long closes
    /// the connection (TCP_USER_TIMEOUT): a dead host or a black-holed path.
    #[arg(long, default_value_t = tcp_liveness::USER_TIMEOUT.as_millis() as u64, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    tcp_user_timeout_ms: u64,
}

/// Most HTTP connections open at once on the shim's port (status readers,
/// an operator): one more is closed at once.
const MAX_HTTP_CONNECTIONS: usize = 64;

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|first| first == "sync-safekeepers") {
        let SyncCli::SyncSafekeepers(args) = SyncCli::parse();
        return sync_main(args);
    }
    shim_main(Cli::parse().shim)
}

/// `sync-safekeepers`: the LSN alone on stdout's last line, logs on stderr.
fn sync_main(args: SyncArgs) -> ExitCode {
    let options = SyncOptions {
        safekeepers: args.timeline.safekeepers,
        tenant_id: args.timeline.tenant_id,
        timeline_id: args.timeline.timeline_id,
        timeout: Duration::from_secs(args.timeout_s),
        auth_token_file: args.timeline.auth_token_file,
        tls_ca: args.timeline.safekeeper_tls.tls_ca,
    };
    let synced = run_on_one_thread(driver::sync_safekeepers(&options));
    match synced {
        Ok(commit_lsn) => {
            println!("{commit_lsn}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("compute_shim sync-safekeepers: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn shim_main(cli: ShimArgs) -> ExitCode {
    match run_on_one_thread(run(cli)) {
        Ok(ServiceEnd::SteppedDown(stepped_down)) => {
            match stepped_down {
                Some(SteppedDown { timed_out: true, commit_lsn, wal_end_lsn }) => tracing::warn!(
                    %commit_lsn, wal_end = ?wal_end_lsn,
                    "stepped down at the timeout: WAL taken from Postgres past the commit LSN is resent by the next shim"
                ),
                Some(SteppedDown { commit_lsn, .. }) => {
                    tracing::info!(%commit_lsn, "stepped down: all WAL taken from Postgres is committed")
                }
                None => tracing::info!("stopped (no term was running)"),
            }
            ExitCode::from(ShimExit::SteppedDown.code())
        }
        Ok(ServiceEnd::Exit(exit, error)) => {
            eprintln!("compute_shim: {error}");
            ExitCode::from(exit.code())
        }
        Err(error) => {
            eprintln!("compute_shim: {error:#}");
            let exit = match error.downcast_ref::<ShimError>() {
                Some(error) => match error.verdict() {
                    Verdict::Exit(exit) => exit,
                    Verdict::Retry => ShimExit::Failed,
                },
                None => ShimExit::Failed,
            };
            ExitCode::from(exit.code())
        }
    }
}

/// Set up logging and run `work` on a current-thread runtime. One thread:
/// the shim is a single event loop around one proposer, and its links and
/// driver waking each other on one thread saves a cross-thread wakeup per
/// message (measured: +2..25% TPS in scripts/bench-commit's pgbench -N runs).
fn run_on_one_thread<T, E: Into<anyhow::Error>>(
    work: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    utils::service::init_logging();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(work).map_err(Into::into)
}

async fn run(cli: ShimArgs) -> anyhow::Result<ServiceEnd> {
    check_safekeeper_list(&cli.timeline.safekeepers)?;
    if cli.reconnect_backoff_min_ms > cli.reconnect_backoff_max_ms {
        return Err(ShimError::BadArguments(format!(
            "--reconnect-backoff-min-ms {} is above --reconnect-backoff-max-ms {}",
            cli.reconnect_backoff_min_ms, cli.reconnect_backoff_max_ms
        ))
        .into());
    }
    let listener = tokio::net::TcpListener::bind(cli.listen_http)
        .await
        .with_context(|| format!("binding the HTTP port {}", cli.listen_http))?;
    if let Some(path) = &cli.listen_addrs_file {
        utils::listen_addrs::write_listen_addrs(path, &[("http", listener.local_addr()?)])?;
    }
    let options = ShimOptions {
        pg_conninfo: cli.pg,
        safekeepers: cli.timeline.safekeepers,
        tenant_id: cli.timeline.tenant_id,
        timeline_id: cli.timeline.timeline_id,
        application_name: cli.application_name,
        slot: cli.slot,
        limits: driver::startup::ShimLimits {
            max_buffered_wal_bytes: cli.max_buffered_wal_mib << 20,
            heartbeat_interval_ms: cli.heartbeat_interval_ms,
            silence_timeout_ms: cli.silence_timeout_ms,
        },
        links: LinkSettings {
            connect_timeout_ms: cli.safekeeper_connect_timeout_ms,
            tcp_liveness: TcpLiveness {
                keepalive_idle: Duration::from_secs(cli.tcp_keepalive_idle_s),
                keepalive_interval: Duration::from_secs(cli.tcp_keepalive_interval_s),
                keepalive_probes: cli.tcp_keepalive_probes,
                user_timeout: Duration::from_millis(cli.tcp_user_timeout_ms),
            },
            reconnect_backoff_min: Duration::from_millis(cli.reconnect_backoff_min_ms),
            reconnect_backoff_max: Duration::from_millis(cli.reconnect_backoff_max_ms),
            auth_token_file: cli.timeline.auth_token_file.clone(),
            tls: cli.timeline.safekeeper_tls.tls_ca.as_deref().map(net::pg_tls::PgClientTls::verify_full),
        },
        pg_connect_timeout_ms: cli.pg_connect_timeout_ms,
        step_down_timeout_ms: cli.step_down_timeout_ms,
    };
    options.limits.check()?;
    let (status_tx, status_rx) = watch::channel(ShimStatus::default());
    let (requests_tx, mut requests_rx) = mpsc::channel(driver::MEMBERSHIP_REQUESTS_QUEUE);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let verifier = cli
        .auth_public_key
        .as_deref()
        .map(auth::TokenVerifier::from_public_key_file)
        .transpose()
        .map_err(|error| ShimError::BadArguments(format!("--auth-public-key: {error}")))?;
    let verifier = verifier.map(std::sync::Arc::new);
    let access = http::HttpAccess { verifier: verifier.clone(), tenant_id: options.tenant_id };
    let http_tls = cli
        .http_tls
        .load(&[b"http/1.1"])
        .map_err(|error| ShimError::BadArguments(format!("--tls-cert/--tls-key: {error}")))?;
    let http_options = net::http_server::HttpServerOptions::plain(MAX_HTTP_CONNECTIONS)
        .with_tls(http_tls.clone(), cli.http_tls.allow_plaintext);
    // The HTTP server runs until the process exits (the flag never turns).
    let (_serve_forever, http_stop) = watch::channel(false);
    let server =
        net::http_server::serve(listener, http::router(status_rx, requests_tx, access), http_options, http_stop);
    let service = run_service(&options, &status_tx, &mut requests_rx, &mut stop_rx);
    tokio::select! {
        () = server => anyhow::bail!("HTTP server stopped"),
        () = stop_signals(stop_tx, http_tls, verifier) => unreachable!("the stop signals are awaited forever"),
        end = service => Ok(end),
    }
}

/// Set the stop flag on SIGTERM or SIGINT (a second one changes nothing:
/// the step-down has its own bound); reload the HTTP port's certificate
/// and the token keys on SIGHUP.
async fn stop_signals(
    stop: watch::Sender<bool>,
    http_tls: Option<std::sync::Arc<net::tls::ServerTls>>,
    verifier: Option<std::sync::Arc<auth::TokenVerifier>>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install the signal handlers; a signal ends the shim without a step-down");
        return std::future::pending().await;
    };
    loop {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            _ = hangup.recv() => {
                match &http_tls {
                    Some(tls) => tls.reload_logged("http"),
                    None => tracing::info!("SIGHUP: no TLS certificate to reload"),
                }
                if let Some(verifier) = &verifier {
                    utils::service::reload_token_keys(verifier);
                }
                continue;
            }
        };
        tracing::info!("{name} received");
        stop.send_replace(true);
    }
}
