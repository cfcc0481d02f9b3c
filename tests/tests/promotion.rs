//! A promoted standby continues the safekeepers' log on its new Postgres
//! timeline (issue 14; docs/failover.md), with real PostgreSQL 15.
//!
//! The primary's machine dies (its Postgres and its compute_shim SIGKILLed
//! together) under a commit loop; `compute_shim sync-safekeepers` makes the
//! log final; a hot standby A fed by safekeeper 0 replays up to the synced
//! LSN and is promoted (Postgres timeline 2); a new compute_shim for A,
//! with the same tenant and timeline ids, is elected and commits. Checked:
//! no commit the old primary acknowledged is missing on A; A's commits are
//! acknowledged; every safekeeper's log goes on at timeline 2 (status,
//! `00000002.history` next to the segments, equal to A's, segment files
//! from the switch segment on named for timeline 2 with A's bytes,
//! `pg_waldump -t 1` / `-t 2` reading them, `IDENTIFY_SYSTEM` and
//! `TIMELINE_HISTORY` on the pg port, the history file and the switch
//! segment by its timeline-2 name over HTTP); a second
//! hot standby B fed by safekeeper 1, streaming through the failover,
//! follows onto timeline 2 without being rebuilt, and so does a third, fed
//! by safekeeper 2, stopped during the failover and started after it (it
//! asks for timeline 1 from below the switch point). Then the old primary
//! comes back on its old data directory with its old shim command line:
//! the shim is refused ("superseded by a failover") without stalling A's
//! commits. And a standby promoted before it replayed everything the
//! safekeepers hold is refused too.
//!
//! Two checks fail on the product as it is, and are left failing to
//! document it (each test collects its failed checks and reports them all
//! at its end, so the others still run): a standby already streaming
//! timeline 1 when the promotion happens is sent timeline 2's WAL on the
//! same stream and PANICs ("unexpected timeline ID 2 (after 1) in checkpoint
//! record"), because a safekeeper looks for the switch point only when
//! START_REPLICATION arrives; and a shim on a standby promoted too early,
//! whose WAL has not reached the log's end yet, is refused as "Postgres's
//! WAL ended at ..." (`PostgresBehind`, advising a restart) instead of
//! "promoted before it replayed", because that check runs first.
//!
//! The tests of this file take [`MACHINE`] in turn: each runs three Postgres
//! servers and three safekeepers, and the commit stall it measures should be
//! its own, not the other tests' load on a small machine.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, LOAD_RUNNING_BYTES, TENANT, TIMELINE};
use integration_tests::commit_loop::{CommitLoop, CommitReport, CREATE_TABLE};
use integration_tests::fixture::wait_for;
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::processes::{http_request, sync_safekeepers, ComputeShim, ShimArgs, SyncRun};
use integration_tests::wal_files::{read_pg_wal, waldump_timeline_lsns};
use nix::sys::signal::Signal;
use postgres_wal::lsn::{Lsn, PgTimelineId, WalSegmentSize, SEGMENT_FILE_NAME_LEN};
use postgres_wal::timeline_history::PgTimelineHistory;
use serde_json::Value;

/// Any single wait: a commit, a replay, a flush, a status.
const TIMEOUT: Duration = Duration::from_secs(30);
/// `--timeout-s` of the sync.
const SYNC_TIMEOUT_S: u64 = 30;
/// How long the shim of a new primary may take to be elected.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// A refused shim must have exited by then.
const REFUSED_SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the commit loop runs on the primary before its machine dies.
const LOAD_BEFORE_DEATH: Duration = Duration::from_millis(1500);
/// The longest gap between A's acknowledged commits the old primary's
/// return may cause.
const MAX_STALL_DURING_RETURN: Duration = Duration::from_secs(5);
/// How long A's commit loop runs after the old shim was refused.
const LOAD_AFTER_REFUSAL: Duration = Duration::from_secs(1);
/// Postgres timelines: the original primary's, and the promoted standby's.
const OLD_TLI: PgTimelineId = 1;
const NEW_TLI: PgTimelineId = 2;
/// The promoted server's shim, and what its synchronous_standby_names says.
const A_SHIM_APPLICATION_NAME: &str = "safekeepers_a";
/// From compute_shim's `ProposerError::Superseded` and `PromotedBelowLogEnd`.
const SUPERSEDED: &str = "superseded by a failover";
const PROMOTED_TOO_EARLY: &str = "promoted before it replayed";
/// A table written only after the promotion (the row standby B must see).
const AFTER_PROMOTION_TABLE: &str = "CREATE TABLE after_promotion (id int PRIMARY KEY, note text)";
/// WAL written on the primary before the load (about 1.5 MiB), so the log
/// of timeline 1 spans more than one 1 MiB segment before the switch.
const FILLER_ROWS: u32 = 6_000;

