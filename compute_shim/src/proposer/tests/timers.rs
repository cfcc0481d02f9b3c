//! The shim node's `poll_timeout` against real acceptors: the driver sleeps
//! until it and nothing else, so every wait of the proposer must show in
//! it, at its time and not later.

use safekeeper_protocol::ids::Term;
use safekeeper_protocol::protocol::ProposerMessage;

use super::harness::{Net, Postgres, HEARTBEAT_INTERVAL_MS};

/// Advance the clock to compute `c`'s next timeout (time passes for all).
fn advance_to_timeout(net: &mut Net, c: usize) -> u64 {
    let at_ms = net.computes[c].node.poll_timeout().expect("a timer is due");
    assert!(at_ms >= net.now_ms, "a timer due in the past is handled at once, not left pending");
    net.advance_time(at_ms - net.now_ms);
    at_ms
}

/// Rule: an idle safekeeper gets a heartbeat every interval. A quiet
/// elected node wakes exactly then, and sends one to each.
#[test]
fn a_quiet_elected_node_wakes_for_the_next_heartbeat() {
    let mut net = Net::new(3);
    let c = net.start_compute(Postgres::generate(100, 5));
    net.connect_all(c);
    net.run_until_quiet();
    assert_eq!(net.elected_term(c), Some(Term(1)));
    // Only the proposer's timers here (the stream's status refreshes are
    // node::tests'): Postgres's stream goes away.
    net.computes[c].node.handle_stream_stopped(net.now_ms);
    let quiet_since_ms = net.now_ms;
    assert_eq!(net.computes[c].node.poll_timeout(), Some(quiet_since_ms + HEARTBEAT_INTERVAL_MS));
    for _ in 0..3 {
        let woke_ms = advance_to_timeout(&mut net, c);
        net.pump(c);
        for sk in 0..3 {
            let sent = &net.computes[c].links[sk].to_acceptor;
            let heartbeat = sent.iter().any(|m| matches!(m, ProposerMessage::AppendRequest(a) if a.wal.is_empty()));
            assert!(heartbeat, "safekeeper {sk} got a heartbeat at {woke_ms} ms");
        }
        net.run_until_quiet();
        assert_eq!(net.computes[c].node.poll_timeout(), Some(woke_ms + HEARTBEAT_INTERVAL_MS), "the next one");
    }
}

/// Rule: once a quorum greeted, the term is picked when the rest greeted
/// too or a heartbeat interval later. The node wakes at that moment; a
/// millisecond before it, nothing happens.
#[test]
fn the_greeting_wait_ends_at_its_timeout() {
    let mut net = Net::new(3);
    let c = net.start_compute(Postgres::generate(100, 6));
    net.connect_all(c);
    net.computes[c].links[2].blocked_to_acceptor = true; // its greeting never arrives
    net.run_until_quiet();
    assert_eq!(net.elected_term(c), None, "waiting for the third greeting");
    let greeted_ms = net.now_ms;
    assert_eq!(net.computes[c].node.poll_timeout(), Some(greeted_ms + HEARTBEAT_INTERVAL_MS));

    net.advance_time(HEARTBEAT_INTERVAL_MS - 1);
    net.run_until_quiet();
    assert_eq!(net.elected_term(c), None, "still within the wait");
    advance_to_timeout(&mut net, c);
    net.run_until_quiet();
    assert_eq!(net.elected_term(c), Some(Term(1)), "elected by the two that greeted");
}

/// With nothing connected and no stream there is nothing to wake for: a
/// node does not tick for nothing.
#[test]
fn a_node_with_nothing_to_do_has_no_timeout() {
    let mut net = Net::new(3);
    let c = net.start_compute(Postgres::generate(10, 7));
    net.run_until_quiet();
    assert_eq!(net.computes[c].node.poll_timeout(), None);
}
