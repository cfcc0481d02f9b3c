//! pageserver_stub against a real cluster (issue test 4): it keeps up with
//! pgbench, its per-resource-manager record counts equal `pg_waldump
//! --stats` over the same range, it switches safekeepers when its source is
//! SIGKILLed (no gap, no duplicate: the counts still match and the decoder
//! checks every xl_prev), and after a SIGKILL of itself it resumes from its
//! saved position with its counters.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, LOAD_RUNNING_BYTES, TENANT, TIMELINE};
use integration_tests::fixture::{wait_bounded, wait_for};
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::processes::{KillOnDrop, PageserverStub};
use postgres_wal::lsn::Lsn;

const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// Records per resource manager, as `pg_waldump --stats` prints them
/// (rows with a zero count left out).
fn waldump_rmgr_counts(pg: &PgCluster, start: Lsn, end: Lsn) -> Result<BTreeMap<String, u64>> {
    let mut waldump = pg.command("pg_waldump");
    waldump
        .arg("--stats")
        .arg("-p")
        .arg(pg.pg_wal_dir())
        .arg("-s")
        .arg(start.to_string())
        .arg("-e")
        .arg(end.to_string());
    let output = pg.run_checked(waldump, Duration::from_secs(120))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(count)) = (words.next(), words.next()) else { continue };
        if let Ok(count) = count.parse::<u64>() {
            if count > 0 && name != "Total" {
                counts.insert(name.to_string(), count);
            }
        }
    }
    ensure!(!counts.is_empty(), "no statistics in pg_waldump's output:\n{text}");
    Ok(counts)
}

fn stub_rmgr_counts(status: &serde_json::Value) -> Result<BTreeMap<String, u64>> {
    let per_rmgr = status["per_rmgr"].as_object().with_context(|| format!("no per_rmgr in {status}"))?;
    Ok(per_rmgr
        .iter()
        .filter_map(|(name, stats)| stats["records"].as_u64().filter(|&n| n > 0).map(|n| (name.clone(), n)))
        .collect())
}

/// Wait until the stub has decoded everything the quorum committed (the
/// primary's flush LSN once the load stopped); returns its status.
fn wait_caught_up(stub: &PageserverStub, pg: &PgCluster) -> Result<serde_json::Value> {
    let end: Lsn = pg.psql("SELECT pg_current_wal_flush_lsn()")?.parse()?;
    wait_for(CATCH_UP_TIMEOUT, &format!("pageserver_stub to decode up to {end}"), || {
        let status = stub.status()?;
        Ok((json_lsn(&status, "last_record_lsn")? >= end).then_some(status))
    })
    .with_context(|| format!("stub log: {}", stub.process.log_tail()))
}

/// Counts of the stub over [timeline start, its last record] == pg_waldump's.
fn check_counts(cluster: &QuorumCluster, status: &serde_json::Value, start: Lsn) -> Result<()> {
    let end = json_lsn(status, "last_record_lsn")?;
    let expected = waldump_rmgr_counts(&cluster.pg, start, end)?;
    let got = stub_rmgr_counts(status)?;
    ensure!(got == expected, "per-rmgr records over {start}..{end}: stub {got:?}, pg_waldump {expected:?}");
    Ok(())
}

#[test]
fn pageserver_stub_follows_switches_and_resumes() -> Result<()> {
    let mut cluster = QuorumCluster::start(PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() })?;
    let start = cluster.timeline_start_lsn(0)?;
    let http: Vec<_> = cluster.safekeepers.iter().map(|sk| sk.http_addr).collect();
    let stub_dir = cluster.dir.path().join("pageserver");
    let mut stub = PageserverStub::start(&http, TENANT, TIMELINE, &stub_dir)?;

    cluster.pg.pgbench(&["-i", "-s", "2", "-q"])?;
    cluster.pg.pgbench(&["-c", "4", "-T", "4", "-N"])?;
    let status = wait_caught_up(&stub, &cluster.pg)?;
    check_counts(&cluster, &status, start)?;
    ensure!(status["lag_bytes"].as_u64().is_some(), "{status}");

    // It confirmed its position to the safekeepers.
    let saved = json_lsn(&status, "last_record_lsn")?;
    wait_for(CATCH_UP_TIMEOUT, "feedback to reach every safekeeper", || {
        let mut all = true;
        for index in 0..cluster.safekeepers.len() {
            all &= json_lsn(&cluster.timeline_status(index)?, "remote_consistent_lsn")? > start;
        }
        Ok(all.then_some(()))
    })?;

    // Kill the safekeeper it reads from, under load: it switches.
    let source = status["source_safekeeper"].as_str().context("source_safekeeper")?.to_string();
    let source_index = http.iter().position(|a| a.to_string() == source).with_context(|| format!("source {source}"))?;
    let switches_before = status["switches"].as_u64().unwrap_or(0);
    let mut load = cluster.pg.command("pgbench");
    load.args(["-c", "2", "-T", "4", "-N"]).stdout(Stdio::null()).stderr(Stdio::null());
    let mut load = KillOnDrop::new(load.spawn().context("spawning pgbench")?);
    cluster.wait_commit_progress(LOAD_RUNNING_BYTES, CATCH_UP_TIMEOUT)?;
    cluster.kill_safekeeper(source_index)?;
    let exit = wait_bounded(load.child(), Duration::from_secs(60))?;
    ensure!(exit.is_some_and(|s| s.success()), "pgbench under a safekeeper kill: {exit:?}");
    let status = wait_caught_up(&stub, &cluster.pg)?;
    ensure!(status["source_safekeeper"] != source.as_str(), "still reading from the killed {source}: {status}");
    ensure!(status["switches"].as_u64().unwrap_or(0) > switches_before, "{status}");
    check_counts(&cluster, &status, start)?;
    ensure!(json_lsn(&status, "last_record_lsn")? > saved);

    // SIGKILL the stub; the restarted one resumes from its saved position
    // with its counters. (Starting over could not work anyway: its feedback
    // let the safekeepers remove the first segments.)
    cluster.restart_safekeeper(source_index)?;
    stub.process.kill()?;
    let state_text = std::fs::read_to_string(stub_dir.join("pageserver_stub.state.json"))?;
    let state: serde_json::Value = serde_json::from_str(&state_text)?;
    let saved = json_lsn(&state, "last_record_end_lsn")?;
    let saved_records = state["records"].as_u64().context("records in the state file")?;
    ensure!(saved > start && saved_records > 0, "state file: {state}");
    let oldest_kept = json_lsn(&cluster.timeline_status(0)?, "oldest_kept_lsn")?;
    ensure!(oldest_kept > start, "feedback removed the first segments (oldest kept {oldest_kept})");
    stub = stub.restart(TENANT, TIMELINE)?;
    let resumed = stub.status()?;
    ensure!(json_lsn(&resumed, "saved_lsn")? >= saved, "restarted: {resumed}");
    ensure!(resumed["records"].as_u64().unwrap_or(0) >= saved_records, "restarted: {resumed}");
    cluster.pg.pgbench(&["-c", "2", "-T", "2", "-N"])?;
    let status = wait_caught_up(&stub, &cluster.pg)?;
    check_counts(&cluster, &status, start)?;
    Ok(())
}
