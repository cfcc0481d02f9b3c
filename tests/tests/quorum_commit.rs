//! Quorum commit end to end with real processes: a PostgreSQL 15 primary
//! whose only synchronous standby is compute_shim, three safekeepers, and
//! SIGKILLs. What survives is checked against Postgres's own pg_wal, with
//! pg_waldump, and by decoding the safekeepers' committed WAL for the
//! commit records of every transaction a client saw acknowledged.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use integration_tests::cluster::{
    json_lsn, QuorumCluster, ELECTION_TIMEOUT, LOAD_RUNNING_BYTES, SHIM_APPLICATION_NAME,
};
use integration_tests::fixture::{wait_bounded, wait_for};
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::processes::{ComputeShim, KillOnDrop, EXIT_TIMEOUT};
use integration_tests::wal_files::{committed_xids, read_wal, snapshot_files, waldump_lsns};
use postgres_wal::lsn::Lsn;

/// A commit that must go through: well above any election or reconnect.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a commit without a quorum must stay blocked.
const NO_QUORUM_HOLD: Duration = Duration::from_secs(3);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// 1 MiB segments: the tests cross many segment boundaries quickly.
fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// Insert a row in its own transaction and return its xid (low 32 bits,
/// as WAL records carry it). Returns only once Postgres acknowledged the
/// commit, that is once the shim reported a quorum flush past it.
fn insert_acknowledged(pg: &PgCluster, table: &str, value: i64) -> Result<u32> {
    let sql = format!("INSERT INTO {table} VALUES ({value}) RETURNING txid_current() % 4294967296");
    first_line_number(&pg.psql_with_timeout(&sql, COMMIT_TIMEOUT)?)
}

/// psql prints the command tag after RETURNING rows: the xid is line one.
fn first_line_number(output: &str) -> Result<u32> {
    let line = output.lines().next().unwrap_or_default();
    line.trim().parse().with_context(|| format!("expected an xid, psql printed {output:?}"))
}

/// Start `psql -c sql` without waiting for it (killed if the test fails).
fn spawn_psql(pg: &PgCluster, sql: &str) -> Result<KillOnDrop> {
    let mut psql = pg.command("psql");
    psql.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]);
    psql.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(KillOnDrop::new(psql.spawn()?))
}

/// The safekeepers' committed WAL up to the shim's commit LSN, decoded on
/// safekeeper `index` (once it has flushed that far), must hold a commit
/// record for every xid in `acknowledged`. Returns the commit LSN checked.
fn check_acknowledged_committed(cluster: &QuorumCluster, index: usize, acknowledged: &HashSet<u32>) -> Result<Lsn> {
    let commit = cluster.shim_commit_lsn()?;
    cluster.wait_safekeeper_flush(index, commit, CATCH_UP_TIMEOUT).with_context(|| {
        let shim = cluster.shim().and_then(|shim| shim.status()).map(|s| s.to_string()).unwrap_or_default();
        let log = cluster.shim().map(|shim| shim.process.log_tail()).unwrap_or_default();
        format!("compute_shim status: {shim}\nlog: {log}")
    })?;
    let start = cluster.timeline_start_lsn(index)?;
    let committed = committed_xids(&cluster.timeline_dir(index), cluster.segment_size()?, start, commit)?;
    let missing: Vec<_> = acknowledged.difference(&committed).collect();
    ensure!(missing.is_empty(), "acknowledged transactions missing below commit {commit}: {missing:?}");
    Ok(commit)
}

