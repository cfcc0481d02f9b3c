//! Decoding the pulled bytes: the shared WAL decoder plus the counters, kept
//! so that what is saved is exactly what a restart will not decode again.
//!
//! The decoder's boundary (where a restarted decoder resumes) normally
//! follows each record's end, with one exception: after an XLOG SWITCH it
//! stays before the switch until the zero padding up to the next segment
//! has been fed, so a restart there decodes the switch again. A record is
//! therefore *settled* (counted in the saved state) only once the boundary
//! has passed its start; until then it is counted for display only. That is
//! what makes counts over a restart equal the counts of a single run.

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::wal::{DecodeStep, DecodedRecord, WalDecodeError, WalDecoder};

use crate::stats::WalStats;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("undecodable WAL: {0}")]
    Decode(#[from] WalDecodeError),
    #[error(
        "committed WAL at {lsn} is zeros where a record should start, yet the safekeeper committed WAL up to \
         {input_end_lsn}: the WAL is not valid there"
    )]
    ZerosInsideCommittedWal { lsn: Lsn, input_end_lsn: Lsn },
    #[error("WAL at {lsn} belongs to database system {found}, but the safekeepers report {expected}")]
    SystemIdMismatch { lsn: Lsn, expected: u64, found: u64 },
    #[error("the timeline starts at {lsn}, which is not the start of a {segment_size_bytes}-byte WAL segment")]
    StartNotAtSegmentStart { lsn: Lsn, segment_size_bytes: u64 },
}

impl IngestError {
    /// Where the problem is.
    pub fn lsn(&self) -> Lsn {
        match self {
            IngestError::Decode(error) => error.lsn(),
            IngestError::ZerosInsideCommittedWal { lsn, .. }
            | IngestError::SystemIdMismatch { lsn, .. }
            | IngestError::StartNotAtSegmentStart { lsn, .. } => *lsn,
        }
    }
}

/// A decoder, its counters and the position bookkeeping around them.
#[derive(Debug)]
pub struct Ingest {
    decoder: WalDecoder,
    system_id: u64,
    /// The first segment start at or after where decoding began: the long
    /// page header whose system id the decoder learns first (and then holds
    /// every later one to).
    first_long_header_lsn: Lsn,
    /// Records the boundary has passed: what a saved state may claim.
    settled: WalStats,
    /// Records decoded but not yet behind the boundary (an XLOG SWITCH
    /// whose padding has not all arrived): at most one.
    unsettled: Vec<DecodedRecord>,
    last_record_end_lsn: Option<Lsn>,
}

impl Ingest {
    /// A first start at the first byte of the timeline's first segment.
    pub fn from_timeline_start(
        start: Lsn,
        segment_size: WalSegmentSize,
        system_id: u64,
    ) -> Result<Ingest, IngestError> {
        if !start.is_segment_start(segment_size) {
            return Err(IngestError::StartNotAtSegmentStart { lsn: start, segment_size_bytes: segment_size.bytes() });
        }
        let decoder = WalDecoder::at_segment_start(start, segment_size);
        Ok(Ingest::with_decoder(decoder, start, system_id, WalStats::default(), None))
    }

    /// Resume at a saved record boundary with the saved counters.
    pub fn resume(saved_end_lsn: Lsn, segment_size: WalSegmentSize, system_id: u64, saved: WalStats) -> Ingest {
        let decoder = WalDecoder::at_record_boundary(saved_end_lsn, segment_size);
        let first_long_header_lsn = if saved_end_lsn.is_segment_start(segment_size) {
            saved_end_lsn
        } else {
            saved_end_lsn.next_segment_start(segment_size)
        };
        Ingest::with_decoder(decoder, first_long_header_lsn, system_id, saved, Some(saved_end_lsn))
    }

    fn with_decoder(
        decoder: WalDecoder,
        first_long_header_lsn: Lsn,
        system_id: u64,
        settled: WalStats,
        last_record_end_lsn: Option<Lsn>,
    ) -> Ingest {
        Ingest { decoder, system_id, first_long_header_lsn, settled, unsettled: Vec::new(), last_record_end_lsn }
    }

