//! The safekeeper set of a timeline: which safekeepers form its quorums.
//!
//! A [`Configuration`] is numbered by a generation. A change goes through a
//! joint configuration (old and new set; every quorum needs a majority of
//! each), so no step can make a minority of either set a quorum
//! (docs/protocol.md, "Membership"). Acceptors store the configuration in
//! their control file and refuse proposer messages of an older generation;
//! the proposer adopts the highest configuration it is shown.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, Term};

/// Most safekeepers one set may name.
pub const MAX_MEMBERS: usize = 15;
/// Longest member address (`host:port`).
pub const MAX_MEMBER_ADDR_BYTES: usize = 255;

/// Which configuration of a timeline's safekeeper set: each change writes
/// the next. 0 is "not set". (The shim's `LinkGeneration`, which connection
/// of a link an event is about, is another thing.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MembershipGeneration(pub u32);

impl MembershipGeneration {
    pub const NOT_SET: MembershipGeneration = MembershipGeneration(0);

    /// The generation a change from this one writes.
    pub fn next(self) -> MembershipGeneration {
        MembershipGeneration(self.0.checked_add(1).expect("membership generation overflow"))
    }
}

impl std::fmt::Display for MembershipGeneration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One safekeeper of a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node id; `None` only for a member of an old set that no proposer
    /// could reach while writing the configuration (a dead safekeeper being
    /// replaced).
    pub node_id: Option<NodeId>,
    /// Its Postgres-protocol address, as the operator named it.
    pub pg_addr: String,
}

/// A timeline's safekeeper set. Generation 0 is "not set": the proposer's
/// `--safekeepers` list is the set, and acceptors have stored nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    pub generation: MembershipGeneration,
    /// The term of the proposer that wrote it. Only the elected proposer of
    /// an acceptor's current term may write, so two configurations of one
    /// generation (a proposer fenced mid-change, then another) are ordered
    /// by it: see [`Configuration::precedence`].
    pub written_in_term: Term,
    pub members: Vec<Member>,
    /// While changing: the new set. Quorums need a majority of `members`
    /// and a majority of this.
    pub joint_new: Option<Vec<Member>>,
}

impl Configuration {
    pub fn is_set(&self) -> bool {
        self.generation > MembershipGeneration::NOT_SET
    }

    /// Which of two configurations wins: the higher generation, then the
    /// later writer.
    pub fn precedence(&self) -> (MembershipGeneration, Term) {
        (self.generation, self.written_in_term)
    }

    /// The sets a quorum needs a majority of: one, or two while joint.
    pub fn sets(&self) -> impl Iterator<Item = &[Member]> {
        std::iter::once(self.members.as_slice()).chain(self.joint_new.as_deref())
    }

    /// Every member of every set, each address once.
    pub fn all_members(&self) -> Vec<&Member> {
        let mut seen = BTreeSet::new();
        self.sets().flatten().filter(|member| seen.insert(member.pg_addr.as_str())).collect()
    }

    pub fn includes_addr(&self, pg_addr: &str) -> bool {
        self.sets().flatten().any(|member| member.pg_addr == pg_addr)
    }

    /// Whether the safekeeper `node_id` is named. `None` when that cannot be
    /// told: some member's node id is not known.
    pub fn includes_node(&self, node_id: NodeId) -> Option<bool> {
        let mut members = self.sets().flatten();
        if members.any(|member| member.node_id == Some(node_id)) {
            return Some(true);
        }
        let all_known = self.sets().flatten().all(|member| member.node_id.is_some());
        all_known.then_some(false)
    }

    /// Whether the members for which `counts` holds are a quorum: a
    /// majority of every set.
    pub fn is_quorum(&self, counts: impl Fn(&Member) -> bool) -> bool {
        self.sets().all(|set| set.iter().filter(|member| counts(member)).count() >= majority(set.len()))
    }

