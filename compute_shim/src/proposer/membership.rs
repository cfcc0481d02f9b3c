//! Which safekeepers count, and changing them (docs/proposer.md,
//! "Membership changes").
//!
//! The proposer counts quorums in its current [`Configuration`]: at first
//! the `--safekeepers` list (generation 0), then the highest configuration
//! any safekeeper shows it. An operator's request to change the set runs,
//! while this proposer is elected:
//!
//! 1. `Preparing`: connect to the new members and learn their node ids
//!    (they are streamed to like any safekeeper, but do not count yet);
//! 2. `WritingJoint`: the joint configuration (old and new set, the next
//!    generation) is ours at once, and is written until a majority of each set
//!    stored it. From then on no proposer can count a quorum of the old set
//!    alone: any majority of it names a safekeeper that refuses the older
//!    generation and teaches the newer one;
//! 3. `CatchingUp`: every new member flushes up to the commit LSN of that
//!    moment (from this proposer, or from its peers by peer recovery);
//! 4. `WritingNew`: the new set alone (generation + 1) is ours, written until
//!    a majority of it stored it; removed members are sent it too, so they
//!    refuse proposers of older generations.
//!
//! Every step is idempotent and resumable: a restarted proposer adopts the
//! joint configuration it finds and completes it.

use std::collections::BTreeSet;

use serde::Serialize;

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::ids::{NodeId, Term};
use safekeeper_protocol::membership::{
    majority, Configuration, Member, MembershipGeneration, MAX_MEMBERS, MAX_MEMBER_ADDR_BYTES,
};
use safekeeper_protocol::protocol::{MembershipResponse, ProposerMessage, SetMembership};

use super::commit;
use super::error::{PeerFault, ProposerError};
use super::peer::{Link, Peer, SlotIndex};
use super::{Campaign, LogCheckState, Proposer};

/// How long (in heartbeat intervals) a change waits, once a majority of
/// the new set stored it, for the removed members it still reaches to
/// store it too, before it completes (and stops talking to them) anyway.
const REMOVED_MEMBERS_WAIT_HEARTBEATS: u64 = 2;

/// Peer slots kept at most: the largest joint configuration (two full sets).
pub const MAX_PEER_SLOTS: usize = 2 * MAX_MEMBERS;

pub(super) struct Membership {
    /// The configuration quorums are counted in.
    pub current: Configuration,
    pub change: Option<Change>,
    /// The last change that completed, for status.
    pub last_completed: Option<CompletedChange>,
    /// Why the last request was given up, for status.
    pub last_error: Option<String>,
}

