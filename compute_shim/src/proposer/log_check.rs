//! Checking Postgres against the log before a term sends any WAL.
//!
//! A new term continues the donor's log from the term start with the WAL
//! Postgres streams, and catches lagging safekeepers up with Postgres's WAL
//! below it. Both are right only if Postgres's WAL up to the term start *is*
//! the log. A primary restored from a backup and promoted, or one whose WAL
//! forked from an uncommitted tail a safekeeper still holds, has different
//! bytes there: continuing would put two histories into one log and, with a
//! lagging safekeeper caught up from Postgres, change committed bytes.
//!
//! So before any append, the proposer compares the digest of Postgres's
//! bytes in `[term start - CHECKED_BYTES, term start)` with the digest a
//! safekeeper holding our log up to the term start computes from its
//! segment files, and refuses to lead if they differ. A range that ends at
//! the term start suffices whatever the fork point: every byte after a fork
//! differs in the page headers (a promoted server writes a new timeline id)
//! or in the records themselves, so a fork below the range shows in all of
//! it and a fork inside it shows in its tail.
//!
//! The range is empty when Postgres cannot stream anything below the term
//! start (its WAL there was removed: the term start is a segment start and
//! its slot restarts in that segment). Then the first record Postgres
//! writes after the term start must link back (`xl_prev`) to the log's last
//! record, whose start the safekeeper finds in its segment files; WAL is
//! held until Postgres has written that record.

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::wal::{DecodeStep, WalDecoder};
use safekeeper_protocol::protocol::{WalDigest, WalDigestResponse, WalDigester};

use super::error::PeerFault;
use super::peer::SlotIndex;

/// How much WAL below the term start is compared: several WAL pages, so
/// the range holds page headers whatever the alignment.
pub(super) const CHECKED_BYTES: u64 = 64 * 1024;
const _: () = assert!(CHECKED_BYTES <= safekeeper_protocol::protocol::MAX_DIGEST_RANGE_BYTES);

/// The outcome once both digests are known.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Waiting,
    Same,
    Different,
}

pub(super) struct LogCheck {
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    /// Postgres's bytes digested so far end here.
    digested_to_lsn: Lsn,
    postgres: Option<WalDigester>,
    postgres_digest: Option<WalDigest>,
    /// The safekeeper asked for its digest (on its current connection).
    pub asked: Option<SlotIndex>,
    /// Since when no connected safekeeper could be asked.
    pub unasked_since_ms: Option<u64>,
    log_answer: Option<LogAnswer>,
    /// An empty range only: decoding Postgres's WAL from the term start up
    /// to its first record, whose `xl_prev` must name the log's last record.
    first_record: FirstRecord,
}

struct LogAnswer {
    digest: WalDigest,
    last_record_start_lsn: Lsn,
}

enum FirstRecord {
    NotNeeded,
    Decoding(Box<WalDecoder>),
    /// Its `xl_prev`, or `None` if Postgres's WAL at the term start does not
    /// begin a record there (it continues one: another history).
    Found(Option<Lsn>),
}

impl LogCheck {
    /// Check `[start_lsn, end_lsn)`, which Postgres streams from `start_lsn`;
    /// an empty range checks the first record after `end_lsn` instead.
    pub fn new(start_lsn: Lsn, end_lsn: Lsn, segment_size: WalSegmentSize) -> LogCheck {
        assert!(start_lsn <= end_lsn && end_lsn - start_lsn <= CHECKED_BYTES, "at most CHECKED_BYTES");
        let empty = start_lsn == end_lsn;
        let first_record = if empty {
            FirstRecord::Decoding(Box::new(WalDecoder::at_record_boundary(end_lsn, segment_size)))
        } else {
            FirstRecord::NotNeeded
        };
        LogCheck {
            start_lsn,
            end_lsn,
            digested_to_lsn: start_lsn,
            postgres: (!empty).then(WalDigester::default),
            postgres_digest: empty.then(|| WalDigester::default().finish()),
            asked: None,
            unasked_since_ms: None,
            log_answer: None,
            first_record,
        }
    }

