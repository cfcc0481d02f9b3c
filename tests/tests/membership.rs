//! Membership changes with real processes: PostgreSQL 15, compute_shim and
//! safekeepers, the safekeeper set changed through `POST /v1/membership`.
//!
//! - A SIGKILLed safekeeper is replaced by a new empty one under pgbench
//!   load: no acknowledged commit lost, the WAL up to the commit LSN
//!   byte-identical on the final members and pg_wal, the longest commit
//!   stall and the change's duration printed; afterwards the old node is
//!   not counted, a shim started with the old `--safekeepers` list learns
//!   the new configuration and never counts it, and a current member
//!   refuses an old-generation proposer's vote request.
//! - 3 -> 5 -> 3 under load: any two of five may stop, three may not; after
//!   the shrink any one of the final three may stop, and the two removed
//!   safekeepers are not needed.
//! - A change interrupted by SIGKILL of the shim in each phase (preparing,
//!   writing-joint, catching-up, writing-new) and resumed by a new shim
//!   started with the old list ends in one configuration stored by every
//!   member; a joint configuration is completed without a new request.
//!
//! Phases are held with SIGSTOP: a new member that cannot greet holds
//! preparing, a majority of both sets holds writing-joint, a new member
//! stopped after its greeting holds catching-up, a majority of the new set
//! holds writing-new.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, LOAD_RUNNING_BYTES, TENANT, TIMELINE};
use integration_tests::commit_loop::{CommitLoop, CommitReport};
use integration_tests::fixture::{wait_bounded, wait_for};
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::processes::KillOnDrop;
use integration_tests::wal_files::{committed_xids, read_wal};
use integration_tests::wire_client::WireClient;
use nix::sys::signal::Signal;
use postgres_wal::lsn::Lsn;
use postgres_wal::wal::format::PG15_VERSION_NUM;
use safekeeper_protocol::ids::{ClusterId, SystemId, Term};
use safekeeper_protocol::membership::MembershipGeneration;
use safekeeper_protocol::protocol::{AcceptorMessage, Greeting, ProposerMessage, VoteRequest, PROTOCOL_VERSION};
use serde_json::Value;

/// A commit that must go through: well above an election or a reconnect.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a whole membership change may take.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a commit without a quorum must stay blocked.
const NO_QUORUM_HOLD: Duration = Duration::from_secs(2);
/// How long a phase must be seen unchanged before the shim is killed in it.
const PHASE_HOLD: Duration = Duration::from_millis(500);
/// The load's pgbench run.
const LOAD_SECONDS: u64 = 20;
const LOAD_CLIENTS: &str = "4";
/// Beyond a change's duration, what a commit may wait (scheduling on 2
/// cores, checkpoints).
const STALL_SLACK: Duration = Duration::from_millis(500);
/// Bytes of WAL compared per read.
const COMPARE_WINDOW_BYTES: u64 = 64 << 20;

/// 1 MiB segments: changes and catch-ups cross many segment boundaries.
fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

// ---------------------------------------------------------------------------
// Load: pgbench (TPC-B) plus a commit loop that records every acknowledgement.

struct LoadReport {
    writer: CommitReport,
    pgbench_processed: u64,
    /// pgbench -P 1: transactions per second, second by second.
    tps: Vec<f64>,
}

struct Load {
    pgbench: KillOnDrop,
    writer: CommitLoop,
}

impl Load {
    /// `pgbench -T LOAD_SECONDS` on tables made by `pgbench -i`, and the
    /// commit loop into `acked`.
    fn start(pg: &PgCluster) -> Result<Load> {
        let mut pgbench = pg.command("pgbench");
        pgbench.args(["-n", "-c", LOAD_CLIENTS, "-j", "2", "-P", "1", "-T", &LOAD_SECONDS.to_string()]);
        let pgbench =
            KillOnDrop::new(pgbench.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?);
        let writer = CommitLoop::start(pg)?;
        Ok(Load { pgbench, writer })
    }

    /// Wait (bounded) for pgbench to end, then stop the commit loop.
    fn finish(self) -> Result<LoadReport> {
        let Load { mut pgbench, writer } = self;
        let exit = wait_bounded(pgbench.child(), Duration::from_secs(LOAD_SECONDS) + CHANGE_TIMEOUT)?;
        let writer = writer.finish(COMMIT_TIMEOUT)?;
        if let Some(error) = &writer.ended_by {
            bail!("the commit loop failed: {error}");
        }
        let Some(exit) = exit else { bail!("pgbench did not finish") };
        let output = pgbench.into_inner().wait_with_output()?;
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        ensure!(exit.success(), "pgbench failed: {stdout}{stderr}");
        let pgbench_processed = stdout
            .lines()
            .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next()?.trim().parse().ok())
            .with_context(|| format!("no transaction count in {stdout}"))?;
        let tps = stderr
            .lines()
            .filter_map(|line| line.strip_prefix("progress: "))
            .filter_map(|line| line.split(", ").nth(1)?.strip_suffix(" tps")?.parse().ok())
            .collect();
        Ok(LoadReport { writer, pgbench_processed, tps })
    }
}

