//! The campaign for a term: greet a quorum, pick the term, ask for votes,
//! decide the election. It decides over a read-only view of the peers and
//! says what to do; the proposer sends the messages and changes the links.

use safekeeper_protocol::ids::Term;
use safekeeper_protocol::protocol::VoteResponse;

use super::config::ProposerConfig;
use super::election::{self, Election, Vote};
use super::error::{PeerFault, ProposerError};
use super::membership::Membership;
use super::peer::{Link, Peer, Peers, SlotIndex};

pub(super) enum Stage {
    /// Waiting for greetings from a quorum to pick a term.
    Greeting,
    Voting {
        term: Term,
    },
    Elected(Box<Election>),
}

pub(super) struct Campaign {
    stage: Stage,
    /// When a quorum had greeted: the term is picked once every connected
    /// safekeeper greeted too, or a heartbeat interval later.
    quorum_greeted_at_ms: Option<u64>,
    /// A configuration adopted before the term was picked named
    /// safekeepers not yet connected: the wait above covers them too.
    awaiting_adopted_members: bool,
    /// When we won: streaming waits for every voter's log end, but for at
    /// most a heartbeat interval once a quorum has answered.
    elected_at_ms: u64,
}

/// What the campaign decides over.
pub(super) struct View<'a> {
    pub peers: &'a Peers,
    /// Who counts toward quorums, and who is wanted.
    pub membership: &'a Membership,
    pub now_ms: u64,
    pub config: &'a ProposerConfig,
}

/// What to do about one greeted safekeeper while voting.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ask {
    /// Not asked: not a member (it joins once we are elected), or already
    /// at our term (it may have voted for us on a lost connection, or for
    /// a rival; it joins once we are elected).
    Nothing,
    /// It reconnected after voting for us: its vote still counts.
    Voted,
    /// Send it a vote request for this term.
    Request(Term),
}

/// A granted vote, checked.
pub(super) enum VoteAnswer {
    /// In our campaign: record it, then see whether the election is decided.
    Granted(Vote),
    /// After we won: it only needs to learn the outcome.
    AfterWin,
}

