//! Peer recovery with real processes: a safekeeper that was down while
//! Postgres wrote (and recycled) more WAL than it could ever resend catches
//! up from its peers, byte for byte, and the primary's pg_wal does not keep
//! anything for it.
//!
//! A brand-new, empty safekeeper whose peers removed the timeline's first
//! segments is bootstrapped at the oldest segment they keep.
//!
//! `PEER_RECOVERY_MIB` sets how much WAL is written while it is down
//! (default 2048, as the issue asks; the copy rate is printed).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, TENANT, TIMELINE};
use integration_tests::fixture::wait_for;
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::processes::http_request;
use integration_tests::wal_files::read_wal;
use postgres_wal::lsn::Lsn;

const COMMIT_TIMEOUT: Duration = Duration::from_secs(120);
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(300);
/// WAL written per statement: one commit each.
const CHUNK_MIB: u64 = 128;
/// What the writer of the test under load writes at most.
const MAX_LOAD_MIB: u64 = 2048;
/// Bytes compared per read when checking the copy.
const COMPARE_WINDOW_BYTES: u64 = 64 << 20;
/// WAL written before a safekeeper is replaced by an empty one.
const BOOTSTRAP_WAL_MIB: u64 = 64;
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

fn wal_to_write_mib() -> Result<u64> {
    match std::env::var("PEER_RECOVERY_MIB") {
        Ok(text) => text.parse().with_context(|| format!("PEER_RECOVERY_MIB={text:?} is not a number")),
        Err(_) => Ok(2048),
    }
}

/// Postgres keeps little WAL: nothing for standbys, small max_wal_size.
fn options() -> PgOptions {
    PgOptions::default().setting("wal_keep_size", "0").setting("max_wal_size", "256MB").setting("min_wal_size", "64MB")
}

fn pg_wal_bytes(pg: &PgCluster) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(pg.pg_wal_dir())? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Write at least `mib` MiB with checkpoints in between, until Postgres
/// no longer holds the segment of `behind_at` (it can no longer resend what
/// a safekeeper stopped there needs). Returns the largest pg_wal seen.
fn write_until_recycled(cluster: &QuorumCluster, behind_at: Lsn, mib: u64) -> Result<u64> {
    let segment_size = cluster.segment_size()?;
    let first_missing = behind_at.segment_no(segment_size).file_name(1, segment_size);
    let written_from = cluster.pg_flush_lsn()?;
    let mut largest_pg_wal = 0;
    loop {
        let written = cluster.pg_flush_lsn()? - written_from;
        if written >= mib << 20 && !cluster.pg.pg_wal_dir().join(&first_missing).exists() {
            return Ok(largest_pg_wal);
        }
        ensure!(written < (mib + 1024) << 20, "Postgres still holds {first_missing} after {} MiB", written >> 20);
        write_wal(&cluster.pg, CHUNK_MIB.min(mib.max(1)))?;
        cluster.pg.psql("CHECKPOINT")?;
        largest_pg_wal = largest_pg_wal.max(pg_wal_bytes(&cluster.pg)?);
    }
}

/// About `mib` MiB of WAL in one acknowledged transaction.
fn write_wal(pg: &PgCluster, mib: u64) -> Result<()> {
    // A 1 kB row costs a little more than 1 kB of WAL.
    let rows = mib * 900;
    pg.psql_with_timeout(
        &format!("INSERT INTO filler SELECT g, repeat('x', 1000) FROM generate_series(1, {rows}) g"),
        COMMIT_TIMEOUT,
    )?;
    Ok(())
}

/// The value of the first sample of `name` in a Prometheus text page.
fn metric_value(page: &str, name: &str) -> Result<f64> {
    let line = page
        .lines()
        .find(|line| line.starts_with(name) && !line.starts_with('#'))
        .with_context(|| format!("no {name} in /metrics"))?;
    let value = line.rsplit(' ').next().unwrap_or_default();
    value.parse().with_context(|| format!("{name} sample {line:?}"))
}