// ---------------------------------------------------------------------------
// Commits.

/// One acknowledged commit (a row in `probe`); its xid.
fn commit_probe(pg: &PgCluster) -> Result<u32> {
    let sql = "CREATE TABLE IF NOT EXISTS probe (v int); \
               INSERT INTO probe VALUES (1) RETURNING txid_current() % 4294967296";
    let output = pg.psql_with_timeout(sql, COMMIT_TIMEOUT)?;
    let line = output.lines().find(|line| line.trim().parse::<u32>().is_ok()).unwrap_or_default();
    line.trim().parse().with_context(|| format!("expected an xid, psql printed {output:?}"))
}

/// A commit started now must stay waiting for NO_QUORUM_HOLD; the psql
/// running it is returned (killed if dropped) for [`expect_commit_returns`].
fn expect_commit_blocked(pg: &PgCluster, why: &str) -> Result<KillOnDrop> {
    pg.psql("CREATE TABLE IF NOT EXISTS probe (v int)")?;
    let mut psql = pg.command("psql");
    psql.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", "INSERT INTO probe VALUES (2)"]);
    let mut blocked = KillOnDrop::new(psql.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?);
    if let Some(status) = wait_bounded(blocked.child(), NO_QUORUM_HOLD)? {
        bail!("a commit returned ({status}) although {why}");
    }
    Ok(blocked)
}

fn expect_commit_returns(mut blocked: KillOnDrop, why: &str) -> Result<()> {
    let Some(status) = wait_bounded(blocked.child(), COMMIT_TIMEOUT)? else {
        bail!("the blocked commit did not return after {why}");
    };
    let output = blocked.into_inner().wait_with_output()?;
    ensure!(status.success(), "the blocked commit failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

// ---------------------------------------------------------------------------
// Safekeepers and the shim.

fn stop(cluster: &QuorumCluster, indexes: &[usize]) -> Result<()> {
    indexes.iter().try_for_each(|&index| cluster.safekeepers[index].process.signal(Signal::SIGSTOP))
}

fn resume(cluster: &QuorumCluster, indexes: &[usize]) -> Result<()> {
    indexes.iter().try_for_each(|&index| cluster.safekeepers[index].process.signal(Signal::SIGCONT))
}

fn stored_configuration(cluster: &QuorumCluster, index: usize) -> Result<Value> {
    Ok(cluster.timeline_status(index)?["membership"].clone())
}

fn timeline_term(cluster: &QuorumCluster, index: usize) -> Result<u64> {
    cluster.timeline_status(index)?["term"].as_u64().context("term")
}

fn addr_strings(cluster: &QuorumCluster, indexes: &[usize]) -> BTreeSet<String> {
    cluster.pg_addrs(indexes).iter().map(SocketAddr::to_string).collect()
}

/// The shim's status entry for a safekeeper, if it keeps a connection to it.
fn shim_link(status: &Value, addr: SocketAddr) -> Option<Value> {
    let addr = addr.to_string();
    status["safekeepers"].as_array()?.iter().find(|link| link["addr"] == addr.as_str()).cloned()
}

/// `POST /v1/membership` for the safekeepers at `indexes`: must be taken.
fn request(cluster: &QuorumCluster, indexes: &[usize]) -> Result<Value> {
    let (code, body) = cluster.shim()?.request_membership(&cluster.pg_addrs(indexes))?;
    ensure!(code == 202, "POST /v1/membership answered {code}: {body}");
    Ok(body)
}

/// Phases of a change as seen by polling, with when each was first seen.
struct ChangeReport {
    phases: Vec<(String, Duration)>,
    /// What the shim reports (`last_completed.took_ms`).
    took: Duration,
    /// Requested to done, as the test saw it.
    wall: Duration,
    /// What every new member had to flush (if catching-up was seen).
    catch_up_target: Option<Lsn>,
}

impl std::fmt::Display for ChangeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "took {} ms (shim), {} ms (seen); phases first seen at",
            self.took.as_millis(),
            self.wall.as_millis()
        )?;
        for (phase, at) in &self.phases {
            write!(f, " {phase}@{}ms", at.as_millis())?;
        }
        if let Some(target) = self.catch_up_target {
            write!(f, "; catch-up target {target}")?;
        }
        Ok(())
    }
}

