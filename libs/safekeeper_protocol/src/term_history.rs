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

    /// Terms strictly increase and start LSNs never decrease.
    pub fn is_well_formed(&self) -> bool {
        self.0.len() <= MAX_TERM_HISTORY_ENTRIES
            && self.0.windows(2).all(|w| w[0].term < w[1].term && w[0].start_lsn <= w[1].start_lsn)
    }
}
