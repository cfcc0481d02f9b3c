//! Votes and the outcome of an election: the donor, the term start and the
//! history the new term writes under.

use postgres_wal::lsn::Lsn;
use postgres_wal::timeline_history::PgTimelineHistory;
use safekeeper_protocol::ids::Term;
use safekeeper_protocol::protocol::VoteResponse;
use safekeeper_protocol::term_history::{TermHistory, TermStart, MAX_TERM_HISTORY_ENTRIES};

use super::config::{ProposerConfig, ProposerMode};
use super::error::{PeerFault, ProposerError};
use super::peer::SlotIndex;

/// A granted vote: what the voter's durable log looks like.
#[derive(Clone, Debug)]
pub(super) struct Vote {
    pub flush_lsn: Lsn,
    pub commit_lsn: Lsn,
    pub timeline_start_lsn: Lsn,
    /// The history entries the voter's log reaches.
    pub history: TermHistory,
    /// Which Postgres timelines wrote the voter's log.
    pub pg_timelines: PgTimelineHistory,
}

impl Vote {
    /// Check a granted vote for term `term`; a malformed one is a fault of
    /// that safekeeper, never a panic.
    pub fn from_response(response: VoteResponse, term: Term) -> Result<Vote, PeerFault> {
        assert!(response.vote_given, "callers handle refusals");
        if response.term != term {
            return Err(PeerFault::WrongTerm { expected: term, got: response.term });
        }
        let bad = |reason| Err(PeerFault::BadVote { reason });
        let history = &response.term_history;
        if !history.is_well_formed() {
            return bad("term history out of order");
        }
        if history.last_term() >= term {
            return bad("history holds a term not below the one voted for");
        }
        if history.0.iter().any(|entry| entry.start_lsn > response.flush_lsn) {
            return bad("history entry starts beyond the flush LSN");
        }
        if response.commit_lsn > response.flush_lsn {
            return bad("commit LSN beyond the flush LSN");
        }
        Ok(Vote {
            flush_lsn: response.flush_lsn,
            commit_lsn: response.commit_lsn,
            timeline_start_lsn: response.timeline_start_lsn,
            history: response.term_history,
            pg_timelines: response.pg_timelines,
        })
    }

    /// The term that wrote the voter's last WAL byte.
    pub fn last_log_term(&self) -> Term {
        self.history.last_term()
    }
}

/// What a won election fixes for the whole term.
#[derive(Clone, Debug)]
pub(super) struct Election {
    pub term: Term,
    /// Where this term starts writing: the donor's flush LSN.
    pub term_start_lsn: Lsn,
    pub timeline_start_lsn: Lsn,
    /// The donor's history plus (term, term_start_lsn).
    pub history: TermHistory,
    /// The highest commit LSN a voter reported: committed by earlier terms.
    pub known_commit_lsn: Lsn,
    /// The voter whose log the term continues (a sync reads it from there).
    pub donor: SlotIndex,
    /// The Postgres timelines the term writes under: Postgres's own, or
    /// without Postgres the donor's.
    pub pg_timelines: PgTimelineHistory,
}

/// Whether the log (`log`, as a safekeeper holds it) went on at a newer
/// Postgres timeline than `ours`, the timeline our Postgres streams: then
/// we are an old primary after a failover.
pub(super) fn check_not_superseded(ours: &PgTimelineHistory, log: &PgTimelineHistory) -> Result<(), ProposerError> {
    if log.current <= ours.current {
        return Ok(());
    }
    let switch_lsn = log.left_at(ours.current);
    Err(ProposerError::Superseded { timeline: ours.current, current: log.current, switch_lsn })
}

/// The Postgres timelines of the new term. Postgres's own must continue
/// the donor's log: the same timeline, or a later one whose history holds
/// the log's timeline and ends it at or after the log's end (a promoted
/// server forks where its recovery ended; below the log's end, it did not
/// replay all of it).
fn term_pg_timelines(donor: &Vote, ours: Option<&PgTimelineHistory>) -> Result<PgTimelineHistory, ProposerError> {
    let Some(ours) = ours else { return Ok(donor.pg_timelines.clone()) };
    let log = &donor.pg_timelines;
    check_not_superseded(ours, log)?;
    if ours.current > log.current && donor.flush_lsn.is_valid() {
        let Some(switch_lsn) = ours.end_of(log.current) else {
            return Err(ProposerError::UnrelatedTimeline { timeline: ours.current, log_timeline: log.current });
        };
        if switch_lsn < donor.flush_lsn {
            return Err(ProposerError::PromotedBelowLogEnd {
                timeline: ours.current,
                switch_lsn,
                log_end_lsn: donor.flush_lsn,
                log_timeline: log.current,
            });
        }
    }
    Ok(ours.clone())
}

