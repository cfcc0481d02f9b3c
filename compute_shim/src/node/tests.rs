//! The node's own rules, without acceptors: link identity and the
//! standby-status policy. (Against real acceptors the simulation runs
//! the node: crate::proposer::tests.)

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use safekeeper_protocol::ids::{ClusterId, NodeId, SystemId, TenantId, Term, TimelineId};
use safekeeper_protocol::membership::Configuration;
use safekeeper_protocol::protocol::{AcceptorMessage, GreetingResponse, VoteResponse};

use super::*;
use crate::proposer::PeerState;

const TIMELINE_START: Lsn = Lsn(0x100_0000);
const HEARTBEAT_INTERVAL_MS: u64 = 100;

fn config(safekeepers: usize) -> ProposerConfig {
    ProposerConfig {
        cluster: ClusterId { system_id: SystemId(7), tenant_id: TenantId([1; 16]), timeline_id: TimelineId([2; 16]) },
        pg_version: 150000,
        wal_segment_size: WalSegmentSize::new(1 << 20).expect("valid"),
        safekeepers: (0..safekeepers).map(|sk| format!("sk{sk}")).collect(),
        max_in_flight_bytes: 256 << 10,
        max_buffered_wal_bytes: 4 << 20,
        heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
        silence_timeout_ms: 20 * HEARTBEAT_INTERVAL_MS,
        proposer_id: [9; 16],
        timeline_start_lsn: TIMELINE_START,
        mode: crate::proposer::ProposerMode::Stream { postgres_flush_lsn: TIMELINE_START },
        pg_timelines: Some(postgres_wal::timeline_history::PgTimelineHistory::first()),
    }
}

fn opened(node: &mut ShimNode) -> Vec<(SlotIndex, LinkGeneration)> {
    std::iter::from_fn(|| node.poll_link_command())
        .map(|command| match command {
            LinkCommand::Open { slot, first_generation, .. } => (slot, first_generation),
            other => panic!("only opens expected, got {other:?}"),
        })
        .collect()
}

fn event(slot: SlotIndex, generation: LinkGeneration, kind: LinkEventKind) -> LinkEvent {
    LinkEvent { slot, generation, kind }
}

fn greeting_response(node_id: u64) -> LinkEventKind {
    LinkEventKind::Message(AcceptorMessage::GreetingResponse(GreetingResponse {
        node_id: NodeId(node_id),
        term: Term(1),
        configuration: Configuration::default(),
        pg_timelines: Default::default(),
    }))
}

fn state(node: &ShimNode, slot: SlotIndex) -> PeerState {
    let addr = node.peer_addr(slot).to_string();
    node.proposer().status().safekeepers.into_iter().find(|peer| peer.addr == addr).expect("wanted").state
}

/// A safekeeper reporting the highest term there is (or beyond: a broken
/// or hostile one) ends the run with a refusal, not a panic on overflow.
#[test]
fn a_term_at_the_limit_is_a_refusal_not_an_overflow() {
    let mut node = ShimNode::new(config(3), 0);
    let (slot, first) = opened(&mut node)[0];
    let connection = first.next();
    node.handle_link_event(1, event(slot, connection, LinkEventKind::Connected)).unwrap();
    let mut answer = greeting_response(1);
    if let LinkEventKind::Message(AcceptorMessage::GreetingResponse(response)) = &mut answer {
        response.term = Term(u64::MAX);
    }
    let error = node.handle_link_event(2, event(slot, connection, answer)).unwrap_err();
    assert!(matches!(error, NodeError::Proposer(ProposerError::TermsExhausted { .. })), "{error}");
}

#[test]
fn link_generations_carry_the_slot_incarnation() {
    let first = LinkGeneration::first(3);
    assert_eq!(first.incarnation(), 3);
    assert_eq!(first.next().next().incarnation(), 3, "connections of one task keep its incarnation");
    assert!(first.next() > first);
    assert_ne!(LinkGeneration::first(4), first.next(), "another task's connections never collide");
}

#[test]
fn a_new_node_opens_one_link_per_safekeeper_each_of_its_own_incarnation() {
    let mut node = ShimNode::new(config(3), 0);
    let links = opened(&mut node);
    assert_eq!(links.iter().map(|(slot, _)| slot.0).collect::<Vec<_>>(), [0, 1, 2]);
    let incarnations: std::collections::BTreeSet<u64> = links.iter().map(|(_, g)| g.incarnation()).collect();
    assert_eq!(incarnations.len(), 3);
    assert_eq!(node.poll_link_command(), None, "nothing changes without input");
}

/// Events of an earlier connection, or of a task of another incarnation,
/// must not reach the proposer: it would take an old connection's answer
/// for the new one's.
#[test]
fn stale_link_events_are_dropped() {
    let mut node = ShimNode::new(config(3), 0);
    let (slot, first) = opened(&mut node)[0];
    let (old, new) = (first.next(), first.next().next());
    assert_eq!(
        node.handle_link_event(1, event(slot, old, LinkEventKind::Connected)).unwrap(),
        LinkEventOutcome::Applied
    );
    assert_eq!(
        node.handle_link_event(2, event(slot, new, LinkEventKind::Connected)).unwrap(),
        LinkEventOutcome::Applied
    );
    assert_eq!(state(&node, slot), PeerState::Connecting);

    // The old connection's greeting answer and its end: both stale.
    let outcome = node.handle_link_event(3, event(slot, old, greeting_response(1))).unwrap();
    assert_eq!(outcome, LinkEventOutcome::Stale);
    let closed = LinkEventKind::Disconnected { reason: "old".into() };
    assert_eq!(node.handle_link_event(3, event(slot, old, closed)).unwrap(), LinkEventOutcome::Stale);
    assert_eq!(state(&node, slot), PeerState::Connecting, "the new connection still awaits its answer");

    // Another incarnation's task (a slot let go of and wanted again).
    let foreign = LinkGeneration::first(first.incarnation() + 100).next();
    assert_eq!(node.handle_link_event(3, event(slot, foreign, greeting_response(1))).unwrap(), LinkEventOutcome::Stale);

    // The current connection's answer counts.
    assert_eq!(node.handle_link_event(4, event(slot, new, greeting_response(1))).unwrap(), LinkEventOutcome::Applied);
    assert_eq!(state(&node, slot), PeerState::Greeted);
}

