//! What the proposer knows about one safekeeper.

use std::collections::VecDeque;

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::ids::{NodeId, Term};
use safekeeper_protocol::membership::MembershipGeneration;
use safekeeper_protocol::protocol::ProposerMessage;

use super::config::MAX_QUEUED_CONTROL_MESSAGES;
use super::election::Vote;
use super::error::PeerFault;
use super::status::PeerState;

/// The proposer's slot for one safekeeper address: stable for the
/// proposer's life (slots are never removed), so it names a safekeeper in
/// everything the proposer, the node and the driver exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotIndex(pub usize);

impl std::fmt::Display for SlotIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The proposer's peers are indexed by slot, never by a bare number.
impl std::ops::Index<SlotIndex> for Vec<Peer> {
    type Output = Peer;
    fn index(&self, slot: SlotIndex) -> &Peer {
        &self[slot.0]
    }
}

impl std::ops::IndexMut<SlotIndex> for Vec<Peer> {
    fn index_mut(&mut self, slot: SlotIndex) -> &mut Peer {
        &mut self[slot.0]
    }
}

/// Every slot of `peers`, in order.
pub(super) fn slots(peers: &[Peer]) -> impl Iterator<Item = SlotIndex> {
    (0..peers.len()).map(SlotIndex)
}

/// Where the current connection to a safekeeper is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Link {
    Disconnected,
    /// Greeting sent, waiting for the GreetingResponse.
    AwaitingGreeting,
    /// Greeted; nothing to ask it yet (or it cannot vote for our term).
    Greeted,
    AwaitingVote,
    Voted,
    /// ProposerElected sent, waiting for the AppendResponse with its flush.
    AwaitingElectedAck,
    /// Sent up to `next_lsn` (its write position once everything arrives).
    Streaming {
        next_lsn: Lsn,
    },
    /// Its position is below the WAL we still hold, and Postgres no longer
    /// has that WAL either (or it would not fit the buffer); peer recovery
    /// (copying from another safekeeper) is what would bring it back.
    TooFarBehind,
}

#[derive(Debug)]
pub(super) struct Peer {
    /// Its pg address: what configurations and the operator name it by.
    pub addr: String,
    /// Changes each time the slot is reset (the safekeeper was let go): a
    /// connection made for an earlier incarnation is not this one's.
    pub incarnation: u64,
    /// Reset since it was last wanted (nothing of it counts).
    pub retired: bool,
    pub link: Link,
    pub node_id: Option<NodeId>,
    /// The term it reported last (greeting or reply); `None` before any greeting.
    pub reported_term: Option<Term>,
    /// Its granted vote in our campaign; kept across reconnects.
    pub vote: Option<Vote>,
    /// Its flush LSN acknowledged in our term; kept across reconnects,
    /// because acknowledged WAL is durable.
    pub flush_lsn: Option<Lsn>,
    /// Sent ProposerElected when we won; streaming from Postgres waits for
    /// its answer (or its disconnection) to know how far back to start.
    pub awaited_for_wal_start: bool,
    /// Control messages for the current connection.
    pub outbox: VecDeque<ProposerMessage>,
    pub last_sent_ms: u64,
    /// The precedence (generation, term) of the configuration it holds,
    /// as its greeting or its last MembershipResponse showed.
    pub stored_configuration: Option<(MembershipGeneration, Term)>,
    /// A SetMembership is on its way on this connection.
    pub membership_outstanding: bool,
}

impl Peer {
    pub fn new(addr: String, incarnation: u64) -> Self {
        Peer {
            addr,
            incarnation,
            retired: false,
            link: Link::Disconnected,
            node_id: None,
            reported_term: None,
            vote: None,
            flush_lsn: None,
            awaited_for_wal_start: false,
            outbox: VecDeque::new(),
            last_sent_ms: 0,
            stored_configuration: None,
            membership_outstanding: false,
        }
    }

    pub fn queue(&mut self, message: ProposerMessage) {
        assert!(self.link != Link::Disconnected, "nothing is queued for a closed connection");
        assert!(self.outbox.len() < MAX_QUEUED_CONTROL_MESSAGES, "one control message per step at a time");
        self.outbox.push_back(message);
    }

    /// Record a flush acknowledged in our term. Acknowledged WAL is durable
    /// on the acceptor, so a flush that goes back breaks the protocol.
    pub fn record_flush(&mut self, reported: Lsn) -> Result<(), PeerFault> {
        if let Some(previous) = self.flush_lsn {
            if reported < previous {
                return Err(PeerFault::FlushWentBack { previous, reported });
            }
        }
        self.flush_lsn = Some(reported);
        Ok(())
    }

    /// A name for the current link state, for errors.
    pub fn link_name(&self) -> &'static str {
        self.state().name()
    }

    pub fn state(&self) -> PeerState {
        match self.link {
            Link::Disconnected => PeerState::Disconnected,
            Link::AwaitingGreeting => PeerState::Connecting,
            Link::Greeted => PeerState::Greeted,
            Link::AwaitingVote => PeerState::VoteRequested,
            Link::Voted => PeerState::Voted,
            Link::AwaitingElectedAck => PeerState::Elected,
            Link::Streaming { .. } => PeerState::Streaming,
            Link::TooFarBehind => PeerState::TooFarBehind,
        }
    }
}
