//! One timeline as a pure state machine: the acceptor over its storage (the
//! generic [`Timeline`] driver), the connections of the current batch,
//! group commit, reply routing, the peer-recovery handoff and retention.
//!
//! The service's owner task and the simulation drive this same code, so
//! what the simulation checks (which reply reaches which connection, when
//! a connection is refused after peer recovery, in which order retention
//! touches storage) is what the service does. It does no I/O of its own:
//! storage is reached only through the [`WalStorage`] / [`ControlStore`]
//! traits, time is not read (nothing here depends on it), and connections
//! are plain [`ConnectionId`]s: the driver owns the sockets.
//!
//! Shape (quinn's `handle_*` / `poll_*`): one batch is
//! 1. `handle_message` / `handle_peer_wal` for each input, while
//!    [`TimelineNode::batch_is_full`] is false (appends are written, not
//!    yet durable; a refusal is ready at once from [`TimelineNode::poll_close`]);
//! 2. [`TimelineNode::end_batch`]: one sync, then every reply of the batch,
//!    addressed to connection ids, in the order they were produced; the
//!    append acknowledgement (which reports the flush LSN) exists only in
//!    exchange for the storage's proof of sync ([`crate::storage::SyncedLsn`]),
//!    and replies leave the node only through this call, after that sync;
//! 3. [`TimelineNode::apply_retention`]: persist the control file, then
//!    remove the segments the policy allows (timed apart from the sync).
//!
//! A storage error stops the node for good (fail-stop): it refuses every
//! connection of the batch and every later call returns [`NodeError::Stopped`].

use crate::acceptor::{Acceptor, AcceptorError, PeerWal};
use crate::retention::RetentionPolicy;
use crate::storage::memory::{MemoryControlStore, MemoryWalStorage};
use crate::storage::{ControlStore, StorageError, WalStorage};
use crate::timeline::{Timeline, TimelineError};
use postgres_wal::lsn::Lsn;
use safekeeper_protocol::protocol::{AcceptorMessage, ProposerMessage};

#[cfg(test)]
mod tests;

/// Most messages handled before one sync.
pub const MAX_BATCH_MESSAGES: usize = 64;
/// Most WAL bytes written before one sync, so a batch's latency stays bounded.
pub const MAX_BATCH_WAL_BYTES: usize = 16 << 20;

/// A proposer connection as the node knows it. The driver hands them out in
/// increasing order (never reused): the peer-recovery handoff relies on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(pub u64);

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// SQLSTATE codes of the refusals the node emits (Postgres's errcodes.txt).
pub mod sqlstate {
    /// Malformed frames, bad lengths, messages out of place, undecodable
    /// proposer messages.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// A bad tenant/timeline id, a cluster id or parameter the timeline refuses.
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// A proposer message that the acceptor's rules refuse in its state.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// An append whose WAL does not decode.
    pub const DATA_CORRUPTED: &str = "XX001";
    pub const DISK_FULL: &str = "53100";
    pub const IO_ERROR: &str = "58030";
    /// The timeline's owner is gone (it stopped after a storage error, or
    /// the server is shutting down), or wants the proposer to reconnect.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
}

/// Why a connection is closed, with what the client is told (a FATAL
/// error: SQLSTATE and message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
    pub cause: RefusalCause,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalCause {
    /// The acceptor's rules refused the message.
    Refused(AcceptorError),
    /// Peer recovery caught this safekeeper up while the proposer held it
    /// behind: it reconnects and streams from the new flush LSN.
    CaughtUpByPeers { flush_lsn: Lsn },
    /// Storage failed; the timeline stopped (its replies are lost).
    StorageFailed,
}

impl Refusal {
    /// A proposer message the acceptor refused.
    pub fn refused(error: AcceptorError) -> Refusal {
        use AcceptorError::*;
        let sqlstate = match &error {
            ClusterMismatch { .. }
            | ParameterMismatch { .. }
            | SupersededTimeline { .. }
            | TimelineWentDown { .. }
            | PgTimelinesDisagree { .. } => sqlstate::INVALID_PARAMETER_VALUE,
            InvalidWal { .. } | ZeroLengthRecord { .. } | PageTimelineMismatch { .. } | SwitchInsideRecord { .. } => {
                sqlstate::DATA_CORRUPTED
            }
            BadTermHistory { .. }
            | BadTimelineStart { .. }
            | CrossesSegment { .. }
            | BadConfiguration { .. }
            | TermBeyondLimit { .. } => sqlstate::PROTOCOL_VIOLATION,
            // Not a refusal of the cluster: the proposer greets again and
            // learns the newer configuration (or that this safekeeper left it).
            StaleGeneration { .. }
            | NotAMember { .. }
            | NotElected { .. }
            | NotContiguous { .. }
            | TruncateBelowCommit { .. }
            | DigestOutOfRange { .. }
            | PeerWalRefused { .. } => sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
        };
        Refusal { sqlstate, message: format!("refused: {error}"), cause: RefusalCause::Refused(error) }
    }

