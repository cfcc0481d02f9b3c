//! What the shim learns from Postgres before any safekeeper is contacted:
//! the cluster identity, the segment size, and where its WAL starts.

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::timeline_history::PgTimelineHistory;
use postgres_wal::wal::format::PG15_VERSION_NUM;
use safekeeper_protocol::ids::{ClusterId, SystemId, TenantId, TimelineId};

use super::links::LinkSettings;
use super::sync::TimelineIdentity;
use super::ShimError;
use crate::proposer::{ProposerConfig, ProposerMode, MAX_SAFEKEEPERS};
use crate::replication::{ReplicationClient, ReplicationConfig};

/// Unacknowledged WAL in flight to one safekeeper.
pub const MAX_IN_FLIGHT_BYTES: u64 = 16 << 20;
/// WAL kept for safekeepers that have not flushed it yet (default of
/// `--max-buffered-wal-mib`).
pub const MAX_BUFFERED_WAL_BYTES: u64 = 256 << 20;
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;
/// Default of `--silence-timeout-ms`: 20 heartbeats without an answer.
pub const SILENCE_TIMEOUT_MS: u64 = 20 * HEARTBEAT_INTERVAL_MS;
/// Default of `--step-down-timeout-ms`: plenty for a healthy quorum to
/// flush a full in-flight window, short beside a supervisor's stop timeout
/// (systemd's is 90 s).
pub const STEP_DOWN_TIMEOUT_MS: u64 = 5_000;

/// The bounds an operator may change (flags of the shim).
#[derive(Clone, Copy, Debug)]
pub struct ShimLimits {
    pub max_buffered_wal_bytes: u64,
    pub heartbeat_interval_ms: u64,
    pub silence_timeout_ms: u64,
}

impl Default for ShimLimits {
    fn default() -> Self {
        ShimLimits {
            max_buffered_wal_bytes: MAX_BUFFERED_WAL_BYTES,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            silence_timeout_ms: SILENCE_TIMEOUT_MS,
        }
    }
}

impl ShimLimits {
    /// Operator input: refused with a reason rather than asserted.
    pub fn check(&self) -> Result<(), ShimError> {
        if self.silence_timeout_ms < 2 * self.heartbeat_interval_ms {
            return Err(ShimError::BadArguments(format!(
                "--silence-timeout-ms {} must be at least twice --heartbeat-interval-ms {}: a healthy safekeeper \
                 answers each heartbeat, and must have time to",
                self.silence_timeout_ms, self.heartbeat_interval_ms
            )));
        }
        Ok(())
    }
}

pub struct ShimOptions {
    pub pg_conninfo: String,
    pub safekeepers: Vec<String>,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub application_name: String,
    pub slot: String,
    pub limits: ShimLimits,
    /// Connections to the safekeepers; their TCP liveness and backoff also
    /// apply to Postgres's connection and to retried runs.
    pub links: LinkSettings,
    /// Overrides the connection string's `connect_timeout`.
    pub pg_connect_timeout_ms: Option<u64>,
    /// How long SIGTERM waits for the WAL taken to be committed.
    pub step_down_timeout_ms: u64,
}

pub struct ShimSetup {
    pub client: ReplicationClient,
    pub cluster: ClusterId,
    pub safekeepers: Vec<String>,
    pub slot: String,
    pub pg_timeline: u32,
    /// The ancestors of `pg_timeline` (Postgres's history file).
    pub pg_timelines: PgTimelineHistory,
    pub wal_segment_size: WalSegmentSize,
    /// The segment start of the slot's restart LSN: where a new timeline's WAL begins.
    pub timeline_start_lsn: Lsn,
    /// Postgres's end of WAL when we connected.
    pub pg_flush_lsn: Lsn,
    pub limits: ShimLimits,
}

/// Check a `--safekeepers` list before anything is sent: 1 to
/// `MAX_SAFEKEEPERS` addresses, each `HOST:PORT`, none twice (one
/// safekeeper must never count twice toward a quorum).
pub fn check_safekeeper_list(addrs: &[String]) -> Result<(), ShimError> {
    let refuse = |reason: String| Err(ShimError::BadArguments(reason));
    if !(1..=MAX_SAFEKEEPERS).contains(&addrs.len()) {
        return refuse(format!("--safekeepers lists {} addresses; 1 to {MAX_SAFEKEEPERS} are supported", addrs.len()));
    }
    if let Some(bad) =
        addrs.iter().find(|addr| addr.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()))
    {
        return refuse(format!("safekeeper address {bad:?} is not HOST:PORT"));
    }
    let distinct: std::collections::BTreeSet<&String> = addrs.iter().collect();
    if distinct.len() != addrs.len() {
        return refuse(
            "--safekeepers lists an address twice: one safekeeper must never count twice toward a quorum".into(),
        );
    }
    Ok(())
}

/// Connect to Postgres as a physical replication client and read what the
/// proposer needs; create the slot if it is missing.
/// The Postgres major versions whose WAL this build reads and writes
/// (docs/wal-format.md; 16, 17 and 18 are issue 17).
pub const SUPPORTED_POSTGRES_MAJORS: &[u32] = &[15];