impl Campaign {
    pub fn new() -> Self {
        Campaign {
            stage: Stage::Greeting,
            quorum_greeted_at_ms: None,
            awaiting_adopted_members: false,
            elected_at_ms: 0,
        }
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    pub fn is_greeting(&self) -> bool {
        matches!(self.stage, Stage::Greeting)
    }

    /// Our term: campaigned for or won.
    pub fn term(&self) -> Option<Term> {
        match &self.stage {
            Stage::Greeting => None,
            Stage::Voting { term } => Some(*term),
            Stage::Elected(election) => Some(election.term),
        }
    }

    pub fn election(&self) -> Option<&Election> {
        match &self.stage {
            Stage::Elected(election) => Some(election),
            _ => None,
        }
    }

    /// When the greeting wait for the rest ends, once a quorum greeted.
    pub fn greeting_wait_ends_ms(&self, heartbeat_ms: u64) -> Option<u64> {
        match self.stage {
            Stage::Greeting => self.quorum_greeted_at_ms.map(|at| at + heartbeat_ms),
            _ => None,
        }
    }

    /// Once elected: when streaming stops waiting for every voter's log end.
    pub fn voters_wait_ends_ms(&self, heartbeat_ms: u64) -> Option<u64> {
        self.election().map(|_| self.elected_at_ms + heartbeat_ms)
    }

    /// A newer configuration was adopted: its members may hold a higher
    /// term than those greeted so far, so a term not yet picked waits for
    /// them (the greeting wait starts over).
    pub fn on_adopted(&mut self) {
        if self.is_greeting() {
            self.awaiting_adopted_members = true;
            self.quorum_greeted_at_ms = None;
        }
    }

    /// Term = max(terms seen) + 1, once a quorum has greeted us. Returns
    /// the term when it was picked now (the greeted are then to be asked).
    pub fn pick_term(&mut self, view: View) -> Option<Term> {
        if !self.is_greeting() || !view.membership.is_quorum(view.peers, |peer| peer.reported_term.is_some()) {
            return None;
        }
        // Waiting briefly for the rest avoids picking a term that a slower
        // greeting then shows to be stale (which would fence us).
        let greeted_at_ms = *self.quorum_greeted_at_ms.get_or_insert(view.now_ms);
        let awaiting = view.peers.iter().any(|peer| {
            peer.link == Link::AwaitingGreeting
                || self.awaiting_adopted_members && view.membership.wants(&peer.addr) && peer.reported_term.is_none()
        });
        if awaiting && view.now_ms.saturating_sub(greeted_at_ms) < view.config.heartbeat_interval_ms {
            return None;
        }
        let highest = view.peers.iter().filter_map(|peer| peer.reported_term).max().unwrap_or_default();
        // Reported terms are checked when they arrive (`check_term`).
        let term = highest.next()?;
        self.stage = Stage::Voting { term };
        Some(term)
    }

    /// Whether to ask `peer` (greeted, or reconnected) for its vote. Only
    /// members are asked: a vote elsewhere would count nowhere.
    pub fn ask(&self, peer: &Peer, membership: &Membership) -> Ask {
        let Stage::Voting { term } = self.stage else { return Ask::Nothing };
        if !membership.current.includes_addr(&peer.addr) {
            Ask::Nothing
        } else if peer.vote.is_some() {
            Ask::Voted
        } else if peer.reported_term < Some(term) {
            Ask::Request(term)
        } else {
            Ask::Nothing
        }
    }

    /// Check the vote answer of slot `sk` (its term not above ours: the
    /// caller fenced on that). A refusal at our term or above fences us.
    pub fn on_vote(&self, sk: SlotIndex, response: VoteResponse) -> Result<VoteAnswer, ProposerError> {
        let term = match &self.stage {
            Stage::Greeting => unreachable!("votes are requested only with a term"),
            Stage::Voting { term } => *term,
            Stage::Elected(_) => return Ok(VoteAnswer::AfterWin),
        };
        if !response.vote_given {
            // It has promised our term or a higher one to someone else.
            if response.term >= term {
                return Err(ProposerError::Fenced { term: response.term });
            }
            return Err(ProposerError::Peer {
                safekeeper: sk,
                fault: PeerFault::WrongTerm { expected: term, got: response.term },
            });
        }
        let vote =
            Vote::from_response(response, term).map_err(|fault| ProposerError::Peer { safekeeper: sk, fault })?;
        Ok(VoteAnswer::Granted(vote))
    }

    /// The election's outcome once a quorum voted for our term.
    pub fn decide(&self, view: View) -> Result<Option<Election>, ProposerError> {
        let Stage::Voting { term } = self.stage else { return Ok(None) };
        if !view.membership.is_quorum(view.peers, |peer| peer.vote.is_some()) {
            return Ok(None);
        }
        let votes: Vec<(SlotIndex, &Vote)> =
            view.peers.slots().filter_map(|sk| view.peers[sk].vote.as_ref().map(|vote| (sk, vote))).collect();
        election::decide(term, &votes, view.config).map(Some)
    }

    pub fn on_elected(&mut self, election: Election, now_ms: u64) {
        self.stage = Stage::Elected(Box::new(election));
        self.elected_at_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use postgres_wal::lsn::Lsn;
    use safekeeper_protocol::term_history::TermHistory;

    use super::*;

    const SEG: u64 = 1 << 20;
    const HEARTBEAT_MS: u64 = 100;

    /// Peers a, b, c (the test config's), disconnected.
    fn fixture() -> (ProposerConfig, Membership, Peers) {
        let config = ProposerConfig::for_tests();
        let membership = Membership::from_command_line(&config.safekeepers, config.heartbeat_interval_ms);
        let peers = Peers::from_addrs(&config.safekeepers);
        (config, membership, peers)
    }

    fn view<'a>(config: &'a ProposerConfig, membership: &'a Membership, peers: &'a Peers, now_ms: u64) -> View<'a> {
        View { peers, membership, now_ms, config }
    }

    fn greet(peers: &mut Peers, sk: usize, term: u64) {
        peers[SlotIndex(sk)].reported_term = Some(Term(term));
        peers[SlotIndex(sk)].link = Link::Greeted;
    }

    /// a, b and c greeted at `term`: the campaign votes at the next one.
    fn voting_after(term: u64) -> (ProposerConfig, Membership, Peers, Campaign) {
        let (config, membership, mut peers) = fixture();
        let mut campaign = Campaign::new();
        for sk in 0..3 {
            greet(&mut peers, sk, term);
        }
        assert_eq!(campaign.pick_term(view(&config, &membership, &peers, 0)), Some(Term(term + 1)));
        (config, membership, peers, campaign)
    }

    fn granted(term: Term) -> VoteResponse {
        VoteResponse {
            term,
            vote_given: true,
            flush_lsn: Lsn(2 * SEG),
            commit_lsn: Lsn(SEG),
            timeline_start_lsn: Lsn(SEG),
            term_history: TermHistory(Vec::new()),
            pg_timelines: Default::default(),
        }
    }

    /// Rule: the term is one above the highest greeted, picked once a
    /// quorum greeted and nobody else is still greeting.
    #[test]
    fn term_is_max_greeted_plus_one_once_a_quorum_greeted() {
        let (config, membership, mut peers) = fixture();
        let mut campaign = Campaign::new();
        greet(&mut peers, 0, 4);
        assert_eq!(campaign.pick_term(view(&config, &membership, &peers, 0)), None, "one of three");
        greet(&mut peers, 1, 7);
        assert_eq!(campaign.pick_term(view(&config, &membership, &peers, 0)), Some(Term(8)));
        assert_eq!(campaign.term(), Some(Term(8)));
        assert_eq!(campaign.pick_term(view(&config, &membership, &peers, 0)), None, "picked once");
    }

