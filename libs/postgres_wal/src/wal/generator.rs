//! Generator of valid PG15 WAL for tests, simulation and benchmarks.
//!
//! It lays records out exactly as Postgres's `CopyXLogRecordToWAL` does:
//! 8-byte aligned starts, a page header at every 8 KiB page (long at segment
//! starts), records (even their headers) split across pages with
//! `XLP_FIRST_IS_CONTRECORD` and `xlp_rem_len` on continuation pages, and an
//! XLOG SWITCH followed by zeros (page headers included) to the segment end.
//! It is deterministic: all content comes from the caller.
//!
//! It writes Postgres timeline 1 unless told otherwise:
//! [`WalGenerator::switch_timeline`] continues on a new timeline from the
//! current position as a promoted server does, and [`WalGenerator::resume`]
//! starts after an existing record (a server promoted at a record end of
//! WAL it received).

use crate::lsn::{Lsn, PgTimelineId, WalSegmentSize};
use crate::wal::decoder::{DecodeStep, DecodedRecord, WalDecodeError, WalDecoder};
use crate::wal::format::{
    encode_record, is_switch_record, page_header_bytes, LongPageHeaderFields, PageHeader, PG15_PAGE_MAGIC,
    PG_FIRST_TIMELINE_ID, RECORD_ALIGN_BYTES, RM_XLOG_ID, WAL_PAGE_SIZE_BYTES, XLOG_SWITCH, XLP_BKP_REMOVABLE,
    XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER, XLR_BLOCK_ID_DATA_LONG, XLR_BLOCK_ID_DATA_SHORT,
};

/// Main data shorter than this uses the one-byte length form.
const SHORT_DATA_LIMIT_BYTES: usize = 256;
/// Bytes of the main-data block header: id + u8 length, or id + u32 length.
const SHORT_DATA_BLOCK_HEADER_BYTES: usize = 2;
const LONG_DATA_BLOCK_HEADER_BYTES: usize = 5;

/// Builds a WAL byte stream record by record.
#[derive(Clone, Debug)]
pub struct WalGenerator {
    system_id: u64,
    segment_size: WalSegmentSize,
    /// LSN just past the last byte written (the end of the last record).
    end: Lsn,
    /// Start of the last record, which the next record's `xl_prev` names.
    last_record_start: Lsn,
    /// Bytes written since the last `take_bytes`, starting at `pending_start`.
    pending: Vec<u8>,
    pending_start: Lsn,
    /// The `xlp_tli` of the page headers written from now on.
    timeline_id: PgTimelineId,
}

impl WalGenerator {
    /// New WAL starting at the segment start `start` (its first page gets a
    /// long header), for `system_id`, on Postgres timeline 1. The first
    /// record's `xl_prev` is 0/0 (it has no predecessor).
    pub fn new(system_id: u64, seg: WalSegmentSize, start: Lsn) -> Self {
        assert!(start.is_segment_start(seg), "WAL generation must start at a segment start, not {start}");
        WalGenerator {
            system_id,
            segment_size: seg,
            end: start,
            last_record_start: Lsn::INVALID,
            pending: Vec::new(),
            pending_start: start,
            timeline_id: PG_FIRST_TIMELINE_ID,
        }
    }

    /// Continue WAL that ends at the record end `end` (aligned), whose last
    /// record starts at `last_record_start` (the next `xl_prev`), on
    /// Postgres timeline `timeline_id`. If `end` is inside a page, that
    /// page's header was written before (by whoever wrote the bytes below
    /// `end`): the first bytes generated are the next record's.
    pub fn resume(
        system_id: u64,
        seg: WalSegmentSize,
        end: Lsn,
        last_record_start: Lsn,
        timeline_id: PgTimelineId,
    ) -> Self {
        assert_eq!(end, end.align_up(RECORD_ALIGN_BYTES), "WAL resumes at an aligned record end, not {end}");
        assert!(last_record_start < end, "the last record starts below its end");
        assert!(timeline_id != 0, "timeline id 0 is not a Postgres timeline");
        WalGenerator {
            system_id,
            segment_size: seg,
            end,
            last_record_start,
            pending: Vec::new(),
            pending_start: end,
            timeline_id,
        }
    }