/// Follow a change just requested until the shim counts in the safekeepers
/// at `indexes` alone.
fn follow_change(cluster: &QuorumCluster, indexes: &[usize], requested_at: Instant) -> Result<ChangeReport> {
    let mut phases: Vec<(String, Duration)> = vec![];
    let mut catch_up_target = None;
    let wanted = addr_strings(cluster, indexes);
    let done = wait_for(CHANGE_TIMEOUT, &format!("the change to {wanted:?}"), || {
        let membership = cluster.shim()?.membership()?;
        if let Some(phase) = membership["change"]["phase"].as_str() {
            if phases.last().is_none_or(|(last, _)| last != phase) {
                phases.push((phase.to_string(), requested_at.elapsed()));
            }
        }
        if let Some(target) = membership["change"]["catch_up_target_lsn"].as_str() {
            catch_up_target = Some(target.parse()?);
        }
        let members: BTreeSet<String> = member_addrs(&membership["members"]);
        let settled = membership["change"].is_null() && membership["joint_new"].is_null();
        Ok((settled && members == wanted).then_some(membership))
    })
    .with_context(|| shim_context(cluster))?;
    let wall = requested_at.elapsed();
    let took = Duration::from_millis(done["last_completed"]["took_ms"].as_u64().context("last_completed")?);
    Ok(ChangeReport { phases, took, wall, catch_up_target })
}

/// Once the change is done, each safekeeper at `new` has durably flushed
/// what catching-up asked of it (by its own status).
fn check_caught_up(cluster: &QuorumCluster, change: &ChangeReport, new: &[usize]) -> Result<()> {
    let Some(target) = change.catch_up_target else { return Ok(()) };
    for &index in new {
        let flush = json_lsn(&cluster.timeline_status(index)?, "flush_lsn")?;
        ensure!(flush >= target, "new safekeeper {index} flushed {flush}, below the catch-up target {target}");
    }
    Ok(())
}

fn member_addrs(members: &Value) -> BTreeSet<String> {
    members.as_array().into_iter().flatten().filter_map(|m| m["pg_addr"].as_str().map(str::to_string)).collect()
}

fn member_addrs_of(addrs: &Value) -> BTreeSet<String> {
    addrs.as_array().into_iter().flatten().filter_map(|addr| addr.as_str().map(str::to_string)).collect()
}

fn shim_context(cluster: &QuorumCluster) -> String {
    let membership = cluster.shim().and_then(|shim| shim.membership()).map(|m| m.to_string()).unwrap_or_default();
    let log = cluster.shim().map(|shim| shim.process.log_tail()).unwrap_or_default();
    format!("the shim's membership: {membership}\nits log ends:\n{log}")
}

/// Poll until the shim's change is in `phase`, and still is PHASE_HOLD
/// later (held there by stopped safekeepers); returns the membership.
fn hold_phase(cluster: &QuorumCluster, phase: &str) -> Result<Value> {
    let in_phase = || -> Result<Option<Value>> {
        let membership = cluster.shim()?.membership()?;
        Ok((membership["change"]["phase"] == phase).then_some(membership))
    };
    wait_for(CHANGE_TIMEOUT, &format!("the change to reach {phase}"), in_phase)
        .with_context(|| shim_context(cluster))?;
    thread::sleep(PHASE_HOLD);
    in_phase()?.with_context(|| format!("the change did not stay in {phase}: {}", shim_context(cluster)))
}

/// Poll (fast) until the shim knows the node id of the new member at
/// `index`: it greeted, and its catch-up is about to begin.
fn wait_greeted(cluster: &QuorumCluster, index: usize) -> Result<()> {
    let addr = cluster.safekeepers[index].pg_addr.to_string();
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    loop {
        let membership = cluster.shim()?.membership()?;
        let new_members = membership["change"]["new_members"].as_array().cloned().unwrap_or_default();
        if new_members.iter().any(|member| member["pg_addr"] == addr.as_str() && !member["node_id"].is_null()) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{addr} never greeted: {}", shim_context(cluster));
        thread::sleep(Duration::from_millis(2));
    }
}

/// Every safekeeper at `indexes` stores the shim's configuration (same
/// generation, writer term and members, each with its node id; not joint),
/// the shim counts exactly them, and a commit goes through. Returns the
/// generation.
fn check_one_configuration(cluster: &QuorumCluster, indexes: &[usize]) -> Result<u64> {
    let shim = cluster.wait_membership(indexes, CHANGE_TIMEOUT)?;
    ensure!(shim["members"].as_array().is_some_and(|m| m.iter().all(|m| m["node_id"].is_u64())), "ids: {shim}");
    for &index in indexes {
        wait_for(COMMIT_TIMEOUT, &format!("safekeeper {index} to store the configuration {shim}"), || {
            let stored = stored_configuration(cluster, index)?;
            let same = ["generation", "written_in_term", "members", "joint_new"].iter().all(|f| stored[f] == shim[f]);
            Ok(same.then_some(()))
        })?;
    }
    let status = cluster.shim()?.status()?;
    let counted: BTreeSet<String> = status["safekeepers"]
        .as_array()
        .context("safekeepers")?
        .iter()
        .filter(|link| link["member"] == true)
        .filter_map(|link| link["addr"].as_str().map(str::to_string))
        .collect();
    ensure!(counted == addr_strings(cluster, indexes), "the shim's status counts {counted:?}: {status}");
    ensure!(status["membership"]["generation"] == shim["generation"], "status and membership disagree: {status}");
    commit_probe(&cluster.pg)?;
    shim["generation"].as_u64().context("generation")
}