/// Rule: with synchronous_commit=on, commits complete once a quorum has the
/// WAL, and every safekeeper ends up byte-identical to pg_wal.
#[test]
fn commits_complete_and_every_safekeeper_matches_pg_wal() -> Result<()> {
    let cluster = QuorumCluster::start(options())?;
    let pg = &cluster.pg;
    let replication = pg.psql("SELECT application_name, sync_state FROM pg_stat_replication")?;
    ensure!(replication == format!("{SHIM_APPLICATION_NAME}|sync"), "the shim is not the sync standby: {replication}");
    pg.psql("CREATE TABLE acked (v bigint)")?;
    let mut acknowledged = HashSet::new();
    for value in 0..20 {
        acknowledged.insert(insert_acknowledged(pg, "acked", value)?);
    }
    // Enough WAL to cross several 1 MiB segments, with full-page images.
    pg.pgbench(&["-i", "-s", "2", "-q"])?;
    pg.pgbench(&["-c", "4", "-t", "200"])?;

    let flush = cluster.pg_flush_lsn()?;
    let commit = cluster.wait_shim_commit(flush, COMMIT_TIMEOUT)?;
    let segment_size = cluster.segment_size()?;
    let start = cluster.timeline_start_lsn(0)?;
    let primary = read_wal(&pg.pg_wal_dir(), segment_size, start, commit)?;
    for index in 0..cluster.safekeepers.len() {
        cluster.wait_safekeeper_flush(index, commit, CATCH_UP_TIMEOUT)?;
        let ours = read_wal(&cluster.timeline_dir(index), segment_size, start, commit)?;
        ensure!(ours == primary, "safekeeper {index} WAL differs from pg_wal in {start}..{commit}");
    }
    let listed = waldump_lsns(pg, &cluster.timeline_dir(0), start, commit)?;
    ensure!(listed == waldump_lsns(pg, &pg.pg_wal_dir(), start, commit)?, "pg_waldump lists other records");
    ensure!(listed.len() > 10_000, "pgbench wrote many records, pg_waldump listed {}", listed.len());
    check_acknowledged_committed(&cluster, 1, &acknowledged)?;
    Ok(())
}

/// Rule: commit needs a majority. One of three down: commits go on. Two
/// down: a commit waits. One back: it returns, and nothing acknowledged is
/// missing; the last one catches up when it returns.
#[test]
fn commits_survive_a_minority_and_wait_without_a_majority() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql("CREATE TABLE acked (v bigint)")?;
    let mut acknowledged = HashSet::from([insert_acknowledged(&cluster.pg, "acked", 1)?]);

    cluster.kill_safekeeper(2)?;
    for value in 2..10 {
        acknowledged.insert(insert_acknowledged(&cluster.pg, "acked", value)?);
    }

    cluster.kill_safekeeper(1)?;
    let mut blocked = spawn_psql(&cluster.pg, "INSERT INTO acked VALUES (10) RETURNING txid_current() % 4294967296")?;
    if let Some(status) = wait_bounded(blocked.child(), NO_QUORUM_HOLD)? {
        bail!("a commit returned ({status}) with two of three safekeepers down");
    }
    cluster.restart_safekeeper(1)?;
    let Some(status) = wait_bounded(blocked.child(), COMMIT_TIMEOUT)? else {
        bail!("the blocked commit did not return after a safekeeper came back");
    };
    let output = blocked.into_inner().wait_with_output()?;
    ensure!(status.success(), "blocked commit failed: {}", String::from_utf8_lossy(&output.stderr));
    acknowledged.insert(first_line_number(&String::from_utf8(output.stdout)?)?);

    check_acknowledged_committed(&cluster, 0, &acknowledged)?;
    check_acknowledged_committed(&cluster, 1, &acknowledged)?;
    cluster.restart_safekeeper(2)?;
    check_acknowledged_committed(&cluster, 2, &acknowledged)?;
    Ok(())
}