/// The baselines of the same run: curl pulling the same range from a peer
/// (`GET .../wal`) to /dev/null (as scripts/bench-wal-serve measures), and
/// to a file made durable with `sync FILE` (what a copy must also do).
fn print_http_pull_rates(cluster: &QuorumCluster, start: Lsn, end: Lsn, recovery_seconds: f64) -> Result<()> {
    // In secure mode the same HTTPS and token the peers use.
    let (scheme, tls) = match integration_tests::secure::security() {
        Some(security) => ("https", security.curl_options()),
        None => ("http", String::new()),
    };
    let url = format!(
        "{scheme}://{}/v1/tenant/{TENANT}/timeline/{TIMELINE}/wal?start_lsn={start}&end_lsn={end}",
        cluster.safekeepers[0].http_addr
    );
    let file = cluster.dir.path().join("pulled.wal");
    let recovery_rate = (end - start) as f64 / recovery_seconds / 1e6;
    for target in [std::path::Path::new("/dev/null"), file.as_path()] {
        let started = Instant::now();
        let output = std::process::Command::new("curl")
            .args(tls.split_whitespace())
            .args(["-sf", "--max-time", "300", "-o"])
            .arg(target)
            .args(["-w", "%{size_download}", &url])
            .output()
            .context("running curl")?;
        ensure!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
        if target == file.as_path() {
            let synced = std::process::Command::new("sync").arg(&file).status().context("running sync")?;
            ensure!(synced.success(), "sync {} failed", file.display());
        }
        let seconds = started.elapsed().as_secs_f64();
        let bytes: u64 = String::from_utf8_lossy(&output.stdout).trim().parse().context("curl's size")?;
        ensure!(bytes == end - start, "curl got {bytes} bytes of {}", end - start);
        let pull_rate = bytes as f64 / seconds / 1e6;
        println!(
            "peer recovery {recovery_rate:.0} MB/s (restart to caught up) vs HTTP pull to {} {pull_rate:.0} MB/s \
             (same range, same run): ratio {:.2}",
            target.display(),
            recovery_rate / pull_rate
        );
    }
    std::fs::remove_file(&file)?;
    Ok(())
}

#[test]
fn a_safekeeper_down_while_postgres_recycled_its_wal_catches_up_from_its_peers() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql("CREATE TABLE filler (v bigint, pad text)")?;
    write_wal(&cluster.pg, 4)?;
    let flush = cluster.pg_flush_lsn()?;
    cluster.wait_shim_commit(flush, COMMIT_TIMEOUT)?;
    cluster.wait_safekeeper_flush(2, flush, COMMIT_TIMEOUT)?;

    cluster.kill_safekeeper(2)?;
    let behind_at = json_lsn(&cluster.timeline_status(0)?, "flush_lsn")?;
    let target_mib = wal_to_write_mib()?;
    let written_from = cluster.pg_flush_lsn()?;
    let largest_pg_wal = write_until_recycled(&cluster, behind_at, target_mib)?;
    let end = cluster.pg_flush_lsn()?;
    let commit = cluster.wait_shim_commit(end, COMMIT_TIMEOUT)?;
    let written_mib = (end - written_from) >> 20;
    // Nothing was kept for the stopped safekeeper: pg_wal stayed near
    // max_wal_size while {written_mib} MiB went through it.
    ensure!(largest_pg_wal < 640 << 20, "pg_wal grew to {} MiB while safekeeper 3 was down", largest_pg_wal >> 20);

    let restarted_at = Instant::now();
    cluster.restart_safekeeper(2)?;
    wait_for(RECOVERY_TIMEOUT, "safekeeper 3 to catch up from its peers", || {
        let status = cluster.timeline_status(2)?;
        Ok((json_lsn(&status, "flush_lsn")? >= commit).then_some(()))
    })
    .with_context(|| format!("safekeeper 3 log: {}", cluster.safekeepers[2].process.log_tail()))?;
    let seconds = restarted_at.elapsed().as_secs_f64();
    let status = cluster.timeline_status(2)?;
    let recovery = &status["peer_recovery"];
    let copied_mib = (commit - behind_at) as f64 / (1 << 20) as f64;
    println!(
        "peer recovery: {copied_mib:.0} MiB behind after {written_mib} MiB written with pg_wal at most {} MiB; \
         caught up in {seconds:.1} s from restart ({:.0} MB/s); status {recovery}",
        largest_pg_wal >> 20,
        (commit - behind_at) as f64 / seconds / 1e6,
    );
    ensure!(recovery["completed_rounds"].as_u64() >= Some(1), "no recovery round completed: {recovery}");
    let metrics = http_request("GET", cluster.safekeepers[2].http_addr, "/metrics", None, Duration::from_secs(10))?;
    let copied_total = metric_value(&String::from_utf8_lossy(&metrics.body), "safekeeper_peer_recovery_bytes_total")?;
    ensure!(copied_total >= (commit - behind_at) as f64 * 0.99, "peer recovery bytes metric {copied_total}");
    if let (Some(bytes), Some(ms)) = (recovery["copied_bytes"].as_u64(), recovery["last_round_ms"].as_u64()) {
        println!("peer recovery: the last round copied {} MiB in {ms} ms", bytes >> 20);
    }
    print_http_pull_rates(&cluster, behind_at, commit, seconds)?;

    // Byte for byte what the others hold, up to the commit LSN.
    let timeline_start = json_lsn(&status, "timeline_start_lsn")?;
    ensure_same_wal_as_peers(&cluster, timeline_start, commit)?;
    ensure_streamed_to_again(&cluster)
}

