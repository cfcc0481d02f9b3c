//! Log sequence numbers and the Postgres WAL segment arithmetic built on them.
//!
//! An LSN is a byte position in the WAL stream. Postgres prints it as two
//! upper-case hex halves, `X/Y`; segment files are named
//! `TTTTTTTTXXXXXXXXYYYYYYYY` (timeline, then the segment number split into
//! "log id" and "segment within the log id", each as 8 hex digits).

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A byte position in the WAL.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// A WAL timeline id as Postgres numbers them (1 for a fresh cluster).
pub type PgTimelineId = u32;

/// Postgres's smallest and largest allowed `wal_segment_size`.
pub const MIN_WAL_SEGMENT_SIZE_BYTES: u64 = 1 << 20;
pub const MAX_WAL_SEGMENT_SIZE_BYTES: u64 = 1 << 30;
/// The default segment size (16 MiB).
pub const DEFAULT_WAL_SEGMENT_SIZE_BYTES: u64 = 16 << 20;
/// Length of a segment file name: 24 hex digits.
pub const SEGMENT_FILE_NAME_LEN: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsnParseError {
    #[error("invalid LSN {input:?}: expected two hex numbers separated by '/', like \"0/16B3748\"")]
    Malformed { input: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentNameError {
    #[error("invalid WAL segment file name {input:?}: expected 24 hex digits TTTTTTTTXXXXXXXXYYYYYYYY")]
    Malformed { input: String },
    #[error(
        "invalid WAL segment file name {input:?}: segment part {low:#X} is out of range for {segment_size_bytes}-byte segments"
    )]
    OutOfRange { input: String, low: u32, segment_size_bytes: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid WAL segment size {0} bytes: must be a power of two between 1 MiB and 1 GiB")]
pub struct BadSegmentSize(pub u64);

/// A validated WAL segment size (a power of two between 1 MiB and 1 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct WalSegmentSize(u64);

impl WalSegmentSize {
    pub const DEFAULT: WalSegmentSize = WalSegmentSize(DEFAULT_WAL_SEGMENT_SIZE_BYTES);

    pub fn new(bytes: u64) -> Result<Self, BadSegmentSize> {
        let in_range = (MIN_WAL_SEGMENT_SIZE_BYTES..=MAX_WAL_SEGMENT_SIZE_BYTES).contains(&bytes);
        if in_range && bytes.is_power_of_two() {
            Ok(WalSegmentSize(bytes))
        } else {
            Err(BadSegmentSize(bytes))
        }
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Segments per 4 GiB "log id" in a file name (`0x100000000 / size`).
    fn segments_per_log_id(self) -> u64 {
        0x1_0000_0000 / self.0
    }
}

/// Postgres's default, 16 MiB.
impl Default for WalSegmentSize {
    fn default() -> Self {
        WalSegmentSize::DEFAULT
    }
}

impl TryFrom<u64> for WalSegmentSize {
    type Error = BadSegmentSize;
    fn try_from(bytes: u64) -> Result<Self, BadSegmentSize> {
        WalSegmentSize::new(bytes)
    }
}

impl From<WalSegmentSize> for u64 {
    fn from(size: WalSegmentSize) -> u64 {
        size.0
    }
}

/// A segment number: LSN / segment size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    pub fn segment_no(self, size: WalSegmentSize) -> SegmentNo {
        SegmentNo(self.0 / size.bytes())
    }

    pub fn segment_offset(self, size: WalSegmentSize) -> u64 {
        self.0 % size.bytes()
    }

    pub fn is_segment_start(self, size: WalSegmentSize) -> bool {
        self.segment_offset(size) == 0
    }

    /// The first byte of the segment that holds this LSN.
    pub fn segment_start(self, size: WalSegmentSize) -> Lsn {
        Lsn(self.0 - self.segment_offset(size))
    }

    /// The first byte of the next segment. Panics past the end of the LSN
    /// space instead of wrapping to a small LSN (callers check positions a
    /// client names with [`Lsn::checked_next_segment_start`]).
    pub fn next_segment_start(self, size: WalSegmentSize) -> Lsn {
        self.checked_next_segment_start(size).expect("LSN overflow: no segment after the last one")
    }

    /// The first byte of the next segment, or `None` past the end of the LSN space.
    pub fn checked_next_segment_start(self, size: WalSegmentSize) -> Option<Lsn> {
        self.segment_start(size).checked_add(size.bytes())
    }

    pub fn block_offset(self, block_size_bytes: u64) -> u64 {
        self.0 % block_size_bytes
    }

    /// Round up to a multiple of `align` (a power of two). Panics instead
    /// of wrapping past the end of the LSN space.
    pub fn align_up(self, align: u64) -> Lsn {
        assert!(align.is_power_of_two(), "alignment {align} is not a power of two");
        let bumped = self.0.checked_add(align - 1).expect("LSN overflow while aligning");
        Lsn(bumped & !(align - 1))
    }

    pub fn checked_sub(self, other: Lsn) -> Option<u64> {
        self.0.checked_sub(other.0)
    }

    /// `self + bytes`, or `None` past the end of the LSN space (for
    /// positions a client named: `+` panics on overflow).
    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }
}