    /// Decode `chunk` (the bytes at [`Ingest::input_end_lsn`]), handing each
    /// complete record to `on_record`; returns how many there were.
    pub fn feed(&mut self, chunk: &[u8], mut on_record: impl FnMut(&DecodedRecord)) -> Result<u64, IngestError> {
        self.decoder.feed(chunk);
        let mut decoded = 0;
        let unsettled = &mut self.unsettled;
        let step = self.decoder.decode_available(|record| {
            on_record(&record);
            decoded += 1;
            unsettled.push(record);
        });
        if let Some(last) = self.unsettled.last() {
            self.last_record_end_lsn = Some(last.end_lsn);
        }
        self.settle();
        match step? {
            DecodeStep::EndOfWal { lsn } => {
                // Zeros are the end of WAL in a pg_wal file, but these bytes
                // are committed: the primary wrote records here.
                Err(IngestError::ZerosInsideCommittedWal { lsn, input_end_lsn: self.input_end_lsn() })
            }
            DecodeStep::NeedMoreInput | DecodeStep::Record(_) => {
                self.check_system_id()?;
                Ok(decoded)
            }
        }
    }

    /// Move records the boundary has passed into the settled counters.
    fn settle(&mut self) {
        let boundary = self.decoder.boundary_lsn();
        let passed = self.unsettled.iter().take_while(|record| record.start_lsn < boundary).count();
        for record in self.unsettled.drain(..passed) {
            self.settled.count(&record);
        }
        debug_assert!(self.unsettled.len() <= 1, "only an XLOG SWITCH waits for its padding: {:?}", self.unsettled);
    }

    fn check_system_id(&self) -> Result<(), IngestError> {
        match self.decoder.system_id() {
            Some(found) if found != self.system_id => {
                Err(IngestError::SystemIdMismatch { lsn: self.first_long_header_lsn, expected: self.system_id, found })
            }
            _ => Ok(()),
        }
    }

    /// Just past the last byte fed: where the next pull starts.
    pub fn input_end_lsn(&self) -> Lsn {
        self.decoder.input_end_lsn()
    }

    /// Where a restart resumes; the saved position.
    pub fn boundary_lsn(&self) -> Lsn {
        self.decoder.boundary_lsn()
    }

    /// End of the last record decoded (or the resume position).
    pub fn last_record_end_lsn(&self) -> Option<Lsn> {
        self.last_record_end_lsn
    }

    /// The counters a saved state at [`Ingest::boundary_lsn`] holds.
    pub fn settled_stats(&self) -> &WalStats {
        &self.settled
    }

    /// Every record decoded, settled or not.
    pub fn all_stats(&self) -> WalStats {
        let mut unsettled = WalStats::default();
        self.unsettled.iter().for_each(|record| unsettled.count(record));
        self.settled.merged_with(&unsettled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_wal::wal::generator::WalGenerator;

    const SYSTEM_ID: u64 = 7_300_000_000_000_000_001;

    fn segment_size() -> WalSegmentSize {
        WalSegmentSize::new(1 << 20).unwrap()
    }

    /// WAL from 0/100000: records, an XLOG SWITCH, records in the next segment.
    fn wal_with_switch() -> (Lsn, Vec<u8>, Vec<DecodedRecord>) {
        let start = Lsn(1 << 20);
        let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), start);
        let mut records = generator.append_random_records(50, 3, 3000);
        records.push(generator.append_switch());
        records.extend(generator.append_random_records(20, 4, 3000));
        let (from, bytes) = generator.take_bytes();
        assert_eq!(from, start);
        (start, bytes, records)
    }

    fn expected_stats(records: &[DecodedRecord]) -> WalStats {
        let mut stats = WalStats::default();
        records.iter().for_each(|record| stats.count(record));
        stats
    }

