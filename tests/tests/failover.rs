//! The primary's machine dies (issue 14; docs/failover.md): its Postgres
//! and its compute_shim are killed while a commit loop records every
//! acknowledged commit, then `compute_shim sync-safekeepers` makes the
//! safekeepers' log final. Checked: every acknowledged commit is at or
//! below the LSN the sync prints and its commit record is on every
//! safekeeper the sync reached; a repeated sync prints the same LSN; a shim
//! still running for the old primary is fenced; a hot standby fed by a
//! safekeeper receives everything up to that LSN and, promoted, holds
//! every acknowledged row; the sync fails with one clear line when no
//! quorum answers or the ids name no timeline.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, LOAD_RUNNING_BYTES, TENANT, TIMELINE};
use integration_tests::commit_loop::{CommitLoop, CommitReport};
use integration_tests::fixture::wait_for;
use integration_tests::pg::PgOptions;
use integration_tests::processes::{sync_safekeepers, SyncRun, EXIT_TIMEOUT};
use integration_tests::wal_files::committed_xids;
use nix::sys::signal::Signal;
use postgres_wal::lsn::Lsn;

/// A commit that must go through, and the commit loop's last one.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// `--timeout-s` of a sync that must succeed.
const SYNC_TIMEOUT_S: u64 = 30;
/// `--timeout-s` of a sync that must fail for want of a quorum.
const NO_QUORUM_TIMEOUT_S: u64 = 3;
/// How long the commit loop runs before the machine dies.
const LOAD_BEFORE_DEATH: Duration = Duration::from_millis(1500);

/// 1 MiB segments: the load crosses segment boundaries.
fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// How the primary's machine dies.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// Postgres and the shim SIGKILLed together.
    Both,
    /// Postgres first, the shim a moment later (it sees its stream end).
    PostgresFirst,
    /// The shim first, then Postgres (commits already wait for nobody).
    ShimFirst,
    /// The shim frozen (SIGSTOP) with Postgres still up, as an isolated old
    /// primary would be, through the sync; then resumed, it must find
    /// itself fenced and exit, and only then does Postgres die.
    ShimFrozen,
}

/// Kill the primary's processes as `death` says; a frozen shim is
/// returned, still in `cluster.shim`.
fn kill_primary(cluster: &mut QuorumCluster, death: Death) -> Result<()> {
    let shim = cluster.shim.as_mut().context("a shim is running")?;
    match death {
        Death::Both => {
            shim.process.signal(Signal::SIGKILL)?;
            cluster.pg.kill()?;
        }
        Death::PostgresFirst => {
            cluster.pg.kill()?;
            std::thread::sleep(Duration::from_millis(50));
            shim.process.kill()?;
        }
        Death::ShimFirst => {
            shim.process.kill()?;
            std::thread::sleep(Duration::from_millis(50));
            cluster.pg.kill()?;
        }
        Death::ShimFrozen => {
            shim.process.signal(Signal::SIGSTOP)?;
            return Ok(());
        }
    }
    cluster.shim = None;
    Ok(())
}

fn sync(cluster: &QuorumCluster, addrs_of: &[usize], timeout_s: u64) -> Result<SyncRun> {
    let addrs = cluster.pg_addrs(addrs_of);
    sync_safekeepers(&addrs, TENANT, TIMELINE, timeout_s, cluster.dir.path())
}

/// Every acknowledged commit has its commit record at or below `synced` on
/// each safekeeper of `indexes`, whose commit LSN is now `synced`.
fn check_acknowledged_held(
    cluster: &QuorumCluster,
    report: &CommitReport,
    synced: Lsn,
    indexes: &[usize],
) -> Result<()> {
    let segment_size = cluster.segment_size()?;
    let acked: HashSet<u32> = report.xids.iter().copied().collect();
    for &index in indexes {
        let status = cluster.timeline_status(index)?;
        let commit = json_lsn(&status, "commit_lsn")?;
        ensure!(commit == synced, "safekeeper {index} has commit LSN {commit}, the sync printed {synced}");
        let start = json_lsn(&status, "timeline_start_lsn")?;
        let held = committed_xids(&cluster.timeline_dir(index), segment_size, start, synced)?;
        let missing = acked.difference(&held).count();
        ensure!(
            missing == 0,
            "{missing} of {} acknowledged commits are not on safekeeper {index} below {synced}",
            acked.len()
        );
    }
    Ok(())
}

