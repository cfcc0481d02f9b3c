//! The consensus acceptor as a pure state machine (no I/O, no clock).
//!
//! Inputs are proposer messages and "storage synced up to X" events; outputs
//! are [`Ready`] values: storage actions to execute in order, then at most one
//! reply that may be sent only once those actions are durable. A driver
//! (`crate::timeline`) executes them against real or simulated storage.
//!
//! Rules enforced here (docs/protocol.md explains why each is needed):
//! - a vote is granted only for a term above every term seen, and the new
//!   term is persisted before the reply;
//! - on ProposerElected, only the tail that diverges from the proposer's
//!   history is truncated, and never below commit_lsn;
//! - an append must start exactly at the write position (no gap, no rewrite);
//!   a lower term is answered with the current term (fencing);
//! - flush acknowledgements are record boundaries of synced WAL, so recovery
//!   (which decodes to the last complete record) never loses an acked byte;
//! - commit_lsn never moves backwards and never passes the local flush LSN;
//! - a WAL digest is given only of durable WAL, and only to the proposer
//!   whose ProposerElected we accepted (it vouches for the bytes of its term);
//! - committed WAL copied from a peer continues our log, or, while our WAL
//!   is empty, may restart it at a later segment start (bootstrap);
//! - a proposer message of an older configuration generation is refused, and
//!   so is every message but a greeting of our generation once our
//!   configuration leaves us out; a configuration is stored only from the
//!   elected proposer of our current term, and only one that takes
//!   precedence over ours;
//! - Postgres timelines only go up: no vote for a proposer streaming a
//!   timeline older than the one that wrote our log, no ProposerElected
//!   whose timeline history goes down or disagrees with ours below the
//!   point our logs share, and no WAL whose page headers name another
//!   timeline than the history says or that puts a switch point inside a
//!   record.

use std::sync::Arc;

use bytes::Bytes;

use crate::control::{ControlState, TermHistory, TermStart};
use crate::storage::SyncedLsn;
use postgres_wal::lsn::{Lsn, PgTimelineId};
use postgres_wal::timeline_history::PgTimelineHistory;
use postgres_wal::wal::{DecodeStep, WalDecodeError, WalDecoder};
use safekeeper_protocol::ids::{ClusterId, NodeId, Term};
use safekeeper_protocol::membership::MembershipGeneration;
use safekeeper_protocol::protocol::{
    AcceptorMessage, AppendRequest, AppendResponse, Greeting, GreetingResponse, MembershipResponse, ProposerElected,
    ProposerMessage, SetMembership, VoteRequest, VoteResponse, WalDigestRequest, NO_PG_TIMELINE, PROTOCOL_VERSION,
};
use safekeeper_protocol::term_history::{highest_common_point, LogView};

#[derive(Clone, Debug)]
pub struct AcceptorConfig {
    /// Persist commit_lsn to the control file once it has advanced this far;
    /// bounds the WAL that recovery must decode after a crash.
    pub checkpoint_interval_bytes: u64,
}

impl Default for AcceptorConfig {
    fn default() -> Self {
        AcceptorConfig { checkpoint_interval_bytes: 16 << 20 }
    }
}

/// A storage step the driver must execute, in order, before sending the reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageAction {
    /// Start an empty WAL at `start_lsn` (a segment start).
    InitializeWal { start_lsn: Lsn },
    /// Replace the WAL, which holds nothing beyond its start, by an empty
    /// one at `start_lsn` (a later segment start). Follows the control-file
    /// write that names the new start (recovery completes it after a crash).
    RestartEmptyWal { start_lsn: Lsn },
    /// Durably remove all WAL at and above `end_lsn`.
    TruncateWal { end_lsn: Lsn },
    /// Append at `start_lsn`; durable only after a later sync.
    WriteWal { start_lsn: Lsn, wal: Bytes },
    /// Name the segment files after a new Postgres timeline history (and
    /// store its history file); the control file that names it follows.
    SetPgTimelines(Box<PgTimelineHistory>),
    /// Atomically and durably replace the control file.
    PersistControl(Box<ControlState>),
}

/// Output of one step. The reply may be sent only after every action has
/// been executed and is durable (a `WriteWal` is never followed by a reply in
/// the same `Ready`: append replies come from [`Acceptor::on_synced`]).
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "execute the actions, then send the reply"]
pub struct Ready {
    pub actions: Vec<StorageAction>,
    pub reply: Option<AcceptorMessage>,
    /// A reply only storage can complete: the driver digests this durable
    /// WAL range and sends a `WalDigestResponse` (never with `reply`).
    pub digest: Option<DigestToSend>,
}