impl SegmentNo {
    /// Panics instead of wrapping when the segment lies past the end of
    /// the LSN space (segment numbers from file names are checked on parse).
    pub fn start_lsn(self, size: WalSegmentSize) -> Lsn {
        Lsn(self.0.checked_mul(size.bytes()).expect("segment number beyond the LSN space"))
    }

    /// Postgres's segment file name for this segment on `timeline`.
    pub fn file_name(self, timeline: PgTimelineId, size: WalSegmentSize) -> String {
        let per_log_id = size.segments_per_log_id();
        format!("{:08X}{:08X}{:08X}", timeline, self.0 / per_log_id, self.0 % per_log_id)
    }

    /// Parse a segment file name back into (timeline, segment number).
    pub fn parse_file_name(name: &str, size: WalSegmentSize) -> Result<(PgTimelineId, SegmentNo), SegmentNameError> {
        let malformed = || SegmentNameError::Malformed { input: name.to_string() };
        let is_hex = name.len() == SEGMENT_FILE_NAME_LEN && name.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex {
            return Err(malformed());
        }
        let part = |range: std::ops::Range<usize>| u32::from_str_radix(&name[range], 16).map_err(|_| malformed());
        let timeline = part(0..8)?;
        let log_id = part(8..16)?;
        let low = part(16..24)?;
        let per_log_id = size.segments_per_log_id();
        if u64::from(low) >= per_log_id {
            return Err(SegmentNameError::OutOfRange {
                input: name.to_string(),
                low,
                segment_size_bytes: size.bytes(),
            });
        }
        Ok((timeline, SegmentNo(u64::from(log_id) * per_log_id + u64::from(low))))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let malformed = || LsnParseError::Malformed { input: input.to_string() };
        let (high, low) = input.split_once('/').ok_or_else(malformed)?;
        let half = |s: &str| {
            let valid = !s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit());
            if valid {
                u32::from_str_radix(s, 16).map_err(|_| malformed())
            } else {
                Err(malformed())
            }
        };
        Ok(Lsn((u64::from(half(high)?) << 32) | u64::from(half(low)?)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, bytes: u64) -> Lsn {
        Lsn(self.0.checked_add(bytes).expect("LSN overflow"))
    }
}

impl Sub<Lsn> for Lsn {
    type Output = u64;
    /// Distance in bytes; panics if `other` is ahead (a programming error).
    fn sub(self, other: Lsn) -> u64 {
        self.0.checked_sub(other.0).expect("LSN subtraction went negative")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// LSN arithmetic never wraps: past the end of the LSN space it is
    /// `None` (checked forms) or a panic, never a small LSN.
    #[test]
    fn arithmetic_past_the_end_of_the_lsn_space_does_not_wrap() {
        let size = WalSegmentSize::new(16 << 20).unwrap();
        let last_segment = Lsn(u64::MAX).segment_start(size);
        assert_eq!(last_segment.checked_next_segment_start(size), None);
        assert_eq!(Lsn(u64::MAX - 3).checked_add(4), None);
        assert!(std::panic::catch_unwind(|| Lsn(u64::MAX - 3).align_up(8)).is_err());
        assert!(std::panic::catch_unwind(|| last_segment.next_segment_start(size)).is_err());
        assert!(std::panic::catch_unwind(|| SegmentNo(u64::MAX).start_lsn(size)).is_err());
        assert_eq!(Lsn(u64::MAX - 7).align_up(8), Lsn(u64::MAX - 7));
    }

    #[test]
    fn prints_like_postgres() {
        assert_eq!(Lsn(0x16B3748).to_string(), "0/16B3748");
        assert_eq!(Lsn(0x1_0000_00AB).to_string(), "1/AB");
        assert_eq!(Lsn(0).to_string(), "0/0");
    }

    #[test]
    fn parses_and_names_bad_input() {
        assert_eq!("0/16B3748".parse::<Lsn>().unwrap(), Lsn(0x16B3748));
        assert_eq!("1/ab".parse::<Lsn>().unwrap(), Lsn(0x1_0000_00AB));
        for bad in ["", "/", "0/", "/1", "0x1/2", "1/2/3", "123456789/0", "g/0", " 0/1", "0/1 "] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err} should name {bad:?}");
        }
    }

