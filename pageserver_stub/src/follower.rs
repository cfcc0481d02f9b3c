//! Which safekeeper to pull WAL from: a pure state machine.
//!
//! Observations go in (status polls, commit LSNs seen in WAL responses, a
//! failed pull, a 410), each stamped with the caller's clock; [`Follower::choose`]
//! says which safekeeper to pull from next, and why it switched if it did.
//! No I/O and no clock of its own, so the rules below are unit-tested
//! directly:
//!
//! - A new source is the safekeeper with the highest commit LSN among those
//!   that can serve: a fresh status, not cooling down after a failure, and
//!   not known to have removed the WAL at our position. Ties keep the
//!   lowest index, so the choice is deterministic.
//! - The source is kept until it fails (error, silence, timeout: reported by
//!   the puller), says the WAL is gone (410), or lags: another safekeeper
//!   that can serve is ahead of it by more than `lag_threshold_bytes` for
//!   `lag_grace_ms` without interruption. Equal progress never switches, so
//!   sources do not flap.
//! - If nobody can serve, the answer is to wait; only when every safekeeper
//!   is known to lack the WAL at our position is it gone for good. A
//!   safekeeper we have not heard from might still have it.

use std::fmt;
use std::time::{Duration, Instant};

use postgres_wal::lsn::Lsn;

/// The follower's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerTuning {
    /// A source this far behind another safekeeper is lagging (one WAL segment).
    pub lag_threshold_bytes: u64,
    /// How long a source may lag before we switch away from it.
    pub lag_grace_ms: u64,
    /// How long a safekeeper that failed a pull is passed over.
    pub failure_cooldown_ms: u64,
    /// A status older than this no longer makes a safekeeper choosable.
    pub status_fresh_ms: u64,
}

/// Why the source changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchReason {
    /// The first source since start.
    FirstChoice,
    /// The previous source failed a pull (error, silence, timeout); the
    /// puller's description.
    Failed(String),
    /// The previous source no longer has the WAL at `position` (410).
    WalGone { position: Lsn },
    /// The previous source stayed behind the new one by more than the threshold.
    Lagging { source_commit_lsn: Lsn, best_commit_lsn: Lsn, lagging_ms: u64 },
}

impl fmt::Display for SwitchReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchReason::FirstChoice => write!(f, "first choice: highest commit LSN"),
            SwitchReason::Failed(why) => write!(f, "the source failed: {why}"),
            SwitchReason::WalGone { position } => write!(f, "the source no longer has WAL at {position} (410)"),
            SwitchReason::Lagging { source_commit_lsn, best_commit_lsn, lagging_ms } => write!(
                f,
                "the source's commit LSN {source_commit_lsn} was behind {best_commit_lsn} by {} bytes for {lagging_ms} ms",
                best_commit_lsn.0.saturating_sub(source_commit_lsn.0)
            ),
        }
    }
}

/// A change of source (or the first one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switch {
    pub from: Option<usize>,
    pub to: usize,
    pub reason: SwitchReason,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Pull from this safekeeper; `switched` is set when it just became the source.
    Pull { index: usize, switched: Option<Switch> },
    /// Nobody can serve right now; ask again later.
    Wait,
    /// Every safekeeper has removed the WAL at our position.
    WalGone,
}

/// What we know about one safekeeper.
#[derive(Clone, Debug, Default)]
struct Peer {
    /// Highest commit LSN seen (status or `x-commit-lsn`); it never goes back.
    commit_lsn: Option<Lsn>,
    /// When the last successful status was observed.
    status_at: Option<Instant>,
    /// Lower bound of the first WAL byte it still keeps.
    oldest_kept_lsn: Lsn,
    cooldown_until: Option<Instant>,
}

#[derive(Clone, Debug)]
pub struct Follower {
    tuning: FollowerTuning,
    peers: Vec<Peer>,
    source: Option<usize>,
    /// Why the source became unusable, reported with the next switch.
    pending_reason: Option<SwitchReason>,
    /// Since when another safekeeper has been ahead of the source by more than the threshold.
    lagging_since: Option<Instant>,
    switches: u64,
}

