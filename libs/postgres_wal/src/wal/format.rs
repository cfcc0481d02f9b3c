//! Byte layout of PG15 WAL (see docs/wal-format.md): constants plus the two
//! fixed-size headers, parsed and encoded in one place so the decoder and the
//! generator cannot disagree about them.

use crate::lsn::{Lsn, PgTimelineId};

/// WAL page size (`XLOG_BLCKSZ`).
pub const WAL_PAGE_SIZE_BYTES: u64 = 8192;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 15.
pub const PG15_PAGE_MAGIC: u16 = 0xD110;
/// `PG_VERSION_NUM` of the PostgreSQL major version whose WAL we speak.
pub const PG15_VERSION_NUM: u32 = 150000;
pub const SHORT_PAGE_HEADER_BYTES: u64 = 24;
pub const LONG_PAGE_HEADER_BYTES: u64 = 40;
pub const RECORD_HEADER_BYTES: u64 = 24;
/// Records start at multiples of this (`MAXALIGN`).
pub const RECORD_ALIGN_BYTES: u64 = 8;

/// Page header `xlp_info` flags (PG15 values).
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub const XLP_LONG_HEADER: u16 = 0x0002;
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// Resource manager id of XLOG and the info bits of XLOG SWITCH.
pub const RM_XLOG_ID: u8 = 0;
pub const XLOG_SWITCH: u8 = 0x40;
/// The high nibble of `xl_info` is rmgr-specific; the low one is generic.
pub const XLR_RMGR_INFO_MASK: u8 = 0xF0;
/// Largest record Postgres will write (`XLogRecordMaxSize`, 1020 MiB).
pub const MAX_RECORD_BYTES: u64 = 1020 * 1024 * 1024;
/// Highest built-in resource manager id in PG15 (RM_MAX_BUILTIN_ID).
pub const MAX_BUILTIN_RMGR_ID: u8 = 21;
/// Custom resource managers use ids 128..=255.
pub const MIN_CUSTOM_RMGR_ID: u8 = 128;

/// Block ids that introduce the record's main data after the header
/// (`XLR_BLOCK_ID_DATA_SHORT`: one length byte; `..._LONG`: a u32 length).
pub const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
pub const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
/// Timeline id of a freshly initialised cluster.
pub const PG_FIRST_TIMELINE_ID: PgTimelineId = 1;

/// Bytes of the record header covered by `xl_crc` (everything before it).
pub const RECORD_HEADER_CRC_COVERED_BYTES: usize = 20;

const _: () = assert!(SHORT_PAGE_HEADER_BYTES.is_multiple_of(RECORD_ALIGN_BYTES));
const _: () = assert!(LONG_PAGE_HEADER_BYTES.is_multiple_of(RECORD_ALIGN_BYTES));
const _: () = assert!(WAL_PAGE_SIZE_BYTES.is_multiple_of(RECORD_ALIGN_BYTES));
// A record's xl_tot_len (its first 4 bytes) always fits on the page where the
// record starts, because records and pages are both 8-byte aligned.
const _: () = assert!(RECORD_ALIGN_BYTES >= 4);

/// Is this record an XLOG SWITCH (the rest of its segment is zero padding)?
pub fn is_switch_record(rmgr_id: u8, info: u8) -> bool {
    rmgr_id == RM_XLOG_ID && info & XLR_RMGR_INFO_MASK == XLOG_SWITCH
}

/// Resource manager ids PG15 can write: built-ins and the custom range.
pub fn is_known_rmgr_id(rmgr_id: u8) -> bool {
    rmgr_id <= MAX_BUILTIN_RMGR_ID || rmgr_id >= MIN_CUSTOM_RMGR_ID
}

/// PG15's built-in resource managers by id (src/include/access/rmgrlist.h).
pub const PG15_RMGR_NAMES: [&str; MAX_BUILTIN_RMGR_ID as usize + 1] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// Prefix of custom resource manager names; pg_waldump prints them as
/// `custom128` .. `custom255`.
const CUSTOM_RMGR_PREFIX: &str = "custom";