/// No acknowledged commit lost: pgbench's transactions are all in the
/// database, the commit loop's rows too and their commit records are in
/// the committed WAL of every safekeeper at `indexes`, which is
/// byte-identical to pg_wal up to the shim's commit LSN.
fn check_nothing_lost(cluster: &QuorumCluster, indexes: &[usize], load: &LoadReport) -> Result<Lsn> {
    let history: u64 = cluster.pg.psql("SELECT count(*) FROM pgbench_history")?.parse()?;
    ensure!(history == load.pgbench_processed, "{history} pgbench rows for {} acknowledged", load.pgbench_processed);
    let rows: usize = cluster.pg.psql("SELECT count(*) FROM acked")?.parse()?;
    ensure!(rows == load.writer.xids.len(), "{rows} rows for {} acknowledged commits", load.writer.xids.len());
    let commit = cluster.wait_shim_commit(cluster.pg_flush_lsn()?, COMMIT_TIMEOUT)?;
    let segment_size = cluster.segment_size()?;
    let start = cluster.timeline_start_lsn(indexes[0])?;
    let acked: HashSet<u32> = load.writer.xids.iter().copied().collect();
    for &index in indexes {
        cluster.wait_safekeeper_flush(index, commit, COMMIT_TIMEOUT)?;
        ensure!(cluster.timeline_start_lsn(index)? == start, "safekeeper {index} starts elsewhere");
        let committed = committed_xids(&cluster.timeline_dir(index), segment_size, start, commit)?;
        let missing = acked.difference(&committed).count();
        ensure!(missing == 0, "{missing} acknowledged commits missing on safekeeper {index} below {commit}");
    }
    let mut window_start = start;
    while window_start < commit {
        let window_end = Lsn((window_start.0 + COMPARE_WINDOW_BYTES).min(commit.0));
        let primary = read_wal(&cluster.pg.pg_wal_dir(), segment_size, window_start, window_end)?;
        for &index in indexes {
            let theirs = read_wal(&cluster.timeline_dir(index), segment_size, window_start, window_end)?;
            ensure!(theirs == primary, "safekeeper {index} differs from pg_wal in {window_start}..{window_end}");
        }
        window_start = window_end;
    }
    Ok(commit)
}

/// Copy the cluster's logs (shims, safekeepers, Postgres) out of its
/// temporary directory, which goes when the test ends.
fn keep_logs(cluster: &QuorumCluster) -> Result<std::path::PathBuf> {
    let kept = std::env::temp_dir().join(format!("membership-logs-{}", std::process::id()));
    std::fs::create_dir_all(&kept)?;
    for entry in std::fs::read_dir(cluster.dir.path())? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "log") {
            std::fs::copy(&path, kept.join(path.file_name().context("a file name")?))?;
        }
    }
    std::fs::copy(cluster.pg.log_path(), kept.join("postgres.log"))?;
    Ok(kept)
}

fn print_load(label: &str, load: &LoadReport) {
    let tps: Vec<String> = load.tps.iter().map(|tps| format!("{tps:.0}")).collect();
    println!(
        "{label}: pgbench {} transactions, tps per second [{}]; commit loop {} commits",
        load.pgbench_processed,
        tps.join(" "),
        load.writer.xids.len()
    );
}

// ---------------------------------------------------------------------------
// A proposer speaking the safekeeper protocol directly (old generation).

