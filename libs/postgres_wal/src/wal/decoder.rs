//! Incremental PG15 WAL decoder.
//!
//! Bytes go in with [`WalDecoder::feed`] in any chunking; complete,
//! CRC-checked records come out of [`WalDecoder::next_record`]. The decoder
//! checks everything a reader can check without knowing the resource
//! managers: every page header (magic, flags, address, timeline, segment and
//! page size, system id, continuation lengths), every record header (length
//! bounds, resource manager id, the `xl_prev` chain) and every record CRC.
//!
//! It keeps only the unconsumed input plus the 24-byte header of the record in
//! progress: record bodies are CRC'd as they stream past, so memory never
//! depends on a length read from the input. See docs/wal-format.md.

use std::fmt;

use std::sync::Arc;

use crate::lsn::{Lsn, PgTimelineId, WalSegmentSize};
use crate::timeline_history::PgTimelineHistory;
use crate::wal::format::{
    finish_record_crc, is_known_rmgr_id, is_switch_record, page_header_bytes, PageHeader, RecordHeader,
    MAX_RECORD_BYTES, PG15_PAGE_MAGIC, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES, WAL_PAGE_SIZE_BYTES, XLP_ALL_FLAGS,
    XLP_FIRST_IS_CONTRECORD, XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};

const RECORD_HEADER_LEN: usize = RECORD_HEADER_BYTES as usize;
/// `xl_tot_len` is the first field of a record header.
const TOT_LEN_BYTES: usize = 4;
/// Consumed input is kept until it is at least this large *and* at least as
/// large as the unconsumed part, so compaction costs O(1) per byte.
const MIN_COMPACT_BYTES: usize = 64 * 1024;
/// Spare input capacity above this (and above 4x the live input) is released
/// so one huge `feed` does not pin its memory forever.
const MAX_IDLE_CAPACITY_BYTES: usize = 1 << 20;

/// One complete, CRC-checked record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedRecord {
    /// LSN of the first byte of the record header.
    pub start_lsn: Lsn,
    /// End of the record as Postgres reports it (`EndRecPtr`): past its last
    /// byte and the alignment padding to 8 bytes after it; for XLOG SWITCH
    /// the start of the next segment.
    pub end_lsn: Lsn,
    pub prev_lsn: Lsn,
    pub total_len_bytes: u32,
    pub xid: u32,
    pub rmgr_id: u8,
    pub info: u8,
}

impl DecodedRecord {
    /// Is this an XLOG SWITCH (the rest of its segment is zero padding)?
    pub fn is_switch(&self) -> bool {
        is_switch_record(self.rmgr_id, self.info)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeStep {
    Record(DecodedRecord),
    /// Everything fed so far has been decoded; feed more bytes.
    NeedMoreInput,
    /// The normal end of WAL at `lsn`: a zero record length where a record
    /// should start, or an all-zero page header where a new page begins
    /// between records. Nothing is consumed; asking again gives the same.
    EndOfWal {
        lsn: Lsn,
    },
}

/// Why the WAL could not be decoded. `lsn` is where the problem was found:
/// the page start for page header problems, the record start for record
/// problems. After an error the decoder is stuck: every later call returns
/// the same error; restart a new decoder at [`WalDecoder::boundary_lsn`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalDecodeError {
    #[error(
        "WAL page at {lsn} has magic {found:#06X}, expected {:#06X} (PostgreSQL 15): not PG15 WAL, or corrupt",
        PG15_PAGE_MAGIC
    )]
    BadPageMagic { lsn: Lsn, found: u16 },
    #[error("WAL page at {lsn} has unknown header flags {found:#06X} (PG15 knows only {:#06X})", XLP_ALL_FLAGS)]
    UnknownPageFlags { lsn: Lsn, found: u16 },
    #[error("WAL page at {lsn} says it belongs at {found}: stale, misplaced or recycled WAL")]
    PageAddressMismatch { lsn: Lsn, found: Lsn },
    #[error("WAL page at {lsn}: {}", if *segment_start {
        "a segment's first page lacks the long header"
    } else {
        "a long header appears on a page that does not start a segment"
    })]
    MisplacedLongHeader { lsn: Lsn, segment_start: bool },
    #[error("WAL segment at {lsn} was written with {found}-byte segments, expected {expected}")]
    SegmentSizeMismatch { lsn: Lsn, expected: u64, found: u32 },
    #[error("WAL segment at {lsn} was written with {found}-byte pages, expected {expected}")]
    PageSizeMismatch { lsn: Lsn, expected: u64, found: u32 },
    #[error("WAL segment at {lsn} belongs to database system {found}, expected {expected}: WAL of another cluster")]
    SystemIdMismatch { lsn: Lsn, expected: u64, found: u64 },
    #[error("WAL page at {lsn} is on timeline {found}, after pages of timeline {previous}: timelines never go back")]
    TimelineWentBack { lsn: Lsn, previous: PgTimelineId, found: PgTimelineId },
    #[error("WAL page at {lsn} is on Postgres timeline {found}, but the timeline history says {expected}")]
    PageTimelineMismatch { lsn: Lsn, expected: PgTimelineId, found: PgTimelineId },
    #[error(
        "WAL page at {lsn} has xlp_rem_len {rem_len_bytes} but FIRST_IS_CONTRECORD {}",
        if *contrecord_flag { "set" } else { "clear" }
    )]
    InconsistentRemLen { lsn: Lsn, rem_len_bytes: u32, contrecord_flag: bool },
    #[error("WAL page at {lsn} continues a record ({rem_len_bytes} bytes left) but the previous record was complete")]
    UnexpectedContinuation { lsn: Lsn, rem_len_bytes: u32 },
    #[error("WAL page at {lsn} does not continue {}, which is incomplete", describe_record(*record_lsn))]
    MissingContinuation { lsn: Lsn, record_lsn: Option<Lsn> },
    #[error(
        "WAL page at {lsn} continues {} with {found} bytes left, expected {expected}",
        describe_record(*record_lsn)
    )]
    ContinuationLengthMismatch { lsn: Lsn, record_lsn: Option<Lsn>, expected: u32, found: u32 },
    #[error("WAL record at {lsn} claims {total_len_bytes} bytes, less than its {} byte header", RECORD_HEADER_BYTES)]
    RecordTooShort { lsn: Lsn, total_len_bytes: u32 },
    #[error("WAL record at {lsn} claims {total_len_bytes} bytes, more than Postgres's limit of {}", MAX_RECORD_BYTES)]
    RecordTooLong { lsn: Lsn, total_len_bytes: u32 },
    #[error("WAL record at {lsn} has resource manager id {rmgr_id}, which PG15 does not have")]
    UnknownRmgr { lsn: Lsn, rmgr_id: u8 },
    #[error("WAL record at {lsn} links back to {found}, but the previous record started at {expected}")]
    PrevLinkMismatch { lsn: Lsn, expected: Lsn, found: Lsn },
    #[error("WAL record at {lsn} fails its CRC: stored {stored:#010X}, computed {computed:#010X}")]
    CrcMismatch { lsn: Lsn, stored: u32, computed: u32 },
    #[error("WAL at {lsn} is not zero, but it lies in the padding after the XLOG SWITCH record at {switch_lsn}")]
    NonZeroSwitchPadding { lsn: Lsn, switch_lsn: Lsn },
}