pub(super) struct Change {
    /// The new set's addresses, in the operator's order.
    pub target: Vec<String>,
    pub phase: ChangePhase,
    pub started_at_ms: u64,
    pub phase_started_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ChangePhase {
    Preparing,
    WritingJoint,
    CatchingUp {
        target_lsn: Lsn,
    },
    /// `removed`: members of the joint configuration the new one leaves out.
    WritingNew {
        removed: Vec<String>,
    },
}

impl ChangePhase {
    fn name(&self) -> &'static str {
        match self {
            ChangePhase::Preparing => "preparing",
            ChangePhase::WritingJoint => "writing-joint",
            ChangePhase::CatchingUp { .. } => "catching-up",
            ChangePhase::WritingNew { .. } => "writing-new",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompletedChange {
    pub generation: MembershipGeneration,
    pub took_ms: u64,
}

/// Why an operator's request was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipRequestError {
    #[error("invalid safekeeper set: {0}")]
    Invalid(String),
    #[error(
        "a change to {target:?} is in progress (phase {phase}); repeat that request to follow it, or request the \
         current set {current:?} to abort it"
    )]
    ChangeInProgress { target: Vec<String>, phase: &'static str, current: Vec<String> },
}

/// `GET /v1/membership` and the status's `membership`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MembershipStatus {
    pub generation: MembershipGeneration,
    pub written_in_term: Term,
    pub members: Vec<Member>,
    pub joint_new: Option<Vec<Member>>,
    pub change: Option<ChangeStatus>,
    pub last_completed: Option<CompletedChange>,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChangeStatus {
    pub target: Vec<String>,
    pub phase: &'static str,
    pub running_ms: u64,
    pub phase_running_ms: u64,
    /// In `catching-up`: the LSN every new member must flush.
    pub catch_up_target_lsn: Option<Lsn>,
    /// The target's members that are not in the old set.
    pub new_members: Vec<NewMemberStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NewMemberStatus {
    pub pg_addr: String,
    pub node_id: Option<NodeId>,
    pub state: &'static str,
    pub flush_lsn: Option<Lsn>,
}

impl Membership {
    /// Whether we keep a connection to `addr`: a member of the current
    /// configuration, a member-to-be, or a removed member still to be told.
    fn wants(&self, addr: &str) -> bool {
        self.current.includes_addr(addr)
            || self.change.as_ref().is_some_and(|change| match &change.phase {
                ChangePhase::Preparing => change.target.iter().any(|target| target == addr),
                ChangePhase::WritingNew { removed } => removed.iter().any(|removed| removed == addr),
                _ => false,
            })
    }

    pub fn from_command_line(addrs: &[String]) -> Membership {
        let members = addrs.iter().map(|addr| Member { node_id: None, pg_addr: addr.clone() }).collect();
        Membership {
            current: Configuration {
                generation: MembershipGeneration::NOT_SET,
                written_in_term: Term(0),
                members,
                joint_new: None,
            },
            change: None,
            last_completed: None,
            last_error: None,
        }
    }
}

fn addr_set(addrs: impl IntoIterator<Item = impl AsRef<str>>) -> BTreeSet<String> {
    addrs.into_iter().map(|addr| addr.as_ref().to_string()).collect()
}

fn member_addrs(members: &[Member]) -> Vec<String> {
    members.iter().map(|member| member.pg_addr.clone()).collect()
}

fn member_addr_set(members: &[Member]) -> BTreeSet<String> {
    addr_set(members.iter().map(|member| &member.pg_addr))
}

/// The addresses of `members` that `others` does not name.
fn addrs_not_in(members: &[Member], others: &[Member]) -> Vec<String> {
    let others = member_addr_set(others);
    members.iter().filter(|member| !others.contains(&member.pg_addr)).map(|member| member.pg_addr.clone()).collect()
}

fn validate_target(target: &[String]) -> Result<(), MembershipRequestError> {
    let invalid = |reason: String| Err(MembershipRequestError::Invalid(reason));
    if target.is_empty() || target.len() > MAX_MEMBERS {
        return invalid(format!("1..={MAX_MEMBERS} safekeepers, not {}", target.len()));
    }
    if addr_set(target).len() != target.len() {
        return invalid("a safekeeper is named twice".into());
    }
    if let Some(bad) = target.iter().find(|addr| addr.is_empty() || addr.len() > MAX_MEMBER_ADDR_BYTES) {
        return invalid(format!("bad address {bad:?}"));
    }
    Ok(())
}

impl Proposer {
    /// An operator asks for the safekeeper set `target` (pg addresses).
    /// Idempotent: the same request again follows the change under way or
    /// finds it done. While a change is only preparing, another target
    /// replaces it; once the joint configuration is written, only the
    /// old set (an abort) is taken.
    pub fn request_membership(&mut self, target: Vec<String>, now_ms: u64) -> Result<(), MembershipRequestError> {
        validate_target(&target)?;
        self.now_ms = now_ms;
        let wanted = addr_set(&target);
        let current = &self.membership.current;
        if let Some(change) = &self.membership.change {
            let same = addr_set(&change.target) == wanted;
            match &change.phase {
                _ if same => return Ok(()),
                ChangePhase::Preparing => {}
                ChangePhase::WritingJoint | ChangePhase::CatchingUp { .. }
                    if member_addr_set(&current.members) == wanted =>
                {
                    // Aborted as soon as we are elected (maybe at once).
                    self.membership.change.as_mut().expect("matched above").target = target;
                    self.advance_membership();
                    return Ok(());
                }
                phase => {
                    return Err(MembershipRequestError::ChangeInProgress {
                        target: change.target.clone(),
                        phase: phase.name(),
                        current: member_addrs(&current.members),
                    })
                }
            }
        } else if current.joint_new.is_none() && member_addr_set(&current.members) == wanted {
            return Ok(()); // already the set
        }
        let spare_slots = MAX_PEER_SLOTS - self.peers.iter().filter(|peer| self.wanted(peer)).count();
        let new_addrs = target.iter().filter(|addr| self.peer_index(addr).is_none()).count();
        if new_addrs > spare_slots {
            return Err(MembershipRequestError::Invalid(format!("more than {MAX_PEER_SLOTS} safekeepers at once")));
        }
        self.membership.last_error = None;
        self.membership.change = Some(Change {
            target: target.clone(),
            phase: ChangePhase::Preparing,
            started_at_ms: now_ms,
            phase_started_at_ms: now_ms,
        });
        for addr in &target {
            self.ensure_peer(addr);
        }
        self.retire_unwanted();
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
        let membership = &self.membership;
        let change = membership.change.as_ref().map(|change| {
            let old = member_addr_set(&membership.current.members);
            let new_members = change
                .target
                .iter()
                .filter(|addr| !old.contains(*addr) || membership.current.joint_new.is_none())
                .filter_map(|addr| self.peer_index(addr).map(|sk| &self.peers[sk]))
                .map(|peer| NewMemberStatus {
                    pg_addr: peer.addr.clone(),
                    node_id: peer.node_id,
                    state: peer.state().name(),
                    flush_lsn: peer.flush_lsn,
                })
                .collect();
            ChangeStatus {
                target: change.target.clone(),
                phase: change.phase.name(),
                running_ms: self.now_ms.saturating_sub(change.started_at_ms),
                phase_running_ms: self.now_ms.saturating_sub(change.phase_started_at_ms),
                catch_up_target_lsn: match change.phase {
                    ChangePhase::CatchingUp { target_lsn } => Some(target_lsn),
                    _ => None,
                },
                new_members,
            }
        });
        MembershipStatus {
            generation: membership.current.generation,
            written_in_term: membership.current.written_in_term,
            members: membership.current.members.clone(),
            joint_new: membership.current.joint_new.clone(),
            change,
            last_completed: membership.last_completed.clone(),
            last_error: membership.last_error.clone(),
        }
    }

    pub(super) fn peer_index(&self, addr: &str) -> Option<SlotIndex> {
        self.peers.find(addr)
    }

    /// Whether we keep a connection to `peer`: a member of the current
    /// configuration, a member-to-be, or a removed member still to be told.
    pub(super) fn wanted(&self, peer: &Peer) -> bool {
        self.membership.wants(&peer.addr)
    }

    /// Whether the members for which `counts` holds form a quorum of the
    /// current configuration (a majority of each of its sets).
    pub(super) fn is_quorum(&self, counts: impl Fn(&Peer) -> bool) -> bool {
        self.membership
            .current
            .is_quorum(|member| self.peer_index(&member.pg_addr).is_some_and(|sk| counts(&self.peers[sk])))
    }

    /// The highest LSN a quorum flushed at or past `counted_from`: the
    /// lowest over the sets of each set's quorum flush.
    pub(super) fn quorum_flush_lsn(&self, counted_from: Lsn) -> Option<Lsn> {
        let mut lowest: Option<Lsn> = None;
        for set in self.membership.current.sets() {
            let flushes = set
                .iter()
                .filter_map(|member| self.peer_index(&member.pg_addr))
                .filter_map(|sk| self.peers[sk].flush_lsn);
            let set_lsn = commit::quorum_flush_lsn(flushes, counted_from, majority(set.len()))?;
            lowest = Some(lowest.map_or(set_lsn, |lsn| lsn.min(set_lsn)));
        }
        lowest
    }

    /// Whether slot `sk` counts toward quorums. Only members are asked to
    /// vote: a vote elsewhere would count nowhere.
    pub(super) fn is_member(&self, sk: SlotIndex) -> bool {
        self.membership.current.includes_addr(&self.peers[sk].addr)
    }

    /// The slot for `addr`, made if new (reusing an unwanted one first).
    fn ensure_peer(&mut self, addr: &str) -> SlotIndex {
        let membership = &self.membership;
        self.peers.ensure(addr, |peer| membership.wants(&peer.addr), MAX_PEER_SLOTS)
    }

    /// Forget safekeepers we no longer talk to (see `Peers::retire_unwanted`).
    /// Call after every change of what is wanted.
    fn retire_unwanted(&mut self) {
        let membership = &self.membership;
        self.peers.retire_unwanted(|peer| membership.wants(&peer.addr));
    }

    /// A greeting showed `theirs`: check it, and adopt it if it takes
    /// precedence over ours. Returns whether the greeting peer is still
    /// wanted (a configuration may have just left it out).
    pub(super) fn on_greeted_configuration(
        &mut self,
        sk: SlotIndex,
        node_id: NodeId,
        theirs: safekeeper_protocol::membership::Configuration,
    ) -> Result<bool, ProposerError> {
        let peer_fault = |fault| ProposerError::Peer { safekeeper: sk, fault };
        self.peers[sk].stored_configuration = Some(theirs.precedence());
        let incarnation = self.peers[sk].incarnation;
        if theirs.is_set() {
            theirs.validate().map_err(|reason| peer_fault(PeerFault::BadConfiguration { reason }))?;
            if theirs.precedence() > self.membership.current.precedence() {
                self.adopt(theirs);
            }
        }
        // Adopting may have let it go, and even given its slot to another.
        if self.peers[sk].incarnation != incarnation || !self.wanted(&self.peers[sk]) {
            return Ok(false);
        }
        let named = self.membership.current.sets().flatten().find(|member| member.pg_addr == self.peers[sk].addr);
        if let Some(expected) = named.and_then(|member| member.node_id).filter(|&expected| expected != node_id) {
            return Err(peer_fault(PeerFault::WrongNode { expected, got: node_id }));
        }
        Ok(true)
    }

    /// Count in `configuration` from now on. A change under way to the same
    /// set continues; any other is superseded. Safe at any time: a newer
    /// configuration was written by a proposer of our term or an earlier
    /// one, and if a quorum ever stored it, our election saw it.
    fn adopt(&mut self, configuration: Configuration) {
        tracing::info!(generation = configuration.generation.0, "adopting a newer safekeeper configuration");
        let target = configuration.joint_new.as_deref().unwrap_or(&configuration.members);
        let target_addrs = member_addrs(target);
        let continues =
            self.membership.change.as_ref().is_some_and(|change| addr_set(&change.target) == addr_set(&target_addrs));
        if !continues {
            if let Some(change) = &self.membership.change {
                self.membership.last_error = Some(format!(
                    "the change to {:?} was superseded by configuration generation {} found on a safekeeper",
                    change.target, configuration.generation
                ));
            }
        }
        let now_ms = self.now_ms;
        let phase = if configuration.joint_new.is_some() {
            ChangePhase::WritingJoint
        } else {
            ChangePhase::WritingNew { removed: vec![] }
        };
        let started_at_ms =
            self.membership.change.as_ref().filter(|_| continues).map_or(now_ms, |change| change.started_at_ms);
        self.membership.change =
            Some(Change { target: target_addrs, phase, started_at_ms, phase_started_at_ms: now_ms });
        // Slots are made once the configuration is ours: a slot reused for a
        // new address must be one the new configuration does not want.
        let addrs: Vec<String> = configuration.all_members().iter().map(|member| member.pg_addr.clone()).collect();
        self.membership.current = configuration;
        for addr in &addrs {
            self.ensure_peer(addr);
        }
        self.retire_unwanted();
        if matches!(self.campaign, Campaign::Greeting) {
            // Its members may hold a higher term than those greeted so far:
            // give them the usual wait before picking ours.
            self.awaiting_adopted_members = true;
            self.quorum_greeted_at_ms = None;
        }
        self.reconsider_quorums();
    }

    /// Whether the change under way asks for the old set of the joint
    /// configuration: an abort.
    fn aborting(&self) -> bool {
        let current = &self.membership.current;
        current.joint_new.is_some()
            && self
                .membership
                .change
                .as_ref()
                .is_some_and(|change| addr_set(&change.target) == member_addr_set(&current.members))
    }

    /// Back from a joint configuration to the old set: as safe as going on
    /// to the new one (every joint quorum holds a majority of the old set).
    fn abort_joint(&mut self) {
        let current = &self.membership.current;
        let new = current.joint_new.as_deref().expect("aborting a joint configuration");
        let removed = addrs_not_in(new, &current.members);
        let target = member_addrs(&current.members);
        self.switch_to(current.members.clone(), removed, target);
    }

    /// Our configuration becomes `members` alone (generation + 1).
    fn switch_to(&mut self, members: Vec<Member>, removed: Vec<String>, target: Vec<String>) {
        let term = self.term().expect("changes run only when elected");
        let current = &self.membership.current;
        self.membership.current =
            Configuration { generation: current.generation.next(), written_in_term: term, members, joint_new: None };
        let started_at_ms = self.membership.change.as_ref().map_or(self.now_ms, |change| change.started_at_ms);
        self.membership.change = Some(Change {
            target,
            phase: ChangePhase::WritingNew { removed },
            started_at_ms,
            phase_started_at_ms: self.now_ms,
        });
        self.reconsider_quorums();
    }

    /// Move a change on as far as acknowledgements allow. Only an elected
    /// proposer whose log check passed writes configurations.
    pub(super) fn advance_membership(&mut self) {
        let elected = matches!(self.campaign, Campaign::Elected(_)) && matches!(self.log_check, LogCheckState::Passed);
        let Some(change) = &self.membership.change else { return };
        if !elected || self.fenced_by.is_some() {
            return;
        }
        let now_ms = self.now_ms;
        if self.aborting() {
            return self.abort_joint();
        }
        match change.phase.clone() {
            ChangePhase::Preparing => {
                let Some(joint) = self.joint_configuration(&change.target) else { return };
                if let Err(reason) = joint.validate() {
                    self.membership.last_error = Some(format!("cannot change to {:?}: {reason}", change.target));
                    self.membership.change = None;
                    self.retire_unwanted();
                    return;
                }
                self.membership.current = joint;
                self.set_phase(ChangePhase::WritingJoint);
                self.reconsider_quorums();
            }
            ChangePhase::WritingJoint => {
                if self.stored_by_quorum() {
                    self.set_phase(ChangePhase::CatchingUp { target_lsn: self.commit_lsn });
                    self.advance_membership();
                }
            }
            ChangePhase::CatchingUp { target_lsn } => {
                let current = &self.membership.current;
                let new = current.joint_new.clone().expect("catching up under a joint configuration");
                let caught_up = addrs_not_in(&new, &current.members).iter().all(|addr| {
                    self.peer_index(addr)
                        .and_then(|sk| self.peers[sk].flush_lsn)
                        .is_some_and(|flush| flush >= target_lsn)
                });
                if caught_up {
                    let removed = addrs_not_in(&current.members, &new);
                    let target = change.target.clone();
                    self.switch_to(new, removed, target);
                }
            }
            ChangePhase::WritingNew { removed } => {
                let telling_removed_ms = REMOVED_MEMBERS_WAIT_HEARTBEATS * self.config.heartbeat_interval_ms;
                let waited_long_enough = now_ms.saturating_sub(change.phase_started_at_ms) >= telling_removed_ms;
                if self.stored_by_quorum() && (waited_long_enough || self.removed_members_told(&removed)) {
                    let took_ms = now_ms.saturating_sub(change.started_at_ms);
                    let generation = self.membership.current.generation;
                    tracing::info!(generation = generation.0, took_ms, "membership change complete");
                    self.membership.last_completed = Some(CompletedChange { generation, took_ms });
                    self.membership.change = None;
                    self.retire_unwanted();
                }
            }
        }
    }

    /// When a change writing the new set stops waiting for the removed
    /// members to store it (see [`Proposer::poll_timeout`]).
    pub(super) fn membership_wait_ends_ms(&self) -> Option<u64> {
        let change = self.membership.change.as_ref()?;
        let ChangePhase::WritingNew { .. } = change.phase else { return None };
        Some(change.phase_started_at_ms + REMOVED_MEMBERS_WAIT_HEARTBEATS * self.config.heartbeat_interval_ms)
    }

    /// Whether every removed member we still reach holds our configuration
    /// (so it refuses older proposers). One we do not reach is not waited
    /// for, and one that does not answer only for a bounded time.
    fn removed_members_told(&self, removed: &[String]) -> bool {
        let ours = Some(self.membership.current.precedence());
        removed.iter().filter_map(|addr| self.peer_index(addr)).all(|sk| {
            let peer = &self.peers[sk];
            peer.link == Link::Disconnected || peer.stored_configuration == ours
        })
    }

    /// Whether a quorum of our configuration answered holding it.
    fn stored_by_quorum(&self) -> bool {
        let ours = self.membership.current.precedence();
        self.is_quorum(|peer| peer.stored_configuration == Some(ours))
    }

    fn set_phase(&mut self, phase: ChangePhase) {
        let change = self.membership.change.as_mut().expect("a change is under way");
        tracing::info!(from = change.phase.name(), to = phase.name(), "membership change");
        change.phase = phase;
        change.phase_started_at_ms = self.now_ms;
    }

    /// The joint configuration for `target`, once every new member has
    /// greeted us (its node id goes into the configuration).
    fn joint_configuration(&self, target: &[String]) -> Option<Configuration> {
        let term = self.term()?;
        let named = |addr: &String| {
            let node_id = self.peer_index(addr).and_then(|sk| self.peers[sk].node_id);
            Member { node_id, pg_addr: addr.clone() }
        };
        let new: Vec<Member> = target.iter().map(named).collect();
        if new.iter().any(|member| member.node_id.is_none()) {
            return None;
        }
        let current = &self.membership.current;
        // Old members keep the node id they were written with; the
        // command line's list learns them from greetings (a dead one's
        // stays unknown).
        let old = current
            .members
            .iter()
            .map(|member| Member { node_id: member.node_id.or(named(&member.pg_addr).node_id), ..member.clone() })
            .collect();
        Some(Configuration {
            generation: current.generation.next(),
            written_in_term: term,
            members: old,
            joint_new: Some(new),
        })
    }

    /// The configuration for `sk` if it should store ours: a member (or a
    /// removed member still to be told) that accepted our ProposerElected,
    /// does not hold ours yet, and has no SetMembership outstanding.
    pub(super) fn membership_to_send(&mut self, sk: SlotIndex) -> Option<ProposerMessage> {
        let Campaign::Elected(election) = &self.campaign else { return None };
        let current = &self.membership.current;
        let peer = &self.peers[sk];
        let accepted_elected = matches!(peer.link, Link::Streaming { .. } | Link::TooFarBehind);
        if !current.is_set() || !accepted_elected || peer.membership_outstanding || !self.wanted(peer) {
            return None;
        }
        if peer.stored_configuration == Some(current.precedence()) {
            return None;
        }
        let message =
            SetMembership { cluster: self.config.cluster, term: election.term, configuration: current.clone() };
        self.peers[sk].membership_outstanding = true;
        Some(ProposerMessage::SetMembership(message))
    }

    /// Safekeeper `sk` refuses our cluster (another system id, say).
    /// Returns whether that is survivable: it was only a member-to-be, and
    /// the change that named it is given up.
    pub fn on_link_refused(&mut self, sk: SlotIndex, reason: &str) -> bool {
        let addr = self.peers[sk].addr.clone();
        let preparing = self.membership.change.as_ref().filter(|change| change.phase == ChangePhase::Preparing);
        let Some(change) = preparing.filter(|_| !self.membership.current.includes_addr(&addr)) else { return false };
        self.membership.last_error = Some(format!(
            "the change to {:?} was given up: safekeeper {addr} refuses this cluster: {reason}",
            change.target
        ));
        self.membership.change = None;
        self.retire_unwanted();
        true
    }

    pub(super) fn on_membership_response(
        &mut self,
        sk: SlotIndex,
        response: MembershipResponse,
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
