//! The shim node: the pure layer the driver and the simulation both run.
//! It holds the [`Proposer`] and the decisions the tokio driver used to
//! make on its own, so that the simulation runs them too:
//!
//! - link identity: which link task and which connection of it an event
//!   comes from ([`LinkGeneration`]); events of a task or connection the
//!   node has let go of are dropped, and messages are tagged with the
//!   connection they are meant for;
//! - link lifetime: which safekeepers to keep a link task for
//!   ([`LinkCommand`]), and dropping a connection on a protocol fault or
//!   an outbox that stopped draining;
//! - the standby-status policy: when Postgres is told the commit LSN, and
//!   which ([`ShimNode::poll_standby_status`]);
//! - stepping down (SIGTERM): no more WAL is taken, what was taken gets
//!   its quorum, within a bound ([`ShimNode::handle_step_down`]);
//! - time: [`ShimNode::poll_timeout`] is the next instant the node needs
//!   [`ShimNode::handle_timeout`] with no other input.
//!
//! The shape is quinn-proto's: `handle_*(now_ms, input)`, `poll_*` for
//! output, `poll_timeout`/`handle_timeout`. No I/O and no clock: time is
//! milliseconds since the node started, passed in by the caller.

use std::collections::VecDeque;

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::protocol::{AcceptorMessage, ProposerMessage};

use crate::proposer::{
    MembershipRequestError, PeerFault, Proposer, ProposerConfig, ProposerError, SlotIndex, MAX_PEER_SLOTS,
};

/// A status update goes to Postgres at least this often even when commit
/// does not move, so its wal_sender_timeout never fires while the shim
/// holds back reading (backpressure) or the quorum is down.
pub const STATUS_REFRESH_INTERVAL_MS: u64 = 1_000;
/// A new walsender ignores standby replies for synchronous replication
/// while it is still in its catch-up state (PG15 `SyncRepReleaseWaiters`),
/// which it leaves only after its first send: the status a new stream gets
/// at once can arrive too early. For this long after a (re)start it is
/// repeated every [`FRESH_STREAM_STATUS_INTERVAL_MS`], so waiting commits
/// are released within milliseconds, not after the next refresh
/// (measured: a 1.05 s stall after a catch-up restart, one run in eight).
pub const FRESH_STREAM_WINDOW_MS: u64 = 1_000;
pub const FRESH_STREAM_STATUS_INTERVAL_MS: u64 = 50;
/// Link commands pending at most: an open, a drop and a close per slot
/// between two polls is already more than one input can cause.
const MAX_PENDING_LINK_COMMANDS: usize = 3 * MAX_PEER_SLOTS;

/// One connection of one link task. The high 32 bits are the proposer's
/// slot incarnation the task was started for, the low 32 bits count its
/// connections: a task stopped when its safekeeper was let go can never be
/// mistaken for the one started when it is wanted again, and a message
/// meant for a connection that has died never reaches the next one ahead
/// of its greeting. (Not the membership configuration's generation.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkGeneration(u64);

impl LinkGeneration {
    /// Where the link task of slot incarnation `incarnation` starts
    /// counting (its first connection is the next one).
    pub fn first(incarnation: u64) -> LinkGeneration {
        let incarnation = u32::try_from(incarnation).expect("fewer than 2^32 slot incarnations");
        LinkGeneration(u64::from(incarnation) << 32)
    }

    /// The generation of the task's next connection.
    pub fn next(self) -> LinkGeneration {
        assert!(self.0 & u64::from(u32::MAX) != u64::from(u32::MAX), "2^32 connections of one link");
        LinkGeneration(self.0 + 1)
    }

    /// The slot incarnation of the task that made this connection.
    pub fn incarnation(self) -> u64 {
        self.0 >> 32
    }
}

/// What a link task tells the node, tagged with the connection it is about
/// (for `Refused`, the task's latest generation: only its incarnation counts).
#[derive(Debug)]
pub struct LinkEvent {
    pub slot: SlotIndex,
    pub generation: LinkGeneration,
    pub kind: LinkEventKind,
}

