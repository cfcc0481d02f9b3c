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

/// The slot table (raft-rs's `ProgressTracker`): one slot per safekeeper
/// address we know, the command line's, then those configurations and
/// membership requests name. Slots are never removed (indexes stay stable
/// for the driver); unwanted ones are idle, and reused for a new address.
#[derive(Debug)]
pub(super) struct Peers {
    slots: Vec<Peer>,
    /// For [`Peer::incarnation`]: every fresh peer gets the next one.
    next_incarnation: u64,
}

impl Peers {
    pub fn from_addrs(addrs: &[String]) -> Self {
        let slots: Vec<Peer> = addrs.iter().enumerate().map(|(sk, addr)| Peer::new(addr.clone(), sk as u64)).collect();
        Peers { next_incarnation: slots.len() as u64, slots }
    }

    /// A table of exactly these peers.
    #[cfg(test)]
    pub fn for_tests(slots: Vec<Peer>) -> Self {
        Peers { next_incarnation: slots.len() as u64, slots }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn get(&self, sk: SlotIndex) -> Option<&Peer> {
        self.slots.get(sk.0)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Peer> {
        self.slots.iter()
    }

    /// Every slot, in order.
    pub fn slots(&self) -> impl Iterator<Item = SlotIndex> {
        (0..self.slots.len()).map(SlotIndex)
    }

    /// The slot named `addr`.
    pub fn find(&self, addr: &str) -> Option<SlotIndex> {
        self.slots().find(|&sk| self[sk].addr == addr)
    }

    /// The slot for `addr`, made if new: an unwanted slot is reused first,
    /// else one is added (at most `max_slots`).
    pub fn ensure(&mut self, addr: &str, wanted: impl Fn(&Peer) -> bool, max_slots: usize) -> SlotIndex {
        if let Some(sk) = self.find(addr) {
            return sk;
        }
        match self.slots().find(|&sk| !wanted(&self[sk])) {
            Some(sk) => {
                self.slots[sk.0] = self.fresh(addr);
                sk
            }
            None => {
                assert!(self.slots.len() < max_slots, "requests are checked against the slot bound");
                let peer = self.fresh(addr);
                self.slots.push(peer);
                SlotIndex(self.slots.len() - 1)
            }
        }
    }

    /// Forget safekeepers we no longer talk to: the driver closes their
    /// connections (the incarnation changed), and nothing they acknowledged
    /// counts anywhere. A slot wanted again is no longer retired.
    pub fn retire_unwanted(&mut self, wanted: impl Fn(&Peer) -> bool) {
        for sk in self.slots() {
            if wanted(&self[sk]) {
                self[sk].retired = false;
            } else if !self[sk].retired {
                let addr = self[sk].addr.clone();
                self.slots[sk.0] = self.fresh(&addr);
                self[sk].retired = true;
            }
        }
    }

    /// A blank peer for `addr` with a new incarnation.
    fn fresh(&mut self, addr: &str) -> Peer {
        self.next_incarnation += 1;
        Peer::new(addr.to_string(), self.next_incarnation)
    }
}

/// The proposer's peers are indexed by slot, never by a bare number.
impl std::ops::Index<SlotIndex> for Peers {
    type Output = Peer;
    fn index(&self, slot: SlotIndex) -> &Peer {
        &self.slots[slot.0]
    }
}

impl std::ops::IndexMut<SlotIndex> for Peers {
    fn index_mut(&mut self, slot: SlotIndex) -> &mut Peer {
        &mut self.slots[slot.0]
    }
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
    /// When its current connection last delivered a message (or opened).
    pub last_heard_ms: u64,
    /// The precedence (generation, term) of the configuration it holds,
    /// as its greeting or its last MembershipResponse showed.
    pub stored_configuration: Option<(MembershipGeneration, Term)>,
    /// A SetMembership is on its way on this connection.
    pub membership_outstanding: bool,
    /// The commit LSN last sent on this connection.
    pub sent_commit_lsn: Lsn,
    /// The commit LSN it last reported in our term (its flush bounds it).
    pub reported_commit_lsn: Option<Lsn>,
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
            last_heard_ms: 0,
            stored_configuration: None,
            membership_outstanding: false,
            sent_commit_lsn: Lsn::INVALID,
            reported_commit_lsn: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn ensure_reuses_an_unwanted_slot_with_a_new_incarnation() {
        let mut peers = Peers::from_addrs(&addrs(&["a", "b"]));
        assert_eq!(peers.ensure("b", |_| true, 4), SlotIndex(1), "known addresses keep their slot");
        let c = peers.ensure("c", |_| true, 4);
        assert_eq!((c, peers.len()), (SlotIndex(2), 3), "all wanted: a slot is added");
        let d = peers.ensure("d", |peer| peer.addr != "a", 4);
        assert_eq!((d, peers.len()), (SlotIndex(0), 3), "a's slot is reused");
        assert_eq!(peers.find("d"), Some(SlotIndex(0)));
        assert_eq!(peers.find("a"), None);
        assert!(peers[d].incarnation > peers[c].incarnation, "a fresh peer is a new incarnation");
    }

    #[test]
    fn retiring_resets_a_slot_once() {
        let mut peers = Peers::from_addrs(&addrs(&["a", "b"]));
        peers[SlotIndex(1)].flush_lsn = Some(Lsn(5));
        peers.retire_unwanted(|peer| peer.addr == "a");
        let retired = &peers[SlotIndex(1)];
        assert!(retired.retired && retired.flush_lsn.is_none(), "nothing it acknowledged counts");
        let incarnation = retired.incarnation;
        peers.retire_unwanted(|peer| peer.addr == "a");
        assert_eq!(peers[SlotIndex(1)].incarnation, incarnation, "an idle slot is not reset again");
        peers.retire_unwanted(|_| true);
        assert!(!peers[SlotIndex(1)].retired, "wanted again");
    }
}
