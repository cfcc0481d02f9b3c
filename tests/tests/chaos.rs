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
//! `CHAOS_SECONDS` (default 30) sets the length, `CHAOS_SEED` the fault
//! schedule; `scripts/chaos` runs a long one.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, TENANT, TIMELINE};
use integration_tests::fault_proxy::{Fault, FaultProxy};
use integration_tests::fixture::{join_bounded, wait_for};
use integration_tests::pg::PgOptions;
use integration_tests::processes::PageserverStub;
use integration_tests::wal_files::{committed_xids, read_wal};
use nix::sys::signal::Signal;
use postgres_wal::lsn::Lsn;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFAULT_CHAOS_SECONDS: u64 = 30;
const DEFAULT_SEED: u64 = 7;
/// How long one fault lasts, and the pause between faults.
const FAULT_MS: std::ops::Range<u64> = 500..2_500;
const PAUSE_MS: std::ops::Range<u64> = 200..1_000;
/// After the faults: how long everything may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|text| text.parse().ok()).unwrap_or(default)
}

/// What the workload saw acknowledged.
#[derive(Default)]
struct Acknowledged {
    xids: Vec<u32>,
    /// Longest time between two acknowledgements while the workload ran.
    max_stall: Duration,
}

/// One client session inserting numbered rows, one transaction each, as
/// fast as commits are acknowledged.
fn run_workload(conninfo: String, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acknowledged>>) -> Result<()> {
    let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).context("workload connection")?;
    client.batch_execute("CREATE TABLE IF NOT EXISTS chaos (n bigint PRIMARY KEY, at timestamptz DEFAULT now())")?;
    let mut last_ack = Instant::now();
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let row = client
            .query_one("INSERT INTO chaos (n) VALUES ($1) RETURNING (txid_current() % 4294967296)::bigint", &[&n])?;
        let xid: i64 = row.get(0);
        let now = Instant::now();
        let mut acked = acked.lock().unwrap_or_else(|e| e.into_inner());
        acked.xids.push(xid as u32);
        acked.max_stall = acked.max_stall.max(now - last_ack);
        last_ack = now;
        n += 1;
    }
    Ok(())
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
}

#[test]
fn chaos_loses_no_acknowledged_commit() -> Result<()> {
    let seconds = env_u64("CHAOS_SECONDS", DEFAULT_CHAOS_SECONDS);
    let seed = env_u64("CHAOS_SEED", DEFAULT_SEED);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = QuorumCluster::start_without_shim(PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() })?;
    // The check below reads all WAL back: keep it despite the stub's feedback.
    for index in 0..cluster.safekeepers.len() {
        cluster.kill_safekeeper(index)?;
        let keep_all = vec!["--wal-keep-bytes".to_string(), (1u64 << 40).to_string()];
        cluster.safekeepers[index] = cluster.safekeepers[index].restart_with_args(keep_all)?;
    }
    let shim_proxies: Vec<FaultProxy> =
        cluster.safekeepers.iter().map(|sk| FaultProxy::start(sk.pg_addr)).collect::<Result<_>>()?;
    let stub_proxies: Vec<FaultProxy> =
        cluster.safekeepers.iter().map(|sk| FaultProxy::start(sk.http_addr)).collect::<Result<_>>()?;
    cluster.shim_targets = Some(shim_proxies.iter().map(|p| p.listen_addr).collect());
    cluster.start_shim()?;
    let start_lsn = cluster.timeline_start_lsn(0)?;
    let stub_http: Vec<_> = stub_proxies.iter().map(|p| p.listen_addr).collect();
    let stub = PageserverStub::start(&stub_http, TENANT, TIMELINE, &cluster.dir.path().join("pageserver"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let workload = thread::spawn({
        let (conninfo, stop, acked) = (cluster.pg.connection_string("postgres"), stop.clone(), acked.clone());
        move || run_workload(conninfo, stop, acked)
    });

    let mut faults = FaultCounts::default();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(rng.gen_range(PAUSE_MS)));
        ensure!(!workload.is_finished(), "the workload stopped early");
        let hold = Duration::from_millis(rng.gen_range(FAULT_MS));
        let sk = rng.gen_range(0..cluster.safekeepers.len());
        match rng.gen_range(0..8) {
            0 => {
                faults.safekeeper_kills += 1;
                cluster.kill_safekeeper(sk)?;
                thread::sleep(hold);
                cluster.restart_safekeeper(sk)?;
            }
            1 => {
                faults.safekeeper_stops += 1;
                cluster.safekeepers[sk].process.signal(Signal::SIGSTOP)?;
                thread::sleep(hold);
                cluster.safekeepers[sk].process.signal(Signal::SIGCONT)?;
            }
            2 => {
                faults.partitions += 1;
                with_fault(&shim_proxies[sk], Fault::Partition, hold);
            }
            3 => {
                faults.one_way_partitions += 1;
                let fault = if rng.gen_bool(0.5) { Fault::ClientToServerStalled } else { Fault::ServerToClientStalled };
                with_fault(&shim_proxies[sk], fault, hold);
            }
            4 => {
                faults.dropped_connections += 1;
                with_fault(&shim_proxies[sk], Fault::Drop, hold);
            }
            5 => {
                faults.delays += 1;
                with_fault(&shim_proxies[sk], Fault::Delay(Duration::from_millis(rng.gen_range(5..50))), hold);
            }
            6 => {
                faults.stub_partitions += 1;
                let fault = [Fault::Partition, Fault::Drop, Fault::ServerToClientStalled][rng.gen_range(0..3)];
                with_fault(&stub_proxies[sk], fault, hold);
            }
            _ => {
                faults.shim_kills += 1;
                if let Some(shim) = cluster.shim.as_mut() {
                    shim.process.kill()?;
                }
                thread::sleep(hold.min(Duration::from_millis(800)));
                cluster.start_shim()?;
            }
        }
        // A shim that exited on its own (it may, e.g. when fenced) is
        // restarted, as its supervisor would.
        if cluster.shim.as_mut().map(|s| s.process.exit_status()).transpose()?.flatten().is_some() {
            cluster.start_shim()?;
        }
    }

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

    eprintln!(
        "chaos summary: {seconds} s, seed {seed}; faults: {faults:?}; transactions acknowledged: {}; lost: {lost}; \
         max commit stall: {:.2} s; final commit {commit}; pageserver_stub: {} records, {} source switches",
        acked.xids.len(),
        acked.max_stall.as_secs_f64(),
        stub_status["records"],
        stub_status["switches"],
    );
    ensure!(lost == 0, "{lost} acknowledged transactions are missing from the committed WAL");
    ensure!(!acked.xids.is_empty(), "the workload committed nothing");
    Ok(())
}

/// Apply `fault` to `proxy` for `hold`, then heal it.
fn with_fault(proxy: &FaultProxy, fault: Fault, hold: Duration) {
    proxy.set(fault);
    thread::sleep(hold);
    proxy.set(Fault::None);
}
