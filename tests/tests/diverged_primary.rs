//! The log check with real processes: a PostgreSQL 15 primary P streams
//! through compute_shim to three safekeepers; with two of them down, P
//! writes a transaction whose WAL only safekeeper 0 gets (never
//! acknowledged), then P dies. A new primary Q, restored from a base backup
//! of P and the safekeepers' committed segments and promoted (Postgres
//! timeline 2), writes its own WAL past that tail. A shim on Q wins an
//! election whose term starts at the end of the tail, but must refuse to
//! lead before sending anything (since Postgres timelines are in the log,
//! its timeline history already says it forked below the log's end, which
//! refuses it before the digest comparison would): no
//! safekeeper's flush or commit LSN and no byte of any segment file
//! changes. The original P, started again, passes the same check, catches
//! the lagging safekeepers up from its WAL and commits the tail.
//!
//! Which log a term continues depends on which quorum elects it: only a
//! quorum holding safekeeper 0 starts the term at the end of the tail
//! (one of 1 and 2 would start it at their end, where Q's WAL does continue
//! the log, and legitimately discard the uncommitted tail). So safekeeper 2
//! is frozen with SIGSTOP during each election: connected, but silent.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, TENANT, TIMELINE};
use integration_tests::fixture::{wait_bounded, wait_for};
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::processes::{ComputeShim, KillOnDrop};
use integration_tests::wal_files::{committed_xids, read_pg_wal, read_wal, snapshot_files};
use nix::sys::signal::Signal;
use postgres_wal::lsn::{Lsn, PgTimelineId, WalSegmentSize, SEGMENT_FILE_NAME_LEN};
use postgres_wal::wal::{DecodeStep, WalDecoder};

/// Any single wait: commits, flushes, recovery, promotion.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The shim on the diverged primary must have exited by then.
const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much WAL below the term start the shim compares
/// (compute_shim's `log_check::CHECKED_BYTES`).
const CHECKED_BYTES: u64 = 64 * 1024;
/// From `ProposerError::PostgresDiverged` (the digest of the WAL below the
/// term start differs) or `ProposerError::PromotedBelowLogEnd` (Q's
/// timeline history says it forked below the log's end: the same verdict,
/// reached from the timeline history before any digest is asked for).
const DIVERGED: [&str; 2] = ["not the primary that wrote the log", "promoted before it replayed everything"];
/// Rows committed on P before anything goes wrong (ids 1..=N).
const COMMITTED_ROWS: u32 = 5_000;
/// Rows of the transaction that never gets a quorum: about 1 MiB of WAL,
/// so the unacknowledged tail is far longer than the checked range and
/// crosses a segment boundary.
const BLOCKED_IDS: (u32, u32) = (100_001, 104_000);
/// Rows Q inserts per round until its WAL passes safekeeper 0's.
const Q_ROWS_PER_ROUND: u32 = 2_000;
const Q_MAX_ROUNDS: u32 = 20;

/// 1 MiB segments: segment boundaries come quickly.
fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// Start `psql -c sql` without waiting for it (killed if the test fails).
fn spawn_psql(pg: &PgCluster, sql: &str) -> Result<KillOnDrop> {
    let mut psql = pg.command("psql");
    psql.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]);
    psql.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(KillOnDrop::new(psql.spawn().context("spawning psql")?))
}

/// `(flush_lsn, commit_lsn, term)` of safekeeper `index`.
fn positions(cluster: &QuorumCluster, index: usize) -> Result<(Lsn, Lsn, u64)> {
    let status = cluster.timeline_status(index)?;
    let term = status["term"].as_u64().with_context(|| format!("no term in {status}"))?;
    Ok((json_lsn(&status, "flush_lsn")?, json_lsn(&status, "commit_lsn")?, term))
}

/// Wait until every safekeeper's own commit LSN reaches `lsn`.
fn wait_committed_everywhere(cluster: &QuorumCluster, lsn: Lsn) -> Result<()> {
    for index in 0..cluster.safekeepers.len() {
        wait_for(TIMEOUT, &format!("safekeeper {index} commit to reach {lsn}"), || {
            Ok((positions(cluster, index)?.1 >= lsn).then_some(()))
        })?;
    }
    Ok(())
}

