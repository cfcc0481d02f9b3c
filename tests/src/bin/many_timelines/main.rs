//! `many_timelines`: one set of three safekeepers (the binary given, a
//! release build from scripts/bench-many-timelines), N timelines on it each
//! driven by compute_shim's real proposer with generated WAL (1 MiB
//! segments, no Postgres), for N = 1, 100 and 1,000 by default. Per N it
//! prints the safekeepers' threads and RSS under load, commits/s, commit
//! latency p50/p99 and their ratio to the N=1 figures of the same run, and
//! how long a SIGKILLed safekeeper holding the timelines takes to serve them
//! all again. Each N gets fresh data directories, removed afterwards.
//!
//! Each timeline runs one commit at a time (one small record, acknowledged
//! once a quorum fsynced it), like one client session per compute.

mod proposer_glue;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use nix::sys::signal::Signal;

use integration_tests::fixture::wait_for;
use integration_tests::processes::{http_get, ServiceProcess};
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::wal::generator::WalGenerator;
use proposer_glue::TimelineProposer;
use safekeeper_protocol::ids::{ClusterId, SystemId, TenantId, TimelineId};

/// The default timeline counts.
const DEFAULT_TIMELINE_COUNTS: [usize; 3] = [1, 100, 1_000];
/// Largest --timelines: each needs 3 links and some MiB of disk per
/// safekeeper, and the disk budget of a run is 10 GB.
const MAX_TIMELINES: usize = 2_000;
const SAFEKEEPERS: usize = 3;
/// 1 MiB segments (Postgres allows them) keep a thousand timelines on disk.
const SEGMENT_SIZE_BYTES: u64 = 1 << 20;
/// Payload of each commit's record: about a commit record's size.
const RECORD_PAYLOAD_BYTES: usize = 64;
/// How long all timelines may take to elect their proposers.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one commit may take before the run fails.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restarted safekeeper may take to serve its timelines again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Parser)]
#[command(about = "Many timelines on one safekeeper set: threads, RSS, commit latency, restart time")]
struct Cli {
    /// Run only this many timelines (plus the 1-timeline baseline).
    #[arg(long)]
    timelines: Option<usize>,
    /// Seconds of load per timeline count.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The safekeeper binary (a release build).
    #[arg(long)]
    safekeeper_bin: PathBuf,
    /// Where the data directories go (each removed after its run).
    #[arg(long)]
    workdir: PathBuf,
}

/// What one timeline count measured.
struct Figures {
    timelines: usize,
    elected: usize,
    threads: u64,
    rss_mib: u64,
    commits_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    restart_s: f64,
    restart_timelines: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let counts: Vec<usize> = match cli.timelines {
        Some(n) if n == 0 || n > MAX_TIMELINES => bail!("--timelines must be 1..={MAX_TIMELINES}"),
        Some(1) => vec![1],
        Some(n) => vec![1, n],
        None => DEFAULT_TIMELINE_COUNTS.to_vec(),
    };
    ensure!(cli.seconds > 0, "--seconds must be positive");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut all = Vec::new();
    for &timelines in &counts {
        let dir = cli.workdir.join(format!("n{timelines}"));
        let figures = run_one(&runtime, &cli, timelines, &dir);
        // Remove what it made whatever happened (the processes are gone:
        // `SafekeeperSet` is dropped inside `run_one`).
        let _ = std::fs::remove_dir_all(&dir);
        let figures = figures.with_context(|| format!("{timelines} timelines"))?;
        print_row(&figures, all.first());
        all.push(figures);
    }
    let last = all.last().context("at least one run")?;
    println!(
        "timelines={} threads={} rss_mib={} p99_commit_ms={:.2} restart_s={:.2}",
        last.timelines, last.threads, last.rss_mib, last.p99_ms, last.restart_s
    );
    Ok(())
}

fn print_row(figures: &Figures, baseline: Option<&Figures>) {
    let base = baseline.unwrap_or(figures);
    println!(
        "N={:<5} elected={:<5} threads/sk={:<5} rss_mib/sk={:<5} commits/s={:<9.0} p50_ms={:<7.2} ({:.1}x) p99_ms={:<7.2} ({:.1}x) restart_s={:.2} ({} timelines)",
        figures.timelines,
        figures.elected,
        figures.threads,
        figures.rss_mib,
        figures.commits_per_s,
        figures.p50_ms,
        figures.p50_ms / base.p50_ms,
        figures.p99_ms,
        figures.p99_ms / base.p99_ms,
        figures.restart_s,
        figures.restart_timelines,
    );
}