fn describe_record(record_lsn: Option<Lsn>) -> String {
    match record_lsn {
        Some(lsn) => format!("the record at {lsn}"),
        None => "the record continued from before the decoding start".to_string(),
    }
}

impl WalDecodeError {
    /// Where the problem was found.
    pub fn lsn(&self) -> Lsn {
        use WalDecodeError::*;
        match self {
            BadPageMagic { lsn, .. }
            | UnknownPageFlags { lsn, .. }
            | PageAddressMismatch { lsn, .. }
            | MisplacedLongHeader { lsn, .. }
            | SegmentSizeMismatch { lsn, .. }
            | PageSizeMismatch { lsn, .. }
            | SystemIdMismatch { lsn, .. }
            | TimelineWentBack { lsn, .. }
            | PageTimelineMismatch { lsn, .. }
            | InconsistentRemLen { lsn, .. }
            | UnexpectedContinuation { lsn, .. }
            | MissingContinuation { lsn, .. }
            | ContinuationLengthMismatch { lsn, .. }
            | RecordTooShort { lsn, .. }
            | RecordTooLong { lsn, .. }
            | UnknownRmgr { lsn, .. }
            | PrevLinkMismatch { lsn, .. }
            | CrcMismatch { lsn, .. }
            | NonZeroSwitchPadding { lsn, .. } => *lsn,
        }
    }

    /// The record in progress when a continuation page was wrong, if known.
    pub fn record_lsn(&self) -> Option<Lsn> {
        match self {
            WalDecodeError::MissingContinuation { record_lsn, .. }
            | WalDecodeError::ContinuationLengthMismatch { record_lsn, .. } => *record_lsn,
            _ => None,
        }
    }
}

/// A record whose bytes are still arriving.
#[derive(Clone, Debug)]
struct PartialRecord {
    start_lsn: Lsn,
    total_len_bytes: u32,
    /// Record bytes consumed so far, header included (page headers not).
    consumed_bytes: u32,
    header: [u8; RECORD_HEADER_LEN],
    /// `crc32c_append` state over the body bytes consumed so far.
    body_crc: u32,
}

impl PartialRecord {
    fn remaining_bytes(&self) -> u32 {
        self.total_len_bytes - self.consumed_bytes
    }
}

#[derive(Clone, Debug)]
enum Phase {
    /// At the first page of the first segment: a continuation found there
    /// began in a segment we do not have, and is skipped.
    SegmentStart,
    /// Skipping the tail of a record that began before our start.
    SkipContinuation {
        remaining_bytes: u32,
    },
    /// Between records: alignment padding, then a record header.
    RecordStart,
    InRecord(PartialRecord),
    /// After an XLOG SWITCH: zeros, page headers included, up to `end`.
    SwitchPadding {
        switch_lsn: Lsn,
        end: Lsn,
    },
}

/// What one step of the decoding loop achieved.
enum Progress {
    Continue,
    Stop(DecodeStep),
}

/// See the module docs. Cloning copies the unconsumed input.
#[derive(Clone)]
pub struct WalDecoder {
    segment_size: WalSegmentSize,
    phase: Phase,
    /// Input bytes; `input[input_head..]` is not consumed yet.
    input: Vec<u8>,
    input_head: usize,
    /// LSN of `input[input_head]`: the next byte to decode.
    position: Lsn,
    boundary: Lsn,
    /// Start of the last record decoded, which the next `xl_prev` must name.
    expected_prev: Option<Lsn>,
    timeline_id: Option<PgTimelineId>,
    /// When set, every page header must name the timeline this history
    /// gives for the page's first byte (the page holding a switch point was
    /// begun by the old timeline and keeps its header).
    timelines: Option<Arc<PgTimelineHistory>>,
    system_id: Option<u64>,
    failed: Option<WalDecodeError>,
}

