//! The proposer as a pure state machine: no I/O, no clock (time comes in as
//! `now_ms`), outputs are polled. docs/proposer.md explains the rules.
//!
//! Inputs: [`Proposer::on_connected`], [`Proposer::on_disconnected`],
//! [`Proposer::on_message`], [`Proposer::on_wal`], [`Proposer::tick`].
//! Outputs: [`Proposer::poll_transmit`], [`Proposer::commit_lsn`],
//! [`Proposer::wal_wanted_from`], [`Proposer::status`].
//!
//! - [`config`]: configuration and limits.
//! - [`campaign`]: greeting a quorum, picking the term, asking for votes,
//!   deciding the election.
//! - [`election`]: votes, donor choice, the new term's history.
//! - [`commit`]: the quorum commit rule.
//! - [`log_check`]: Postgres's WAL below the term start must be the log's.
//! - [`membership`]: which safekeepers count, and changing them.
//! - [`flow`]: what streaming sends a safekeeper next (WAL within segment
//!   and window, a heartbeat), or that it is too far behind.
//! - [`wal_source`]: where the safekeepers' WAL comes from: the buffer,
//!   catch-up below it, trimming, what can still be resent.
//! - [`wal_buffer`]: one contiguous, bounded run of WAL.
//! - [`peer`]: per-safekeeper state and `Peers`, the slot table;
//!   [`status`]: the status snapshot.

mod campaign;
mod commit;
mod config;
mod election;
mod error;
mod flow;
mod log_check;
mod membership;
mod peer;
mod status;
mod wal_buffer;
mod wal_source;

#[cfg(test)]
mod tests;

use postgres_wal::lsn::{Lsn, PgTimelineId};
use safekeeper_protocol::ids::Term;
use safekeeper_protocol::protocol::{
    AcceptorMessage, AppendRequest, AppendResponse, Greeting, GreetingResponse, ProposerElected, ProposerMessage,
    VoteRequest, VoteResponse, WalDigestRequest, WalDigestResponse, NO_PG_TIMELINE, PROTOCOL_VERSION,
};

pub use membership::{ChangeStatus, MembershipRequestError, MembershipStatus, NewMemberStatus, MAX_PEER_SLOTS};

pub use config::{ProposerConfig, ProposerMode, MAX_APPEND_CHUNK_BYTES, MAX_SAFEKEEPERS, MIN_BUFFERED_WAL_BYTES};
pub use error::{PeerFault, ProposerError};
pub use peer::SlotIndex;
pub use status::{PeerState, Phase, ProposerStatus, SafekeeperStatus};

use campaign::{Ask, Campaign, Stage, VoteAnswer};
use election::Election;
use log_check::{LogCheck, Verdict};
use membership::Membership;
use peer::{Link, Peer, Peers};
use wal_buffer::WalBuffer;
use wal_source::{TrimScope, WalSource};

pub struct Proposer {
    config: ProposerConfig,
    peers: Peers,
    membership: Membership,
    campaign: Campaign,
    /// Set once any safekeeper shows a term that is not ours to use.
    fenced_by: Option<Term>,
    commit_lsn: Lsn,
    /// WAL from Postgres for the safekeepers, from the first after the election.
    wal: WalSource,
    /// The time of the latest input, stamped on what `poll_transmit` sends.
    now_ms: u64,
    /// Where `poll_transmit` looks first, so no safekeeper starves.
    next_poll_index: usize,
    /// Tests only ([`Proposer::break_commit_rule_for_tests`]): count flushes
    /// below the term start too, to show that the checks catch the result.
    count_flushes_below_term_start: bool,
    /// Tests only ([`Proposer::keep_laggards_for_tests`]): never release a
    /// laggard from a full buffer, to show that the liveness check catches
    /// a proposer that waits for its slowest member.
    keep_laggards: bool,
    /// No WAL is sent in our term until Postgres's WAL below the term start
    /// is shown to be the log's (`log_check`).
    log_check: LogCheckState,
    /// Sync mode: when the donor's log end was committed.
    sync_committed_at_ms: Option<u64>,
}

enum LogCheckState {
    /// Starts with Postgres's first WAL (its range depends on where
    /// Postgres could stream from).
    NotStarted,
    Running(Box<LogCheck>),
    Passed,
}

impl Proposer {
    /// Drop the commit rule's term-start floor (Raft's figure 8), for the
    /// test that shows the checks catch a broken rule.
    #[cfg(test)]
    pub(crate) fn break_commit_rule_for_tests(&mut self) {
        self.count_flushes_below_term_start = true;
    }

    /// Never release laggards from a full buffer (the commit then waits for
    /// the slowest member), for the test that shows the liveness check
    /// catches it.
    #[cfg(test)]
    pub(crate) fn keep_laggards_for_tests(&mut self) {
        self.keep_laggards = true;
    }

    pub fn new(config: ProposerConfig) -> Self {
        config.assert_valid();
        Proposer {
            peers: Peers::from_addrs(&config.safekeepers),
            membership: Membership::from_command_line(&config.safekeepers, config.heartbeat_interval_ms),
            wal: WalSource::new(config.max_buffered_wal_bytes, config.wal_segment_size),
            config,
            campaign: Campaign::new(),
            fenced_by: None,
            commit_lsn: Lsn::INVALID,
            now_ms: 0,
            next_poll_index: 0,
            count_flushes_below_term_start: false,
            keep_laggards: false,
            log_check: LogCheckState::NotStarted,
            sync_committed_at_ms: None,
        }
    }

