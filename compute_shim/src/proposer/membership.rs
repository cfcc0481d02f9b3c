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
//!
//! [`Membership`] decides over a read-only view of the peers ([`View`]);
//! what the slots and the campaign must do about a decision it returns as
//! [`Effects`], which the proposer applies.

use std::collections::BTreeSet;

use serde::Serialize;

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::ids::{ClusterId, NodeId, Term};
use safekeeper_protocol::membership::{
    majority, Configuration, Member, MembershipGeneration, MAX_MEMBERS, MAX_MEMBER_ADDR_BYTES,
};
use safekeeper_protocol::protocol::SetMembership;

use super::commit;
use super::peer::{Link, Peer, Peers};

/// How long (in heartbeat intervals) a change waits, once a majority of
/// the new set stored it, for the removed members it still reaches to
/// store it too, before it completes (and stops talking to them) anyway.
const REMOVED_MEMBERS_WAIT_HEARTBEATS: u64 = 2;

/// Peer slots kept at most: the largest joint configuration (two full sets).
pub const MAX_PEER_SLOTS: usize = 2 * MAX_MEMBERS;

pub(super) struct Membership {
    /// The configuration quorums are counted in.
    pub current: Configuration,
    change: Option<Change>,
    /// The last change that completed, for status.
    last_completed: Option<CompletedChange>,
    /// Why the last request was given up, for status.
    last_error: Option<String>,
    /// How long a change writing the new set waits for the removed members
    /// (see [`REMOVED_MEMBERS_WAIT_HEARTBEATS`]).
    removed_members_wait_ms: u64,
}

/// What membership decides on: the proposer's state, read-only.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub peers: &'a Peers,
    pub now_ms: u64,
    /// Our term once elected with the log check passed, and not fenced:
    /// only then are configurations written (and changes moved on).
    pub writing_term: Option<Term>,
    pub commit_lsn: Lsn,
}

/// What the proposer must do after a membership decision, in this order
/// (slots are made only once the configuration that wants them is ours).
#[must_use]
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Effects {
    /// Addresses that need a peer slot.
    pub ensure_slots: Vec<String>,
    /// What is wanted changed: retire the slots no longer wanted.
    pub retire_unwanted: bool,
    /// A newer configuration was adopted: its members may hold a higher
    /// term than those greeted so far, so a term not yet picked waits for them.
    pub adopted: bool,
    /// The configuration changed: a quorum may now be complete (or not).
    pub reconsider_quorums: bool,
}

impl Effects {
    fn retire() -> Effects {
        Effects { retire_unwanted: true, ..Effects::default() }
    }

    fn reconsider_quorums() -> Effects {
        Effects { reconsider_quorums: true, ..Effects::default() }
    }
}