/// A piece of committed WAL copied from a peer (peer recovery), with what
/// the peer said of its log when it was read.
#[derive(Clone, Debug)]
pub struct PeerWal {
    pub begin_lsn: Lsn,
    pub wal: Bytes,
    /// The peer's term history and commit LSN.
    pub source_history: TermHistory,
    pub source_commit_lsn: Lsn,
}

/// WAL the driver reads and digests as the reply to a `WalDigestRequest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigestToSend {
    pub term: Term,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptorError {
    #[error("message for cluster {got:?} sent to the timeline of cluster {expected:?}")]
    ClusterMismatch { expected: Box<ClusterId>, got: Box<ClusterId> },
    #[error("{what} mismatch: safekeeper has {ours}, proposer sent {theirs}")]
    ParameterMismatch { what: &'static str, ours: u64, theirs: u64 },
    #[error("append in term {term} before ProposerElected for that term")]
    NotElected { term: Term },
    #[error("append at {begin_lsn} does not start at the write position {write_lsn} (no gaps, no rewrites)")]
    NotContiguous { begin_lsn: Lsn, write_lsn: Lsn },
    #[error("append {begin_lsn}..{end_lsn} crosses a segment boundary")]
    CrossesSegment { begin_lsn: Lsn, end_lsn: Lsn },
    #[error("append {begin_lsn}..{end_lsn} holds invalid WAL: {source}")]
    InvalidWal { begin_lsn: Lsn, end_lsn: Lsn, source: WalDecodeError },
    #[error("zero-length record at {lsn} in streamed WAL")]
    ZeroLengthRecord { lsn: Lsn },
    #[error("refusing to truncate WAL to {truncate_lsn}: below commit_lsn {commit_lsn}")]
    TruncateBelowCommit { truncate_lsn: Lsn, commit_lsn: Lsn },
    #[error("malformed term history from proposer: {reason}")]
    BadTermHistory { reason: String },
    #[error("timeline start {lsn} is not a segment start")]
    BadTimelineStart { lsn: Lsn },
    #[error("WAL {begin_lsn}..{end_lsn} from a peer refused: {reason}")]
    PeerWalRefused { begin_lsn: Lsn, end_lsn: Lsn, reason: String },
    #[error("WAL digest of {start_lsn}..{end_lsn} asked for, but this safekeeper holds durable WAL only in {held_start_lsn}..{flush_lsn}")]
    DigestOutOfRange { start_lsn: Lsn, end_lsn: Lsn, held_start_lsn: Lsn, flush_lsn: Lsn },
    #[error("the proposer's configuration generation {theirs} is older than this safekeeper's {ours}: greet again to learn it")]
    StaleGeneration { ours: MembershipGeneration, theirs: MembershipGeneration },
    #[error(
        "this safekeeper (node {node_id}) is not a member of the timeline's configuration generation {generation}"
    )]
    NotAMember { node_id: NodeId, generation: MembershipGeneration },
    #[error("membership configuration refused: {reason}")]
    BadConfiguration { reason: String },
    #[error(
        "superseded: this log continued on Postgres timeline {current} (timeline {proposer_timeline} ended at \
         {switch_lsn}); a proposer streaming timeline {proposer_timeline} is an old primary after a failover"
    )]
    SupersededTimeline { proposer_timeline: PgTimelineId, current: PgTimelineId, switch_lsn: Lsn },
    #[error("Postgres timelines only go up: the log is on timeline {ours}, the proposer's history ends at {theirs}")]
    TimelineWentDown { ours: PgTimelineId, theirs: PgTimelineId },
    #[error(
        "the proposer's Postgres timeline history does not match the log below {lsn} (ours: {ours}; theirs: {theirs})"
    )]
    PgTimelinesDisagree { lsn: Lsn, ours: String, theirs: String },
    #[error("WAL page at {page_lsn} is on Postgres timeline {found}, but the timeline history says {expected}")]
    PageTimelineMismatch { page_lsn: Lsn, expected: PgTimelineId, found: PgTimelineId },
    #[error("the Postgres timeline switch point {switch_lsn} is not the end of a record of the WAL")]
    SwitchInsideRecord { switch_lsn: Lsn },
    #[error("term {term} is above the highest term allowed ({})", Term::MAX)]
    TermBeyondLimit { term: Term },
}

/// Position of this acceptor's WAL. `flush_lsn <= written_boundary_lsn <= write_lsn`.
#[derive(Clone, Debug)]
struct WalPosition {
    write_lsn: Lsn,
    /// Durable record boundary: what we acknowledge.
    flush_lsn: Lsn,
    /// Record boundary of everything written (durable after the next sync).
    written_boundary_lsn: Lsn,
    /// Decoder positioned at `write_lsn`; `None` while the timeline holds no WAL.
    decoder: Option<WalDecoder>,
}

