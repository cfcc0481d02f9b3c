//! A term history: which term wrote which part of the log. Acceptors store
//! it durably; votes and ProposerElected carry it.

use serde::{Deserialize, Serialize};

use crate::ids::Term;
use postgres_wal::lsn::Lsn;

/// One entry of a term history: `term` began writing at `start_lsn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermStart {
    pub term: Term,
    pub start_lsn: Lsn,
}

/// Terms in strictly increasing order with non-decreasing start LSNs. The
/// log at LSN x was written by the last entry with `start_lsn <= x`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermHistory(pub Vec<TermStart>);

/// Most entries a term history may hold (one per elected proposer).
pub const MAX_TERM_HISTORY_ENTRIES: usize = 10_000;

impl TermHistory {
    pub fn last_term(&self) -> Term {
        self.0.last().map(|entry| entry.term).unwrap_or_default()
    }

    /// The entries that describe a log ending at `end_lsn` (those starting
    /// at or below it).
    pub fn up_to(&self, end_lsn: Lsn) -> TermHistory {
        TermHistory(self.0.iter().copied().filter(|entry| entry.start_lsn <= end_lsn).collect())
    }

    /// Terms strictly increase and start LSNs never decrease.
    pub fn is_well_formed(&self) -> bool {
        self.0.len() <= MAX_TERM_HISTORY_ENTRIES
            && self.0.windows(2).all(|w| w[0].term < w[1].term && w[0].start_lsn <= w[1].start_lsn)
    }
}

/// A log described by its term history and where it ends.
#[derive(Clone, Copy, Debug)]
pub struct LogView<'a> {
    pub history: &'a TermHistory,
    pub end_lsn: Lsn,
}

impl LogView<'_> {
    /// End of the run of WAL written by entry `index`.
    fn entry_end(&self, index: usize) -> Lsn {
        match self.history.0.get(index + 1) {
            Some(next) => next.start_lsn.min(self.end_lsn),
            None => self.end_lsn,
        }
    }
}

/// The end of the longest prefix on which the two logs agree (same term for
/// every byte), or `None` if they disagree from their first entry. All WAL
/// comes from one primary, so bytes written in the same term at the same
/// LSN are the same: agreement of terms is agreement of bytes.
pub fn highest_common_point(ours: LogView<'_>, theirs: LogView<'_>) -> Option<Lsn> {
    let mut common = None;
    for (index, (our_entry, their_entry)) in ours.history.0.iter().zip(&theirs.history.0).enumerate() {
        if our_entry != their_entry {
            break;
        }
        let (our_end, their_end) = (ours.entry_end(index), theirs.entry_end(index));
        common = Some(our_end.min(their_end));
        if our_end != their_end {
            break;
        }
    }
    common
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(entries: &[(u64, u64)]) -> TermHistory {
        TermHistory(
            entries.iter().map(|&(term, start)| TermStart { term: Term(term), start_lsn: Lsn(start) }).collect(),
        )
    }

    /// Same entries: the logs agree up to the shorter end.
    #[test]
    fn common_point_of_a_log_and_its_extension_is_the_shorter_end() {
        let h = history(&[(1, 100), (2, 500)]);
        let ours = LogView { history: &h, end_lsn: Lsn(700) };
        let theirs = LogView { history: &h, end_lsn: Lsn(900) };
        assert_eq!(highest_common_point(ours, theirs), Some(Lsn(700)));
    }

    /// A divergent tail: agreement stops where one term's run ends earlier
    /// than the other's (the stale tail above it is what gets truncated).
    #[test]
    fn common_point_stops_where_terms_diverge() {
        let ours = history(&[(1, 100), (2, 500)]);
        let theirs = history(&[(1, 100), (3, 400)]);
        let common = highest_common_point(
            LogView { history: &ours, end_lsn: Lsn(800) },
            LogView { history: &theirs, end_lsn: Lsn(u64::MAX) },
        );
        assert_eq!(common, Some(Lsn(400)), "term 1 wrote [100, 400) on theirs and [100, 500) on ours");
        let other = history(&[(2, 100)]);
        assert_eq!(
            highest_common_point(
                LogView { history: &ours, end_lsn: Lsn(800) },
                LogView { history: &other, end_lsn: Lsn(800) }
            ),
            None
        );
    }

    #[test]
    fn up_to_keeps_the_entries_that_reach_the_end() {
        let h = history(&[(1, 100), (2, 500), (4, 900)]);
        assert_eq!(h.up_to(Lsn(500)), history(&[(1, 100), (2, 500)]));
        assert_eq!(h.up_to(Lsn(99)).last_term(), Term(0));
    }
}
