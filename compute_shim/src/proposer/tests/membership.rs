//! Membership changes (docs/proposer.md, "Membership changes") against real
//! acceptors: every step's configuration on the acceptors, quorums counted
//! in it, stale proposers taught the newer one, resumption after a crash.

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::membership::Configuration;

use super::harness::{addr, Net, Postgres, HEARTBEAT_INTERVAL_MS};
use crate::proposer::{MembershipRequestError, PeerState};

fn addrs(sks: &[usize]) -> Vec<String> {
    sks.iter().map(|&sk| addr(sk)).collect()
}

fn stored(net: &Net, sk: usize) -> &Configuration {
    &net.acceptors[sk].acceptor().state().membership
}

fn member_addrs(configuration: &Configuration) -> Vec<String> {
    configuration.members.iter().map(|member| member.pg_addr.clone()).collect()
}

/// Postgres writes `records` more records.
fn write_more(net: &mut Net, c: usize, postgres: &Postgres, records: usize) -> Lsn {
    let now = net.computes[c].postgres.flush_lsn();
    let index = postgres.record_ends.iter().position(|&end| end > now).expect("enough WAL");
    let end = postgres.record_ends[(index + records).min(postgres.record_ends.len() - 1)];
    net.computes[c].postgres.set_flush_lsn(end);
    end
}

/// A cluster of `sk0..sk2` plus spare safekeepers up to `total`, elected
/// and committed up to a third of `postgres`.
fn elected(total: usize, postgres: &mut Postgres) -> (Net, usize) {
    let third = postgres.record_ends[postgres.record_ends.len() / 3];
    postgres.set_flush_lsn(third);
    let mut net = Net::new(total);
    let c = net.start_compute_with(postgres.clone(), &[0, 1, 2]);
    net.connect_all(c);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(c), third);
    (net, c)
}

/// Rules: replacing a dead member goes through the joint configuration
/// (stored by majorities of both sets), waits for the new member to catch
/// up, then the new set alone; commits go on throughout; the old member
/// is not counted, and a stale proposer naming it learns the new set.
#[test]
fn a_dead_safekeeper_is_replaced_through_a_joint_configuration() {
    let mut postgres = Postgres::generate(900, 31);
    let full = postgres.clone();
    let (mut net, c) = elected(4, &mut postgres);
    net.crash_safekeeper(2, 0);
    net.computes[c].node.handle_membership_request(net.now_ms, addrs(&[0, 1, 3])).unwrap();
    net.connect(c, 3);
    let mut phases = vec![];
    net.run_until(|net| {
        let status = net.computes[net.computes.len() - 1].node.proposer().membership_status();
        let phase = status.change.as_ref().map_or("done", |change| change.phase);
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
        phase == "done"
    });
    assert_eq!(phases, ["preparing", "writing-joint", "catching-up", "writing-new", "done"], "{phases:?}");
    let status = net.computes[c].node.proposer().membership_status();
    assert_eq!((status.generation.0, status.joint_new.clone()), (2, None));
    assert_eq!(status.last_completed.as_ref().map(|done| done.generation.0), Some(2));
    for sk in [0, 1, 3] {
        assert_eq!(stored(&net, sk).generation.0, 2, "sk{sk}");
        assert_eq!(member_addrs(stored(&net, sk)), addrs(&[0, 1, 3]));
    }
    assert_eq!(stored(&net, 2).generation.0, 0, "the dead member heard nothing");
    let joint_commit = net.commit_lsn(c);
    assert_eq!(net.acceptors[3].acceptor().flush_lsn(), joint_commit, "the new member caught up");

    // Commits go on in the new set; sk1 and sk3 alone are a quorum now.
    net.crash_safekeeper(0, 0);
    let end = write_more(&mut net, c, &full, 100);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(c), end);

    // The old sk2 comes back with its old state; a shim started with the
    // old list (sk0..sk2) learns generation 2 from sk1, connects to sk3,
    // and never counts sk2.
    net.restart_safekeeper(2);
    net.kill(c);
    let mut restarted = full.clone();
    restarted.set_flush_lsn(end);
    let stale = net.start_compute_with(restarted.clone(), &[0, 1, 2]);
    net.connect(stale, 1);
    net.connect(stale, 2);
    net.run_until_quiet();
    assert_eq!(net.computes[stale].node.proposer().membership_status().generation.0, 2);
    assert_eq!(net.slot(stale, 2), None, "the removed member is let go");
    assert_eq!(net.elected_term(stale), None, "sk1 alone is no quorum of {{sk0, sk1, sk3}}");
    net.connect(stale, 3);
    net.run_until_quiet();
    // sk0 (down) never greets: the term is picked a heartbeat interval later.
    net.advance_time(HEARTBEAT_INTERVAL_MS);
    net.run_until_quiet();
    assert!(net.elected_term(stale).is_some());
    let end = write_more(&mut net, stale, &full, 50);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(stale), end);
    assert!(net.acceptors[2].acceptor().flush_lsn() < end, "sk2 got nothing");
}