/// What a proposer that knows no configuration (generation 0) sends: a
/// greeting (answered with the safekeeper's configuration), then a vote
/// request for a term far above everything. Returns the stored
/// configuration's generation and the vote request's answer.
fn old_generation_vote(
    cluster: &QuorumCluster,
    index: usize,
    term: Term,
) -> Result<(u32, std::result::Result<AcceptorMessage, String>)> {
    let status = cluster.timeline_status(index)?;
    let system_id = SystemId(status["system_id"].as_u64().context("system_id")?);
    let cluster_id = ClusterId { system_id, tenant_id: TENANT.parse()?, timeline_id: TIMELINE.parse()? };
    let mut proposer = WireClient::for_timeline(cluster.safekeepers[index].pg_addr, TENANT, TIMELINE)?;
    proposer.start_wal_push()?;
    let greeting = Greeting {
        protocol_version: PROTOCOL_VERSION,
        cluster: cluster_id,
        pg_version: PG15_VERSION_NUM,
        wal_segment_size_bytes: cluster.segment_size()?.bytes() as u32,
        proposer_id: [0x0d; 16],
        generation: MembershipGeneration::NOT_SET,
        pg_timeline: 1,
    };
    let generation = match proposer.exchange(&ProposerMessage::Greeting(greeting))? {
        Ok(AcceptorMessage::GreetingResponse(response)) => response.configuration.generation,
        other => bail!("greeting answered {other:?}"),
    };
    let vote = VoteRequest { cluster: cluster_id, term, generation: MembershipGeneration::NOT_SET, pg_timeline: 1 };
    let answer = proposer.exchange(&ProposerMessage::VoteRequest(vote))?;
    Ok((generation.0, answer.map_err(|refusal| format!("{}: {}", refusal.code, refusal.message))))
}

// ---------------------------------------------------------------------------
// The tests.

/// Issue test 2: a SIGKILLed safekeeper replaced by a new empty one under
/// pgbench load.
#[test]
fn a_dead_safekeeper_is_replaced_under_load_and_the_old_node_is_refused() -> Result<()> {
    let test_started = Instant::now();
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.pgbench(&["-i", "-s", "2", "-q"])?;
    let load = Load::start(&cluster.pg)?;
    cluster.wait_commit_progress(LOAD_RUNNING_BYTES, COMMIT_TIMEOUT)?;
    cluster.kill_safekeeper(2)?;
    let killed_at = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let new = cluster.add_safekeeper(4, &[0, 1])?;
    let final_set = [0, 1, new];
    let requested_at = Instant::now();
    request(&cluster, &final_set)?;
    let change = follow_change(&cluster, &final_set, requested_at)?;
    check_caught_up(&cluster, &change, &[new])?;
    let changed_at = Instant::now();
    let load = load.finish()?;
    let catch_up = catch_up_duration(&change);
    let stall_in_change = load.writer.max_stall(requested_at, changed_at);
    let (stall_overall, stall_began) = load
        .writer
        .longest_stall(killed_at, changed_at + Duration::from_secs(1))
        .context("no commit acknowledged around the change")?;
    let since_kill = |at: Instant| at.saturating_duration_since(killed_at).as_millis();
    println!("replace a dead safekeeper: change {change}");
    println!(
        "replace a dead safekeeper: longest commit stall {} ms during the change, {} ms from the kill to 1 s after \
         the change, beginning {} ms after the kill (change requested at {} ms, done at {} ms; catching-up lasted \
         ~{} ms)",
        stall_in_change.as_millis(),
        stall_overall.as_millis(),
        since_kill(stall_began),
        since_kill(requested_at),
        since_kill(changed_at),
        catch_up.as_millis()
    );
    print_load("replace a dead safekeeper", &load);
    // The new member's catch-up (from Postgres, below the shim's buffer,
    // or from its peers) is over once the change is done.
    if stall_overall > change.wall + STALL_SLACK {
        let kept = keep_logs(&cluster)?;
        bail!("commits stalled {stall_overall:?}, the whole change took {:?}; logs in {}", change.wall, kept.display());
    }
    ensure!(!load.tps.contains(&0.0), "a second without commits: {:?}", load.tps);
    let generation = check_one_configuration(&cluster, &final_set)?;
    ensure!(generation == 2, "one change writes two generations, not {generation}");
    let commit = check_nothing_lost(&cluster, &final_set, &load)?;
    println!("replace a dead safekeeper: nothing lost up to {commit}, generation {generation}");

    the_old_node_is_not_counted(&mut cluster, new)?;
    println!("replace a dead safekeeper: whole test {:.1} s", test_started.elapsed().as_secs_f64());
    Ok(())
}

/// How long the change was seen catching up (zero if never seen).
fn catch_up_duration(change: &ChangeReport) -> Duration {
    let position = change.phases.iter().position(|(phase, _)| phase == "catching-up");
    let Some(position) = position else { return Duration::ZERO };
    let start = change.phases[position].1;
    let end = change.phases.get(position + 1).map_or(change.wall, |(_, at)| *at);
    end - start
}