/// Every WAL segment file of a safekeeper timeline directory (not the
/// control file, not a `.partial-tmp` being zero-filled) with its bytes.
/// Safekeeper `index` still has the flush and commit LSN of `before`;
/// returns its flush LSN, and its term then and now.
fn unmoved(cluster: &QuorumCluster, index: usize, before: (Lsn, Lsn, u64)) -> Result<(Lsn, u64, u64)> {
    let (flush, commit, term) =
        wait_for(TIMEOUT, &format!("safekeeper {index} to answer"), || positions(cluster, index).map(Some))?;
    let (flush_then, commit_then, term_then) = before;
    ensure!(
        (flush, commit) == (flush_then, commit_then),
        "safekeeper {index} moved: flush {flush_then} -> {flush}, commit {commit_then} -> {commit}"
    );
    Ok((flush, term_then, term))
}

fn segment_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let is_segment = |path: &Path| path.file_name().is_some_and(|name| name.len() == SEGMENT_FILE_NAME_LEN);
    Ok(snapshot_files(dir)?.into_iter().filter(|(path, _)| is_segment(path)).collect())
}

/// `IDENTIFY_SYSTEM` over a replication connection, as the shim asks it:
/// (system identifier, timeline, flush position).
/// A shim on Q is elected, then exits non-zero within SHIM_EXIT_TIMEOUT
/// reporting that Q diverged, in a message naming `range`.
/// `range` is what a digest refusal names; a timeline refusal names the
/// log's end, `log_end`.
fn shim_on_q_refuses(
    cluster: &QuorumCluster,
    q: &PgCluster,
    range: &str,
    log_end: Lsn,
) -> Result<(ExitStatus, Duration)> {
    let mut args = cluster.shim_args();
    args.pg_conninfo = q.connection_string("postgres");
    let spawned = Instant::now();
    let mut shim = ComputeShim::spawn(&args, cluster.dir.path())?;
    let exit =
        wait_for(SHIM_EXIT_TIMEOUT, "the shim on Q to exit", || shim.process.exit_status()).with_context(|| {
            let shim_status = shim.status().map(|s| s.to_string()).unwrap_or_else(|e| format!("{e:#}"));
            let sk_status: Vec<String> = (0..cluster.safekeepers.len())
                .map(|i| cluster.timeline_status(i).map(|s| s.to_string()).unwrap_or_else(|e| format!("{e:#}")))
                .collect();
            format!(
                "the shim on Q kept running; its status: {shim_status}\nsafekeepers: {sk_status:#?}\nits log: {}",
                shim.process.log_tail()
            )
        })?;
    let exited_after = spawned.elapsed();
    let log = std::fs::read_to_string(&shim.process.log_path)?;
    println!("--- compute_shim on Q ({exit}, after {exited_after:?}) ---\n{log}---");
    ensure!(!exit.success(), "the shim on Q exited successfully");
    ensure!(DIVERGED.iter().any(|verdict| log.contains(verdict)), "the shim on Q did not report divergence: {log}");
    let names_the_log_end = log.contains(&format!("the safekeepers' log at {log_end}"));
    ensure!(
        log.contains(range) || names_the_log_end,
        "the refusal names neither {range} nor the log end {log_end}: {log}"
    );
    Ok((exit, exited_after))
}

/// Q (with recovery.signal) starts, finishes archive recovery and promotes:
/// P's system, Postgres timeline 2. Returns its timeline and flush LSN.
fn promote_q(q: &mut PgCluster, p_system_id: &str) -> Result<(PgTimelineId, Lsn)> {
    q.write_data_file("recovery.signal", "")?;
    q.start()?;
    wait_for(TIMEOUT, "Q to finish archive recovery and promote", || {
        Ok((q.psql("SELECT pg_is_in_recovery()")? == "f").then_some(()))
    })
    .with_context(|| format!("Q's log: {}", q.log_tail()))?;
    let (q_system_id, q_timeline, promoted_at) = identify_system(q)?;
    ensure!(q_system_id == p_system_id, "Q is system {q_system_id}, P was {p_system_id}");
    ensure!(q_timeline == 2, "Q promoted onto Postgres timeline {q_timeline}, expected 2");
    Ok((q_timeline, promoted_at))
}