/// WAL found on disk at startup (see `crate::recovery`).
pub struct RecoveredWal {
    /// End of the last complete valid record, or `Lsn(0)` if there is no WAL.
    pub end_lsn: Lsn,
    /// Decoder positioned at `end_lsn`.
    pub decoder: Option<WalDecoder>,
}

pub struct Acceptor {
    node_id: NodeId,
    config: AcceptorConfig,
    state: ControlState,
    persisted_commit_lsn: Lsn,
    wal: WalPosition,
    /// Term whose ProposerElected we accepted; appends are taken only in it.
    elected_term: Option<Term>,
    /// Highest commit LSN the proposer told us; applied up to our flush.
    proposer_commit_lsn: Lsn,
    ack_pending: bool,
    /// `state.pg_timelines`, shared with each trial decoder: every page
    /// header of appended WAL must name the timeline it gives.
    timeline_check: Arc<PgTimelineHistory>,
}

impl Acceptor {
    /// `state` is the control file content (or a fresh state for a new timeline).
    pub fn new(node_id: NodeId, config: AcceptorConfig, state: ControlState, recovered: RecoveredWal) -> Self {
        assert!(state.commit_lsn <= recovered.end_lsn || !recovered.end_lsn.is_valid() && !state.commit_lsn.is_valid());
        assert_eq!(recovered.decoder.is_some(), recovered.end_lsn.is_valid());
        let end = recovered.end_lsn;
        let state_timelines = state.pg_timelines.clone();
        Acceptor {
            node_id,
            config,
            persisted_commit_lsn: state.commit_lsn,
            proposer_commit_lsn: state.commit_lsn,
            state,
            wal: WalPosition { write_lsn: end, flush_lsn: end, written_boundary_lsn: end, decoder: recovered.decoder },
            elected_term: None,
            ack_pending: false,
            timeline_check: Arc::new(state_timelines),
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }
    pub fn state(&self) -> &ControlState {
        &self.state
    }
    pub fn term(&self) -> Term {
        self.state.term
    }
    pub fn flush_lsn(&self) -> Lsn {
        self.wal.flush_lsn
    }
    pub fn write_lsn(&self) -> Lsn {
        self.wal.write_lsn
    }
    pub fn commit_lsn(&self) -> Lsn {
        self.state.commit_lsn
    }
    pub fn elected_term(&self) -> Option<Term> {
        self.elected_term
    }
    /// The highest commit LSN a proposer (or a peer's copy) reported; ahead
    /// of the flush LSN when this acceptor is behind the quorum (what wakes
    /// peer recovery).
    pub fn proposer_commit_lsn(&self) -> Lsn {
        self.proposer_commit_lsn
    }
    /// Whether an append is waiting for a sync to be acknowledged.
    pub fn ack_pending(&self) -> bool {
        self.ack_pending
    }

    /// Term of the last history entry that our durable log reaches.
    pub fn last_log_term(&self) -> Term {
        self.state.term_history.up_to(self.wal.flush_lsn).last_term()
    }

    pub fn handle(&mut self, message: ProposerMessage) -> Result<Ready, AcceptorError> {
        if *message.cluster() != self.state.cluster {
            return Err(AcceptorError::ClusterMismatch {
                expected: Box::new(self.state.cluster),
                got: Box::new(*message.cluster()),
            });
        }
        if let Some(term) = message.highest_term().filter(|&term| term > Term::MAX) {
            return Err(AcceptorError::TermBeyondLimit { term });
        }
        if !matches!(message, ProposerMessage::Greeting(_)) {
            self.check_membership(message.generation())?;
        }
        match message {
            ProposerMessage::Greeting(greeting) => self.handle_greeting(&greeting),
            ProposerMessage::VoteRequest(request) => self.handle_vote(&request),
            ProposerMessage::ProposerElected(elected) => self.handle_elected(&elected),
            ProposerMessage::AppendRequest(append) => self.handle_append(append),
            ProposerMessage::WalDigestRequest(request) => self.handle_digest_request(&request),
            ProposerMessage::SetMembership(request) => self.handle_set_membership(request),
        }
    }

    /// A proposer of an older generation may not know that a quorum of its
    /// set has moved on (it would count a minority of the new quorum
    /// system); one of our generation, which leaves us out, has nothing to
    /// ask us. A newer generation may name us again (a removed safekeeper
    /// added back), so it is heard.
    fn check_membership(&self, generation: MembershipGeneration) -> Result<(), AcceptorError> {
        let ours = &self.state.membership;
        if generation < ours.generation {
            return Err(AcceptorError::StaleGeneration { ours: ours.generation, theirs: generation });
        }
        let left_out = ours.is_set() && ours.includes_node(self.node_id) == Some(false);
        if left_out && generation == ours.generation {
            return Err(AcceptorError::NotAMember { node_id: self.node_id, generation: ours.generation });
        }
        Ok(())
    }

    /// Store the elected proposer's configuration if it takes precedence
    /// over ours (a newer generation, or the same one written in a later
    /// term), then answer with what we hold.
    fn handle_set_membership(&mut self, request: SetMembership) -> Result<Ready, AcceptorError> {
        if request.term < self.state.term {
            return Ok(self.membership_response_ready(vec![]));
        }
        if self.elected_term != Some(request.term) {
            return Err(AcceptorError::NotElected { term: request.term });
        }
        let configuration = request.configuration;
        configuration.validate().map_err(|reason| AcceptorError::BadConfiguration { reason })?;
        if configuration.written_in_term > request.term {
            let reason =
                format!("written in term {} by a proposer of term {}", configuration.written_in_term, request.term);
            return Err(AcceptorError::BadConfiguration { reason });
        }
        let mut actions = vec![];
        if configuration.precedence() > self.state.membership.precedence() {
            self.state.membership = configuration;
            actions.push(self.persist_action());
        }
        Ok(self.membership_response_ready(actions))
    }

    fn membership_response_ready(&self, actions: Vec<StorageAction>) -> Ready {
        let ours = &self.state.membership;
        let reply = MembershipResponse {
            term: self.state.term,
            generation: ours.generation,
            written_in_term: ours.written_in_term,
        };
        Ready { actions, reply: Some(AcceptorMessage::MembershipResponse(reply)), digest: None }
    }

    fn handle_greeting(&mut self, greeting: &Greeting) -> Result<Ready, AcceptorError> {
        let checks = [
            ("protocol version", u64::from(PROTOCOL_VERSION), u64::from(greeting.protocol_version)),
            ("pg version", u64::from(self.state.pg_version), u64::from(greeting.pg_version)),
            ("wal segment size", self.state.wal_segment_size.bytes(), u64::from(greeting.wal_segment_size_bytes)),
        ];
        for (what, ours, theirs) in checks {
            if ours != theirs {
                return Err(AcceptorError::ParameterMismatch { what, ours, theirs });
            }
        }
        let reply = GreetingResponse {
            node_id: self.node_id,
            term: self.state.term,
            configuration: self.state.membership.clone(),
            pg_timelines: self.state.pg_timelines.clone(),
        };
        Ok(Ready { reply: Some(AcceptorMessage::GreetingResponse(reply)), ..Ready::default() })
    }

    fn handle_vote(&mut self, request: &VoteRequest) -> Result<Ready, AcceptorError> {
        self.check_not_superseded(request.pg_timeline)?;
        let vote_given = request.term > self.state.term;
        let mut actions = vec![];
        if vote_given {
            self.state.term = request.term;
            self.elected_term = None;
            actions.push(self.persist_action());
        }
        let reply = VoteResponse {
            term: self.state.term,
            vote_given,
            flush_lsn: self.wal.flush_lsn,
            commit_lsn: self.state.commit_lsn,
            timeline_start_lsn: self.state.timeline_start_lsn,
            term_history: self.state.term_history.up_to(self.wal.flush_lsn),
            pg_timelines: self.state.pg_timelines.clone(),
        };
        Ok(Ready { actions, reply: Some(AcceptorMessage::VoteResponse(reply)), digest: None })
    }

    /// A proposer streaming a Postgres timeline older than the one that
    /// wrote our log is the old primary of a failover: it must not win a
    /// term (that would fence the new primary). `NO_PG_TIMELINE`: a sync
    /// proposer, which streams no Postgres and adopts the donor's history.
    fn check_not_superseded(&self, pg_timeline: PgTimelineId) -> Result<(), AcceptorError> {
        let ours = &self.state.pg_timelines;
        if pg_timeline == NO_PG_TIMELINE || pg_timeline >= ours.current {
            return Ok(());
        }
        let switch_lsn = ours.left_at(pg_timeline);
        Err(AcceptorError::SupersededTimeline { proposer_timeline: pg_timeline, current: ours.current, switch_lsn })
    }

    fn handle_elected(&mut self, elected: &ProposerElected) -> Result<Ready, AcceptorError> {
        if elected.term < self.state.term {
            return Ok(self.append_response_ready(vec![]));
        }
        validate_proposer_history(elected)?;
        let mut actions = vec![];
        if self.wal.decoder.is_none() {
            self.initialize_wal(elected.timeline_start_lsn, &mut actions)?;
        } else {
            let common_lsn = self.common_point(elected);
            self.check_pg_timelines(&elected.pg_timelines, common_lsn)?;
            self.truncate_divergent_tail(common_lsn, &mut actions)?;
        }
        if elected.pg_timelines != self.state.pg_timelines {
            actions.push(StorageAction::SetPgTimelines(Box::new(elected.pg_timelines.clone())));
            self.state.pg_timelines = elected.pg_timelines.clone();
            self.timeline_check = Arc::new(elected.pg_timelines.clone());
        }
        self.state.term = elected.term;
        self.state.term_history = elected.term_history.clone();
        self.elected_term = Some(elected.term);
        actions.push(self.persist_action());
        Ok(self.append_response_ready(actions))
    }

    fn initialize_wal(&mut self, start_lsn: Lsn, actions: &mut Vec<StorageAction>) -> Result<(), AcceptorError> {
        let segment_size = self.state.wal_segment_size;
        if !start_lsn.is_valid() || !start_lsn.is_segment_start(segment_size) {
            return Err(AcceptorError::BadTimelineStart { lsn: start_lsn });
        }
        actions.push(StorageAction::InitializeWal { start_lsn });
        self.state.timeline_start_lsn = start_lsn;
        self.reset_wal_position(start_lsn);
        Ok(())
    }

    /// Where our log and the elected proposer's stop agreeing: what
    /// survives of ours (the rest is the divergent tail).
    fn common_point(&self, elected: &ProposerElected) -> Lsn {
        let ours = LogView { history: &self.state.term_history, end_lsn: self.wal.flush_lsn };
        let theirs = LogView { history: &elected.term_history, end_lsn: Lsn(u64::MAX) };
        let common_lsn = highest_common_point(ours, theirs).unwrap_or(self.state.timeline_start_lsn);
        common_lsn.min(self.wal.flush_lsn).max(self.state.timeline_start_lsn)
    }

    /// The proposer's Postgres timelines must not go below the one that
    /// wrote the last byte we keep (below `common_lsn`) and must say what
    /// ours say about that WAL; above it they may add switches, which the
    /// WAL that follows must bear out.
    fn check_pg_timelines(&self, theirs: &PgTimelineHistory, common_lsn: Lsn) -> Result<(), AcceptorError> {
        let ours = &self.state.pg_timelines;
        let start = self.state.timeline_start_lsn;
        if common_lsn <= start {
            return Ok(()); // we keep no WAL: no timeline of ours wrote any
        }
        // Only the WAL we keep counts: a newer timeline of ours that wrote
        // only the divergent tail (its term never committed) goes with it.
        let kept = ours.timeline_of(Lsn(common_lsn.0 - 1));
        if theirs.current < kept {
            return Err(AcceptorError::TimelineWentDown { ours: kept, theirs: theirs.current });
        }
        let (ours_here, theirs_here) = (ours.from_lsn(start), theirs.from_lsn(start));
        if !ours_here.agrees_below(&theirs_here, common_lsn) {
            return Err(AcceptorError::PgTimelinesDisagree {
                lsn: common_lsn,
                ours: describe_pg_timelines(&ours_here),
                theirs: describe_pg_timelines(&theirs_here),
            });
        }
        Ok(())
    }

    fn truncate_divergent_tail(
        &mut self,
        truncate_lsn: Lsn,
        actions: &mut Vec<StorageAction>,
    ) -> Result<(), AcceptorError> {
        if truncate_lsn < self.state.commit_lsn {
            return Err(AcceptorError::TruncateBelowCommit { truncate_lsn, commit_lsn: self.state.commit_lsn });
        }
        if truncate_lsn < self.wal.write_lsn {
            actions.push(StorageAction::TruncateWal { end_lsn: truncate_lsn });
            self.reset_wal_position(truncate_lsn);
            self.ack_pending = false;
        }
        Ok(())
    }

    fn reset_wal_position(&mut self, lsn: Lsn) {
        let segment_size = self.state.wal_segment_size;
        let decoder = if lsn == self.state.timeline_start_lsn {
            WalDecoder::at_segment_start(lsn, segment_size)
        } else {
            WalDecoder::at_record_boundary(lsn, segment_size)
        };
        self.wal = WalPosition { write_lsn: lsn, flush_lsn: lsn, written_boundary_lsn: lsn, decoder: Some(decoder) };
    }

    fn handle_append(&mut self, append: AppendRequest) -> Result<Ready, AcceptorError> {
        if append.term < self.state.term {
            return Ok(self.append_response_ready(vec![]));
        }
        if self.elected_term != Some(append.term) {
            return Err(AcceptorError::NotElected { term: append.term });
        }
        let (begin_lsn, end_lsn) = (append.begin_lsn, append.end_lsn);
        debug_assert_eq!(end_lsn.0 - begin_lsn.0, append.wal.len() as u64, "protocol decoder checks lengths");
        self.proposer_commit_lsn = self.proposer_commit_lsn.max(append.commit_lsn);
        if append.wal.is_empty() {
            // Heartbeat: only commit_lsn news; our flush is already durable.
            let actions = self.advance_commit();
            return Ok(self.append_response_ready(actions));
        }
        let write = self.write_wal(begin_lsn, append.wal)?;
        self.ack_pending = true;
        Ok(Ready { actions: vec![write], ..Ready::default() })
    }

    /// Committed WAL copied from a peer safekeeper (peer recovery): the
    /// same checks as a proposer's append (contiguous, one segment, valid
    /// records continuing ours), and the peer's log must be ours: only
    /// under a ProposerElected accepted in our current term (so our history
    /// is that proposer's), only up to the peer's commit LSN, and only if
    /// the peer's term history agrees with ours up to the end of the copy.
    /// Nobody waits for an acknowledgement: the flush LSN shows progress.
    ///
    /// Bootstrap: while our WAL is empty (nothing was ever written beyond
    /// the timeline start), a piece may begin at a later segment start
    /// instead of at our write position. The peers removed the WAL at our
    /// start (retention) and nobody may still have it, so our log then
    /// starts where theirs is still kept (see [`Self::restart_empty_wal`]).
    pub fn handle_peer_wal(&mut self, wal: &PeerWal) -> Result<Ready, AcceptorError> {
        let (begin_lsn, end_lsn) = (wal.begin_lsn, wal.begin_lsn + wal.wal.len() as u64);
        let refuse =
            |reason: &str| Err(AcceptorError::PeerWalRefused { begin_lsn, end_lsn, reason: reason.to_string() });
        if self.elected_term != Some(self.state.term) {
            return refuse("no proposer of our current term has been accepted yet");
        }
        if wal.wal.is_empty() || end_lsn > wal.source_commit_lsn {
            return refuse("empty, or beyond the peer's commit LSN");
        }
        let ours = LogView { history: &self.state.term_history, end_lsn };
        let theirs = LogView { history: &wal.source_history, end_lsn };
        if highest_common_point(ours, theirs).is_none_or(|common| common < end_lsn) {
            return refuse("the peer's term history disagrees with ours below the end of the copy");
        }
        let bootstrap = match self.is_bootstrap_start(begin_lsn) {
            Ok(bootstrap) => bootstrap,
            Err(reason) => return refuse(reason),
        };
        let actions = if bootstrap {
            self.restart_empty_wal(begin_lsn, wal.wal.clone())?
        } else {
            vec![self.write_wal(begin_lsn, wal.wal.clone())?]
        };
        // The peer's commit LSN is a commit of the one log, and our bytes
        // up to it are now the same as the peer's.
        self.proposer_commit_lsn = self.proposer_commit_lsn.max(wal.source_commit_lsn);
        Ok(Ready { actions, ..Ready::default() })
    }

    /// Whether a peer's piece at `begin_lsn` would bootstrap our WAL: it
    /// begins beyond our timeline start while our WAL holds nothing. Such a
    /// piece must begin at a segment start (every segment a safekeeper
    /// holds is complete from its first byte). A WAL that holds anything
    /// is only ever continued, never restarted: the normal checks refuse
    /// any other start.
    fn is_bootstrap_start(&self, begin_lsn: Lsn) -> Result<bool, &'static str> {
        let start_lsn = self.state.timeline_start_lsn;
        let wal_is_empty = self.wal.write_lsn == start_lsn && self.wal.flush_lsn == start_lsn;
        if begin_lsn <= start_lsn || !wal_is_empty {
            return Ok(false);
        }
        if !begin_lsn.is_segment_start(self.state.wal_segment_size) {
            return Err("our WAL is empty, and a copy that restarts it must begin at a segment start");
        }
        Ok(true)
    }