    /// A configuration received from a peer or a proposer must be well
    /// formed before it is stored or obeyed.
    pub fn validate(&self) -> Result<(), String> {
        if !self.is_set() {
            return Err("generation 0 is not a configuration".into());
        }
        for set in self.sets() {
            if set.is_empty() || set.len() > MAX_MEMBERS {
                return Err(format!("a set must have 1..={MAX_MEMBERS} members, not {}", set.len()));
            }
            let mut addrs = BTreeSet::new();
            let mut ids = BTreeSet::new();
            for member in set {
                if member.pg_addr.is_empty() || member.pg_addr.len() > MAX_MEMBER_ADDR_BYTES {
                    return Err(format!("member address of {} bytes", member.pg_addr.len()));
                }
                if !addrs.insert(&member.pg_addr) || member.node_id.is_some_and(|id| !ids.insert(id)) {
                    return Err(format!("{} is named twice", member.pg_addr));
                }
            }
        }
        // A safekeeper in both sets must be named the same way in both.
        if let Some(new) = &self.joint_new {
            for member in new {
                let same_addr = self.members.iter().find(|old| old.pg_addr == member.pg_addr);
                if same_addr.is_some_and(|old| old.node_id.is_some() && old.node_id != member.node_id) {
                    return Err(format!("{} has two node ids", member.pg_addr));
                }
            }
            if new.iter().any(|member| member.node_id.is_none()) {
                return Err("every new member's node id must be known".into());
            }
        }
        Ok(())
    }
}

/// More than half of `count`.
pub fn majority(count: usize) -> usize {
    count / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, addr: &str) -> Member {
        Member { node_id: Some(NodeId(id)), pg_addr: addr.to_string() }
    }

    fn joint() -> Configuration {
        Configuration {
            generation: MembershipGeneration(1),
            written_in_term: Term(3),
            members: vec![member(1, "a"), member(2, "b"), member(3, "c")],
            joint_new: Some(vec![member(1, "a"), member(2, "b"), member(4, "d")]),
        }
    }

    /// The control file and the HTTP status carry the generation as a plain
    /// JSON number, as before it had a type of its own.
    #[test]
    fn generation_is_a_json_number() {
        let json = serde_json::to_value(joint()).unwrap();
        assert_eq!(json["generation"], serde_json::json!(1));
        let back: Configuration = serde_json::from_value(json).unwrap();
        assert_eq!(back.generation, MembershipGeneration(1));
    }

    /// Rule: a joint quorum needs a majority of the old and of the new set.
    #[test]
    fn joint_quorums_need_both_majorities() {
        let config = joint();
        let with = |addrs: &[&str]| config.is_quorum(|member| addrs.contains(&member.pg_addr.as_str()));
        assert!(with(&["a", "b"]));
        assert!(!with(&["a", "c"]), "c counts only in the old set, d only in the new");
        assert!(!with(&["c", "d"]));
        assert!(with(&["a", "c", "d"]));
    }

    #[test]
    fn membership_by_node_id_is_unknown_while_an_id_is() {
        let mut config = joint();
        assert_eq!(config.includes_node(NodeId(3)), Some(true));
        assert_eq!(config.includes_node(NodeId(9)), Some(false));
        config.members[2].node_id = None;
        assert_eq!(config.includes_node(NodeId(9)), None);
        assert_eq!(config.includes_node(NodeId(4)), Some(true));
    }

    #[test]
    fn malformed_configurations_are_refused() {
        assert!(joint().validate().is_ok());
        let mut twice = joint();
        twice.members[1].pg_addr = "a".into();
        assert!(twice.validate().is_err());
        let mut two_ids = joint();
        two_ids.joint_new.as_mut().unwrap()[0].node_id = Some(NodeId(7));
        assert!(two_ids.validate().is_err());
        let mut unknown_new = joint();
        unknown_new.joint_new.as_mut().unwrap()[2].node_id = None;
        assert!(unknown_new.validate().is_err());
        let mut empty = joint();
        empty.joint_new = Some(vec![]);
        assert!(empty.validate().is_err());
        assert!(Configuration::default().validate().is_err());
    }
}
