//! Serving committed WAL to everything downstream, with real PostgreSQL 15
//! programs as the consumers: pg_receivewal and a hot standby streaming
//! from a safekeeper's pg port, a new primary restored with a
//! `restore_command` that fetches segments over HTTP, the HTTP WAL API with
//! long polls and bad requests, and retention driven by feedback.

use std::io::{Read, Write};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, TENANT, TIMELINE};
use integration_tests::fixture::wait_for;
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::processes::{http_request, raw_http_connection, HttpAnswer, KillOnDrop};
use integration_tests::wal_files::read_wal;
use postgres_wal::lsn::Lsn;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// 1 MiB segments: many whole segments from little WAL.
fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

fn timeline_path(suffix: &str) -> String {
    format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}{suffix}")
}

fn get(cluster: &QuorumCluster, index: usize, path: &str) -> Result<HttpAnswer> {
    http_request("GET", cluster.safekeepers[index].http_addr, path, None, HTTP_TIMEOUT)
}

/// libpq connection options naming the timeline on a safekeeper's pg port.
fn timeline_options() -> String {
    format!("-c tenant_id={TENANT} -c timeline_id={TIMELINE}")
}

/// Commit on the primary and return its flush LSN after the commit.
fn commit_rows(pg: &PgCluster, table: &str, rows: std::ops::Range<u32>) -> Result<Lsn> {
    pg.psql(&format!(
        "INSERT INTO {table} SELECT g, repeat('x', 200) FROM generate_series({}, {}) g",
        rows.start,
        rows.end - 1
    ))?;
    Ok(pg.psql("SELECT pg_current_wal_flush_lsn()")?.parse()?)
}

/// Wait until every safekeeper's commit LSN reaches `lsn`.
fn wait_committed_everywhere(cluster: &QuorumCluster, lsn: Lsn) -> Result<()> {
    for index in 0..cluster.safekeepers.len() {
        wait_for(TIMEOUT, &format!("safekeeper {index} commit to reach {lsn}"), || {
            Ok((json_lsn(&cluster.timeline_status(index)?, "commit_lsn")? >= lsn).then_some(()))
        })?;
    }
    Ok(())
}

/// Test 1: pg_receivewal writes, from a safekeeper, the primary's bytes.
#[test]
fn pg_receivewal_from_a_safekeeper_matches_pg_wal() -> Result<()> {
    let cluster = QuorumCluster::start(options())?;
    let pg = &cluster.pg;
    let segment_size = cluster.segment_size()?;
    pg.psql("CREATE TABLE t (id int, filler text)")?;
    let out_dir = pg.scratch_dir("receivewal")?;
    let sk = &cluster.safekeepers[0];
    let conninfo = format!("host=127.0.0.1 port={} user=postgres options='{}'", sk.pg_addr.port(), timeline_options());
    let mut receivewal = pg.command("pg_receivewal");
    // --slot: PG15's pg_receivewal asks READ_REPLICATION_SLOT first.
    receivewal.arg("-D").arg(&out_dir).args(["-d", &conninfo, "--no-loop", "--status-interval=1", "--slot=archiver"]);
    let log_path = cluster.dir.path().join("pg_receivewal.log");
    receivewal.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log_path)?);
    let mut receivewal = KillOnDrop::new(receivewal.spawn().context("spawning pg_receivewal")?);

    // pg_receivewal starts at the segment holding the commit LSN it was told.
    let start = json_lsn(&cluster.timeline_status(0)?, "commit_lsn")?.segment_start(segment_size);
    for batch in 0..4 {
        commit_rows(pg, "t", batch * 2000..(batch + 1) * 2000)?;
        pg.psql("SELECT pg_switch_wal()")?;
    }
    let end = commit_rows(pg, "t", 8000..8500)?;
    wait_committed_everywhere(&cluster, end)?;
    ensure!(end.segment_no(segment_size).0 >= start.segment_no(segment_size).0 + 4, "WAL spans several segments");

    let expected = read_wal(&pg.pg_wal_dir(), segment_size, start, end)?;
    wait_for(TIMEOUT, "pg_receivewal to write the committed WAL", || {
        if let Some(status) = receivewal.child().try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            anyhow::bail!("pg_receivewal exited ({status}): {log}");
        }
        Ok(read_wal(&out_dir, segment_size, start, end).ok().filter(|got| *got == expected).map(|_| ()))
    })?;
    // The safekeeper lists it as a replication consumer with its position.
    let consumers = cluster.timeline_status(0)?["consumers"].clone();
    let streaming = consumers.as_array().context("consumers list")?;
    ensure!(
        streaming.iter().any(|c| c["kind"] == "replication" && json_lsn(c, "position_lsn").is_ok_and(|p| p >= end)),
        "pg_receivewal not shown as a consumer at {end}: {consumers}"
    );
    Ok(())
}