    /// Bootstrap: restart our empty WAL at `begin_lsn` (a segment start
    /// above our timeline start) and write the peer's first piece there.
    /// Everything is checked before anything changes. The control file
    /// names the new start before storage drops the old, empty WAL, so a
    /// crash in between leaves a start that recovery re-creates (and
    /// segments below it that it removes): either the old empty state or
    /// the new start, never a mix. WAL below the new start is not held
    /// here; it is committed (below the peer's commit LSN), so the commit
    /// LSN moves up to the new start: nobody may truncate below it.
    fn restart_empty_wal(&mut self, begin_lsn: Lsn, wal: Bytes) -> Result<Vec<StorageAction>, AcceptorError> {
        let segment_size = self.state.wal_segment_size;
        let decoder = self.check_wal(&WalDecoder::at_segment_start(begin_lsn, segment_size), begin_lsn, &wal)?;
        self.state.timeline_start_lsn = begin_lsn;
        self.state.commit_lsn = self.state.commit_lsn.max(begin_lsn);
        self.reset_wal_position(begin_lsn);
        let persist = self.persist_action();
        let restart = StorageAction::RestartEmptyWal { start_lsn: begin_lsn };
        let write = self.take_wal(decoder, begin_lsn, wal);
        Ok(vec![persist, restart, write])
    }