    /// A (re)connection to safekeeper `sk`: greet it. Whatever it needs next
    /// (a vote request, ProposerElected, WAL from its flush) follows its answer.
    pub fn on_connected(&mut self, sk: SlotIndex, now_ms: u64) {
        self.now_ms = now_ms;
        if !self.link_wanted(sk) {
            return;
        }
        if self.peers[sk].link != Link::Disconnected {
            self.on_disconnected(sk, now_ms);
        }
        let greeting = Greeting {
            protocol_version: PROTOCOL_VERSION,
            cluster: self.config.cluster,
            pg_version: self.config.pg_version,
            wal_segment_size_bytes: u32::try_from(self.config.wal_segment_size.bytes()).expect("at most 1 GiB"),
            proposer_id: self.config.proposer_id,
            generation: self.membership.current.generation,
            pg_timeline: self.pg_timeline(),
        };
        let peer = &mut self.peers[sk];
        peer.link = Link::AwaitingGreeting;
        peer.last_heard_ms = now_ms;
        peer.queue(ProposerMessage::Greeting(greeting));
    }

    /// The connection to `sk` is gone: nothing queued for it may reach the
    /// next one. What it acknowledged stays known (it is durable there).
    pub fn on_disconnected(&mut self, sk: SlotIndex, now_ms: u64) {
        self.now_ms = now_ms;
        let peer = &mut self.peers[sk];
        peer.link = Link::Disconnected;
        peer.outbox.clear();
        peer.awaited_for_wal_start = false;
        peer.membership_outstanding = false;
        peer.sent_commit_lsn = Lsn::INVALID;
        if let LogCheckState::Running(check) = &mut self.log_check {
            check.on_disconnected(sk);
            self.ask_for_log_digest();
        }
    }

    /// A message from `sk` on its current connection. `Err(Fenced)` and the
    /// other fatal errors mean the shim must exit; a `Peer` fault means this
    /// connection should be dropped (then `on_disconnected`).
    pub fn on_message(&mut self, sk: SlotIndex, message: AcceptorMessage, now_ms: u64) -> Result<(), ProposerError> {
        self.check_not_fenced()?;
        self.now_ms = now_ms;
        if !self.link_wanted(sk) {
            return Ok(()); // a safekeeper we stopped talking to
        }
        self.peers[sk].last_heard_ms = now_ms;
        let result = match message {
            AcceptorMessage::GreetingResponse(response) => self.on_greeting_response(sk, response),
            AcceptorMessage::VoteResponse(response) => self.on_vote_response(sk, response),
            AcceptorMessage::AppendResponse(response) => self.on_append_response(sk, response),
            AcceptorMessage::WalDigestResponse(response) => self.on_digest_response(sk, response),
            AcceptorMessage::MembershipResponse(response) => self.on_membership_response(sk, response),
        };
        if let Err(ProposerError::Fenced { term }) = result {
            self.fenced_by = Some(term);
        }
        result
    }

    /// WAL from Postgres, contiguous from `wal_wanted_from()`. Call
    /// [`Proposer::can_accept_wal`] first: a full buffer is refused unchanged.
    pub fn on_wal(&mut self, start_lsn: Lsn, wal: &[u8]) -> Result<(), ProposerError> {
        self.check_not_fenced()?;
        let expected = self.wal_wanted_from().ok_or(ProposerError::WalNotWanted)?;
        if start_lsn != expected {
            return Err(ProposerError::WalNotContiguous { expected, got: start_lsn });
        }
        if let (ProposerMode::Sync, Some(election)) = (self.config.mode, self.campaign.election()) {
            if start_lsn + wal.len() as u64 > election.term_start_lsn {
                return Err(ProposerError::WalNotWanted); // beyond the donor's log end
            }
        }
        if self.wal.is_below_buffer(start_lsn) {
            self.wal.take_catch_up(start_lsn, wal);
            return Ok(());
        }
        if self.check_postgres_wal(start_lsn, wal)? {
            return Ok(());
        }
        self.release_laggards(wal.len() as u64);
        self.wal.take(start_lsn, wal, &self.peers)
    }

    /// The quorum sets the pace: when the buffer cannot take `len_bytes`
    /// more while it keeps WAL for every streaming safekeeper, the ones
    /// behind the commit LSN (not needed for any quorum that commits) are
    /// released from it. They are sent heartbeats only, which tell them the
    /// commit LSN, so peer recovery catches them up, and a reconnection
    /// streams to them again (docs/proposer.md, "The quorum sets the pace").
    fn release_laggards(&mut self, len_bytes: u64) {
        let wanted_from = self.wal_wanted_from();
        let release_below = self.release_below();
        if !release_below.is_valid() || self.wal.can_accept(len_bytes, wanted_from, &self.peers, Lsn::INVALID) {
            return;
        }
        for sk in self.peers.slots() {
            let peer = &mut self.peers[sk];
            let behind = peer.flush_lsn.is_some_and(|flush| flush < release_below);
            if matches!(peer.link, Link::Streaming { .. }) && behind {
                tracing::warn!(
                    safekeeper = %peer.addr,
                    flush_lsn = ?peer.flush_lsn,
                    commit_lsn = %self.commit_lsn,
                    "released from the WAL buffer: it lags the quorum by more than the buffer holds; peer recovery \
                     catches it up"
                );
                peer.link = Link::TooFarBehind;
            }
        }
    }

    /// Streaming safekeepers flushed below this may be released from a
    /// full buffer: the commit LSN, while those at or past it form a
    /// quorum of every set (a new member catching up during a membership
    /// change is needed, so then none is); `Lsn::INVALID`: none may.
    fn release_below(&self) -> Lsn {
        let commit_lsn = self.commit_lsn;
        if self.keep_laggards {
            return Lsn::INVALID;
        }
        let keepers_commit = self.membership.is_quorum(&self.peers, |peer| {
            matches!(peer.link, Link::Streaming { .. }) && peer.flush_lsn.is_some_and(|flush| flush >= commit_lsn)
        });
        if keepers_commit {
            commit_lsn
        } else {
            Lsn::INVALID
        }
    }