/// Test: rounds of the primary's machine dying under a commit loop, each
/// followed by a sync, a repeated sync, and the old primary restarted (as
/// the continuation of the same log) for the next round.
#[test]
fn a_sync_after_the_primary_dies_holds_every_acknowledged_commit() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    let all = [0, 1, 2];
    let mut acknowledged = 0;
    for death in [Death::Both, Death::PostgresFirst, Death::ShimFirst, Death::ShimFrozen] {
        let commits = CommitLoop::start(&cluster.pg)?;
        cluster.wait_commit_progress(LOAD_RUNNING_BYTES, COMMIT_TIMEOUT).with_context(|| {
            let shim_log = cluster.shim.as_ref().map(|shim| shim.process.log_tail()).unwrap_or_default();
            format!("before {death:?}; shim log: {shim_log}\npostgres log: {}", cluster.pg.log_tail())
        })?;
        std::thread::sleep(LOAD_BEFORE_DEATH);
        let died_at = Instant::now();
        kill_primary(&mut cluster, death)?;
        let run = sync(&cluster, &all, SYNC_TIMEOUT_S)?;
        let synced = run.commit_lsn()?;
        let sync_took = died_at.elapsed();
        if let Death::ShimFrozen = death {
            let shim = cluster.shim.as_mut().context("the frozen shim")?;
            shim.process.signal(Signal::SIGCONT)?;
            let exit = shim.process.wait_exit(EXIT_TIMEOUT)?.context("the resumed old shim did not exit")?;
            ensure!(!exit.success(), "the old shim exited 0 after the sync");
            let log = shim.process.log_tail();
            ensure!(log.contains("fenced"), "the resumed old shim did not exit fenced: {log}");
            cluster.shim = None;
            cluster.pg.kill()?;
        }
        let report = commits.finish(COMMIT_TIMEOUT)?;
        ensure!(report.ended_by.is_some(), "the commit loop went on after {death:?}");
        ensure!(!report.xids.is_empty(), "no commit acknowledged before {death:?}");
        check_acknowledged_held(&cluster, &report, synced, &all)
            .with_context(|| format!("after {death:?}; the sync's log: {}", run.stderr))?;
        let again = sync(&cluster, &all, SYNC_TIMEOUT_S)?.commit_lsn()?;
        ensure!(again == synced, "a repeated sync printed {again}, the first {synced}");
        acknowledged += report.xids.len();
        println!(
            "{death:?}: {} commits acknowledged, 0 lost, synced at {synced} in {sync_took:?} after the machine died",
            report.xids.len()
        );
        cluster.pg.start()?;
        cluster.start_shim()?;
    }
    println!("all rounds: {acknowledged} acknowledged, 0 lost");
    Ok(())
}