    /// Check WAL to be written at the write position and take it in (its
    /// records are decoded on a copy of the decoder: a refusal changes nothing).
    fn write_wal(&mut self, begin_lsn: Lsn, wal: Bytes) -> Result<StorageAction, AcceptorError> {
        if begin_lsn != self.wal.write_lsn {
            return Err(AcceptorError::NotContiguous { begin_lsn, write_lsn: self.wal.write_lsn });
        }
        let decoder = self.wal.decoder.as_ref().expect("a timeline that accepted ProposerElected has WAL");
        let decoder = self.check_wal(decoder, begin_lsn, &wal)?;
        Ok(self.take_wal(decoder, begin_lsn, wal))
    }

    /// The checks of WAL written at `begin_lsn` that `decoder` continues:
    /// one segment, valid records. Returns the decoder after the WAL.
    fn check_wal(&self, decoder: &WalDecoder, begin_lsn: Lsn, wal: &[u8]) -> Result<WalDecoder, AcceptorError> {
        let end_lsn = begin_lsn + wal.len() as u64;
        let segment_size = self.state.wal_segment_size;
        if Lsn(end_lsn.0 - 1).segment_no(segment_size) != begin_lsn.segment_no(segment_size) {
            return Err(AcceptorError::CrossesSegment { begin_lsn, end_lsn });
        }
        // Switch points inside this append, each to be met as a record end
        // (none, and nothing allocated, on all but a promotion's appends).
        let mut unmet_switches: Vec<Lsn> = (self.state.pg_timelines.switches.iter())
            .map(|switch| switch.end_lsn)
            .filter(|&lsn| begin_lsn < lsn && lsn <= end_lsn)
            .collect();
        let decoder = decode_appended(decoder, begin_lsn, wal, &self.timeline_check, &mut unmet_switches)?;
        if let Some(&switch_lsn) = unmet_switches.first() {
            return Err(AcceptorError::SwitchInsideRecord { switch_lsn });
        }
        Ok(decoder)
    }