/// Q writes its own commits (`synchronous_commit = local`: it inherited
/// P's synchronous_standby_names, and no shim runs for it yet) in rounds of
/// `rows_per_round` rows until `done` holds.
fn write_on_q_until(
    q: &PgCluster,
    rows_per_round: u32,
    what: &str,
    mut done: impl FnMut(&PgCluster) -> Result<bool>,
) -> Result<()> {
    let mut round = 0;
    while !done(q)? {
        ensure!(round < Q_MAX_ROUNDS, "Q's WAL did not get {what} in {Q_MAX_ROUNDS} rounds");
        let from = 200_001 + round * rows_per_round;
        q.psql(&format!(
            "SET synchronous_commit = local; \
             INSERT INTO t SELECT g, repeat('q', 200) FROM generate_series({from}, {}) g",
            from + rows_per_round - 1
        ))?;
        round += 1;
    }
    Ok(())
}

fn identify_system(pg: &PgCluster) -> Result<(String, PgTimelineId, Lsn)> {
    let answer = pg.psql_replication(pg.port(), "IDENTIFY_SYSTEM")?;
    let fields: Vec<&str> = answer.split('|').collect();
    ensure!(fields.len() >= 3, "IDENTIFY_SYSTEM answered {answer:?}");
    Ok((fields[0].to_string(), fields[1].parse()?, fields[2].parse()?))
}

fn flush_lsn(pg: &PgCluster) -> Result<Lsn> {
    Ok(pg.psql("SELECT pg_current_wal_flush_lsn()")?.parse()?)
}

/// Both tests' start: P streaming through its shim to three safekeepers,
/// a base backup of P taken before the workload (Q, not started yet) and
/// the committed rows.
struct Setup {
    cluster: QuorumCluster,
    /// Restores WAL with `restore_command` from safekeeper 0, but no
    /// segment named by a file in `withheld`.
    q: PgCluster,
    p_system_id: String,
    segment_size: WalSegmentSize,
    /// The end of the segment the committed rows end in (P switched to the
    /// next one): committed on all three safekeepers.
    boundary: Lsn,
    withheld: PathBuf,
}

fn start_p_and_commit_rows(options: PgOptions, step: &dyn Fn(&str)) -> Result<Setup> {
    let cluster = QuorumCluster::start(options.clone())?;
    let segment_size = cluster.segment_size()?;
    let (p_system_id, p_timeline, _) = identify_system(&cluster.pg)?;
    ensure!(p_timeline == 1, "P is on Postgres timeline {p_timeline}");
    let withheld = cluster.dir.path().join("withheld-segments");
    std::fs::create_dir(&withheld)?;
    let sk0_http = cluster.safekeepers[0].http_addr;
    let restore_command = format!(
        "'test ! -e {}/%f && curl -sf http://{sk0_http}/v1/tenant/{TENANT}/timeline/{TIMELINE}/segment/%f -o %p'",
        withheld.display()
    );
    // No recovery target: archive recovery replays every segment the
    // safekeeper serves (only fully committed ones) and is not withheld,
    // then promotes.
    let q = PgCluster::from_base_backup(&cluster.pg, options.setting("restore_command", &restore_command), "none")?;
    step("P, safekeepers and shim up; base backup of P taken");

    let pg = &cluster.pg;
    pg.psql("CREATE TABLE t (id int, filler text)")?;
    pg.psql(&format!("INSERT INTO t SELECT g, repeat('c', 200) FROM generate_series(1, {COMMITTED_ROWS}) g"))?;
    // End the segment: once the switch is committed, every committed row
    // is in a whole segment that restore_command can fetch.
    let switched: Lsn = pg.psql("SELECT pg_switch_wal()")?.parse()?;
    let boundary =
        if switched.is_segment_start(segment_size) { switched } else { switched.next_segment_start(segment_size) };
    wait_committed_everywhere(&cluster, boundary)?;
    step(&format!("{COMMITTED_ROWS} rows committed on all three safekeepers (up to {boundary})"));
    Ok(Setup { cluster, q, p_system_id, segment_size, boundary, withheld })
}