/// After safekeeper 2 (index 2) was replaced by `new`: (a) restarted on its
/// old data it is not counted, (b) a shim started with the old list learns
/// the new configuration and never counts it, (c) a current member refuses
/// a vote request of generation 0.
fn the_old_node_is_not_counted(cluster: &mut QuorumCluster, new: usize) -> Result<()> {
    let old = 2;
    let old_addr = cluster.safekeepers[old].pg_addr;
    // (a) The running shim does not talk to it.
    cluster.restart_safekeeper(old)?;
    ensure!(stored_configuration(cluster, old)?["generation"] == 0, "the old node learned a configuration");
    let old_term = timeline_term(cluster, old)?;
    thread::sleep(Duration::from_secs(2));
    commit_probe(&cluster.pg)?;
    let status = cluster.shim()?.status()?;
    ensure!(shim_link(&status, old_addr).is_none_or(|link| link["member"] == false), "old node counted: {status}");
    ensure!(timeline_term(cluster, old)? == old_term, "the shim talked to the old node");
    ensure!(cluster.timeline_status(old)?["connected_proposers"] == 0, "a proposer is connected to the old node");

    // (b) A shim with the old list, while only safekeeper 0 of the new set
    // answers: counting the old node (generation 0: 0 and 2 are a majority
    // of the old set) would elect it and commit; it must wait instead.
    cluster.shim = None;
    stop(cluster, &[1, new])?;
    cluster.spawn_shim_with(&[0, 1, old])?;
    wait_for(COMMIT_TIMEOUT, "the old-list shim to learn generation 2", || {
        Ok((cluster.shim()?.membership()?["generation"] == 2).then_some(()))
    })?;
    let blocked = expect_commit_blocked(&cluster.pg, "only one member of the new set answers")?;
    let status = cluster.shim()?.status()?;
    ensure!(status["phase"] != "elected", "elected without a quorum of the new set: {status}");
    ensure!(timeline_term(cluster, old)? == old_term, "the old node was asked to vote");
    resume(cluster, &[new])?;
    expect_commit_returns(blocked, "the new member answered")?;
    // The status is refreshed every driver tick: wait for it to catch up.
    let new_addr = cluster.safekeepers[new].pg_addr;
    let status = wait_for(COMMIT_TIMEOUT, "the shim to stream to the new member", || {
        let status = cluster.shim()?.status()?;
        let link = shim_link(&status, new_addr);
        Ok(link.is_some_and(|link| link["member"] == true && link["state"] == "streaming").then_some(status))
    })?;
    ensure!(shim_link(&status, old_addr).is_none_or(|link| link["member"] == false), "old node counted: {status}");
    ensure!(timeline_term(cluster, old)? == old_term, "the old node was asked to vote");
    resume(cluster, &[1])?;
    check_one_configuration(cluster, &[0, 1, new])?;

    // (c) A proposer of generation 0 asks a current member for a vote in a
    // term far above: refused, nothing changes. The same request to the old
    // node (no configuration stored) is granted: only the refusal differs.
    let member_term = timeline_term(cluster, 0)?;
    let high = Term(member_term + 1000);
    let (generation, answer) = old_generation_vote(cluster, 0, high)?;
    ensure!(generation == 2, "the member's greeting showed generation {generation}");
    let refusal = answer.err().context("a current member answered an old-generation vote request")?;
    ensure!(refusal.contains("generation"), "unclear refusal: {refusal}");
    ensure!(timeline_term(cluster, 0)? == member_term, "the refused vote request changed the member's term");
    let (generation, answer) = old_generation_vote(cluster, old, high)?;
    ensure!(generation == 0, "the old node shows generation {generation}");
    ensure!(matches!(answer, Ok(AcceptorMessage::VoteResponse(ref vote)) if vote.vote_given), "control: {answer:?}");
    let status = cluster.shim()?.status()?;
    ensure!(status["phase"] == "elected", "the shim lost its election: {status}");
    commit_probe(&cluster.pg)?;
    println!("replace a dead safekeeper: old-generation vote refused by a member: {refusal}");
    Ok(())
}