    /// Continue on Postgres timeline `new_timeline` from the current
    /// position, as a server promoted here does: the switch point is the
    /// end of the last record (returned); the page holding it, if already
    /// begun, keeps its header, and every page begun from now on names
    /// `new_timeline`.
    pub fn switch_timeline(&mut self, new_timeline: PgTimelineId) -> Lsn {
        assert!(new_timeline > self.timeline_id, "timelines only go up: {} to {new_timeline}", self.timeline_id);
        self.timeline_id = new_timeline;
        self.end
    }

    /// The timeline the next page header will name.
    pub fn timeline_id(&self) -> PgTimelineId {
        self.timeline_id
    }

    /// Append one valid record whose main data is `payload`, carried in an
    /// `XLR_BLOCK_ID_DATA_SHORT`/`_LONG` block like real WAL (an empty payload
    /// means no data block, as in Postgres). Returns the record as the decoder
    /// reports it.
    pub fn append_record(&mut self, rmgr_id: u8, info: u8, xid: u32, payload: &[u8]) -> DecodedRecord {
        assert!(!is_switch_record(rmgr_id, info), "use append_switch for XLOG SWITCH");
        let body = main_data_block(payload);
        self.append_raw(rmgr_id, info, xid, &body)
    }

    /// Append an XLOG SWITCH record, then zeros (page headers included) up
    /// to the end of its segment. Its `end_lsn` is the next segment start.
    pub fn append_switch(&mut self) -> DecodedRecord {
        let mut record = self.append_raw(RM_XLOG_ID, XLOG_SWITCH, 0, &[]);
        let segment_end = self.end.next_segment_start(self.segment_size);
        // A switch whose header ends exactly at the segment end needs no fill.
        if !self.end.is_segment_start(self.segment_size) {
            self.write_zeros(segment_end - self.end);
        }
        record.end_lsn = self.end;
        record
    }

    /// Append `count` records with pseudo-random rmgr ids and payloads of
    /// 0..=`max_payload_bytes` bytes, all derived from `seed` (so a test can
    /// print the seed and replay). Never emits XLOG SWITCH.
    pub fn append_random_records(&mut self, count: usize, seed: u64, max_payload_bytes: usize) -> Vec<DecodedRecord> {
        let mut rng = SplitMix64(seed);
        let mut payload = Vec::new();
        (0..count)
            .map(|_| {
                let len = (rng.next() % (max_payload_bytes as u64 + 1)) as usize;
                payload.clear();
                payload.extend((0..len.div_ceil(8)).flat_map(|_| rng.next().to_le_bytes()).take(len));
                // Heap, Btree, Transaction and Heap2 dominate real WAL.
                let rmgr_id = [10, 11, 1, 9][(rng.next() % 4) as usize];
                let info = (rng.next() as u8) & 0x70;
                self.append_record(rmgr_id, info, rng.next() as u32, &payload)
            })
            .collect()
    }

    /// Bytes generated since the previous take, with the LSN of their first
    /// byte. They end at the last record's (aligned) end; the page header
    /// before the next record belongs to the next take.
    pub fn take_bytes(&mut self) -> (Lsn, Vec<u8>) {
        let start = self.pending_start;
        self.pending_start = self.end;
        (start, std::mem::take(&mut self.pending))
    }

    /// End of the last record (its `end_lsn`, the decoder's boundary).
    pub fn end_lsn(&self) -> Lsn {
        self.end
    }

    /// Start of the last record (what the next record's `xl_prev` names).
    pub fn last_record_start(&self) -> Lsn {
        self.last_record_start
    }

    pub fn system_id(&self) -> u64 {
        self.system_id
    }