    /// Connected safekeepers silent for `silence_timeout_ms`: the driver
    /// drops their connections (they reconnect and resume from their
    /// flush LSN).
    pub fn silent_safekeepers(&self) -> Vec<SlotIndex> {
        let timeout_ms = self.config.silence_timeout_ms;
        self.peers
            .slots()
            .filter(|&sk| {
                let peer = &self.peers[sk];
                peer.link != Link::Disconnected && self.now_ms.saturating_sub(peer.last_heard_ms) >= timeout_ms
            })
            .collect()
    }

    /// Whether `on_wal` can take `len_bytes` more now; the driver stops
    /// reading Postgres while it cannot (backpressure). A catch-up always
    /// fits: it starts only if the buffer could hold all WAL from its start.
    pub fn can_accept_wal(&self, len_bytes: u64) -> bool {
        // Counting the room releasing laggards would make (`release_laggards`).
        self.wal.can_accept(len_bytes, self.wal_wanted_from(), &self.peers, self.release_below())
    }

    /// The passage of time: idle safekeepers become due for a heartbeat.
    /// Fatal when the log check found nobody to ask for too long.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), ProposerError> {
        self.now_ms = now_ms;
        if self.campaign.is_greeting() && self.fenced_by.is_none() {
            self.start_voting_if_quorum_greeted();
        }
        if let LogCheckState::Running(check) = &self.log_check {
            let waited_ms = check.unasked_since_ms.map_or(0, |since| now_ms.saturating_sub(since));
            if waited_ms >= LOG_CHECK_HOLDER_WAIT_HEARTBEATS * self.config.heartbeat_interval_ms {
                return Err(ProposerError::NoLogHolder { term_start_lsn: check.end_lsn, waited_ms });
            }
        }
        self.advance_membership();
        Ok(())
    }

    /// The next time (ms) the proposer must be called with [`Proposer::tick`]
    /// and polled although nothing else happened: a heartbeat falling due,
    /// or a wait that ends (the greeting wait before picking a term, the
    /// wait for every voter's log end, the log check's wait for a holder,
    /// a change's wait for removed members). `None`: only input moves it.
    /// A heartbeat already due is returned as is (the next poll sends it);
    /// waits that already ended are left out, as nothing resets them.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.fenced_by.is_some() {
            return None;
        }
        let heartbeat_ms = self.config.heartbeat_interval_ms;
        let heartbeats = self.campaign.election().and_then(|_| {
            self.peers
                .iter()
                .filter(|peer| matches!(peer.link, Link::Streaming { .. } | Link::TooFarBehind))
                .map(|peer| peer.last_sent_ms + heartbeat_ms)
                .min()
        });
        let greeting_wait = self.campaign.greeting_wait_ends_ms(heartbeat_ms);
        let wal_start_wait = self.campaign.voters_wait_ends_ms(heartbeat_ms).filter(|_| self.wal.buffer().is_none());
        let log_check_wait = match &self.log_check {
            LogCheckState::Running(check) => {
                check.unasked_since_ms.map(|since| since + LOG_CHECK_HOLDER_WAIT_HEARTBEATS * heartbeat_ms)
            }
            _ => None,
        };
        let waits =
            [greeting_wait, wal_start_wait, log_check_wait, self.membership_wait_ends_ms(), self.sync_wait_ends_ms()];
        let pending_waits = waits.into_iter().flatten().filter(|&at_ms| at_ms > self.now_ms);
        let silence_ends = self
            .peers
            .iter()
            .filter(|peer| peer.link != Link::Disconnected)
            .map(|peer| peer.last_heard_ms + self.config.silence_timeout_ms)
            .min();
        heartbeats.into_iter().chain(pending_waits).chain(silence_ends).min()
    }

    /// Whether the driver should keep a connection to slot `sk`.
    pub fn link_wanted(&self, sk: SlotIndex) -> bool {
        self.peers.get(sk).is_some_and(|peer| self.wanted(peer))
    }

    /// The next message to send, and to which safekeeper.
    pub fn poll_transmit(&mut self) -> Option<(SlotIndex, ProposerMessage)> {
        if self.fenced_by.is_some() {
            return None;
        }
        let count = self.peers.len();
        for step in 0..count {
            let sk = SlotIndex((self.next_poll_index + step) % count);
            if let Some(message) = self.next_message(sk) {
                self.next_poll_index = (sk.0 + 1) % count;
                self.peers[sk].last_sent_ms = self.now_ms;
                return Some((sk, message));
            }
        }
        None
    }

    /// The LSN a quorum has durably flushed: what the shim reports to
    /// Postgres as write/flush/apply. Never moves backwards.
    pub fn commit_lsn(&self) -> Lsn {
        self.commit_lsn
    }

    /// The end of the WAL taken from the source (Postgres or the donor),
    /// once elected and some arrived.
    pub fn wal_end_lsn(&self) -> Option<Lsn> {
        self.wal.buffer().map(WalBuffer::end_lsn)
    }

    /// In sync mode, once done: the LSN a quorum holds in our term and has
    /// committed, the donor's log end (docs/failover.md). Done when every
    /// safekeeper we are connected to reported it as its commit LSN (one
    /// still greeting or catching up included), or `SYNC_STRAGGLER_WAIT_HEARTBEATS`
    /// after the quorum did: a hung one must not hold the sync up (it
    /// learns the commit LSN from the next proposer). Never in stream mode.
    pub fn synced_lsn(&self) -> Option<Lsn> {
        let target = self.sync_target()?;
        let knows = |peer: &Peer| peer.reported_commit_lsn.is_some_and(|commit| commit >= target);
        let mut connected = self.peers.iter().filter(|peer| peer.link != Link::Disconnected && self.wanted(peer));
        let everyone_knows = connected.all(knows);
        let waited_long_enough = self.sync_wait_ends_ms().is_some_and(|ends_ms| self.now_ms >= ends_ms);
        (self.is_quorum(knows) && (everyone_knows || waited_long_enough)).then_some(target)
    }

    /// In sync mode once the donor's log end is committed: that LSN.
    fn sync_target(&self) -> Option<Lsn> {
        let election = self.campaign.election()?;
        let committed = self.config.mode == ProposerMode::Sync && self.commit_lsn >= election.term_start_lsn;
        committed.then_some(election.term_start_lsn)
    }

    /// When a sync stops waiting for the slower safekeepers to learn the
    /// commit LSN.
    fn sync_wait_ends_ms(&self) -> Option<u64> {
        self.sync_target()?;
        Some(self.sync_committed_at_ms? + SYNC_STRAGGLER_WAIT_HEARTBEATS * self.config.heartbeat_interval_ms)
    }

    /// Once elected: the election's donor and our term (a sync reads the
    /// donor's log as that term's proposer).
    pub fn donor(&self) -> Option<(SlotIndex, Term)> {
        let election = self.campaign.election()?;
        Some((election.donor, election.term))
    }

    /// Once elected and the safekeepers told where their logs end: where
    /// Postgres streaming must start (START_REPLICATION). Once WAL flows it
    /// is where the next WAL must start. When it differs from where the
    /// stream is, the driver restarts the stream there: below the buffer
    /// to catch up a safekeeper that (re)joined behind it, and back at the
    /// buffer's end once that is done.
    pub fn wal_wanted_from(&self) -> Option<Lsn> {
        let wanted = self.wal_wanted_from_source()?;
        match self.campaign.election() {
            // A sync reads the donor's log up to its end, no further.
            Some(election) if self.config.mode == ProposerMode::Sync => {
                Some(wanted).filter(|&lsn| lsn < election.term_start_lsn)
            }
            _ => Some(wanted),
        }
    }

    fn wal_wanted_from_source(&self) -> Option<Lsn> {
        let election = self.campaign.election()?;
        if self.fenced_by.is_some() {
            return None;
        }
        if let Some(from) = self.wal.wanted_from(&self.peers) {
            return Some(from);
        }
        let log_check_wants = match &self.log_check {
            LogCheckState::NotStarted => {
                Some(self.log_check_start(election)).filter(|&start| start < election.term_start_lsn)
            }
            LogCheckState::Running(check) => check.postgres_wanted_from(),
            LogCheckState::Passed => None,
        };
        if log_check_wants.is_some() {
            return log_check_wants;
        }
        if self.peers.iter().any(|peer| peer.awaited_for_wal_start) {
            // A stalled safekeeper must not hold up every commit: once a
            // quorum answered, the rest get a heartbeat interval (a late one
            // is caught up from Postgres later).
            let quorum_answered = self.is_quorum(|peer| matches!(peer.link, Link::Streaming { .. }));
            let voters_wait = self.campaign.voters_wait_ends_ms(self.config.heartbeat_interval_ms);
            let waiting = voters_wait.is_some_and(|ends_ms| self.now_ms < ends_ms);
            if !quorum_answered || waiting {
                return None;
            }
        }
        let lowest_needed = self
            .peers
            .iter()
            .filter_map(|peer| peer.flush_lsn)
            .filter(|&flush| flush >= self.wal.removed_below())
            .fold(election.term_start_lsn, Lsn::min);
        // Below where Postgres can stream, a safekeeper is too far behind.
        Some(lowest_needed.max(self.config.timeline_start_lsn))
    }

    /// Where the log check's range starts: `CHECKED_BYTES` below the term
    /// start, but not below where the timeline or Postgres's WAL begins.
    fn log_check_start(&self, election: &Election) -> Lsn {
        let floor = election.timeline_start_lsn.max(self.config.timeline_start_lsn).max(self.wal.removed_below());
        let below = Lsn(election.term_start_lsn.0.saturating_sub(log_check::CHECKED_BYTES));
        below.max(floor).min(election.term_start_lsn)
    }

    /// Before the buffer: Postgres streams the log check's range first (on
    /// its own, so a buffer filled for lagging safekeepers cannot hold it
    /// up), then from where the safekeepers need WAL. Returns whether `wal`
    /// was the check's.
    fn check_postgres_wal(&mut self, start_lsn: Lsn, wal: &[u8]) -> Result<bool, ProposerError> {
        let Some(election) = self.campaign.election() else { unreachable!("WAL flows once elected") };
        if let LogCheckState::NotStarted = self.log_check {
            // An empty range (nothing below the term start can be streamed:
            // a new timeline, or Postgres's WAL there is gone) checks the
            // first record after the term start instead.
            let check_start = self.log_check_start(election);
            assert_eq!(start_lsn, check_start, "wal_wanted_from asked for the check's range");
            let check = LogCheck::new(check_start, election.term_start_lsn, self.config.wal_segment_size);
            self.log_check = LogCheckState::Running(Box::new(check));
            self.ask_for_log_digest();
        }
        let LogCheckState::Running(check) = &mut self.log_check else { return Ok(false) };
        let check_only = check.postgres_wanted_from().is_some();
        if check_only {
            check.on_postgres_wal(start_lsn, wal);
        } else {
            check.on_wal_after_term_start(start_lsn, wal);
        }
        self.conclude_log_check()?;
        Ok(check_only)
    }

    /// Ask a safekeeper whose log is ours up to the term start (it
    /// acknowledged our ProposerElected with a flush there) for its digest.
    fn ask_for_log_digest(&mut self) {
        let (LogCheckState::Running(check), Some(election)) = (&mut self.log_check, self.campaign.election()) else {
            return;
        };
        if check.asked.is_some() {
            return;
        }
        let holder = self.peers.slots().find(|&sk| {
            let peer = &self.peers[sk];
            matches!(peer.link, Link::Streaming { .. }) && peer.flush_lsn.is_some_and(|f| f >= check.end_lsn)
        });
        let Some(sk) = holder else {
            check.unasked_since_ms.get_or_insert(self.now_ms);
            return;
        };
        check.asked = Some(sk);
        check.unasked_since_ms = None;
        self.peers[sk].queue(ProposerMessage::WalDigestRequest(WalDigestRequest {
            cluster: self.config.cluster,
            term: election.term,
            generation: self.membership.current.generation,
            start_lsn: check.start_lsn,
            end_lsn: check.end_lsn,
        }));
    }

    fn on_digest_response(&mut self, sk: SlotIndex, response: WalDigestResponse) -> Result<(), ProposerError> {
        self.check_term(response.term)?;
        let Some(term) = self.campaign.term() else { return Err(self.unexpected(sk, "WalDigestResponse")) };
        let peer_fault = |fault| ProposerError::Peer { safekeeper: sk, fault };
        if response.term != term {
            return Err(peer_fault(PeerFault::WrongTerm { expected: term, got: response.term }));
        }
        let LogCheckState::Running(check) = &mut self.log_check else {
            return Err(self.unexpected(sk, "WalDigestResponse"));
        };
        check.on_answer(sk, &response).map_err(peer_fault)?;
        self.conclude_log_check()
    }

    /// Fatal on a mismatch; WAL starts flowing to the safekeepers on a match.
    fn conclude_log_check(&mut self) -> Result<(), ProposerError> {
        let LogCheckState::Running(check) = &self.log_check else { return Ok(()) };
        match check.verdict() {
            Verdict::Waiting => Ok(()),
            Verdict::Same => {
                self.log_check = LogCheckState::Passed;
                self.advance_membership();
                Ok(())
            }
            Verdict::Different => Err(ProposerError::PostgresDiverged {
                start_lsn: check.start_lsn,
                end_lsn: check.end_lsn,
                safekeeper: check.asked.expect("an answer came from the asked safekeeper"),
            }),
        }
    }

    /// Postgres answered that it no longer holds the WAL at `lsn` (its
    /// segment was removed). WAL that only lagging safekeepers needed (below
    /// the buffer, or below the term start before streaming began) is given
    /// up: they are reported too far behind. Anything else is fatal:
    /// Postgres lost WAL the quorum needs.
    pub fn on_wal_unavailable(&mut self, lsn: Lsn) -> Result<(), ProposerError> {
        if let LogCheckState::Running(check) = &self.log_check {
            if check.postgres_wanted_from().is_some() {
                return Err(ProposerError::LogCheckWalRemoved { lsn });
            }
        }
        let quorum_needs_from = match (self.wal.buffer(), self.campaign.election()) {
            (Some(buffer), _) => buffer.start_lsn(),
            (None, Some(election)) => election.term_start_lsn,
            (None, _) => Lsn::INVALID,
        };
        if lsn >= quorum_needs_from {
            return Err(ProposerError::PostgresWalRemoved { lsn });
        }
        self.wal.on_removed(lsn);
        Ok(())
    }

    pub fn status(&self) -> ProposerStatus {
        let (phase, term, term_start_lsn) = match self.campaign.stage() {
            Stage::Greeting => (Phase::Greeting, None, None),
            Stage::Voting { term } => (Phase::Voting, Some(*term), None),
            Stage::Elected(e) => (Phase::Elected, Some(e.term), Some(e.term_start_lsn)),
        };
        let phase = if self.fenced_by.is_some() { Phase::Fenced } else { phase };
        ProposerStatus {
            phase,
            term,
            term_start_lsn,
            commit_lsn: self.commit_lsn,
            buffered_wal_start_lsn: self.wal.buffer().map(WalBuffer::start_lsn),
            buffered_wal_end_lsn: self.wal.buffer().map(WalBuffer::end_lsn),
            catch_up_wal_start_lsn: self.wal.catch_up().map(WalBuffer::start_lsn),
            catch_up_wal_end_lsn: self.wal.catch_up().map(WalBuffer::end_lsn),
            postgres_wal_checked: matches!(self.log_check, LogCheckState::Passed),
            membership: self.membership_status(),
            safekeepers: self
                .peers
                .iter()
                .filter(|peer| self.wanted(peer))
                .map(|peer| SafekeeperStatus {
                    addr: peer.addr.clone(),
                    member: self.membership.current.includes_addr(&peer.addr),
                    state: peer.state(),
                    node_id: peer.node_id,
                    term: peer.reported_term,
                    flush_lsn: peer.flush_lsn,
                })
                .collect(),
        }
    }

    fn check_not_fenced(&self) -> Result<(), ProposerError> {
        match self.fenced_by {
            Some(term) => Err(ProposerError::Fenced { term }),
            None => Ok(()),
        }
    }

    /// The Postgres timeline our greeting and votes name.
    fn pg_timeline(&self) -> PgTimelineId {
        self.config.pg_timelines.as_ref().map_or(NO_PG_TIMELINE, |history| history.current)
    }

    /// A term above ours means another proposer has taken over.
    fn check_term(&self, reported: Term) -> Result<(), ProposerError> {
        match self.campaign.term() {
            // A correct acceptor never holds a term beyond the limit.
            _ if reported >= Term::MAX => Err(ProposerError::TermsExhausted { term: reported }),
            Some(ours) if reported > ours => Err(ProposerError::Fenced { term: reported }),
            _ => Ok(()),
        }
    }

    fn unexpected(&self, sk: SlotIndex, message: &'static str) -> ProposerError {
        let state = self.peers[sk].link_name();
        ProposerError::Peer { safekeeper: sk, fault: PeerFault::Unexpected { message, state } }
    }

    fn on_greeting_response(&mut self, sk: SlotIndex, response: GreetingResponse) -> Result<(), ProposerError> {
        if self.peers[sk].link != Link::AwaitingGreeting {
            return Err(self.unexpected(sk, "GreetingResponse"));
        }
        if let Some(previous) = self.peers[sk].node_id.filter(|&previous| previous != response.node_id) {
            // What the old node acknowledged is not on the new one.
            return Err(ProposerError::SafekeeperReplaced { safekeeper: sk, previous, now: response.node_id });
        }
        // Two entries reaching one safekeeper (a typo, or two names for one
        // host) would let it count twice toward every quorum.
        if let Some(other) = self.peers.slots().find(|&other| self.peers[other].node_id == Some(response.node_id)) {
            if other != sk {
                let (first, second) = (self.peers[other].addr.clone(), self.peers[sk].addr.clone());
                return Err(ProposerError::DuplicateSafekeeper { node_id: response.node_id, first, second });
            }
        }
        // An old primary stops here, before it asks for any vote.
        if let Some(ours) = &self.config.pg_timelines {
            election::check_not_superseded(ours, &response.pg_timelines)?;
        }
        if !self.on_greeted_configuration(sk, response.node_id, response.configuration)? {
            return Ok(()); // a configuration it showed leaves it out
        }
        self.check_term(response.term)?;
        let peer = &mut self.peers[sk];
        peer.node_id = Some(response.node_id);
        peer.reported_term = Some(response.term);
        peer.link = Link::Greeted;
        match self.campaign.stage() {
            Stage::Greeting => self.start_voting_if_quorum_greeted(),
            Stage::Voting { .. } => self.ask_for_vote(sk),
            Stage::Elected(_) => self.send_elected(sk),
        }
        self.advance_membership();
        Ok(())
    }

    /// The configuration changed: a quorum may now be complete (or not).
    fn reconsider_quorums(&mut self) {
        match self.campaign.stage() {
            Stage::Greeting => self.start_voting_if_quorum_greeted(),
            Stage::Voting { .. } => {
                self.ask_greeted_for_votes();
                if let Err(error) = self.decide_if_quorum_voted() {
                    // Surfaces with the next input: the same votes decide the same way.
                    tracing::warn!("election after a configuration change: {error}");
                }
            }
            Stage::Elected(_) => self.advance_commit(),
        }
    }

    fn start_voting_if_quorum_greeted(&mut self) {
        if self.fenced_by.is_some() {
            return;
        }
        let view = campaign::View {
            peers: &self.peers,
            membership: &self.membership,
            now_ms: self.now_ms,
            config: &self.config,
        };
        if self.campaign.pick_term(view).is_some() {
            self.ask_greeted_for_votes();
        }
    }

    fn ask_greeted_for_votes(&mut self) {
        for sk in self.peers.slots() {
            if self.peers[sk].link == Link::Greeted {
                self.ask_for_vote(sk);
            }
        }
    }

    fn ask_for_vote(&mut self, sk: SlotIndex) {
        let ask = self.campaign.ask(&self.peers[sk], &self.membership);
        let generation = self.membership.current.generation;
        let pg_timeline = self.pg_timeline();
        let peer = &mut self.peers[sk];
        match ask {
            Ask::Nothing => {}
            Ask::Voted => peer.link = Link::Voted,
            Ask::Request(term) => {
                peer.link = Link::AwaitingVote;
                peer.queue(ProposerMessage::VoteRequest(VoteRequest {
                    cluster: self.config.cluster,
                    term,
                    generation,
                    pg_timeline,
                }));
            }
        }
    }

    fn on_vote_response(&mut self, sk: SlotIndex, response: VoteResponse) -> Result<(), ProposerError> {
        if self.peers[sk].link != Link::AwaitingVote {
            return Err(self.unexpected(sk, "VoteResponse"));
        }
        self.check_term(response.term)?;
        self.peers[sk].reported_term = Some(response.term);
        match self.campaign.on_vote(sk, response)? {
            VoteAnswer::AfterWin => {
                self.send_elected(sk);
                self.peers[sk].awaited_for_wal_start = self.wal.buffer().is_none();
                Ok(())
            }
            VoteAnswer::Granted(vote) => {
                let peer = &mut self.peers[sk];
                peer.vote = Some(vote);
                peer.link = Link::Voted;
                self.decide_if_quorum_voted()
            }
        }
    }

    fn decide_if_quorum_voted(&mut self) -> Result<(), ProposerError> {
        let view = campaign::View {
            peers: &self.peers,
            membership: &self.membership,
            now_ms: self.now_ms,
            config: &self.config,
        };
        if let Some(election) = self.campaign.decide(view)? {
            self.become_elected(election);
        }
        Ok(())
    }

    fn become_elected(&mut self, election: Election) {
        assert!(self.commit_lsn <= election.term_start_lsn, "the new term starts after everything committed");
        self.commit_lsn = self.commit_lsn.max(election.known_commit_lsn);
        self.campaign.on_elected(election, self.now_ms);
        if self.config.mode == ProposerMode::Sync {
            // The WAL comes from the donor: it is the log, nothing to check.
            self.log_check = LogCheckState::Passed;
        }
        for sk in self.peers.slots() {
            if matches!(self.peers[sk].link, Link::Voted | Link::Greeted) {
                self.send_elected(sk);
                self.peers[sk].awaited_for_wal_start = true;
            }
        }
        self.advance_membership();
    }

    /// ProposerElected needs no vote: an acceptor takes it for any term not
    /// below its own. Only we can have won our term, so one at our term
    /// (a reconnection, or a voter whose answer was lost) gets it too.
    fn send_elected(&mut self, sk: SlotIndex) {
        let Some(election) = self.campaign.election() else { unreachable!("called once elected") };
        let peer = &mut self.peers[sk];
        assert!(peer.reported_term <= Some(election.term), "higher terms are fenced before this");
        peer.link = Link::AwaitingElectedAck;
        peer.queue(ProposerMessage::ProposerElected(ProposerElected {
            cluster: self.config.cluster,
            term: election.term,
            generation: self.membership.current.generation,
            term_start_lsn: election.term_start_lsn,
            timeline_start_lsn: election.timeline_start_lsn,
            term_history: election.history.clone(),
            pg_timelines: election.pg_timelines.clone(),
        }));
    }

    fn on_append_response(&mut self, sk: SlotIndex, response: AppendResponse) -> Result<(), ProposerError> {
        self.check_term(response.term)?;
        let Some(election) = self.campaign.election() else { return Err(self.unexpected(sk, "AppendResponse")) };
        let term = election.term;
        let peer_fault = |fault| ProposerError::Peer { safekeeper: sk, fault };
        if response.term != term {
            return Err(peer_fault(PeerFault::WrongTerm { expected: term, got: response.term }));
        }
        let peer = &mut self.peers[sk];
        peer.reported_term = Some(response.term);
        peer.reported_commit_lsn = Some(response.commit_lsn);
        match peer.link {
            Link::AwaitingElectedAck => {
                // Its log now matches ours up to its flush: send from there.
                peer.record_flush(response.flush_lsn).map_err(peer_fault)?;
                peer.link = Link::Streaming { next_lsn: response.flush_lsn };
                peer.awaited_for_wal_start = false;
                self.ask_for_log_digest();
            }
            Link::Streaming { next_lsn } => {
                // Beyond what we sent but not beyond our commit: it copied
                // committed WAL from a peer meanwhile (peer recovery); go on
                // from there. Beyond our commit nothing can explain it.
                if response.flush_lsn > next_lsn {
                    if response.flush_lsn > self.commit_lsn {
                        return Err(peer_fault(PeerFault::FlushBeyondSent {
                            reported: response.flush_lsn,
                            sent: next_lsn,
                        }));
                    }
                    peer.link = Link::Streaming { next_lsn: response.flush_lsn };
                }
                peer.record_flush(response.flush_lsn).map_err(peer_fault)?;
            }
            Link::TooFarBehind => peer.record_flush(response.flush_lsn).map_err(peer_fault)?,
            _ => return Err(self.unexpected(sk, "AppendResponse")),
        }
        self.advance_commit();
        self.wal.trim(&self.peers, TrimScope::All);
        self.advance_membership();
        Ok(())
    }

    fn advance_commit(&mut self) {
        let Some(election) = self.campaign.election() else { return };
        let counted_from = if self.count_flushes_below_term_start { Lsn::INVALID } else { election.term_start_lsn };
        if let Some(quorum_lsn) = self.quorum_flush_lsn(counted_from) {
            self.commit_lsn = self.commit_lsn.max(quorum_lsn);
        }
        if self.sync_target().is_some() {
            self.sync_committed_at_ms.get_or_insert(self.now_ms);
        }
    }

    /// A control message if one is queued, else WAL, else a heartbeat if due.
    fn next_message(&mut self, sk: SlotIndex) -> Option<ProposerMessage> {
        if let Some(message) = self.peers[sk].outbox.pop_front() {
            return Some(message);
        }
        if let Some(message) = self.membership_to_send(sk) {
            return Some(message);
        }
        let election = self.campaign.election()?;
        let log_checked = matches!(self.log_check, LogCheckState::Passed);
        let peer = &mut self.peers[sk];
        let next = match flow::next_send(peer, &self.wal, log_checked, &self.config, self.now_ms) {
            // A sync ends once every safekeeper knows the commit LSN: tell
            // them at once rather than at the next heartbeat.
            flow::Next::Nothing if self.config.mode == ProposerMode::Sync && peer.sent_commit_lsn < self.commit_lsn => {
                match peer.link {
                    Link::Streaming { next_lsn } => flow::Next::Heartbeat { at_lsn: next_lsn },
                    _ => flow::Next::Nothing,
                }
            }
            next => next,
        };
        let (begin_lsn, end_lsn, wal) = match next {
            flow::Next::Nothing => return None,
            flow::Next::TooFarBehind => {
                peer.link = Link::TooFarBehind;
                return None;
            }
            flow::Next::Heartbeat { at_lsn } => (at_lsn, at_lsn, Default::default()),
            flow::Next::Append { begin_lsn, end_lsn, wal } => {
                peer.link = Link::Streaming { next_lsn: end_lsn };
                (begin_lsn, end_lsn, wal)
            }
        };
        Some(ProposerMessage::AppendRequest(AppendRequest {
            cluster: self.config.cluster,
            term: election.term,
            generation: self.membership.current.generation,
            begin_lsn,
            end_lsn,
            commit_lsn: self.commit_lsn,
            wal,
        }))
        .inspect(|_| peer.sent_commit_lsn = self.commit_lsn)
    }
}