    /// Take in checked WAL: `decoder` is the one [`Self::check_wal`] returned.
    fn take_wal(&mut self, decoder: WalDecoder, begin_lsn: Lsn, wal: Bytes) -> StorageAction {
        assert_eq!(begin_lsn, self.wal.write_lsn, "WAL is written at the write position");
        self.wal.written_boundary_lsn = decoder.boundary_lsn();
        self.wal.decoder = Some(decoder);
        self.wal.write_lsn = begin_lsn + wal.len() as u64;
        StorageAction::WriteWal { start_lsn: begin_lsn, wal }
    }

    /// The range must be durable here and lie in our log as the proposer
    /// knows it: after its ProposerElected, our log agrees with its history
    /// up to our flush LSN. (Whether retention kept the start is the
    /// driver's check: the acceptor does not track removed segments.)
    fn handle_digest_request(&mut self, request: &WalDigestRequest) -> Result<Ready, AcceptorError> {
        if request.term < self.state.term {
            return Ok(self.append_response_ready(vec![]));
        }
        if self.elected_term != Some(request.term) {
            return Err(AcceptorError::NotElected { term: request.term });
        }
        let (start_lsn, end_lsn) = (request.start_lsn, request.end_lsn);
        let held_start_lsn = self.state.timeline_start_lsn;
        if start_lsn < held_start_lsn || end_lsn > self.wal.flush_lsn || start_lsn > end_lsn {
            return Err(AcceptorError::DigestOutOfRange {
                start_lsn,
                end_lsn,
                held_start_lsn,
                flush_lsn: self.wal.flush_lsn,
            });
        }
        Ok(Ready { digest: Some(DigestToSend { term: self.state.term, start_lsn, end_lsn }), ..Ready::default() })
    }