#[derive(Debug)]
pub enum LinkEventKind {
    Connected,
    Message(AcceptorMessage),
    Disconnected {
        reason: String,
    },
    /// The safekeeper refuses this cluster or its parameters (another
    /// system id, segment size or Postgres version under the same ids): a
    /// misconfiguration that retrying cannot fix. The link task has stopped.
    Refused {
        reason: String,
    },
    /// The safekeeper checks tokens and refuses ours (none given, expired,
    /// another key's, another tenant's): retrying with the same token
    /// cannot help. The link task has stopped.
    Unauthorized {
        reason: String,
    },
}

/// What the node asks of the link tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkCommand {
    /// Start a link task for `slot` (replacing any it has): it connects to
    /// `addr` and numbers its connections after `first_generation`.
    Open { slot: SlotIndex, addr: String, first_generation: LinkGeneration },
    /// Stop the task of `slot`: the safekeeper is no longer wanted.
    Close { slot: SlotIndex },
    /// End connection `generation` of `slot`'s task (it reconnects).
    DropConnection { slot: SlotIndex, generation: LinkGeneration },
}

/// A message for one connection.
#[derive(Debug)]
pub struct Transmit {
    pub slot: SlotIndex,
    pub generation: LinkGeneration,
    pub message: ProposerMessage,
}

/// What Postgres is told as its standby's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbyStatus {
    pub write_lsn: Lsn,
    pub flush_lsn: Lsn,
    pub apply_lsn: Lsn,
}

/// What became of a link event.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEventOutcome {
    Applied,
    /// From a task or connection the node let go of: ignored.
    Stale,
    /// The safekeeper broke the protocol: the node dropped the connection
    /// ([`LinkCommand::DropConnection`]) and the proposer forgot it.
    PeerFault(PeerFault),
}

/// How a step-down ended ([`ShimNode::poll_stepped_down`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SteppedDown {
    pub commit_lsn: Lsn,
    /// The end of the WAL taken from Postgres, if any was.
    pub wal_end_lsn: Option<Lsn>,
    /// The bound passed with WAL not yet committed: a restart resends it.
    pub timed_out: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Proposer(#[from] ProposerError),
    #[error("safekeeper {addr} refuses this cluster: {reason}")]
    SafekeeperRefused { addr: String, reason: String },
    #[error("safekeeper {addr} refuses this shim's token: {reason} (docs/security.md)")]
    SafekeeperUnauthorized { addr: String, reason: String },
}

/// The node's view of one slot's link task.
struct LinkSlot {
    /// The proposer's slot incarnation the task was started for.
    incarnation: u64,
    /// The connection it last reported; messages go to this one.
    current: LinkGeneration,
    /// The node dropped `current`: what it still says is stale.
    dropped: bool,
}

/// When to tell Postgres the commit LSN (see the constants above).
struct StandbyPolicy {
    /// When the current replication stream started; `None`: no stream.
    stream_started_ms: Option<u64>,
    /// A new stream reports our position at once: until it does, Postgres
    /// counts no synchronous standby and commits wait.
    due: bool,
    last_sent_ms: u64,
    /// The flush position last reported (= the commit LSN then).
    reported_flush_lsn: Lsn,
}

impl StandbyPolicy {
    /// The next time a refresh falls due with nothing moving, if streaming.
    fn refresh_at_ms(&self) -> Option<u64> {
        let started_ms = self.stream_started_ms?;
        let refresh_ms = self.last_sent_ms + STATUS_REFRESH_INTERVAL_MS;
        let fresh_ms = self.last_sent_ms + FRESH_STREAM_STATUS_INTERVAL_MS;
        let still_fresh = fresh_ms < started_ms + FRESH_STREAM_WINDOW_MS;
        Some(if still_fresh { fresh_ms.min(refresh_ms) } else { refresh_ms })
    }

    fn is_due(&self, now_ms: u64, commit_lsn: Lsn) -> bool {
        let Some(started_ms) = self.stream_started_ms else { return false };
        let since_sent_ms = now_ms.saturating_sub(self.last_sent_ms);
        let fresh_stream = now_ms.saturating_sub(started_ms) < FRESH_STREAM_WINDOW_MS;
        let refresh_due = since_sent_ms >= STATUS_REFRESH_INTERVAL_MS
            || fresh_stream && since_sent_ms >= FRESH_STREAM_STATUS_INTERVAL_MS;
        self.due || commit_lsn > self.reported_flush_lsn || refresh_due
    }
}