impl Follower {
    pub fn new(safekeeper_count: usize, tuning: FollowerTuning) -> Follower {
        Follower {
            tuning,
            peers: vec![Peer::default(); safekeeper_count],
            source: None,
            pending_reason: None,
            lagging_since: None,
            switches: 0,
        }
    }

    /// A successful status poll taken at `at`.
    pub fn observe_status(&mut self, index: usize, at: Instant, commit_lsn: Lsn, oldest_kept_lsn: Option<Lsn>) {
        self.observe_commit(index, commit_lsn);
        let peer = &mut self.peers[index];
        peer.status_at = Some(peer.status_at.map_or(at, |seen| seen.max(at)));
        if let Some(oldest) = oldest_kept_lsn {
            peer.oldest_kept_lsn = peer.oldest_kept_lsn.max(oldest);
        }
    }

    /// A status poll failed, or showed a safekeeper we must not use: it is
    /// no longer choosable as a new source until a good status arrives.
    pub fn observe_status_failure(&mut self, index: usize) {
        self.peers[index].status_at = None;
    }

    /// A commit LSN reported by a WAL response.
    pub fn observe_commit(&mut self, index: usize, commit_lsn: Lsn) {
        let peer = &mut self.peers[index];
        peer.commit_lsn = Some(peer.commit_lsn.map_or(commit_lsn, |seen| seen.max(commit_lsn)));
    }

    /// A pull from `index` failed; pass it over for the cooldown.
    pub fn pull_failed(&mut self, index: usize, now: Instant, why: String) {
        self.peers[index].cooldown_until = Some(now + Duration::from_millis(self.tuning.failure_cooldown_ms));
        if self.source == Some(index) {
            self.pending_reason = Some(SwitchReason::Failed(why));
        }
    }

    /// `index` answered 410 for `position`: its oldest WAL is above it.
    pub fn wal_gone(&mut self, index: usize, position: Lsn) {
        let peer = &mut self.peers[index];
        peer.oldest_kept_lsn = peer.oldest_kept_lsn.max(position + 1);
        if self.source == Some(index) {
            self.pending_reason = Some(SwitchReason::WalGone { position });
        }
    }

    /// Decide where to pull from when our next byte is `position`.
    pub fn choose(&mut self, position: Lsn, now: Instant) -> Choice {
        if let Some(source) = self.source.filter(|&source| self.can_serve(source, position, now)) {
            self.pending_reason = None;
            return match self.lag_switch(source, position, now) {
                Some((to, reason)) => self.switch_to(to, reason),
                None => Choice::Pull { index: source, switched: None },
            };
        }
        self.lagging_since = None;
        let choosable = |index: usize| self.is_fresh(index, now) && self.can_serve(index, position, now);
        match self.highest_commit(choosable) {
            Some(to) => {
                let reason = self.pending_reason.take().unwrap_or(SwitchReason::FirstChoice);
                self.switch_to(to, reason)
            }
            None if self.peers.iter().all(|peer| peer.oldest_kept_lsn > position) => Choice::WalGone,
            None => Choice::Wait,
        }
    }

    pub fn source(&self) -> Option<usize> {
        self.source
    }