/// Messages go to the connection the proposer greeted, tagged so that a
/// link task drops them if that connection died meanwhile.
#[test]
fn transmits_are_tagged_with_the_current_connection() {
    let mut node = ShimNode::new(config(3), 0);
    let (slot, first) = opened(&mut node)[1];
    node.handle_link_event(1, event(slot, first.next(), LinkEventKind::Connected)).unwrap();
    let transmit = node.poll_transmit().expect("a greeting");
    assert_eq!((transmit.slot, transmit.generation), (slot, first.next()));
    assert!(matches!(transmit.message, ProposerMessage::Greeting(_)));
    assert!(node.poll_transmit().is_none());
}

/// A protocol fault drops that connection (the task reconnects) and what
/// it still says afterwards is stale.
#[test]
fn a_protocol_fault_drops_the_connection() {
    let mut node = ShimNode::new(config(3), 0);
    let (slot, first) = opened(&mut node)[0];
    let connection = first.next();
    node.handle_link_event(1, event(slot, connection, LinkEventKind::Connected)).unwrap();
    let vote = AcceptorMessage::VoteResponse(VoteResponse {
        term: Term(1),
        vote_given: true,
        flush_lsn: TIMELINE_START,
        term_history: Default::default(),
        timeline_start_lsn: TIMELINE_START,
        commit_lsn: TIMELINE_START,
        pg_timelines: Default::default(),
    });
    let outcome = node.handle_link_event(2, event(slot, connection, LinkEventKind::Message(vote))).unwrap();
    assert!(matches!(outcome, LinkEventOutcome::PeerFault(_)), "a vote nobody asked for: {outcome:?}");
    assert_eq!(node.poll_link_command(), Some(LinkCommand::DropConnection { slot, generation: connection }));
    assert_eq!(state(&node, slot), PeerState::Disconnected);
    let outcome = node.handle_link_event(3, event(slot, connection, greeting_response(1))).unwrap();
    assert_eq!(outcome, LinkEventOutcome::Stale);
    assert!(node.poll_transmit().is_none(), "nothing for a dropped connection");
}

#[test]
fn a_member_refusing_the_cluster_is_fatal() {
    let mut node = ShimNode::new(config(3), 0);
    let (slot, first) = opened(&mut node)[2];
    let refused = LinkEventKind::Refused { reason: "another system id".into() };
    let error = node.handle_link_event(1, event(slot, first, refused)).unwrap_err();
    assert!(matches!(error, NodeError::SafekeeperRefused { ref addr, .. } if addr == "sk2"), "{error}");
}

/// The 1.05 s stall: a new walsender ignored the status it got at once, and
/// the next one came a second later. A fresh stream is told every 50 ms for
/// its first second, then at least every second while nothing moves.
#[test]
fn a_fresh_stream_gets_status_every_50_ms_for_its_first_second() {
    let mut node = ShimNode::new(config(3), 0);
    opened(&mut node);
    assert_eq!(node.poll_standby_status(10), None, "no stream, nothing to tell");
    node.handle_stream_started(1_000);
    assert_eq!(node.poll_timeout(), Some(1_000), "a new stream is told at once");
    let status = node.poll_standby_status(1_000).expect("due at once");
    assert_eq!(status, StandbyStatus { write_lsn: Lsn::INVALID, flush_lsn: Lsn::INVALID, apply_lsn: Lsn::INVALID });
    let mut sent_at_ms = vec![1_000];
    let mut now_ms = 1_000;
    while now_ms < 3_500 {
        now_ms = node.poll_timeout().expect("a streaming node always has a refresh due");
        assert_eq!(node.poll_standby_status(now_ms - 1), None, "not before its time");
        node.poll_standby_status(now_ms).expect("due at its timeout");
        sent_at_ms.push(now_ms);
    }
    let gaps: Vec<u64> = sent_at_ms.windows(2).map(|pair| pair[1] - pair[0]).collect();
    let fresh = (FRESH_STREAM_WINDOW_MS / FRESH_STREAM_STATUS_INTERVAL_MS - 1) as usize;
    assert!(gaps[..fresh].iter().all(|&gap| gap == FRESH_STREAM_STATUS_INTERVAL_MS), "{gaps:?}");
    assert!(gaps[fresh..].iter().all(|&gap| gap == STATUS_REFRESH_INTERVAL_MS), "{gaps:?}");
    assert_eq!(sent_at_ms[fresh], 1_950, "the last fresh repeat is inside the first second");
}

#[test]
fn a_restarted_stream_is_fresh_again_and_a_stopped_one_is_not_told() {
    let mut node = ShimNode::new(config(3), 0);
    node.handle_stream_started(0);
    node.poll_standby_status(0).expect("new stream");
    node.handle_stream_stopped(10);
    assert_eq!(node.poll_timeout(), None, "no stream and no peers: nothing to wake for");
    assert_eq!(node.poll_standby_status(5_000), None);
    node.handle_stream_started(5_000);
    assert!(node.poll_standby_status(5_000).is_some(), "told at once");
    assert_eq!(node.poll_timeout(), Some(5_050), "and fresh again");
}