/// Safekeeper 3's WAL in `[start, end)` is byte for byte the other two's.
fn ensure_same_wal_as_peers(cluster: &QuorumCluster, start: Lsn, end: Lsn) -> Result<()> {
    let segment_size = cluster.segment_size()?;
    let mut window_start = start;
    while window_start < end {
        let window_end = Lsn((window_start.0 + COMPARE_WINDOW_BYTES).min(end.0));
        let recovered = read_wal(&cluster.timeline_dir(2), segment_size, window_start, window_end)?;
        for index in [0, 1] {
            let theirs = read_wal(&cluster.timeline_dir(index), segment_size, window_start, window_end)?;
            ensure!(
                recovered == theirs,
                "safekeeper 3 differs from safekeeper {} in {window_start}..{window_end}",
                index + 1
            );
        }
        window_start = window_end;
    }
    Ok(())
}

/// The shim streams to safekeeper 3 again (not peer recovery keeping it
/// current): a new commit reaches all three.
fn ensure_streamed_to_again(cluster: &QuorumCluster) -> Result<()> {
    wait_for(COMMIT_TIMEOUT, "the shim to stream to safekeeper 3 again", || {
        let status = cluster.shim()?.status()?;
        Ok((status["safekeepers"][2]["state"] == "streaming").then_some(()))
    })?;
    write_wal(&cluster.pg, 1)?;
    let flush = cluster.pg_flush_lsn()?;
    cluster.wait_shim_commit(flush, COMMIT_TIMEOUT)?;
    cluster.wait_safekeeper_flush(2, flush, COMMIT_TIMEOUT).with_context(|| {
        let shim = cluster.shim().and_then(|shim| shim.status()).map(|s| s.to_string()).unwrap_or_default();
        format!("after recovery the shim does not stream to safekeeper 3: {shim}")
    })
}

/// The same while Postgres keeps writing: rounds follow each other until
/// the gap is small, then the shim streams to the safekeeper again.
#[test]
fn a_safekeeper_catches_up_from_its_peers_under_load() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql("CREATE TABLE filler (v bigint, pad text)")?;
    cluster.kill_safekeeper(2)?;
    let behind_at = json_lsn(&cluster.timeline_status(0)?, "flush_lsn")?;
    write_until_recycled(&cluster, behind_at, 512)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let QuorumCluster { pg, safekeepers, shim, .. } = &mut cluster;
    let shim = shim.as_ref().context("no shim")?;
    let caught_up = std::thread::scope(|scope| {
        let writer = scope.spawn(|| -> Result<u64> {
            let mut written_mib = 0;
            // Bounded whatever happens: the disk must not fill.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && written_mib < MAX_LOAD_MIB {
                write_wal(pg, 2)?;
                written_mib += 2;
            }
            Ok(written_mib)
        });
        let started = Instant::now();
        let result = safekeepers[2].restart().and_then(|restarted| {
            safekeepers[2] = restarted;
            wait_for(RECOVERY_TIMEOUT, "safekeeper 3 to be streamed to again", || {
                let status = shim.status()?;
                Ok((status["safekeepers"][2]["state"] == "streaming").then_some(()))
            })
        });
        let seconds = started.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written_mib = writer.join().expect("the writer thread panicked")?;
        result.map(|()| (seconds, written_mib))
    });
    let (seconds, written_mib) =
        caught_up.with_context(|| format!("safekeeper 3 log: {}", cluster.safekeepers[2].process.log_tail()))?;
    let recovery = cluster.timeline_status(2)?["peer_recovery"].clone();
    println!(
        "peer recovery under load: streamed to again {seconds:.1} s after the restart, {written_mib} MiB written \
         meanwhile; status {recovery}"
    );
    ensure!(recovery["completed_rounds"].as_u64() >= Some(1), "no recovery round completed: {recovery}");
    // Everything committed from here on reaches it as it does the others.
    write_wal(&cluster.pg, 1)?;
    let flush = cluster.pg_flush_lsn()?;
    cluster.wait_shim_commit(flush, COMMIT_TIMEOUT)?;
    cluster.wait_safekeeper_flush(2, flush, COMMIT_TIMEOUT)?;
    let segment_size = cluster.segment_size()?;
    let recovered = read_wal(&cluster.timeline_dir(2), segment_size, behind_at, flush)?;
    ensure!(recovered == read_wal(&cluster.timeline_dir(0), segment_size, behind_at, flush)?, "safekeeper 3 differs");
    Ok(())
}