/// How long (in heartbeat intervals) the log check waits for a safekeeper
/// holding the log up to the term start to connect before the shim gives
/// up: the donor may be gone for good, and only a new election (a restart)
/// can pick a log the remaining safekeepers hold.
const LOG_CHECK_HOLDER_WAIT_HEARTBEATS: u64 = 20;

/// How long (in heartbeat intervals) a sync, once its commit LSN is
/// committed, waits for the connected safekeepers beyond the quorum to
/// learn it (a healthy one needs one round trip; a hung one is left).
const SYNC_STRAGGLER_WAIT_HEARTBEATS: u64 = 4;

/// Membership's entry points and what the rest of the proposer asks it:
/// thin wrappers that show it the peers and apply what it decides.
impl Proposer {
    /// An operator asks for the safekeeper set `target` (pg addresses).
    /// Idempotent: the same request again follows the change under way or
    /// finds it done. While a change is only preparing, another target
    /// replaces it; once the joint configuration is written, only the
    /// old set (an abort) is taken.
    pub fn request_membership(&mut self, target: Vec<String>, now_ms: u64) -> Result<(), MembershipRequestError> {
        self.now_ms = now_ms;
        let view = membership::View {
            peers: &self.peers,
            now_ms,
            writing_term: self.writing_term(),
            commit_lsn: self.commit_lsn,
        };
        let effects = self.membership.request(target, view)?;
        self.apply_membership(effects);
        Ok(())
    }

