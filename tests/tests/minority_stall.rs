//! A slow or hung minority never stalls commits (issue 15; docs/proposer.md,
//! "The quorum sets the pace"). One safekeeper of three goes wrong while a
//! commit loop measures how long each acknowledgement takes:
//!
//! - faults that outlast the shim's limits: the safekeeper frozen with
//!   SIGSTOP (connected, silent: a hung disk or a frozen VM) or its link
//!   partitioned both ways (past the silence timeout and the links'
//!   TCP_USER_TIMEOUT) while the primary writes many times more WAL than
//!   the shim's buffer holds (a small buffer, set by flag, so that this
//!   runs in seconds). The longest wait during the fault is bounded; once
//!   healed, the safekeeper catches up with bytes identical to the others'.
//!   The long version, minutes and more than 1 GiB: `MINORITY_HANG_S=180
//!   MINORITY_WAL_MIB=1200 cargo test -p integration_tests --test
//!   minority_stall a_hung -- --nocapture`.
//! - slow members: its link delayed by hundreds of milliseconds each way,
//!   or its every fsync (`--fault-sync-delay-ms`). Commits keep the pace of
//!   the other two: the median latency is printed beside the healthy
//!   phase's of the same cluster, and no commit waits anywhere near the
//!   delay (the 10% target is `scripts/bench-gray-failures`', not this
//!   test's). The slow member keeps up once the load stops.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use integration_tests::commit_loop::CommitLoop;
use integration_tests::minority::{mean_sync_seconds, measure_phase, write_wal, FaultedCluster, MinorityFault};
use integration_tests::pg::PgOptions;
use integration_tests::safekeeper_files::same_wal_up_to;

/// The safekeeper that goes wrong.
const IMPAIRED: usize = 2;
/// The shim's WAL buffer here (`--max-buffered-wal-mib`).
const BUFFER_MIB: u64 = 8;
/// WAL written during a fault that outlasts the limits, in MiB: many
/// buffers' worth (`MINORITY_WAL_MIB` for more).
const WAL_DURING_FAULT_MIB: u64 = 8 * BUFFER_MIB;
const SILENCE_TIMEOUT_MS: u64 = 3_000;
/// The hang lasts at least this long, in seconds: past the silence timeout
/// (`MINORITY_HANG_S` for longer).
const MIN_HANG_S: u64 = 8;
/// The partition lasts at least this long, in seconds: past the silence
/// timeout and the 10 s TCP_USER_TIMEOUT of the shim's link sockets.
const MIN_PARTITION_S: u64 = 12;
/// The longest acknowledgement wait allowed during such a fault (the
/// target is 1 s; a loaded 2-core CI machine gets some slack).
const MAX_COMMIT_WAIT: Duration = Duration::from_secs(3);
const TIMEOUT: Duration = Duration::from_secs(60);

/// A size knob from the environment, `default` when unset.
fn knob(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(text) => Ok(text.parse().map_err(|_| anyhow::anyhow!("{name}={text:?} is not a number"))?),
        Err(_) => Ok(default),
    }
}

fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// Test: with one safekeeper of three SIGSTOPped, commits go on at the
/// pace of the other two however much WAL is written; resumed, it catches
/// up byte-identically.
#[test]
fn a_hung_safekeeper_does_not_stall_commits() -> Result<()> {
    commits_outlast(MinorityFault::Hang, Duration::from_secs(knob("MINORITY_HANG_S", MIN_HANG_S)?))
}

/// Test: with the shim's link to one safekeeper partitioned both ways for
/// longer than every timeout that could notice, commits go on; healed, the
/// safekeeper catches up byte-identically.
#[test]
fn a_partitioned_safekeeper_does_not_stall_commits() -> Result<()> {
    commits_outlast(MinorityFault::Partition, Duration::from_secs(MIN_PARTITION_S))
}

