//! Chaos with real processes: PostgreSQL 15, three safekeepers, the shim
//! and pageserver_stub, with a fault-injecting proxy in front of every
//! safekeeper port they use, under a workload that records every commit it
//! saw acknowledged. For a bounded time, one fault at a time (so never more
//! than a minority is impaired): SIGKILL + restart of a safekeeper,
//! SIGSTOP/SIGCONT of one, a partition (both ways or one way), dropped
//! connections or added delay on one safekeeper's proxies, SIGKILL + restart
//! of the shim. Afterwards: every acknowledged transaction's commit record
//! is in every safekeeper's committed WAL, the committed bytes are identical
//! on all three and equal the primary's pg_wal, and pageserver_stub reached
//! the final commit LSN having decoded every record (its counts equal
//! pg_waldump's). Prints a summary.
//!
//! Besides the short faults (0.5-2.5 s), long ones outlast the shim's
//! limits: the shim runs with a small WAL buffer and a short silence
//! timeout (set by flag), and while a long fault is held a filler writes
//! several buffers' worth of WAL, so the impaired safekeeper is released,
//! disconnected and later caught up from its peers. The suite's run holds
//! one long hang (SIGSTOP) of a few seconds first; with
//! `CHAOS_LONG_FAULT_S=N` every fourth fault is long, lasting N seconds
//! (minutes, say) with `CHAOS_LONG_FAULT_WAL_MIB` of WAL written, and the
//! long kinds cycle: hang, partition both ways, safekeeper down, one-way
//! partition.
//!
//! `CHAOS_SECONDS` (default 30) sets the length, `CHAOS_SEED` the fault
//! schedule; `scripts/chaos` runs a long one.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, TENANT, TIMELINE};
use integration_tests::commit_loop::CommitReport;
use integration_tests::fault_proxy::{Fault, FaultProxy};
use integration_tests::fixture::{join_bounded, wait_for};
use integration_tests::minority::write_wal;
use integration_tests::pg::PgOptions;
use integration_tests::processes::PageserverStub;
use integration_tests::wal_files::{committed_xids, read_wal};
use nix::sys::signal::Signal;
use postgres_wal::lsn::Lsn;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFAULT_CHAOS_SECONDS: u64 = 30;
const DEFAULT_SEED: u64 = 7;
/// How long one short fault lasts, and the pause between faults.
const FAULT_MS: std::ops::Range<u64> = 500..2_500;
const PAUSE_MS: std::ops::Range<u64> = 200..1_000;
/// A killed shim is restarted after at most this long.
const MAX_SHIM_DOWN: Duration = Duration::from_millis(800);
/// The shim's WAL buffer (`--max-buffered-wal-mib`): small, so that a long
/// fault exceeds it in seconds.
const SHIM_BUFFER_MIB: u64 = 4;
/// The shim's `--silence-timeout-ms`: short, for the same reason.
const SHIM_SILENCE_TIMEOUT_MS: u64 = 2_000;
/// The suite's long hang: past the silence timeout twice over...
const DEFAULT_LONG_FAULT_S: u64 = 5;
/// ...while this much WAL is written: the shim's buffer and the socket
/// buffers several times over (`CHAOS_LONG_FAULT_WAL_MIB` for more).
const DEFAULT_LONG_FAULT_WAL_MIB: u64 = 6 * SHIM_BUFFER_MIB;
/// With `CHAOS_LONG_FAULT_S` set, one fault in this many is long.
const LONG_FAULT_EVERY: u32 = 4;
/// How long one filler statement (about 4 MiB of WAL) may take.
const FILLER_STATEMENT_TIMEOUT: Duration = Duration::from_secs(120);
/// After the faults: how long everything may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|text| text.parse().ok())
}

/// One client session inserting numbered rows, one transaction each, as
/// fast as commits are acknowledged.
fn run_workload(conninfo: String, stop: Arc<AtomicBool>, acked: Arc<Mutex<CommitReport>>) -> Result<()> {
    let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).context("workload connection")?;
    client.batch_execute("CREATE TABLE IF NOT EXISTS chaos (n bigint PRIMARY KEY, at timestamptz DEFAULT now())")?;
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let row = client
            .query_one("INSERT INTO chaos (n) VALUES ($1) RETURNING (txid_current() % 4294967296)::bigint", &[&n])?;
        let xid: i64 = row.get(0);
        let now = Instant::now();
        let mut acked = acked.lock().unwrap_or_else(|e| e.into_inner());
        acked.xids.push(xid as u32);
        acked.ack_times.push(now);
        n += 1;
    }
    Ok(())
}