    /// The addresses the driver should keep a connection to, by peer slot
    /// (`None`: no connection), with the slot's incarnation: a link made
    /// for another incarnation must be replaced, whatever its address.
    pub fn wanted_links(&self) -> Vec<Option<(&str, u64)>> {
        self.peers.iter().map(|peer| self.wanted(peer).then_some((peer.addr.as_str(), peer.incarnation))).collect()
    }

    /// The incarnation of slot `sk` (see [`Proposer::wanted_links`]).
    pub fn peer_incarnation(&self, sk: SlotIndex) -> u64 {
        self.peers[sk].incarnation
    }

    pub fn peer_addr(&self, sk: SlotIndex) -> &str {
        &self.peers[sk].addr
    }

    pub fn membership_status(&self) -> MembershipStatus {
        self.membership.status(&self.peers, self.now_ms)
    }

    /// Safekeeper `sk` refuses our cluster (another system id, say).
    /// Returns whether that is survivable: it was only a member-to-be, and
    /// the change that named it is given up.
    pub fn on_link_refused(&mut self, sk: SlotIndex, reason: &str) -> bool {
        let Some(effects) = self.membership.on_link_refused(&self.peers[sk].addr, reason) else { return false };
        self.apply_membership(effects);
        true
    }

    /// Our term if we may write configurations: elected, the log check
    /// passed, and not fenced.
    fn writing_term(&self) -> Option<Term> {
        let log_checked = matches!(self.log_check, LogCheckState::Passed);
        match self.campaign.election() {
            Some(election) if log_checked && self.fenced_by.is_none() => Some(election.term),
            _ => None,
        }
    }