    fn caught_up_by_peers(flush_lsn: Lsn) -> Refusal {
        Refusal {
            sqlstate: sqlstate::ADMIN_SHUTDOWN,
            message: format!("caught up from peer safekeepers to {flush_lsn}; reconnect to stream from there"),
            cause: RefusalCause::CaughtUpByPeers { flush_lsn },
        }
    }

    /// Storage failed: the timeline stops serving until reopened.
    pub fn storage_failed(error: &StorageError) -> Refusal {
        let sqlstate = match error {
            StorageError::NoSpace { .. } => sqlstate::DISK_FULL,
            _ => sqlstate::IO_ERROR,
        };
        Refusal {
            sqlstate,
            message: format!("storage error, timeline closed until reopened: {error}"),
            cause: RefusalCause::StorageFailed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Storage failed; the node has stopped. The caller decides whether the
    /// process must stop too ([`StorageError::is_fatal`]).
    #[error(transparent)]
    Storage(StorageError),
    /// A call after the node stopped on a storage error.
    #[error("the timeline stopped after a storage error: {0}")]
    Stopped(String),
}

/// What happened to one piece of peer WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerWalOutcome {
    /// Written; durable once the batch ends ([`BatchOutput::flush_lsn`]).
    Written,
    Refused(AcceptorError),
}

/// What a batch released, after its sync.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// Replies in the order they were produced: replies to `handle_message`
    /// in message order, then the append acknowledgement to every
    /// connection whose WAL was written in the batch (in the order of their
    /// first write). None goes to a connection closed in the batch.
    pub replies: Vec<(ConnectionId, AcceptorMessage)>,
    /// Durable end of the WAL after the sync.
    pub flush_lsn: Lsn,
    /// Appends written in the batch (proposer and peer WAL), for metrics.
    pub appends: u64,
    pub proposer_wal_bytes: u64,
    pub peer_wal_bytes: u64,
}

/// What retention did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetentionOutcome {
    /// Nothing was due.
    Nothing,
    /// WAL below `new_start` is gone (whole segments from `old_start`).
    Removed { old_start: Lsn, new_start: Lsn },
    /// Removal failed without harm (a segment left behind is disk space
    /// only); the next batch tries again.
    Failed(String),
}

/// The group-commit batch under way.
#[derive(Default)]
struct Batch {
    /// Inputs counted toward [`MAX_BATCH_MESSAGES`].
    messages: usize,
    wal_bytes: usize,
    replies: Vec<(ConnectionId, AcceptorMessage)>,
    /// Connections whose WAL was written, awaiting the acknowledgement.
    awaiting_ack: Vec<ConnectionId>,
    /// Connections that sent a message in the batch (refused on a storage error).
    seen: Vec<ConnectionId>,
    /// Connections refused or closed in the batch: ignored from then on.
    closed: Vec<ConnectionId>,
    appends: u64,
    proposer_wal_bytes: u64,
    peer_wal_bytes: u64,
}

/// After peer recovery, every proposer connection seen so far (ids at or
/// below the highest seen) is refused once, when it next speaks.
#[derive(Default)]
struct Handoff {
    highest_seen: Option<ConnectionId>,
    refuse_up_to: Option<ConnectionId>,
}

pub struct TimelineNode<W: WalStorage, C: ControlStore> {
    timeline: Timeline<W, C>,
    retention: RetentionPolicy,
    batch: Batch,
    handoff: Handoff,
    /// Refusals not yet taken by the driver, oldest first.
    closes: std::collections::VecDeque<(ConnectionId, Refusal)>,
    /// Highest `remote_consistent_lsn` a consumer reported.
    remote_consistent_lsn: Lsn,
    /// Set by the first storage error (fail-stop).
    stopped: Option<String>,
}

impl<W: WalStorage, C: ControlStore> TimelineNode<W, C> {
    pub fn new(timeline: Timeline<W, C>, retention: RetentionPolicy) -> Self {
        let remote_consistent_lsn = timeline.acceptor().state().remote_consistent_lsn;
        TimelineNode {
            timeline,
            retention,
            batch: Batch::default(),
            handoff: Handoff::default(),
            closes: Default::default(),
            remote_consistent_lsn,
            stopped: None,
        }
    }

