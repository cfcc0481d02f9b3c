//! The stub against fake safekeepers serving generated WAL: it follows the
//! highest commit LSN, survives a crashed, a silent and a lagging source
//! with every record decoded exactly once, resumes after a restart with the
//! same counts, and stops with a clear error where it must.

#[path = "stub_support/mod.rs"]
mod support;

use std::sync::Arc;

use pageserver_stub::Tuning;
use postgres_wal::lsn::Lsn;
use serde_json::Value;
use support::*;

type Fakes = Vec<Arc<FakeSafekeeper>>;

async fn start_fakes(wal: &GeneratedWal, setups: &[(u64, Fault)]) -> Fakes {
    let mut fakes = Vec::new();
    for &(initial_commit_bytes, fault) in setups {
        fakes.push(Arc::new(FakeSafekeeper::start(wal, wal.start + initial_commit_bytes, fault).await));
    }
    fakes
}

fn reached_end(wal: &GeneratedWal) -> impl Fn(&Value) -> bool {
    let end = wal.end();
    move |status| lsn_field(status, "last_record_lsn") == Some(end) && lsn_field(status, "saved_lsn") == Some(end)
}

/// Every record the generator wrote was handed out once, in order; the
/// state file and the status page agree with the generator's counts.
fn assert_every_record_once(wal: &GeneratedWal, stub_records: &[postgres_wal::wal::DecodedRecord], status: &Value) {
    assert_eq!(stub_records.len(), wal.records.len(), "record count");
    for (decoded, generated) in stub_records.iter().zip(&wal.records) {
        assert_eq!(decoded, generated, "records differ at {}", generated.start_lsn);
    }
    let expected_bytes: u64 = wal.records.iter().map(|record| u64::from(record.total_len_bytes)).sum();
    assert_eq!(status["records"], wal.records.len() as u64);
    assert_eq!(status["bytes"], expected_bytes);
    assert_eq!(status["per_rmgr"], expected_per_rmgr(&wal.records));
    assert_eq!(status["lag_bytes"], 0);
}

fn assert_state_file(datadir: &std::path::Path, wal: &GeneratedWal) {
    let saved = pageserver_stub::state::load(datadir).unwrap().expect("a state file");
    assert_eq!(saved.last_record_end_lsn, wal.end());
    assert_eq!(saved.records, wal.records.len() as u64);
    assert_eq!(serde_json::to_value(&saved.per_rmgr).unwrap(), expected_per_rmgr(&wal.records));
    assert_eq!(saved.system_id, SYSTEM_ID);
}

/// The source with the highest commit crashes mid-body: the stub switches
/// to another safekeeper at the exact byte where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_source_is_replaced_without_gap_or_duplicate() {
    let wal = GeneratedWal::generate(11);
    let crash = Fault::Crash { after_bytes: 1_000_000 };
    let fakes = start_fakes(&wal, &[(300_000, crash), (200_000, Fault::None), (100_000, Fault::None)]).await;
    let writer = spawn_commit_writer(fakes.clone(), vec![60_001, 45_007, 40_009]);
    let datadir = tempfile::tempdir().unwrap();
    let stub = RunningStub::start(&fakes, datadir.path()).await;

    let status = stub.wait_for_status("the end of the WAL", reached_end(&wal)).await;
    writer.abort();
    assert!(fakes[0].is_dead(), "the first source crashed after serving {} bytes", fakes[0].served_bytes());
    assert_every_record_once(&wal, &stub.records(), &status);
    let switch = &status["last_switch"];
    assert_eq!(switch["from"], fakes[0].http_address(), "{status:#}");
    assert!(switch["reason"].as_str().unwrap().contains("failed"), "{switch}");
    assert!(status["switches"].as_u64().unwrap() >= 1);
    assert_ne!(status["source_safekeeper"], fakes[0].http_address());

    let summary = stub.stop().await.expect("a clean shutdown");
    assert_eq!(summary.saved_lsn, Some(wal.end()));
    assert_state_file(datadir.path(), &wal);
    // The final save is reported to every safekeeper still alive (a
    // safekeeper keeps the maximum, so arrival order does not matter).
    for fake in &fakes[1..] {
        let feedback = fake.feedback();
        assert_eq!(feedback.iter().max(), Some(&wal.end()), "feedback to {}: {feedback:?}", fake.address);
    }
}

