//! `safekeeper` command line. Without a subcommand it serves: the Postgres
//! wire port proposers push WAL to and the HTTP status port (see
//! docs/service.md). The subcommands are operator tools built on the core:
//! import a Postgres `pg_wal` into a timeline, and show what a data
//! directory holds (after the same recovery a restart runs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use safekeeper::datadir::{ensure_node_id, lock_data_dir};
use safekeeper::import::{import_pg_wal, timeline_dir, ImportRequest};
use safekeeper::service::list_timelines;
use safekeeper::service::{self, ServiceConfig};
use safekeeper_api::api::SafekeeperAddress;
use safekeeper_core::acceptor::AcceptorConfig;
use safekeeper_core::recovery::recover_timeline;
use safekeeper_core::retention::RetentionPolicy;
use safekeeper_core::timeline::FileTimeline;
use safekeeper_protocol::ids::{NodeId, TenantId, TimelineId};

/// Time the runtime gives leftover tasks after the service has stopped.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// Threads of the runtime's blocking pool: every timeline's storage work
/// (one batch at a time per timeline) and the consumers' WAL reads share
/// them, so the thread count does not grow with the timelines; more work
/// than threads waits its turn in the pool's queue.
const MAX_BLOCKING_THREADS: usize = 32;
/// Default `token --ttl-s`: 30 days; rotate before (docs/security.md).
const DEFAULT_TOKEN_TTL_S: u64 = 30 * 86_400;

#[derive(Parser)]
#[command(
    version,
    about = "WAL safekeeper for PostgreSQL 15",
    long_about = "WAL safekeeper for PostgreSQL 15. Without a subcommand, serves a data directory: \
                  proposers push WAL over the Postgres wire protocol (START_WAL_PUSH) and operators \
                  read status over HTTP. SIGTERM or SIGINT stops it cleanly.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct ServeArgs {
    /// This safekeeper's node id; recorded in the data directory on first
    /// start and checked on every later one.
    #[arg(long, required = true)]
    id: Option<u64>,
    /// Data directory (created if missing): one subdirectory per tenant,
    /// one per timeline below it. Only one process may use it at a time.
    #[arg(long, required = true)]
    datadir: Option<PathBuf>,
    /// Address of the Postgres wire protocol port (START_WAL_PUSH).
    #[arg(long, default_value = "127.0.0.1:5454", value_name = "HOST:PORT")]
    listen_pg: String,
    /// Address of the HTTP API (status, WAL and segment downloads, consumer
    /// feedback, metrics; docs/http-api.md).
    #[arg(long, default_value = "127.0.0.1:7676", value_name = "HOST:PORT")]
    listen_http: String,
    /// WAL retention: bytes kept below what the page server confirmed (its
    /// remote_consistent_lsn) and the commit LSN, beyond the one segment
    /// always kept. Without any consumer feedback nothing is removed.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    wal_keep_bytes: u64,
    /// HTTP address of another safekeeper of the same group (repeat for
    /// each). A timeline that falls behind the commit LSN they report
    /// copies the missing committed WAL from the most advanced of them
    /// (peer recovery, docs/service.md).
    #[arg(long = "peer-http", value_name = "HOST:PORT")]
    peer_http: Vec<SafekeeperAddress>,
    /// Most timelines this safekeeper holds; a proposer's Greeting for one
    /// more is refused (SQLSTATE 53400, configuration_limit_exceeded).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    max_timelines: usize,
    /// Most pg connections open at once (proposers, replication clients);
    /// more are refused with SQLSTATE 53300. Each timeline with a proposer
    /// streaming takes one; each holds at most one message being read.
    #[arg(long, default_value_t = service::DEFAULT_MAX_PG_CONNECTIONS, value_name = "N")]
    max_pg_connections: usize,
    /// Once both ports are bound, write their addresses to FILE (lines
    /// `pg=HOST:PORT` and `http=HOST:PORT`, replaced atomically): how a
    /// supervisor learns the ports picked for port 0.
    #[arg(long, value_name = "FILE")]
    listen_addrs_file: Option<PathBuf>,
    /// Ed25519 public key (PEM) that signs the tokens clients must present
    /// on both ports: the password on the pg port, `Authorization: Bearer`
    /// on HTTP; `/metrics` and `/v1/healthz` stay open (docs/security.md).
    /// Without it no token is asked for.
    #[arg(long, value_name = "FILE")]
    auth_public_key: Option<PathBuf>,
    /// A file holding the `safekeeper_data` token peer recovery presents to
    /// peers that check tokens; read at every request.
    #[arg(long, value_name = "FILE")]
    peer_auth_token_file: Option<PathBuf>,
    /// Most HTTP connections open at once; one more is closed at once.
    /// Each long-polling consumer and peer holds one.
    #[arg(long, default_value_t = service::DEFAULT_MAX_HTTP_CONNECTIONS as u64, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_http_connections: u64,
    #[command(flatten)]
    tls: net::args::ServerTlsArgs,
    /// CA certificate(s) (PEM) of the peers' HTTPS ports: with it peer
    /// recovery uses HTTPS and checks the chain and host name.
    #[command(flatten)]
    peer_tls: net::args::ClientTlsArgs,
    /// FAULT INJECTION FOR TESTS ONLY, never for production: sleep this
    /// long before every WAL sync, as a slow disk would (acknowledgements
    /// come that much later; nothing else changes). 0, the default, is off.
    #[arg(long, default_value_t = 0, value_name = "MS", hide_short_help = true)]
    fault_sync_delay_ms: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Import the WAL of a Postgres `pg_wal` directory into a timeline, as a
    /// one-member proposer (a new term each run; only new WAL is appended).
    ImportPgWal {
        /// This safekeeper's node id (fixed for the data directory).
        #[arg(long)]
        id: u64,
        /// Safekeeper data directory; created if missing.
        #[arg(long)]
        datadir: PathBuf,
        /// Tenant id (32 hex characters).
        #[arg(long)]
        tenant_id: TenantId,
        /// Timeline id (32 hex characters).
        #[arg(long)]
        timeline_id: TimelineId,
        /// The Postgres `pg_wal` directory to read.
        #[arg(long)]
        pg_wal: PathBuf,
    },
    /// Print a token on stdout, signed with an Ed25519 private key (PEM,
    /// `openssl genpkey -algorithm ed25519`): the operator's tool for
    /// minting them (docs/security.md).
    Token {
        #[arg(long, value_name = "FILE")]
        private_key: PathBuf,
        /// tenant (with --tenant-id), safekeeper_data or admin.
        #[arg(long)]
        scope: auth::Scope,
        #[arg(long)]
        tenant_id: Option<TenantId>,
        /// Seconds until it expires.
        #[arg(long, default_value_t = DEFAULT_TOKEN_TTL_S, value_name = "N",
              value_parser = clap::value_parser!(u64).range(1..=10 * 365 * 86_400))]
        ttl_s: u64,
    },
    /// Print every timeline of a data directory as JSON (LSNs as "X/Y"),
    /// after the recovery a restart runs (which zeroes any torn WAL tail).
    Status {
        /// Safekeeper data directory.
        #[arg(long)]
        datadir: PathBuf,
    },
}

