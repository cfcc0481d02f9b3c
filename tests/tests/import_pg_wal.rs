//! Real Postgres WAL through the acceptor into segment storage: the
//! safekeeper's files must equal `pg_wal` byte for byte, `pg_waldump` must
//! read the safekeeper's timeline directory, and a second import (a new
//! term) must continue exactly where the first ended.

use anyhow::{ensure, Context, Result};
use integration_tests::pg::{PgCluster, PgOptions};
use integration_tests::wal_files::{read_wal, snapshot_files, waldump_lsns};
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use safekeeper::import::{import_pg_wal, timeline_dir, ImportRequest};
use safekeeper_core::recovery::recover_timeline;
use safekeeper_protocol::ids::{NodeId, TenantId, TimelineId};

const TENANT: &str = "0123456789abcdef0123456789abcdef";
const TIMELINE: &str = "fedcba9876543210fedcba9876543210";

fn flush_lsn(pg: &PgCluster) -> Result<Lsn> {
    Ok(pg.psql("SELECT pg_current_wal_flush_lsn()")?.trim().parse()?)
}

#[test]
fn imported_wal_equals_pg_wal_and_pg_waldump_reads_it() -> Result<()> {
    let options = PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }.setting("wal_keep_size", "1GB");
    let mut pg = PgCluster::init(options)?;
    pg.start()?;
    pg.pgbench(&["-i", "-s", "1", "-q"])?;
    let datadir = tempfile::tempdir()?;
    let tenant_id: TenantId = TENANT.parse()?;
    let timeline_id: TimelineId = TIMELINE.parse()?;
    let pg_wal = pg.pg_wal_dir();
    let request =
        ImportRequest { datadir: datadir.path(), node_id: NodeId(1), tenant_id, timeline_id, pg_wal: &pg_wal };
    let segment_size = WalSegmentSize::new(pg.wal_segment_size_bytes())?;
    let dir = timeline_dir(datadir.path(), tenant_id, timeline_id);

    let mut previous_end = None;
    for round in 0..2 {
        pg.pgbench(&["-t", "300", "-c", "2"])?;
        pg.psql("CHECKPOINT")?;
        let pg_flush = flush_lsn(&pg)?;
        let summary = import_pg_wal(&request)?;
        println!("round {round}: {summary:?}, Postgres flushed {pg_flush}");
        ensure!(summary.flush_lsn >= pg_flush, "imported up to {} < Postgres flush {pg_flush}", summary.flush_lsn);
        if let Some(previous_end) = previous_end {
            ensure!(summary.start_lsn == previous_end, "second import must continue at {previous_end}");
            ensure!(summary.term.0 == round + 1, "each import is a new term");
        }
        previous_end = Some(summary.flush_lsn);

        // Byte-identical to pg_wal over the whole imported range.
        let recovered = recover_timeline(&dir)?.context("timeline exists")?;
        ensure!(recovered.end_lsn == summary.flush_lsn, "a restart recovers the imported end");
        let start = recovered.control.timeline_start_lsn;
        let ours = read_wal(&dir, segment_size, start, summary.flush_lsn)?;
        let theirs = read_wal(&pg_wal, segment_size, start, summary.flush_lsn)?;
        ensure!(ours == theirs, "safekeeper WAL differs from pg_wal in {start}..{}", summary.flush_lsn);

        // pg_waldump reads the safekeeper's directory like pg_wal.
        let from_safekeeper = waldump_lsns(&pg, &dir, start, summary.flush_lsn)?;
        let from_pg_wal = waldump_lsns(&pg, &pg_wal, start, summary.flush_lsn)?;
        ensure!(from_safekeeper.len() > 1000, "pgbench wrote many records");
        ensure!(from_safekeeper == from_pg_wal, "pg_waldump lists different records");
    }
    pg.stop()?;
    Ok(())
}

/// A `pg_wal`-like directory holding one generated segment of `system_id`.
fn generated_pg_wal(system_id: u64, records: usize) -> Result<(tempfile::TempDir, Lsn)> {
    use postgres_wal::wal::generator::WalGenerator;
    let segment_size = WalSegmentSize::new(1 << 20)?;
    let start = Lsn(1 << 20);
    let mut generator = WalGenerator::new(system_id, segment_size, start);
    generator.append_random_records(records, system_id, 3000);
    let (_, mut bytes) = generator.take_bytes();
    bytes.resize(segment_size.bytes() as usize, 0);
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join(start.segment_no(segment_size).file_name(1, segment_size)), bytes)?;
    Ok((dir, generator.end_lsn()))
}

#[test]
fn import_refuses_wal_of_another_system_and_writes_nothing() -> Result<()> {
    let (first, end) = generated_pg_wal(111, 200)?;
    let datadir = tempfile::tempdir()?;
    let (tenant_id, timeline_id) = (TENANT.parse()?, TIMELINE.parse()?);
    let request =
        |pg_wal| ImportRequest { datadir: datadir.path(), node_id: NodeId(1), tenant_id, timeline_id, pg_wal };
    let summary = import_pg_wal(&request(first.path()))?;
    ensure!(summary.flush_lsn == end, "imported {} of generated WAL ending at {end}", summary.flush_lsn);

    let dir = timeline_dir(datadir.path(), tenant_id, timeline_id);
    let before = snapshot_files(&dir)?;
    let (other, _) = generated_pg_wal(222, 10)?;
    let error = import_pg_wal(&request(other.path())).expect_err("another system's WAL must be refused");
    ensure!(error.to_string().contains("111") && error.to_string().contains("222"), "unclear error: {error}");
    ensure!(snapshot_files(&dir)? == before, "a refused import changed the timeline");
    Ok(())
}