/// After the source crashes, the only other safekeeper is behind the
/// stub's position for a while: its long polls end empty (`x-end-lsn` =
/// start, above its `x-commit-lsn`), which is waiting, not failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safekeeper_behind_the_stub_is_waited_for() {
    let wal = GeneratedWal::generate(19);
    let crash = Fault::Crash { after_bytes: 1_000_000 };
    let fakes = start_fakes(&wal, &[(1_500_000, crash), (300_000, Fault::None)]).await;
    let datadir = tempfile::tempdir().unwrap();
    let stub = RunningStub::start(&fakes, datadir.path()).await;
    stub.wait_for_status("the crash", |status| status["failed_pulls"] == 1).await;
    // Several long polls (100 ms each) on the safekeeper that is behind.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let waiting = stub.status().await;
    assert_eq!(waiting["source_safekeeper"], fakes[1].http_address(), "{waiting:#}");
    assert_eq!(waiting["failed_pulls"], 1, "empty answers are not failures: {waiting:#}");
    let writer = spawn_commit_writer(fakes[1..].to_vec(), vec![45_007]);
    let status = stub.wait_for_status("the end of the WAL", reached_end(&wal)).await;
    writer.abort();
    assert_every_record_once(&wal, &stub.records(), &status);
    assert_eq!((status["failed_pulls"].as_u64(), status["switches"].as_u64()), (Some(1), Some(1)), "{status:#}");
    stub.stop().await.expect("a clean shutdown");
}

/// The source stops answering mid-body (and its status hangs too): after
/// the silence timeout the stub moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_source_is_abandoned() {
    let wal = GeneratedWal::generate(12);
    let hang = Fault::Hang { after_bytes: 700_000 };
    let fakes = start_fakes(&wal, &[(300_000, hang), (100_000, Fault::None)]).await;
    let writer = spawn_commit_writer(fakes.clone(), vec![60_001, 45_007]);
    let datadir = tempfile::tempdir().unwrap();
    // The hung source's commit LSN freezes while the other's grows: keep the
    // lag rule from acting first, so this test sees the silence rule.
    let tuning = Tuning { lag_grace_ms: 60_000, ..test_tuning() };
    let stub = RunningStub::start_with(&fakes, datadir.path(), tuning).await;

    let status = stub.wait_for_status("the end of the WAL", reached_end(&wal)).await;
    writer.abort();
    assert!(fakes[0].is_hung());
    assert_every_record_once(&wal, &stub.records(), &status);
    let switch = &status["last_switch"];
    assert_eq!(switch["from"], fakes[0].http_address(), "{status:#}");
    assert!(switch["reason"].as_str().unwrap().contains("silent"), "{switch}");
    let hung_note = &status["safekeepers"][0];
    assert!(
        hung_note["status_error"].as_str().is_some_and(|error| error.contains("no complete answer")),
        "{hung_note}"
    );
    stub.stop().await.expect("a clean shutdown");
    assert_state_file(datadir.path(), &wal);
}