/// One test at a time on this machine (see the module comment).
static MACHINE: Mutex<()> = Mutex::new(());

/// 1 MiB segments: the load crosses segment boundaries.
fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// libpq `options` naming the timeline on a safekeeper's pg port.
/// The primary's machine dies: its shim and its Postgres SIGKILLed together.
fn kill_primary(cluster: &mut QuorumCluster) -> Result<()> {
    let mut shim = cluster.shim.take().context("the primary's shim")?;
    shim.process.signal(Signal::SIGKILL)?;
    cluster.pg.kill()?;
    shim.process.kill()
}

fn sync(cluster: &QuorumCluster) -> Result<SyncRun> {
    sync_safekeepers(&cluster.safekeeper_addrs(), TENANT, TIMELINE, SYNC_TIMEOUT_S, cluster.dir.path())
}

fn lsn_of(pg: &PgCluster, sql: &str) -> Result<Lsn> {
    let text = pg.psql(sql)?;
    text.parse().with_context(|| format!("{sql} answered {text:?}"))
}

/// Wait until `standby` has replayed `lsn`; returns its replay LSN.
fn wait_replayed(standby: &PgCluster, lsn: Lsn) -> Result<Lsn> {
    wait_for(TIMEOUT, &format!("the standby to replay {lsn}"), || {
        let replayed = lsn_of(standby, "SELECT pg_last_wal_replay_lsn()")?;
        Ok((replayed >= lsn).then_some(replayed))
    })
    .with_context(|| format!("standby log: {}", standby.log_tail()))
}

/// Promote `standby` (waiting for it) and return its new timeline's
/// history as its pg_wal holds it: the file's text and the parsed history.
fn promote(standby: &PgCluster) -> Result<(String, PgTimelineHistory)> {
    let promoted = standby.psql("SELECT pg_promote(wait => true, wait_seconds => 30)")?;
    ensure!(promoted == "t", "pg_promote answered {promoted:?}; log: {}", standby.log_tail());
    let path = standby.pg_wal_dir().join(format!("{NEW_TLI:08X}.history"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let history = PgTimelineHistory::parse_file(NEW_TLI, &text)?;
    Ok((text, history))
}

/// A new primary's commits wait for the shim named `application_name`
/// (synchronous_standby_names, reloaded).
fn wait_for_shim(pg: &PgCluster, application_name: &str) -> Result<()> {
    pg.psql(&format!("ALTER SYSTEM SET synchronous_standby_names = '{application_name}'"))?;
    pg.psql("SELECT pg_reload_conf()")?;
    Ok(())
}

/// The xids (mod 2^32) of every row of `acked` on `pg`.
fn xids_present(pg: &PgCluster) -> Result<HashSet<u32>> {
    let rows = pg.psql("SELECT xid % 4294967296 FROM acked")?;
    Ok(rows.lines().filter_map(|line| line.trim().parse().ok()).collect())
}

/// Shim arguments for a primary other than the cluster's: same tenant,
/// timeline and safekeepers, another Postgres and application name.
fn shim_args_for(cluster: &QuorumCluster, pg: &PgCluster, application_name: &str) -> ShimArgs {
    let mut args = cluster.shim_args();
    args.pg_conninfo = pg.connection_string("postgres");
    args.application_name = application_name.to_string();
    args
}

/// Wait (bounded) until `shim` exits; its status and its whole log.
fn wait_refused(shim: &mut ComputeShim, what: &str) -> Result<(std::process::ExitStatus, String)> {
    let exit = wait_for(REFUSED_SHIM_EXIT_TIMEOUT, &format!("{what} to exit"), || shim.process.exit_status())
        .with_context(|| {
            let status = shim.status().map(|s| s.to_string()).unwrap_or_else(|e| format!("{e:#}"));
            format!("{what} kept running; its status: {status}; its log: {}", shim.process.log_tail())
        })?;
    Ok((exit, std::fs::read_to_string(&shim.process.log_path)?))
}

/// Ok if `condition`, else an error saying `why`.
fn holds(condition: bool, why: impl FnOnce() -> String) -> Result<()> {
    if condition {
        Ok(())
    } else {
        Err(anyhow::anyhow!(why()))
    }
}

/// The checks of one test that failed, collected so that one run shows
/// every one of them (a product bug documented here fails its check but
/// lets the others run).
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => println!("check ok: {name}"),
            Err(error) => {
                println!("CHECK FAILED: {name}: {error:#}");
                self.failed.push(format!("{name}: {error:#}"));
            }
        }
    }

    fn finish(self) -> Result<()> {
        if self.failed.is_empty() {
            return Ok(());
        }
        bail!("{} checks failed:\n{}", self.failed.len(), self.failed.join("\n"))
    }
}