/// Rule: a restarted shim is a new term, continues the log it finds, and
/// loses nothing. pgbench inserts into an insert-only table while the shim
/// is SIGKILLed; every row pgbench saw committed must have its commit
/// record in the safekeepers' committed WAL, with no gap, and no byte below
/// the old commit LSN may change.
#[test]
fn a_shim_killed_under_load_restarts_in_a_higher_term_and_loses_nothing() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    let old_term = cluster.shim()?.status()?["term"].as_u64().context("term")?;
    cluster.pg.psql("CREATE TABLE acked (seq bigserial PRIMARY KEY, xid bigint DEFAULT txid_current())")?;
    let script = cluster.pg.socket_dir().join("insert.sql");
    std::fs::write(&script, "INSERT INTO acked DEFAULT VALUES;\n")?;
    let load_seconds = 12;
    let mut pgbench = cluster.pg.command("pgbench");
    pgbench.args(["-n", "-c", "4", "-T", &load_seconds.to_string(), "-f"]).arg(&script);
    let mut pgbench =
        KillOnDrop::new(pgbench.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?);

    // Under load: commits are flowing.
    let old_commit = cluster.wait_commit_progress(LOAD_RUNNING_BYTES, COMMIT_TIMEOUT)?;
    cluster.shim.as_mut().context("shim")?.process.kill()?;
    let segment_size = cluster.segment_size()?;
    let start = cluster.timeline_start_lsn(0)?;
    // Whichever safekeeper has flushed it holds the bytes below old_commit.
    let holder = (0..cluster.safekeepers.len())
        .find(|&i| cluster.timeline_status(i).and_then(|s| json_lsn(&s, "flush_lsn")).is_ok_and(|f| f >= old_commit))
        .context("no safekeeper holds the old commit LSN")?;
    let before = read_wal(&cluster.timeline_dir(holder), segment_size, start, old_commit)?;
    thread::sleep(Duration::from_secs(1));
    let status = cluster.start_shim()?;
    let new_term = status["term"].as_u64().context("term")?;
    ensure!(new_term > old_term, "restarted shim is in term {new_term}, not above {old_term}");

    let Some(exit) = wait_bounded(pgbench.child(), Duration::from_secs(load_seconds + 60))? else {
        bail!("pgbench did not finish");
    };
    let output = pgbench.into_inner().wait_with_output()?;
    let report = String::from_utf8_lossy(&output.stdout);
    ensure!(exit.success(), "pgbench failed: {report}{}", String::from_utf8_lossy(&output.stderr));
    let processed: u64 = report
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse().ok())
        .with_context(|| format!("no transaction count in {report}"))?;

    let rows = cluster.pg.psql("SELECT xid % 4294967296 FROM acked")?;
    let acknowledged: HashSet<u32> = rows.lines().map(str::parse).collect::<Result<_, _>>()?;
    ensure!(acknowledged.len() as u64 == processed, "{} rows for {processed} acknowledged", acknowledged.len());
    ensure!(processed > 100, "the load committed only {processed} transactions");
    let flush = cluster.pg_flush_lsn()?;
    cluster.wait_shim_commit(flush, COMMIT_TIMEOUT)?;
    for index in 0..cluster.safekeepers.len() {
        let commit = check_acknowledged_committed(&cluster, index, &acknowledged)?;
        let after = read_wal(&cluster.timeline_dir(index), segment_size, start, old_commit)?;
        ensure!(after == before, "safekeeper {index} changed bytes below the old commit {old_commit}");
        let primary = read_wal(&cluster.pg.pg_wal_dir(), segment_size, start, commit)?;
        ensure!(read_wal(&cluster.timeline_dir(index), segment_size, start, commit)? == primary, "differs");
    }
    println!("{processed} transactions acknowledged across a shim restart (term {old_term} -> {new_term})");
    Ok(())
}

/// Write `megabytes` of WAL through acknowledged commits.
fn write_wal(pg: &PgCluster, megabytes: u32) -> Result<()> {
    let rows = megabytes * 8_000;
    pg.psql_with_timeout(
        &format!("CREATE TABLE IF NOT EXISTS filler (v bigint, pad text); INSERT INTO filler SELECT g, repeat('x', 100) FROM generate_series(1, {rows}) g"),
        COMMIT_TIMEOUT * 4,
    )?;
    Ok(())
}