/// The source's commit LSN stalls while another safekeeper runs more than a
/// segment ahead: after the grace period the stub follows the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_source_is_left_for_the_leader() {
    let wal = GeneratedWal::generate(13);
    let fakes = start_fakes(&wal, &[(300_000, Fault::None), (100_000, Fault::None), (0, Fault::None)]).await;
    // Safekeeper 0 stays at its initial commit: it lags more and more.
    let writer = spawn_commit_writer(fakes.clone(), vec![0, 45_007, 20_011]);
    let datadir = tempfile::tempdir().unwrap();
    let stub = RunningStub::start(&fakes, datadir.path()).await;

    let status = stub.wait_for_status("the end of the WAL", reached_end(&wal)).await;
    writer.abort();
    assert!(fakes[0].served_bytes() > 0, "safekeeper 0 was the first source (highest commit)");
    assert_every_record_once(&wal, &stub.records(), &status);
    let switch = &status["last_switch"];
    assert_eq!(switch["from"], fakes[0].http_address(), "{status:#}");
    assert!(switch["reason"].as_str().unwrap().contains("behind"), "{switch}");
    assert_eq!(status["source_safekeeper"], fakes[1].http_address(), "the leader");
    assert_eq!(status["switches"], 1, "no flapping: {status:#}");
    stub.stop().await.expect("a clean shutdown");
}

/// Stopped while an XLOG SWITCH's padding is still arriving, restarted
/// later: the second run resumes at the saved record end, re-reads only the
/// switch (which the first save did not count), and the final counts equal
/// a single run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_over_a_restart_equal_a_single_run() {
    let wal = GeneratedWal::generate(14);
    let switch = wal.switch_record().clone();
    let inside_padding = Lsn(switch.end_lsn.0 - 10_000);
    let fakes = start_fakes(&wal, &[(inside_padding - wal.start, Fault::None), (0, Fault::None)]).await;
    let datadir = tempfile::tempdir().unwrap();

    let first = RunningStub::start(&fakes, datadir.path()).await;
    let before_switch = wal.records.iter().rev().find(|record| record.end_lsn <= switch.start_lsn).unwrap().end_lsn;
    first
        .wait_for_status("the switch", |status| {
            lsn_field(status, "last_record_lsn") == Some(switch.end_lsn)
                && lsn_field(status, "saved_lsn") == Some(before_switch)
        })
        .await;
    let first_summary = first.stop().await.expect("a clean shutdown");
    assert_eq!(first_summary.saved_lsn, Some(before_switch), "the switch is not saved before its padding");
    let saved = pageserver_stub::state::load(datadir.path()).unwrap().unwrap();
    let settled = wal.records.iter().take_while(|record| record.end_lsn <= before_switch).count();
    assert_eq!(saved.records, settled as u64);

    for fake in &fakes {
        fake.set_commit(wal.end());
    }
    let second = RunningStub::start(&fakes, datadir.path()).await;
    let resumed = second.status().await;
    assert_eq!(lsn_field(&resumed, "saved_lsn"), Some(before_switch), "{resumed:#}");
    let status = second.wait_for_status("the end of the WAL", reached_end(&wal)).await;
    let second_records = second.records();
    assert_eq!(second_records.first(), Some(&switch), "the second run starts with the switch");
    assert_eq!(second_records, wal.records[settled..].to_vec());
    assert_eq!(status["records"], wal.records.len() as u64);
    assert_eq!(status["per_rmgr"], expected_per_rmgr(&wal.records));
    second.stop().await.expect("a clean shutdown");
    assert_state_file(datadir.path(), &wal);
}

/// Every safekeeper has removed the WAL the stub needs: a fatal error that
/// says a snapshot is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_gone_everywhere_is_fatal() {
    let wal = GeneratedWal::generate(15);
    let fakes = start_fakes(&wal, &[(2_000_000, Fault::None), (2_000_000, Fault::None)]).await;
    fakes.iter().for_each(|fake| fake.set_oldest_kept(wal.start + SEGMENT_BYTES));
    let datadir = tempfile::tempdir().unwrap();
    let stub = RunningStub::start(&fakes, datadir.path()).await;
    let error = stub.finish().await.expect_err("the stub cannot continue");
    let message = format!("{error:#}");
    assert!(message.contains("snapshot") && message.contains(&wal.start.to_string()), "{message}");
}