/// The cluster after the old primary's machine died and standby A was
/// promoted; A's shim elected, a commit loop running on A.
struct Promoted {
    /// Declared first: A's processes stop before the cluster's directories go.
    commits_a: Option<CommitLoop>,
    shim_a: ComputeShim,
    b: PgCluster,
    /// A third standby, fed by safekeeper 2, stopped (fast shutdown) before
    /// the sync: started again after the promotion, it connects when the
    /// log is on timeline 2 already.
    late: PgCluster,
    a: PgCluster,
    /// The old primary (its Postgres and shim killed) and the safekeepers.
    cluster: QuorumCluster,
    /// What the commit loop on the old primary saw acknowledged.
    acked_before: CommitReport,
    synced: Lsn,
    /// A's new timeline's history, as the file's text and parsed.
    history_text: String,
    history: PgTimelineHistory,
    /// When the old primary's machine died, A was promoted, and A's first
    /// commit (the row B must see) was acknowledged.
    died_at: Instant,
    promoted_at: Instant,
    first_commit_at: Instant,
    /// B's postmaster start time before the promotion (not rebuilt, not
    /// restarted: the same value after).
    b_started: String,
}

impl Promoted {
    fn switch_lsn(&self) -> Result<Lsn> {
        let last = self.history.switches.last().context("A's history lists no switch")?;
        ensure!(last.timeline == OLD_TLI, "A's timeline {NEW_TLI} descends from {}, not {OLD_TLI}", last.timeline);
        Ok(last.end_lsn)
    }

    fn shim_a_commit(&self) -> Result<Lsn> {
        json_lsn(&self.shim_a.status()?, "commit_lsn")
    }
}

/// The shared setup: a commit loop on the primary, standbys A (fed by
/// safekeeper 0), B (fed by safekeeper 1) and the late one (fed by
/// safekeeper 2, stopped once the primary died), the machine dying, the sync,
/// A replaying to the synced LSN, promoted, its shim elected, a first
/// commit on A, and a commit loop started on A.
fn promote_a_standby() -> Result<Promoted> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql(CREATE_TABLE)?;
    cluster.pg.psql(&format!(
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, {FILLER_ROWS}) g"
    ))?;
    let a = cluster.start_standby_fed_by(0, options())?;
    let b = cluster.start_standby_fed_by(1, options())?;
    let b_started = b.psql("SELECT pg_postmaster_start_time()")?;
    let mut late = cluster.start_standby_fed_by(2, options())?;

    let commits = CommitLoop::start(&cluster.pg)?;
    cluster.wait_commit_progress(LOAD_RUNNING_BYTES, TIMEOUT)?;
    std::thread::sleep(LOAD_BEFORE_DEATH);
    let died_at = Instant::now();
    kill_primary(&mut cluster)?;
    let acked_before = commits.finish(TIMEOUT)?;
    ensure!(acked_before.ended_by.is_some(), "the commit loop went on after the primary died");
    ensure!(!acked_before.xids.is_empty(), "no commit acknowledged before the primary died");
    late.stop_fast()?;

    let run = sync(&cluster)?;
    let synced = run.commit_lsn()?;
    let synced_at = Instant::now();
    let replayed = wait_replayed(&a, synced)?;
    let (history_text, history) = promote(&a)?;
    let promoted_at = Instant::now();
    println!(
        "primary killed; synced at {synced} after {:?}; A replayed to {replayed}, promoted {:?} after the kill; \
         A's history: {history_text:?}",
        synced_at - died_at,
        promoted_at - died_at
    );

    wait_for_shim(&a, A_SHIM_APPLICATION_NAME)?;
    let mut shim_a = ComputeShim::start(&shim_args_for(&cluster, &a, A_SHIM_APPLICATION_NAME), cluster.dir.path())?;
    let elected = shim_a.wait_elected(ELECTION_TIMEOUT).context("A's shim")?;
    println!("A's shim elected {:?} after the kill: {elected}", died_at.elapsed());
    a.psql(AFTER_PROMOTION_TABLE)?;
    a.psql("INSERT INTO after_promotion VALUES (1, 'written on A after the promotion')")?;
    let first_commit_at = Instant::now();
    let commits_a = Some(CommitLoop::start(&a)?);
    Ok(Promoted {
        commits_a,
        shim_a,
        b,
        late,
        a,
        cluster,
        acked_before,
        synced,
        history_text,
        history,
        died_at,
        promoted_at,
        first_commit_at,
        b_started,
    })
}