fn run_one(runtime: &tokio::runtime::Runtime, cli: &Cli, timelines: usize, dir: &Path) -> Result<Figures> {
    std::fs::create_dir_all(dir)?;
    let mut set = SafekeeperSet::start(&cli.safekeeper_bin, dir)?;
    let addrs: Vec<SocketAddr> = set.members.iter().map(|sk| sk.pg_addr).collect();
    let load = Duration::from_secs(cli.seconds);
    let pids: Vec<u32> = set.members.iter().filter_map(|sk| sk.process.pid()).collect();
    let (latencies_us, elected, usage) = runtime.block_on(drive(timelines, &addrs, load, &pids))?;
    ensure!(!latencies_us.is_empty(), "no commit was acknowledged");
    let mut sorted = latencies_us;
    sorted.sort_unstable();
    let percentile_ms = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    let (restart_s, restart_timelines) = set.restart_first()?;
    Ok(Figures {
        timelines,
        elected,
        threads: usage.iter().map(|u| u.threads).max().unwrap_or(0),
        rss_mib: usage.iter().map(|u| u.rss_kib).max().unwrap_or(0) / 1024,
        commits_per_s: sorted.len() as f64 / load.as_secs_f64(),
        p50_ms: percentile_ms(0.50),
        p99_ms: percentile_ms(0.99),
        restart_s,
        restart_timelines,
    })
}

/// Elect a proposer per timeline, then run each timeline's commit loop for
/// `load`; the commit latencies (µs), how many were elected, and the
/// safekeepers' usage sampled in the middle of the load.
async fn drive(
    timelines: usize,
    addrs: &[SocketAddr],
    load: Duration,
    pids: &[u32],
) -> Result<(Vec<u32>, usize, Vec<Usage>)> {
    let election_deadline = Instant::now() + ELECTION_TIMEOUT;
    let (elected_tx, mut elected_rx) = tokio::sync::mpsc::channel::<bool>(timelines);
    let (go_tx, go_rx) = tokio::sync::watch::channel(None::<Instant>);
    let mut tasks = Vec::with_capacity(timelines);
    for index in 0..timelines {
        let (addrs, elected_tx, mut go_rx) = (addrs.to_vec(), elected_tx.clone(), go_rx.clone());
        tasks.push(tokio::spawn(async move {
            let cluster = cluster_of(index);
            let segment_size = WalSegmentSize::new(SEGMENT_SIZE_BYTES).expect("1 MiB is a valid segment size");
            let start = Lsn(SEGMENT_SIZE_BYTES);
            let mut proposer = TimelineProposer::start(cluster, segment_size, start, &addrs);
            let elected = proposer.wait_elected(election_deadline).await;
            let _ = elected_tx.send(elected.is_ok()).await;
            let wanted = elected?;
            let end = *go_rx.wait_for(Option::is_some).await?.as_ref().expect("waited for Some");
            let mut wal = WalGenerator::new(cluster.system_id.0, segment_size, wanted);
            let mut latencies_us = Vec::new();
            let mut xid = 1000u32;
            while Instant::now() < end {
                xid += 1;
                wal.append_record(1, 0, xid, &[0u8; RECORD_PAYLOAD_BYTES]);
                let (lsn, bytes) = wal.take_bytes();
                let began = Instant::now();
                proposer.commit(lsn, &bytes, began + COMMIT_TIMEOUT).await?;
                latencies_us.push(began.elapsed().as_micros() as u32);
            }
            anyhow::Ok(latencies_us)
        }));
    }
    // Each task says once whether it was elected (its sender lives on).
    let mut elected = 0;
    for _ in 0..timelines {
        elected += usize::from(elected_rx.recv().await.context("the tasks hold senders")?);
    }
    let end = Instant::now() + load;
    go_tx.send_replace(Some(end));
    tokio::time::sleep(load / 2).await;
    let usage = pids.iter().map(|&pid| Usage::of(pid)).collect::<Result<Vec<_>>>()?;
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        match task.await? {
            Ok(mut of_one) => latencies.append(&mut of_one),
            Err(error) => failures.push(format!("{error:#}")),
        }
    }
    if !failures.is_empty() {
        eprintln!("{} of {timelines} timelines failed; the first: {}", failures.len(), failures[0]);
    }
    Ok((latencies, elected, usage))
}