/// The safekeeper chosen first answers 410 (its status does not show it):
/// the other one still has the WAL and takes over from the same byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_gone_on_one_safekeeper_is_served_by_another() {
    let wal = GeneratedWal::generate(16);
    let before_switch = wal.switch_record().start_lsn - wal.start;
    let fakes = start_fakes(&wal, &[(before_switch, Fault::None), (before_switch, Fault::None)]).await;
    let datadir = tempfile::tempdir().unwrap();
    let first = RunningStub::start(&fakes, datadir.path()).await;
    let settled = wal.records.iter().take_while(|record| record.end_lsn <= wal.start + before_switch).count();
    let saved_lsn = wal.records[settled - 1].end_lsn;
    first.wait_for_status("a save", |status| lsn_field(status, "saved_lsn") == Some(saved_lsn)).await;
    first.stop().await.expect("a clean shutdown");

    fakes[0].hide_oldest_kept_in_status();
    fakes[0].set_oldest_kept(saved_lsn + 8);
    fakes.iter().for_each(|fake| fake.set_commit(wal.end()));
    let second = RunningStub::start(&fakes, datadir.path()).await;
    let status = second.wait_for_status("the end of the WAL", reached_end(&wal)).await;
    let switch = &status["last_switch"];
    assert_eq!(switch["from"], fakes[0].http_address(), "{status:#}");
    assert!(switch["reason"].as_str().unwrap().contains("410"), "{switch}");
    assert_eq!(lsn_field(switch, "at_lsn"), Some(saved_lsn));
    assert_eq!(second.records(), wal.records[settled..].to_vec());
    second.stop().await.expect("a clean shutdown");
    assert_state_file(datadir.path(), &wal);
}

/// A corrupt record is never skipped: the run fails naming its LSN, having
/// saved everything before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_fatal_and_named() {
    let mut wal = GeneratedWal::generate(17);
    // A record whose payload byte 30 lies on its first page, so the damage
    // is to the record (a CRC failure), not to a page header.
    let (victim_index, victim) = (300..)
        .map(|index| (index, wal.records[index].clone()))
        .find(|(_, record)| record.total_len_bytes >= 40 && record.start_lsn.block_offset(8192) < 8192 - 64)
        .unwrap();
    let mut bytes = wal.bytes.to_vec();
    let offset = usize::try_from(victim.start_lsn - wal.start).unwrap() + 30;
    bytes[offset] ^= 0x40;
    wal.bytes = bytes.into();
    let end = wal.end() - wal.start;
    let fakes = start_fakes(&wal, &[(end, Fault::None)]).await;
    let datadir = tempfile::tempdir().unwrap();
    let stub = RunningStub::start(&fakes, datadir.path()).await;
    let records = stub.records.clone();
    let error = stub.finish().await.expect_err("corrupt WAL is fatal");
    let message = format!("{error:#}");
    assert!(message.contains(&victim.start_lsn.to_string()) && message.contains("CRC"), "{message}");
    assert_eq!(records.lock().unwrap().len(), victim_index);
    let saved = pageserver_stub::state::load(datadir.path()).unwrap().unwrap();
    assert_eq!(saved.last_record_end_lsn, wal.records[victim_index - 1].end_lsn);
}

/// A state file of another cluster is refused rather than resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_of_another_system_is_refused() {
    let wal = GeneratedWal::generate(18);
    let fakes = start_fakes(&wal, &[(500_000, Fault::None)]).await;
    let datadir = tempfile::tempdir().unwrap();
    let stub = RunningStub::start(&fakes, datadir.path()).await;
    stub.wait_for_status("a save", |status| status["saved_lsn"].is_string()).await;
    stub.stop().await.unwrap();
    let mut saved = pageserver_stub::state::load(datadir.path()).unwrap().unwrap();
    saved.system_id += 1;
    pageserver_stub::state::save(datadir.path(), &saved).unwrap();
    let stub = RunningStub::start(&fakes, datadir.path()).await;
    let error = stub.finish().await.expect_err("a foreign state file is refused");
    let message = format!("{error:#}");
    assert!(message.contains("database system id") && message.contains(&SYSTEM_ID.to_string()), "{message}");
}