/// The segment file names (not history, control or temp files) in `dir`.
fn segment_names(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|name| name.len() == SEGMENT_FILE_NAME_LEN && name.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    names.sort();
    Ok(names)
}

/// Safekeeper `index` reports Postgres timeline 2, descending from 1 at
/// `switch_lsn` (waits for it).
fn check_status_timeline(cluster: &QuorumCluster, index: usize, switch_lsn: Lsn) -> Result<()> {
    let pg_timelines = wait_for(TIMEOUT, &format!("safekeeper {index} to report timeline {NEW_TLI}"), || {
        let status = cluster.timeline_status(index)?;
        Ok((status["pg_timelines"]["current"] == NEW_TLI).then(|| status["pg_timelines"].clone()))
    })
    .with_context(|| {
        let status = cluster.timeline_status(index).map(|s| s.to_string()).unwrap_or_else(|e| format!("{e:#}"));
        format!("safekeeper {index}'s status: {status}")
    })?;
    let history: PgTimelineHistory = serde_json::from_value(pg_timelines.clone())
        .with_context(|| format!("pg_timelines of safekeeper {index}: {pg_timelines}"))?;
    ensure!(
        history.switches.len() == 1
            && history.switches[0].timeline == OLD_TLI
            && history.switches[0].end_lsn == switch_lsn,
        "safekeeper {index}'s pg_timelines: {pg_timelines}, A switched from {OLD_TLI} at {switch_lsn}"
    );
    Ok(())
}

/// Safekeeper `index`'s timeline directory: the history file equal to
/// A's, segments named for timeline 1 below the switch segment and for
/// timeline 2 from it on, A's bytes from the switch segment's start to
/// `end`, and pg_waldump reading both timelines.
fn check_files(promoted: &Promoted, index: usize, segment_size: WalSegmentSize, end: Lsn) -> Result<()> {
    let cluster = &promoted.cluster;
    let dir = cluster.timeline_dir(index);
    let switch_lsn = promoted.switch_lsn()?;
    let history_path = dir.join(format!("{NEW_TLI:08X}.history"));
    let stored = std::fs::read_to_string(&history_path).with_context(|| format!("reading {}", history_path.display()));
    let stored = stored?;
    ensure!(
        stored == promoted.history_text,
        "safekeeper {index}'s {} is {stored:?}, A's {:?}",
        history_path.display(),
        promoted.history_text
    );

    let switch_segment = switch_lsn.segment_no(segment_size);
    let names = segment_names(&dir)?;
    for name in &names {
        let (tli, segment) = postgres_wal::lsn::SegmentNo::parse_file_name(name, segment_size)?;
        let wanted = if segment.0 >= switch_segment.0 { NEW_TLI } else { OLD_TLI };
        ensure!(tli == wanted, "safekeeper {index} has {name}: segment {} is on timeline {wanted} (the switch segment is {}); files: {names:?}", segment.0, switch_segment.0);
    }
    let switch_name = switch_segment.file_name(NEW_TLI, segment_size);
    ensure!(names.contains(&switch_name), "safekeeper {index} has no {switch_name}; files: {names:?}");

    let switch_segment_start = switch_segment.start_lsn(segment_size);
    let ours = read_pg_wal(&dir, NEW_TLI, segment_size, switch_segment_start, end)?;
    let theirs = read_pg_wal(&promoted.a.pg_wal_dir(), NEW_TLI, segment_size, switch_segment_start, end)?;
    if ours != theirs {
        let first = ours.iter().zip(&theirs).position(|(x, y)| x != y).unwrap_or(ours.len().min(theirs.len()));
        bail!(
            "safekeeper {index}'s bytes {switch_segment_start}..{end} differ from A's pg_wal, first at {}",
            switch_segment_start + first as u64
        );
    }

    let new_records = waldump_timeline_lsns(&promoted.a, &dir, NEW_TLI, switch_segment_start, end)
        .with_context(|| format!("pg_waldump -t {NEW_TLI} on safekeeper {index}"))?;
    ensure!(!new_records.is_empty(), "pg_waldump -t {NEW_TLI} listed no record in {switch_segment_start}..{end}");
    ensure!(
        new_records.iter().any(|&lsn| lsn >= switch_lsn),
        "pg_waldump -t {NEW_TLI} listed nothing past the switch point"
    );
    let start = json_lsn(&cluster.timeline_status(index)?, "timeline_start_lsn")?;
    if start < switch_segment_start {
        let old_records = waldump_timeline_lsns(&promoted.a, &dir, OLD_TLI, start, switch_segment_start)
            .with_context(|| format!("pg_waldump -t {OLD_TLI} on safekeeper {index}"))?;
        ensure!(!old_records.is_empty(), "pg_waldump -t {OLD_TLI} listed no record in {start}..{switch_segment_start}");
    }
    println!(
        "safekeeper {index}: {} segment files ({} .. {}), {} bytes of timeline {NEW_TLI} equal to A's, \
         pg_waldump -t {NEW_TLI}: {} records",
        names.len(),
        names.first().map_or("", String::as_str),
        names.last().map_or("", String::as_str),
        ours.len(),
        new_records.len()
    );
    Ok(())
}