struct Change {
    /// The new set's addresses, in the operator's order.
    target: Vec<String>,
    phase: ChangePhase,
    started_at_ms: u64,
    phase_started_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ChangePhase {
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
    pub fn wants(&self, addr: &str) -> bool {
        self.current.includes_addr(addr)
            || self.change.as_ref().is_some_and(|change| match &change.phase {
                ChangePhase::Preparing => change.target.iter().any(|target| target == addr),
                ChangePhase::WritingNew { removed } => removed.iter().any(|removed| removed == addr),
                _ => false,
            })
    }

    pub fn from_command_line(addrs: &[String], heartbeat_interval_ms: u64) -> Membership {
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
            removed_members_wait_ms: REMOVED_MEMBERS_WAIT_HEARTBEATS * heartbeat_interval_ms,
        }
    }
    /// The decision on an operator's request (see
    /// `Proposer::request_membership`): a new change prepares at once; an
    /// abort is written as soon as we may write.
    pub fn request(&mut self, target: Vec<String>, view: View) -> Result<Effects, MembershipRequestError> {
        validate_target(&target)?;
        let wanted = addr_set(&target);
        let current = &self.current;
        if let Some(change) = &self.change {
            let same = addr_set(&change.target) == wanted;
            match &change.phase {
                _ if same => return Ok(Effects::default()),
                ChangePhase::Preparing => {}
                ChangePhase::WritingJoint | ChangePhase::CatchingUp { .. }
                    if member_addr_set(&current.members) == wanted =>
                {
                    // Aborted as soon as we are elected (maybe at once).
                    self.change.as_mut().expect("matched above").target = target;
                    return Ok(self.advance(view));
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
            return Ok(Effects::default()); // already the set
        }
        let spare_slots = MAX_PEER_SLOTS - view.peers.iter().filter(|peer| self.wants(&peer.addr)).count();
        let new_addrs = target.iter().filter(|addr| view.peers.find(addr).is_none()).count();
        if new_addrs > spare_slots {
            return Err(MembershipRequestError::Invalid(format!("more than {MAX_PEER_SLOTS} safekeepers at once")));
        }
        self.last_error = None;
        self.change = Some(Change {
            target: target.clone(),
            phase: ChangePhase::Preparing,
            started_at_ms: view.now_ms,
            phase_started_at_ms: view.now_ms,
        });
        Ok(Effects { ensure_slots: target, retire_unwanted: true, ..Effects::default() })
    }

    pub fn status(&self, peers: &Peers, now_ms: u64) -> MembershipStatus {
        let change = self.change.as_ref().map(|change| {
            let old = member_addr_set(&self.current.members);
            let new_members = change
                .target
                .iter()
                .filter(|addr| !old.contains(*addr) || self.current.joint_new.is_none())
                .filter_map(|addr| peers.find(addr).map(|sk| &peers[sk]))
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
                running_ms: now_ms.saturating_sub(change.started_at_ms),
                phase_running_ms: now_ms.saturating_sub(change.phase_started_at_ms),
                catch_up_target_lsn: match change.phase {
                    ChangePhase::CatchingUp { target_lsn } => Some(target_lsn),
                    _ => None,
                },
                new_members,
            }
        });
        MembershipStatus {
            generation: self.current.generation,
            written_in_term: self.current.written_in_term,
            members: self.current.members.clone(),
            joint_new: self.current.joint_new.clone(),
            change,
            last_completed: self.last_completed.clone(),
            last_error: self.last_error.clone(),
        }
    }

    /// Whether the members for which `counts` holds form a quorum of the
    /// current configuration (a majority of each of its sets).
    pub fn is_quorum(&self, peers: &Peers, counts: impl Fn(&Peer) -> bool) -> bool {
        self.current.is_quorum(|member| peers.find(&member.pg_addr).is_some_and(|sk| counts(&peers[sk])))
    }

    /// The highest LSN a quorum flushed at or past `counted_from`: the
    /// lowest over the sets of each set's quorum flush.
    pub fn quorum_flush_lsn(&self, peers: &Peers, counted_from: Lsn) -> Option<Lsn> {
        let mut lowest: Option<Lsn> = None;
        for set in self.current.sets() {
            let flushes =
                set.iter().filter_map(|member| peers.find(&member.pg_addr)).filter_map(|sk| peers[sk].flush_lsn);
            let set_lsn = commit::quorum_flush_lsn(flushes, counted_from, majority(set.len()))?;
            lowest = Some(lowest.map_or(set_lsn, |lsn| lsn.min(set_lsn)));
        }
        lowest
    }

    /// A greeting showed `theirs` (already stored as that peer's): adopt it
    /// if it is valid and takes precedence over ours. `Err`: not valid.
    pub fn on_greeted(&mut self, theirs: Configuration, now_ms: u64) -> Result<Effects, String> {
        if !theirs.is_set() {
            return Ok(Effects::default());
        }
        theirs.validate()?;
        if theirs.precedence() <= self.current.precedence() {
            return Ok(Effects::default());
        }
        Ok(self.adopt(theirs, now_ms))
    }

    /// The node id the current configuration names for `addr`, if any.
    pub fn named_node_id(&self, addr: &str) -> Option<NodeId> {
        self.current.sets().flatten().find(|member| member.pg_addr == addr).and_then(|member| member.node_id)
    }

    /// Count in `configuration` from now on. A change under way to the same
    /// set continues; any other is superseded. Safe at any time: a newer
    /// configuration was written by a proposer of our term or an earlier
    /// one, and if a quorum ever stored it, our election saw it.
    fn adopt(&mut self, configuration: Configuration, now_ms: u64) -> Effects {
        tracing::info!(generation = configuration.generation.0, "adopting a newer safekeeper configuration");
        let target = configuration.joint_new.as_deref().unwrap_or(&configuration.members);
        let target_addrs = member_addrs(target);
        let continues = self.change.as_ref().is_some_and(|change| addr_set(&change.target) == addr_set(&target_addrs));
        if !continues {
            if let Some(change) = &self.change {
                self.last_error = Some(format!(
                    "the change to {:?} was superseded by configuration generation {} found on a safekeeper",
                    change.target, configuration.generation
                ));
            }
        }
        let phase = if configuration.joint_new.is_some() {
            ChangePhase::WritingJoint
        } else {
            ChangePhase::WritingNew { removed: vec![] }
        };
        let started_at_ms = self.change.as_ref().filter(|_| continues).map_or(now_ms, |change| change.started_at_ms);
        self.change = Some(Change { target: target_addrs, phase, started_at_ms, phase_started_at_ms: now_ms });
        let ensure_slots = configuration.all_members().iter().map(|member| member.pg_addr.clone()).collect();
        self.current = configuration;
        Effects { ensure_slots, retire_unwanted: true, adopted: true, reconsider_quorums: true }
    }

    /// Whether the change under way asks for the old set of the joint
    /// configuration: an abort.
    fn aborting(&self) -> bool {
        self.current.joint_new.is_some()
            && self
                .change
                .as_ref()
                .is_some_and(|change| addr_set(&change.target) == member_addr_set(&self.current.members))
    }

    /// Back from a joint configuration to the old set: as safe as going on
    /// to the new one (every joint quorum holds a majority of the old set).
    fn abort_joint(&mut self, term: Term, now_ms: u64) -> Effects {
        let current = &self.current;
        let new = current.joint_new.as_deref().expect("aborting a joint configuration");
        let removed = addrs_not_in(new, &current.members);
        let target = member_addrs(&current.members);
        self.switch_to(current.members.clone(), removed, target, term, now_ms)
    }

    /// Our configuration becomes `members` alone (generation + 1).
    fn switch_to(
        &mut self,
        members: Vec<Member>,
        removed: Vec<String>,
        target: Vec<String>,
        term: Term,
        now_ms: u64,
    ) -> Effects {
        let generation = self.current.generation.next();
        self.current = Configuration { generation, written_in_term: term, members, joint_new: None };
        let started_at_ms = self.change.as_ref().map_or(now_ms, |change| change.started_at_ms);
        self.change = Some(Change {
            target,
            phase: ChangePhase::WritingNew { removed },
            started_at_ms,
            phase_started_at_ms: now_ms,
        });
        Effects::reconsider_quorums()
    }

    /// Move a change on as far as acknowledgements allow.
    pub fn advance(&mut self, view: View) -> Effects {
        let Some(change) = &self.change else { return Effects::default() };
        let Some(term) = view.writing_term else { return Effects::default() };
        let now_ms = view.now_ms;
        if self.aborting() {
            return self.abort_joint(term, now_ms);
        }
        match change.phase.clone() {
            ChangePhase::Preparing => {
                let Some(joint) = self.joint_configuration(&change.target, view.peers, term) else {
                    return Effects::default();
                };
                if let Err(reason) = joint.validate() {
                    self.last_error = Some(format!("cannot change to {:?}: {reason}", change.target));
                    self.change = None;
                    return Effects::retire();
                }
                self.current = joint;
                self.set_phase(ChangePhase::WritingJoint, now_ms);
                Effects::reconsider_quorums()
            }
            ChangePhase::WritingJoint => {
                if !self.stored_by_quorum(view.peers) {
                    return Effects::default();
                }
                self.set_phase(ChangePhase::CatchingUp { target_lsn: view.commit_lsn }, now_ms);
                self.advance(view)
            }
            ChangePhase::CatchingUp { target_lsn } => {
                let current = &self.current;
                let new = current.joint_new.clone().expect("catching up under a joint configuration");
                let caught_up = addrs_not_in(&new, &current.members).iter().all(|addr| {
                    let flush_lsn = view.peers.find(addr).and_then(|sk| view.peers[sk].flush_lsn);
                    flush_lsn.is_some_and(|flush| flush >= target_lsn)
                });
                if !caught_up {
                    return Effects::default();
                }
                let removed = addrs_not_in(&current.members, &new);
                let target = change.target.clone();
                self.switch_to(new, removed, target, term, now_ms)
            }
            ChangePhase::WritingNew { removed } => {
                let waited_long_enough =
                    now_ms.saturating_sub(change.phase_started_at_ms) >= self.removed_members_wait_ms;
                let removed_told = waited_long_enough || self.removed_members_told(&removed, view.peers);
                if !(self.stored_by_quorum(view.peers) && removed_told) {
                    return Effects::default();
                }
                let took_ms = now_ms.saturating_sub(change.started_at_ms);
                let generation = self.current.generation;
                tracing::info!(generation = generation.0, took_ms, "membership change complete");
                self.last_completed = Some(CompletedChange { generation, took_ms });
                self.change = None;
                Effects::retire()
            }
        }
    }

    /// When a change writing the new set stops waiting for the removed
    /// members to store it.
    pub fn wait_ends_ms(&self) -> Option<u64> {
        let change = self.change.as_ref()?;
        let ChangePhase::WritingNew { .. } = change.phase else { return None };
        Some(change.phase_started_at_ms + self.removed_members_wait_ms)
    }

    /// Whether every removed member we still reach holds our configuration
    /// (so it refuses older proposers). One we do not reach is not waited
    /// for, and one that does not answer only for a bounded time.
    fn removed_members_told(&self, removed: &[String], peers: &Peers) -> bool {
        let ours = Some(self.current.precedence());
        removed.iter().filter_map(|addr| peers.find(addr)).all(|sk| {
            let peer = &peers[sk];
            peer.link == Link::Disconnected || peer.stored_configuration == ours
        })
    }

    /// Whether a quorum of our configuration answered holding it.
    fn stored_by_quorum(&self, peers: &Peers) -> bool {
        let ours = self.current.precedence();
        self.is_quorum(peers, |peer| peer.stored_configuration == Some(ours))
    }

    fn set_phase(&mut self, phase: ChangePhase, now_ms: u64) {
        let change = self.change.as_mut().expect("a change is under way");
        tracing::info!(from = change.phase.name(), to = phase.name(), "membership change");
        change.phase = phase;
        change.phase_started_at_ms = now_ms;
    }

    /// The joint configuration for `target`, once every new member has
    /// greeted us (its node id goes into the configuration).
    fn joint_configuration(&self, target: &[String], peers: &Peers, term: Term) -> Option<Configuration> {
        let named = |addr: &String| {
            let node_id = peers.find(addr).and_then(|sk| peers[sk].node_id);
            Member { node_id, pg_addr: addr.clone() }
        };
        let new: Vec<Member> = target.iter().map(named).collect();
        if new.iter().any(|member| member.node_id.is_none()) {
            return None;
        }
        let current = &self.current;
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

    /// Our configuration, if `peer` should store it: a member (or a removed
    /// member still to be told) that accepted our ProposerElected (for
    /// `term`), does not hold ours yet, and has no SetMembership outstanding.
    pub fn to_send(&self, peer: &Peer, cluster: ClusterId, term: Term) -> Option<SetMembership> {
        let accepted_elected = matches!(peer.link, Link::Streaming { .. } | Link::TooFarBehind);
        if !self.current.is_set() || !accepted_elected || peer.membership_outstanding || !self.wants(&peer.addr) {
            return None;
        }
        if peer.stored_configuration == Some(self.current.precedence()) {
            return None;
        }
        Some(SetMembership { cluster, term, configuration: self.current.clone() })
    }

    /// Safekeeper `addr` refuses our cluster (another system id, say).
    /// `Some`: that is survivable, as it was only a member-to-be, and the
    /// change that named it is given up.
    pub fn on_link_refused(&mut self, addr: &str, reason: &str) -> Option<Effects> {
        let preparing = self.change.as_ref().filter(|change| change.phase == ChangePhase::Preparing);
        let change = preparing.filter(|_| !self.current.includes_addr(addr))?;
        self.last_error = Some(format!(
            "the change to {:?} was given up: safekeeper {addr} refuses this cluster: {reason}",
            change.target
        ));
        self.change = None;
        Some(Effects::retire())
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

#[cfg(test)]
mod tests {
    use super::*;

    const HEARTBEAT_MS: u64 = 100;
    const TERM: Term = Term(3);

    fn addrs(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    /// Peers for `names`, greeted (node ids 1, 2, ... in order) and streaming.
    fn greeted_peers(names: &[&str]) -> Peers {
        let mut peers = Peers::from_addrs(&addrs(names));
        for (sk, node) in peers.slots().zip(1..) {
            peers[sk].node_id = Some(NodeId(node));
            peers[sk].link = Link::Streaming { next_lsn: Lsn(0) };
        }
        peers
    }

    fn view(peers: &Peers, now_ms: u64) -> View<'_> {
        View { peers, now_ms, writing_term: Some(TERM), commit_lsn: Lsn(1000) }
    }

    /// `names` answered holding our configuration.
    fn store(membership: &Membership, peers: &mut Peers, names: &[&str]) {
        for name in names {
            let sk = peers.find(name).expect("a known peer");
            peers[sk].stored_configuration = Some(membership.current.precedence());
        }
    }

    fn phase(membership: &Membership) -> Option<ChangePhase> {
        membership.change.as_ref().map(|change| change.phase.clone())
    }

    /// A change from {a, b, c} to {a, b, d}, written up to the joint
    /// configuration stored by everyone.
    fn joint_written(peers: &Peers) -> Membership {
        let mut membership = Membership::from_command_line(&addrs(&["a", "b", "c"]), HEARTBEAT_MS);
        let effects = membership.request(addrs(&["a", "b", "d"]), view(peers, 0)).unwrap();
        assert_eq!(
            effects,
            Effects { ensure_slots: addrs(&["a", "b", "d"]), retire_unwanted: true, ..Effects::default() }
        );
        let effects = membership.advance(view(peers, 10));
        assert_eq!(effects, Effects::reconsider_quorums());
        assert_eq!(phase(&membership), Some(ChangePhase::WritingJoint));
        membership
    }

    #[test]
    fn a_change_goes_through_its_phases() {
        let mut peers = greeted_peers(&["a", "b", "c"]);
        let mut membership = Membership::from_command_line(&addrs(&["a", "b", "c"]), HEARTBEAT_MS);
        let _ = membership.request(addrs(&["a", "b", "d"]), view(&peers, 0)).unwrap();
        assert!(membership.wants("d"), "a member-to-be is connected to");
        let not_elected = View { writing_term: None, ..view(&peers, 5) };
        assert_eq!(membership.advance(not_elected), Effects::default());
        assert_eq!(membership.advance(view(&peers, 5)), Effects::default(), "d has not greeted yet");
        assert_eq!(phase(&membership), Some(ChangePhase::Preparing));

        peers = greeted_peers(&["a", "b", "c", "d"]);
        assert_eq!(membership.advance(view(&peers, 10)), Effects::reconsider_quorums());
        let joint = membership.current.clone();
        assert_eq!((joint.generation, joint.written_in_term), (MembershipGeneration(1), TERM));
        assert_eq!(joint.joint_new.as_ref().map(|new| new[2].node_id), Some(Some(NodeId(4))));

        store(&membership, &mut peers, &["a", "b", "c"]);
        assert_eq!(membership.advance(view(&peers, 20)), Effects::default(), "the new set's majority is missing");
        store(&membership, &mut peers, &["d"]);
        let _ = membership.advance(view(&peers, 30));
        assert_eq!(phase(&membership), Some(ChangePhase::CatchingUp { target_lsn: Lsn(1000) }));

        let d = peers.find("d").unwrap();
        peers[d].flush_lsn = Some(Lsn(999));
        assert_eq!(membership.advance(view(&peers, 40)), Effects::default(), "d is behind the target");
        peers[d].flush_lsn = Some(Lsn(1000));
        assert_eq!(membership.advance(view(&peers, 50)), Effects::reconsider_quorums());
        assert_eq!(phase(&membership), Some(ChangePhase::WritingNew { removed: addrs(&["c"]) }));
        assert_eq!(membership.current.generation, MembershipGeneration(2));
        assert_eq!(member_addrs(&membership.current.members), addrs(&["a", "b", "d"]));
        assert!(membership.wants("c"), "the removed member is still to be told");
        assert_eq!(membership.wait_ends_ms(), Some(50 + REMOVED_MEMBERS_WAIT_HEARTBEATS * HEARTBEAT_MS));

        store(&membership, &mut peers, &["a", "b", "d"]);
        assert_eq!(membership.advance(view(&peers, 60)), Effects::default(), "c still reachable, not told");
        let c = peers.find("c").unwrap();
        peers[c].link = Link::Disconnected;
        assert_eq!(membership.advance(view(&peers, 70)), Effects::retire());
        assert_eq!(phase(&membership), None);
        assert_eq!(
            membership.last_completed,
            Some(CompletedChange { generation: MembershipGeneration(2), took_ms: 70 })
        );
        assert!(!membership.wants("c"));
    }

    #[test]
    fn removed_members_are_waited_for_a_bounded_time() {
        let mut peers = greeted_peers(&["a", "b", "c", "d"]);
        let mut membership = joint_written(&peers);
        store(&membership, &mut peers, &["a", "b", "c", "d"]);
        let d = peers.find("d").unwrap();
        peers[d].flush_lsn = Some(Lsn(1000));
        let _ = membership.advance(view(&peers, 20));
        store(&membership, &mut peers, &["a", "b", "d"]);
        let ends_ms = membership.wait_ends_ms().unwrap();
        assert_eq!(membership.advance(view(&peers, ends_ms - 1)), Effects::default());
        assert_eq!(membership.advance(view(&peers, ends_ms)), Effects::retire());
    }

    #[test]
    fn requesting_the_old_set_aborts_a_joint_configuration() {
        let peers = greeted_peers(&["a", "b", "c", "d"]);
        let mut membership = joint_written(&peers);
        let other = membership.request(addrs(&["a", "c", "d"]), view(&peers, 20));
        assert!(matches!(other, Err(MembershipRequestError::ChangeInProgress { phase: "writing-joint", .. })));
        assert_eq!(membership.request(addrs(&["a", "b", "d"]), view(&peers, 20)), Ok(Effects::default()), "same");

        let effects = membership.request(addrs(&["c", "b", "a"]), view(&peers, 30)).unwrap();
        assert_eq!(effects, Effects::reconsider_quorums());
        assert_eq!(phase(&membership), Some(ChangePhase::WritingNew { removed: addrs(&["d"]) }));
        assert_eq!(membership.current.generation, MembershipGeneration(2));
        assert_eq!(member_addrs(&membership.current.members), addrs(&["a", "b", "c"]));
        assert_eq!(membership.current.joint_new, None);
    }

    #[test]
    fn a_newer_configuration_is_adopted_and_supersedes_a_change() {
        let peers = greeted_peers(&["a", "b", "c"]);
        let mut membership = Membership::from_command_line(&addrs(&["a", "b", "c"]), HEARTBEAT_MS);
        let _ = membership.request(addrs(&["a", "b", "e"]), view(&peers, 0)).unwrap();
        let member = |name: &str, node| Member { node_id: Some(NodeId(node)), pg_addr: name.to_string() };
        let theirs = Configuration {
            generation: MembershipGeneration(4),
            written_in_term: Term(2),
            members: vec![member("a", 1), member("b", 2), member("d", 4)],
            joint_new: None,
        };
        let effects = membership.on_greeted(theirs.clone(), 40).unwrap();
        assert_eq!(
            effects,
            Effects {
                ensure_slots: addrs(&["a", "b", "d"]),
                retire_unwanted: true,
                adopted: true,
                reconsider_quorums: true
            }
        );
        assert_eq!(membership.current, theirs);
        assert_eq!(phase(&membership), Some(ChangePhase::WritingNew { removed: vec![] }), "written on, to be sure");
        assert!(membership.last_error.as_deref().is_some_and(|error| error.contains("superseded")));
        assert_eq!(membership.named_node_id("d"), Some(NodeId(4)));

        let older = Configuration { generation: MembershipGeneration(3), ..theirs.clone() };
        assert_eq!(membership.on_greeted(older, 50), Ok(Effects::default()), "an older one is not adopted");
        let invalid = Configuration { generation: MembershipGeneration(5), members: vec![], ..theirs };
        assert!(membership.on_greeted(invalid, 60).is_err());
    }

    #[test]
    fn a_member_to_be_refusing_the_cluster_gives_the_change_up() {
        let peers = greeted_peers(&["a", "b", "c"]);
        let mut membership = Membership::from_command_line(&addrs(&["a", "b", "c"]), HEARTBEAT_MS);
        assert_eq!(membership.on_link_refused("a", "other cluster"), None, "a member refusing is fatal");
        let _ = membership.request(addrs(&["a", "b", "d"]), view(&peers, 0)).unwrap();
        assert_eq!(membership.on_link_refused("d", "other cluster"), Some(Effects::retire()));
        assert_eq!(phase(&membership), None);
        assert!(!membership.wants("d"));
    }
}