/// Test: a safekeeper dies with the primary's machine; the sync completes
/// with the other two, and the third catches up once it and the old
/// primary are back. With two safekeepers down the sync fails within its
/// timeout, and with ids that name no timeline at once, each with one line.
#[test]
fn a_sync_needs_a_quorum_and_the_timeline() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    let commits = CommitLoop::start(&cluster.pg)?;
    cluster.wait_commit_progress(LOAD_RUNNING_BYTES, COMMIT_TIMEOUT)?;
    cluster.kill_safekeeper(2)?;
    kill_primary(&mut cluster, Death::Both)?;
    let report = commits.finish(COMMIT_TIMEOUT)?;
    let synced = sync(&cluster, &[0, 1, 2], SYNC_TIMEOUT_S)?.commit_lsn()?;
    check_acknowledged_held(&cluster, &report, synced, &[0, 1])?;
    println!("with safekeeper 2 down: {} acknowledged, 0 lost, synced at {synced}", report.xids.len());

    cluster.kill_safekeeper(1)?;
    let started = Instant::now();
    let no_quorum = sync(&cluster, &[0, 1, 2], NO_QUORUM_TIMEOUT_S)?;
    ensure!(!no_quorum.status.success(), "a sync with one of three safekeepers succeeded: {}", no_quorum.stdout);
    ensure!(
        no_quorum.stderr_last_line().contains("no quorum"),
        "unclear failure without a quorum: {:?}",
        no_quorum.stderr_last_line()
    );
    ensure!(started.elapsed() < Duration::from_secs(NO_QUORUM_TIMEOUT_S) + EXIT_TIMEOUT);

    cluster.restart_safekeeper(1)?;
    cluster.restart_safekeeper(2)?;
    let wrong_ids = sync_safekeepers(
        &cluster.safekeeper_addrs(),
        TENANT,
        "00000000000000000000000000000001",
        SYNC_TIMEOUT_S,
        cluster.dir.path(),
    )?;
    ensure!(!wrong_ids.status.success(), "a sync of an unknown timeline succeeded");
    ensure!(
        wrong_ids.stderr_last_line().contains("no safekeeper holds timeline"),
        "unclear failure for unknown ids: {:?}",
        wrong_ids.stderr_last_line()
    );

    // The old primary comes back as the continuation of the synced log;
    // the safekeeper that was down catches up.
    cluster.pg.start()?;
    cluster.start_shim()?;
    cluster.pg.psql("INSERT INTO acked (n, xid) VALUES (-1, txid_current())")?;
    let commit = cluster.shim_commit_lsn()?;
    cluster.wait_safekeeper_flush(2, commit, COMMIT_TIMEOUT)?;
    Ok(())
}

/// Test: a hot standby streaming from a safekeeper receives everything up
/// to the synced LSN once the primary's machine died, and promoted holds
/// every acknowledged row.
#[test]
fn a_standby_fed_by_a_safekeeper_is_promoted_with_every_acknowledged_commit() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql(integration_tests::commit_loop::CREATE_TABLE)?;
    let standby = cluster.start_standby_fed_by(0, options())?;

    let commits = CommitLoop::start(&cluster.pg)?;
    cluster.wait_commit_progress(LOAD_RUNNING_BYTES, COMMIT_TIMEOUT)?;
    std::thread::sleep(LOAD_BEFORE_DEATH);
    let died_at = Instant::now();
    kill_primary(&mut cluster, Death::Both)?;
    let report = commits.finish(COMMIT_TIMEOUT)?;
    let synced = sync(&cluster, &[0, 1, 2], SYNC_TIMEOUT_S)?.commit_lsn()?;
    wait_for(COMMIT_TIMEOUT, &format!("the standby to receive {synced}"), || {
        let received: Lsn = standby.psql("SELECT pg_last_wal_receive_lsn()")?.parse()?;
        Ok((received >= synced).then_some(()))
    })
    .with_context(|| format!("standby log: {}", standby.log_tail()))?;
    standby.psql("SELECT pg_promote(wait => true)")?;
    let promoted_in = died_at.elapsed();
    let rows = standby.psql("SELECT xid % 4294967296 FROM acked")?;
    let present: HashSet<u32> = rows.lines().filter_map(|line| line.trim().parse().ok()).collect();
    let lost = report.xids.iter().filter(|xid| !present.contains(xid)).count();
    println!(
        "standby promoted {promoted_in:?} after the machine died: {} acknowledged, {lost} lost",
        report.xids.len()
    );
    ensure!(lost == 0, "{lost} acknowledged commits missing on the promoted standby");
    Ok(())
}