    /// Write a record with `body` after its header, laid out across pages.
    fn append_raw(&mut self, rmgr_id: u8, info: u8, xid: u32, body: &[u8]) -> DecodedRecord {
        let aligned = self.end.align_up(RECORD_ALIGN_BYTES);
        self.write_zeros(aligned - self.end);
        if self.at_page_start() {
            self.write_page_header(0);
        }
        let start_lsn = self.end;
        let prev_lsn = self.last_record_start;
        let record = encode_record(rmgr_id, info, xid, prev_lsn, body);
        self.write_record_bytes(&record);
        self.last_record_start = start_lsn;
        // The padding to the next alignment belongs to this record, as
        // Postgres counts it (its EndRecPtr is aligned).
        let aligned_end = self.end.align_up(RECORD_ALIGN_BYTES);
        self.write_zeros(aligned_end - self.end);
        let total_len_bytes = record.len() as u32;
        DecodedRecord { start_lsn, end_lsn: self.end, prev_lsn, total_len_bytes, xid, rmgr_id, info }
    }

    /// Write a record, splitting it across pages; each continuation page's
    /// `xlp_rem_len` says how many of its bytes are still to come.
    fn write_record_bytes(&mut self, record: &[u8]) {
        let mut rest = record;
        while !rest.is_empty() {
            if self.at_page_start() {
                let continued = rest.len() < record.len();
                self.write_page_header(if continued { rest.len() as u32 } else { 0 });
            }
            let page_room = WAL_PAGE_SIZE_BYTES - self.end.block_offset(WAL_PAGE_SIZE_BYTES);
            let (now, later) = rest.split_at(rest.len().min(page_room as usize));
            self.pending.extend_from_slice(now);
            self.end = self.end + now.len() as u64;
            rest = later;
        }
    }

    fn write_page_header(&mut self, rem_len_bytes: u32) {
        let is_segment_start = self.end.is_segment_start(self.segment_size);
        let long = is_segment_start.then_some(LongPageHeaderFields {
            system_id: self.system_id,
            segment_size_bytes: self.segment_size.bytes() as u32,
            page_size_bytes: WAL_PAGE_SIZE_BYTES as u32,
        });
        let mut info = XLP_BKP_REMOVABLE;
        if is_segment_start {
            info |= XLP_LONG_HEADER;
        }
        if rem_len_bytes > 0 {
            info |= XLP_FIRST_IS_CONTRECORD;
        }
        let header = PageHeader {
            magic: PG15_PAGE_MAGIC,
            info,
            timeline_id: self.timeline_id,
            page_lsn: self.end,
            rem_len_bytes,
            long,
        };
        header.encode(&mut self.pending);
        self.end = self.end + page_header_bytes(is_segment_start);
    }

    fn write_zeros(&mut self, len: u64) {
        self.pending.resize(self.pending.len() + len as usize, 0);
        self.end = self.end + len;
    }

    fn at_page_start(&self) -> bool {
        self.end.block_offset(WAL_PAGE_SIZE_BYTES) == 0
    }
}

/// The main-data block Postgres appends after the header (and after any
/// block references, which generated records do not have).
fn main_data_block(payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + LONG_DATA_BLOCK_HEADER_BYTES);
    if payload.is_empty() {
        return body;
    }
    if payload.len() < SHORT_DATA_LIMIT_BYTES {
        body.push(XLR_BLOCK_ID_DATA_SHORT);
        body.push(payload.len() as u8);
        debug_assert_eq!(body.len(), SHORT_DATA_BLOCK_HEADER_BYTES);
    } else {
        body.push(XLR_BLOCK_ID_DATA_LONG);
        let len = u32::try_from(payload.len()).expect("payload length was bounded by MAX_RECORD_BYTES");
        body.extend_from_slice(&len.to_le_bytes());
        debug_assert_eq!(body.len(), LONG_DATA_BLOCK_HEADER_BYTES);
    }
    body.extend_from_slice(payload);
    body
}