    /// A save while the switch padding is still arriving must not count the
    /// switch: the restarted decoder returns it again. Counts over the
    /// restart equal a single run's.
    #[test]
    fn counts_over_a_restart_inside_switch_padding_equal_a_single_run() {
        let (start, bytes, records) = wal_with_switch();
        let switch = records.iter().find(|record| record.is_switch()).unwrap().clone();
        let cut = usize::try_from(switch.end_lsn - start).unwrap() - 5000;
        let mut first = Ingest::from_timeline_start(start, segment_size(), SYSTEM_ID).unwrap();
        let mut seen = Vec::new();
        first.feed(&bytes[..cut], |record| seen.push(record.clone())).unwrap();
        assert_eq!(seen.last(), Some(&switch), "the switch is decoded before its padding ends");
        let saved_lsn = first.boundary_lsn();
        assert!(saved_lsn <= switch.start_lsn, "the boundary stays before the switch");
        assert_eq!(first.settled_stats().total().records, seen.len() as u64 - 1);
        assert_eq!(first.all_stats().total().records, seen.len() as u64);
        assert_eq!(first.last_record_end_lsn(), Some(switch.end_lsn));

        let mut second = Ingest::resume(saved_lsn, segment_size(), SYSTEM_ID, first.settled_stats().clone());
        let mut after_restart = Vec::new();
        let rest = &bytes[usize::try_from(saved_lsn - start).unwrap()..];
        second.feed(rest, |record| after_restart.push(record.clone())).unwrap();
        assert_eq!(after_restart.first(), Some(&switch), "the switch is decoded again after the restart");
        assert_eq!(second.settled_stats(), &expected_stats(&records));
        assert_eq!(second.boundary_lsn(), records.last().unwrap().end_lsn);
    }

    #[test]
    fn every_record_is_decoded_once_in_any_chunking() {
        let (start, bytes, records) = wal_with_switch();
        let mut ingest = Ingest::from_timeline_start(start, segment_size(), SYSTEM_ID).unwrap();
        let mut seen = Vec::new();
        let mut decoded = 0;
        for chunk in bytes.chunks(777) {
            decoded += ingest.feed(chunk, |record| seen.push(record.clone())).unwrap();
        }
        assert_eq!(seen, records);
        assert_eq!(decoded, records.len() as u64);
        assert_eq!(ingest.settled_stats(), &expected_stats(&records));
        assert_eq!(ingest.input_end_lsn(), start + bytes.len() as u64);
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_its_lsn() {
        let (start, mut bytes, records) = wal_with_switch();
        let victim = &records[10];
        let offset = usize::try_from(victim.start_lsn - start).unwrap() + 24;
        bytes[offset] ^= 0x01;
        let mut ingest = Ingest::from_timeline_start(start, segment_size(), SYSTEM_ID).unwrap();
        let mut seen = 0;
        let error = ingest.feed(&bytes, |_| seen += 1).unwrap_err();
        assert_eq!(error.lsn(), victim.start_lsn);
        assert!(error.to_string().contains(&victim.start_lsn.to_string()), "{error}");
        assert_eq!(seen, 10, "the records before the corrupt one were decoded");
        assert_eq!(ingest.boundary_lsn(), records[9].end_lsn, "and can be saved");
    }

    #[test]
    fn zeros_inside_committed_wal_are_an_error() {
        let start = Lsn(1 << 20);
        let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), start);
        let record = generator.append_record(10, 0, 1, b"row");
        let (_, mut bytes) = generator.take_bytes();
        bytes.extend_from_slice(&[0; 64]);
        let mut ingest = Ingest::from_timeline_start(start, segment_size(), SYSTEM_ID).unwrap();
        let error = ingest.feed(&bytes, |_| {}).unwrap_err();
        assert_eq!(
            error,
            IngestError::ZerosInsideCommittedWal { lsn: record.end_lsn, input_end_lsn: record.end_lsn + 64 }
        );
    }

    #[test]
    fn wal_of_another_system_is_refused() {
        let (start, bytes, _) = wal_with_switch();
        let mut ingest = Ingest::from_timeline_start(start, segment_size(), SYSTEM_ID + 1).unwrap();
        let error = ingest.feed(&bytes[..100], |_| {}).unwrap_err();
        assert!(matches!(error, IngestError::SystemIdMismatch { lsn, .. } if lsn == start), "{error}");
        let misaligned = Ingest::from_timeline_start(start + 8, segment_size(), SYSTEM_ID).unwrap_err();
        assert!(misaligned.to_string().contains("not the start"), "{misaligned}");
    }
}