/// Rule: a safekeeper that was down while a new shim took over is brought
/// up to date from Postgres (as long as Postgres still holds the WAL), even
/// though it is behind everything the new shim buffered.
#[test]
fn a_safekeeper_rejoining_after_a_shim_restart_catches_up_from_postgres() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.kill_safekeeper(2)?;
    write_wal(&cluster.pg, 4)?;
    cluster.shim.take().context("shim")?.process.kill()?;
    cluster.start_shim()?;
    write_wal(&cluster.pg, 2)?;
    cluster.restart_safekeeper(2)?;
    write_wal(&cluster.pg, 1)?;
    let commit = cluster.wait_shim_commit(cluster.pg_flush_lsn()?, COMMIT_TIMEOUT)?;
    cluster.wait_safekeeper_flush(2, commit, CATCH_UP_TIMEOUT)?;
    let segment_size = cluster.segment_size()?;
    let start = cluster.timeline_start_lsn(2)?;
    let primary = read_wal(&cluster.pg.pg_wal_dir(), segment_size, start, commit)?;
    ensure!(read_wal(&cluster.timeline_dir(2), segment_size, start, commit)? == primary, "caught-up WAL differs");
    let status = cluster.shim()?.status()?;
    ensure!(status["safekeepers"][2]["state"] == "streaming", "safekeeper 2 is not streaming: {status}");
    Ok(())
}

/// Rule: once Postgres has recycled the WAL a returning safekeeper needs,
/// the shim reports it too far behind in its status, and commits go on
/// with the other two. (Safekeepers that know their peers catch up from
/// them instead: tests/tests/peer_recovery.rs.)
#[test]
fn a_safekeeper_behind_recycled_wal_is_reported_too_far_behind() -> Result<()> {
    let mut cluster = QuorumCluster::start_without_peer_recovery(options().setting("wal_keep_size", "0"))?;
    cluster.kill_safekeeper(2)?;
    for _ in 0..3 {
        write_wal(&cluster.pg, 3)?;
        cluster.pg.psql("SELECT pg_switch_wal(); CHECKPOINT")?;
    }
    cluster.shim.take().context("shim")?.process.kill()?;
    cluster.start_shim()?;
    cluster.restart_safekeeper(2)?;
    wait_for(CATCH_UP_TIMEOUT, "safekeeper 2 to be reported too far behind", || {
        let status = cluster.shim()?.status()?;
        Ok((status["safekeepers"][2]["state"] == "too-far-behind").then_some(()))
    })?;
    cluster.pg.psql("CREATE TABLE after_recycling (v int)")?;
    insert_acknowledged(&cluster.pg, "after_recycling", 1)?;
    let shim = cluster.shim.as_mut().context("shim")?;
    ensure!(shim.process.exit_status()?.is_none(), "the shim stopped: {}", shim.process.log_tail());
    Ok(())
}

/// Rule: fencing. A second shim wins a higher term; the first steps down,
/// exiting 3 with a message naming that term, and commits go on
/// through the second alone.
#[test]
fn a_second_shim_fences_the_first() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql("CREATE TABLE acked (v bigint)")?;
    insert_acknowledged(&cluster.pg, "acked", 1)?;
    let mut first = cluster.shim.take().context("first shim")?;
    let first_term = first.status()?["term"].as_u64().context("term")?;

    let mut args = cluster.shim_args();
    args.slot = "second".to_string();
    let mut second = ComputeShim::start(&args, cluster.dir.path())?;
    let second_term = second.wait_elected(ELECTION_TIMEOUT)?["term"].as_u64().context("term")?;
    ensure!(second_term > first_term, "second shim elected in {second_term}, first had {first_term}");

    let exit = first.process.wait_exit(EXIT_TIMEOUT)?.context("the fenced shim kept running")?;
    let log = first.process.log_tail();
    ensure!(exit.code() == Some(3), "the fenced shim exited {exit}, expected status 3 (fenced)");
    ensure!(log.contains("fenced") && log.contains(&format!("term {second_term}")), "unclear exit: {log}");

    insert_acknowledged(&cluster.pg, "acked", 2)?;
    let flush = cluster.pg_flush_lsn()?;
    cluster.shim = Some(second);
    cluster.wait_shim_commit(flush, COMMIT_TIMEOUT)?;
    for index in 0..cluster.safekeepers.len() {
        let term = cluster.timeline_status(index)?["term"].as_u64().context("term")?;
        ensure!(term == second_term, "safekeeper {index} is in term {term}, expected {second_term}");
    }
    Ok(())
}