pub struct ShimNode {
    proposer: Proposer,
    /// By proposer slot; `None` where no link task runs.
    links: Vec<Option<LinkSlot>>,
    link_commands: VecDeque<LinkCommand>,
    standby: StandbyPolicy,
    /// Since a step-down was asked for: when it ends at the latest.
    step_down_deadline_ms: Option<u64>,
    /// The time of the latest input.
    now_ms: u64,
}

impl ShimNode {
    pub fn new(config: ProposerConfig, now_ms: u64) -> ShimNode {
        let mut node = ShimNode {
            proposer: Proposer::new(config),
            links: vec![],
            link_commands: VecDeque::new(),
            standby: StandbyPolicy {
                stream_started_ms: None,
                due: false,
                last_sent_ms: now_ms,
                reported_flush_lsn: Lsn::INVALID,
            },
            step_down_deadline_ms: None,
            now_ms,
        };
        node.sync_links();
        node
    }

    /// The proposer, for status and tests. All input goes through the node.
    pub fn proposer(&self) -> &Proposer {
        &self.proposer
    }

    /// See [`Proposer::break_commit_rule_for_tests`].
    #[cfg(test)]
    pub(crate) fn break_commit_rule_for_tests(&mut self) {
        self.proposer.break_commit_rule_for_tests();
    }

    /// See [`Proposer::keep_laggards_for_tests`].
    #[cfg(test)]
    pub(crate) fn keep_laggards_for_tests(&mut self) {
        self.proposer.keep_laggards_for_tests();
    }

    /// A link task's event. Stale ones (a task or connection let go of)
    /// are dropped; a protocol fault drops the connection.
    pub fn handle_link_event(&mut self, now_ms: u64, event: LinkEvent) -> Result<LinkEventOutcome, NodeError> {
        self.now_ms = now_ms;
        // The proposer may have reset a slot since the last input (a
        // configuration leaving a safekeeper out): its task is then stale.
        self.sync_links();
        let LinkEvent { slot, generation, kind } = event;
        let Some(link) = self.links.get_mut(slot.0).and_then(Option::as_mut) else {
            return Ok(LinkEventOutcome::Stale);
        };
        if generation.incarnation() != link.incarnation || !self.proposer.link_wanted(slot) {
            return Ok(LinkEventOutcome::Stale);
        }
        let current = generation == link.current && !link.dropped;
        match kind {
            LinkEventKind::Connected => {
                link.current = generation;
                link.dropped = false;
                self.proposer.on_connected(slot, now_ms);
            }
            LinkEventKind::Message(_) | LinkEventKind::Disconnected { .. } if !current => {
                return Ok(LinkEventOutcome::Stale); // a connection the proposer already forgot
            }
            LinkEventKind::Message(message) => match self.proposer.on_message(slot, message, now_ms) {
                Err(ProposerError::Peer { fault, .. }) => {
                    self.drop_connection(slot);
                    return Ok(LinkEventOutcome::PeerFault(fault));
                }
                other => other?,
            },
            LinkEventKind::Disconnected { .. } => self.proposer.on_disconnected(slot, now_ms),
            LinkEventKind::Unauthorized { reason } => {
                let addr = self.proposer.peer_addr(slot).to_string();
                return Err(NodeError::SafekeeperUnauthorized { addr, reason });
            }
            LinkEventKind::Refused { reason } => {
                // A member-to-be that refuses the cluster ends the change;
                // a member refusing it is a misconfiguration we cannot fix.
                if !self.proposer.on_link_refused(slot, &reason) {
                    let addr = self.proposer.peer_addr(slot).to_string();
                    return Err(NodeError::SafekeeperRefused { addr, reason });
                }
            }
        }
        Ok(LinkEventOutcome::Applied)
    }

