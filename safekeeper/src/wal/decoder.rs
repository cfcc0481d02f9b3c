//! Incremental PG15 WAL decoder. API is fixed; body filled in by the WAL task.
use crate::lsn::{Lsn, WalSegmentSize};

/// One complete, CRC-checked record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedRecord {
    /// LSN of the first byte of the record header.
    pub start_lsn: Lsn,
    /// LSN just past the record's last byte (Postgres's EndRecPtr); for XLOG
    /// SWITCH this is the start of the next segment, as in Postgres.
    pub end_lsn: Lsn,
    pub prev_lsn: Lsn,
    pub total_len_bytes: u32,
    pub xid: u32,
    pub rmgr_id: u8,
    pub info: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeStep {
    Record(DecodedRecord),
    /// Everything fed so far has been decoded; feed more bytes.
    NeedMoreInput,
    /// A zero record length at `lsn`: the normal end of WAL.
    EndOfWal { lsn: Lsn },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalDecodeError {
    #[error("placeholder at {lsn}")]
    Placeholder { lsn: Lsn },
}

#[derive(Clone, Debug)]
pub struct WalDecoder {
    _seg: WalSegmentSize,
}

impl WalDecoder {
    pub fn at_segment_start(_lsn: Lsn, seg: WalSegmentSize) -> Self {
        WalDecoder { _seg: seg }
    }
    pub fn at_record_boundary(_lsn: Lsn, seg: WalSegmentSize) -> Self {
        WalDecoder { _seg: seg }
    }
    pub fn feed(&mut self, _bytes: &[u8]) {}
    pub fn next_record(&mut self) -> Result<DecodeStep, WalDecodeError> {
        Ok(DecodeStep::NeedMoreInput)
    }
    pub fn boundary_lsn(&self) -> Lsn {
        Lsn(0)
    }
    pub fn input_end_lsn(&self) -> Lsn {
        Lsn(0)
    }
}