/// `fault` on one safekeeper for at least `min_fault`, while more WAL than
/// the shim's buffer holds is written: commits are acknowledged throughout,
/// none waits longer than [`MAX_COMMIT_WAIT`], and after healing the
/// safekeeper holds the committed WAL with the others' bytes.
fn commits_outlast(fault: MinorityFault, min_fault: Duration) -> Result<()> {
    let shim_args =
        ["--max-buffered-wal-mib", &BUFFER_MIB.to_string(), "--silence-timeout-ms", &SILENCE_TIMEOUT_MS.to_string()]
            .map(String::from);
    let mut faulted = FaultedCluster::start(options(), &shim_args)?;
    let commits = CommitLoop::start(faulted.pg())?;
    std::thread::sleep(Duration::from_secs(1));

    let wal_during_fault_bytes = knob("MINORITY_WAL_MIB", WAL_DURING_FAULT_MIB)? << 20;
    faulted.inject(IMPAIRED, fault)?;
    let fault_at = Instant::now();
    let written = write_wal(&faulted.cluster, wal_during_fault_bytes, min_fault, TIMEOUT)?;
    let healed_at = Instant::now();
    faulted.heal(IMPAIRED, fault)?;
    let report = commits.finish(TIMEOUT)?;
    let during = report.ack_times.iter().filter(|&&at| fault_at <= at && at <= healed_at).count();
    let longest = report.max_stall(fault_at, healed_at);
    println!(
        "{fault} for {:?} while {} MiB of WAL were written ({}x the buffer): {during} commits acknowledged, \
         longest wait {longest:?}",
        healed_at - fault_at,
        written >> 20,
        written / (BUFFER_MIB << 20)
    );
    ensure!(during > 0, "no commit was acknowledged during the fault ({fault})");
    ensure!(longest <= MAX_COMMIT_WAIT, "a commit waited {longest:?} with {fault}");

    // Catching up takes longer the more was written meanwhile.
    let (commit, took) = faulted.wait_caught_up(IMPAIRED, TIMEOUT + (healed_at - fault_at))?;
    println!("healed, the safekeeper caught up to {commit} in {took:?}");
    let cluster = &faulted.cluster;
    same_wal_up_to(&cluster.timeline_dir(0), &cluster.timeline_dir(IMPAIRED), cluster.segment_size()?, commit)?;
    Ok(())
}

/// Each way, on the delayed link.
const LINK_DELAY: Duration = Duration::from_millis(300);
/// Added to each WAL sync of the slow member.
const SYNC_DELAY: Duration = Duration::from_millis(400);
/// How long each phase (healthy, slow) of the commit loop runs.
const PHASE: Duration = Duration::from_secs(4);
/// The longest acknowledgement wait allowed with a slow member: far below
/// either delay, so the slow member never paces a commit.
const MAX_WAIT_WITH_SLOW_MEMBER: Duration = Duration::from_millis(250);

/// Test: a link to one safekeeper delayed by 300 ms each way does not slow
/// commits: the quorum of the two others acknowledges them.
#[test]
fn a_slow_link_to_one_safekeeper_does_not_slow_commits() -> Result<()> {
    commits_keep_pace(MinorityFault::SlowLink(LINK_DELAY)).map(drop)
}

/// Test: a safekeeper whose every fsync takes 400 ms longer does not slow
/// commits, and still keeps up; its syncs really were that slow (its own
/// metrics say so).
#[test]
fn a_safekeeper_with_slow_fsync_does_not_slow_commits() -> Result<()> {
    let faulted = commits_keep_pace(MinorityFault::SlowSync(SYNC_DELAY))?;
    let mean_sync_s = mean_sync_seconds(&faulted.cluster.safekeepers[IMPAIRED])?;
    println!("the slow member's mean WAL sync: {mean_sync_s:.3} s");
    ensure!(mean_sync_s >= SYNC_DELAY.as_secs_f64(), "its syncs took {mean_sync_s} s on average: the fault was off");
    Ok(())
}

/// A healthy phase, then one with `fault` on one safekeeper, each with its
/// own commit loop on the same cluster: no commit of the slow phase waits
/// [`MAX_WAIT_WITH_SLOW_MEMBER`], the slow member makes progress during it
/// and catches up with the others' bytes once the load stops. Returns the
/// cluster, the fault still on.
fn commits_keep_pace(fault: MinorityFault) -> Result<FaultedCluster> {
    let mut faulted = FaultedCluster::start(options(), &[])?;
    let healthy = measure_phase(faulted.pg(), PHASE)?;
    faulted.inject(IMPAIRED, fault)?;
    let flush_before = faulted.cluster.safekeeper_flush_lsn(IMPAIRED)?;
    let slow = measure_phase(faulted.pg(), PHASE)?;
    let flush_after = faulted.cluster.safekeeper_flush_lsn(IMPAIRED)?;
    println!(
        "{fault}: median commit latency {:?} vs {:?} healthy (ratio {:.2}), longest wait {:?} ({:?} healthy), \
         {:.0} vs {:.0} commits/s; the slow member flushed {} bytes meanwhile",
        slow.median,
        healthy.median,
        slow.latency_ratio(&healthy),
        slow.longest,
        healthy.longest,
        slow.commits_per_second(),
        healthy.commits_per_second(),
        flush_after - flush_before,
    );
    ensure!(slow.longest <= MAX_WAIT_WITH_SLOW_MEMBER, "a commit waited {:?} with {fault}", slow.longest);
    ensure!(flush_after > flush_before, "the slow member flushed nothing during the phase ({fault})");
    let (commit, took) = faulted.wait_caught_up(IMPAIRED, TIMEOUT)?;
    println!("the slow member caught up to {commit} in {took:?} once the load stopped");
    let cluster = &faulted.cluster;
    same_wal_up_to(&cluster.timeline_dir(0), &cluster.timeline_dir(IMPAIRED), cluster.segment_size()?, commit)?;
    Ok(faulted)
}