/// Test 2: a hot standby streaming from a safekeeper replays the primary.
#[test]
fn hot_standby_streams_from_a_safekeeper() -> Result<()> {
    let cluster = QuorumCluster::start(options())?;
    let pg = &cluster.pg;
    pg.psql("CREATE TABLE t (id int, filler text)")?;
    commit_rows(pg, "t", 0..1000)?;
    let sk = &cluster.safekeepers[1];
    let standby_options = options().setting("hot_standby", "on").setting("synchronous_standby_names", "''").setting(
        "primary_conninfo",
        &format!("'host=127.0.0.1 port={} user=postgres options=''{}'''", sk.pg_addr.port(), timeline_options()),
    );
    let mut standby = PgCluster::from_base_backup(pg, standby_options, "stream")?;
    standby.write_data_file("standby.signal", "")?;
    standby.start()?;

    let end = commit_rows(pg, "t", 1000..5000)?;
    pg.psql("UPDATE t SET filler = 'updated' WHERE id % 7 = 0")?;
    let end = end.max(pg.psql("SELECT pg_current_wal_flush_lsn()")?.parse()?);
    wait_for(TIMEOUT, &format!("the standby to replay {end}"), || {
        let replayed: Lsn = standby.psql("SELECT pg_last_wal_replay_lsn()")?.parse()?;
        Ok((replayed >= end).then_some(()))
    })
    .with_context(|| format!("standby log: {}", standby.log_tail()))?;
    let query = "SELECT count(*), sum(id), count(*) FILTER (WHERE filler = 'updated') FROM t";
    let on_primary = pg.psql(query)?;
    ensure!(standby.psql(query)? == on_primary, "standby differs from the primary ({on_primary})");
    ensure!(standby.psql("SELECT pg_is_in_recovery()")? == "t");
    let receiver = standby.psql("SELECT status, sender_port FROM pg_stat_wal_receiver")?;
    ensure!(receiver == format!("streaming|{}", sk.pg_addr.port()), "walreceiver: {receiver}");
    Ok(())
}

/// Test 3: a new primary from a base backup and segments fetched over HTTP
/// by `restore_command` has every row committed in the whole segments.
#[test]
fn restore_from_safekeeper_segments() -> Result<()> {
    let cluster = QuorumCluster::start(options())?;
    let pg = &cluster.pg;
    let segment_size = cluster.segment_size()?;
    pg.psql("CREATE TABLE t (id int, filler text)")?;
    let sk = &cluster.safekeepers[2];
    let (scheme, curl_tls) = match integration_tests::secure::security() {
        Some(security) => ("https", security.curl_options()),
        None => ("http", String::new()),
    };
    let restore_command = format!(
        "'curl -sf {curl_tls} {scheme}://{}/v1/tenant/{TENANT}/timeline/{TIMELINE}/segment/%f -o %p'",
        sk.http_addr
    );
    let restored_options = options()
        .setting("restore_command", &restore_command)
        .setting("synchronous_standby_names", "''")
        .setting("recovery_target_action", "'promote'");
    let mut restored = PgCluster::from_base_backup(pg, restored_options, "none")?;

    commit_rows(pg, "t", 0..3000)?;
    let switched: Lsn = pg.psql("SELECT pg_switch_wal()")?.parse()?;
    // In the segment still being written: must not be in the restored copy.
    let end = commit_rows(pg, "t", 3000..3100)?;
    wait_committed_everywhere(&cluster, end)?;
    ensure!(end >= switched.next_segment_start(segment_size), "the last whole segment is committed");

    restored.write_data_file("recovery.signal", "")?;
    restored.start()?;
    wait_for(TIMEOUT, "the restored server to finish recovery", || {
        Ok((restored.psql("SELECT pg_is_in_recovery()")? == "f").then_some(()))
    })
    .with_context(|| format!("restored log: {}", restored.log_tail()))?;
    let rows = restored.psql("SELECT count(*), min(id), max(id) FROM t")?;
    ensure!(rows == "3000|0|2999", "restored rows (count|min|max): {rows}");
    // It is a primary now: it takes writes.
    restored.psql("INSERT INTO t VALUES (-1, 'after restore')")?;
    Ok(())
}

