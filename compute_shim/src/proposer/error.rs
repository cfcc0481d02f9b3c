//! What can go wrong: conditions that end a run of the proposer (which of
//! them end the process is driver::exit's call), and faults of
//! one safekeeper's input after which the driver drops that connection.

use postgres_wal::lsn::{Lsn, PgTimelineId};
use safekeeper_protocol::ids::{NodeId, Term};
use safekeeper_protocol::membership::MembershipGeneration;

use super::peer::SlotIndex;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposerError {
    #[error(
        "fenced: a safekeeper is at term {term}, not below ours; another compute_shim has taken over, stepping down"
    )]
    Fenced { term: Term },
    #[error(
        "Postgres's WAL ended at {postgres_flush_lsn} when this shim started, before the safekeepers' log ends at \
         {term_start_lsn}: either another shim streamed newer WAL of this Postgres meanwhile (restart this one), or \
         Postgres lost WAL the safekeepers hold; refusing to lead (committed WAL is never truncated to fit Postgres)"
    )]
    PostgresBehind { term_start_lsn: Lsn, postgres_flush_lsn: Lsn },
    #[error(
        "Postgres can stream only from {timeline_start_lsn}, after the safekeepers' log ends at {term_start_lsn}: \
         the WAL in between is gone; refusing to lead"
    )]
    PostgresWalGone { term_start_lsn: Lsn, timeline_start_lsn: Lsn },
    #[error(
        "superseded by a failover: the safekeepers' log went on at Postgres timeline {current} (this Postgres's \
         timeline {timeline} ended at LSN {switch_lsn} in that log), so this is the old primary; refusing to lead, \
         which would fence the new one. Rejoin it as a standby of the new primary (pg_rewind or a new base backup, \
         docs/failover.md)"
    )]
    Superseded { timeline: PgTimelineId, current: PgTimelineId, switch_lsn: Lsn },
    #[error(
        "Postgres's timeline {timeline} began at {switch_lsn}, below the end of the safekeepers' log at {log_end_lsn} \
         (written on timeline {log_timeline}): it was promoted before it replayed everything the safekeepers hold. \
         Refusing to lead, nothing was sent: promote a standby only once it has replayed to the LSN \
         sync-safekeepers printed (docs/failover.md)"
    )]
    PromotedBelowLogEnd { timeline: PgTimelineId, switch_lsn: Lsn, log_end_lsn: Lsn, log_timeline: PgTimelineId },
    #[error(
        "Postgres is on timeline {timeline}, which is not in the history of the safekeepers' log (timeline \
         {log_timeline}) nor descends from it; refusing to lead"
    )]
    UnrelatedTimeline { timeline: PgTimelineId, log_timeline: PgTimelineId },
    #[error("the safekeepers that voted hold no WAL of this timeline: there is nothing to sync")]
    NothingToSync,
    #[error(
        "safekeeper {safekeeper} reports commit LSN {commit_lsn} above the most advanced voter's log end \
         {term_start_lsn}: the safekeepers' state is inconsistent; refusing to lead"
    )]
    CommitAboveTermStart { safekeeper: SlotIndex, commit_lsn: Lsn, term_start_lsn: Lsn },
    #[error(
        "Postgres's WAL in {start_lsn}..{end_lsn}, just below where the safekeepers' log ends, differs from that log \
         (as safekeeper {safekeeper} holds it): this Postgres is not the primary that wrote the log (a server \
         restored from a backup and promoted, or one whose WAL forked from an unacknowledged tail a safekeeper \
         kept); refusing to lead, nothing was sent. docs/operations.md, \"Postgres's WAL differs from the log\""
    )]
    PostgresDiverged { start_lsn: Lsn, end_lsn: Lsn, safekeeper: SlotIndex },
    #[error(
        "no safekeeper holding the log up to the term start {term_start_lsn} has been reachable for {waited_ms} ms, \
         so Postgres's WAL cannot be checked against it; starting over so that a new election picks a log the \
         reachable safekeepers hold"
    )]
    NoLogHolder { term_start_lsn: Lsn, waited_ms: u64 },
    #[error(
        "Postgres removed WAL at {lsn} while this shim was comparing it with the safekeepers' log; starting over \
         so that a new run compares from where Postgres's WAL now begins"
    )]
    LogCheckWalRemoved { lsn: Lsn },
    #[error(
        "Postgres removed WAL at {lsn} that the safekeepers still need (a replication slot should have kept \
         it); refusing to go on"
    )]
    PostgresWalRemoved { lsn: Lsn },
    #[error(
        "safekeepers {first} and {second} are the same node (id {node_id}): it would count twice toward a quorum; \
         fix --safekeepers"
    )]
    DuplicateSafekeeper { node_id: NodeId, first: String, second: String },
    #[error(
        "safekeeper {safekeeper} answered as node {now}, earlier as node {previous}: a replaced node does not hold \
         what the old one acknowledged; give a new safekeeper its own address and add it by a membership change \
         (docs/operations.md, \"Changing the safekeeper set\")"
    )]
    SafekeeperReplaced { safekeeper: SlotIndex, previous: NodeId, now: NodeId },
    #[error("the donor's term history is full; cannot start another term")]
    TermHistoryFull,
    #[error(
        "a safekeeper is at term {term}, the highest term there is (or beyond it): no later term can be \
         started; this timeline's terms were pushed up by a client that should not have reached the safekeepers \
         (docs/security.md)"
    )]
    TermsExhausted { term: Term },
    #[error("safekeeper {safekeeper}: {fault}")]
    Peer { safekeeper: SlotIndex, fault: PeerFault },
    #[error("WAL from Postgres before the proposer asked for it (see wal_wanted_from)")]
    WalNotWanted,
    #[error("WAL from Postgres starts at {got}, expected {expected}")]
    WalNotContiguous { expected: Lsn, got: Lsn },
    #[error("WAL buffer full: {buffered_bytes} bytes held, {incoming_bytes} more would pass {max_bytes}")]
    WalBufferFull { buffered_bytes: u64, incoming_bytes: u64, max_bytes: u64 },
}

impl ProposerError {
    /// Whether this run of the proposer must stop. A peer fault only ends that safekeeper's
    /// connection; a full buffer means "stop reading Postgres for now".
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ProposerError::Peer { .. } | ProposerError::WalBufferFull { .. })
    }
}

/// A safekeeper broke the protocol; its connection should be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerFault {
    #[error("unexpected {message} while {state}")]
    Unexpected { message: &'static str, state: &'static str },
    #[error("answered in term {got}, expected {expected}")]
    WrongTerm { expected: Term, got: Term },
    #[error("flush LSN went back from {previous} to {reported}")]
    FlushWentBack { previous: Lsn, reported: Lsn },
    #[error("flush LSN {reported} is beyond the {sent} we sent")]
    FlushBeyondSent { reported: Lsn, sent: Lsn },
    #[error("malformed vote: {reason}")]
    BadVote { reason: &'static str },
    #[error("WAL digest of {got:?} answered, {asked:?} asked for")]
    WrongDigestRange { asked: (Lsn, Lsn), got: (Lsn, Lsn) },
    #[error("malformed membership configuration: {reason}")]
    BadConfiguration { reason: String },
    #[error("answered as node {got}, but the configuration names node {expected} at this address")]
    WrongNode { expected: NodeId, got: NodeId },
    #[error("holds configuration generation {generation} (term {written_in_term}), newer than ours: greeting again to learn it")]
    NewerConfiguration { generation: MembershipGeneration, written_in_term: Term },
}