    /// Rule: with a quorum greeted and another still greeting, the term
    /// waits for it, but for at most a heartbeat interval.
    #[test]
    fn waits_a_heartbeat_for_the_rest() {
        let (config, membership, mut peers) = fixture();
        let mut campaign = Campaign::new();
        greet(&mut peers, 0, 2);
        greet(&mut peers, 1, 2);
        peers[SlotIndex(2)].link = Link::AwaitingGreeting;
        assert_eq!(campaign.pick_term(view(&config, &membership, &peers, 1000)), None);
        assert_eq!(campaign.greeting_wait_ends_ms(HEARTBEAT_MS), Some(1000 + HEARTBEAT_MS));
        assert_eq!(campaign.pick_term(view(&config, &membership, &peers, 1000 + HEARTBEAT_MS - 1)), None);

        // A late greeting with a higher term is what the wait is for.
        greet(&mut peers, 2, 5);
        assert_eq!(campaign.pick_term(view(&config, &membership, &peers, 1050)), Some(Term(6)));

        let mut impatient = Campaign::new();
        peers[SlotIndex(2)] = Peer::new("c".into(), 9);
        peers[SlotIndex(2)].link = Link::AwaitingGreeting;
        assert_eq!(impatient.pick_term(view(&config, &membership, &peers, 0)), None);
        assert_eq!(impatient.pick_term(view(&config, &membership, &peers, HEARTBEAT_MS)), Some(Term(3)));
    }

    /// Rule: only members below our term are asked; one that voted for us
    /// before reconnecting keeps its vote.
    #[test]
    fn asks_members_below_our_term() {
        let (_, membership, mut peers, campaign) = voting_after(1);
        assert_eq!(campaign.ask(&peers[SlotIndex(0)], &membership), Ask::Request(Term(2)));
        greet(&mut peers, 1, 2);
        assert_eq!(campaign.ask(&peers[SlotIndex(1)], &membership), Ask::Nothing, "already at our term");
        peers[SlotIndex(2)].vote = Some(Vote::from_response(granted(Term(2)), Term(2)).unwrap());
        assert_eq!(campaign.ask(&peers[SlotIndex(2)], &membership), Ask::Voted);
        let stranger = Peer::new("d".into(), 7);
        assert_eq!(campaign.ask(&stranger, &membership), Ask::Nothing, "not a member");
    }

    /// Rule: a refusal at our term (or above) means a rival holds it: fenced.
    /// One below our term is that safekeeper's fault.
    #[test]
    fn a_refused_vote_at_our_term_fences() {
        let (_, _, _, campaign) = voting_after(3);
        let refused = |term| VoteResponse { vote_given: false, ..granted(term) };
        let result = campaign.on_vote(SlotIndex(1), refused(Term(4)));
        assert!(matches!(result, Err(ProposerError::Fenced { term: Term(4) })));
        let result = campaign.on_vote(SlotIndex(1), refused(Term(3)));
        assert!(matches!(result, Err(ProposerError::Peer { safekeeper: SlotIndex(1), .. })));
        assert!(matches!(campaign.on_vote(SlotIndex(1), granted(Term(4))), Ok(VoteAnswer::Granted(_))));
    }

    /// Rule: the election is decided once a quorum of members voted, and
    /// not before.
    #[test]
    fn election_decided_once_a_quorum_voted() {
        let (config, membership, mut peers, mut campaign) = voting_after(1);
        let term = Term(2);
        let vote = |campaign: &Campaign| match campaign.on_vote(SlotIndex(0), granted(term)) {
            Ok(VoteAnswer::Granted(vote)) => vote,
            _ => panic!("a granted vote"),
        };
        peers[SlotIndex(0)].vote = Some(vote(&campaign));
        assert!(campaign.decide(view(&config, &membership, &peers, 0)).unwrap().is_none(), "one of three");
        peers[SlotIndex(2)].vote = Some(vote(&campaign));
        let election = campaign.decide(view(&config, &membership, &peers, 0)).unwrap().expect("a quorum voted");
        assert_eq!((election.term, election.term_start_lsn), (term, Lsn(2 * SEG)));

        campaign.on_elected(election, 500);
        assert_eq!(campaign.term(), Some(term));
        assert_eq!(campaign.voters_wait_ends_ms(HEARTBEAT_MS), Some(500 + HEARTBEAT_MS));
        assert!(matches!(campaign.on_vote(SlotIndex(1), granted(term)), Ok(VoteAnswer::AfterWin)));
    }
}
