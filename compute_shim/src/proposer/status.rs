//! A snapshot of the proposer for the shim's HTTP status endpoint.

use serde::Serialize;

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::ids::{NodeId, Term};

use super::membership::MembershipStatus;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProposerStatus {
    pub phase: Phase,
    /// The term campaigned for or won.
    pub term: Option<Term>,
    pub term_start_lsn: Option<Lsn>,
    pub commit_lsn: Lsn,
    /// WAL held for safekeepers: `[start, end)`.
    pub buffered_wal_start_lsn: Option<Lsn>,
    pub buffered_wal_end_lsn: Option<Lsn>,
    /// WAL re-read from Postgres for a safekeeper behind the buffer.
    pub catch_up_wal_start_lsn: Option<Lsn>,
    pub catch_up_wal_end_lsn: Option<Lsn>,
    /// Whether Postgres's WAL below the term start was found to be the
    /// safekeepers' log; no WAL is sent before.
    pub postgres_wal_checked: bool,
    /// The configuration quorums are counted in, and a change under way.
    pub membership: MembershipStatus,
    /// Every safekeeper we keep a connection to.
    pub safekeepers: Vec<SafekeeperStatus>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Waiting for greetings from a quorum.
    #[default]
    Greeting,
    Voting,
    Elected,
    Fenced,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SafekeeperStatus {
    pub addr: String,
    /// Whether it counts toward quorums (else: joining, or being told it left).
    pub member: bool,
    pub state: PeerState,
    pub node_id: Option<NodeId>,
    pub term: Option<Term>,
    /// Flush LSN acknowledged in our term.
    pub flush_lsn: Option<Lsn>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    Disconnected,
    Connecting,
    Greeted,
    VoteRequested,
    Voted,
    /// ProposerElected sent, waiting for its answer.
    Elected,
    Streaming,
    TooFarBehind,
}

impl PeerState {
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Disconnected => "disconnected",
            PeerState::Connecting => "connecting",
            PeerState::Greeted => "greeted",
            PeerState::VoteRequested => "vote-requested",
            PeerState::Voted => "voted",
            PeerState::Elected => "elected",
            PeerState::Streaming => "streaming",
            PeerState::TooFarBehind => "too-far-behind",
        }
    }
}
