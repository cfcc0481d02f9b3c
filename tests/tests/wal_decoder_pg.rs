//! The WAL decoder against real PostgreSQL 15 WAL: it must list exactly the
//! records `pg_waldump` lists, in any input chunking, and pin a corrupted
//! byte to the record that holds it.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use integration_tests::pg::{PgCluster, PgOptions};
use postgres_wal::lsn::{Lsn, SegmentNo, WalSegmentSize};
use postgres_wal::wal::format::{page_header_bytes, rmgr_name, RECORD_HEADER_BYTES, WAL_PAGE_SIZE_BYTES};
use postgres_wal::wal::generator::decode_in_chunks;
use postgres_wal::wal::{DecodeStep, DecodedRecord, WalDecodeError, WalDecoder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes decoded past a corrupted record before giving up on seeing an error.
const CORRUPTION_TAIL_BYTES: u64 = 64 * 1024;
/// Largest random chunk fed to the decoder (a replication message is 128 KiB).
const MAX_CHUNK_BYTES: usize = 128 * 1024;

/// One record as pg_waldump prints it.
#[derive(Debug, PartialEq, Eq)]
struct DumpedRecord {
    rmgr: String,
    total_len_bytes: u32,
    xid: u32,
    lsn: Lsn,
    prev_lsn: Lsn,
}

impl DumpedRecord {
    fn from_decoded(record: &DecodedRecord) -> DumpedRecord {
        let rmgr = rmgr_name(record.rmgr_id);
        DumpedRecord {
            rmgr,
            total_len_bytes: record.total_len_bytes,
            xid: record.xid,
            lsn: record.start_lsn,
            prev_lsn: record.prev_lsn,
        }
    }

    /// Parse `rmgr: Heap len (rec/tot): 54/ 150, tx: 735, lsn: 0/0155F0A8, prev 0/0155F070, desc: ...`.
    fn parse(line: &str) -> Result<DumpedRecord> {
        let field = |key: &str| -> Result<&str> {
            let start = line.find(key).with_context(|| format!("no {key:?} in {line:?}"))? + key.len();
            let rest = &line[start..];
            let end = rest.find(',').unwrap_or(rest.len());
            Ok(rest[..end].trim())
        };
        let rmgr = field("rmgr:")?.split_whitespace().next().context("empty rmgr")?.to_string();
        let lengths = field("len (rec/tot):")?;
        let total = lengths.split('/').nth(1).with_context(|| format!("bad lengths {lengths:?}"))?;
        Ok(DumpedRecord {
            rmgr,
            total_len_bytes: total.trim().parse()?,
            xid: field("tx:")?.parse()?,
            lsn: field("lsn:")?.parse()?,
            prev_lsn: field("prev")?.parse()?,
        })
    }
}

/// WAL read from pg_wal: `bytes` start at the segment start `start`.
struct WalRange {
    start: Lsn,
    bytes: Vec<u8>,
    segment_size: WalSegmentSize,
}

impl WalRange {
    fn end(&self) -> Lsn {
        self.start + self.bytes.len() as u64
    }

    fn slice(&self, from: Lsn, to: Lsn) -> &[u8] {
        &self.bytes[(from - self.start) as usize..(to.min(self.end()) - self.start) as usize]
    }
}

/// Generate WAL with pgbench, large rows, a 20 MiB logical message, a switch
/// and a checkpoint; stop the server; return everything in pg_wal up to the
/// flush LSN.
fn produce_wal(pg: &mut PgCluster) -> Result<WalRange> {
    pg.start()?;
    pg.pgbench(&["-i", "-s", "1", "-q"])?;
    pg.pgbench(&["-T", "2", "-c", "4", "-j", "2"])?;
    pg.psql("CREATE TABLE big (id int, payload text); ALTER TABLE big ALTER COLUMN payload SET STORAGE EXTERNAL")?;
    // Hex digests do not compress, and EXTERNAL storage skips compression anyway.
    for (id, digests) in [(1, 3_200), (2, 100_000)] {
        pg.psql(&format!(
            "INSERT INTO big SELECT {id}, string_agg(md5(i::text), '') FROM generate_series(1, {digests}) i"
        ))?;
    }
    // One record larger than a segment: it must span a segment boundary.
    pg.psql("SELECT pg_logical_emit_message(false, 'wal-decoder-test', repeat('x', 20 * 1024 * 1024))")?;
    pg.psql("SELECT pg_switch_wal()")?;
    pg.pgbench(&["-t", "200", "-c", "2"])?;
    pg.psql("CHECKPOINT")?;
    let flush: Lsn = pg.psql("SELECT pg_current_wal_flush_lsn()")?.parse()?;
    // Immediate stop: no shutdown checkpoint, so pg_wal stays as it is.
    pg.stop()?;

    let segment_size = WalSegmentSize::new(pg.wal_segment_size_bytes())?;
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(pg.pg_wal_dir())? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Ok((1, segment)) = SegmentNo::parse_file_name(&name, segment_size) {
            segments.push(segment);
        }
    }
    let first = segments.into_iter().min().context("no segment files in pg_wal")?;
    let start = first.start_lsn(segment_size);
    ensure!(start < flush, "oldest segment {start} is not before the flush LSN {flush}");
    let mut bytes = Vec::with_capacity((flush - start) as usize);
    for segment in first.0..=flush.segment_no(segment_size).0 {
        let name = SegmentNo(segment).file_name(1, segment_size);
        let path = pg.pg_wal_dir().join(&name);
        bytes.extend(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    bytes.truncate((flush - start) as usize);
    Ok(WalRange { start, bytes, segment_size })
}

fn pg_waldump(pg: &PgCluster, from: Lsn, to: Lsn) -> Result<Vec<DumpedRecord>> {
    let mut waldump = pg.command("pg_waldump");
    waldump.arg("-p").arg(pg.pg_wal_dir()).args(["-s", &from.to_string(), "-e", &to.to_string()]);
    let output = pg.run_checked(waldump, std::time::Duration::from_secs(120))?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("rmgr: "))
        .map(DumpedRecord::parse)
        .collect()
}

/// The LSN of byte `offset` of a record starting at `start`, skipping the
/// page headers inside it.
fn lsn_of_record_byte(start: Lsn, mut offset: u64, segment_size: WalSegmentSize) -> Lsn {
    let mut position = start;
    loop {
        let room = WAL_PAGE_SIZE_BYTES - position.block_offset(WAL_PAGE_SIZE_BYTES);
        if offset < room {
            return position + offset;
        }
        offset -= room;
        position = position + room;
        position = position + page_header_bytes(position.is_segment_start(segment_size));
    }
}

/// Flip the byte at `offset` inside record `index` and decode from two
/// records earlier; the decoder must report an error pinned to the record.
fn check_corruption(
    wal: &WalRange,
    records: &[DecodedRecord],
    index: usize,
    offset: u64,
    rng: &mut StdRng,
) -> Result<()> {
    let target = &records[index];
    let (decoder, from) = match index.checked_sub(2) {
        Some(earlier) => {
            (WalDecoder::at_record_boundary(records[earlier].end_lsn, wal.segment_size), records[earlier].end_lsn)
        }
        None => (WalDecoder::at_segment_start(wal.start, wal.segment_size), wal.start),
    };
    let mut bytes = wal.slice(from, target.end_lsn + CORRUPTION_TAIL_BYTES).to_vec();
    let at = lsn_of_record_byte(target.start_lsn, offset, wal.segment_size);
    bytes[(at - from) as usize] ^= rng.gen_range(1..=255u8);
    let (decoded, outcome) = decode_in_chunks(decoder, &bytes, rng.gen(), MAX_CHUNK_BYTES);
    let context =
        format!("byte {offset} (at {at}) of the {}-byte record at {}", target.total_len_bytes, target.start_lsn);
    ensure!(decoded.iter().all(|record| record.start_lsn < target.start_lsn), "{context}: decoded past it");
    let in_body = offset >= RECORD_HEADER_BYTES;
    match outcome {
        Err(WalDecodeError::CrcMismatch { lsn, .. }) if lsn == target.start_lsn => Ok(()),
        Err(error) if !in_body && (error.lsn() == target.start_lsn || error.record_lsn() == Some(target.start_lsn)) => {
            Ok(())
        }
        other => bail!(
            "{context}: expected {} at the record, got {other:?}",
            if in_body { "a CRC error" } else { "an error" }
        ),
    }
}

#[test]
fn decoder_matches_pg_waldump_on_real_wal() -> Result<()> {
    let started = Instant::now();
    let mut pg =
        PgCluster::init(PgOptions::default().setting("wal_keep_size", "'1GB'").setting("max_wal_size", "'1GB'"))?;
    let wal = produce_wal(&mut pg)?;
    let segment_size = wal.segment_size;
    println!("WAL {}..{} ({} MiB) produced in {:?}", wal.start, wal.end(), wal.bytes.len() >> 20, started.elapsed());

    // 1. Whole input at once; the same as pg_waldump.
    let decoder = WalDecoder::at_segment_start(wal.start, segment_size);
    let (records, outcome) = decode_in_chunks(decoder.clone(), &wal.bytes, 0, wal.bytes.len());
    ensure!(outcome == Ok(DecodeStep::NeedMoreInput), "decoding ended with {outcome:?}");
    let first = records.first().context("no records decoded")?;
    let dumped = pg_waldump(&pg, first.start_lsn, wal.end())?;
    let ours: Vec<DumpedRecord> = records.iter().map(DumpedRecord::from_decoded).collect();
    if let Some(index) = (0..ours.len().min(dumped.len())).find(|&i| ours[i] != dumped[i]) {
        bail!("record {index} differs: ours {:?}, pg_waldump {:?}", ours[index], dumped[index]);
    }
    ensure!(ours.len() == dumped.len(), "we decoded {} records, pg_waldump {}", ours.len(), dumped.len());
    println!("{} records match pg_waldump ({:?})", records.len(), started.elapsed());

    // The interesting shapes are really there.
    let last_byte_page = |r: &DecodedRecord| Lsn(r.end_lsn.0 - 1).segment_no(segment_size);
    let spans_segments =
        records.iter().position(|r| !r.is_switch() && r.start_lsn.segment_no(segment_size) != last_byte_page(r));
    let spans_pages =
        |r: &&DecodedRecord| r.start_lsn.0 / WAL_PAGE_SIZE_BYTES != (r.end_lsn.0 - 1) / WAL_PAGE_SIZE_BYTES;
    ensure!(spans_segments.is_some(), "no record spans a segment boundary");
    let logical_message_rmgr_id = 21;
    let huge = records
        .iter()
        .position(|r| r.rmgr_id == logical_message_rmgr_id && u64::from(r.total_len_bytes) > segment_size.bytes());
    ensure!(huge.is_some(), "the 20 MiB logical message was not decoded as one record");
    ensure!(records.iter().any(|r| r.is_switch()), "no XLOG SWITCH decoded");
    println!("{} records span pages", records.iter().filter(spans_pages).count());

    // 2. Random chunkings decode the same.
    let seed = std::env::var("WAL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("chunking/corruption seed {seed} (set WAL_TEST_SEED to replay)");
    let (chunked, outcome) = decode_in_chunks(decoder, &wal.bytes, seed, MAX_CHUNK_BYTES);
    ensure!(outcome == Ok(DecodeStep::NeedMoreInput) && chunked == records, "chunked decoding differs (seed {seed})");
    let small_chunks_end = first.start_lsn + (4 << 20);
    let (small, _) = decode_in_chunks(
        WalDecoder::at_segment_start(wal.start, segment_size),
        wal.slice(wal.start, small_chunks_end),
        seed,
        64,
    );
    ensure!(!small.is_empty() && records.starts_with(&small), "small-chunk decoding differs (seed {seed})");

    // 3. Corruption is caught at the record that holds it.
    let mut rng = StdRng::seed_from_u64(seed);
    let header_straddles = records
        .iter()
        .position(|r| r.start_lsn.block_offset(WAL_PAGE_SIZE_BYTES) > WAL_PAGE_SIZE_BYTES - RECORD_HEADER_BYTES);
    let page_spanning: Vec<usize> =
        (0..records.len()).filter(|&i| spans_pages(&&records[i]) && !records[i].is_switch()).collect();
    let mut targets: Vec<usize> = spans_segments.into_iter().chain(huge).chain(header_straddles).collect();
    targets.extend((0..3).map(|_| page_spanning[rng.gen_range(0..page_spanning.len())]));
    targets.extend((0..3).map(|_| rng.gen_range(0..records.len())));
    for index in targets {
        println!("corrupting {:?}", records[index]);
        let total = u64::from(records[index].total_len_bytes);
        if total > RECORD_HEADER_BYTES {
            check_corruption(&wal, &records, index, rng.gen_range(RECORD_HEADER_BYTES..total), &mut rng)?;
        }
        // Header bytes after xl_tot_len (a flipped length may legitimately
        // just ask for more input than there is).
        check_corruption(&wal, &records, index, rng.gen_range(4..RECORD_HEADER_BYTES), &mut rng)?;
    }
    println!("done in {:?}", started.elapsed());
    Ok(())
}