    /// The link task of `slot` could not take a message (its outbox is
    /// full: it is not draining). The connection is dropped rather than
    /// the message (a gap would be refused anyway); the next connection
    /// resumes from the safekeeper's flush LSN.
    pub fn handle_send_failed(&mut self, now_ms: u64, slot: SlotIndex) {
        self.now_ms = now_ms;
        self.drop_connection(slot);
    }

    /// WAL from Postgres (see [`Proposer::on_wal`]).
    pub fn handle_wal(&mut self, now_ms: u64, start_lsn: Lsn, wal: &[u8]) -> Result<(), ProposerError> {
        self.now_ms = now_ms;
        self.proposer.on_wal(start_lsn, wal)
    }

    /// Postgres no longer has WAL at `lsn` (see [`Proposer::on_wal_unavailable`]).
    pub fn handle_wal_unavailable(&mut self, now_ms: u64, lsn: Lsn) -> Result<(), ProposerError> {
        self.now_ms = now_ms;
        self.proposer.on_wal_unavailable(lsn)
    }

    /// An operator asks for a safekeeper set (see [`Proposer::request_membership`]).
    pub fn handle_membership_request(
        &mut self,
        now_ms: u64,
        target: Vec<String>,
    ) -> Result<(), MembershipRequestError> {
        self.now_ms = now_ms;
        self.proposer.request_membership(target, now_ms)
    }

    /// A replication stream from Postgres started: it is told our position
    /// at once and, while fresh, often.
    pub fn handle_stream_started(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.standby.stream_started_ms = Some(now_ms);
        self.standby.due = true;
    }

    /// The replication stream is gone (a restart elsewhere, an error).
    pub fn handle_stream_stopped(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.standby.stream_started_ms = None;
    }

    /// Step down (the operator stops the shim): take no more WAL, keep
    /// sending what was taken and reporting its commit to Postgres, until
    /// all of it is committed or `timeout_ms` passed; then
    /// [`ShimNode::poll_stepped_down`] says so. Asking again changes nothing.
    pub fn handle_step_down(&mut self, now_ms: u64, timeout_ms: u64) {
        self.now_ms = now_ms;
        self.step_down_deadline_ms.get_or_insert(now_ms + timeout_ms);
    }

    /// Once a step-down is over: where it left the log. Over as soon as
    /// everything taken is committed (at once when nothing was taken, as
    /// before an election), or at its deadline.
    pub fn poll_stepped_down(&self) -> Option<SteppedDown> {
        let deadline_ms = self.step_down_deadline_ms?;
        let commit_lsn = self.proposer.commit_lsn();
        let wal_end_lsn = self.proposer.wal_end_lsn();
        let all_committed = wal_end_lsn.is_none_or(|end| commit_lsn >= end);
        let timed_out = self.now_ms >= deadline_ms;
        (all_committed || timed_out).then_some(SteppedDown { commit_lsn, wal_end_lsn, timed_out: !all_committed })
    }

