//! The commit rule.

use postgres_wal::lsn::Lsn;

/// The highest LSN that `quorum` safekeepers have flushed in the current
/// term, or `None` if fewer than `quorum` have reached the term start.
///
/// Only flushes at or past `term_start_lsn` count. Below it, an acceptor's
/// log still ends in an older term's entries, and a later election may pick
/// a donor of a term between that one and ours that lacks them (Raft's
/// figure 8): such WAL is committed only implicitly, once a quorum holds our
/// term start. Reaching the term start with our history is this protocol's
/// "no-op entry of the new term".
pub(super) fn quorum_flush_lsn(flushes: impl Iterator<Item = Lsn>, term_start_lsn: Lsn, quorum: usize) -> Option<Lsn> {
    assert!(quorum > 0);
    let mut counted: Vec<Lsn> = flushes.filter(|&flush| flush >= term_start_lsn).collect();
    if counted.len() < quorum {
        return None;
    }
    counted.sort_unstable_by(|a, b| b.cmp(a));
    Some(counted[quorum - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Lsn = Lsn(1000);

    #[test]
    fn quorum_th_highest_flush() {
        let flushes = [Lsn(1500), Lsn(1200), Lsn(1900)];
        assert_eq!(quorum_flush_lsn(flushes.into_iter(), START, 2), Some(Lsn(1500)));
        assert_eq!(quorum_flush_lsn(flushes.into_iter(), START, 3), Some(Lsn(1200)));
    }

    /// Rule: only flushes at or past the term start count (Raft: never commit
    /// a previous term's entries by counting replicas).
    #[test]
    fn flushes_below_term_start_do_not_count() {
        let flushes = [Lsn(999), Lsn(998), Lsn(2000)];
        assert_eq!(quorum_flush_lsn(flushes.into_iter(), START, 2), None);
        let flushes = [Lsn(999), Lsn(1000), Lsn(2000)];
        assert_eq!(quorum_flush_lsn(flushes.into_iter(), START, 2), Some(START));
    }
}