/// `IDENTIFY_SYSTEM` and `TIMELINE_HISTORY 2` on safekeeper `index`'s pg
/// port, and its history file over HTTP.
fn check_served_history(promoted: &Promoted, index: usize) -> Result<()> {
    let sk = &promoted.cluster.safekeepers[index];
    let port = sk.pg_addr.port();
    let identify =
        promoted.a.psql_replication_with_options(port, &QuorumCluster::timeline_options(), "IDENTIFY_SYSTEM")?;
    let fields: Vec<&str> = identify.split('|').collect();
    ensure!(fields.get(1) == Some(&"2"), "IDENTIFY_SYSTEM on safekeeper {index} answered {identify:?}");
    let history = promoted.a.psql_replication_with_options(
        port,
        &QuorumCluster::timeline_options(),
        &format!("TIMELINE_HISTORY {NEW_TLI}"),
    )?;
    let (name, content) = history.split_once('|').with_context(|| format!("TIMELINE_HISTORY answered {history:?}"))?;
    ensure!(name == format!("{NEW_TLI:08X}.history"), "TIMELINE_HISTORY {NEW_TLI} named {name:?}");
    // psql -At trims the output's last newline.
    ensure!(
        content == promoted.history_text.trim_end(),
        "TIMELINE_HISTORY {NEW_TLI} on safekeeper {index}: {content:?}, A's file: {:?}",
        promoted.history_text
    );
    let path = format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}/segment/{NEW_TLI:08X}.history");
    let answer = http_request("GET", sk.http_addr, &path, None, TIMEOUT)?;
    let body = String::from_utf8_lossy(&answer.body);
    ensure!(answer.status == 200, "GET {path} on safekeeper {index}: {} {body}", answer.status);
    ensure!(
        body == promoted.history_text,
        "GET {path} on safekeeper {index}: {body:?}, A's file: {:?}",
        promoted.history_text
    );
    Ok(())
}

/// Over HTTP (what a `restore_command` fetches), the switch segment of
/// safekeeper `index` by its timeline-2 name is A's file byte for byte
/// (`commit` is past its end); by its timeline-1 name it is not found.
fn check_served_switch_segment(promoted: &Promoted, index: usize, segment_size: WalSegmentSize) -> Result<()> {
    let sk = &promoted.cluster.safekeepers[index];
    let segment = promoted.switch_lsn()?.segment_no(segment_size);
    let prefix = format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}/segment");
    let new_name = segment.file_name(NEW_TLI, segment_size);
    let answer = http_request("GET", sk.http_addr, &format!("{prefix}/{new_name}"), None, TIMEOUT)?;
    ensure!(
        answer.status == 200,
        "GET segment/{new_name} on safekeeper {index}: {} {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    let path = promoted.a.pg_wal_dir().join(&new_name);
    let theirs = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(answer.body == theirs, "GET segment/{new_name} on safekeeper {index} differs from A's {new_name}");
    let old_name = segment.file_name(OLD_TLI, segment_size);
    let answer = http_request("GET", sk.http_addr, &format!("{prefix}/{old_name}"), None, TIMEOUT)?;
    ensure!(answer.status == 404, "GET segment/{old_name} on safekeeper {index} answered {}", answer.status);
    Ok(())
}

/// A standby follows onto timeline 2 and sees the row written on A after
/// the promotion, without a restart of its postmaster since `started`
/// (`pg_postmaster_start_time()`); returns how long after `since` it saw it.
fn check_follows(standby: &PgCluster, name: &str, started: &str, since: Instant) -> Result<Duration> {
    let seen = wait_for(TIMEOUT, &format!("standby {name} to see the row written on A"), || {
        Ok(standby.psql("SELECT note FROM after_promotion WHERE id = 1").ok().filter(|note| !note.is_empty()))
    })
    .with_context(|| format!("standby {name}'s log: {}", standby.log_tail()))?;
    let seen_after = since.elapsed();
    let tli = standby.psql("SELECT received_tli FROM pg_stat_wal_receiver")?;
    ensure!(tli == NEW_TLI.to_string(), "{name}'s wal receiver is on timeline {tli:?} (saw {seen:?})");
    let now = standby.psql("SELECT pg_postmaster_start_time()")?;
    ensure!(now == started, "{name}'s postmaster restarted: {started} then, {now} now");
    ensure!(standby.psql("SELECT pg_is_in_recovery()")? == "t", "{name} is not a standby any more");
    Ok(seen_after)
}

