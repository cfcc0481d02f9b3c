//! `safekeeper` command line. Serving the network protocol arrives with the
//! quorum-commit work; today the binary offers the operator tools built on
//! the core: import a Postgres `pg_wal` into a timeline, and show what a data
//! directory holds (after the same recovery a restart runs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

use safekeeper::acceptor::AcceptorConfig;
use safekeeper::datadir::{ensure_node_id, lock_data_dir};
use safekeeper::ids::{NodeId, TenantId, TimelineId};
use safekeeper::import::{import_pg_wal, timeline_dir, ImportRequest};
use safekeeper::recovery::recover_timeline;
use safekeeper::timeline::FileTimeline;

#[derive(Parser)]
#[command(version, about = "WAL safekeeper for PostgreSQL 15")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
    /// Print every timeline of a data directory as JSON (LSNs as "X/Y"),
    /// after the recovery a restart runs (which zeroes any torn WAL tail).
    Status {
        /// Safekeeper data directory.
        #[arg(long)]
        datadir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("safekeeper: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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

/// `(tenant, timeline)` pairs: directories named by 32-hex ids, two deep.
fn list_timelines(datadir: &Path) -> anyhow::Result<Vec<(TenantId, TimelineId)>> {
    let mut found = vec![];
    for tenant in std::fs::read_dir(datadir).with_context(|| format!("reading {}", datadir.display()))? {
        let tenant = tenant?;
        let Ok(tenant_id) = tenant.file_name().to_string_lossy().parse::<TenantId>() else { continue };
        for timeline in std::fs::read_dir(tenant.path())? {
            if let Ok(timeline_id) = timeline?.file_name().to_string_lossy().parse::<TimelineId>() {
                found.push((tenant_id, timeline_id));
            }
        }
    }
    found.sort();
    Ok(found)
}