    pub fn timeline(&self) -> &Timeline<W, C> {
        &self.timeline
    }
    pub fn acceptor(&self) -> &Acceptor {
        self.timeline.acceptor()
    }
    pub fn wal(&self) -> &W {
        self.timeline.wal()
    }
    pub fn control(&self) -> &C {
        self.timeline.control()
    }
    pub fn into_timeline(self) -> Timeline<W, C> {
        self.timeline
    }
    /// The storage error the node stopped on, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Whether the batch has reached its bounds: end it before handling more.
    pub fn batch_is_full(&self) -> bool {
        self.batch.messages >= MAX_BATCH_MESSAGES || self.batch.wal_bytes >= MAX_BATCH_WAL_BYTES
    }

    /// A proposer message from `connection`. Replies wait for
    /// [`Self::end_batch`]; a refusal closes the connection at once
    /// ([`Self::poll_close`]).
    pub fn handle_message(&mut self, connection: ConnectionId, message: ProposerMessage) -> Result<(), NodeError> {
        self.check_running()?;
        self.batch.messages += 1;
        let wal_bytes = match &message {
            ProposerMessage::AppendRequest(append) => append.wal.len(),
            _ => 0,
        };
        self.batch.wal_bytes += wal_bytes;
        if self.batch.closed.contains(&connection) {
            return Ok(());
        }
        self.handoff.highest_seen = self.handoff.highest_seen.max(Some(connection));
        if self.handoff.refuse_up_to.is_some_and(|up_to| connection <= up_to) {
            self.close(connection, Refusal::caught_up_by_peers(self.timeline.acceptor().flush_lsn()));
            return Ok(());
        }
        if !self.batch.seen.contains(&connection) {
            self.batch.seen.push(connection);
        }
        match self.timeline.handle(message) {
            Ok(Some(reply)) => self.batch.replies.push((connection, reply)),
            // Only a write returns no reply: its acknowledgement comes with the sync.
            Ok(None) => {
                self.batch.appends += 1;
                self.batch.proposer_wal_bytes += wal_bytes as u64;
                if !self.batch.awaiting_ack.contains(&connection) {
                    self.batch.awaiting_ack.push(connection);
                }
            }
            Err(TimelineError::Refused(error)) => self.close(connection, Refusal::refused(error)),
            Err(TimelineError::Storage(error)) => return Err(self.fail(error)),
        }
        Ok(())
    }

    /// Committed WAL copied from a peer (peer recovery); durable once the
    /// batch ends.
    pub fn handle_peer_wal(&mut self, wal: &PeerWal) -> Result<PeerWalOutcome, NodeError> {
        self.check_running()?;
        self.batch.messages += 1;
        self.batch.wal_bytes += wal.wal.len();
        match self.timeline.append_peer_wal(wal) {
            Ok(()) => {
                self.batch.appends += 1;
                self.batch.peer_wal_bytes += wal.wal.len() as u64;
                Ok(PeerWalOutcome::Written)
            }
            Err(TimelineError::Refused(error)) => Ok(PeerWalOutcome::Refused(error)),
            Err(TimelineError::Storage(error)) => Err(self.fail(error)),
        }
    }

    /// Peer recovery caught this safekeeper up: every proposer connection
    /// seen so far is refused when it next speaks, once (it may hold this
    /// safekeeper too far behind to stream to it; reconnected, it streams
    /// from the new flush LSN).
    pub fn peer_recovery_done(&mut self) {
        self.handoff.refuse_up_to = self.handoff.highest_seen;
    }

    /// The driver closed `connection` (the client went away, its reply
    /// queue overflowed): nothing of the batch goes to it any more.
    pub fn connection_closed(&mut self, connection: ConnectionId) {
        self.batch.awaiting_ack.retain(|&c| c != connection);
        self.batch.replies.retain(|(c, _)| *c != connection);
        if !self.batch.closed.contains(&connection) {
            self.batch.closed.push(connection);
        }
    }

    /// A consumer confirmed WAL below `remote_consistent_lsn` (monotonic).
    pub fn handle_feedback(&mut self, remote_consistent_lsn: Lsn) {
        self.remote_consistent_lsn = self.remote_consistent_lsn.max(remote_consistent_lsn);
    }

    /// The next connection to close, with what to tell it.
    pub fn poll_close(&mut self) -> Option<(ConnectionId, Refusal)> {
        self.closes.pop_front()
    }