/// Test 5: without feedback nothing is removed; after feedback old segments
/// go on every safekeeper, the position survives a restart, and WAL below
/// the kept range is 410 Gone over HTTP and "removed" on the pg port.
#[test]
fn retention_follows_feedback() -> Result<()> {
    let mut cluster = QuorumCluster::start(options())?;
    let pg = &cluster.pg;
    let segment_size = cluster.segment_size()?;
    pg.psql("CREATE TABLE t (id int, filler text)")?;
    for batch in 0..6 {
        commit_rows(pg, "t", batch * 1000..(batch + 1) * 1000)?;
        pg.psql("SELECT pg_switch_wal()")?;
    }
    let end = commit_rows(pg, "t", 6000..6100)?;
    wait_committed_everywhere(&cluster, end)?;
    let start = cluster.timeline_start_lsn(0)?;
    let files = |index: usize| -> Result<usize> {
        Ok(std::fs::read_dir(cluster.timeline_dir(index))?
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().len() == 24))
            .count())
    };
    let files_before: Vec<usize> = (0..3).map(files).collect::<Result<_>>()?;
    thread::sleep(Duration::from_millis(300));
    for (index, &files_then) in files_before.iter().enumerate() {
        let status = cluster.timeline_status(index)?;
        ensure!(json_lsn(&status, "oldest_kept_lsn")? == start, "removed without feedback: {status}");
        ensure!(files(index)? == files_then);
    }

    // The page server confirms everything below `confirmed`.
    let confirmed = Lsn(end.segment_start(segment_size).0 - 1);
    let expected_oldest = Lsn(confirmed.segment_start(segment_size).0 - segment_size.bytes());
    for sk in &cluster.safekeepers {
        let body = json!({ "remote_consistent_lsn": confirmed.to_string() });
        let answer = http_request("POST", sk.http_addr, &timeline_path("/feedback"), Some(&body), HTTP_TIMEOUT)?;
        ensure!(answer.status == 200, "feedback answered {}: {:?}", answer.status, answer.json());
    }
    for (index, &files_then) in files_before.iter().enumerate() {
        wait_for(TIMEOUT, &format!("safekeeper {index} to remove old segments"), || {
            Ok((json_lsn(&cluster.timeline_status(index)?, "oldest_kept_lsn")? == expected_oldest).then_some(()))
        })?;
        let status = cluster.timeline_status(index)?;
        let removed = (expected_oldest - start) / segment_size.bytes();
        ensure!(status["removed_segments"] == removed, "removed_segments: {status}");
        ensure!(files(index)? as u64 == files_then as u64 - removed, "segment files on disk");
        let metrics = String::from_utf8(get(&cluster, index, "/metrics")?.body)?;
        ensure!(metrics
            .lines()
            .any(|l| l.starts_with("safekeeper_removed_segments_total{") && l.ends_with(&format!(" {removed}"))));
    }

    // Below the kept WAL: 410 over HTTP, 58P01 on the pg port.
    let gone = get(&cluster, 0, &timeline_path(&format!("/wal?start_lsn={start}")))?;
    ensure!(gone.status == 410 && gone.json()?["error"].as_str().is_some_and(|e| e.contains("removed")));
    let name = start.segment_no(segment_size).file_name(1, segment_size);
    ensure!(get(&cluster, 0, &timeline_path(&format!("/segment/{name}")))?.status == 410);
    let replication = pg.psql_replication(cluster.safekeepers[0].pg_addr.port(), &format!("START_REPLICATION {start}"));
    ensure!(
        replication.as_ref().is_err_and(|e| format!("{e:#}").contains("has already been removed")),
        "START_REPLICATION below retention: {replication:?}"
    );
    // From the oldest kept LSN everything is still served.
    let kept = get(&cluster, 0, &timeline_path(&format!("/wal?start_lsn={expected_oldest}&end_lsn={end}")))?;
    ensure!(kept.status == 200 && kept.body == read_wal(&pg.pg_wal_dir(), segment_size, expected_oldest, end)?);

    // The consumer position and the removal survive a restart.
    cluster.kill_safekeeper(0)?;
    cluster.restart_safekeeper(0)?;
    let status = cluster.timeline_status(0)?;
    ensure!(json_lsn(&status, "remote_consistent_lsn")? == confirmed, "after restart: {status}");
    ensure!(json_lsn(&status, "oldest_kept_lsn")? == expected_oldest, "after restart: {status}");
    Ok(())
}