/// Rule: once the joint configuration is stored by a majority of the old
/// set, a proposer of the old generation cannot be elected by the old set
/// alone: the safekeeper that stored it refuses it and teaches it the
/// joint configuration, whose new half it must then win too.
#[test]
fn a_stale_proposer_learns_the_joint_configuration() {
    let mut postgres = Postgres::generate(600, 32);
    let (mut net, c) = elected(4, &mut postgres);
    // sk3 is down: the change stops at catching up, joint stored on 0..2.
    net.crash_safekeeper(3, 0);
    net.computes[c].node.handle_membership_request(net.now_ms, addrs(&[0, 1, 3])).unwrap();
    net.run_until_quiet();
    assert_eq!(net.computes[c].node.proposer().membership_status().change.unwrap().phase, "preparing");
    // It must greet the new member first; let it, then stop it again.
    net.restart_safekeeper(3);
    net.connect(c, 3);
    net.run_until(|net| net.computes[0].node.proposer().membership_status().generation.0 == 1);
    net.crash_safekeeper(3, 0);
    net.run_until_quiet();
    assert_eq!(stored(&net, 0).generation.0, 1);
    assert_eq!(stored(&net, 1).generation.0, 1);
    let joint_stored = (0..3).filter(|&sk| stored(&net, sk).generation.0 == 1).count();
    assert!(joint_stored >= 2);
    net.kill(c);

    // A shim with the old list reaches sk1 and sk2 only, and sk3 is down:
    // with the joint configuration it needs sk3 or sk0 as well.
    let stale = net.start_compute_with(postgres.clone(), &[0, 1, 2]);
    net.connect(stale, 1);
    net.connect(stale, 2);
    net.run_until_quiet();
    net.advance_time(1_000);
    net.run_until_quiet();
    let status = net.computes[stale].node.proposer().membership_status();
    assert_eq!(status.generation.0, 1, "adopted from a greeting");
    assert_eq!(status.change.as_ref().map(|change| change.target.clone()), Some(addrs(&[0, 1, 3])));
    assert_eq!(net.elected_term(stale), None, "the old set alone is no quorum of the joint configuration");
    // sk3 comes back: the restarted shim completes the change it found.
    net.restart_safekeeper(3);
    net.connect(stale, 3);
    net.run_until_quiet();
    net.advance_time(HEARTBEAT_INTERVAL_MS);
    net.run_until(|net| net.computes[1].node.proposer().membership_status().change.is_none());
    assert_eq!(net.computes[stale].node.proposer().membership_status().generation.0, 2);
    for sk in [0, 1, 3] {
        if !net.down[sk] && sk != 0 {
            assert_eq!(member_addrs(stored(&net, sk)), addrs(&[0, 1, 3]), "sk{sk}");
        }
    }
}

fn node(net: &mut Net) -> &mut crate::node::ShimNode {
    &mut net.computes[0].node
}

/// Rules: requests are idempotent; a different target is refused once the
/// joint configuration is written; asking for the old set aborts.
#[test]
fn requests_are_idempotent_and_a_joint_configuration_can_be_aborted() {
    let mut postgres = Postgres::generate(600, 33);
    let (mut net, c) = elected(5, &mut postgres);
    let now = net.now_ms;
    assert_eq!(
        node(&mut net).handle_membership_request(now, addrs(&[0, 0])),
        Err(MembershipRequestError::Invalid("a safekeeper is named twice".into()))
    );
    assert!(node(&mut net).handle_membership_request(now, addrs(&[2, 1, 0])).is_ok(), "already the set");
    assert!(node(&mut net).proposer().membership_status().change.is_none());

    // Grow to five, with sk4 unreachable: stuck catching up.
    node(&mut net).handle_membership_request(now, addrs(&[0, 1, 2, 3, 4])).unwrap();
    net.connect(c, 3);
    net.connect(c, 4);
    net.run_until(|net| net.computes[0].node.proposer().membership_status().generation.0 == 1);
    net.crash_safekeeper(4, 0);
    net.run_until_quiet();
    write_more(&mut net, c, &postgres.clone(), 20);
    net.run_until_quiet();
    let status = node(&mut net).proposer().membership_status();
    assert_eq!(status.change.as_ref().unwrap().phase, "catching-up", "{status:?}");
    assert!(node(&mut net).handle_membership_request(now, addrs(&[4, 3, 2, 1, 0])).is_ok(), "same set: follows");
    let conflict = node(&mut net).handle_membership_request(now, addrs(&[0, 1, 3]));
    assert!(matches!(conflict, Err(MembershipRequestError::ChangeInProgress { .. })), "{conflict:?}");

    // Abort: back to the old set, generation 2.
    node(&mut net).handle_membership_request(now, addrs(&[0, 1, 2])).unwrap();
    net.run_until(|net| net.computes[0].node.proposer().membership_status().change.is_none());
    let status = node(&mut net).proposer().membership_status();
    assert_eq!(status.generation.0, 2);
    assert_eq!(status.members.iter().map(|member| member.pg_addr.clone()).collect::<Vec<_>>(), addrs(&[0, 1, 2]));
    assert_eq!(member_addrs(stored(&net, 3)), addrs(&[0, 1, 2]), "the removed member was told");
    assert_eq!(net.slot(c, 3), None);
    assert_eq!(net.peer_state(c, 0), Some(PeerState::Streaming));
}