    #[test]
    fn segment_names_match_postgres() {
        let size = WalSegmentSize::DEFAULT;
        // 0/3000000 is segment 3 of timeline 1: 000000010000000000000003.
        let seg = Lsn(0x300_0000).segment_no(size);
        assert_eq!(seg.file_name(1, size), "000000010000000000000003");
        // 1/0 with 16 MiB segments is log id 1, segment 0.
        assert_eq!(Lsn(0x1_0000_0000).segment_no(size).file_name(1, size), "000000010000000100000000");
        let small = WalSegmentSize::new(1 << 20).unwrap();
        assert_eq!(Lsn(0x1_0FF0_0000).segment_no(small).file_name(2, small), "0000000200000001000000FF");
    }

    #[test]
    fn rejects_bad_segment_names_and_sizes() {
        let size = WalSegmentSize::DEFAULT;
        assert!(SegmentNo::parse_file_name("00000001000000000000000", size).is_err());
        assert!(SegmentNo::parse_file_name("00000001000000000000000G", size).is_err());
        // 16 MiB segments allow only 0..=0xFF in the low part.
        assert!(matches!(
            SegmentNo::parse_file_name("000000010000000000000100", size),
            Err(SegmentNameError::OutOfRange { .. })
        ));
        for bad in [0, 1000, 3 << 20, 2 << 30] {
            assert!(WalSegmentSize::new(bad).is_err());
        }
    }

    proptest! {
        #[test]
        fn lsn_text_round_trips(raw in any::<u64>()) {
            let lsn = Lsn(raw);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }

        #[test]
        fn lsn_parser_never_panics(text in ".{0,24}") {
            let _ = text.parse::<Lsn>();
        }

        #[test]
        fn segment_names_round_trip(seg in 0u64..(1 << 40), tli in 1u32.., shift in 20u32..=30) {
            let size = WalSegmentSize::new(1 << shift).unwrap();
            let seg = SegmentNo(seg % (u64::MAX / size.bytes()));
            let name = seg.file_name(tli, size);
            prop_assert_eq!(SegmentNo::parse_file_name(&name, size).unwrap(), (tli, seg));
            let start = seg.start_lsn(size);
            prop_assert_eq!(start.segment_no(size), seg);
            prop_assert!(start.is_segment_start(size));
        }
    }
}