/// Timeline `index`'s ids (one system per timeline, as one compute each).
fn cluster_of(index: usize) -> ClusterId {
    let mut timeline = [0u8; 16];
    timeline[8..].copy_from_slice(&(index as u64 + 1).to_be_bytes());
    ClusterId {
        system_id: SystemId(7_000_000_000_000_000_000 + index as u64),
        tenant_id: TenantId([0x11; 16]),
        timeline_id: TimelineId(timeline),
    }
}

/// Threads and resident memory of one process (/proc/<pid>/status).
struct Usage {
    threads: u64,
    rss_kib: u64,
}

impl Usage {
    fn of(pid: u32) -> Result<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status.lines().find(|line| line.starts_with(name)).with_context(|| format!("no {name}"))?;
            let value = line[name.len()..].split_whitespace().next().with_context(|| format!("empty {name}"))?;
            Ok(value.parse()?)
        };
        Ok(Usage { threads: field("Threads:")?, rss_kib: field("VmRSS:")? })
    }
}

/// One safekeeper of the set.
struct Member {
    process: ServiceProcess,
    datadir: PathBuf,
    id: u64,
    pg_addr: SocketAddr,
    http_addr: SocketAddr,
}

/// Three safekeepers; each SIGKILLed when dropped.
struct SafekeeperSet {
    binary: PathBuf,
    members: Vec<Member>,
}

impl SafekeeperSet {
    fn start(binary: &Path, dir: &Path) -> Result<SafekeeperSet> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let members = (1..=SAFEKEEPERS as u64)
            .map(|id| Member::start(binary, &dir.join(format!("sk{id}")), id, any, any))
            .collect::<Result<_>>()?;
        Ok(SafekeeperSet { binary: binary.to_path_buf(), members })
    }

    /// SIGKILL the first safekeeper and start it again on its ports: the
    /// seconds until it serves every timeline it held, and how many.
    fn restart_first(&mut self) -> Result<(f64, usize)> {
        let member = &mut self.members[0];
        let held = timeline_count(member.http_addr)?;
        member.process.stop_with(Signal::SIGKILL).ok();
        let started = Instant::now();
        let restarted = Member::start(&self.binary, &member.datadir, member.id, member.pg_addr, member.http_addr)?;
        let http = restarted.http_addr;
        *member = restarted;
        wait_for(RESTART_TIMEOUT, &format!("the restarted safekeeper to list {held} timelines"), || {
            Ok((timeline_count(http)? >= held).then_some(()))
        })?;
        Ok((started.elapsed().as_secs_f64(), held))
    }
}

/// Above the pg connections of any N this benchmark runs (one per timeline).
const BENCH_MAX_PG_CONNECTIONS: usize = 16_384;

impl Member {
    fn start(binary: &Path, datadir: &Path, id: u64, pg: SocketAddr, http: SocketAddr) -> Result<Member> {
        let mut command = Command::new(binary);
        command.arg("--id").arg(id.to_string()).arg("--datadir").arg(datadir);
        command.arg("--listen-pg").arg(pg.to_string()).arg("--listen-http").arg(http.to_string());
        // Every timeline's proposer holds one pg connection to each
        // safekeeper: the default limit (512) would refuse the rest.
        command.arg("--max-pg-connections").arg(BENCH_MAX_PG_CONNECTIONS.to_string());
        // Quiet: a thousand timelines log a lot at info.
        command.env("RUST_LOG", "warn");
        let log_path = datadir.with_extension("log");
        let (process, addrs) = ServiceProcess::spawn_listening("safekeeper", command, &log_path)?;
        let reported = |name: &str| addrs.get(name).copied().with_context(|| format!("no {name} address: {addrs:?}"));
        Ok(Member {
            pg_addr: reported("pg")?,
            http_addr: reported("http")?,
            process,
            datadir: datadir.to_path_buf(),
            id,
        })
    }
}

/// How many timelines `GET /v1/timelines` lists.
fn timeline_count(http: SocketAddr) -> Result<usize> {
    let (code, body) = http_get(http, "/v1/timelines")?;
    ensure!(code == 200, "GET /v1/timelines answered {code}: {body}");
    Ok(body.as_array().context("a list")?.len())
}