fn main() -> ExitCode {
    // A server should say that it started and why it stops: info by default.
    utils::service::init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("safekeeper: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else { return serve(cli.serve) };
    match command {
        Command::ImportPgWal { id, datadir, tenant_id, timeline_id, pg_wal } => {
            std::fs::create_dir_all(&datadir).with_context(|| format!("creating {}", datadir.display()))?;
            let _lock = lock_data_dir(&datadir)?;
            ensure_node_id(&datadir, NodeId(id))?;
            let request =
                ImportRequest { datadir: &datadir, node_id: NodeId(id), tenant_id, timeline_id, pg_wal: &pg_wal };
            let summary = import_pg_wal(&request)?;
            let report = json!({
                "term": summary.term,
                "start_lsn": summary.start_lsn,
                "flush_lsn": summary.flush_lsn,
                "imported_bytes": summary.imported_bytes,
            });
            println!("{report}");
            Ok(())
        }
        Command::Token { private_key, scope, tenant_id, ttl_s } => {
            let signer = auth::TokenSigner::from_private_key_file(&private_key).map_err(anyhow::Error::msg)?;
            let token = signer
                .mint(scope, tenant_id, std::time::SystemTime::now(), Duration::from_secs(ttl_s))
                .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
        Command::Status { datadir } => {
            let _lock = lock_data_dir(&datadir)?;
            println!("{}", serde_json::to_string_pretty(&status(&datadir)?)?);
            Ok(())
        }
    }
}

fn status(datadir: &Path) -> anyhow::Result<serde_json::Value> {
    let mut timelines = vec![];
    for (tenant_id, timeline_id) in list_timelines(datadir)? {
        let dir = timeline_dir(datadir, tenant_id, timeline_id);
        let Some(recovered) = recover_timeline(&dir).with_context(|| format!("recovering {}", dir.display()))? else {
            continue;
        };
        let (scan_start_lsn, records_decoded) = (recovered.scan_start_lsn, recovered.records_decoded);
        let timeline = FileTimeline::from_recovered(recovered, NodeId(0), AcceptorConfig::default());
        let acceptor = timeline.acceptor();
        let control = acceptor.state();
        timelines.push(json!({
            "tenant_id": tenant_id,
            "timeline_id": timeline_id,
            "system_id": control.cluster.system_id,
            "pg_version": control.pg_version,
            "wal_seg_size": control.wal_segment_size,
            "term": control.term,
            "last_log_term": acceptor.last_log_term(),
            "term_history": control.term_history,
            "timeline_start_lsn": control.timeline_start_lsn,
            "flush_lsn": acceptor.flush_lsn(),
            "commit_lsn": control.commit_lsn,
            "recovery_scan_start_lsn": scan_start_lsn,
            "recovery_records_decoded": records_decoded,
        }));
    }
    Ok(json!({ "datadir": datadir.display().to_string(), "timelines": timelines }))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (Some(id), Some(datadir)) = (args.id, args.datadir) else {
        anyhow::bail!("serving needs --id and --datadir");
    };
    let config = ServiceConfig {
        node_id: NodeId(id),
        datadir,
        listen_pg: args.listen_pg,
        listen_http: args.listen_http,
        retention: RetentionPolicy { keep_bytes: args.wal_keep_bytes },
        peers: args.peer_http,
        max_timelines: args.max_timelines,
        max_pg_connections: args.max_pg_connections,
        listen_addrs_file: args.listen_addrs_file,
        auth: args
            .auth_public_key
            .map(|path| auth::TokenVerifier::from_public_key_file(&path))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        peer_auth_token_file: args.peer_auth_token_file,
        max_http_connections: args.max_http_connections as usize,
        fault_sync_delay: Duration::from_millis(args.fault_sync_delay_ms),
        tls: service::ServiceTls::load(&args.tls).context("--tls-cert/--tls-key")?,
        peer_tls: args.peer_tls.client_config().context("--tls-ca")?,
    };
    if !config.fault_sync_delay.is_zero() {
        tracing::warn!(
            fault_sync_delay_ms = args.fault_sync_delay_ms,
            "FAULT INJECTION: every WAL sync is delayed (--fault-sync-delay-ms, for tests only)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(service::run(config));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    result
}