    /// Do what membership decided, in the order [`membership::Effects`] gives.
    fn apply_membership(&mut self, effects: membership::Effects) {
        let membership = &self.membership;
        let wanted = |peer: &peer::Peer| membership.wants(&peer.addr);
        for addr in &effects.ensure_slots {
            self.peers.ensure(addr, wanted, MAX_PEER_SLOTS);
        }
        if effects.retire_unwanted {
            self.peers.retire_unwanted(wanted);
        }
        if effects.adopted {
            self.campaign.on_adopted();
        }
        if effects.reconsider_quorums {
            self.reconsider_quorums();
        }
    }

    /// Move a change on as far as acknowledgements allow. Only an elected
    /// proposer whose log check passed writes configurations.
    fn advance_membership(&mut self) {
        let view = membership::View {
            peers: &self.peers,
            now_ms: self.now_ms,
            writing_term: self.writing_term(),
            commit_lsn: self.commit_lsn,
        };
        let effects = self.membership.advance(view);
        self.apply_membership(effects);
    }

    /// When a change writing the new set stops waiting for the removed
    /// members to store it (see [`Proposer::poll_timeout`]).
    fn membership_wait_ends_ms(&self) -> Option<u64> {
        self.membership.wait_ends_ms()
    }

    #[cfg(test)]
    fn peer_index(&self, addr: &str) -> Option<SlotIndex> {
        self.peers.find(addr)
    }

