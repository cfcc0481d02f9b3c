//! A quorum-commit cluster for tests: a real PostgreSQL 15 primary whose
//! commits wait for `compute_shim` (its only synchronous standby), three
//! `safekeeper` processes, and bounded waits on their HTTP status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use serde_json::Value;

use crate::fixture::wait_for;
use crate::pg::{PgCluster, PgOptions};
use crate::processes::{ComputeShim, Safekeeper, SafekeeperPorts, ShimArgs};

pub const TENANT: &str = "0123456789abcdef0123456789abcdef";
pub const TIMELINE: &str = "fedcba9876543210fedcba9876543210";
/// What Postgres's synchronous_standby_names waits for.
pub const SHIM_APPLICATION_NAME: &str = "safekeepers";
pub const SHIM_SLOT: &str = "safekeepers";
pub const SAFEKEEPER_COUNT: usize = 3;
/// WAL a load must have committed before a test acts "under load" (see
/// [`QuorumCluster::wait_commit_progress`]): some hundred small
/// transactions, so the load is past its start and commits flow.
pub const LOAD_RUNNING_BYTES: u64 = 64 << 10;
/// How long a fresh shim may take to be elected and streaming.
pub const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the safekeepers are started knowing each other (`--peer-http`).
#[derive(Clone, Copy)]
enum PeerRecovery {
    On,
    Off,
}

pub struct QuorumCluster {
    /// Declared first so the processes stop before their directories go.
    pub shim: Option<ComputeShim>,
    pub safekeepers: Vec<Safekeeper>,
    pub pg: PgCluster,
    pub dir: tempfile::TempDir,
    /// Where the shim connects instead of the safekeepers' own pg ports
    /// (fault proxies in front of them, say).
    pub shim_targets: Option<Vec<SocketAddr>>,
    /// Flags every shim this cluster starts is given (`--max-buffered-wal-mib 8`, ...).
    pub shim_extra_args: Vec<String>,
}

impl QuorumCluster {
    /// Postgres with `options` plus the quorum-commit settings, three
    /// safekeepers, and an elected shim.
    /// Settings in `options` come last, so a test can override these.
    pub fn start(options: PgOptions) -> Result<QuorumCluster> {
        let mut cluster = QuorumCluster::start_without_shim(options)?;
        cluster.start_shim()?;
        Ok(cluster)
    }

    /// Postgres and three safekeepers; the caller starts the shim (after
    /// setting `shim_targets`, say).
    pub fn start_without_shim(options: PgOptions) -> Result<QuorumCluster> {
        QuorumCluster::start_safekeepers(options, PeerRecovery::On, &[])
    }

    /// As [`QuorumCluster::start_without_shim`], every safekeeper also
    /// given `safekeeper_args` (`--wal-keep-bytes N`, ...).
    pub fn start_without_shim_with(options: PgOptions, safekeeper_args: &[String]) -> Result<QuorumCluster> {
        QuorumCluster::start_safekeepers(options, PeerRecovery::On, safekeeper_args)
    }

    /// As [`QuorumCluster::start`], but the safekeepers do not know each
    /// other: no peer recovery (what the shim does alone).
    pub fn start_without_peer_recovery(options: PgOptions) -> Result<QuorumCluster> {
        let mut cluster = QuorumCluster::start_safekeepers(options, PeerRecovery::Off, &[])?;
        cluster.start_shim()?;
        Ok(cluster)
    }