/// Issue test 3: 3 -> 5 -> 3 under load.
#[test]
fn grow_to_five_and_shrink_to_three_under_load() -> Result<()> {
    let test_started = Instant::now();
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.pgbench(&["-i", "-s", "2", "-q"])?;
    let load = Load::start(&cluster.pg)?;
    let fourth = cluster.add_safekeeper(4, &[0, 1, 2])?;
    let fifth = cluster.add_safekeeper(5, &[0, 1, 2, fourth])?;
    let five = [0, 1, 2, fourth, fifth];
    let requested_at = Instant::now();
    request(&cluster, &five)?;
    let grow = follow_change(&cluster, &five, requested_at)?;
    check_caught_up(&cluster, &grow, &[fourth, fifth])?;
    let grown_at = Instant::now();
    println!("grow 3 -> 5: {grow}");
    check_one_configuration(&cluster, &five)?;

    // Any two of five may stop; three may not (2 and 3 alone would be a
    // majority of the old three).
    let pairs_started = Instant::now();
    for (i, &a) in five.iter().enumerate() {
        for &b in &five[i + 1..] {
            stop(&cluster, &[a, b])?;
            commit_probe(&cluster.pg).with_context(|| format!("with safekeepers {a} and {b} stopped"))?;
            resume(&cluster, &[a, b])?;
        }
    }
    cluster.kill_safekeeper(1)?;
    cluster.kill_safekeeper(fifth)?;
    commit_probe(&cluster.pg).context("with safekeepers 1 and 5 killed")?;
    cluster.restart_safekeeper(1)?;
    cluster.restart_safekeeper(fifth)?;
    println!(
        "five: a commit with each of the 10 pairs stopped, and with 2 killed: {} ms",
        pairs_started.elapsed().as_millis()
    );
    stop(&cluster, &[0, fourth, fifth])?;
    let blocked = expect_commit_blocked(&cluster.pg, "three of five are stopped")?;
    resume(&cluster, &[0, fourth, fifth])?;
    expect_commit_returns(blocked, "the three came back")?;

    let three = [2, fourth, fifth];
    let requested_at = Instant::now();
    request(&cluster, &three)?;
    let shrink = follow_change(&cluster, &three, requested_at)?;
    let shrunk_at = Instant::now();
    println!("shrink 5 -> 3: {shrink}");
    let load = load.finish()?;
    print_load("grow and shrink", &load);
    println!(
        "grow and shrink: longest commit stall {} ms while growing, {} ms while shrinking",
        load.writer.max_stall(grown_at - grow.wall, grown_at).as_millis(),
        load.writer.max_stall(shrunk_at - shrink.wall, shrunk_at).as_millis()
    );
    let generation = check_one_configuration(&cluster, &three)?;
    ensure!(generation == 4, "two changes write four generations, not {generation}");
    check_nothing_lost(&cluster, &three, &load)?;
    removed_members_are_not_needed(&mut cluster, &three, &[0, 1])?;
    println!("grow and shrink: whole test {:.1} s", test_started.elapsed().as_secs_f64());
    Ok(())
}

/// After shrinking to `three`: the `removed` ones were told (they store the
/// final configuration), do not count (two of the three stopped block a
/// commit although the removed would make a majority of the five), are
/// not needed (killed), and any one of the three may stop.
fn removed_members_are_not_needed(cluster: &mut QuorumCluster, three: &[usize], removed: &[usize]) -> Result<()> {
    let final_configuration = stored_configuration(cluster, three[0])?;
    for &index in removed {
        wait_for(COMMIT_TIMEOUT, &format!("removed safekeeper {index} to store the final configuration"), || {
            Ok((stored_configuration(cluster, index)? == final_configuration).then_some(()))
        })?;
    }
    stop(cluster, &three[1..])?;
    let blocked = expect_commit_blocked(&cluster.pg, "two of the final three are stopped")?;
    resume(cluster, &three[1..])?;
    expect_commit_returns(blocked, "they came back")?;
    for &index in removed {
        cluster.kill_safekeeper(index)?;
    }
    for &index in three {
        stop(cluster, &[index])?;
        commit_probe(&cluster.pg).with_context(|| format!("with safekeeper {index} stopped"))?;
        resume(cluster, &[index])?;
    }
    println!("three: the removed are killed; a commit with each of the final three stopped");
    Ok(())
}