/// The name pg_waldump prints for a resource manager id. Ids between the
/// built-in and custom ranges are not valid WAL (the decoder rejects them);
/// they get a name anyway so that naming never fails.
pub fn rmgr_name(rmgr_id: u8) -> String {
    match PG15_RMGR_NAMES.get(usize::from(rmgr_id)) {
        Some(name) => (*name).to_string(),
        None if rmgr_id >= MIN_CUSTOM_RMGR_ID => format!("{CUSTOM_RMGR_PREFIX}{rmgr_id:03}"),
        None => format!("unknown{rmgr_id}"),
    }
}

/// The id behind a name [`rmgr_name`] produced for valid WAL.
pub fn rmgr_id_by_name(name: &str) -> Option<u8> {
    if let Some(id) = PG15_RMGR_NAMES.iter().position(|known| *known == name) {
        return u8::try_from(id).ok();
    }
    let id: u8 = name.strip_prefix(CUSTOM_RMGR_PREFIX)?.parse().ok()?;
    // Only the canonical spelling, so every id has exactly one name.
    (id >= MIN_CUSTOM_RMGR_ID && rmgr_name(id) == name).then_some(id)
}

/// Size of the page header at `page_lsn` (long at segment starts).
pub fn page_header_bytes(is_segment_start: bool) -> u64 {
    if is_segment_start {
        LONG_PAGE_HEADER_BYTES
    } else {
        SHORT_PAGE_HEADER_BYTES
    }
}

/// The extra fields of the long page header at the start of each segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPageHeaderFields {
    pub system_id: u64,
    pub segment_size_bytes: u32,
    pub page_size_bytes: u32,
}

/// `XLogPageHeaderData` (+ `XLogLongPageHeaderData` fields when `long` is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub timeline_id: PgTimelineId,
    pub page_lsn: Lsn,
    /// Bytes of a record continued from the previous page (`xlp_rem_len`).
    pub rem_len_bytes: u32,
    pub long: Option<LongPageHeaderFields>,
}

impl PageHeader {
    /// Parse a header of exactly `page_header_bytes(long)` bytes; the caller
    /// chooses the size by position, the flags are validated separately.
    pub fn parse(bytes: &[u8]) -> PageHeader {
        assert!(
            bytes.len() as u64 == SHORT_PAGE_HEADER_BYTES || bytes.len() as u64 == LONG_PAGE_HEADER_BYTES,
            "page header parse given {} bytes",
            bytes.len()
        );
        let long = (bytes.len() as u64 == LONG_PAGE_HEADER_BYTES).then(|| LongPageHeaderFields {
            system_id: le_u64(bytes, 24),
            segment_size_bytes: le_u32(bytes, 32),
            page_size_bytes: le_u32(bytes, 36),
        });
        PageHeader {
            magic: le_u16(bytes, 0),
            info: le_u16(bytes, 2),
            timeline_id: le_u32(bytes, 4),
            page_lsn: Lsn(le_u64(bytes, 8)),
            rem_len_bytes: le_u32(bytes, 16),
            long,
        }
    }

    /// Append the on-disk bytes (24 or 40) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.magic.to_le_bytes());
        out.extend_from_slice(&self.info.to_le_bytes());
        out.extend_from_slice(&self.timeline_id.to_le_bytes());
        out.extend_from_slice(&self.page_lsn.0.to_le_bytes());
        out.extend_from_slice(&self.rem_len_bytes.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        if let Some(long) = self.long {
            out.extend_from_slice(&long.system_id.to_le_bytes());
            out.extend_from_slice(&long.segment_size_bytes.to_le_bytes());
            out.extend_from_slice(&long.page_size_bytes.to_le_bytes());
        }
    }
}

