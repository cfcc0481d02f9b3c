//! `compute_shim sync-safekeepers`: make the safekeepers' log final after
//! the primary is gone, with no Postgres (docs/failover.md).
//!
//! 1. Ask every safekeeper's pg port what the timeline is (IDENTIFY_SYSTEM,
//!    `SHOW wal_segment_size`, `SHOW server_version_num`): the cluster
//!    identity a proposer greets with, which Postgres would otherwise give.
//! 2. Run the proposer in sync mode (`ProposerMode::Sync`): it wins a term
//!    above every term a quorum has seen (which fences any shim still
//!    running for the old primary), and its WAL source is the election's
//!    donor, read over the donor's pg port as that term's proposer
//!    (`START_REPLICATION ... TERM n`, up to the donor's flush LSN).
//! 3. Once a quorum flushed the donor's log end in the new term, that end
//!    is committed; the proposer waits (boundedly) for every safekeeper it
//!    reaches to learn it, and the call returns it.
//!
//! Why every acknowledged commit is at or below the returned LSN: the old
//! shim acknowledged a commit only once a quorum Q1 had flushed it in the
//! old shim's term. The new term's election heard a quorum Q2 of votes; Q1
//! and Q2 share a safekeeper, whose log holds the commit. The donor is the
//! voter with the highest (last log term, flush LSN), and every log with
//! that last term contains the logs of lower last terms up to their
//! commits (Raft's election restriction), so the donor's log holds it too.
//! The returned LSN is the donor's log end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinSet;

use postgres_wal::lsn::WalSegmentSize;
use safekeeper_protocol::ids::{ClusterId, SystemId, TenantId, TimelineId};

use super::ShimError;
use crate::replication::{ReplicationClient, ReplicationConfig, ReplicationError};

/// The user name a sync proposer gives a safekeeper's pg port.
const SYNC_USER: &str = "compute_shim";
/// Time one safekeeper gets to say what the timeline is.
const IDENTIFY_TIMEOUT_MS: u64 = 5_000;

pub struct SyncOptions {
    pub safekeepers: Vec<String>,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    /// The whole sync, identification included.
    pub timeout: Duration,
    /// The token safekeepers that check tokens ask for (`tenant` scope).
    pub auth_token_file: Option<PathBuf>,
    /// `--tls-ca`: TLS to the safekeepers, verify-full against it.
    pub tls_ca: Option<PathBuf>,
}

/// What the safekeepers say the timeline is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineIdentity {
    pub cluster: ClusterId,
    pub pg_version: u32,
    pub wal_segment_size: WalSegmentSize,
}

/// The connection settings for a safekeeper's pg port at `addr` (`H:P`),
/// naming the timeline, with the token of `token_file` as the password,
/// over TLS (verify-full) when given the safekeepers' CA.
pub fn safekeeper_replication_config(
    addr: &str,
    tenant_id: TenantId,
    timeline_id: TimelineId,
    token_file: Option<&Path>,
    tls_ca: Option<&Path>,
) -> Result<ReplicationConfig, ReplicationError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| ReplicationError::Config(format!("safekeeper address {addr:?} is not HOST:PORT")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut config = ReplicationConfig::parse(&format!("host={host} port={port} user={SYNC_USER}"))?;
    if let Some(path) = token_file {
        config.password = Some(auth::token::read_token_file(path).map_err(ReplicationError::Auth)?);
    }
    config.tls = match tls_ca {
        Some(ca) => net::pg_tls::PgClientTls::verify_full(ca),
        None => net::pg_tls::PgClientTls { mode: net::pg_tls::SslMode::Disable, root_certificate: None },
    };
    Ok(config
        .with_application_name("sync-safekeepers")
        .with_connect_timeout_ms(IDENTIFY_TIMEOUT_MS)
        .with_io_timeout_ms(IDENTIFY_TIMEOUT_MS)
        .with_startup_parameter("tenant_id", &tenant_id.to_string())
        .with_startup_parameter("timeline_id", &timeline_id.to_string()))
}

/// Ask one safekeeper what the timeline is.
async fn identify_one(
    config: ReplicationConfig,
    tenant_id: TenantId,
    timeline_id: TimelineId,
) -> Result<TimelineIdentity, ReplicationError> {
    let mut client = ReplicationClient::connect(config).await?;
    let system = client.identify_system().await?;
    let segment_bytes = client.show_wal_segment_size().await?;
    let wal_segment_size = WalSegmentSize::new(segment_bytes)
        .map_err(|error| ReplicationError::protocol(format!("unusable wal_segment_size {segment_bytes}: {error}")))?;
    let rows = client.simple_query("SHOW server_version_num").await?;
    let version_text = rows.first().and_then(|row| row.first()).cloned().flatten().unwrap_or_default();
    let pg_version = version_text
        .parse()
        .map_err(|_| ReplicationError::protocol(format!("server_version_num {version_text:?} is not a number")))?;
    Ok(TimelineIdentity {
        cluster: ClusterId { system_id: SystemId(system.system_id), tenant_id, timeline_id },
        pg_version,
        wal_segment_size,
    })
}

/// Ask every safekeeper at once; the timeline's identity as those holding
/// it agree on it. An error when none answers, when none holds the
/// timeline (the ids name no timeline), or when two disagree.
pub async fn identify_timeline(options: &SyncOptions) -> Result<TimelineIdentity, ShimError> {
    let mut asked = JoinSet::new();
    for addr in &options.safekeepers {
        let token_file = options.auth_token_file.as_deref();
        let tls_ca = options.tls_ca.as_deref();
        let config = safekeeper_replication_config(addr, options.tenant_id, options.timeline_id, token_file, tls_ca)?;
        let (addr, tenant_id, timeline_id) = (addr.clone(), options.tenant_id, options.timeline_id);
        asked.spawn(async move { (addr, identify_one(config, tenant_id, timeline_id).await) });
    }
    let mut found: Option<(String, TimelineIdentity)> = None;
    let mut failures = Vec::new();
    let mut lacking = 0;
    while let Some(answer) = asked.join_next().await {
        let (addr, answer) =
            answer.map_err(|error| ShimError::Stopped(format!("identifying the timeline: {error}")))?;
        match answer {
            Ok(identity) => match &found {
                Some((first, known)) if *known != identity => {
                    return Err(ShimError::Stopped(format!(
                        "safekeepers disagree about timeline {}/{}: {first} says {known:?}, {addr} says {identity:?}",
                        options.tenant_id, options.timeline_id
                    )))
                }
                Some(_) => {}
                None => found = Some((addr, identity)),
            },
            Err(error) => {
                // 42704: the safekeeper answered that it has no such timeline.
                lacking += usize::from(error.sqlstate() == Some("42704"));
                failures.push(format!("{addr}: {error}"));
            }
        }
    }
    let timeline = format!("{}/{}", options.tenant_id, options.timeline_id);
    match found {
        Some((_, identity)) => Ok(identity),
        None if lacking > 0 => Err(ShimError::Stopped(format!(
            "no safekeeper holds timeline {timeline} ({lacking} answered that they do not; {})",
            failures.join("; ")
        ))),
        None => Err(ShimError::Stopped(format!(
            "no safekeeper answered about timeline {timeline} ({})",
            failures.join("; ")
        ))),
    }
}