/// Test: the promoted standby's new timeline continues the safekeepers' log.
#[test]
fn the_promoted_standby_continues_the_safekeeper_timeline() -> Result<()> {
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut promoted = promote_a_standby()?;
    let mut checks = Checks::default();
    let synced = promoted.synced;
    let switch_lsn = promoted.switch_lsn()?;
    let segment_size = promoted.cluster.segment_size()?;
    let first_commit_after = promoted.first_commit_at - promoted.died_at;

    let present = xids_present(&promoted.a)?;
    let acked = promoted.acked_before.xids.len();
    let lost = promoted.acked_before.xids.iter().filter(|xid| !present.contains(xid)).count();
    checks.check(
        "every commit acknowledged by the old primary is on A",
        holds(lost == 0, || format!("{lost} of {acked} missing")),
    );
    checks.check(
        "A switched at the synced LSN",
        holds(switch_lsn == synced, || format!("A's switch point {switch_lsn}, synced {synced}")),
    );

    // A's load crosses into the segment after the switch segment.
    promoted
        .a
        .psql(&format!("INSERT INTO filler SELECT g, repeat('y', 200) FROM generate_series(1, {FILLER_ROWS}) g"))?;
    let past_switch_segment = switch_lsn.next_segment_start(segment_size) + LOAD_RUNNING_BYTES;
    let commit_a = wait_for(TIMEOUT, &format!("A's shim to commit {past_switch_segment}"), || {
        let commit = promoted.shim_a_commit()?;
        Ok((commit >= past_switch_segment).then_some(commit))
    });
    checks.check(
        "A's commits are acknowledged past the segment after the switch",
        commit_a.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e:#}")),
    );
    let report_a = promoted.commits_a.take().context("A's loop")?.finish(TIMEOUT)?;
    checks.check(
        "A's commit loop ran without an error",
        match &report_a.ended_by {
            None if !report_a.xids.is_empty() => Ok(()),
            None => Err(anyhow::anyhow!("no commit acknowledged on A")),
            Some(error) => Err(anyhow::anyhow!("ended by {error}")),
        },
    );
    let end = promoted.shim_a_commit()?;
    checks.check(
        "A's shim committed past the synced LSN",
        holds(end > synced, || format!("its commit LSN {end}, synced {synced}")),
    );

    for index in 0..promoted.cluster.safekeepers.len() {
        checks.check(
            &format!("safekeeper {index} reports timeline {NEW_TLI}"),
            check_status_timeline(&promoted.cluster, index, switch_lsn),
        );
        let flushed = promoted.cluster.wait_safekeeper_flush(index, end, TIMEOUT);
        checks.check(&format!("safekeeper {index} flushed {end}"), flushed);
        checks.check(
            &format!("safekeeper {index}'s files continue A's timeline"),
            check_files(&promoted, index, segment_size, end),
        );
        checks.check(&format!("safekeeper {index} serves the history"), check_served_history(&promoted, index));
        checks.check(
            &format!("safekeeper {index} serves the switch segment by its timeline-2 name"),
            check_served_switch_segment(&promoted, index, segment_size),
        );
    }
    // Fails today (product bug, see the module comment): the safekeeper
    // goes on sending timeline 2's WAL on B's timeline-1 stream.
    let b_follows = check_follows(&promoted.b, "B", &promoted.b_started, promoted.first_commit_at);
    let b_seen_after = b_follows.as_ref().ok().copied();
    checks.check("standby B, streaming through the failover, follows onto timeline 2", b_follows.map(|_| ()));
    let late_start = Instant::now();
    promoted.late.start()?;
    let late_started = promoted.late.psql("SELECT pg_postmaster_start_time()")?;
    let late_follows = check_follows(&promoted.late, "late", &late_started, late_start);
    let late_seen_after = late_follows.as_ref().ok().copied();
    checks.check("a standby connecting after the switch follows onto timeline 2", late_follows.map(|_| ()));
    let late_log = promoted.late.log_tail();
    let timeline_lines: Vec<&str> = late_log.lines().filter(|line| line.contains("timeline")).collect();
    println!("the late standby's log on timelines:\n{}", timeline_lines.join("\n"));

    println!(
        "promotion: {acked} commits acknowledged by the old primary, {lost} lost on A; synced {synced}, A switched \
         at {switch_lsn}; promoted {:?} after the kill, first commit on A {first_commit_after:?} after the kill; {} \
         commits acknowledged on A (commit LSN {end}); B saw A's row {b_seen_after:?} after it was written, the late \
         standby {late_seen_after:?} after it was started; test took {:?}",
        promoted.promoted_at - promoted.died_at,
        report_a.xids.len(),
        started.elapsed()
    );
    checks.finish()
}