impl fmt::Debug for WalDecoder {
    // The input buffer can be megabytes; show positions instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalDecoder")
            .field("phase", &self.phase)
            .field("position", &self.position)
            .field("boundary", &self.boundary)
            .field("input_end", &self.input_end_lsn())
            .field("expected_prev", &self.expected_prev)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl WalDecoder {
    /// Start at the first byte of a segment (its long page header). A
    /// continuation record at the start (XLP_FIRST_IS_CONTRECORD) is skipped:
    /// it began in the previous segment, which we do not have.
    pub fn at_segment_start(lsn: Lsn, seg: WalSegmentSize) -> Self {
        assert!(lsn.is_segment_start(seg), "at_segment_start given {lsn}, which is not a segment start");
        Self::new(lsn, seg, Phase::SegmentStart)
    }

    /// Start at a record boundary: `lsn` is the end of a complete record
    /// (possibly unaligned), or a segment start following an XLOG SWITCH. The
    /// next record begins at `lsn` rounded up to 8, or after the page header
    /// if that is a page start. The first record's `xl_prev` is not checked.
    pub fn at_record_boundary(lsn: Lsn, seg: WalSegmentSize) -> Self {
        Self::new(lsn, seg, Phase::RecordStart)
    }

    /// Check the next record's `xl_prev` against `prev_record_lsn`, the
    /// start of the record before this boundary when the caller knows it
    /// (a decoder restarted mid-log otherwise cannot, and would accept a
    /// record from another history). Only on a fresh record-boundary decoder.
    pub fn expect_prev_record(&mut self, prev_record_lsn: Lsn) {
        assert!(
            matches!(self.phase, Phase::RecordStart) && self.input.is_empty() && self.expected_prev.is_none(),
            "expect_prev_record is for a decoder just created at a record boundary"
        );
        self.expected_prev = Some(prev_record_lsn);
    }

    fn new(lsn: Lsn, seg: WalSegmentSize, phase: Phase) -> Self {
        WalDecoder {
            segment_size: seg,
            phase,
            input: Vec::new(),
            input_head: 0,
            position: lsn,
            boundary: lsn,
            expected_prev: None,
            timeline_id: None,
            timelines: None,
            system_id: None,
            failed: None,
        }
    }

    /// Check every page header from here on against `history` (see
    /// [`WalDecodeError::PageTimelineMismatch`]).
    pub fn check_timelines(&mut self, history: Arc<PgTimelineHistory>) {
        self.timelines = Some(history);
    }

    /// Append the next bytes of the stream; they start at `input_end_lsn()`.
    pub fn feed(&mut self, bytes: &[u8]) {
        let unconsumed = self.input.len() - self.input_head;
        if self.input_head >= MIN_COMPACT_BYTES.max(unconsumed) {
            self.input.drain(..self.input_head);
            self.input_head = 0;
        }
        let live = self.input.len() + bytes.len();
        if self.input.capacity() > MAX_IDLE_CAPACITY_BYTES.max(4 * live) {
            self.input.shrink_to(live);
        }
        self.input.extend_from_slice(bytes);
    }

    /// Decode the next record if all of it has been fed.
    pub fn next_record(&mut self) -> Result<DecodeStep, WalDecodeError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        loop {
            let step = if self.at_page_header() { self.read_page_header() } else { self.decode_in_page() };
            match step {
                Ok(Progress::Continue) => {}
                Ok(Progress::Stop(step)) => return Ok(step),
                Err(error) => {
                    self.failed = Some(error.clone());
                    return Err(error);
                }
            }
        }
    }

    /// Decode every complete record fed so far, handing each to
    /// `on_record`; returns the step that stopped it (`NeedMoreInput` or
    /// `EndOfWal`), or the first error.
    pub fn decode_available(&mut self, mut on_record: impl FnMut(DecodedRecord)) -> Result<DecodeStep, WalDecodeError> {
        loop {
            match self.next_record()? {
                DecodeStep::Record(record) => on_record(record),
                step => return Ok(step),
            }
        }
    }

    /// The restart point after the last record returned: its `end_lsn`.
    /// For an XLOG SWITCH that is the next segment start, but only once the
    /// padding up to it has been fed and consumed; until then it stays at the
    /// boundary before the switch (so a restart decodes the switch again).
    /// Before any record it is the constructor's position. A decoder built
    /// with `at_record_boundary(boundary_lsn())` decodes the same records
    /// that this one would return next.
    ///
    /// Record ends are 8-byte aligned like Postgres's EndRecPtr (its flush
    /// LSN and the LSN a commit waits for are too), so a safekeeper that
    /// acknowledges this LSN releases the commit Postgres is waiting for.
    /// While only part of the alignment padding has been fed, the boundary
    /// is the end of the input (a restart there aligns up the same way).
    pub fn boundary_lsn(&self) -> Lsn {
        self.boundary.min(self.input_end_lsn())
    }

    /// LSN just past the last byte fed.
    pub fn input_end_lsn(&self) -> Lsn {
        self.position + (self.input.len() - self.input_head) as u64
    }

    /// The system id from the first long page header seen, if any.
    pub fn system_id(&self) -> Option<u64> {
        self.system_id
    }

    /// The timeline of the last page header seen, if any.
    pub fn timeline_id(&self) -> Option<PgTimelineId> {
        self.timeline_id
    }

    fn unconsumed(&self) -> &[u8] {
        &self.input[self.input_head..]
    }

    fn consume(&mut self, len: usize) {
        debug_assert!(len <= self.input.len() - self.input_head);
        self.input_head += len;
        self.position = self.position + len as u64;
        if self.input_head == self.input.len() {
            self.input.clear();
            self.input_head = 0;
        }
    }

    /// Bytes from the position to the end of its page.
    fn page_room(&self) -> usize {
        (WAL_PAGE_SIZE_BYTES - self.position.block_offset(WAL_PAGE_SIZE_BYTES)) as usize
    }

    /// Is the next input a page header? Switch padding swallows headers.
    fn at_page_header(&self) -> bool {
        self.position.block_offset(WAL_PAGE_SIZE_BYTES) == 0 && !matches!(self.phase, Phase::SwitchPadding { .. })
    }

    fn read_page_header(&mut self) -> Result<Progress, WalDecodeError> {
        let page_lsn = self.position;
        let header_len = page_header_bytes(page_lsn.is_segment_start(self.segment_size)) as usize;
        let Some(bytes) = self.unconsumed().get(..header_len) else {
            return Ok(Progress::Stop(DecodeStep::NeedMoreInput));
        };
        let between_records = matches!(self.phase, Phase::SegmentStart | Phase::RecordStart);
        // Preallocated or zeroed WAL past the end: the normal end, when no
        // record is waiting for its continuation.
        if between_records && bytes.iter().all(|&byte| byte == 0) {
            return Ok(Progress::Stop(DecodeStep::EndOfWal { lsn: page_lsn }));
        }
        let header = PageHeader::parse(bytes);
        self.check_page_header(&header)?;
        self.follow_continuation(&header)?;
        self.timeline_id = Some(header.timeline_id);
        if let Some(long) = header.long {
            self.system_id = Some(long.system_id);
        }
        self.consume(header_len);
        Ok(Progress::Continue)
    }