/// Rule: a shim whose Postgres is not the primary that wrote the
/// safekeepers' log (here: restored from a backup and the committed
/// segments, promoted, and written past an unacknowledged tail one
/// safekeeper holds) exits with `PostgresDiverged` and changes nothing;
/// the primary that did write it passes the same check and commits.
#[test]
fn a_restored_and_promoted_primary_is_refused_and_the_original_commits() -> Result<()> {
    let began = Instant::now();
    let step = |what: &str| println!("[{:>5.1}s] {what}", began.elapsed().as_secs_f64());

    // 1. P, three safekeepers, an elected shim, a base backup of P, the
    //    committed rows.
    let Setup { mut cluster, mut q, p_system_id, segment_size, .. } = start_p_and_commit_rows(options(), &step)?;
    let pg = &cluster.pg;

    // 2. Two safekeepers down: a big transaction's WAL reaches only
    //    safekeeper 0, and its commit waits for a quorum that never comes.
    cluster.safekeepers[1].process.kill()?;
    cluster.safekeepers[2].process.kill()?;
    let (first, last) = BLOCKED_IDS;
    let mut blocked =
        spawn_psql(pg, &format!("INSERT INTO t SELECT g, repeat('u', 200) FROM generate_series({first}, {last}) g"))?;
    wait_for(TIMEOUT, "the big insert to wait for synchronous replication", || {
        let waiting = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")?;
        Ok((waiting == "1").then_some(()))
    })?;
    let p_flush = flush_lsn(pg)?;
    cluster.wait_safekeeper_flush(0, p_flush, TIMEOUT)?;
    ensure!(blocked.child().try_wait()?.is_none(), "the insert returned without a quorum");
    cluster.shim.take().context("shim")?.process.kill()?;
    cluster.pg.stop_immediate()?;
    let exit = wait_bounded(blocked.child(), TIMEOUT)?.context("psql kept running after P stopped")?;
    let output = blocked.into_inner().wait_with_output()?;
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(!exit.success() && !stdout.contains("INSERT"), "the blocked insert was acknowledged: {stdout}{stderr}");

    let (tail_end, sk0_commit, _) = positions(&cluster, 0)?;
    ensure!(tail_end >= p_flush, "safekeeper 0 flushed {tail_end}, P had flushed {p_flush}");
    ensure!(
        Lsn(tail_end.0 - CHECKED_BYTES) >= sk0_commit,
        "the checked range [{tail_end} - 64 KiB, {tail_end}) should lie in the unacknowledged tail above {sk0_commit}"
    );
    step(&format!(
        "insert blocked ({} rows); safekeeper 0 flushed to {tail_end} ({} KiB beyond its commit {sk0_commit}); \
         shim and P killed; psql: {}",
        last - first + 1,
        (tail_end - sk0_commit) / 1024,
        stderr.trim().lines().last().unwrap_or_default()
    ));

    // 3. Q: the base backup plus the committed segments from safekeeper 0,
    //    promoted on a new Postgres timeline, then writing its own WAL.
    let (q_timeline, _) = promote_q(&mut q, &p_system_id)?;
    let rows = q.psql("SELECT count(*), max(id) FROM t")?;
    ensure!(rows == format!("{COMMITTED_ROWS}|{COMMITTED_ROWS}"), "Q holds the committed rows only: {rows}");
    // Q inherited P's synchronous_standby_names; its own commits must not
    // wait for a shim: it writes on its own before one is started.
    write_on_q_until(&q, Q_ROWS_PER_ROUND, &format!("past {tail_end}"), |q| Ok(flush_lsn(q)? > tail_end))?;
    let q_flush = flush_lsn(&q)?;
    // The oracle, independent of the shim: Q's bytes in the checked range
    // (its timeline-2 segment files) differ from safekeeper 0's.
    let checked_start = Lsn(tail_end.0 - CHECKED_BYTES);
    let sk0_range = read_wal(&cluster.timeline_dir(0), segment_size, checked_start, tail_end)?;
    let q_range = read_pg_wal(&q.pg_wal_dir(), q_timeline, segment_size, checked_start, tail_end)?;
    ensure!(q_range != sk0_range, "Q's WAL in {checked_start}..{tail_end} equals safekeeper 0's");
    let differing = q_range.iter().zip(&sk0_range).filter(|(a, b)| a != b).count();
    let mut q_pg_wal: Vec<String> = std::fs::read_dir(q.pg_wal_dir())?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    q_pg_wal.sort();

    cluster.restart_safekeeper(1)?;
    cluster.restart_safekeeper(2)?;
    let count = cluster.safekeepers.len();
    let before: Vec<(Lsn, Lsn, u64)> = (0..count).map(|index| positions(&cluster, index)).collect::<Result<_>>()?;
    let files_before: Vec<_> =
        (0..count).map(|index| segment_files(&cluster.timeline_dir(index))).collect::<Result<_>>()?;
    for (index, &(flush, commit, _)) in before.iter().enumerate().skip(1) {
        ensure!(flush < tail_end && commit <= sk0_commit, "safekeeper {index} at flush {flush}, commit {commit}");
    }
    step(&format!(
        "Q promoted on timeline {q_timeline} (same system id), flushed to {q_flush}; {differing} of {CHECKED_BYTES} \
         checked bytes differ from safekeeper 0's; Q's pg_wal: {q_pg_wal:?}; safekeepers 1, 2 restarted at flush \
         {} / {}",
        before[1].0, before[2].0
    ));

    // 4. A shim on Q: elected, then refuses to lead, sending nothing.
    //    Safekeeper 2 is frozen (SIGSTOP: it accepts the connection but
    //    answers nothing) so that the electing quorum includes safekeeper 0
    //    and the term starts at the end of its tail. With all three
    //    answering, whichever two vote first decide: a quorum of 1 and 2
    //    starts the term at their log end, the tail is legitimately
    //    discarded (it was never committed) and Q leads.
    cluster.safekeepers[2].process.signal(Signal::SIGSTOP)?;
    let result = shim_on_q_refuses(&cluster, &q, &format!("{checked_start}..{tail_end}"), tail_end);
    cluster.safekeepers[2].process.signal(Signal::SIGCONT)?;
    let (exit, exited_after) = result?;
    let mut terms = Vec::new();
    for index in 0..count {
        let (_, term_then, term) = unmoved(&cluster, index, before[index])?;
        // 0 and 1 voted: the shim on Q was elected before it refused.
        let voted = index < 2;
        ensure!((term > term_then) == voted, "safekeeper {index}: term {term_then} -> {term}");
        ensure!(
            segment_files(&cluster.timeline_dir(index))? == files_before[index],
            "safekeeper {index}'s segment files changed"
        );
        terms.push(format!("{term_then}->{term}"));
    }
    let sk0_wal = read_wal(&cluster.timeline_dir(0), segment_size, cluster.timeline_start_lsn(0)?, tail_end)?;
    step(&format!(
        "the shim on Q exited ({exit}) after {:.1}s: elected (terms {}), refused; no flush, commit or segment byte \
         changed on any safekeeper",
        exited_after.as_secs_f64(),
        terms.join(", ")
    ));

    // 5. The positive control: P itself, started again (crash recovery;
    //    its pg_wal still has the unacknowledged tail), passes the same
    //    check (safekeeper 2 frozen again, so the term starts at the end
    //    of the tail), catches 1 and then 2 up from its WAL and commits.
    q.stop_immediate()?;
    cluster.pg.start()?;
    let (_, timeline, p_restart_flush) = identify_system(&cluster.pg)?;
    ensure!(timeline == 1 && p_restart_flush >= tail_end, "P restarted on timeline {timeline} at {p_restart_flush}");
    cluster.safekeepers[2].process.signal(Signal::SIGSTOP)?;
    let elected = cluster.start_shim();
    cluster.safekeepers[2].process.signal(Signal::SIGCONT)?;
    let elected = elected?;
    ensure!(json_lsn(&elected, "term_start_lsn")? == tail_end, "P's shim starts its term elsewhere: {elected}");
    let commit = cluster.wait_shim_commit(tail_end, TIMEOUT).with_context(|| {
        let log = cluster.shim().map(|shim| shim.process.log_tail()).unwrap_or_default();
        format!("the shim on P did not commit the tail: {log}")
    })?;
    let status = cluster.shim()?.status()?;
    ensure!(status["postgres_wal_checked"] == true, "the log check did not pass: {status}");
    // It read the same range from P as it did from Q (and then went lower
    // to catch up safekeepers 1 and 2).
    let log = cluster.shim()?.process.log_tail();
    ensure!(
        log.lines().any(|line| line.contains("starting replication") && line.contains(&checked_start.to_string())),
        "P's shim did not stream the checked range from {checked_start}: {log}"
    );
    wait_for(TIMEOUT, &format!("a majority of safekeepers to commit {tail_end}"), || {
        let committed = (0..count).filter(|&index| positions(&cluster, index).is_ok_and(|p| p.1 >= tail_end)).count();
        Ok((committed * 2 > count).then_some(()))
    })?;
    cluster.pg.psql_with_timeout("INSERT INTO t VALUES (300001, 'after the restart')", TIMEOUT)?;
    let rows = cluster.pg.psql("SELECT count(*) FROM t")?;
    let expected_rows = COMMITTED_ROWS + (last - first + 1) + 1;
    ensure!(rows == expected_rows.to_string(), "P holds {rows} rows, expected {expected_rows}");

    // The tail's transaction is now committed WAL on every safekeeper, and
    // safekeeper 0's bytes below its old flush never changed.
    let final_commit = cluster.wait_shim_commit(flush_lsn(&cluster.pg)?, TIMEOUT)?;
    let blocked_xid: u32 = cluster
        .pg
        .psql(&format!("SELECT DISTINCT xmin::text FROM t WHERE id BETWEEN {first} AND {last}"))?
        .parse()
        .context("one xid wrote the blocked rows")?;
    for index in 0..count {
        cluster.wait_safekeeper_flush(index, final_commit, TIMEOUT)?;
        let start = cluster.timeline_start_lsn(index)?;
        let xids = committed_xids(&cluster.timeline_dir(index), segment_size, start, final_commit)?;
        ensure!(xids.contains(&blocked_xid), "safekeeper {index} lacks the commit of xid {blocked_xid}");
        let primary = read_wal(&cluster.pg.pg_wal_dir(), segment_size, start, final_commit)?;
        let ours = read_wal(&cluster.timeline_dir(index), segment_size, start, final_commit)?;
        ensure!(ours == primary, "safekeeper {index} differs from P's pg_wal below {final_commit}");
    }
    let sk0_wal_now = read_wal(&cluster.timeline_dir(0), segment_size, cluster.timeline_start_lsn(0)?, tail_end)?;
    ensure!(sk0_wal_now == sk0_wal, "safekeeper 0's WAL below {tail_end} changed");
    step(&format!(
        "P restarted: shim elected in term {}, log check of {checked_start}..{tail_end} passed, commit {commit} -> \
         {final_commit}; blocked xid {blocked_xid} committed on all three, each equal to P's pg_wal",
        elected["term"]
    ));
    Ok(())
}