/// Test: the old primary comes back on its old data directory with its
/// old shim command line while A commits: its shim is refused before it
/// votes, A's shim keeps leading and A's commits do not stall.
#[test]
fn the_old_primary_returning_is_refused() -> Result<()> {
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut promoted = promote_a_standby()?;
    let mut checks = Checks::default();
    let switch_lsn = promoted.switch_lsn()?;
    let commit_before = promoted.shim_a_commit()?;
    let count = promoted.cluster.safekeepers.len();
    let terms_before: Vec<Value> =
        (0..count).map(|index| Ok(promoted.cluster.timeline_status(index)?["term"].clone())).collect::<Result<_>>()?;

    let returned_at = Instant::now();
    promoted.cluster.pg.start()?;
    let old_tli = promoted.cluster.pg.psql("SELECT timeline_id FROM pg_control_checkpoint()")?;
    let mut old_shim = ComputeShim::spawn(&promoted.cluster.shim_args(), promoted.cluster.dir.path())?;
    let (exit, log) = wait_refused(&mut old_shim, "the old primary's shim")?;
    let refused_after = returned_at.elapsed();
    let last_line = log.lines().last().unwrap_or_default().to_string();
    println!("the old primary's shim ({exit}, {refused_after:?} after the old primary was started), its log ends: {last_line}");
    checks.check(
        "the old shim exits non-zero",
        if exit.success() { Err(anyhow::anyhow!("it exited 0")) } else { Ok(()) },
    );
    checks.check("the old shim says it was superseded, naming the timeline and LSN", {
        let names_lsn = log.contains(&switch_lsn.to_string());
        let names_tli = log.contains(&format!("timeline {NEW_TLI}")) && log.contains(&format!("timeline {OLD_TLI}"));
        if log.contains(SUPERSEDED) && names_lsn && names_tli {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "no {SUPERSEDED:?} naming timelines {OLD_TLI}, {NEW_TLI} and {switch_lsn} in its log: {log}"
            ))
        }
    });
    std::thread::sleep(LOAD_AFTER_REFUSAL);
    let checked_until = Instant::now();
    let report_a = promoted.commits_a.take().context("A's loop")?.finish(TIMEOUT)?;
    let stall = report_a.longest_stall(returned_at, checked_until);
    let longest = stall.map_or(Duration::ZERO, |(stall, _)| stall);
    let acked_during = report_a.ack_times.iter().filter(|&&at| at >= returned_at && at <= checked_until).count();
    checks.check("A's commits did not stall", {
        if acked_during == 0 {
            Err(anyhow::anyhow!("no commit acknowledged on A while the old primary was back"))
        } else if longest >= MAX_STALL_DURING_RETURN {
            Err(anyhow::anyhow!("a gap of {longest:?} between A's commits"))
        } else {
            Ok(())
        }
    });
    checks.check(
        "A's commit loop ran without an error",
        match &report_a.ended_by {
            None => Ok(()),
            Some(error) => Err(anyhow::anyhow!("ended by {error}")),
        },
    );
    checks.check("A's shim is still running and committing", {
        let running = promoted.shim_a.process.exit_status()?.is_none();
        let commit = promoted.shim_a_commit()?;
        if running && commit > commit_before {
            Ok(())
        } else {
            Err(anyhow::anyhow!("running: {running}, commit LSN {commit_before} then {commit} now"))
        }
    });
    let terms_after: Vec<Value> =
        (0..count).map(|index| Ok(promoted.cluster.timeline_status(index)?["term"].clone())).collect::<Result<_>>()?;
    checks.check(
        "no safekeeper's term moved for the old shim",
        holds(terms_after == terms_before, || format!("terms {terms_before:?} then, {terms_after:?} now")),
    );
    println!(
        "old primary returned (its checkpoint timeline {old_tli}): its shim refused after {refused_after:?}; {} \
         commits acknowledged on A, {acked_during} of them while it was back, longest gap {longest:?}; test took {:?}",
        report_a.xids.len(),
        started.elapsed()
    );
    checks.finish()
}

