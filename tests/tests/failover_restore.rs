//! A new server from a backup when no standby was running (issue 14,
//! docs/failover.md "A new server from a backup"): a base backup of the
//! primary is taken, a commit loop runs, the primary's machine dies, the
//! sync makes the log final, and a server restored from the backup with a
//! `restore_command` that fetches the safekeepers' segments (the last,
//! partly committed one as `<segment>.partial`) replays to the synced LSN,
//! ends recovery on Postgres timeline 2 and holds every acknowledged
//! commit. A shim started for it continues the same safekeeper timeline,
//! and a pageserver_stub that followed the old primary follows across the
//! timeline switch. In the second round a safekeeper dies with the
//! primary's machine: the sync runs with two of three, and the third,
//! restarted later, catches up on the new timeline from its peers (the
//! restored server no longer has the old timeline's WAL to stream).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, LOAD_RUNNING_BYTES, TENANT, TIMELINE};
use integration_tests::commit_loop::CommitLoop;
use integration_tests::fixture::wait_for;
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::processes::{http_get, sync_safekeepers, ComputeShim, PageserverStub};
use integration_tests::safekeeper_files::same_wal_up_to;
use nix::sys::signal::Signal;
use postgres_wal::lsn::Lsn;

/// Any single wait: commits, recovery, election, the stub.
const TIMEOUT: Duration = Duration::from_secs(30);
const SYNC_TIMEOUT_S: u64 = 30;
/// How long the commit loop runs before the machine dies.
const LOAD_BEFORE_DEATH: Duration = Duration::from_millis(1500);

/// 1 MiB segments: the load crosses segment boundaries.
fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// Test: the restore procedure of docs/failover.md loses no acknowledged
/// commit, and the restored server continues the safekeeper timeline.
#[test]
fn a_server_restored_from_a_backup_holds_every_acknowledged_commit_and_continues() -> Result<()> {
    restore_round(None)
}

/// Test: as above with safekeeper 2 killed at the same moment as the
/// primary; restarted after the restored server's shim commits, it catches
/// up on Postgres timeline 2.
#[test]
fn a_safekeeper_that_died_with_the_primary_catches_up_on_the_new_timeline() -> Result<()> {
    restore_round(Some(2))
}

/// Safekeepers `a` and `b` hold the same segment files (names included)
/// with the same bytes below `end`, the last one named for timeline 2.
fn same_files_up_to(cluster: &QuorumCluster, a: usize, b: usize, end: Lsn) -> Result<()> {
    let (dir_a, dir_b) = (cluster.timeline_dir(a), cluster.timeline_dir(b));
    let last = same_wal_up_to(&dir_a, &dir_b, cluster.segment_size()?, end)?;
    ensure!(last.starts_with("00000002"), "the segment holding {end} is not named for timeline 2: {last}");
    Ok(())
}