    /// Checks that do not depend on the record in progress.
    fn check_page_header(&self, header: &PageHeader) -> Result<(), WalDecodeError> {
        let lsn = self.position;
        if header.magic != PG15_PAGE_MAGIC {
            return Err(WalDecodeError::BadPageMagic { lsn, found: header.magic });
        }
        if header.info & !XLP_ALL_FLAGS != 0 {
            return Err(WalDecodeError::UnknownPageFlags { lsn, found: header.info });
        }
        if header.page_lsn != lsn {
            return Err(WalDecodeError::PageAddressMismatch { lsn, found: header.page_lsn });
        }
        let segment_start = lsn.is_segment_start(self.segment_size);
        if (header.info & XLP_LONG_HEADER != 0) != segment_start {
            return Err(WalDecodeError::MisplacedLongHeader { lsn, segment_start });
        }
        if let Some(previous) = self.timeline_id {
            if header.timeline_id < previous {
                return Err(WalDecodeError::TimelineWentBack { lsn, previous, found: header.timeline_id });
            }
        }
        if let Some(history) = &self.timelines {
            let expected = history.timeline_of(lsn);
            if header.timeline_id != expected {
                return Err(WalDecodeError::PageTimelineMismatch { lsn, expected, found: header.timeline_id });
            }
        }
        if let Some(long) = header.long {
            if u64::from(long.segment_size_bytes) != self.segment_size.bytes() {
                let expected = self.segment_size.bytes();
                return Err(WalDecodeError::SegmentSizeMismatch { lsn, expected, found: long.segment_size_bytes });
            }
            if u64::from(long.page_size_bytes) != WAL_PAGE_SIZE_BYTES {
                let expected = WAL_PAGE_SIZE_BYTES;
                return Err(WalDecodeError::PageSizeMismatch { lsn, expected, found: long.page_size_bytes });
            }
            if let Some(expected) = self.system_id.filter(|&known| known != long.system_id) {
                return Err(WalDecodeError::SystemIdMismatch { lsn, expected, found: long.system_id });
            }
        }
        let contrecord_flag = header.info & XLP_FIRST_IS_CONTRECORD != 0;
        let rem_len_bytes = header.rem_len_bytes;
        if contrecord_flag != (rem_len_bytes != 0) || u64::from(rem_len_bytes) > MAX_RECORD_BYTES {
            return Err(WalDecodeError::InconsistentRemLen { lsn, rem_len_bytes, contrecord_flag });
        }
        Ok(())
    }

    /// Match the page's continuation fields against the record in progress.
    fn follow_continuation(&mut self, header: &PageHeader) -> Result<(), WalDecodeError> {
        let lsn = self.position;
        let continues = header.info & XLP_FIRST_IS_CONTRECORD != 0;
        let found = header.rem_len_bytes;
        let (expected, record_lsn) = match &self.phase {
            Phase::SegmentStart => {
                self.phase =
                    if continues { Phase::SkipContinuation { remaining_bytes: found } } else { Phase::RecordStart };
                return Ok(());
            }
            Phase::RecordStart if continues => {
                return Err(WalDecodeError::UnexpectedContinuation { lsn, rem_len_bytes: found });
            }
            Phase::RecordStart => return Ok(()),
            Phase::SkipContinuation { remaining_bytes } => (*remaining_bytes, None),
            Phase::InRecord(record) => (record.remaining_bytes(), Some(record.start_lsn)),
            Phase::SwitchPadding { .. } => {
                unreachable!("switch padding has no page headers to read")
            }
        };
        if !continues {
            if header.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
                // Postgres lost this record's tail in a crash and wrote new
                // WAL over it (PG15's "missing contrecord" handling): drop
                // the partial record, as Postgres's reader does. The boundary
                // and the xl_prev expectation stay at the last whole record.
                self.phase = Phase::RecordStart;
                return Ok(());
            }
            return Err(WalDecodeError::MissingContinuation { lsn, record_lsn });
        }
        if found != expected {
            return Err(WalDecodeError::ContinuationLengthMismatch { lsn, record_lsn, expected, found });
        }
        Ok(())
    }

    /// One step inside a page (the position is not at a page header).
    fn decode_in_page(&mut self) -> Result<Progress, WalDecodeError> {
        let room = self.page_room().min(self.unconsumed().len());
        match &mut self.phase {
            Phase::SegmentStart => unreachable!("a segment start is always a page start"),
            Phase::SkipContinuation { remaining_bytes } => {
                let len = room.min(*remaining_bytes as usize);
                if len == 0 {
                    return Ok(Progress::Stop(DecodeStep::NeedMoreInput));
                }
                *remaining_bytes -= len as u32;
                if *remaining_bytes == 0 {
                    self.phase = Phase::RecordStart;
                }
                self.consume(len);
                Ok(Progress::Continue)
            }
            Phase::RecordStart => self.start_record(),
            Phase::InRecord(_) => self.continue_record(room),
            Phase::SwitchPadding { switch_lsn, end } => {
                let (switch_lsn, end) = (*switch_lsn, *end);
                self.consume_switch_padding(switch_lsn, end)
            }
        }
    }

    /// Skip alignment padding, then read `xl_tot_len` of the next record.
    fn start_record(&mut self) -> Result<Progress, WalDecodeError> {
        let padding = (self.position.align_up(RECORD_ALIGN_BYTES) - self.position) as usize;
        if padding > 0 {
            let len = padding.min(self.unconsumed().len());
            if len == 0 {
                return Ok(Progress::Stop(DecodeStep::NeedMoreInput));
            }
            // Not checked for zeros: Postgres never writes these bytes.
            self.consume(len);
            return Ok(Progress::Continue);
        }
        let lsn = self.position;
        let Some(len_bytes) = self.unconsumed().get(..TOT_LEN_BYTES) else {
            return Ok(Progress::Stop(DecodeStep::NeedMoreInput));
        };
        let total_len_bytes = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if total_len_bytes == 0 {
            return Ok(Progress::Stop(DecodeStep::EndOfWal { lsn }));
        }
        if u64::from(total_len_bytes) < RECORD_HEADER_BYTES {
            return Err(WalDecodeError::RecordTooShort { lsn, total_len_bytes });
        }
        if u64::from(total_len_bytes) > MAX_RECORD_BYTES {
            return Err(WalDecodeError::RecordTooLong { lsn, total_len_bytes });
        }
        self.phase = Phase::InRecord(PartialRecord {
            start_lsn: lsn,
            total_len_bytes,
            consumed_bytes: 0,
            header: [0; RECORD_HEADER_LEN],
            body_crc: 0,
        });
        Ok(Progress::Continue)
    }

    /// Take up to `room` bytes (this page's share of the input) of the
    /// record in progress; finish it when complete.
    fn continue_record(&mut self, room: usize) -> Result<Progress, WalDecodeError> {
        let Phase::InRecord(record) = &mut self.phase else {
            unreachable!("continue_record outside a record");
        };
        let len = room.min(record.remaining_bytes() as usize);
        if len == 0 {
            return Ok(Progress::Stop(DecodeStep::NeedMoreInput));
        }
        let chunk = &self.input[self.input_head..self.input_head + len];
        let header_done = record.consumed_bytes as usize;
        let mut body = chunk;
        if header_done < RECORD_HEADER_LEN {
            let take = len.min(RECORD_HEADER_LEN - header_done);
            record.header[header_done..header_done + take].copy_from_slice(&chunk[..take]);
            body = &chunk[take..];
            if header_done + take == RECORD_HEADER_LEN {
                // Reject a bad header before streaming a possibly huge body.
                check_record_header(record, self.expected_prev)?;
            }
        }
        record.body_crc = crc32c::crc32c_append(record.body_crc, body);
        record.consumed_bytes += len as u32;
        let complete = record.remaining_bytes() == 0;
        self.consume(len);
        if complete {
            return self.finish_record().map(|record| Progress::Stop(DecodeStep::Record(record)));
        }
        Ok(Progress::Continue)
    }

    fn finish_record(&mut self) -> Result<DecodedRecord, WalDecodeError> {
        let Phase::InRecord(record) = &self.phase else {
            unreachable!("finish_record outside a record");
        };
        let header = RecordHeader::parse(&record.header);
        let computed = finish_record_crc(record.body_crc, &record.header);
        let start_lsn = record.start_lsn;
        if computed != header.crc {
            return Err(WalDecodeError::CrcMismatch { lsn: start_lsn, stored: header.crc, computed });
        }
        // Like Postgres's EndRecPtr, the end includes the alignment padding.
        let mut end_lsn = self.position.align_up(RECORD_ALIGN_BYTES);
        self.expected_prev = Some(start_lsn);
        self.phase = Phase::RecordStart;
        if is_switch_record(header.rmgr_id, header.info) && !end_lsn.is_segment_start(self.segment_size) {
            end_lsn = end_lsn.next_segment_start(self.segment_size);
            self.phase = Phase::SwitchPadding { switch_lsn: start_lsn, end: end_lsn };
        } else {
            self.boundary = end_lsn;
        }
        Ok(DecodedRecord {
            start_lsn,
            end_lsn,
            prev_lsn: header.prev_lsn,
            total_len_bytes: header.total_len_bytes,
            xid: header.xid,
            rmgr_id: header.rmgr_id,
            info: header.info,
        })
    }

    fn consume_switch_padding(&mut self, switch_lsn: Lsn, end: Lsn) -> Result<Progress, WalDecodeError> {
        let want = usize::try_from(end - self.position).unwrap_or(usize::MAX);
        let len = want.min(self.unconsumed().len());
        if len == 0 {
            return Ok(Progress::Stop(DecodeStep::NeedMoreInput));
        }
        let padding = &self.unconsumed()[..len];
        // `all` vectorises; find the offending byte only on failure.
        if !padding.iter().all(|&byte| byte == 0) {
            let offset = padding.iter().position(|&byte| byte != 0).unwrap_or(0);
            return Err(WalDecodeError::NonZeroSwitchPadding { lsn: self.position + offset as u64, switch_lsn });
        }
        self.consume(len);
        if self.position == end {
            self.boundary = end;
            self.phase = Phase::RecordStart;
        }
        Ok(Progress::Continue)
    }
}