    /// Everything written is durable: advance flush to the written record
    /// boundary and release the append acknowledgement.
    pub fn on_synced(&mut self, synced: SyncedLsn) -> Ready {
        assert_eq!(synced.lsn(), self.wal.write_lsn, "a sync covers every write handed to storage");
        assert!(self.wal.written_boundary_lsn >= self.wal.flush_lsn, "flush LSN moves forward");
        self.wal.flush_lsn = self.wal.written_boundary_lsn;
        let actions = self.advance_commit();
        if !std::mem::take(&mut self.ack_pending) {
            return Ready { actions, ..Ready::default() };
        }
        self.append_response_ready(actions)
    }

    /// The driver, after truncating storage: a decoder at the new write
    /// position that also knows the record before it (see
    /// `recovery::resume_decoder`), replacing the one `reset_wal_position` made.
    pub fn resume_decoding_with(&mut self, decoder: WalDecoder) {
        assert_eq!(decoder.boundary_lsn(), self.wal.write_lsn, "the decoder resumes at the write position");
        assert_eq!(self.wal.write_lsn, self.wal.written_boundary_lsn, "nothing written since the truncation");
        self.wal.decoder = Some(decoder);
    }

    /// Record what the WAL consumer confirmed (retention's input); persisted
    /// with the next control-file write. Never moves backwards.
    pub fn note_remote_consistent_lsn(&mut self, lsn: Lsn) {
        self.state.remote_consistent_lsn = self.state.remote_consistent_lsn.max(lsn);
    }