/// Issue test 4: a change interrupted by SIGKILL of the shim in each phase
/// and resumed by a new shim started with the old list.
#[test]
fn a_change_interrupted_in_each_phase_ends_in_one_configuration() -> Result<()> {
    let test_started = Instant::now();
    let mut cluster = QuorumCluster::start(options())?;
    // Enough WAL that a new member's catch-up takes a moment (catching-up
    // is held by stopping the new member right after its greeting).
    cluster.pg.pgbench(&["-i", "-s", "5", "-q"])?;
    let [a, b, c] = [0, 1, 2];

    // Preparing: the new member cannot greet. Nothing was stored, so the
    // new shim knows nothing of it; the repeated request runs it.
    let d = cluster.add_safekeeper(4, &[])?;
    stop(&cluster, &[d])?;
    request(&cluster, &[a, b, d])?;
    hold_phase(&cluster, "preparing")?;
    for index in [a, b, c] {
        expect_stored(&cluster, index, 0, false)?;
    }
    let generation = resume_after_kill(&mut cluster, &[d], &[a, b, c], &[a, b, d], Repost::Immediately, 0)?;
    println!("interrupted in preparing: resumed by the repeated request, generation {generation}");

    // Writing-joint: a majority of the old and of the new set is stopped;
    // only c's replacement d and the new e store the joint configuration.
    // The new shim finds it on d and completes it without a request.
    let e = cluster.add_safekeeper(5, &[])?;
    stop(&cluster, &[a, b])?;
    request(&cluster, &[a, b, e])?;
    hold_phase(&cluster, "writing-joint")?;
    for index in [d, e] {
        expect_stored(&cluster, index, generation + 1, true)?;
    }
    let generation = resume_after_kill(&mut cluster, &[a, b], &[a, b, d], &[a, b, e], Repost::AfterDone, generation)?;
    println!("interrupted in writing-joint: completed without a request, generation {generation}");

    // Catching-up: the new member is stopped right after its greeting.
    let f = cluster.add_safekeeper(6, &[])?;
    request(&cluster, &[a, b, f])?;
    wait_greeted(&cluster, f)?;
    stop(&cluster, &[f])?;
    hold_phase(&cluster, "catching-up")?;
    for index in [a, b, e] {
        expect_stored(&cluster, index, generation + 1, true)?;
    }
    let generation = resume_after_kill(&mut cluster, &[f], &[a, b, e], &[a, b, f], Repost::Immediately, generation)?;
    println!("interrupted in catching-up: resumed, generation {generation}");

    // Writing-new: catching-up held as above, then a and f (two of the new
    // set a, f, g) and the leaving b stopped before g may catch up: only g
    // stores the new set while they are stopped. (Resumed, they may still
    // read the new set from their socket buffers, sent before the kill; the
    // new shim learns it from them, or from g after adopting the joint one.)
    let g = cluster.add_safekeeper(7, &[])?;
    request(&cluster, &[a, f, g])?;
    wait_greeted(&cluster, g)?;
    stop(&cluster, &[g])?;
    hold_phase(&cluster, "catching-up")?;
    stop(&cluster, &[a, b, f])?;
    resume(&cluster, &[g])?;
    hold_phase(&cluster, "writing-new")?;
    expect_stored(&cluster, g, generation + 2, false)?;
    let generation =
        resume_after_kill(&mut cluster, &[a, b, f], &[a, b, f], &[a, f, g], Repost::Immediately, generation)?;
    println!("interrupted in writing-new: resumed, generation {generation}");
    println!("interrupted changes: whole test {:.1} s", test_started.elapsed().as_secs_f64());
    Ok(())
}

/// Safekeeper `index` stores configuration `generation` (joint or not),
/// as the shim leaves it when killed.
fn expect_stored(cluster: &QuorumCluster, index: usize, generation: u64, joint: bool) -> Result<()> {
    let stored = stored_configuration(cluster, index)?;
    let ok = stored["generation"] == generation && stored["joint_new"].is_null() != joint;
    ensure!(ok, "safekeeper {index} stores {stored}, expected generation {generation} (joint: {joint})");
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Repost {
    /// Repeat the request as soon as the new shim is elected.
    Immediately,
    /// Let the new shim complete what it finds, then repeat the request
    /// (it must find the change done).
    AfterDone,
}

/// SIGKILL the shim (its change held in a phase), resume the `stopped`
/// safekeepers, start a shim with `--safekeepers` = `old_list`, and check
/// the change to `target` ends in one configuration of a generation above
/// `previous`; returns it.
fn resume_after_kill(
    cluster: &mut QuorumCluster,
    stopped: &[usize],
    old_list: &[usize],
    target: &[usize],
    repost: Repost,
    previous: u64,
) -> Result<u64> {
    cluster.shim.as_mut().context("shim")?.process.kill()?;
    resume(cluster, stopped)?;
    let resumed_at = Instant::now();
    cluster.start_shim_with(old_list)?;
    if repost == Repost::Immediately {
        let answer = request(cluster, target)?;
        let change = &answer["change"];
        let phase = change["phase"].as_str().unwrap_or("none (done)");
        println!("  the repeated request found generation {} and change phase {phase}", answer["generation"]);
        ensure!(
            change.is_null() || member_addrs_of(&change["target"]) == addr_strings(cluster, target),
            "the repeated request runs another change: {answer}"
        );
    }
    cluster.wait_membership(target, CHANGE_TIMEOUT)?;
    let took = resumed_at.elapsed();
    if repost == Repost::AfterDone {
        let answer = request(cluster, target)?;
        ensure!(answer["change"].is_null(), "a repeated request started another change: {answer}");
    }
    let generation = check_one_configuration(cluster, target)?;
    ensure!(generation > previous, "generation {generation} after {previous}");
    let log = std::fs::read_to_string(&cluster.shim()?.process.log_path)?;
    let adopted: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("adopting a newer safekeeper configuration"))
        .filter_map(|line| line.rsplit(['=', 'm']).next())
        .collect();
    println!(
        "  the new shim reached one configuration {} ms after it was started; it adopted generations {adopted:?}",
        took.as_millis()
    );
    Ok(generation)
}