/// Header checks that need only the header and the previous record.
fn check_record_header(record: &PartialRecord, expected_prev: Option<Lsn>) -> Result<(), WalDecodeError> {
    let header = RecordHeader::parse(&record.header);
    let lsn = record.start_lsn;
    debug_assert_eq!(header.total_len_bytes, record.total_len_bytes);
    if !is_known_rmgr_id(header.rmgr_id) {
        return Err(WalDecodeError::UnknownRmgr { lsn, rmgr_id: header.rmgr_id });
    }
    if let Some(expected) = expected_prev.filter(|&expected| expected != header.prev_lsn) {
        return Err(WalDecodeError::PrevLinkMismatch { lsn, expected, found: header.prev_lsn });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::{
        encode_record, PageHeader, PG_FIRST_TIMELINE_ID, SHORT_PAGE_HEADER_BYTES, XLP_BKP_REMOVABLE,
    };
    use crate::wal::generator::{decode_in_chunks, WalGenerator};
    use proptest::prelude::*;

    const PAGE: usize = WAL_PAGE_SIZE_BYTES as usize;

    fn seg_1mib() -> WalSegmentSize {
        WalSegmentSize::new(1 << 20).unwrap()
    }

    fn drain(decoder: &mut WalDecoder, out: &mut Vec<DecodedRecord>) -> Result<DecodeStep, WalDecodeError> {
        decoder.decode_available(|record| out.push(record))
    }

    fn decode_all(decoder: WalDecoder, bytes: &[u8]) -> (Vec<DecodedRecord>, Result<DecodeStep, WalDecodeError>) {
        decode_in_chunks(decoder, bytes, 0, bytes.len().max(1))
    }

    fn first_error(decoder: WalDecoder, bytes: &[u8]) -> WalDecodeError {
        match decode_all(decoder, bytes).1 {
            Err(error) => error,
            Ok(step) => panic!("expected an error, got {step:?}"),
        }
    }

    /// Several segments of WAL: small records, records spanning pages, one
    /// spanning a segment boundary, an XLOG SWITCH, more records after it.
    fn sample_wal() -> (Lsn, Vec<u8>, Vec<DecodedRecord>) {
        let start = Lsn(3 << 20);
        let mut generator = WalGenerator::new(99, seg_1mib(), start);
        let mut records = generator.append_random_records(300, 42, 3000);
        records.push(generator.append_record(10, 0x10, 7, &vec![0x5A; 1_500_000]));
        records.extend(generator.append_random_records(50, 43, 300));
        records.push(generator.append_switch());
        records.extend(generator.append_random_records(50, 44, 20_000));
        let (from, bytes) = generator.take_bytes();
        assert_eq!(from, start);
        (start, bytes, records)
    }

    /// Base WAL for the error tests, at 0/0 with 1 MiB segments:
    /// r1 at 0/28, r2 at 0/50 spanning pages 0/2000 and 0/4000, filler, a
    /// switch and one record in the second segment.
    fn error_wal() -> (Vec<u8>, Vec<DecodedRecord>) {
        let mut generator = WalGenerator::new(7, seg_1mib(), Lsn(0));
        let mut records =
            vec![generator.append_record(10, 0, 1, &[1; 10]), generator.append_record(10, 0, 2, &[2; 20_000])];
        records.extend(generator.append_random_records(50, 5, 400));
        records.push(generator.append_switch());
        records.push(generator.append_record(1, 0, 3, b"next segment"));
        assert_eq!(records[0].start_lsn, Lsn(0x28));
        assert_eq!(records[1].start_lsn, Lsn(0x50));
        assert!(records[1].end_lsn > Lsn(2 * PAGE as u64 + 24));
        (generator.take_bytes().1, records)
    }

    fn from_start() -> WalDecoder {
        WalDecoder::at_segment_start(Lsn(0), seg_1mib())
    }

    /// Rule: chunking of the input never changes the output.
    #[test]
    fn any_chunking_decodes_the_same() {
        let (start, bytes, expected) = sample_wal();
        let decoder = WalDecoder::at_segment_start(start, seg_1mib());
        let (whole, step) = decode_all(decoder.clone(), &bytes);
        assert_eq!(whole, expected);
        assert_eq!(step, Ok(DecodeStep::NeedMoreInput));
        for seed in 0..4 {
            assert_eq!(decode_in_chunks(decoder.clone(), &bytes, seed, 20_000).0, expected, "seed {seed}");
        }
        // One byte at a time over the first part (the whole is slow in debug).
        let head = &bytes[..200_000];
        let (by_byte, _) = decode_in_chunks(decoder, head, 1, 1);
        assert!(!by_byte.is_empty());
        assert_eq!(by_byte[..], expected[..by_byte.len()]);
        assert!(by_byte.len() + 1 >= expected.iter().filter(|r| r.end_lsn <= start + head.len() as u64).count());
    }

    /// Rule: a record header may straddle a page; its first 8 bytes fit.
    #[test]
    fn record_header_straddling_a_page() {
        let mut generator = WalGenerator::new(1, seg_1mib(), Lsn(0));
        // From 0/28, a record of 8144 bytes ends 8 bytes before the page end.
        let filler_payload_bytes = PAGE - 40 - 8 - 24 - 5;
        let first = generator.append_record(10, 0, 1, &vec![3; filler_payload_bytes]);
        let straddling = generator.append_record(11, 0, 2, b"straddles");
        let after = generator.append_record(11, 0, 3, b"after");
        assert_eq!(straddling.start_lsn, Lsn(PAGE as u64 - 8));
        let (_, bytes) = generator.take_bytes();
        let (records, _) = decode_in_chunks(from_start(), &bytes, 9, 13);
        assert_eq!(records, vec![first, straddling, after]);
    }

    /// Rule: a record may span whole segments; a decoder started in the
    /// middle skips the continuation, which may itself span segments.
    #[test]
    fn record_spanning_segments_and_skipped_continuation() {
        let seg = seg_1mib();
        let mut generator = WalGenerator::new(1, seg, Lsn(0));
        let huge = generator.append_record(10, 0, 1, &vec![9; 2_500_000]);
        let next = generator.append_record(10, 0, 2, b"next");
        let (_, bytes) = generator.take_bytes();
        assert_eq!(huge.start_lsn.segment_no(seg).0, 0);
        assert_eq!(huge.end_lsn.segment_no(seg).0, 2);
        assert_eq!(decode_in_chunks(from_start(), &bytes, 3, 100_000).0, vec![huge, next.clone()]);

        let middle = 1 << 20;
        let (records, step) = decode_all(WalDecoder::at_segment_start(Lsn(middle as u64), seg), &bytes[middle..]);
        assert_eq!(records, vec![next]);
        assert_eq!(step, Ok(DecodeStep::NeedMoreInput));
    }

    /// Rule: after XLOG SWITCH the rest of the segment is zero padding; the
    /// boundary moves to the next segment only once all of it is consumed.
    #[test]
    fn switch_padding_moves_boundary_at_segment_end() {
        let seg = seg_1mib();
        let mut generator = WalGenerator::new(1, seg, Lsn(0));
        let before = generator.append_record(10, 0, 1, b"before");
        let switch = generator.append_switch();
        let after = generator.append_record(10, 0, 2, b"after");
        let (_, bytes) = generator.take_bytes();
        assert!(switch.is_switch());
        assert_eq!(switch.end_lsn, Lsn(1 << 20));

        let mut decoder = from_start();
        let switch_raw_end = (switch.start_lsn.0 + RECORD_HEADER_BYTES) as usize;
        decoder.feed(&bytes[..switch_raw_end + 100]);
        let mut records = Vec::new();
        assert_eq!(drain(&mut decoder, &mut records), Ok(DecodeStep::NeedMoreInput));
        assert_eq!(records, vec![before.clone(), switch.clone()]);
        assert_eq!(decoder.boundary_lsn(), before.end_lsn, "padding not consumed yet");

        let segment_end = 1 << 20;
        decoder.feed(&bytes[switch_raw_end + 100..segment_end - 1]);
        assert_eq!(drain(&mut decoder, &mut records), Ok(DecodeStep::NeedMoreInput));
        assert_eq!(decoder.boundary_lsn(), before.end_lsn);
        decoder.feed(&bytes[segment_end - 1..]);
        assert_eq!(drain(&mut decoder, &mut records), Ok(DecodeStep::NeedMoreInput));
        assert_eq!(records, vec![before.clone(), switch.clone(), after.clone()]);

        // Restarting at the boundary before the switch decodes it again;
        // at the segment start, the record after it (xl_prev unchecked).
        let (again, _) =
            decode_all(WalDecoder::at_record_boundary(before.end_lsn, seg), &bytes[before.end_lsn.0 as usize..]);
        assert_eq!(again, vec![switch, after.clone()]);
        let (again, _) = decode_all(WalDecoder::at_record_boundary(Lsn(1 << 20), seg), &bytes[segment_end..]);
        assert_eq!(again, vec![after]);
    }

    /// Rule: restarting at boundary_lsn() decodes the same following records.
    #[test]
    fn restart_at_any_boundary_decodes_the_same() {
        let (start, bytes, expected) = sample_wal();
        let seg = seg_1mib();
        let mut decoder = WalDecoder::at_segment_start(start, seg);
        decoder.feed(&bytes);
        for (index, want) in expected.iter().enumerate() {
            assert_eq!(decoder.next_record(), Ok(DecodeStep::Record(want.clone())));
            if !want.is_switch() {
                assert_eq!(decoder.boundary_lsn(), want.end_lsn);
            }
            if index % 37 != 0 && !want.is_switch() {
                continue;
            }
            let offset = (want.end_lsn - start) as usize;
            let (rest, _) = decode_all(WalDecoder::at_record_boundary(want.end_lsn, seg), &bytes[offset..]);
            assert_eq!(rest, expected[index + 1..], "restart after record {index} at {}", want.end_lsn);
        }
    }

    /// Rule: a zero xl_tot_len, or a zeroed page header between records, is
    /// the end of WAL; nothing is consumed and the answer repeats.
    #[test]
    fn zeros_are_end_of_wal() {
        let (bytes, records) = error_wal();
        let first_end = records[0].end_lsn;
        let mut decoder = from_start();
        decoder.feed(&bytes[..first_end.0 as usize]);
        decoder.feed(&[0; 16]);
        let mut out = Vec::new();
        let end = first_end.align_up(RECORD_ALIGN_BYTES);
        assert_eq!(drain(&mut decoder, &mut out), Ok(DecodeStep::EndOfWal { lsn: end }));
        assert_eq!(decoder.next_record(), Ok(DecodeStep::EndOfWal { lsn: end }));
        assert_eq!(decoder.boundary_lsn(), first_end);
        assert_eq!(out, records[..1]);

        for page in [Lsn(3 * PAGE as u64), Lsn(1 << 20)] {
            let mut decoder = WalDecoder::at_record_boundary(page, seg_1mib());
            decoder.feed(&[0; 40]);
            assert_eq!(decoder.next_record(), Ok(DecodeStep::EndOfWal { lsn: page }));
            assert_eq!(decoder.next_record(), Ok(DecodeStep::EndOfWal { lsn: page }));
        }
    }

    /// Rule: input is dropped once consumed; a record body is never buffered.
    #[test]
    fn memory_stays_bounded_while_streaming_a_huge_record() {
        let mut generator = WalGenerator::new(1, seg_1mib(), Lsn(0));
        generator.append_record(10, 0, 1, &vec![4; 5_000_000]);
        let (_, bytes) = generator.take_bytes();
        let mut decoder = from_start();
        let mut records = Vec::new();
        for chunk in bytes.chunks(PAGE) {
            decoder.feed(chunk);
            drain(&mut decoder, &mut records).unwrap();
            assert!(decoder.input.capacity() <= MAX_IDLE_CAPACITY_BYTES.max(4 * PAGE));
        }
        assert_eq!(records.len(), 1);
    }

    /// Postgres's missing-contrecord handling: a page flagged
    /// FIRST_IS_OVERWRITE_CONTRECORD drops the partial record before it.
    #[test]
    fn overwritten_continuation_drops_the_partial_record() {
        let (bytes, records) = error_wal();
        let page = Lsn(PAGE as u64);
        let mut wal = bytes[..PAGE].to_vec();
        let header = PageHeader {
            magic: PG15_PAGE_MAGIC,
            info: XLP_FIRST_IS_OVERWRITE_CONTRECORD | XLP_BKP_REMOVABLE,
            timeline_id: PG_FIRST_TIMELINE_ID,
            page_lsn: page,
            rem_len_bytes: 0,
            long: None,
        };
        header.encode(&mut wal);
        let overwrite = encode_record(
            0,
            0xD0,
            0,
            records[0].start_lsn,
            &[0xFF, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        wal.extend_from_slice(&overwrite);
        let (decoded, step) = decode_in_chunks(from_start(), &wal, 4, 3000);
        assert_eq!(step, Ok(DecodeStep::NeedMoreInput));
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0], records[0]);
        assert_eq!(decoded[1].start_lsn, page + SHORT_PAGE_HEADER_BYTES);
        assert_eq!(decoded[1].prev_lsn, records[0].start_lsn);
    }

    /// Apply `corrupt` to a copy of the error WAL and decode it from 0/0.
    fn corrupted(corrupt: impl FnOnce(&mut Vec<u8>)) -> WalDecodeError {
        let (mut bytes, _) = error_wal();
        corrupt(&mut bytes);
        first_error(from_start(), &bytes)
    }

    fn set_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn page_header_errors() {
        use WalDecodeError::*;
        let page = PAGE;
        let page_lsn = Lsn(page as u64);
        assert_eq!(corrupted(|b| b[page] ^= 0xFF), BadPageMagic { lsn: page_lsn, found: PG15_PAGE_MAGIC ^ 0xFF });
        let flags = XLP_FIRST_IS_CONTRECORD | XLP_BKP_REMOVABLE;
        assert_eq!(corrupted(|b| b[page + 2] |= 0x10), UnknownPageFlags { lsn: page_lsn, found: flags | 0x10 });
        assert_eq!(corrupted(|b| b[page + 9] ^= 0x40), PageAddressMismatch { lsn: page_lsn, found: Lsn(0x6000) });
        assert_eq!(corrupted(|b| b[page + 2] |= 0x02), MisplacedLongHeader { lsn: page_lsn, segment_start: false });
        assert_eq!(corrupted(|b| b[2] &= !0x02), MisplacedLongHeader { lsn: Lsn(0), segment_start: true });
        let (bytes, _) = error_wal();
        let two_mib = WalSegmentSize::new(2 << 20).unwrap();
        assert_eq!(
            first_error(WalDecoder::at_segment_start(Lsn(0), two_mib), &bytes),
            SegmentSizeMismatch { lsn: Lsn(0), expected: 2 << 20, found: 1 << 20 }
        );
        assert_eq!(corrupted(|b| b[36] ^= 1), PageSizeMismatch { lsn: Lsn(0), expected: 8192, found: 8193 });
        let second = 1 << 20;
        assert_eq!(
            corrupted(|b| b[second + 24] ^= 1),
            SystemIdMismatch { lsn: Lsn(second as u64), expected: 7, found: 6 }
        );
        assert_eq!(
            corrupted(|b| b[page + 4] = 2),
            TimelineWentBack { lsn: Lsn(2 * page as u64), previous: 2, found: 1 }
        );
    }

    #[test]
    fn continuation_errors() {
        use WalDecodeError::*;
        let (bytes, records) = error_wal();
        let page = PAGE;
        let page_lsn = Lsn(page as u64);
        let r2 = &records[1];
        let rem_len = r2.total_len_bytes - (page as u32 - r2.start_lsn.0 as u32);
        let record_lsn = Some(r2.start_lsn);
        assert_eq!(
            corrupted(|b| set_u32(b, page + 16, 0)),
            InconsistentRemLen { lsn: page_lsn, rem_len_bytes: 0, contrecord_flag: true }
        );
        assert_eq!(
            corrupted(|b| {
                b[page + 2] &= !(XLP_FIRST_IS_CONTRECORD as u8);
                set_u32(b, page + 16, 0);
            }),
            MissingContinuation { lsn: page_lsn, record_lsn }
        );
        assert_eq!(
            corrupted(|b| set_u32(b, page + 16, rem_len + 8)),
            ContinuationLengthMismatch { lsn: page_lsn, record_lsn, expected: rem_len, found: rem_len + 8 }
        );
        assert_eq!(
            first_error(WalDecoder::at_record_boundary(page_lsn, seg_1mib()), &bytes[page..]),
            UnexpectedContinuation { lsn: page_lsn, rem_len_bytes: rem_len }
        );
        // While skipping a continuation the record's start is unknown.
        let mut skipped = bytes.clone();
        skipped[2] |= XLP_FIRST_IS_CONTRECORD as u8;
        set_u32(&mut skipped, 16, (page - 40) as u32 + rem_len + 16);
        assert_eq!(
            first_error(from_start(), &skipped),
            ContinuationLengthMismatch { lsn: page_lsn, record_lsn: None, expected: rem_len + 16, found: rem_len }
        );
    }

    #[test]
    fn record_errors() {
        use WalDecodeError::*;
        let (bytes, records) = error_wal();
        let r1 = records[0].start_lsn.0 as usize;
        let r2 = records[1].start_lsn.0 as usize;
        let lsn = Lsn(r1 as u64);
        assert_eq!(corrupted(|b| set_u32(b, r1, 5)), RecordTooShort { lsn, total_len_bytes: 5 });
        assert_eq!(corrupted(|b| set_u32(b, r1, u32::MAX)), RecordTooLong { lsn, total_len_bytes: u32::MAX });
        assert_eq!(corrupted(|b| b[r1 + 17] = 50), UnknownRmgr { lsn, rmgr_id: 50 });
        assert_eq!(
            corrupted(|b| b[r2 + 8] ^= 1),
            PrevLinkMismatch { lsn: Lsn(r2 as u64), expected: lsn, found: Lsn(lsn.0 ^ 1) }
        );
        let error = corrupted(|b| b[r2 + 100] ^= 1);
        assert!(matches!(error, CrcMismatch { lsn, .. } if lsn == Lsn(r2 as u64)), "{error}");
        // A flipped bit in the CRC-covered header part is caught too.
        let error = corrupted(|b| b[r2 + 4] ^= 1);
        assert!(matches!(error, CrcMismatch { lsn, .. } if lsn == Lsn(r2 as u64)), "{error}");

        let switch = records.iter().find(|r| r.is_switch()).unwrap();
        let bad = switch.start_lsn.0 as usize + 24 + 3 * PAGE;
        assert_eq!(
            corrupted(|b| b[bad] = 1),
            NonZeroSwitchPadding { lsn: Lsn(bad as u64), switch_lsn: switch.start_lsn }
        );
        // Errors are sticky and every variant names where it was found.
        let mut decoder = from_start();
        let mut broken = bytes.clone();
        broken[r2 + 100] ^= 1;
        decoder.feed(&broken);
        let mut out = Vec::new();
        let error = drain(&mut decoder, &mut out).unwrap_err();
        assert_eq!(decoder.next_record(), Err(error.clone()));
        assert_eq!(error.lsn(), Lsn(r2 as u64));
        assert_eq!(decoder.boundary_lsn(), records[0].end_lsn);
        assert!(error.to_string().contains(&Lsn(r2 as u64).to_string()), "{error}");
    }

    /// Ad-hoc throughput check: `cargo test --release -p safekeeper
    /// decoder_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn decoder_throughput() {
        let seg = WalSegmentSize::DEFAULT;
        let mut generator = WalGenerator::new(1, seg, Lsn(0));
        while generator.end_lsn() < Lsn(256 << 20) {
            generator.append_random_records(1000, generator.end_lsn().0, 400);
        }
        let (_, bytes) = generator.take_bytes();
        let started = std::time::Instant::now();
        let mut decoder = from_seg(seg);
        let mut count = 0usize;
        for chunk in bytes.chunks(128 * 1024) {
            decoder.feed(chunk);
            while let Ok(DecodeStep::Record(_)) = decoder.next_record() {
                count += 1;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{count} records, {} MiB in {seconds:.3} s: {:.0} MiB/s",
            bytes.len() >> 20,
            (bytes.len() >> 20) as f64 / seconds
        );
    }

    fn from_seg(seg: WalSegmentSize) -> WalDecoder {
        WalDecoder::at_segment_start(Lsn(0), seg)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Rule: no input makes the decoder panic or loop.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20_000), seed: u64, boundary in 0u64..(4 << 20)) {
            let _ = decode_in_chunks(from_start(), &bytes, seed, 5000);
            let _ = decode_in_chunks(WalDecoder::at_record_boundary(Lsn(boundary), seg_1mib()), &bytes, seed, 5000);
        }

        /// Rule: corrupting valid WAL yields an error or fewer records, and
        /// whatever is returned is a prefix of the real records.
        #[test]
        fn corrupted_wal_yields_a_prefix(flips in proptest::collection::vec((0usize..60_000, any::<u8>()), 1..4), seed: u64) {
            let (mut bytes, records) = error_wal();
            bytes.truncate(60_000);
            for (at, value) in flips {
                bytes[at] = value;
            }
            let (decoded, _) = decode_in_chunks(from_start(), &bytes, seed, 9000);
            prop_assert_eq!(&decoded[..], &records[..decoded.len()]);
        }
    }
}