    /// The commit LSN the control file holds (where recovery would start).
    pub fn persisted_commit_lsn(&self) -> Lsn {
        self.persisted_commit_lsn
    }

    /// Persist the current state now (e.g. at shutdown) so recovery starts late.
    pub fn checkpoint(&mut self) -> Ready {
        Ready { actions: vec![self.persist_action()], ..Ready::default() }
    }

    fn advance_commit(&mut self) -> Vec<StorageAction> {
        let candidate = self.proposer_commit_lsn.min(self.wal.flush_lsn);
        if candidate > self.state.commit_lsn {
            self.state.commit_lsn = candidate;
        }
        assert!(self.state.commit_lsn <= self.wal.flush_lsn, "commit never passes the local flush");
        let since_checkpoint = self.state.commit_lsn.0 - self.persisted_commit_lsn.0;
        if since_checkpoint >= self.config.checkpoint_interval_bytes {
            vec![self.persist_action()]
        } else {
            vec![]
        }
    }

    fn persist_action(&mut self) -> StorageAction {
        assert!(self.state.commit_lsn >= self.persisted_commit_lsn, "commit_lsn never moves backwards");
        self.persisted_commit_lsn = self.state.commit_lsn;
        StorageAction::PersistControl(Box::new(self.state.clone()))
    }

    fn append_response_ready(&self, actions: Vec<StorageAction>) -> Ready {
        let reply =
            AppendResponse { term: self.state.term, flush_lsn: self.wal.flush_lsn, commit_lsn: self.state.commit_lsn };
        Ready { actions, reply: Some(AcceptorMessage::AppendResponse(reply)), digest: None }
    }
}

/// Feed appended WAL to a copy of the decoder so a rejected append leaves the
/// acceptor's decoder untouched. Postgres never streams a zero length where
/// a record starts, so that is refused too. Every page header must name
/// the timeline `timelines` gives for it; each switch point in
/// `unmet_switches` that a record ends at is removed from it.
fn decode_appended(
    decoder: &WalDecoder,
    begin_lsn: Lsn,
    wal: &[u8],
    timelines: &Arc<PgTimelineHistory>,
    unmet_switches: &mut Vec<Lsn>,
) -> Result<WalDecoder, AcceptorError> {
    let end_lsn = begin_lsn + wal.len() as u64;
    let mut trial = decoder.clone();
    trial.check_timelines(Arc::clone(timelines));
    trial.feed(wal);
    match trial.decode_available(|record| unmet_switches.retain(|&lsn| lsn != record.end_lsn)) {
        Ok(DecodeStep::EndOfWal { lsn }) => Err(AcceptorError::ZeroLengthRecord { lsn }),
        Ok(_) => Ok(trial),
        Err(WalDecodeError::PageTimelineMismatch { lsn, expected, found }) => {
            Err(AcceptorError::PageTimelineMismatch { page_lsn: lsn, expected, found })
        }
        Err(source) => Err(AcceptorError::InvalidWal { begin_lsn, end_lsn, source }),
    }
}

fn describe_pg_timelines(history: &PgTimelineHistory) -> String {
    let mut text: String =
        history.switches.iter().map(|switch| format!("{} until {}, ", switch.timeline, switch.end_lsn)).collect();
    text.push_str(&format!("{} after", history.current));
    text
}

fn validate_proposer_history(elected: &ProposerElected) -> Result<(), AcceptorError> {
    let bad = |reason: &str| Err(AcceptorError::BadTermHistory { reason: reason.to_string() });
    if !elected.term_history.is_well_formed() {
        return bad("terms must increase and start LSNs must not decrease");
    }
    let last = TermStart { term: elected.term, start_lsn: elected.term_start_lsn };
    if elected.term_history.0.last() != Some(&last) {
        return bad("the last entry must be the proposer's term and start LSN");
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
