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

use compute_shim::driver::startup::{check_safekeeper_list, connect_postgres, ShimOptions};
use compute_shim::driver::sync::SyncOptions;
use compute_shim::driver::{self, http, ShimStatus};
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
                  Exits non-zero when another compute_shim takes over (fenced), when a safekeeper \
                  refuses the cluster, when Postgres lacks WAL the safekeepers hold, or when the \
                  replication stream ends; a restart campaigns in a new term. After the primary is gone, \
                  `compute_shim sync-safekeepers --help` (docs/failover.md)."
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
    /// WAL held for safekeepers that have not flushed it. When it is full,
    /// the ones behind the quorum's commit LSN are released (caught up
    /// later by peer recovery); the quorum itself sets the pace.
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
}

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
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("compute_shim: {error:#}");
            ExitCode::FAILURE
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

async fn run(cli: ShimArgs) -> anyhow::Result<()> {
    check_safekeeper_list(&cli.timeline.safekeepers)?;
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
    };
    options.limits.check()?;
    let setup = connect_postgres(&options).await.context("connecting to Postgres")?;
    tracing::info!(system_id = %setup.cluster.system_id, timeline_start = %setup.timeline_start_lsn,
        postgres_flush = %setup.pg_flush_lsn, "connected to Postgres; campaigning");
    let (status_tx, status_rx) = watch::channel(ShimStatus::default());
    let (requests_tx, requests_rx) = mpsc::channel(driver::MEMBERSHIP_REQUESTS_QUEUE);
    let server = axum::serve(listener, http::router(status_rx, requests_tx));
    tokio::select! {
        served = server => served.context("HTTP server stopped")?,
        result = driver::run(setup, status_tx, requests_rx) => result?,
    }
    Ok(())
}