/// Bootstrap: a brand-new, empty safekeeper (safekeeper 3 replaced by one
/// with an empty data directory, same id and ports) joins a cluster whose
/// safekeepers removed the timeline's first segments (retention) and whose
/// Postgres recycled them too. It starts its WAL at the oldest segment its
/// peers keep, copies from there, and the shim streams to it again.
#[test]
fn a_new_empty_safekeeper_is_bootstrapped_at_its_peers_oldest_kept_segment() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    let segment_size = cluster.segment_size()?;
    let timeline_start = cluster.timeline_start_lsn(0)?;
    cluster.pg.psql("CREATE TABLE filler (v bigint, pad text)")?;
    write_until_recycled(&cluster, timeline_start, BOOTSTRAP_WAL_MIB)?;
    let end = cluster.pg_flush_lsn()?;
    cluster.wait_shim_commit(end, COMMIT_TIMEOUT)?;

    // The page server confirmed everything: safekeepers 1 and 2 remove the
    // timeline's first segments. (A safekeeper refuses feedback beyond the
    // commit LSN it knows, which follows the shim's a message later.)
    for index in [0, 1] {
        wait_for(COMMIT_TIMEOUT, "the safekeeper to know the commit LSN", || {
            Ok((json_lsn(&cluster.timeline_status(index)?, "commit_lsn")? >= end).then_some(()))
        })?;
    }
    let feedback = serde_json::json!({ "remote_consistent_lsn": end.to_string() });
    let mut oldest_kept = Vec::new();
    for index in [0, 1] {
        let path = format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}/feedback");
        let answer = http_request("POST", cluster.safekeepers[index].http_addr, &path, Some(&feedback), HTTP_TIMEOUT)?;
        ensure!(answer.status == 200, "feedback answered {}", answer.status);
        let oldest = wait_for(COMMIT_TIMEOUT, &format!("safekeeper {} to remove old segments", index + 1), || {
            let status = cluster.timeline_status(index)?;
            let oldest = json_lsn(&status, "oldest_kept_lsn")?;
            let settled = json_lsn(&status, "commit_lsn")? >= end && oldest > timeline_start;
            Ok(settled.then_some(oldest))
        })?;
        oldest_kept.push(oldest);
    }
    ensure!(oldest_kept[0] == oldest_kept[1], "the peers keep WAL from {oldest_kept:?}");
    let bootstrap_at = oldest_kept[0];
    ensure!(bootstrap_at.is_segment_start(segment_size) && bootstrap_at > timeline_start);

    // Safekeeper 3 is replaced by an empty one, and the shim restarted (it
    // remembers what the old one acknowledged; a new term forgets it).
    cluster.shim = None;
    cluster.kill_safekeeper(2)?;
    std::fs::remove_dir_all(&cluster.safekeepers[2].datadir)?;
    cluster.restart_safekeeper(2)?;
    let restarted_at = Instant::now();
    cluster.start_shim()?;
    let commit = cluster.shim_commit_lsn()?;
    ensure!(commit >= end, "the new term's commit {commit} is below what was committed ({end})");

    let status = wait_for(RECOVERY_TIMEOUT, "safekeeper 3 to be bootstrapped from its peers", || {
        let status = cluster.timeline_status(2)?;
        Ok((json_lsn(&status, "flush_lsn")? >= commit).then_some(status))
    })
    .with_context(|| format!("safekeeper 3 log: {}", cluster.safekeepers[2].process.log_tail()))?;
    println!(
        "bootstrap: safekeeper 3 started at {bootstrap_at} (the timeline at {timeline_start}) and caught up to \
         {commit} in {:.1} s; peer_recovery {}",
        restarted_at.elapsed().as_secs_f64(),
        status["peer_recovery"]
    );
    ensure!(json_lsn(&status, "timeline_start_lsn")? == bootstrap_at, "timeline start: {status}");
    ensure!(json_lsn(&status, "oldest_kept_lsn")? == bootstrap_at, "oldest kept: {status}");
    ensure!(status["peer_recovery"]["completed_rounds"].as_u64() >= Some(1), "no round completed: {status}");
    ensure_same_wal_as_peers(&cluster, bootstrap_at, commit)?;
    // WAL below its start is gone here, as retention-removed WAL is.
    let below = format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}/wal?start_lsn={timeline_start}");
    let gone = http_request("GET", cluster.safekeepers[2].http_addr, &below, None, HTTP_TIMEOUT)?;
    ensure!(gone.status == 410, "WAL below the bootstrapped start answered {}", gone.status);
    ensure_streamed_to_again(&cluster)
}