/// `XLogRecord`, the fixed 24-byte record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub total_len_bytes: u32,
    pub xid: u32,
    pub prev_lsn: Lsn,
    pub info: u8,
    pub rmgr_id: u8,
    pub crc: u32,
}

impl RecordHeader {
    pub fn parse(bytes: &[u8; RECORD_HEADER_BYTES as usize]) -> RecordHeader {
        RecordHeader {
            total_len_bytes: le_u32(bytes, 0),
            xid: le_u32(bytes, 4),
            prev_lsn: Lsn(le_u64(bytes, 8)),
            info: bytes[16],
            rmgr_id: bytes[17],
            crc: le_u32(bytes, 20),
        }
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_BYTES as usize] {
        let mut out = [0u8; RECORD_HEADER_BYTES as usize];
        out[0..4].copy_from_slice(&self.total_len_bytes.to_le_bytes());
        out[4..8].copy_from_slice(&self.xid.to_le_bytes());
        out[8..16].copy_from_slice(&self.prev_lsn.0.to_le_bytes());
        out[16] = self.info;
        out[17] = self.rmgr_id;
        out[20..24].copy_from_slice(&self.crc.to_le_bytes());
        out
    }
}

/// Finish a record CRC the way Postgres does: the CRC runs over the record
/// body first (`data_crc` is `crc32c_append(0, body)`), then over the header
/// up to but excluding `xl_crc`.
pub fn finish_record_crc(data_crc: u32, header: &[u8; RECORD_HEADER_BYTES as usize]) -> u32 {
    crc32c::crc32c_append(data_crc, &header[..RECORD_HEADER_CRC_COVERED_BYTES])
}

/// A whole record: its header (CRC filled in) followed by `body`.
pub fn encode_record(rmgr_id: u8, info: u8, xid: u32, prev_lsn: Lsn, body: &[u8]) -> Vec<u8> {
    let total_len = RECORD_HEADER_BYTES + body.len() as u64;
    assert!(total_len <= MAX_RECORD_BYTES, "record of {total_len} bytes exceeds Postgres's limit");
    let mut header = RecordHeader { total_len_bytes: total_len as u32, xid, prev_lsn, info, rmgr_id, crc: 0 };
    header.crc = finish_record_crc(crc32c::crc32c(body), &header.encode());
    let mut record = Vec::with_capacity(total_len as usize);
    record.extend_from_slice(&header.encode());
    record.extend_from_slice(body);
    record
}

/// Little-endian reads at fixed offsets of fixed-size headers; callers pass
/// slices whose length was checked, so an out-of-range offset is a bug.
fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let page = PageHeader {
            magic: PG15_PAGE_MAGIC,
            info: XLP_LONG_HEADER | XLP_BKP_REMOVABLE,
            timeline_id: 3,
            page_lsn: Lsn(0x0100_0000),
            rem_len_bytes: 77,
            long: Some(LongPageHeaderFields { system_id: 42, segment_size_bytes: 1 << 24, page_size_bytes: 8192 }),
        };
        let mut bytes = Vec::new();
        page.encode(&mut bytes);
        assert_eq!(bytes.len() as u64, LONG_PAGE_HEADER_BYTES);
        assert_eq!(PageHeader::parse(&bytes), page);

        let record = RecordHeader { total_len_bytes: 99, xid: 7, prev_lsn: Lsn(0x28), info: 0x10, rmgr_id: 10, crc: 5 };
        assert_eq!(RecordHeader::parse(&record.encode()), record);
    }

    #[test]
    fn switch_and_rmgr_classification() {
        assert!(is_switch_record(RM_XLOG_ID, XLOG_SWITCH | 0x01));
        assert!(!is_switch_record(RM_XLOG_ID, 0x00));
        assert!(!is_switch_record(10, XLOG_SWITCH));
        assert!(is_known_rmgr_id(21) && is_known_rmgr_id(128) && !is_known_rmgr_id(22) && !is_known_rmgr_id(127));
    }
}