/// Feed `bytes` (starting where `decoder` expects) in chunks of
/// 1..=`max_chunk_bytes` bytes drawn from `seed`, as a replication stream
/// might cut them; stop at the first error. Returns the records and the
/// last step or error.
pub fn decode_in_chunks(
    mut decoder: WalDecoder,
    bytes: &[u8],
    seed: u64,
    max_chunk_bytes: usize,
) -> (Vec<DecodedRecord>, Result<DecodeStep, WalDecodeError>) {
    assert!(max_chunk_bytes > 0);
    let mut rng = SplitMix64(seed);
    let mut records = Vec::new();
    let mut rest = bytes;
    let mut last = Ok(DecodeStep::NeedMoreInput);
    while !rest.is_empty() && last.is_ok() {
        let chunk_bytes = (1 + rng.next() % max_chunk_bytes as u64) as usize;
        let (chunk, later) = rest.split_at(chunk_bytes.min(rest.len()));
        rest = later;
        decoder.feed(chunk);
        last = decoder.decode_available(|record| records.push(record));
    }
    (records, last)
}

/// A tiny deterministic PRNG (SplitMix64) so generated WAL depends only on
/// the caller's seed, not on a `rand` version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::decoder::{DecodeStep, WalDecoder};

    fn decode_all(start: Lsn, seg: WalSegmentSize, bytes: &[u8]) -> Vec<DecodedRecord> {
        let mut decoder = WalDecoder::at_segment_start(start, seg);
        decoder.feed(bytes);
        let mut records = Vec::new();
        loop {
            match decoder.next_record().expect("generated WAL must decode") {
                DecodeStep::Record(record) => records.push(record),
                DecodeStep::NeedMoreInput | DecodeStep::EndOfWal { .. } => return records,
            }
        }
    }

    /// The generator's own account of each record matches what the decoder
    /// reads back, across page and segment boundaries and a switch.
    #[test]
    fn decoder_reads_back_generated_wal() {
        let seg = WalSegmentSize::new(1 << 20).unwrap();
        let start = Lsn(5 << 20);
        let mut generator = WalGenerator::new(7, seg, start);
        let mut expected = generator.append_random_records(200, 1, 9000);
        expected.push(generator.append_record(10, 0, 1, &vec![0xAB; 3 << 20]));
        expected.push(generator.append_switch());
        expected.push(generator.append_record(1, 0, 2, b"after switch"));
        let (from, bytes) = generator.take_bytes();
        assert_eq!(from, start);
        assert_eq!(from + bytes.len() as u64, generator.end_lsn());
        assert_eq!(decode_all(start, seg, &bytes), expected);
    }

    #[test]
    fn switch_ends_at_next_segment_and_chains() {
        let seg = WalSegmentSize::new(1 << 20).unwrap();
        let mut generator = WalGenerator::new(1, seg, Lsn(0));
        let first = generator.append_record(10, 0, 5, b"x");
        let switch = generator.append_switch();
        assert_eq!(switch.prev_lsn, first.start_lsn);
        assert_eq!(switch.end_lsn, Lsn(1 << 20));
        assert_eq!(generator.end_lsn(), Lsn(1 << 20));
        let next = generator.append_record(10, 0, 5, b"y");
        assert_eq!(next.start_lsn, Lsn((1 << 20) + 40), "first record after the long header");
        assert_eq!(next.prev_lsn, switch.start_lsn);
    }

    #[test]
    fn takes_are_contiguous_and_end_at_record_ends() {
        let seg = WalSegmentSize::DEFAULT;
        let mut generator = WalGenerator::new(1, seg, Lsn(0));
        let record = generator.append_record(10, 0, 5, b"abc");
        let (first_start, first) = generator.take_bytes();
        assert_eq!(first_start + first.len() as u64, record.end_lsn);
        let next = generator.append_record(10, 0, 5, &[1; 300]);
        let (second_start, second) = generator.take_bytes();
        assert_eq!(second_start, record.end_lsn);
        assert_eq!(second_start + second.len() as u64, next.end_lsn);
        assert_eq!(next.total_len_bytes as usize, 24 + 5 + 300);
    }

    /// The `xlp_tli` of every page header in `bytes` (which start at `start`).
    fn page_timelines(start: Lsn, bytes: &[u8]) -> Vec<(Lsn, u32)> {
        let first_page = start.align_up(WAL_PAGE_SIZE_BYTES);
        (first_page.0..start.0 + bytes.len() as u64)
            .step_by(WAL_PAGE_SIZE_BYTES as usize)
            .map(|page| {
                let at = (page - start.0) as usize + 4;
                (Lsn(page), u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()))
            })
            .collect()
    }

    /// A promoted server: the page holding the switch point keeps its old
    /// header, every later page names the new timeline, and the records
    /// chain across the switch.
    #[test]
    fn pages_after_a_timeline_switch_name_the_new_timeline() {
        let seg = WalSegmentSize::new(1 << 20).unwrap();
        let mut generator = WalGenerator::new(7, seg, Lsn(0));
        let mut expected = generator.append_random_records(40, 3, 5000);
        assert_ne!(generator.end_lsn().block_offset(WAL_PAGE_SIZE_BYTES), 0, "the switch is inside a page");
        let switch_lsn = generator.switch_timeline(2);
        assert_eq!(switch_lsn, generator.end_lsn());
        assert_eq!(generator.timeline_id(), 2);
        expected.extend(generator.append_random_records(300, 4, 9000));
        let (start, bytes) = generator.take_bytes();
        assert_eq!(decode_all(start, seg, &bytes), expected);
        let pages = page_timelines(start, &bytes);
        assert!(pages.iter().any(|&(page, _)| page.0 >= 1 << 20), "the new timeline reaches the next segment");
        for (page, timeline) in pages {
            let expected_timeline = if page < switch_lsn { 1 } else { 2 };
            assert_eq!(timeline, expected_timeline, "page {page}");
        }
    }

    /// A switch at a page boundary: that page is the new timeline's.
    #[test]
    fn a_switch_at_a_page_boundary_gives_that_page_the_new_timeline() {
        let seg = WalSegmentSize::new(1 << 20).unwrap();
        let mut generator = WalGenerator::new(7, seg, Lsn(0));
        // One record filling the first page exactly (a long header of 40 bytes).
        let filler = WAL_PAGE_SIZE_BYTES as usize - 40 - 24 - LONG_DATA_BLOCK_HEADER_BYTES;
        generator.append_record(10, 0, 1, &vec![1; filler]);
        assert_eq!(generator.end_lsn(), Lsn(WAL_PAGE_SIZE_BYTES));
        generator.switch_timeline(3);
        generator.append_record(10, 0, 2, b"first on timeline 3");
        let (start, bytes) = generator.take_bytes();
        assert_eq!(page_timelines(start, &bytes), vec![(Lsn(0), 1), (Lsn(WAL_PAGE_SIZE_BYTES), 3)]);
    }

    /// Resuming after a record end writes what the original generator
    /// would have written from there.
    #[test]
    fn a_resumed_generator_continues_the_same_wal() {
        let seg = WalSegmentSize::new(1 << 20).unwrap();
        let mut original = WalGenerator::new(7, seg, Lsn(1 << 20));
        let records = original.append_random_records(60, 5, 7000);
        let last = records.last().unwrap();
        let _ = original.take_bytes();
        let mut resumed = WalGenerator::resume(7, seg, last.end_lsn, last.start_lsn, 1);
        let continued = original.append_random_records(60, 6, 7000);
        assert_eq!(resumed.append_random_records(60, 6, 7000), continued);
        assert_eq!(resumed.take_bytes(), original.take_bytes());
    }
}
