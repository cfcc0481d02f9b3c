//! Byte layout constants of PG15 WAL (see docs/wal-format.md).

/// WAL page size (`XLOG_BLCKSZ`).
pub const WAL_PAGE_SIZE_BYTES: u64 = 8192;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 15.
pub const PG15_PAGE_MAGIC: u16 = 0xD110;
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