    /// The passage of time: call at [`ShimNode::poll_timeout`] (earlier is
    /// harmless). A safekeeper silent for the silence timeout loses its
    /// connection (the link reconnects). Fatal errors are the proposer's.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Result<(), ProposerError> {
        self.now_ms = now_ms;
        self.proposer.tick(now_ms)?;
        for slot in self.proposer.silent_safekeepers() {
            tracing::warn!(safekeeper = %self.proposer.peer_addr(slot), "silent for the silence timeout: reconnecting");
            self.drop_connection(slot);
        }
        Ok(())
    }

    /// The next time the node needs [`ShimNode::handle_timeout`] and its
    /// output polled with no other input; `None`: only input moves it.
    pub fn poll_timeout(&self) -> Option<u64> {
        let status_at_ms =
            if self.standby_status_due(self.now_ms) { Some(self.now_ms) } else { self.standby.refresh_at_ms() };
        [self.proposer.poll_timeout(), status_at_ms, self.step_down_deadline_ms].into_iter().flatten().min()
    }

    /// What to do with the link tasks next.
    pub fn poll_link_command(&mut self) -> Option<LinkCommand> {
        self.sync_links();
        self.link_commands.pop_front()
    }

    /// The next message, tagged with the connection it is for.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.sync_links();
        let (slot, message) = self.proposer.poll_transmit()?;
        let link = self.links[slot.0].as_ref().expect("the proposer sends only to slots it wants a link to");
        assert!(!link.dropped, "the proposer forgot a dropped connection");
        Some(Transmit { slot, generation: link.current, message })
    }

    /// If Postgres should be told our position now: the commit LSN as
    /// write/flush/apply, whenever it moves, on every new stream, at least
    /// every [`STATUS_REFRESH_INTERVAL_MS`], and every
    /// [`FRESH_STREAM_STATUS_INTERVAL_MS`] for a fresh stream's first
    /// [`FRESH_STREAM_WINDOW_MS`]. Taking it counts as sent.
    pub fn poll_standby_status(&mut self, now_ms: u64) -> Option<StandbyStatus> {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.standby_status_due(now_ms) {
            return None;
        }
        // Before anything is committed there is nothing true to report: a
        // zero flush keeps Postgres from counting us as a sync standby.
        let reported = self.proposer.commit_lsn().max(self.standby.reported_flush_lsn);
        self.standby.reported_flush_lsn = reported;
        self.standby.last_sent_ms = now_ms;
        self.standby.due = false;
        Some(StandbyStatus { write_lsn: reported, flush_lsn: reported, apply_lsn: reported })
    }

    /// The flush position last reported to Postgres.
    pub fn reported_flush_lsn(&self) -> Lsn {
        self.standby.reported_flush_lsn
    }

    /// See [`Proposer::wal_wanted_from`]; none while stepping down.
    pub fn wal_wanted_from(&self) -> Option<Lsn> {
        self.proposer.wal_wanted_from().filter(|_| self.step_down_deadline_ms.is_none())
    }

    /// See [`Proposer::can_accept_wal`]; no room while stepping down.
    pub fn can_accept_wal(&self, len_bytes: u64) -> bool {
        self.step_down_deadline_ms.is_none() && self.proposer.can_accept_wal(len_bytes)
    }

    /// The address of `slot`'s safekeeper (for logs).
    pub fn peer_addr(&self, slot: SlotIndex) -> &str {
        self.proposer.peer_addr(slot)
    }

    fn standby_status_due(&self, now_ms: u64) -> bool {
        self.standby.is_due(now_ms, self.proposer.commit_lsn())
    }

    fn drop_connection(&mut self, slot: SlotIndex) {
        if let Some(link) = self.links.get_mut(slot.0).and_then(Option::as_mut) {
            if !link.dropped {
                link.dropped = true;
                let generation = link.current;
                self.queue_link_command(LinkCommand::DropConnection { slot, generation });
            }
        }
        self.proposer.on_disconnected(slot, self.now_ms);
    }

    /// Keep one link task per safekeeper the proposer wants to talk to:
    /// start those of new members (or of a slot's new incarnation), stop
    /// those of removed ones.
    fn sync_links(&mut self) {
        let wanted = self.proposer.wanted_links();
        self.links.resize_with(wanted.len(), || None);
        let mut commands = vec![];
        for (index, wanted) in wanted.into_iter().enumerate() {
            let slot = SlotIndex(index);
            let current = self.links[index].as_ref().map(|link| link.incarnation);
            if current == wanted.map(|(_, incarnation)| incarnation) {
                continue;
            }
            self.links[index] = wanted.map(|(addr, incarnation)| {
                let first_generation = LinkGeneration::first(incarnation);
                commands.push(LinkCommand::Open { slot, addr: addr.to_string(), first_generation });
                LinkSlot { incarnation, current: first_generation, dropped: false }
            });
            if self.links[index].is_none() {
                commands.push(LinkCommand::Close { slot });
            }
        }
        commands.into_iter().for_each(|command| self.queue_link_command(command));
    }

    fn queue_link_command(&mut self, command: LinkCommand) {
        assert!(self.link_commands.len() < MAX_PENDING_LINK_COMMANDS, "link commands are polled after every input");
        self.link_commands.push_back(command);
    }
}

#[cfg(test)]
mod tests;