/// Refuse a server of a major version outside [`SUPPORTED_POSTGRES_MAJORS`]:
/// its WAL would be refused by the safekeepers' decoder, so streaming it
/// could only retry forever.
pub fn check_postgres_version(version_num: u32) -> Result<(), ShimError> {
    let major = version_num / 10_000;
    if SUPPORTED_POSTGRES_MAJORS.contains(&major) {
        return Ok(());
    }
    let supported: Vec<String> = SUPPORTED_POSTGRES_MAJORS.iter().map(u32::to_string).collect();
    Err(ShimError::UnsupportedPostgres(format!(
        "PostgreSQL {major} (server_version_num {version_num}) is not supported; supported: {}",
        supported.join(", ")
    )))
}

pub async fn connect_postgres(options: &ShimOptions) -> Result<ShimSetup, ShimError> {
    let mut config = ReplicationConfig::parse(&options.pg_conninfo)?
        .with_application_name(&options.application_name)
        .with_tcp_liveness(options.links.tcp_liveness);
    if let Some(timeout_ms) = options.pg_connect_timeout_ms {
        config = config.with_connect_timeout_ms(timeout_ms);
    }
    let mut client = ReplicationClient::connect(config).await?;
    // Before anything is written anywhere (the slot, a term).
    check_postgres_version(client.show_server_version_num().await?)?;
    let identity = client.identify_system().await?;
    let pg_timelines = client.timeline_history(identity.timeline).await?;
    let segment_size_bytes = client.show_wal_segment_size().await?;
    let wal_segment_size = WalSegmentSize::new(segment_size_bytes)
        .map_err(|e| ShimError::Stopped(format!("Postgres reports an unusable wal_segment_size: {e}")))?;
    client.create_physical_slot_if_missing(&options.slot).await?;
    let slot = client.read_slot(&options.slot).await?;
    // A new slot reserves nothing yet; Postgres still holds the segment of
    // its current flush position.
    let restart_lsn = slot.and_then(|slot| slot.restart_lsn).filter(|lsn| lsn.is_valid()).unwrap_or(identity.xlogpos);
    Ok(ShimSetup {
        client,
        cluster: ClusterId {
            system_id: SystemId(identity.system_id),
            tenant_id: options.tenant_id,
            timeline_id: options.timeline_id,
        },
        safekeepers: options.safekeepers.clone(),
        slot: options.slot.clone(),
        pg_timeline: identity.timeline,
        pg_timelines,
        wal_segment_size,
        timeline_start_lsn: restart_lsn.segment_start(wal_segment_size),
        pg_flush_lsn: identity.xlogpos,
        limits: options.limits,
    })
}

impl ShimSetup {
    pub fn proposer_config(&self) -> ProposerConfig {
        ProposerConfig {
            cluster: self.cluster,
            pg_version: PG15_VERSION_NUM,
            wal_segment_size: self.wal_segment_size,
            safekeepers: self.safekeepers.clone(),
            max_in_flight_bytes: MAX_IN_FLIGHT_BYTES,
            max_buffered_wal_bytes: self.limits.max_buffered_wal_bytes,
            heartbeat_interval_ms: self.limits.heartbeat_interval_ms,
            silence_timeout_ms: self.limits.silence_timeout_ms,
            proposer_id: rand_id(),
            timeline_start_lsn: self.timeline_start_lsn,
            mode: ProposerMode::Stream { postgres_flush_lsn: self.pg_flush_lsn },
            pg_timelines: Some(self.pg_timelines.clone()),
        }
    }
}

/// The proposer of `sync-safekeepers`: the identity the safekeepers gave,
/// the same limits as the shim's; its timeline start is the first segment
/// (a floor below any real log: the donor's retention, not this, says
/// what can no longer be resent).
pub fn sync_proposer_config(identity: &TimelineIdentity, safekeepers: &[String]) -> ProposerConfig {
    let first_segment = postgres_wal::lsn::Lsn(identity.wal_segment_size.bytes());
    ProposerConfig {
        cluster: identity.cluster,
        pg_version: identity.pg_version,
        wal_segment_size: identity.wal_segment_size,
        safekeepers: safekeepers.to_vec(),
        max_in_flight_bytes: MAX_IN_FLIGHT_BYTES,
        max_buffered_wal_bytes: MAX_BUFFERED_WAL_BYTES,
        heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
        silence_timeout_ms: SILENCE_TIMEOUT_MS,
        proposer_id: rand_id(),
        timeline_start_lsn: first_segment,
        mode: ProposerMode::Sync,
        pg_timelines: None,
    }
}

/// A proposer instance id for logs: time and pid are unique enough.
fn rand_id() -> [u8; 16] {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut id = [0u8; 16];
    id[..12].copy_from_slice(&nanos.to_be_bytes()[4..]);
    id[12..].copy_from_slice(&std::process::id().to_be_bytes());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults hold; a silence timeout that leaves no time for a
    /// heartbeat's answer is refused with the reason, not asserted.
    #[test]
    fn limits_are_checked_as_operator_input() {
        assert!(ShimLimits::default().check().is_ok());
        let tight = ShimLimits { heartbeat_interval_ms: 1_000, silence_timeout_ms: 1_500, ..ShimLimits::default() };
        let error = tight.check().unwrap_err().to_string();
        assert!(error.contains("at least twice --heartbeat-interval-ms"), "{error}");
    }
}