    /// Postgres's WAL from the term start (streamed and buffered as usual),
    /// while an empty range waits for Postgres's first record there.
    pub fn on_wal_after_term_start(&mut self, start_lsn: Lsn, wal: &[u8]) {
        let FirstRecord::Decoding(decoder) = &mut self.first_record else { return };
        assert_eq!(decoder.input_end_lsn(), start_lsn, "Postgres's WAL is contiguous from the term start");
        decoder.feed(wal);
        self.first_record = match decoder.next_record() {
            Ok(DecodeStep::Record(record)) => FirstRecord::Found(Some(record.prev_lsn)),
            Ok(DecodeStep::NeedMoreInput) => return,
            Ok(DecodeStep::EndOfWal { .. }) | Err(_) => FirstRecord::Found(None),
        };
    }

    /// Where Postgres's stream must go on while its digest is incomplete.
    pub fn postgres_wanted_from(&self) -> Option<Lsn> {
        self.postgres.is_some().then_some(self.digested_to_lsn)
    }

    /// WAL from Postgres, from `postgres_wanted_from()`; bytes past the
    /// range are not needed here.
    pub fn on_postgres_wal(&mut self, start_lsn: Lsn, wal: &[u8]) {
        let Some(digester) = self.postgres.as_mut() else { return };
        assert_eq!(start_lsn, self.digested_to_lsn, "Postgres's WAL is contiguous");
        let take = ((self.end_lsn - start_lsn) as usize).min(wal.len());
        digester.update(&wal[..take]);
        self.digested_to_lsn = start_lsn + take as u64;
        if self.digested_to_lsn == self.end_lsn {
            self.postgres_digest = self.postgres.take().map(WalDigester::finish);
        }
    }

    /// The asked safekeeper's answer.
    pub fn on_answer(&mut self, sk: SlotIndex, response: &WalDigestResponse) -> Result<(), PeerFault> {
        if self.asked != Some(sk) || self.log_answer.is_some() {
            return Err(PeerFault::Unexpected { message: "WalDigestResponse", state: "not asked for one" });
        }
        if (response.start_lsn, response.end_lsn) != (self.start_lsn, self.end_lsn) {
            return Err(PeerFault::WrongDigestRange {
                asked: (self.start_lsn, self.end_lsn),
                got: (response.start_lsn, response.end_lsn),
            });
        }
        self.log_answer =
            Some(LogAnswer { digest: response.digest, last_record_start_lsn: response.last_record_start_lsn });
        Ok(())
    }

    /// A connection closed: if it owed the answer, another safekeeper is asked.
    pub fn on_disconnected(&mut self, sk: SlotIndex) {
        if self.asked == Some(sk) && self.log_answer.is_none() {
            self.asked = None;
        }
    }

