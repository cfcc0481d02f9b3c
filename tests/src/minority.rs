//! Gray failures of one safekeeper of three, which must not slow commits
//! (issue 15; docs/proposer.md, "The quorum sets the pace"): the kinds of
//! fault, how each is injected into a cluster whose shim links all go
//! through fault proxies and how it is healed, and the commit-latency
//! figures of a phase of a commit loop. Shared by
//! `tests/tests/minority_stall.rs` and the benchmark
//! `src/bin/gray_failures.rs` (`scripts/bench-gray-failures`).

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use postgres_wal::lsn::Lsn;

use crate::cluster::QuorumCluster;
use crate::commit_loop::{CommitLoop, CommitReport};
use crate::fault_proxy::{Fault, FaultProxy};
use crate::pg::{PgCluster, PgOptions};
use crate::processes::{http_request, Safekeeper};

/// How long a safekeeper restarted with a fault may take to stream again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// Bounds the commit loop's last commit when a phase ends.
const LOOP_FINISH_TIMEOUT: Duration = Duration::from_secs(60);
/// The first acknowledgements of a phase's loop (connection, first
/// statements) are not its steady pace.
const PHASE_WARM_UP: Duration = Duration::from_millis(500);

/// What goes wrong with one safekeeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinorityFault {
    /// SIGSTOP: connected and silent (a hung disk, a frozen VM).
    Hang,
    /// Every WAL sync takes this much longer (`--fault-sync-delay-ms`; the
    /// safekeeper is restarted with the flag, and again without it).
    SlowSync(Duration),
    /// Every chunk on the shim's link to it waits this long, each way.
    SlowLink(Duration),
    /// Nothing moves on the shim's link to it, either way; the connection
    /// stays open (packets lost, not refused).
    Partition,
}

impl MinorityFault {
    /// Whether the member can catch up only once the fault is healed (it
    /// is frozen or cut off); a merely slow one catches up while slow.
    pub fn blocks_catch_up(&self) -> bool {
        matches!(self, MinorityFault::Hang | MinorityFault::Partition)
    }
}

impl fmt::Display for MinorityFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinorityFault::Hang => write!(f, "one member SIGSTOPped"),
            MinorityFault::SlowSync(delay) => write!(f, "one member's fsync slowed {} ms", delay.as_millis()),
            MinorityFault::SlowLink(delay) => write!(f, "one link delayed {} ms each way", delay.as_millis()),
            MinorityFault::Partition => write!(f, "one member partitioned"),
        }
    }
}

/// A quorum cluster whose shim reaches every safekeeper through its own
/// fault proxy (so a healthy phase pays the same hop as a faulty one).
pub struct FaultedCluster {
    pub cluster: QuorumCluster,
    pub proxies: Vec<FaultProxy>,
    /// Each safekeeper's flags when healthy (its peers).
    healthy_args: Vec<Vec<String>>,
}

impl FaultedCluster {
    /// Postgres with `options`, three safekeepers, the proxies, and an
    /// elected shim started with `shim_args` (`--max-buffered-wal-mib 8`, ...).
    pub fn start(options: PgOptions, shim_args: &[String]) -> Result<FaultedCluster> {
        let mut cluster = QuorumCluster::start_without_shim(options)?;
        let proxies: Vec<FaultProxy> =
            cluster.safekeepers.iter().map(|sk| FaultProxy::start(sk.pg_addr)).collect::<Result<_>>()?;
        cluster.shim_targets = Some(proxies.iter().map(|proxy| proxy.listen_addr).collect());
        cluster.shim_extra_args = shim_args.to_vec();
        cluster.start_shim()?;
        let healthy_args = cluster.safekeepers.iter().map(|sk| sk.extra_args.clone()).collect();
        Ok(FaultedCluster { cluster, proxies, healthy_args })
    }

    pub fn pg(&self) -> &PgCluster {
        &self.cluster.pg
    }

    /// Start `fault` on safekeeper `index`; returns once it is in effect
    /// (a restarted safekeeper streams again).
    pub fn inject(&mut self, index: usize, fault: MinorityFault) -> Result<()> {
        match fault {
            MinorityFault::Hang => self.cluster.safekeepers[index].process.signal(Signal::SIGSTOP)?,
            MinorityFault::SlowSync(delay) => {
                let mut args = self.healthy_args[index].clone();
                args.extend(["--fault-sync-delay-ms".to_string(), delay.as_millis().to_string()]);
                self.restart_streaming(index, args)?;
            }
            MinorityFault::SlowLink(delay) => self.proxies[index].set(Fault::Delay(delay)),
            MinorityFault::Partition => self.proxies[index].set(Fault::Partition),
        }
        Ok(())
    }

    /// End `fault` on safekeeper `index`.
    pub fn heal(&mut self, index: usize, fault: MinorityFault) -> Result<()> {
        match fault {
            MinorityFault::Hang => self.cluster.safekeepers[index].process.signal(Signal::SIGCONT)?,
            MinorityFault::SlowSync(_) => self.restart_streaming(index, self.healthy_args[index].clone())?,
            MinorityFault::SlowLink(_) | MinorityFault::Partition => self.proxies[index].set(Fault::None),
        }
        Ok(())
    }