    /// Changes of source after the first choice.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    pub fn commit_lsn(&self, index: usize) -> Option<Lsn> {
        self.peers[index].commit_lsn
    }

    /// The highest commit LSN among safekeepers with a fresh status, and the source.
    pub fn best_commit_lsn(&self, now: Instant) -> Option<Lsn> {
        let known = |index: usize| self.is_fresh(index, now) || self.source == Some(index);
        (0..self.peers.len()).filter(|&index| known(index)).filter_map(|index| self.peers[index].commit_lsn).max()
    }

    fn switch_to(&mut self, to: usize, reason: SwitchReason) -> Choice {
        let from = self.source;
        if from.is_some_and(|from| from != to) {
            self.switches += 1;
        }
        self.source = Some(to);
        self.lagging_since = None;
        self.pending_reason = None;
        if from == Some(to) {
            // The same safekeeper again after its cooldown: a retry, not a switch.
            return Choice::Pull { index: to, switched: None };
        }
        Choice::Pull { index: to, switched: Some(Switch { from, to, reason }) }
    }

    /// Switch away from a source that has lagged long enough behind another
    /// safekeeper that could take over.
    fn lag_switch(&mut self, source: usize, position: Lsn, now: Instant) -> Option<(usize, SwitchReason)> {
        let source_commit_lsn = self.peers[source].commit_lsn.unwrap_or(Lsn::INVALID);
        let ahead = |index: usize| {
            index != source
                && self.is_fresh(index, now)
                && self.can_serve(index, position, now)
                && self.peers[index].commit_lsn.is_some_and(|commit| {
                    commit.0.saturating_sub(source_commit_lsn.0) > self.tuning.lag_threshold_bytes
                })
        };
        let Some(best) = self.highest_commit(ahead) else {
            self.lagging_since = None;
            return None;
        };
        let since = *self.lagging_since.get_or_insert(now);
        let lagging_ms = now.saturating_duration_since(since).as_millis() as u64;
        if lagging_ms < self.tuning.lag_grace_ms {
            return None;
        }
        let best_commit_lsn = self.peers[best].commit_lsn.unwrap_or(Lsn::INVALID);
        Some((best, SwitchReason::Lagging { source_commit_lsn, best_commit_lsn, lagging_ms }))
    }

    /// The highest-commit safekeeper among `eligible` ones, lowest index on ties.
    fn highest_commit(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        (0..self.peers.len())
            .filter(|&index| eligible(index))
            .filter_map(|index| self.peers[index].commit_lsn.map(|commit| (commit, std::cmp::Reverse(index))))
            .max()
            .map(|(_, std::cmp::Reverse(index))| index)
    }

    fn is_fresh(&self, index: usize, now: Instant) -> bool {
        let fresh_for = Duration::from_millis(self.tuning.status_fresh_ms);
        self.peers[index].status_at.is_some_and(|at| now.saturating_duration_since(at) <= fresh_for)
    }

    /// Not cooling down and not known to lack the WAL at `position`.
    fn can_serve(&self, index: usize, position: Lsn, now: Instant) -> bool {
        let peer = &self.peers[index];
        let cooling_down = peer.cooldown_until.is_some_and(|until| now < until);
        !cooling_down && peer.oldest_kept_lsn <= position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT_BYTES: u64 = 1 << 20;
    const TUNING: FollowerTuning = FollowerTuning {
        lag_threshold_bytes: SEGMENT_BYTES,
        lag_grace_ms: 2000,
        failure_cooldown_ms: 1000,
        status_fresh_ms: 3000,
    };

    fn ms(base: Instant, millis: u64) -> Instant {
        base + Duration::from_millis(millis)
    }

    /// Three safekeepers with fresh statuses at `now` and these commit LSNs.
    fn follower_with_commits(now: Instant, commits: [u64; 3]) -> Follower {
        let mut follower = Follower::new(3, TUNING);
        for (index, commit) in commits.into_iter().enumerate() {
            follower.observe_status(index, now, Lsn(commit), None);
        }
        follower
    }

    fn pulled_index(choice: &Choice) -> usize {
        match choice {
            Choice::Pull { index, .. } => *index,
            other => panic!("expected a pull, got {other:?}"),
        }
    }

    /// Rule: a new source is the safekeeper with the highest commit LSN.
    #[test]
    fn first_choice_is_the_highest_commit() {
        let now = Instant::now();
        let mut follower = follower_with_commits(now, [0x10_0000, 0x30_0000, 0x20_0000]);
        let choice = follower.choose(Lsn(0x10_0000), now);
        let expected = Switch { from: None, to: 1, reason: SwitchReason::FirstChoice };
        assert_eq!(choice, Choice::Pull { index: 1, switched: Some(expected) });
        assert_eq!(follower.switches(), 0, "the first choice is not a switch");
        assert_eq!(follower.best_commit_lsn(now), Some(Lsn(0x30_0000)));
    }

    /// Rule: equal or slightly better progress elsewhere never switches.
    #[test]
    fn keeps_the_source_when_others_catch_up_or_lead_by_less_than_a_segment() {
        let now = Instant::now();
        let mut follower = follower_with_commits(now, [0x10_0000, 0x30_0000, 0x20_0000]);
        follower.choose(Lsn(0x10_0000), now);
        follower.observe_status(0, ms(now, 100), Lsn(0x30_0000 + SEGMENT_BYTES), None);
        for millis in [100, 3000, 6000] {
            follower.observe_status(1, ms(now, millis), Lsn(0x30_0000), None);
            follower.observe_status(0, ms(now, millis), Lsn(0x30_0000 + SEGMENT_BYTES), None);
            assert_eq!(follower.choose(Lsn(0x20_0000), ms(now, millis)), Choice::Pull { index: 1, switched: None });
        }
        assert_eq!(follower.switches(), 0);
    }

    /// Rule: lagging by more than a segment for the grace period switches to
    /// the best safekeeper; a lag that ends before the grace does not.
    #[test]
    fn lag_beyond_a_segment_for_the_grace_period_switches() {
        let now = Instant::now();
        let mut follower = follower_with_commits(now, [0x30_0000, 0x10_0000, 0x20_0000]);
        assert_eq!(pulled_index(&follower.choose(Lsn(0x10_0000), now)), 0);
        let far_ahead = Lsn(0x30_0000 + SEGMENT_BYTES + 1);
        follower.observe_status(2, ms(now, 500), far_ahead, None);
        assert_eq!(follower.choose(Lsn(0x20_0000), ms(now, 500)), Choice::Pull { index: 0, switched: None });
        // The source catches up briefly: the grace period starts over.
        follower.observe_commit(0, Lsn(0x30_0000 + 2));
        assert_eq!(pulled_index(&follower.choose(Lsn(0x20_0000), ms(now, 1500))), 0);
        follower.observe_status(2, ms(now, 1600), Lsn(0x30_0002 + SEGMENT_BYTES + 1), None);
        follower.observe_status(0, ms(now, 1600), Lsn(0x30_0002), None);
        assert_eq!(pulled_index(&follower.choose(Lsn(0x20_0000), ms(now, 1600))), 0);
        assert_eq!(pulled_index(&follower.choose(Lsn(0x20_0000), ms(now, 3000))), 0, "1400 ms < grace");
        follower.observe_status(2, ms(now, 3500), Lsn(0x30_0002 + SEGMENT_BYTES + 1), None);
        let choice = follower.choose(Lsn(0x20_0000), ms(now, 3600));
        let Choice::Pull { index: 2, switched: Some(switch) } = choice else { panic!("expected a switch: {choice:?}") };
        assert_eq!(switch.from, Some(0));
        assert!(matches!(switch.reason, SwitchReason::Lagging { lagging_ms: 2000, .. }), "{:?}", switch.reason);
        assert!(switch.reason.to_string().contains("behind"), "{}", switch.reason);
        assert_eq!(follower.switches(), 1);
    }

    /// Rule: a failed pull switches to the next best safekeeper and passes
    /// the failed one over for the cooldown; after it, it is choosable again.
    #[test]
    fn a_failed_source_is_replaced_and_cools_down() {
        let now = Instant::now();
        let mut follower = follower_with_commits(now, [0x30_0000, 0x20_0000, 0x10_0000]);
        assert_eq!(pulled_index(&follower.choose(Lsn(0x10_0000), now)), 0);
        follower.pull_failed(0, ms(now, 10), "connection refused".to_string());
        let choice = follower.choose(Lsn(0x18_0000), ms(now, 10));
        let reason = SwitchReason::Failed("connection refused".to_string());
        assert_eq!(choice, Choice::Pull { index: 1, switched: Some(Switch { from: Some(0), to: 1, reason }) });
        // The new source fails too: the last one left serves.
        follower.pull_failed(1, ms(now, 20), "body ended short".to_string());
        assert_eq!(pulled_index(&follower.choose(Lsn(0x18_0000), ms(now, 20))), 2);
        follower.pull_failed(2, ms(now, 30), "silent for 5000 ms".to_string());
        assert_eq!(follower.choose(Lsn(0x18_0000), ms(now, 30)), Choice::Wait, "all cooling down");
        // Cooldowns over (statuses refreshed): the highest commit wins again.
        for index in 0..3 {
            follower.observe_status(index, ms(now, 1015), Lsn(0x30_0000), None);
        }
        let choice = follower.choose(Lsn(0x18_0000), ms(now, 1015));
        assert_eq!(pulled_index(&choice), 0);
        assert_eq!(follower.switches(), 3);
    }

    /// A failed only safekeeper is retried after its cooldown; a retry is
    /// not a switch.
    #[test]
    fn a_single_safekeeper_is_retried_after_its_cooldown() {
        let now = Instant::now();
        let mut follower = Follower::new(1, TUNING);
        follower.observe_status(0, now, Lsn(0x20_0000), None);
        follower.choose(Lsn(0x10_0000), now);
        follower.pull_failed(0, now, "timeout".to_string());
        assert_eq!(follower.choose(Lsn(0x10_0000), ms(now, 500)), Choice::Wait);
        assert_eq!(follower.choose(Lsn(0x10_0000), ms(now, 1000)), Choice::Pull { index: 0, switched: None });
        assert_eq!(follower.switches(), 0);
    }

    /// Rule: stale statuses do not make a safekeeper choosable.
    #[test]
    fn only_fresh_statuses_make_a_new_source() {
        let now = Instant::now();
        let mut follower = follower_with_commits(now, [0x30_0000, 0x20_0000, 0x10_0000]);
        follower.observe_status(2, ms(now, 3500), Lsn(0x10_0000), None);
        assert_eq!(pulled_index(&follower.choose(Lsn(0x10_0000), ms(now, 3500))), 2);
        follower.observe_status_failure(2);
        follower.pull_failed(2, ms(now, 3600), "connection reset".to_string());
        assert_eq!(follower.choose(Lsn(0x10_0000), ms(now, 3600)), Choice::Wait);
    }

    /// Rule: 410 from the source moves to a safekeeper that still has the
    /// WAL; gone everywhere is final; unknown safekeepers might have it.
    #[test]
    fn wal_gone_moves_on_and_is_final_only_when_gone_everywhere() {
        let now = Instant::now();
        let mut follower = follower_with_commits(now, [0x30_0000, 0x20_0000, 0x10_0000]);
        let position = Lsn(0x10_0028);
        follower.choose(position, now);
        follower.wal_gone(0, position);
        let choice = follower.choose(position, now);
        assert_eq!(pulled_index(&choice), 1);
        let Choice::Pull { switched: Some(switch), .. } = choice else { unreachable!() };
        assert_eq!(switch.reason, SwitchReason::WalGone { position });
        follower.observe_status(2, now, Lsn(0x10_0000), Some(Lsn(0x20_0000)));
        follower.wal_gone(1, position);
        assert_eq!(follower.choose(position, now), Choice::WalGone);
        // With one safekeeper never heard from, waiting is the answer.
        let mut partial = Follower::new(2, TUNING);
        partial.observe_status(0, now, Lsn(0x30_0000), Some(Lsn(0x20_0000)));
        assert_eq!(partial.choose(position, now), Choice::Wait);
    }
}