/// One fault, on the safekeeper it names (or the shim).
#[derive(Clone, Copy, Debug)]
enum ChaosFault {
    SafekeeperKill(usize),
    SafekeeperStop(usize),
    /// On the shim's link to a safekeeper.
    Link(usize, Fault),
    /// On the stub's link to a safekeeper.
    StubLink(usize, Fault),
    ShimKill,
}

#[derive(Default, Debug)]
struct FaultCounts {
    safekeeper_kills: u32,
    safekeeper_stops: u32,
    partitions: u32,
    one_way_partitions: u32,
    dropped_connections: u32,
    delays: u32,
    shim_kills: u32,
    stub_partitions: u32,
    /// Of the above, those that outlasted the shim's limits.
    long: u32,
}

impl FaultCounts {
    fn count(&mut self, fault: ChaosFault) {
        let counter = match fault {
            ChaosFault::SafekeeperKill(_) => &mut self.safekeeper_kills,
            ChaosFault::SafekeeperStop(_) => &mut self.safekeeper_stops,
            ChaosFault::Link(_, Fault::Partition) => &mut self.partitions,
            ChaosFault::Link(_, Fault::ClientToServerStalled | Fault::ServerToClientStalled) => {
                &mut self.one_way_partitions
            }
            ChaosFault::Link(_, Fault::Drop) => &mut self.dropped_connections,
            ChaosFault::Link(_, _) => &mut self.delays,
            ChaosFault::StubLink(..) => &mut self.stub_partitions,
            ChaosFault::ShimKill => &mut self.shim_kills,
        };
        *counter += 1;
    }
}

/// A short fault, as the schedule draws it.
fn draw_short_fault(rng: &mut StdRng, safekeepers: usize) -> ChaosFault {
    let sk = rng.gen_range(0..safekeepers);
    match rng.gen_range(0..8) {
        0 => ChaosFault::SafekeeperKill(sk),
        1 => ChaosFault::SafekeeperStop(sk),
        2 => ChaosFault::Link(sk, Fault::Partition),
        3 => ChaosFault::Link(
            sk,
            if rng.gen_bool(0.5) { Fault::ClientToServerStalled } else { Fault::ServerToClientStalled },
        ),
        4 => ChaosFault::Link(sk, Fault::Drop),
        5 => ChaosFault::Link(sk, Fault::Delay(Duration::from_millis(rng.gen_range(5..50)))),
        6 => {
            ChaosFault::StubLink(sk, [Fault::Partition, Fault::Drop, Fault::ServerToClientStalled][rng.gen_range(0..3)])
        }
        _ => ChaosFault::ShimKill,
    }
}

/// The `nth` long fault (from 0): the kinds take turns, the first is a hang.
fn long_fault(nth: u32, sk: usize) -> ChaosFault {
    match nth % 4 {
        0 => ChaosFault::SafekeeperStop(sk),
        1 => ChaosFault::Link(sk, Fault::Partition),
        2 => ChaosFault::SafekeeperKill(sk),
        _ => ChaosFault::Link(sk, Fault::ServerToClientStalled),
    }
}

/// The processes and the proxies faults are injected into.
struct Chaos {
    cluster: QuorumCluster,
    shim_proxies: Vec<FaultProxy>,
    stub_proxies: Vec<FaultProxy>,
}

impl Chaos {
    fn start_fault(&mut self, fault: ChaosFault) -> Result<()> {
        match fault {
            ChaosFault::SafekeeperKill(sk) => self.cluster.kill_safekeeper(sk)?,
            ChaosFault::SafekeeperStop(sk) => self.cluster.safekeepers[sk].process.signal(Signal::SIGSTOP)?,
            ChaosFault::Link(sk, fault) => self.shim_proxies[sk].set(fault),
            ChaosFault::StubLink(sk, fault) => self.stub_proxies[sk].set(fault),
            ChaosFault::ShimKill => {
                if let Some(shim) = self.cluster.shim.as_mut() {
                    shim.process.kill()?;
                }
            }
        }
        Ok(())
    }