    /// Restart safekeeper `index` with `args` and wait until it has
    /// flushed a commit made after the restart: it is streaming again, so
    /// what follows measures the fault, not the restart.
    fn restart_streaming(&mut self, index: usize, args: Vec<String>) -> Result<()> {
        self.cluster.restart_safekeeper_with_args(index, args)?;
        // An xid makes the transaction write a commit record.
        self.cluster.pg.psql("SELECT txid_current()")?;
        let committed = self.cluster.pg_flush_lsn()?;
        self.cluster.wait_safekeeper_flush(index, committed, RESTART_TIMEOUT)
    }

    /// Wait until safekeeper `index` has flushed everything the shim
    /// committed so far (the load stopped); returns how long it took.
    pub fn wait_caught_up(&self, index: usize, timeout: Duration) -> Result<(Lsn, Duration)> {
        let started = Instant::now();
        let commit = self.cluster.shim_commit_lsn()?;
        self.cluster.wait_safekeeper_flush(index, commit, timeout)?;
        Ok((commit, started.elapsed()))
    }
}

/// Commit latency of one session over a phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct PhaseFigures {
    pub commits: usize,
    pub seconds: f64,
    /// Median gap between consecutive acknowledgements.
    pub median: Duration,
    /// Longest such gap.
    pub longest: Duration,
}

impl PhaseFigures {
    /// The acknowledgements of `report` in `[from, to]`.
    pub fn between(report: &CommitReport, from: Instant, to: Instant) -> PhaseFigures {
        let mut gaps: Vec<Duration> = report
            .ack_times
            .windows(2)
            .filter(|pair| pair[0] >= from && pair[1] <= to)
            .map(|pair| pair[1] - pair[0])
            .collect();
        gaps.sort();
        PhaseFigures {
            commits: gaps.len(),
            seconds: (to - from).as_secs_f64(),
            median: gaps.get(gaps.len() / 2).copied().unwrap_or_default(),
            longest: report.max_stall(from, to),
        }
    }

    pub fn commits_per_second(&self) -> f64 {
        self.commits as f64 / self.seconds.max(1e-9)
    }

    /// This phase's median latency over `healthy`'s.
    pub fn latency_ratio(&self, healthy: &PhaseFigures) -> f64 {
        self.median.as_secs_f64() / healthy.median.as_secs_f64().max(1e-9)
    }
}

/// Run a commit loop on `pg` for `length` (plus its warm-up) and return
/// its figures after the warm-up.
pub fn measure_phase(pg: &PgCluster, length: Duration) -> Result<PhaseFigures> {
    let commits = CommitLoop::start(pg)?;
    let from = Instant::now() + PHASE_WARM_UP;
    std::thread::sleep(PHASE_WARM_UP + length);
    let to = Instant::now();
    let report = commits.finish(LOOP_FINISH_TIMEOUT)?;
    ensure!(report.ended_by.is_none(), "the commit loop ended early: {:?}", report.ended_by);
    Ok(PhaseFigures::between(&report, from, to))
}

/// Mean duration of `safekeeper`'s WAL syncs since it started, from its
/// `/metrics` (`safekeeper_wal_sync_seconds`, every timeline).
pub fn mean_sync_seconds(safekeeper: &Safekeeper) -> Result<f64> {
    let answer = http_request("GET", safekeeper.http_addr, "/metrics", None, Duration::from_secs(10))?;
    ensure!(answer.status == 200, "GET /metrics answered {}", answer.status);
    let text = String::from_utf8(answer.body).context("/metrics is not UTF-8")?;
    let total = |name: &str| -> f64 {
        text.lines()
            .filter(|line| line.split(['{', ' ']).next() == Some(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let count = total("safekeeper_wal_sync_seconds_count");
    ensure!(count > 0.0, "no WAL sync in {}'s metrics", safekeeper.http_addr);
    Ok(total("safekeeper_wal_sync_seconds_sum") / count)
}

/// Statements of [`write_wal`]: about 4 MiB of WAL each.
const FILLER_TABLE: &str = "CREATE TABLE IF NOT EXISTS filler (x text)";
const FILLER_INSERT: &str = "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 4000)";

/// Write WAL on the primary, each statement a commit that waits for the
/// quorum, until at least `wal_bytes` were written and `min_duration` has
/// passed (a fault held meanwhile outlasts both a buffer and a timeout);
/// each statement may take `statement_timeout`. The writes are spread over
/// `min_duration` (ahead of that pace, it waits), so that the end of a
/// long fault still sees them and the disk is not flooded meanwhile.
/// Returns the bytes written.
pub fn write_wal(
    cluster: &QuorumCluster,
    wal_bytes: u64,
    min_duration: Duration,
    statement_timeout: Duration,
) -> Result<u64> {
    const AHEAD_OF_PACE_WAIT: Duration = Duration::from_millis(100);
    let started = Instant::now();
    cluster.pg.psql_with_timeout(FILLER_TABLE, statement_timeout)?;
    let start_lsn = cluster.pg_flush_lsn()?;
    let mut written = 0;
    loop {
        let elapsed = started.elapsed();
        if written >= wal_bytes && elapsed >= min_duration {
            return Ok(written);
        }
        let due_bytes = wal_bytes as f64 * elapsed.as_secs_f64() / min_duration.as_secs_f64().max(1e-9);
        if written as f64 > due_bytes {
            std::thread::sleep(AHEAD_OF_PACE_WAIT);
            continue;
        }
        cluster.pg.psql_with_timeout(FILLER_INSERT, statement_timeout)?;
        written = cluster.pg_flush_lsn()? - start_lsn;
    }
}