/// Decide the election from `votes` (safekeeper index, vote), which the
/// caller has checked form a quorum.
///
/// The donor is the voter with the highest (last_log_term, flush_lsn): as in
/// Raft's election restriction, its log holds every committed byte, because
/// a commit needs a quorum at the committing term's start and any two quorums
/// intersect. Refuses to lead when Postgres cannot continue that log.
pub(super) fn decide(
    term: Term,
    votes: &[(SlotIndex, &Vote)],
    config: &ProposerConfig,
) -> Result<Election, ProposerError> {
    let &(donor_slot, donor) =
        votes.iter().max_by_key(|(_, vote)| (vote.last_log_term(), vote.flush_lsn)).expect("non-empty");
    let (term_start_lsn, timeline_start_lsn) = if donor.flush_lsn.is_valid() {
        (donor.flush_lsn, donor.timeline_start_lsn)
    } else {
        // Every voter is empty: a new timeline starts where Postgres can
        // stream from, at a segment start (as pg_receivewal does).
        (config.timeline_start_lsn, config.timeline_start_lsn)
    };
    // The timeline verdicts first: a promoted server behind the log's end is
    // "promoted too early", which a restart never mends (unlike "behind").
    let pg_timelines = term_pg_timelines(donor, config.pg_timelines.as_ref())?;
    match config.mode {
        ProposerMode::Stream { postgres_flush_lsn } if term_start_lsn > postgres_flush_lsn => {
            return Err(ProposerError::PostgresBehind { term_start_lsn, postgres_flush_lsn });
        }
        ProposerMode::Sync if !donor.flush_lsn.is_valid() => return Err(ProposerError::NothingToSync),
        _ => {}
    }
    if matches!(config.mode, ProposerMode::Stream { .. }) && term_start_lsn < config.timeline_start_lsn {
        return Err(ProposerError::PostgresWalGone { term_start_lsn, timeline_start_lsn: config.timeline_start_lsn });
    }
    let mut known_commit_lsn = Lsn::INVALID;
    for &(safekeeper, vote) in votes {
        if vote.commit_lsn > term_start_lsn {
            return Err(ProposerError::CommitAboveTermStart {
                safekeeper,
                commit_lsn: vote.commit_lsn,
                term_start_lsn,
            });
        }
        known_commit_lsn = known_commit_lsn.max(vote.commit_lsn);
    }
    if donor.history.0.len() >= MAX_TERM_HISTORY_ENTRIES {
        return Err(ProposerError::TermHistoryFull);
    }
    let mut history = donor.history.clone();
    history.0.push(TermStart { term, start_lsn: term_start_lsn });
    assert!(history.is_well_formed(), "votes were checked: donor terms are below ours, starts below its flush");
    Ok(Election {
        term,
        term_start_lsn,
        timeline_start_lsn,
        history,
        known_commit_lsn,
        donor: donor_slot,
        pg_timelines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;

    fn config() -> ProposerConfig {
        ProposerConfig::for_tests()
    }

    fn vote(entries: &[(u64, u64)], flush: u64, commit: u64) -> Vote {
        let history = entries.iter().map(|&(t, s)| TermStart { term: Term(t), start_lsn: Lsn(s) }).collect();
        Vote {
            flush_lsn: Lsn(flush),
            commit_lsn: Lsn(commit),
            timeline_start_lsn: Lsn(SEG),
            history: TermHistory(history),
            pg_timelines: PgTimelineHistory::first(),
        }
    }

    /// Rule: the donor is the voter with the highest (last_log_term, flush_lsn),
    /// so a longer log from an older term loses to a shorter, newer one.
    #[test]
    fn donor_is_highest_last_term_then_flush() {
        let old_long = vote(&[(1, SEG)], 5 * SEG, SEG);
        let new_short = vote(&[(1, SEG), (2, 2 * SEG)], 3 * SEG, SEG);
        let election = decide(Term(3), &[(SlotIndex(0), &old_long), (SlotIndex(1), &new_short)], &config()).unwrap();
        assert_eq!(election.term_start_lsn, Lsn(3 * SEG));
        assert_eq!(election.history.0.last(), Some(&TermStart { term: Term(3), start_lsn: Lsn(3 * SEG) }));
        assert_eq!(election.history.0.len(), 3);
    }

    #[test]
    fn empty_cluster_starts_at_the_timeline_start() {
        let empty = vote(&[], 0, 0);
        let election = decide(Term(1), &[(SlotIndex(0), &empty), (SlotIndex(1), &empty)], &config()).unwrap();
        assert_eq!((election.term_start_lsn, election.timeline_start_lsn), (Lsn(SEG), Lsn(SEG)));
    }

    /// Rule: refuse to lead when Postgres's WAL ends before the quorum's log.
    #[test]
    fn refuses_when_postgres_is_behind() {
        let ahead = vote(&[(1, SEG)], 11 * SEG, SEG);
        let result = decide(Term(2), &[(SlotIndex(0), &ahead), (SlotIndex(1), &ahead)], &config());
        assert!(matches!(result, Err(ProposerError::PostgresBehind { .. })), "{result:?}");
    }

    #[test]
    fn malformed_votes_are_peer_faults() {
        let response = |history: Vec<(u64, u64)>, flush: u64, commit: u64| VoteResponse {
            term: Term(5),
            vote_given: true,
            flush_lsn: Lsn(flush),
            commit_lsn: Lsn(commit),
            timeline_start_lsn: Lsn(SEG),
            term_history: TermHistory(
                history.into_iter().map(|(t, s)| TermStart { term: Term(t), start_lsn: Lsn(s) }).collect(),
            ),
            pg_timelines: PgTimelineHistory::first(),
        };
        assert!(Vote::from_response(response(vec![(2, SEG), (1, SEG)], SEG, 0), Term(5)).is_err());
        assert!(Vote::from_response(response(vec![(5, SEG)], SEG, 0), Term(5)).is_err());
        assert!(Vote::from_response(response(vec![(1, 2 * SEG)], SEG, 0), Term(5)).is_err());
        assert!(Vote::from_response(response(vec![(1, SEG)], SEG, 2 * SEG), Term(5)).is_err());
        assert!(Vote::from_response(response(vec![(1, SEG)], 2 * SEG, SEG), Term(4)).is_err());
        assert!(Vote::from_response(response(vec![(1, SEG)], 2 * SEG, SEG), Term(5)).is_ok());
    }

    mod pg_timelines {
        //! `term_pg_timelines` (through `decide`): the Postgres timelines
        //! a term writes under must continue the log's.
        use super::*;
        use crate::proposer::config::ProposerMode;
        use postgres_wal::lsn::PgTimelineId;
        use postgres_wal::timeline_history::PgTimelineSwitch;

        /// Timeline `current` whose ancestors ended at `switches` (LSNs in segments).
        fn history(current: PgTimelineId, switches: &[(PgTimelineId, u64)]) -> PgTimelineHistory {
            let switches = switches
                .iter()
                .map(|&(timeline, end)| PgTimelineSwitch { timeline, end_lsn: Lsn(end), reason: String::new() })
                .collect();
            let history = PgTimelineHistory { current, switches };
            history.validate().unwrap();
            history
        }

        fn vote_on(entries: &[(u64, u64)], flush: u64, pg_timelines: PgTimelineHistory) -> Vote {
            Vote { pg_timelines, ..vote(entries, flush, 0) }
        }

        fn stream_on(pg_timelines: PgTimelineHistory) -> ProposerConfig {
            ProposerConfig { pg_timelines: Some(pg_timelines), ..config() }
        }

        fn sync_config() -> ProposerConfig {
            ProposerConfig { mode: ProposerMode::Sync, pg_timelines: None, ..config() }
        }

        fn decide_with(votes: &[&Vote], config: &ProposerConfig) -> Result<Election, ProposerError> {
            let votes: Vec<(SlotIndex, &Vote)> = votes.iter().enumerate().map(|(i, &v)| (SlotIndex(i), v)).collect();
            decide(Term(9), &votes, config)
        }

        /// Rule: a Postgres on a timeline the log went on from is an old
        /// primary after a failover: Superseded, naming the switch point.
        #[test]
        fn a_timeline_the_log_left_is_superseded() {
            let log = vote_on(&[(1, SEG), (2, 3 * SEG)], 5 * SEG, history(2, &[(1, 3 * SEG)]));
            let result = decide_with(&[&log, &log], &stream_on(PgTimelineHistory::first()));
            let error = result.unwrap_err();
            assert_eq!(error, ProposerError::Superseded { timeline: 1, current: 2, switch_lsn: Lsn(3 * SEG) });
            assert!(error.is_fatal());
            // Two promotions later: the switch named is where our timeline ended.
            let log = vote_on(&[(1, SEG)], 5 * SEG, history(3, &[(1, 2 * SEG), (2, 4 * SEG)]));
            let error = decide_with(&[&log], &stream_on(history(2, &[(1, 2 * SEG)]))).unwrap_err();
            assert_eq!(error, ProposerError::Superseded { timeline: 2, current: 3, switch_lsn: Lsn(4 * SEG) });
        }

        /// Rule: a server promoted before it replayed the whole log (its
        /// switch point from the log's timeline is below the donor's flush
        /// LSN) may not lead: it lacks committed WAL.
        #[test]
        fn a_promotion_below_the_log_end_is_refused() {
            let log = vote_on(&[(1, SEG)], 5 * SEG, PgTimelineHistory::first());
            let behind = vote_on(&[(1, SEG)], 3 * SEG, PgTimelineHistory::first());
            let promoted = history(2, &[(1, 5 * SEG - 8)]);
            let error = decide_with(&[&behind, &log], &stream_on(promoted)).unwrap_err();
            assert_eq!(
                error,
                ProposerError::PromotedBelowLogEnd {
                    timeline: 2,
                    switch_lsn: Lsn(5 * SEG - 8),
                    log_end_lsn: Lsn(5 * SEG),
                    log_timeline: 1
                }
            );
            assert!(error.is_fatal());
        }

        /// Rule: Postgres's history must contain the log's timeline: a
        /// timeline 3 forked from timeline 1 cannot continue a log on 2.
        #[test]
        fn a_timeline_not_descending_from_the_logs_is_refused() {
            let log = vote_on(&[(1, SEG), (2, 3 * SEG)], 5 * SEG, history(2, &[(1, 3 * SEG)]));
            let sibling = history(3, &[(1, 6 * SEG)]);
            let error = decide_with(&[&log, &log], &stream_on(sibling)).unwrap_err();
            assert_eq!(error, ProposerError::UnrelatedTimeline { timeline: 3, log_timeline: 2 });
            assert!(error.is_fatal());
        }

        /// Rule: in Stream mode the term writes Postgres's history: the
        /// same timeline as the log, or a promotion at or after its end
        /// (the WAL from the log's end to the switch point is still the
        /// old timeline's, and Postgres has it), or anything over an
        /// empty log.
        #[test]
        fn stream_mode_writes_postgress_history() {
            let log = vote_on(&[(1, SEG)], 5 * SEG, PgTimelineHistory::first());
            let shorter = vote_on(&[(1, SEG)], 4 * SEG, PgTimelineHistory::first());
            for ours in [PgTimelineHistory::first(), history(2, &[(1, 5 * SEG)]), history(2, &[(1, 6 * SEG)])] {
                let election = decide_with(&[&shorter, &log], &stream_on(ours.clone())).unwrap();
                assert_eq!(election.pg_timelines, ours);
                assert_eq!(election.term_start_lsn, Lsn(5 * SEG));
            }
            // Two promotions since the log's timeline: its switch is what counts.
            let ours = history(3, &[(1, 5 * SEG), (2, 7 * SEG)]);
            assert_eq!(decide_with(&[&log], &stream_on(ours.clone())).unwrap().pg_timelines, ours);
            let empty = vote_on(&[], 0, PgTimelineHistory::first());
            let ours = history(2, &[(1, SEG / 2)]);
            assert_eq!(decide_with(&[&empty, &empty], &stream_on(ours.clone())).unwrap().pg_timelines, ours);
        }

        /// Rule: a sync proposer (no Postgres) writes the donor's history:
        /// the donor is chosen by (last log term, flush LSN) as always, and
        /// its timelines come with its log, whatever the other voters hold.
        #[test]
        fn sync_mode_adopts_the_donors_history() {
            let promoted = history(2, &[(1, 3 * SEG)]);
            let donor = vote_on(&[(1, SEG), (2, 3 * SEG)], 4 * SEG, promoted.clone());
            let old_long = vote_on(&[(1, SEG)], 6 * SEG, PgTimelineHistory::first());
            let election = decide_with(&[&old_long, &donor], &sync_config()).unwrap();
            assert_eq!(election.donor, SlotIndex(1));
            assert_eq!(election.pg_timelines, promoted);
            let on_one = vote_on(&[(1, SEG)], 6 * SEG, PgTimelineHistory::first());
            let election = decide_with(&[&on_one, &on_one], &sync_config()).unwrap();
            assert_eq!(election.pg_timelines, PgTimelineHistory::first());
        }
    }
}