/// Test: a standby that stopped receiving while the primary went on, so
/// that promoted it ends timeline 1 below the synced LSN, is refused.
#[test]
fn a_standby_promoted_before_replaying_everything_is_refused() -> Result<()> {
    let _machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql(CREATE_TABLE)?;
    let c = cluster.start_standby_fed_by(0, options())?;
    let commits = CommitLoop::start(&cluster.pg)?;
    cluster.wait_commit_progress(LOAD_RUNNING_BYTES, TIMEOUT)?;
    // The stream cut, then replay paused. A pause alone would not leave
    // the standby behind: promotion ends a pause and replays everything
    // received first. And a paused startup process does not act on a
    // reloaded primary_conninfo, so the cut comes first.
    c.psql("ALTER SYSTEM SET primary_conninfo = ''")?;
    c.psql("SELECT pg_reload_conf()")?;
    wait_for(TIMEOUT, "the standby's wal receiver to stop", || {
        Ok((c.psql("SELECT count(*) FROM pg_stat_wal_receiver")? == "0").then_some(()))
    })
    .with_context(|| format!("the standby's log: {}", c.log_tail()))?;
    c.psql("SELECT pg_wal_replay_pause()")?;
    let received = lsn_of(&c, "SELECT pg_last_wal_receive_lsn()")?;
    cluster.wait_commit_progress(LOAD_RUNNING_BYTES, TIMEOUT)?;
    kill_primary(&mut cluster)?;
    let report = commits.finish(TIMEOUT)?;
    let synced = sync(&cluster)?.commit_lsn()?;
    let replayed = lsn_of(&c, "SELECT pg_last_wal_replay_lsn()")?;
    ensure!(received < synced, "the standby received {received}, the sync printed {synced}");
    let (_, history) = promote(&c)?;
    let switch_lsn = history.switches.last().context("no switch in the history")?.end_lsn;
    ensure!(switch_lsn < synced, "the standby switched at {switch_lsn}, at or past the synced {synced}");
    wait_for_shim(&c, A_SHIM_APPLICATION_NAME)?;
    let flush_before = flush_lsns(&cluster)?;

    println!(
        "{} acknowledged on the primary; the standby received {received}, replayed {replayed} when paused, switched \
         at {switch_lsn}; synced {synced}",
        report.xids.len()
    );
    let mut checks = Checks::default();
    // Right after the promotion its WAL ends below the log's end; then,
    // with more written locally, past it. Refused both times, nothing sent.
    // Fails today (product bug, see the module comment): refused, but as
    // `PostgresBehind`, not as promoted too early.
    let flush = lsn_of(&c, "SELECT pg_current_wal_flush_lsn()")?;
    checks.check(&format!("refused with its WAL ending at {flush}, below the log's end"), {
        shim_refused_early(&cluster, &c, &flush_before)
    });
    let rows = FILLER_ROWS / 4;
    c.psql(&format!(
        "SET synchronous_commit = local; CREATE TABLE written_after AS SELECT g, repeat('z', 200) AS pad FROM \
         generate_series(1, {rows}) g"
    ))?;
    let flush = lsn_of(&c, "SELECT pg_current_wal_flush_lsn()")?;
    ensure!(flush > synced, "after writing {rows} rows its WAL ends at {flush}, not past {synced}");
    checks.check(&format!("refused with its WAL ending at {flush}, past the log's end"), {
        shim_refused_early(&cluster, &c, &flush_before)
    });
    println!("test took {:?}", started.elapsed());
    checks.finish()
}

/// A shim on `c`, promoted before it replayed the log, exits non-zero
/// saying so, and no safekeeper's flush LSN moved from `flush_before`.
fn shim_refused_early(cluster: &QuorumCluster, c: &PgCluster, flush_before: &[Lsn]) -> Result<()> {
    let mut shim = ComputeShim::spawn(&shim_args_for(cluster, c, A_SHIM_APPLICATION_NAME), cluster.dir.path())?;
    let (exit, log) = wait_refused(&mut shim, "the early-promoted standby's shim")?;
    println!("its shim ({exit}) ends: {}", log.lines().last().unwrap_or_default());
    let flush_after = flush_lsns(cluster)?;
    ensure!(flush_after == flush_before, "the safekeepers' flush LSNs moved: {flush_before:?} -> {flush_after:?}");
    ensure!(!exit.success(), "it exited 0");
    ensure!(log.contains(PROMOTED_TOO_EARLY), "it did not say {PROMOTED_TOO_EARLY:?}: {log}");
    Ok(())
}

fn flush_lsns(cluster: &QuorumCluster) -> Result<Vec<Lsn>> {
    (0..cluster.safekeepers.len()).map(|index| json_lsn(&cluster.timeline_status(index)?, "flush_lsn")).collect()
}