    /// Sync everything the batch wrote and release its replies.
    pub fn end_batch(&mut self) -> Result<BatchOutput, NodeError> {
        self.check_running()?;
        let ack = match self.timeline.sync_and_ack() {
            Ok(ack) => ack,
            Err(TimelineError::Storage(error)) => return Err(self.fail(error)),
            Err(TimelineError::Refused(error)) => unreachable!("sync_and_ack refuses nothing: {error}"),
        };
        let batch = std::mem::take(&mut self.batch);
        let mut replies = batch.replies;
        if let Some(ack) = ack {
            replies.extend(batch.awaiting_ack.into_iter().map(|connection| (connection, ack.clone())));
        }
        Ok(BatchOutput {
            replies,
            flush_lsn: self.timeline.acceptor().flush_lsn(),
            appends: batch.appends,
            proposer_wal_bytes: batch.proposer_wal_bytes,
            peer_wal_bytes: batch.peer_wal_bytes,
        })
    }

    /// Retention: remove what the policy allows given the consumers'
    /// feedback. The control file is persisted first, so the commit LSN
    /// recovery starts decoding from is never in removed WAL and the
    /// consumer's position survives a restart. Cheap when nothing is due (a
    /// few comparisons).
    pub fn apply_retention(&mut self) -> Result<RetentionOutcome, NodeError> {
        self.check_running()?;
        assert!(self.batch.messages == 0, "retention runs between batches");
        let old_start = self.timeline.wal().start_lsn();
        match self.timeline.apply_retention(self.remote_consistent_lsn, &self.retention) {
            Ok(Some(new_start)) => Ok(RetentionOutcome::Removed { old_start, new_start }),
            Ok(None) => Ok(RetentionOutcome::Nothing),
            Err(TimelineError::Storage(error)) if error.is_fatal() => Err(self.fail(error)),
            Err(TimelineError::Storage(error)) => Ok(RetentionOutcome::Failed(error.to_string())),
            Err(TimelineError::Refused(error)) => unreachable!("retention refuses nothing: {error}"),
        }
    }

    /// Persist the control state (at shutdown, so recovery starts late).
    pub fn checkpoint(&mut self) -> Result<(), NodeError> {
        self.check_running()?;
        match self.timeline.checkpoint() {
            Ok(()) => Ok(()),
            Err(TimelineError::Storage(error)) => Err(self.fail(error)),
            Err(TimelineError::Refused(error)) => unreachable!("checkpoint refuses nothing: {error}"),
        }
    }

    fn check_running(&self) -> Result<(), NodeError> {
        match &self.stopped {
            Some(error) => Err(NodeError::Stopped(error.clone())),
            None => Ok(()),
        }
    }

    fn close(&mut self, connection: ConnectionId, refusal: Refusal) {
        self.connection_closed(connection);
        self.closes.push_back((connection, refusal));
    }

    /// Fail-stop: after a storage error nothing is known to be durable, so
    /// the node serves nothing more; the batch's connections are refused
    /// (their replies are lost).
    fn fail(&mut self, error: StorageError) -> NodeError {
        let refusal = Refusal::storage_failed(&error);
        let seen = std::mem::take(&mut self.batch.seen);
        for connection in seen {
            if !self.batch.closed.contains(&connection) {
                self.close(connection, refusal.clone());
            }
        }
        self.batch = Batch::default();
        self.stopped = Some(error.to_string());
        NodeError::Storage(error)
    }
}

/// A node over in-memory storage (tests and the simulation).
pub type MemoryNode = TimelineNode<MemoryWalStorage, MemoryControlStore>;

impl MemoryNode {
    /// The process dies and restarts (see [`crate::timeline::MemoryTimeline::crash_and_restart`]):
    /// what the node knew of connections and the handoff is gone with it.
    pub fn crash_and_restart(self, keep_unsynced_bytes: usize) -> MemoryNode {
        self.crash_and_restart_with(|wal| wal.crash(keep_unsynced_bytes))
    }

    /// As [`Self::crash_and_restart`], with `crash` saying what the crash
    /// left of the WAL (e.g. [`MemoryWalStorage::crash_torn`]).
    pub fn crash_and_restart_with(self, crash: impl FnOnce(&mut MemoryWalStorage)) -> MemoryNode {
        TimelineNode::new(self.timeline.crash_and_restart_with(crash), self.retention)
    }

    /// The next sync fails as an fsync error would (a storage fault).
    pub fn inject_sync_failure(&mut self) {
        self.timeline.wal_mut().fail_next_sync = true;
    }
}