    pub fn verdict(&self) -> Verdict {
        let (Some(postgres), Some(log)) = (self.postgres_digest, self.log_answer.as_ref()) else {
            return Verdict::Waiting;
        };
        if postgres != log.digest {
            return Verdict::Different;
        }
        match &self.first_record {
            FirstRecord::NotNeeded => Verdict::Same,
            // The log holds no record before the term start (a new
            // timeline, or retention removed it): nothing to link to.
            _ if !log.last_record_start_lsn.is_valid() => Verdict::Same,
            FirstRecord::Decoding(_) => Verdict::Waiting,
            FirstRecord::Found(prev) if *prev == Some(log.last_record_start_lsn) => Verdict::Same,
            FirstRecord::Found(_) => Verdict::Different,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_wal::wal::generator::WalGenerator;
    use safekeeper_protocol::ids::Term;

    fn digest(bytes: &[u8]) -> WalDigest {
        let mut digester = WalDigester::default();
        digester.update(bytes);
        digester.finish()
    }

    fn answer(start: u64, end: u64, digest: WalDigest) -> WalDigestResponse {
        WalDigestResponse {
            term: Term(2),
            start_lsn: Lsn(start),
            end_lsn: Lsn(end),
            digest,
            last_record_start_lsn: Lsn(0),
        }
    }

    fn segment_size() -> WalSegmentSize {
        WalSegmentSize::new(1 << 20).unwrap()
    }

    /// An empty range: Postgres's first record after the term start must
    /// link back to the log's last record.
    #[test]
    fn an_empty_range_checks_the_first_records_back_link() {
        let mut generator = WalGenerator::new(7, segment_size(), Lsn(1 << 20));
        let records: Vec<_> = (0..6).map(|i| generator.append_record(10, 0, i, &[i as u8; 3_000])).collect();
        let (start, wal) = generator.take_bytes();
        let term_start = records[3].end_lsn;
        let from_term_start = &wal[(term_start - start) as usize..];
        for (log_last, expected) in [(records[3].start_lsn, Verdict::Same), (records[2].start_lsn, Verdict::Different)]
        {
            let mut check = LogCheck::new(term_start, term_start, segment_size());
            check.asked = Some(SlotIndex(0));
            let mut response = answer(term_start.0, term_start.0, WalDigester::default().finish());
            response.last_record_start_lsn = log_last;
            check.on_answer(SlotIndex(0), &response).unwrap();
            assert_eq!(check.verdict(), Verdict::Waiting, "Postgres has not written past the term start");
            check.on_wal_after_term_start(term_start, &from_term_start[..100]);
            assert_eq!(check.verdict(), Verdict::Waiting, "its first record is not complete");
            check.on_wal_after_term_start(term_start + 100, &from_term_start[100..]);
            assert_eq!(check.verdict(), expected, "log's last record at {log_last}");
        }
    }

    /// Postgres's WAL may arrive in any pieces and run past the range; only
    /// the bytes inside the range are compared.
    #[test]
    fn same_bytes_pass_and_one_changed_byte_fails() {
        let log: Vec<u8> = (0..340u32).map(|i| i as u8).collect();
        for changed in [None, Some(100), Some(299)] {
            let mut postgres = log.clone();
            if let Some(at) = changed {
                postgres[at] ^= 0xff;
            }
            let mut check = LogCheck::new(Lsn(1100), Lsn(1300), segment_size());
            check.asked = Some(SlotIndex(1));
            check.on_answer(SlotIndex(1), &answer(1100, 1300, digest(&log[100..300]))).unwrap();
            assert_eq!(check.verdict(), Verdict::Waiting, "Postgres's digest is not complete");
            for (index, piece) in postgres[100..].chunks(70).enumerate() {
                check.on_postgres_wal(Lsn(1100 + 70 * index as u64), piece);
            }
            assert_eq!(check.postgres_wanted_from(), None, "Postgres's part is done");
            let expected = if changed.is_some() { Verdict::Different } else { Verdict::Same };
            assert_eq!(check.verdict(), expected, "changed byte {changed:?}");
        }
    }

    #[test]
    fn only_the_asked_safekeeper_may_answer_once_for_the_asked_range() {
        let mut check = LogCheck::new(Lsn(100), Lsn(200), segment_size());
        assert!(check.on_answer(SlotIndex(0), &answer(100, 200, [0; 32])).is_err(), "nobody was asked");
        check.asked = Some(SlotIndex(0));
        assert!(check.on_answer(SlotIndex(1), &answer(100, 200, [0; 32])).is_err(), "another safekeeper");
        assert!(check.on_answer(SlotIndex(0), &answer(100, 201, [0; 32])).is_err(), "another range");
        check.on_answer(SlotIndex(0), &answer(100, 200, [0; 32])).unwrap();
        assert!(check.on_answer(SlotIndex(0), &answer(100, 200, [0; 32])).is_err(), "a second answer");
        check.on_disconnected(SlotIndex(0));
        assert_eq!(check.asked, Some(SlotIndex(0)), "an answer received stays");
    }
}