    fn start_safekeepers(
        mut options: PgOptions,
        peer_recovery: PeerRecovery,
        safekeeper_args: &[String],
    ) -> Result<QuorumCluster> {
        let quorum_settings = [
            ("synchronous_standby_names", format!("'{SHIM_APPLICATION_NAME}'")),
            ("synchronous_commit", "on".to_string()),
            // pg_wal keeps everything, so tests can compare it byte for byte.
            ("wal_keep_size", "1GB".to_string()),
        ];
        let quorum_settings = quorum_settings.into_iter().map(|(name, value)| (name.to_string(), value));
        options.settings.splice(0..0, quorum_settings);
        let mut pg = PgCluster::init(options)?;
        pg.start()?;
        let dir = tempfile::Builder::new().prefix("quorum-").tempdir()?;
        // Reserved, not port 0: each is told its peers' addresses at start.
        let ports: Vec<_> = (0..SAFEKEEPER_COUNT).map(|_| SafekeeperPorts::reserve()).collect::<Result<_>>()?;
        let safekeepers = (0..SAFEKEEPER_COUNT)
            .map(|index| {
                let peers = ports.iter().enumerate().filter(|&(other, _)| other != index);
                let mut args: Vec<String> = match peer_recovery {
                    PeerRecovery::On => {
                        peers.flat_map(|(_, peer)| ["--peer-http".to_string(), peer.http.addr().to_string()]).collect()
                    }
                    PeerRecovery::Off => vec![],
                };
                args.extend_from_slice(safekeeper_args);
                let id = index as u64 + 1;
                Safekeeper::start_reserved(id, &dir.path().join(format!("sk{id}")), ports[index].clone(), args)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(QuorumCluster { shim: None, safekeepers, pg, dir, shim_targets: None, shim_extra_args: Vec::new() })
    }

    /// Postgres connection options naming this cluster's tenant and
    /// timeline (what a replication client of a safekeeper passes).
    pub fn timeline_options() -> String {
        format!("-c tenant_id={TENANT} -c timeline_id={TIMELINE}")
    }

    /// A hot standby of the primary (a base backup) streaming from
    /// safekeeper `index`'s pg port, as docs/failover.md sets one up, with
    /// the default recovery_target_timeline (latest). Started.
    pub fn start_standby_fed_by(&self, index: usize, options: PgOptions) -> Result<PgCluster> {
        let port = self.safekeepers[index].pg_addr.port();
        let tls = crate::secure::security()
            .map(|security| format!(" {} password={}", security.libpq_conninfo(), security.data_token))
            .unwrap_or_default();
        let conninfo =
            format!("'host=127.0.0.1 port={port} user=postgres options=''{}''{tls}'", Self::timeline_options());
        let standby_options = options
            .setting("hot_standby", "on")
            .setting("synchronous_standby_names", "''")
            .setting("primary_conninfo", &conninfo);
        let mut standby = PgCluster::from_base_backup(&self.pg, standby_options, "stream")?;
        standby.write_data_file("standby.signal", "")?;
        standby.start()?;
        Ok(standby)
    }

    pub fn shim_args(&self) -> ShimArgs {
        ShimArgs {
            pg_conninfo: self.pg.connection_string("postgres"),
            safekeepers: self.shim_targets.clone().unwrap_or_else(|| self.safekeeper_addrs()),
            tenant_id: TENANT.to_string(),
            timeline_id: TIMELINE.to_string(),
            application_name: SHIM_APPLICATION_NAME.to_string(),
            slot: SHIM_SLOT.to_string(),
            extra: self.shim_extra_args.clone(),
        }
    }

    pub fn safekeeper_addrs(&self) -> Vec<SocketAddr> {
        self.safekeepers.iter().map(|sk| sk.pg_addr).collect()
    }

    /// Start a shim with the default arguments and wait until it is elected.
    pub fn start_shim(&mut self) -> Result<Value> {
        let mut shim = ComputeShim::start(&self.shim_args(), self.dir.path())?;
        let status = shim.wait_elected(ELECTION_TIMEOUT)?;
        self.shim = Some(shim);
        Ok(status)
    }

    pub fn shim(&self) -> Result<&ComputeShim> {
        self.shim.as_ref().context("no compute_shim running")
    }

    pub fn segment_size(&self) -> Result<WalSegmentSize> {
        Ok(WalSegmentSize::new(self.pg.wal_segment_size_bytes())?)
    }

    /// `<datadir>/<tenant>/<timeline>` of safekeeper `index`.
    pub fn timeline_dir(&self, index: usize) -> PathBuf {
        self.safekeepers[index].datadir.join(TENANT).join(TIMELINE)
    }

    pub fn timeline_status(&self, index: usize) -> Result<Value> {
        let (code, body) = self.safekeepers[index].http_get(&format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}"))?;
        if code != 200 {
            bail!("safekeeper {index} timeline status answered {code}: {body}");
        }
        Ok(body)
    }

    /// SIGKILL safekeeper `index`.
    pub fn kill_safekeeper(&mut self, index: usize) -> Result<()> {
        self.safekeepers[index].process.kill()
    }

    /// Start safekeeper `index` again on its data directory and ports.
    pub fn restart_safekeeper(&mut self, index: usize) -> Result<()> {
        let restarted = self.safekeepers[index].restart()?;
        self.safekeepers[index] = restarted;
        Ok(())
    }

    /// SIGKILL safekeeper `index` and start it again with `extra_args` in
    /// place of its flags (its peers included: extend its `extra_args` to
    /// keep them), on its data directory and ports.
    pub fn restart_safekeeper_with_args(&mut self, index: usize, extra_args: Vec<String>) -> Result<()> {
        self.kill_safekeeper(index)?;
        let restarted = self.safekeepers[index].restart_with_args(extra_args)?;
        self.safekeepers[index] = restarted;
        Ok(())
    }

    /// Safekeeper `index`'s flush LSN.
    pub fn safekeeper_flush_lsn(&self, index: usize) -> Result<Lsn> {
        json_lsn(&self.timeline_status(index)?, "flush_lsn")
    }

    pub fn pg_flush_lsn(&self) -> Result<Lsn> {
        Ok(self.pg.psql("SELECT pg_current_wal_flush_lsn()")?.parse()?)
    }

    pub fn shim_commit_lsn(&self) -> Result<Lsn> {
        json_lsn(&self.shim()?.status()?, "commit_lsn")
    }

    /// Wait until the shim's commit LSN reaches `lsn`; returns it.
    pub fn wait_shim_commit(&self, lsn: Lsn, timeout: Duration) -> Result<Lsn> {
        wait_for(timeout, &format!("compute_shim commit to reach {lsn}"), || {
            let commit = self.shim_commit_lsn()?;
            Ok((commit >= lsn).then_some(commit))
        })
    }

    /// Wait until the shim's commit LSN has moved `bytes` past where it is
    /// now: a load started meanwhile is running and committing (what a
    /// test that acts "under load" waits for, instead of a fixed sleep).
    pub fn wait_commit_progress(&self, bytes: u64, timeout: Duration) -> Result<Lsn> {
        let target = self.shim_commit_lsn()? + bytes;
        self.wait_shim_commit(target, timeout)
    }

    /// Wait until safekeeper `index` has flushed `lsn`.
    pub fn wait_safekeeper_flush(&self, index: usize, lsn: Lsn, timeout: Duration) -> Result<()> {
        wait_for(timeout, &format!("safekeeper {index} to flush {lsn}"), || {
            Ok((self.safekeeper_flush_lsn(index)? >= lsn).then_some(()))
        })
    }

    /// Where the safekeepers' timeline begins (a segment start).
    pub fn timeline_start_lsn(&self, index: usize) -> Result<Lsn> {
        json_lsn(&self.timeline_status(index)?, "timeline_start_lsn")
    }
}

/// Membership changes: new safekeepers, shims started with another list.
impl QuorumCluster {
    /// Start a new safekeeper `id` on an empty data directory and ports
    /// the kernel picks, knowing the safekeepers at `peers` (indexes) for peer
    /// recovery; returns its index. It serves nothing until a shim that
    /// counts it creates the timeline there.
    pub fn add_safekeeper(&mut self, id: u64, peers: &[usize]) -> Result<usize> {
        let peer_args = peers
            .iter()
            .flat_map(|&peer| ["--peer-http".to_string(), self.safekeepers[peer].http_addr.to_string()])
            .collect();
        let datadir = self.dir.path().join(format!("sk{id}"));
        let safekeeper = Safekeeper::start_with_args(id, &datadir, peer_args)?;
        self.safekeepers.push(safekeeper);
        Ok(self.safekeepers.len() - 1)
    }

    /// The pg addresses of the safekeepers at `indexes`.
    pub fn pg_addrs(&self, indexes: &[usize]) -> Vec<SocketAddr> {
        indexes.iter().map(|&index| self.safekeepers[index].pg_addr).collect()
    }

    /// Start a shim with `--safekeepers` = the safekeepers at `indexes`
    /// without waiting for its election (it replaces any shim held).
    pub fn spawn_shim_with(&mut self, indexes: &[usize]) -> Result<()> {
        let mut args = self.shim_args();
        args.safekeepers = self.pg_addrs(indexes);
        self.shim = None;
        self.shim = Some(ComputeShim::start(&args, self.dir.path())?);
        Ok(())
    }

    /// [`QuorumCluster::spawn_shim_with`], then wait until it is elected.
    pub fn start_shim_with(&mut self, indexes: &[usize]) -> Result<Value> {
        self.spawn_shim_with(indexes)?;
        self.shim.as_mut().context("just started")?.wait_elected(ELECTION_TIMEOUT)
    }

    /// Wait until the shim has no change under way and counts in a single
    /// configuration of exactly the safekeepers at `indexes`; returns its
    /// `GET /v1/membership`.
    pub fn wait_membership(&self, indexes: &[usize], timeout: Duration) -> Result<Value> {
        let wanted: std::collections::BTreeSet<String> =
            self.pg_addrs(indexes).iter().map(SocketAddr::to_string).collect();
        wait_for(timeout, &format!("the shim's configuration to become {wanted:?}"), || {
            let membership = self.shim()?.membership()?;
            let members: std::collections::BTreeSet<String> = membership["members"]
                .as_array()
                .context("members")?
                .iter()
                .filter_map(|member| member["pg_addr"].as_str().map(str::to_string))
                .collect();
            let settled = membership["change"].is_null() && membership["joint_new"].is_null();
            Ok((settled && members == wanted).then_some(membership))
        })
        .with_context(|| {
            let now = self.shim().and_then(ComputeShim::membership).map(|m| m.to_string()).unwrap_or_default();
            let log = self.shim().map(|shim| shim.process.log_tail()).unwrap_or_default();
            format!("the shim's membership now: {now}\nits log ends: {log}")
        })
    }
}

/// An LSN field ("X/Y") of a JSON status.
pub fn json_lsn(value: &Value, field: &str) -> Result<Lsn> {
    let text = value[field].as_str().with_context(|| format!("no {field} in {value}"))?;
    Ok(text.parse()?)
}