/// Rows Q writes per round on its own timeline before its segment switch.
const Q_FORK_ROWS_PER_ROUND: u32 = 500;
/// Q writes until its WAL is this close below the boundary, then switches.
const Q_SWITCH_BELOW_BOUNDARY: u64 = 300 * 1024;
/// Postgres's `SizeOfXLogLongPHD`: a segment's first page header.
const LONG_PAGE_HEADER_BYTES: u64 = 40;

/// Rule: with nothing below the term start to compare (the term starts at
/// a segment start and Postgres's slot restarts in that segment, so the
/// check's range is empty), the first record Postgres writes after the
/// term start must link back (`xl_prev`) to the log's last record; a
/// promoted primary whose WAL forked below and whose own segment switch
/// lands exactly on the term start is refused, and nothing is sent.
///
/// P's log ends with a segment switch at the boundary B, committed on all
/// three safekeepers. Q is restored without the last committed segment
/// (its timeline 2 forks inside or just below it), writes, switches
/// segments so that its next record starts at B too, writes a row and a
/// checkpoint (a new slot restarts at the redo pointer, past B). All three
/// safekeepers are restarted (restarted acceptors do not check the first
/// record's back-link themselves: before the fix, Q's WAL was accepted and
/// committed at B, breaking the xl_prev chain there).
#[test]
fn a_promoted_primary_continuing_at_a_segment_start_is_refused() -> Result<()> {
    let began = Instant::now();
    let step = |what: &str| println!("[{:>5.1}s] {what}", began.elapsed().as_secs_f64());

    // 1. P, three safekeepers, an elected shim, a base backup of P, the
    //    committed rows. No autovacuum: P's log must end at the switch.
    let Setup { mut cluster, mut q, p_system_id, segment_size, mut boundary, withheld } =
        start_p_and_commit_rows(options().setting("autovacuum", "off"), &step)?;
    // A record P writes on its own after the switch (the background
    // writer's standby snapshot) would end the log past B: switch again.
    for attempt in 0.. {
        let insert: Lsn = cluster.pg.psql("SELECT pg_current_wal_insert_lsn()")?.parse()?;
        // Nothing past the segment's first page header.
        if insert.segment_no(segment_size) == boundary.segment_no(segment_size)
            && insert - boundary <= LONG_PAGE_HEADER_BYTES
        {
            break;
        }
        ensure!(attempt < 3, "P keeps writing WAL after its segment switch at {boundary} (now at {insert})");
        cluster.pg.psql("SELECT pg_switch_wal()")?;
        boundary = insert.next_segment_start(segment_size);
        wait_committed_everywhere(&cluster, boundary)?;
    }
    cluster.shim.take().context("shim")?.process.kill()?;
    cluster.pg.stop_immediate()?;
    let count = cluster.safekeepers.len();
    for index in 0..count {
        let (flush, commit, _) = positions(&cluster, index)?;
        ensure!(
            (flush, commit) == (boundary, boundary),
            "safekeeper {index} at flush {flush}, commit {commit}: the log should end at the switch {boundary}"
        );
    }
    let last_segment = Lsn(boundary.0 - 1).segment_no(segment_size).file_name(1, segment_size);
    std::fs::write(withheld.join(&last_segment), "")?;
    // The oracle's half from the log: its last record (P's switch).
    let log_start = cluster.timeline_start_lsn(0)?;
    let mut decoder = WalDecoder::at_segment_start(log_start, segment_size);
    decoder.feed(&read_wal(&cluster.timeline_dir(0), segment_size, log_start, boundary)?);
    let mut log_last = None;
    decoder.decode_available(|record| log_last = Some((record.start_lsn, record.end_lsn)))?;
    let (log_last, log_last_end) = log_last.context("no record in the log")?;
    ensure!(log_last_end == boundary, "the log's last record {log_last} ends at {log_last_end}, not {boundary}");
    step(&format!(
        "shim and P stopped; the log ends at {boundary} (last record at {log_last}) on all three; Q will not get \
         {last_segment}"
    ));

    // 2. Q: restored without the last committed segment, promoted; it
    //    writes up to near B, switches (its next record starts at B),
    //    writes a row past B and checkpoints there.
    let (q_timeline, promoted_at) = promote_q(&mut q, &p_system_id)?;
    ensure!(promoted_at < boundary, "Q promoted at {promoted_at}, not below {boundary}");
    let insert_lsn = |pg: &PgCluster| -> Result<Lsn> { Ok(pg.psql("SELECT pg_current_wal_insert_lsn()")?.parse()?) };
    let near = Lsn(boundary.0 - Q_SWITCH_BELOW_BOUNDARY);
    write_on_q_until(&q, Q_FORK_ROWS_PER_ROUND, &format!("near {boundary}"), |q| Ok(insert_lsn(q)? >= near))?;
    let before_switch = insert_lsn(&q)?;
    ensure!(before_switch < boundary, "Q's WAL passed {boundary} ({before_switch}) before its switch");
    let q_switched: Lsn = q.psql("SELECT pg_switch_wal()")?.parse()?;
    // (It returns where the switch record ends; the segment's rest is padding.)
    ensure!(
        q_switched < boundary && q_switched.next_segment_start(segment_size) == boundary,
        "Q's switch record ends at {q_switched}: its next segment does not start at {boundary}"
    );
    q.psql("SET synchronous_commit = local; INSERT INTO t VALUES (300001, 'after the switch')")?;
    q.psql("CHECKPOINT")?;
    let redo: Lsn = q.psql("SELECT redo_lsn FROM pg_control_checkpoint()")?.parse()?;
    let q_flush = flush_lsn(&q)?;
    ensure!(
        redo >= boundary && q_flush < boundary.next_segment_start(segment_size),
        "Q's redo {redo} / flush {q_flush} should lie in the segment starting at {boundary}"
    );
    // The oracle's half from Q, independent of the shim: Q's first record
    // at B does not link back to the log's last record.
    let mut decoder = WalDecoder::at_segment_start(boundary, segment_size);
    decoder.feed(&read_pg_wal(&q.pg_wal_dir(), q_timeline, segment_size, boundary, q_flush)?);
    let DecodeStep::Record(q_first) = decoder.next_record()? else { bail!("no record in Q's WAL at {boundary}") };
    ensure!(
        q_first.start_lsn.segment_no(segment_size) == boundary.segment_no(segment_size)
            && q_first.prev_lsn != log_last
            && q_first.prev_lsn < boundary,
        "Q's first record at {} links back to {}; the log's last record is at {log_last}",
        q_first.start_lsn,
        q_first.prev_lsn
    );
    let rows = q.psql("SELECT count(*) FROM t")?;
    step(&format!(
        "Q promoted on timeline {q_timeline} at {promoted_at} ({rows} rows), switched at {before_switch} -> \
         {q_switched}; its first record at {} links back to {} (the log's last is {log_last}); redo {redo}, flush \
         {q_flush}",
        q_first.start_lsn, q_first.prev_lsn
    ));

    // 3. All three safekeepers restarted, then a shim on Q: elected with
    //    the term starting at B, an empty check range, refused on Q's
    //    first record's back-link; nothing sent.
    for index in 0..count {
        cluster.kill_safekeeper(index)?;
        cluster.restart_safekeeper(index)?;
    }
    let before: Vec<(Lsn, Lsn, u64)> = (0..count)
        .map(|index| {
            wait_for(TIMEOUT, &format!("safekeeper {index} to answer"), || positions(&cluster, index).map(Some))
        })
        .collect::<Result<_>>()?;
    let files_before: Vec<_> =
        (0..count).map(|index| segment_files(&cluster.timeline_dir(index))).collect::<Result<_>>()?;
    let names_before: Vec<_> =
        (0..count).map(|index| file_names(&cluster.timeline_dir(index))).collect::<Result<_>>()?;
    for (index, &(flush, commit, _)) in before.iter().enumerate() {
        ensure!(
            flush == boundary && commit <= boundary,
            "restarted safekeeper {index} at flush {flush}, commit {commit}"
        );
    }
    let restarted: Vec<String> =
        before.iter().map(|(flush, commit, term)| format!("{flush}/{commit}/{term}")).collect();
    step(&format!("all three safekeepers restarted (flush/commit/term {restarted:?}); files: {names_before:?}"));

    let (exit, exited_after) =
        shim_on_q_refuses(&cluster, &q, &format!("Postgres's WAL in {boundary}..{boundary}"), boundary)?;
    let mut terms = Vec::new();
    let mut voted = 0;
    for index in 0..count {
        let (flush, term_then, term) = unmoved(&cluster, index, before[index])?;
        ensure!(term >= term_then, "safekeeper {index}: term {term_then} -> {term}");
        voted += usize::from(term > term_then);
        ensure!(
            segment_files(&cluster.timeline_dir(index))? == files_before[index],
            "safekeeper {index}'s segment files changed"
        );
        let names = file_names(&cluster.timeline_dir(index))?;
        ensure!(names == names_before[index], "safekeeper {index}'s files: {:?} -> {names:?}", names_before[index]);
        // The log still decodes (page headers, CRCs, the xl_prev chain) up
        // to its end.
        let start = cluster.timeline_start_lsn(index)?;
        committed_xids(&cluster.timeline_dir(index), segment_size, start, flush)?;
        terms.push(format!("{term_then}->{term}"));
    }
    ensure!(voted * 2 > count, "the shim on Q was not elected (terms {terms:?}) before it refused");
    step(&format!(
        "the shim on Q exited ({exit}) after {:.1}s: elected (terms {}), refused on the empty range at {boundary}; no \
         flush, commit, file or segment byte changed on any safekeeper",
        exited_after.as_secs_f64(),
        terms.join(", ")
    ));
    Ok(())
}

/// The names of the files in a safekeeper timeline directory, but for a
/// segment being zero-filled (`.partial-tmp`).
fn file_names(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .filter(|name| !name.as_ref().is_ok_and(|name: &String| name.ends_with("-tmp")))
        .collect::<Result<_>>()?;
    names.sort();
    Ok(names)
}