fn restore_round(dies_with_the_primary: Option<usize>) -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql(integration_tests::commit_loop::CREATE_TABLE)?;
    let stub_http: Vec<_> = cluster.safekeepers.iter().map(|sk| sk.http_addr).collect();
    let stub = PageserverStub::start(&stub_http, TENANT, TIMELINE, &cluster.dir.path().join("pageserver"))?;
    // The documented restore_command: whole segments, else the committed
    // part of the last one.
    let segment_url =
        format!("http://{}/v1/tenant/{TENANT}/timeline/{TIMELINE}/segment", cluster.safekeepers[1].http_addr);
    let restore_command = format!("'curl -sf {segment_url}/%f -o %p || curl -sf {segment_url}/%f.partial -o %p'");
    let restored_options =
        options().setting("restore_command", &restore_command).setting("synchronous_standby_names", "''");
    let mut restored = PgCluster::from_base_backup(&cluster.pg, restored_options, "none")?;

    let commits = CommitLoop::start(&cluster.pg)?;
    cluster.wait_commit_progress(LOAD_RUNNING_BYTES, TIMEOUT)?;
    std::thread::sleep(LOAD_BEFORE_DEATH);
    let died_at = Instant::now();
    cluster.shim.as_mut().context("a shim is running")?.process.signal(Signal::SIGKILL)?;
    cluster.pg.kill()?;
    if let Some(index) = dies_with_the_primary {
        cluster.kill_safekeeper(index)?;
    }
    let report = commits.finish(TIMEOUT)?;
    let synced = sync_safekeepers(&cluster.safekeeper_addrs(), TENANT, TIMELINE, SYNC_TIMEOUT_S, cluster.dir.path())?
        .commit_lsn()?;

    restored.write_data_file("recovery.signal", "")?;
    restored.start()?;
    wait_for(TIMEOUT, "the restored server to end recovery", || {
        Ok((restored.psql("SELECT pg_is_in_recovery()")? == "f").then_some(()))
    })
    .with_context(|| format!("restored server's log: {}", restored.log_tail()))?;
    let recovered_in = died_at.elapsed();
    let timeline: u32 = restored.psql("SELECT timeline_id FROM pg_control_checkpoint()")?.parse()?;
    let rows = restored.psql("SELECT xid % 4294967296 FROM acked")?;
    let present: HashSet<u32> = rows.lines().filter_map(|line| line.trim().parse().ok()).collect();
    let lost = report.xids.iter().filter(|xid| !present.contains(xid)).count();
    println!(
        "restored and promoted on timeline {timeline} {recovered_in:?} after the machine died (synced {synced}): \
         {} acknowledged, {lost} lost",
        report.xids.len()
    );
    ensure!(lost == 0, "{lost} acknowledged commits missing on the restored server");
    ensure!(timeline == 2, "the restored server ended recovery on timeline {timeline}");

    // Its shim continues the safekeeper timeline.
    let mut args = cluster.shim_args();
    args.pg_conninfo = restored.connection_string("postgres");
    restored.psql(&format!("ALTER SYSTEM SET synchronous_standby_names = '{}'", args.application_name))?;
    restored.psql("SELECT pg_reload_conf()")?;
    let mut shim = ComputeShim::start(&args, cluster.dir.path())?;
    shim.wait_elected(TIMEOUT)?;
    restored.psql_with_timeout("INSERT INTO acked (n, xid) VALUES (-1, txid_current())", TIMEOUT)?;
    let committed = json_lsn(&shim.status()?, "commit_lsn")?;
    println!("first commit on the restored server {:?} after the machine died, at {committed}", died_at.elapsed());
    ensure!(committed > synced, "the shim's commit LSN {committed} did not pass the synced {synced}");
    if let Some(index) = dies_with_the_primary {
        cluster.restart_safekeeper(index)?;
        let caught_up_from = Instant::now();
        cluster.wait_safekeeper_flush(index, committed, TIMEOUT)?;
        println!("safekeeper {index} caught up to {committed} on the new timeline in {:?}", caught_up_from.elapsed());
        same_files_up_to(&cluster, index, 0, committed)?;
    }
    for index in 0..cluster.safekeepers.len() {
        let status = cluster.timeline_status(index)?;
        let current = status["pg_timelines"]["current"].as_u64();
        ensure!(current == Some(2), "safekeeper {index} is on Postgres timeline {current:?}: {status}");
    }
    let (code, _) = http_get(cluster.safekeepers[0].http_addr, &format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}"))?;
    ensure!(code == 200, "status answered {code}");

    // The stub decodes across the switch, up to the new commit.
    wait_for(TIMEOUT, &format!("the pageserver_stub to decode up to {committed}"), || {
        let status = stub.status()?;
        let decoded: Option<Lsn> = status["last_record_lsn"].as_str().map(str::parse).transpose()?;
        // The end of the last decoded record: the commit LSN is one.
        Ok(decoded.filter(|&lsn| lsn >= committed).map(|_| ()))
    })
    .with_context(|| format!("stub log: {}", stub.process.log_tail()))?;
    Ok(())
}
