//! The shim as a long-running service (issue 15; docs/operations.md, "The
//! shim as a service"), with a real PostgreSQL 15 and three safekeepers:
//!
//! - SIGTERM under a commit loop: it steps down (takes no more WAL, the WAL
//!   it took reaches a quorum), exits 0 within the bound, and a new shim
//!   goes on where it stopped;
//! - Postgres restarted (fast and immediate) and down for seconds: the
//!   shim stays up, retries with a backoff, and commits resume in a new
//!   term once Postgres is back;
//! - a role Postgres refuses: exit status 7 at once, not a retry loop.
//!
//! The other refusals' statuses (fenced 3, another system 4, a Postgres
//! behind the log 5) are checked where those refusals are: quorum_commit.rs.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, ELECTION_TIMEOUT};
use integration_tests::commit_loop::CommitLoop;
use integration_tests::fixture::wait_for;
use integration_tests::pg::PgOptions;
use integration_tests::processes::{ComputeShim, EXIT_TIMEOUT};
use nix::sys::signal::Signal;
use postgres_wal::lsn::Lsn;

/// `--step-down-timeout-ms` here: the shim must be gone well within it
/// plus the time to notice and log.
const STEP_DOWN_TIMEOUT: Duration = Duration::from_secs(5);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Postgres stays down this long: several backoff steps (100 ms doubling
/// to 2 s), each a failed connect.
const POSTGRES_DOWN: Duration = Duration::from_secs(6);

fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// The `commit_lsn=X/Y` of the shim's step-down log line.
fn stepped_down_commit(log: &str) -> Result<Lsn> {
    let line = log
        .lines()
        .find(|line| line.contains("stepped down: all WAL taken from Postgres is committed"))
        .with_context(|| format!("no step-down line in the shim's log: {log}"))?;
    let field = line.split_whitespace().find_map(|word| word.strip_prefix("commit_lsn=")).context(line.to_string())?;
    Ok(field.parse()?)
}

/// Test: SIGTERM while a client commits as fast as it can: exit 0 within
/// the step-down bound, every byte the shim took is flushed on a quorum,
/// and a new shim continues the timeline (the waiting commit goes through).
#[test]
fn sigterm_steps_down_and_a_new_shim_goes_on() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    let commits = CommitLoop::start(&cluster.pg)?;
    std::thread::sleep(Duration::from_secs(2));
    let mut shim = cluster.shim.take().context("shim")?;
    let asked = Instant::now();
    shim.process.signal(Signal::SIGTERM)?;
    let exit = shim.process.wait_exit(STEP_DOWN_TIMEOUT + EXIT_TIMEOUT)?.context("the shim ignored SIGTERM")?;
    let took = asked.elapsed();
    let log = shim.process.log_tail();
    ensure!(exit.code() == Some(0), "SIGTERM: exit {exit}, expected 0: {log}");
    ensure!(took < STEP_DOWN_TIMEOUT, "the step-down took {took:?}");
    let commit = stepped_down_commit(&log)?;
    let flushed_on = (0..cluster.safekeepers.len())
        .filter(|&index| {
            cluster.timeline_status(index).and_then(|status| json_lsn(&status, "flush_lsn")).is_ok_and(|f| f >= commit)
        })
        .count();
    ensure!(flushed_on >= 2, "the WAL taken (to {commit}) is flushed on {flushed_on} safekeepers");
    println!("SIGTERM: stepped down in {took:?} at {commit}, flushed on {flushed_on} of 3");

    let before = cluster.pg_flush_lsn()?;
    let restarted = Instant::now();
    cluster.start_shim()?;
    cluster.wait_shim_commit(before, COMMIT_TIMEOUT)?;
    std::thread::sleep(Duration::from_secs(1));
    let report = commits.finish(COMMIT_TIMEOUT)?;
    let after = report.ack_times.iter().filter(|&&at| at > restarted).count();
    ensure!(after > 0, "no commit was acknowledged after the new shim started: {:?}", report.ended_by);
    println!("a new shim: {after} commits acknowledged after it started");
    Ok(())
}

/// Test: Postgres restarted (fast, then immediate) and down for seconds:
/// the shim process stays up, reports that it is waiting, answers a
/// membership request with 503 meanwhile, counts its restarts, and
/// commits go through again in a new term.
#[test]
fn the_shim_rides_out_postgres_restarts() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql("CREATE TABLE acked (v int)")?;
    let mut term = cluster.shim()?.status()?["term"].as_u64().context("term")?;
    for (round, crash) in [false, true].into_iter().enumerate() {
        if crash {
            cluster.pg.stop_immediate()?;
        } else {
            cluster.pg.stop_fast()?;
        }
        let down_at = Instant::now();
        let waiting = wait_for(COMMIT_TIMEOUT, "the shim to notice Postgres is gone", || {
            let status = cluster.shim()?.status()?;
            let state = status["service"]["state"].as_str().unwrap_or_default().to_string();
            Ok((state == "waiting-to-retry" || state == "connecting-to-postgres").then_some(status))
        })?;
        let (code, body) = cluster.shim()?.request_membership(&cluster.safekeeper_addrs())?;
        ensure!(code == 503, "a membership request with Postgres down answered {code}: {body}");
        let last_error = waiting["service"]["last_error"].as_str().unwrap_or_default().to_string();
        ensure!(!last_error.contains("protocol violation"), "a shutting-down walsender misread: {last_error}");
        std::thread::sleep(POSTGRES_DOWN.saturating_sub(down_at.elapsed()));
        let shim = cluster.shim.as_mut().context("shim")?;
        ensure!(
            shim.process.exit_status()?.is_none(),
            "the shim exited with Postgres down: {}",
            shim.process.log_tail()
        );
        cluster.pg.start()?;
        let back_at = Instant::now();
        let status = cluster.shim.as_mut().context("shim")?.wait_elected(ELECTION_TIMEOUT)?;
        let new_term = status["term"].as_u64().context("term")?;
        ensure!(new_term > term, "after the restart the shim is in term {new_term}, before {term}");
        let restarts = status["service"]["restarts"].as_u64().context("restarts")?;
        ensure!(restarts > round as u64, "status counts {restarts} restarts after round {round}");
        cluster.pg.psql_with_timeout(&format!("INSERT INTO acked VALUES ({round})"), COMMIT_TIMEOUT)?;
        println!(
            "Postgres {} and down {POSTGRES_DOWN:?}: shim stayed up ({}), streaming again in term {new_term} {:?} \
             after Postgres was back, {restarts} restarts",
            if crash { "crashed" } else { "stopped fast" },
            last_error,
            back_at.elapsed(),
        );
        term = new_term;
    }
    let count = cluster.pg.psql("SELECT count(*) FROM acked")?;
    ensure!(count.trim() == "2", "acked holds {count}");
    Ok(())
}

/// Test: a role Postgres does not know is a refusal no retry fixes: the
/// shim exits 7 at once with Postgres's message.
#[test]
fn a_refused_role_ends_the_shim_with_status_7() -> Result<()> {
    let cluster = QuorumCluster::start_without_shim(options())?;
    let mut args = cluster.shim_args();
    args.pg_conninfo = format!("host=127.0.0.1 port={} user=no_such_role", cluster.pg.port());
    let mut shim = ComputeShim::spawn(&args, cluster.dir.path())?;
    let exit = shim.process.wait_exit(EXIT_TIMEOUT)?.context("a refused shim kept running")?;
    let log = shim.process.log_tail();
    ensure!(exit.code() == Some(7), "exit {exit}, expected 7: {log}");
    ensure!(log.contains("no_such_role"), "the refusal does not name the role: {log}");
    Ok(())
}