/// The HTTP WAL API: bytes equal pg_wal, headers, long poll, and bad
/// requests answered as documented while the server stays healthy (test 6).
#[test]
fn http_wal_api_answers_and_refuses() -> Result<()> {
    let cluster = QuorumCluster::start(options())?;
    let pg = &cluster.pg;
    let segment_size = cluster.segment_size()?;
    pg.psql("CREATE TABLE t (id int, filler text)")?;
    let end = commit_rows(pg, "t", 0..3000)?;
    wait_committed_everywhere(&cluster, end)?;
    let start = cluster.timeline_start_lsn(0)?;

    // A range from an arbitrary byte, and the whole committed WAL.
    let from = start + 12_345;
    let answer = get(&cluster, 0, &timeline_path(&format!("/wal?start_lsn={from}&end_lsn={end}")))?;
    ensure!(answer.status == 200);
    ensure!(answer.header("x-start-lsn")? == from.to_string() && answer.header("x-end-lsn")? == end.to_string());
    ensure!(answer.body == read_wal(&pg.pg_wal_dir(), segment_size, from, end)?, "bytes differ from pg_wal");
    // A huge range is cut at the commit LSN.
    let all = get(&cluster, 0, &timeline_path(&format!("/wal?start_lsn={start}&end_lsn=FFFFFFFF/FFFFFFFF")))?;
    let commit: Lsn = all.header("x-commit-lsn")?.parse()?;
    ensure!(all.header("x-end-lsn")? == commit.to_string() && all.body.len() as u64 == commit - start);
    ensure!(all.header("transfer-encoding")? == "chunked");

    // Long poll: nothing new for wait_ms, then an empty answer.
    let idle_path = timeline_path(&format!("/wal?start_lsn={commit}&wait_ms=400"));
    let asked = Instant::now();
    let idle = get(&cluster, 0, &idle_path)?;
    ensure!(idle.status == 200 && idle.body.is_empty() && asked.elapsed() >= Duration::from_millis(350));
    // ...and an answer as soon as something commits.
    let poll_path = timeline_path(&format!("/wal?start_lsn={commit}&wait_ms=20000"));
    let addr = cluster.safekeepers[0].http_addr;
    let poll = thread::spawn(move || http_request("GET", addr, &poll_path, None, HTTP_TIMEOUT));
    thread::sleep(Duration::from_millis(200));
    commit_rows(pg, "t", 3000..3010)?;
    let polled = poll.join().expect("poll thread")?;
    ensure!(polled.status == 200 && !polled.body.is_empty(), "long poll returned {} bytes", polled.body.len());
    ensure!(polled.body == read_wal(&pg.pg_wal_dir(), segment_size, commit, polled.header("x-end-lsn")?.parse()?)?);

    // A client that asks for everything and never reads.
    let (mut stalled, stalled_socket) = raw_http_connection(addr)?;
    let authorization = match integration_tests::secure::security() {
        Some(security) => format!("Authorization: Bearer {}\r\n", security.data_token),
        None => String::new(),
    };
    let request =
        format!("GET {} HTTP/1.1\r\nHost: x\r\n{authorization}\r\n", timeline_path(&format!("/wal?start_lsn={start}")));
    stalled.write_all(request.as_bytes())?;
    stalled.flush()?;

    // Bad requests: the documented status and a JSON message each.
    let bad = [
        ("/wal?start_lsn=garbage".to_string(), 400, "start_lsn"),
        ("/wal".to_string(), 400, "start_lsn"),
        (format!("/wal?start_lsn={start}&end_lsn=0/1"), 400, "below"),
        (format!("/wal?start_lsn={start}&wait_ms=-5"), 400, "wait_ms"),
        ("/segment/nonsense".to_string(), 400, "segment"),
        ("/segment/000000020000000000000001".to_string(), 404, "timeline"),
        // The last segment name of the LSN space (1 MiB segments): no overflow.
        ("/segment/00000001FFFFFFFF00000FFF".to_string(), 404, "segment"),
        (format!("/segment/{}", end.segment_no(segment_size).file_name(1, segment_size)), 404, "not fully committed"),
    ];
    for (suffix, status, needle) in bad {
        let answer = get(&cluster, 0, &timeline_path(&suffix))?;
        let message = answer.json()?["error"].as_str().unwrap_or_default().to_string();
        ensure!(answer.status == status && message.contains(needle), "{suffix}: {} {message}", answer.status);
    }
    let unknown = get(&cluster, 0, &format!("/v1/tenant/{TENANT}/timeline/{}/wal?start_lsn=0/0", "ab".repeat(16)))?;
    ensure!(unknown.status == 404 && unknown.json()?["error"].as_str().is_some_and(|e| e.contains("does not exist")));
    let bad_id = get(&cluster, 0, &format!("/v1/tenant/xyz/timeline/{TIMELINE}/wal?start_lsn=0/0"))?;
    ensure!(bad_id.status == 400);
    let bad_feedback = http_request(
        "POST",
        addr,
        &timeline_path("/feedback"),
        Some(&json!({"remote_consistent_lsn": "1/XYZ"})),
        HTTP_TIMEOUT,
    )?;
    ensure!(bad_feedback.status == 400 && bad_feedback.json()?["error"].as_str().is_some_and(|e| e.contains("1/XYZ")));
    let remote_before = get(&cluster, 0, &timeline_path(""))?.json()?["remote_consistent_lsn"].clone();
    let ahead = json!({"remote_consistent_lsn": "FFFFFFFF/0"});
    let beyond = http_request("POST", addr, &timeline_path("/feedback"), Some(&ahead), HTTP_TIMEOUT)?;
    ensure!(
        beyond.status == 409 && beyond.json()?["error"].as_str().is_some_and(|e| e.contains("beyond")),
        "feedback beyond the commit LSN answered {}",
        beyond.status
    );
    let remote_after = get(&cluster, 0, &timeline_path(""))?.json()?["remote_consistent_lsn"].clone();
    ensure!(remote_before == remote_after, "refused feedback moved remote_consistent_lsn to {remote_after}");
    let not_json = http_request("POST", addr, &timeline_path("/feedback"), Some(&json!([1, 2])), HTTP_TIMEOUT)?;
    ensure!(not_json.status == 400 && not_json.json().is_ok());

    // Still healthy: status answers and WAL still flows to the quorum.
    ensure!(get(&cluster, 0, "/v1/status")?.status == 200);
    let after = commit_rows(pg, "t", 4000..4100)?;
    wait_committed_everywhere(&cluster, after)?;
    let mut buf = [0u8; 1];
    stalled_socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    ensure!(stalled.read(&mut buf)? == 1, "the stalled client got its response started");
    drop(stalled);
    Ok(())
}