/// Rule: every message carries the cluster identity. A shim streaming
/// another Postgres system into the same tenant/timeline is refused by the
/// safekeepers; it exits with a clear error, and nothing on them changes.
#[test]
fn a_shim_for_another_system_is_refused_and_nothing_is_written() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql("CREATE TABLE acked (v bigint)")?;
    insert_acknowledged(&cluster.pg, "acked", 1)?;
    cluster.shim.take().context("shim")?.process.kill()?;
    let before: Vec<_> = (0..cluster.safekeepers.len())
        .map(|index| Ok((cluster.timeline_status(index)?, snapshot_files(&cluster.timeline_dir(index))?)))
        .collect::<Result<_>>()?;

    let mut stranger = PgCluster::init(options())?;
    stranger.start()?;
    let mut args = cluster.shim_args();
    args.pg_conninfo = stranger.connection_string("postgres");
    let mut shim = ComputeShim::spawn(&args, cluster.dir.path())?;
    let exit = shim.process.wait_exit(EXIT_TIMEOUT)?.context("a refused shim kept running")?;
    let log = shim.process.log_tail();
    ensure!(exit.code() == Some(4), "the refused shim exited {exit}, expected status 4 (the safekeepers refuse)");
    ensure!(log.contains("refuses this cluster") && log.contains("system"), "unclear refusal: {log}");

    for (index, (status, files)) in before.iter().enumerate() {
        let now = cluster.timeline_status(index)?;
        for field in ["term", "flush_lsn", "commit_lsn", "system_id", "term_history"] {
            ensure!(
                now[field] == status[field],
                "safekeeper {index} {field} changed: {} -> {}",
                status[field],
                now[field]
            );
        }
        ensure!(&snapshot_files(&cluster.timeline_dir(index))? == files, "safekeeper {index} files changed");
    }
    Ok(())
}

/// Rule: the shim refuses to lead when Postgres's WAL ends before the
/// safekeepers' log (it lost WAL they hold); it never truncates committed
/// WAL to fit. Simulated by restoring Postgres to an earlier copy of itself.
#[test]
fn a_shim_refuses_a_postgres_behind_the_safekeepers() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.shim.take().context("shim")?.process.kill()?;
    // A Postgres copy taken now is "behind" once the original moves on.
    cluster.pg.stop_fast()?;
    let copy = cluster.dir.path().join("pg-copy");
    copy_dir(&cluster.pg.data_dir(), &copy)?;
    cluster.pg.start()?;
    cluster.start_shim()?;
    cluster.pg.psql("CREATE TABLE acked AS SELECT generate_series(1, 10000) AS v")?;
    let flush = cluster.pg_flush_lsn()?;
    let commit = cluster.wait_shim_commit(flush, COMMIT_TIMEOUT)?;
    cluster.shim.take().context("shim")?.process.kill()?;
    cluster.pg.stop_immediate()?;
    replace_dir(&copy, &cluster.pg.data_dir())?;
    cluster.pg.start()?;
    ensure!(cluster.pg_flush_lsn()? < commit, "the restored Postgres is not behind");

    let mut shim = ComputeShim::spawn(&cluster.shim_args(), cluster.dir.path())?;
    let exit = shim.process.wait_exit(EXIT_TIMEOUT)?.context("the shim led a Postgres that lost WAL")?;
    let log = shim.process.log_tail();
    ensure!(exit.code() == Some(5) && log.contains("refusing to lead"), "unclear refusal ({exit}, expected 5): {log}");
    for index in 0..cluster.safekeepers.len() {
        let kept = json_lsn(&cluster.timeline_status(index)?, "commit_lsn")?;
        ensure!(kept <= commit, "commit moved");
        let flush = json_lsn(&cluster.timeline_status(index)?, "flush_lsn")?;
        ensure!(flush >= commit, "safekeeper {index} lost committed WAL: flush {flush} < {commit}");
    }
    Ok(())
}

/// `cp -a` as the Postgres OS user keeps ownership and modes.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(status.success(), "cp -a {} {} failed", from.display(), to.display());
    Ok(())
}

fn replace_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::remove_dir_all(to)?;
    copy_dir(from, to)
}
