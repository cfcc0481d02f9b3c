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

use safekeeper::lsn::Lsn;
use safekeeper::protocol::{WalDigest, WalDigestResponse, WalDigester};

use super::error::PeerFault;

/// How much WAL below the term start is compared: several WAL pages, so
/// the range holds page headers whatever the alignment.
pub(super) const CHECKED_BYTES: u64 = 64 * 1024;
const _: () = assert!(CHECKED_BYTES <= safekeeper::protocol::MAX_DIGEST_RANGE_BYTES);

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
    pub asked: Option<usize>,
    /// Since when no connected safekeeper could be asked.
    pub unasked_since_ms: Option<u64>,
    log_digest: Option<WalDigest>,
}

impl LogCheck {
    /// Check `[start_lsn, end_lsn)`, which Postgres streams from `start_lsn`.
    pub fn new(start_lsn: Lsn, end_lsn: Lsn) -> LogCheck {
        assert!(start_lsn < end_lsn, "an empty range needs no check");
        assert!(end_lsn - start_lsn <= CHECKED_BYTES, "the range is at most CHECKED_BYTES");
        LogCheck {
            start_lsn,
            end_lsn,
            digested_to_lsn: start_lsn,
            postgres: Some(WalDigester::default()),
            postgres_digest: None,
            asked: None,
            unasked_since_ms: None,
            log_digest: None,
        }
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
    pub fn on_answer(&mut self, sk: usize, response: &WalDigestResponse) -> Result<(), PeerFault> {
        if self.asked != Some(sk) || self.log_digest.is_some() {
            return Err(PeerFault::Unexpected { message: "WalDigestResponse", state: "not asked for one" });
        }
        if (response.start_lsn, response.end_lsn) != (self.start_lsn, self.end_lsn) {
            return Err(PeerFault::WrongDigestRange {
                asked: (self.start_lsn, self.end_lsn),
                got: (response.start_lsn, response.end_lsn),
            });
        }
        self.log_digest = Some(response.digest);
        Ok(())
    }

    /// A connection closed: if it owed the answer, another safekeeper is asked.
    pub fn on_disconnected(&mut self, sk: usize) {
        if self.asked == Some(sk) && self.log_digest.is_none() {
            self.asked = None;
        }
    }

    pub fn verdict(&self) -> Verdict {
        match (self.postgres_digest, self.log_digest) {
            (Some(postgres), Some(log)) if postgres == log => Verdict::Same,
            (Some(_), Some(_)) => Verdict::Different,
            _ => Verdict::Waiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekeeper::ids::Term;

    fn digest(bytes: &[u8]) -> WalDigest {
        let mut digester = WalDigester::default();
        digester.update(bytes);
        digester.finish()
    }

    fn answer(start: u64, end: u64, digest: WalDigest) -> WalDigestResponse {
        WalDigestResponse { term: Term(2), start_lsn: Lsn(start), end_lsn: Lsn(end), digest }
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
            let mut check = LogCheck::new(Lsn(1100), Lsn(1300));
            check.asked = Some(1);
            check.on_answer(1, &answer(1100, 1300, digest(&log[100..300]))).unwrap();
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
        let mut check = LogCheck::new(Lsn(100), Lsn(200));
        assert!(check.on_answer(0, &answer(100, 200, [0; 32])).is_err(), "nobody was asked");
        check.asked = Some(0);
        assert!(check.on_answer(1, &answer(100, 200, [0; 32])).is_err(), "another safekeeper");
        assert!(check.on_answer(0, &answer(100, 201, [0; 32])).is_err(), "another range");
        check.on_answer(0, &answer(100, 200, [0; 32])).unwrap();
        assert!(check.on_answer(0, &answer(100, 200, [0; 32])).is_err(), "a second answer");
        check.on_disconnected(0);
        assert_eq!(check.asked, Some(0), "an answer received stays");
    }
}