    /// Whether we keep a connection to `peer`: a member of the current
    /// configuration, a member-to-be, or a removed member still to be told.
    fn wanted(&self, peer: &peer::Peer) -> bool {
        self.membership.wants(&peer.addr)
    }

    /// Whether the members for which `counts` holds form a quorum of the
    /// current configuration.
    fn is_quorum(&self, counts: impl Fn(&peer::Peer) -> bool) -> bool {
        self.membership.is_quorum(&self.peers, counts)
    }

    fn quorum_flush_lsn(&self, counted_from: Lsn) -> Option<Lsn> {
        self.membership.quorum_flush_lsn(&self.peers, counted_from)
    }

    /// A greeting showed `theirs`: check it, and adopt it if it takes
    /// precedence over ours. Returns whether the greeting peer is still
    /// wanted (a configuration may have just left it out).
    fn on_greeted_configuration(
        &mut self,
        sk: SlotIndex,
        node_id: safekeeper_protocol::ids::NodeId,
        theirs: safekeeper_protocol::membership::Configuration,
    ) -> Result<bool, ProposerError> {
        let peer_fault = |fault| ProposerError::Peer { safekeeper: sk, fault };
        self.peers[sk].stored_configuration = Some(theirs.precedence());
        let incarnation = self.peers[sk].incarnation;
        let effects = self
            .membership
            .on_greeted(theirs, self.now_ms)
            .map_err(|reason| peer_fault(PeerFault::BadConfiguration { reason }))?;
        self.apply_membership(effects);
        // Adopting may have let it go, and even given its slot to another.
        if self.peers[sk].incarnation != incarnation || !self.wanted(&self.peers[sk]) {
            return Ok(false);
        }
        let expected = self.membership.named_node_id(&self.peers[sk].addr);
        if let Some(expected) = expected.filter(|&expected| expected != node_id) {
            return Err(peer_fault(PeerFault::WrongNode { expected, got: node_id }));
        }
        Ok(true)
    }

    /// A SetMembership for `sk` if it should store our configuration.
    fn membership_to_send(&mut self, sk: SlotIndex) -> Option<ProposerMessage> {
        let election = self.campaign.election()?;
        let message = self.membership.to_send(&self.peers[sk], self.config.cluster, election.term)?;
        self.peers[sk].membership_outstanding = true;
        Some(ProposerMessage::SetMembership(message))
    }

    fn on_membership_response(
        &mut self,
        sk: SlotIndex,
        response: safekeeper_protocol::protocol::MembershipResponse,
    ) -> Result<(), ProposerError> {
        self.check_term(response.term)?;
        let peer = &mut self.peers[sk];
        if !peer.membership_outstanding {
            return Err(self.unexpected(sk, "MembershipResponse"));
        }
        peer.membership_outstanding = false;
        let theirs = (response.generation, response.written_in_term);
        peer.stored_configuration = Some(theirs);
        if theirs > self.membership.current.precedence() {
            let fault = PeerFault::NewerConfiguration { generation: theirs.0, written_in_term: theirs.1 };
            return Err(ProposerError::Peer { safekeeper: sk, fault });
        }
        self.advance_membership();
        Ok(())
    }
}