    fn end_fault(&mut self, fault: ChaosFault) -> Result<()> {
        match fault {
            ChaosFault::SafekeeperKill(sk) => self.cluster.restart_safekeeper(sk)?,
            ChaosFault::SafekeeperStop(sk) => self.cluster.safekeepers[sk].process.signal(Signal::SIGCONT)?,
            ChaosFault::Link(sk, _) => self.shim_proxies[sk].set(Fault::None),
            ChaosFault::StubLink(sk, _) => self.stub_proxies[sk].set(Fault::None),
            ChaosFault::ShimKill => {
                self.cluster.start_shim()?;
            }
        }
        Ok(())
    }
}

#[test]
fn chaos_loses_no_acknowledged_commit() -> Result<()> {
    let seconds = env_u64("CHAOS_SECONDS").unwrap_or(DEFAULT_CHAOS_SECONDS);
    let seed = env_u64("CHAOS_SEED").unwrap_or(DEFAULT_SEED);
    let long_faults_on = env_u64("CHAOS_LONG_FAULT_S");
    let long_fault_hold = Duration::from_secs(long_faults_on.unwrap_or(DEFAULT_LONG_FAULT_S));
    let long_fault_wal_bytes = env_u64("CHAOS_LONG_FAULT_WAL_MIB").unwrap_or(DEFAULT_LONG_FAULT_WAL_MIB) << 20;
    let mut rng = StdRng::seed_from_u64(seed);
    // The check below reads all WAL back: the safekeepers keep it despite
    // the stub's feedback, and Postgres too, however much the long faults'
    // filler wrote.
    let options = PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }.setting("wal_keep_size", "4GB");
    let keep_all = ["--wal-keep-bytes".to_string(), (1u64 << 40).to_string()];
    let mut cluster = QuorumCluster::start_without_shim_with(options, &keep_all)?;
    let shim_proxies: Vec<FaultProxy> =
        cluster.safekeepers.iter().map(|sk| FaultProxy::start(sk.pg_addr)).collect::<Result<_>>()?;
    let stub_proxies: Vec<FaultProxy> =
        cluster.safekeepers.iter().map(|sk| FaultProxy::start(sk.http_addr)).collect::<Result<_>>()?;
    cluster.shim_targets = Some(shim_proxies.iter().map(|p| p.listen_addr).collect());
    cluster.shim_extra_args = [
        "--max-buffered-wal-mib",
        &SHIM_BUFFER_MIB.to_string(),
        "--silence-timeout-ms",
        &SHIM_SILENCE_TIMEOUT_MS.to_string(),
    ]
    .map(String::from)
    .to_vec();
    cluster.start_shim()?;
    let start_lsn = cluster.timeline_start_lsn(0)?;
    let stub_http: Vec<_> = stub_proxies.iter().map(|p| p.listen_addr).collect();
    let stub = PageserverStub::start(&stub_http, TENANT, TIMELINE, &cluster.dir.path().join("pageserver"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(CommitReport::default()));
    let workload_started = Instant::now();
    let workload = thread::spawn({
        let (conninfo, stop, acked) = (cluster.pg.socket_connection_string("postgres"), stop.clone(), acked.clone());
        move || run_workload(conninfo, stop, acked)
    });

    let mut chaos = Chaos { cluster, shim_proxies, stub_proxies };
    let mut faults = FaultCounts::default();
    let mut long_fault_spans = vec![];
    let mut long_fault_wal_written_bytes = 0;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut nth = 0;
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(rng.gen_range(PAUSE_MS)));
        ensure!(!workload.is_finished(), "the workload stopped early");
        // The first fault is long; with long faults on, every fourth too.
        let long = nth == 0 || (long_faults_on.is_some() && nth % LONG_FAULT_EVERY == 0);
        let fault = if long {
            long_fault(faults.long, rng.gen_range(0..chaos.cluster.safekeepers.len()))
        } else {
            draw_short_fault(&mut rng, chaos.cluster.safekeepers.len())
        };
        nth += 1;
        faults.count(fault);
        chaos.start_fault(fault)?;
        if long {
            faults.long += 1;
            let from = Instant::now();
            long_fault_wal_written_bytes +=
                write_wal(&chaos.cluster, long_fault_wal_bytes, long_fault_hold, FILLER_STATEMENT_TIMEOUT)?;
            long_fault_spans.push((from, Instant::now()));
        } else {
            let hold = Duration::from_millis(rng.gen_range(FAULT_MS));
            thread::sleep(if matches!(fault, ChaosFault::ShimKill) { hold.min(MAX_SHIM_DOWN) } else { hold });
        }
        chaos.end_fault(fault)?;
        // A shim that exited on its own (it may, e.g. when fenced) is
        // restarted, as its supervisor would.
        if chaos.cluster.shim.as_mut().map(|s| s.process.exit_status()).transpose()?.flatten().is_some() {
            chaos.cluster.start_shim()?;
        }
    }
    let cluster = &chaos.cluster;

    // Heal, stop the workload at an acknowledged commit, let everyone catch up.
    stop.store(true, Ordering::Relaxed);
    let workload_result = join_bounded(workload, SETTLE_TIMEOUT).context("the workload after healing")?;
    workload_result?;
    let acked = std::mem::take(&mut *acked.lock().unwrap_or_else(|e| e.into_inner()));
    let end: Lsn = cluster.pg.psql("SELECT pg_current_wal_flush_lsn()")?.parse()?;
    let commit = cluster.wait_shim_commit(end, SETTLE_TIMEOUT)?;
    for index in 0..cluster.safekeepers.len() {
        cluster.wait_safekeeper_flush(index, commit, SETTLE_TIMEOUT)?;
    }

    // No acknowledged commit lost, no committed byte different anywhere.
    let segment_size = cluster.segment_size()?;
    let expected_wal = read_wal(&cluster.pg.pg_wal_dir(), segment_size, start_lsn, commit)?;
    let acked_xids: HashSet<u32> = acked.xids.iter().copied().collect();
    let mut lost = 0;
    for index in 0..cluster.safekeepers.len() {
        let dir = cluster.timeline_dir(index);
        let wal = read_wal(&dir, segment_size, start_lsn, commit)?;
        ensure!(wal == expected_wal, "safekeeper {index}'s committed WAL differs from pg_wal below {commit}");
        let committed = committed_xids(&dir, segment_size, start_lsn, commit)?;
        lost = lost.max(acked_xids.difference(&committed).count());
    }
    let rows: usize = cluster.pg.psql("SELECT count(*) FROM chaos")?.parse()?;
    ensure!(rows == acked.xids.len(), "{rows} rows in Postgres but {} commits acknowledged", acked.xids.len());

    // The page server stub followed through every fault.
    let stub_status = wait_for(SETTLE_TIMEOUT, &format!("pageserver_stub to reach {commit}"), || {
        let status = stub.status()?;
        Ok((json_lsn(&status, "last_record_lsn")? >= commit).then_some(status))
    })
    .with_context(|| format!("stub log: {}", stub.process.log_tail()))?;

    let max_stall = acked.max_stall(workload_started, Instant::now());
    let long_fault_stall = long_fault_spans.iter().map(|&(from, to)| acked.max_stall(from, to)).max();
    eprintln!(
        "chaos summary: {seconds} s, seed {seed}; faults: {faults:?}; long faults held {long_fault_hold:?}+ each with \
         {} MiB of WAL written in all (shim buffer {SHIM_BUFFER_MIB} MiB, silence timeout {SHIM_SILENCE_TIMEOUT_MS} \
         ms), longest commit wait during them {:.2} s; transactions acknowledged: {}; lost: {lost}; max commit \
         stall: {:.2} s; final commit {commit}; pageserver_stub: {} records, {} source switches",
        long_fault_wal_written_bytes >> 20,
        long_fault_stall.unwrap_or_default().as_secs_f64(),
        acked.xids.len(),
        max_stall.as_secs_f64(),
        stub_status["records"],
        stub_status["switches"],
    );
    ensure!(lost == 0, "{lost} acknowledged transactions are missing from the committed WAL");
    ensure!(!acked.xids.is_empty(), "the workload committed nothing");
    Ok(())
}
