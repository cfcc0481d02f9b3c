//! One test per proposer rule (docs/proposer.md), against real acceptors.

use postgres_wal::lsn::Lsn;
use postgres_wal::timeline_history::PgTimelineHistory;
use safekeeper_protocol::ids::{NodeId, Term};
use safekeeper_protocol::protocol::ProposerMessage;

use super::harness::{
    new_acceptor, segment_size, Net, Postgres, HEARTBEAT_INTERVAL_MS, SILENCE_TIMEOUT_MS, TIMELINE_START,
};
use crate::proposer::{PeerState, ProposerError, SlotIndex};

/// The first record end at or past `lsn`.
fn record_end_after(postgres: &Postgres, lsn: Lsn) -> Lsn {
    *postgres.record_ends.iter().find(|&&end| end >= lsn).expect("enough WAL")
}

/// Rules: election by a quorum (term = max seen + 1), streaming split at
/// segment ends and 128 KiB, commit = quorum-th highest flush.
#[test]
fn three_safekeepers_elect_stream_and_commit() {
    let postgres = Postgres::generate(900, 1);
    assert!(postgres.flush_lsn() > TIMELINE_START + (2 << 20), "WAL crosses segment boundaries");
    let mut net = Net::new(3);
    let c = net.start_compute(postgres.clone());
    net.connect_all(c);
    net.run_until_quiet();
    assert_eq!(net.elected_term(c), Some(Term(1)));
    assert_eq!(net.commit_lsn(c), postgres.flush_lsn());
    for sk in 0..3 {
        assert!(net.durable_wal(sk) == &postgres.wal[..], "safekeeper {sk} holds the primary's bytes");
    }
}

/// Rule: one safekeeper listed twice (two addresses reaching one node)
/// must never count twice toward a quorum: the shim stops and says so.
#[test]
fn the_same_safekeeper_twice_is_refused() {
    let mut net = Net::new(3);
    net.acceptors[2] = new_acceptor(1);
    let c = net.start_compute(Postgres::generate(50, 4));
    net.connect_all(c);
    net.run_until_quiet();
    let stopped = net.computes[c].stopped.clone();
    assert!(matches!(stopped, Some(ProposerError::DuplicateSafekeeper { node_id: NodeId(1), .. })), "{stopped:?}");
    assert_eq!(net.commit_lsn(c), Lsn::INVALID);
}

/// Rule: commit needs a quorum; one safekeeper alone never advances it, and
/// a reconnected one catches up from its flush and restores the quorum.
#[test]
fn commit_needs_a_majority() {
    let mut postgres = Postgres::generate(600, 2);
    let full = postgres.flush_lsn();
    let half = record_end_after(&postgres, TIMELINE_START + (full - TIMELINE_START) / 2);
    postgres.set_flush_lsn(half);
    let mut net = Net::new(3);
    let c = net.start_compute(postgres);
    net.connect_all(c);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(c), half);

    net.disconnect(c, 1);
    net.disconnect(c, 2);
    net.computes[c].postgres.set_flush_lsn(full);
    net.run_until_quiet();
    net.advance_time(1_000);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(c), half, "one of three safekeepers is not a quorum");

    net.connect(c, 1);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(c), full);
    assert_eq!(net.holders(&net.computes[c].postgres, full), 2);
}

/// Rules: a restarted proposer is elected in a higher term, takes the voter
/// with the highest (last_log_term, flush) as donor, starts its term there
/// and truncates no committed WAL; a safekeeper whose position the proposer
/// no longer buffers is reported too far behind, not skipped silently, and
/// peer recovery brings it back.
#[test]
fn restarted_proposer_continues_from_the_best_donor() {
    let mut postgres = Postgres::generate(1200, 3);
    let ends: Vec<Lsn> =
        [1, 2, 3].iter().map(|i| record_end_after(&postgres, TIMELINE_START + i * (600 << 10))).collect();
    let (a, b, c_end) = (ends[0], ends[1], ends[2]);
    postgres.set_flush_lsn(a);
    let mut net = Net::new(3);
    let first = net.start_compute(postgres.clone());
    net.connect_all(first);
    net.run_until_quiet();
    net.disconnect(first, 2);
    net.computes[first].postgres.set_flush_lsn(b);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(first), b);
    net.disconnect(first, 1);
    net.computes[first].postgres.set_flush_lsn(c_end);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(first), b, "only safekeeper 0 got past B");
    net.kill(first);

    // Safekeepers: 0 at C (uncommitted tail), 1 at B, 2 at A; elect with 1 and 2.
    postgres.set_flush_lsn(c_end);
    let second = net.start_compute(postgres.clone());
    net.connect(second, 1);
    net.connect(second, 2);
    net.run_until_quiet();
    let status = net.computes[second].node.proposer().status();
    assert_eq!((status.term, status.term_start_lsn), (Some(Term(2)), Some(b)), "donor: safekeeper 1 at B");
    assert_eq!(net.commit_lsn(second), c_end);
    assert_eq!(net.holders(&postgres, c_end), 3);

    // Safekeeper 0 rejoins below the buffer (trimmed past B): while
    // Postgres still holds that WAL, the stream restarts there for it.
    net.connect(second, 0);
    net.run_until_quiet();
    let status = net.computes[second].node.proposer().status();
    assert_eq!(status.safekeepers[0].state, PeerState::Streaming);
    assert_eq!(net.holders(&postgres, c_end), 3, "caught up from Postgres");
    assert_eq!(status.catch_up_wal_start_lsn, None, "the catch-up WAL joined the buffer");

    // It falls behind again and Postgres removes the WAL it would need: the
    // next compute reports it too far behind, not silently skipped, and
    // the quorum goes on.
    let end = *postgres.record_ends.last().expect("records");
    assert!(end.segment_start(segment_size()) > c_end, "generate more WAL");
    net.disconnect(second, 0);
    net.computes[second].postgres.set_flush_lsn(end);
    net.run_until_quiet();
    net.kill(second);
    let mut recycled = postgres.clone();
    recycled.set_flush_lsn(end);
    recycled.oldest_lsn = end.segment_start(segment_size());
    let third = net.start_compute(recycled);
    net.connect_all(third);
    net.run_until_quiet();
    let status = net.computes[third].node.proposer().status();
    assert_eq!(status.safekeepers[0].state, PeerState::TooFarBehind);
    assert_eq!(net.commit_lsn(third), end, "the quorum goes on");

    // Peer recovery: once safekeeper 1 knows the commit LSN (a heartbeat),
    // safekeeper 0 copies the committed WAL from it; after the handoff
    // (its proposer connection is refused once, the shim reconnects) the
    // proposer streams to it again.
    net.advance_time(1_000);
    net.run_until_quiet();
    assert!(net.copy_from_peer(0, 1), "safekeeper 0 is behind and nobody streams to it");
    assert_eq!(net.acceptors[0].acceptor().flush_lsn(), end, "copied up to safekeeper 1's commit");
    net.disconnect(third, 0);
    net.connect(third, 0);
    net.run_until_quiet();
    assert_eq!(net.computes[third].node.proposer().status().safekeepers[0].state, PeerState::Streaming);
    assert_eq!(net.holders(&postgres, end), 3, "all three hold Postgres's WAL again");
}

/// Rule: only flushes at or past the term start count (Raft's figure 8).
/// Term 2 writes [A,B) to safekeeper 0 only; term 3 writes a different
/// [A,C) to safekeeper 2 only; term 4 (donor 0, term start B) gets
/// safekeeper 1 to D, A < D < B. Then [A,D) sits on a majority (0 and 1)
/// in term 2's bytes, yet term 5 (voters 1 and 2) picks donor 2 (last term
/// 3) and truncates 1 to A. The term-4 proposer must not have committed D.
#[test]
fn old_term_wal_on_a_majority_is_not_committed_by_counting() {
    let outcome = figure_8(false);
    assert_eq!(outcome.term_4_commit, outcome.a, "[A,D) of term 2 on a majority is not committed by counting");
    outcome.violation.unwrap();
}

/// The checks bite: with the commit rule's term-start floor removed, the
/// same run commits D in term 4, and the simulation's invariant (an
/// acknowledged commit stays on a majority with its bytes) reports the
/// loss once term 5 truncates it.
#[test]
fn a_commit_rule_without_the_term_start_floor_is_caught() {
    let outcome = figure_8(true);
    assert!(outcome.term_4_commit > outcome.a, "the broken rule commits [A,D) by counting");
    let violation = outcome.violation.expect_err("the invariant must report the lost commit");
    assert!(violation.contains("no longer on a majority"), "{violation}");
}

/// Term 1 commits [.., A) on all three safekeepers; term 2 (voters 0 and 1)
/// writes `x`'s [A,B) to safekeeper 0 only. Both proposers are gone after.
fn leave_uncommitted_tail(
    net: &mut Net,
    x: &mut Postgres,
    a: Lsn,
    b: Lsn,
    start: &mut impl FnMut(&mut Net, &Postgres) -> usize,
) {
    x.set_flush_lsn(a);
    let t1 = start(net, x);
    net.connect_all(t1);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(t1), a);
    net.kill(t1);

    x.set_flush_lsn(b);
    let t2 = start(net, x);
    net.connect(t2, 0);
    net.connect(t2, 1);
    net.run_until(|net| net.computes[t2].node.proposer().status().safekeepers[1].state == PeerState::Streaming);
    net.disconnect(t2, 1);
    net.run_until_quiet();
    assert_eq!(net.acceptors[0].acceptor().flush_lsn(), b);
    net.kill(t2);
}

struct Figure8 {
    a: Lsn,
    term_4_commit: Lsn,
    /// The invariant checked after term 5 ran, for term 4's commit.
    violation: Result<(), String>,
}

fn figure_8(break_commit_rule: bool) -> Figure8 {
    let (a, mut primaries) = Postgres::branches(150, 500, &[11, 12]);
    let (mut x, mut y) = (primaries.remove(0), primaries.remove(0));
    let b = record_end_after(&x, a + (600 << 10));
    let c_end = record_end_after(&y, a + (300 << 10));
    let mut net = Net::new(3);
    let elected = |c: usize| move |net: &Net| net.elected_term(c).is_some();
    let mut start = |net: &mut Net, postgres: &Postgres| {
        let c = net.start_compute(postgres.clone());
        if break_commit_rule {
            net.computes[c].node.break_commit_rule_for_tests();
        }
        c
    };

    leave_uncommitted_tail(&mut net, &mut x, a, b, &mut start);

    // Term 3: voters 1 and 2; ProposerElected reaches only 2, which gets Y's [A,C).
    y.set_flush_lsn(c_end);
    let t3 = start(&mut net, &y);
    net.connect(t3, 1);
    net.connect(t3, 2);
    net.run_until(elected(t3));
    net.disconnect(t3, 1);
    net.run_until_quiet();
    assert_eq!(net.acceptors[2].acceptor().flush_lsn(), c_end);
    net.kill(t3);

    // Term 4: voters 0 (last term 2, B) and 1 (last term 2, A): term start B.
    let t4 = start(&mut net, &x);
    net.connect(t4, 0);
    net.connect(t4, 1);
    // No WAL is sent before the log check (x's WAL below B is the log on
    // safekeeper 0) has passed.
    net.run_until(|net| net.computes[t4].node.proposer().status().postgres_wal_checked);
    assert_eq!(net.computes[t4].node.proposer().status().term_start_lsn, Some(b));
    net.pump(t4);
    assert!(net.deliver_to_acceptor(t4, 1), "the first append to safekeeper 1");
    net.computes[t4].links[1].to_acceptor.clear();
    net.sync(1);
    while net.deliver_to_proposer(t4, 1) {}
    let d = net.acceptors[1].acceptor().flush_lsn();
    assert!(a < d && d < b, "safekeeper 1 got part of [A,B): {d}");
    assert_eq!(net.holders(&x, d), 2, "[A,D) of term 2 is on a majority");
    let term_4_commit = net.commit_lsn(t4);
    net.kill(t4);

    // Term 5: voters 1 (last term 2, D) and 2 (last term 3, C): donor 2.
    let t5 = start(&mut net, &y);
    net.connect(t5, 1);
    net.connect(t5, 2);
    net.run_until_quiet();
    assert_eq!(net.computes[t5].node.proposer().status().term_start_lsn, Some(c_end));
    assert_eq!(net.commit_lsn(t5), c_end);
    assert_eq!(net.holders(&y, c_end), 2);
    let violation = net.check_commit_on_majority(&x, term_4_commit);
    Figure8 { a, term_4_commit, violation }
}

/// Rule: a safekeeper answering with a higher term fences the proposer,
/// which stops with an error naming that term.
#[test]
fn a_newer_proposer_fences_the_old_one() {
    let mut postgres = Postgres::generate(300, 5);
    let full = postgres.flush_lsn();
    let half = record_end_after(&postgres, TIMELINE_START + (full - TIMELINE_START) / 2);
    postgres.set_flush_lsn(half);
    let mut net = Net::new(3);
    let old = net.start_compute(postgres.clone());
    net.connect_all(old);
    net.run_until_quiet();
    assert_eq!(net.elected_term(old), Some(Term(1)));

    postgres.set_flush_lsn(full);
    let new = net.start_compute(postgres);
    net.connect_all(new);
    net.run_until_quiet();
    assert_eq!(net.elected_term(new), Some(Term(2)));
    assert!(net.is_running(old), "the old proposer has not heard of term 2 yet");

    net.advance_time(1_000); // its next exchange: a heartbeat
    net.run_until_quiet();
    let error = net.computes[old].stopped.clone().expect("fenced");
    assert_eq!(error, ProposerError::Fenced { term: Term(2) });
    assert!(error.is_fatal() && error.to_string().contains("term 2"), "{error}");
    assert_eq!(net.commit_lsn(new), full);
}

/// Rule: before sending any WAL, a new term checks that Postgres's WAL just
/// below the term start is the log (docs/proposer.md, "Checking Postgres
/// against the log"). Two primaries restored from one backup (same system
/// id, same Postgres timeline) diverge at A. X's proposer leaves [A,B) on
/// safekeeper 0 only. Y's proposer is elected by 0 and 2: donor 0, term
/// start B. Without the check it would catch 2 up with Y's bytes below B
/// and commit B counting 0 (X's bytes) and 2 (Y's bytes). With it, Y is
/// refused before anything is sent, whether the fork lies below the
/// checked range or inside it.
#[test]
fn a_diverged_primary_is_refused_before_sending_any_wal() {
    for tail_kib in [400, 20] {
        let (a, mut primaries) = Postgres::branches(150, 500, &[21, 22]);
        let (mut x, y) = (primaries.remove(0), primaries.remove(0));
        let b = record_end_after(&x, a + (tail_kib << 10));
        let mut net = Net::new(3);
        leave_uncommitted_tail(&mut net, &mut x, a, b, &mut |net: &mut Net, x: &Postgres| net.start_compute(x.clone()));

        let t3 = net.start_compute(y.clone());
        net.connect(t3, 0);
        net.connect(t3, 2);
        net.run_until_quiet();
        let error = net.computes[t3].stopped.clone().expect("Y's proposer must refuse to lead");
        assert!(
            matches!(error, ProposerError::PostgresDiverged { safekeeper: SlotIndex(0), .. }),
            "tail {tail_kib} KiB: {error}"
        );
        assert!(error.is_fatal() && error.to_string().contains("not the primary that wrote the log"), "{error}");
        assert_eq!(net.acceptors[2].acceptor().flush_lsn(), a, "none of Y's WAL reached safekeeper 2");
        assert_eq!(net.acceptors[0].acceptor().flush_lsn(), b, "safekeeper 0 keeps X's tail");
        assert_eq!(net.commit_lsn(t3), a);
    }
}

/// A long silence: one member's connection stays up but carries nothing
/// either way for many heartbeat intervals while Postgres writes more WAL
/// than the buffer holds. The quorum sets the pace: once the buffer is full
/// the silent member, behind the commit LSN, is released from it (and its
/// connection dropped after the silence timeout), so the majority commits
/// everything during the silence; once it ends the silent member catches
/// up and everything is on all three.
#[test]
fn a_silent_member_does_not_hold_up_the_majority() {
    const SILENT_HEARTBEATS: usize = 50;
    let (mut net, c, postgres, full) = streaming_before_a_big_write(11);
    let before = net.commit_lsn(c);
    assert!(before > TIMELINE_START);

    shut_link(&mut net, c, 2, true);
    net.computes[c].postgres.set_flush_lsn(full);
    for _ in 0..SILENT_HEARTBEATS {
        net.advance_time(super::harness::HEARTBEAT_INTERVAL_MS);
        net.run_until_quiet();
    }
    let during = net.commit_lsn(c);
    eprintln!("commit during the silence: {before} -> {during} of {full}");
    assert_eq!(during, full, "the majority commits everything while one member is silent");

    shut_link(&mut net, c, 2, false);
    net.run_until_quiet();
    net.advance_time(super::harness::HEARTBEAT_INTERVAL_MS);
    net.run_until_quiet();
    assert!(catch_up_from_a_peer(&mut net, 2), "the released member is caught up from a peer");
    assert_eq!(net.commit_lsn(c), full, "everything commits once the silence ends");
    assert_eq!(net.holders(&postgres, full), 3);
}

/// Rule (docs/proposer.md, "The quorum sets the pace"): a slow member
/// (its link passes messages only in every fifth heartbeat interval, both
/// ways, for a long time) while Postgres writes many buffers of WAL: the
/// majority commits everything at its own pace, the slow member is never
/// the one the commit waits for, and it ends up with the whole log.
#[test]
fn a_slow_member_does_not_set_the_pace() {
    const HEARTBEATS: usize = 60;
    let (mut net, c, postgres, full) = streaming_before_a_big_write(12);
    net.computes[c].postgres.set_flush_lsn(full);
    let mut fast_commit_at = None;
    for heartbeat in 0..HEARTBEATS {
        shut_link(&mut net, c, 2, heartbeat % 5 != 4);
        net.advance_time(super::harness::HEARTBEAT_INTERVAL_MS);
        net.run_until_quiet();
        if fast_commit_at.is_none() && net.commit_lsn(c) == full {
            fast_commit_at = Some(heartbeat);
        }
    }
    let committed_at = fast_commit_at.unwrap_or_else(|| panic!("not all committed: {}", net.describe_acceptors()));
    eprintln!("everything committed after {committed_at} heartbeat intervals with one slow member");
    assert_eq!(committed_at, 0, "all committed in the first interval, while the slow member's link was shut");
    shut_link(&mut net, c, 2, false);
    net.run_until_quiet();
    catch_up_from_a_peer(&mut net, 2);
    assert_eq!(net.holders(&postgres, full), 3, "the slow member ends up with the whole log");
}

/// A member stopped (SIGSTOP) for ten silence timeouts, again and again,
/// waking for a few heartbeat intervals in between, while Postgres writes
/// a burst larger than the buffer at the start of each silence and a
/// trickle through it. Each silence the shim drops the stopped member's
/// connection (after the silence timeout) and reconnects to its kernel,
/// which accepts and says nothing; the majority commits everything
/// Postgres wrote at every heartbeat interval of every silence, and the
/// member catches up each time it wakes.
#[test]
fn a_member_silent_again_and_again_for_many_silence_timeouts_does_not_hold_up_the_majority() {
    const SILENCES: usize = 3;
    const SILENCE_HEARTBEATS: u64 = 10 * SILENCE_TIMEOUT_MS / HEARTBEAT_INTERVAL_MS;
    const AWAKE_HEARTBEATS: usize = 5;
    const BURST_BYTES: u64 = 300 << 10;
    const TRICKLE_BYTES: u64 = 512;
    let (mut net, c, postgres, full) = streaming_before_a_big_write(13);
    assert!(BURST_BYTES > net.max_buffered_wal_bytes, "each burst overflows the buffer");
    let writes = |net: &mut Net, bytes: u64| {
        let flush = net.computes[c].postgres.flush_lsn();
        let more = record_end_after(&postgres, (flush + bytes).min(full));
        net.computes[c].postgres.set_flush_lsn(more);
    };
    for silence in 0..SILENCES {
        let mut dropped = 0;
        let flush_before = net.computes[c].postgres.flush_lsn();
        writes(&mut net, BURST_BYTES);
        for _ in 0..SILENCE_HEARTBEATS {
            if !net.computes[c].links[2].up {
                dropped += 1;
                net.connect(c, 2);
            }
            shut_link(&mut net, c, 2, true);
            net.run_until_quiet();
            let (commit, flush) = (net.commit_lsn(c), net.computes[c].postgres.flush_lsn());
            assert_eq!(commit, flush, "silence {silence}: the majority commits all Postgres wrote");
            writes(&mut net, TRICKLE_BYTES);
            net.advance_time(HEARTBEAT_INTERVAL_MS);
        }
        assert!(dropped >= 5, "silence {silence}: the stopped member's connection dropped {dropped} times");
        let written = net.computes[c].postgres.flush_lsn() - flush_before;
        assert!(written > net.max_buffered_wal_bytes, "silence {silence}: Postgres wrote only {written} bytes");
        shut_link(&mut net, c, 2, false);
        for _ in 0..AWAKE_HEARTBEATS {
            net.run_until_quiet();
            if net.peer_state(c, 2) == Some(PeerState::TooFarBehind) {
                catch_up_from_a_peer(&mut net, 2);
            }
            net.advance_time(HEARTBEAT_INTERVAL_MS);
        }
        net.run_until_quiet();
        let commit = net.commit_lsn(c);
        assert_eq!(net.acceptors[2].acceptor().flush_lsn(), commit, "silence {silence}: it caught up once awake");
    }
    assert_eq!(net.holders(&postgres, net.commit_lsn(c)), 3);
}

/// Three safekeepers, a 256 KiB buffer, and a primary elected that has
/// streamed its first 64 KiB: the net, the compute, its whole WAL (many
/// buffers' worth, not written yet) and that WAL's end.
fn streaming_before_a_big_write(seed: u64) -> (Net, usize, Postgres, Lsn) {
    let postgres = Postgres::generate(900, seed);
    let full = postgres.flush_lsn();
    let mut net = Net::new(3);
    net.max_buffered_wal_bytes = 256 << 10;
    assert!(full - TIMELINE_START > 4 * net.max_buffered_wal_bytes, "the WAL exceeds the buffer many times");
    let mut start = postgres.clone();
    start.set_flush_lsn(record_end_after(&postgres, TIMELINE_START + (64 << 10)));
    let c = net.start_compute(start);
    net.connect_all(c);
    net.run_until_quiet();
    (net, c, postgres, full)
}

/// Shut (or open) the link of compute `c` to safekeeper `sk`, both ways.
fn shut_link(net: &mut Net, c: usize, sk: usize, shut: bool) {
    let link = &mut net.computes[c].links[sk];
    (link.blocked_to_acceptor, link.blocked_to_proposer) = (shut, shut);
}

/// A released safekeeper gets heartbeats only: its peer recovery copies
/// from safekeeper 0, then a heartbeat interval passes. Whether it copied.
fn catch_up_from_a_peer(net: &mut Net, sk: usize) -> bool {
    let copied = net.copy_from_peer(sk, 0);
    net.advance_time(super::harness::HEARTBEAT_INTERVAL_MS);
    net.run_until_quiet();
    copied
}

/// Heartbeat intervals a sync in the simulation gets (its `--timeout-s`).
const SYNC_HEARTBEATS: usize = 20;

/// Rules (docs/failover.md): after the primary died, a sync proposer
/// with no Postgres wins a higher term, makes a quorum hold the donor's log
/// and commits it: at or above everything the dead proposer acknowledged,
/// held by a majority with the primary's bytes, known to every connected
/// safekeeper, and the same when the sync is repeated. Killed after every
/// number of rounds up to a full stream, with one safekeeper left behind
/// halfway.
#[test]
fn a_sync_commits_the_donors_log_above_every_acknowledged_commit() {
    let postgres = Postgres::generate(400, 7);
    let mut rounds_synced = 0;
    for rounds_before_death in 1..40 {
        let (mut net, acknowledged, old_term) = primary_streams_and_dies(&postgres, rounds_before_death);
        let mut synced_terms = vec![];
        let mut synced_lsns = vec![];
        while synced_lsns.len() < 2 {
            let s = run_sync(&mut net, &postgres);
            if net.computes[s].stopped == Some(ProposerError::NothingToSync) {
                // Killed before any WAL reached a safekeeper: nothing to sync.
                assert!((0..3).all(|sk| net.durable_wal(sk).is_empty()), "{}", net.describe_acceptors());
                assert_eq!(acknowledged, Lsn::INVALID);
                break;
            }
            let proposer = net.computes[s].node.proposer();
            let synced = proposer.synced_lsn().unwrap_or_else(|| {
                panic!("rounds {rounds_before_death}: no sync: {:?}; {}", proposer.status(), net.describe_acceptors())
            });
            assert!(
                synced >= acknowledged,
                "after {rounds_before_death} rounds: synced {synced} < acknowledged {acknowledged}"
            );
            assert!(
                net.holders(&postgres, synced) >= 2,
                "synced {synced} not on a majority: {}",
                net.describe_acceptors()
            );
            for sk in 0..3 {
                assert_eq!(net.acceptors[sk].acceptor().commit_lsn(), synced, "safekeeper {sk} learned the commit LSN");
            }
            synced_terms.push(net.elected_term(s));
            synced_lsns.push(synced);
            net.kill(s);
        }
        if synced_lsns.is_empty() {
            continue;
        }
        rounds_synced += 1;
        assert_eq!(synced_lsns[0], synced_lsns[1], "a repeated sync commits the same log");
        assert!(old_term < synced_terms[0] && synced_terms[0] < synced_terms[1], "each sync wins a higher term");
    }
    assert!(rounds_synced >= 30, "only {rounds_synced} of 39 deaths left WAL to sync");
}

/// Rule: a sync of a timeline whose safekeepers hold no WAL has nothing to
/// commit and says so (it never starts a log of its own).
#[test]
fn a_sync_of_an_empty_timeline_refuses() {
    let mut net = Net::new(3);
    let s = net.start_sync(Postgres::generate(10, 3));
    net.connect_all(s);
    net.run_until_quiet();
    assert_eq!(net.computes[s].stopped, Some(ProposerError::NothingToSync));
}

/// The primary streams for `rounds_before_death` rounds (safekeeper 2's
/// link dropped halfway), dies, and a sync makes the log final. Returns
/// the net, the dead primary's last acknowledged commit and the synced
/// LSN (`None`: nothing reached a safekeeper).
fn primary_dies_and_a_sync_runs(postgres: &Postgres, rounds_before_death: usize) -> Option<(Net, Lsn, Lsn)> {
    let (mut net, acknowledged, _) = primary_streams_and_dies(postgres, rounds_before_death);
    let s = run_sync(&mut net, postgres);
    if net.computes[s].stopped == Some(ProposerError::NothingToSync) {
        return None;
    }
    let synced = net.computes[s].node.proposer().synced_lsn().expect("the sync completes");
    assert!(synced >= acknowledged);
    net.kill(s);
    Some((net, acknowledged, synced))
}

/// The primary streams for `rounds_before_death` rounds (safekeeper 2's
/// link dropped halfway) and dies: the net, its last acknowledged commit
/// and its term.
fn primary_streams_and_dies(postgres: &Postgres, rounds_before_death: usize) -> (Net, Lsn, Option<Term>) {
    let mut net = Net::new(3);
    let c = net.start_compute(postgres.clone());
    net.connect_all(c);
    for round in 0..rounds_before_death {
        net.round();
        if round == rounds_before_death / 2 {
            net.disconnect(c, 2);
        }
    }
    let acknowledged = net.commit_lsn(c);
    let term = net.elected_term(c);
    net.kill(c);
    (net, acknowledged, term)
}

/// A sync with all three, run until it is done or stops (at most
/// `SYNC_HEARTBEATS` heartbeat intervals): its compute index.
fn run_sync(net: &mut Net, postgres: &Postgres) -> usize {
    let s = net.start_sync(postgres.clone());
    net.connect_all(s);
    for _ in 0..SYNC_HEARTBEATS {
        net.run_until_quiet();
        if net.computes[s].node.proposer().synced_lsn().is_some() || net.computes[s].stopped.is_some() {
            break;
        }
        net.advance_time(HEARTBEAT_INTERVAL_MS);
    }
    s
}

/// The log up to `synced` as safekeeper 0 holds it (every safekeeper's
/// commit LSN is `synced` after the sync, so each holds it).
fn log_up_to(net: &Net, synced: Lsn) -> Vec<u8> {
    let log = net.durable_wal(0)[..(synced - TIMELINE_START) as usize].to_vec();
    assert_eq!(net.holders_of(&log), 3);
    log
}

/// Rules (docs/failover.md, DESIGN "Failover is part of the protocol"):
/// the primary dies, a sync makes its log final, a standby fed by the
/// safekeepers is promoted at the synced LSN onto Postgres timeline 2; its
/// shim is elected, commits all of its WAL, and the safekeepers' log is
/// the promoted server's: nothing at or below the synced LSN changed,
/// every commit the old primary acknowledged is in it, the pages after the
/// switch are timeline 2's (each acceptor checked every page) and every
/// safekeeper holds the new history.
#[test]
fn a_promoted_standby_continues_the_log_on_timeline_2() {
    let postgres = Postgres::generate(400, 7);
    let mut promotions = 0;
    for rounds_before_death in [2, 5, 9, 14, 22, 40] {
        let Some((mut net, acknowledged, synced)) = primary_dies_and_a_sync_runs(&postgres, rounds_before_death) else {
            continue;
        };
        let log = log_up_to(&net, synced);
        let promoted = Postgres::promoted(&log, &PgTimelineHistory::first(), 2, 300, 11);
        assert_eq!(promoted.pg_timelines.end_of(1), Some(synced));
        let n = net.start_compute(promoted.clone());
        net.connect_all(n);
        net.run_until_quiet();
        assert!(net.elected_term(n).is_some(), "rounds {rounds_before_death}: {}", net.describe_acceptors());
        assert_eq!(net.commit_lsn(n), promoted.flush_lsn(), "the promoted server's WAL commits");
        for sk in 0..3 {
            assert!(net.durable_wal(sk) == &promoted.wal[..], "safekeeper {sk} holds the promoted server's WAL");
            assert!(net.durable_wal(sk).starts_with(&log), "nothing at or below the synced LSN {synced} changed");
            assert_eq!(net.acceptors[sk].acceptor().state().pg_timelines, promoted.pg_timelines);
        }
        assert_eq!(net.holders(&postgres, acknowledged), 3, "every acknowledged commit is in the log");
        let record = &net.pg_timeline_record;
        assert_eq!(record.quorum_timeline, 2);
        assert_eq!(record.won.values().last(), Some(&Some(2)), "the last term won streams timeline 2");
        promotions += 1;
    }
    assert!(promotions >= 4, "only {promotions} runs left WAL to sync");
}

/// Rules: after the promotion, the old primary's shim (timeline 1) never
/// wins a term: started afterwards it stops as superseded on the first
/// greeting response, before any vote (no safekeeper's term moves);
/// started before and held back until the new shim was elected, its vote
/// requests are refused (`SupersededTimeline`, no term bump) and it stops
/// the same way. The new shim is not fenced and its commits go on.
#[test]
fn the_old_primary_never_wins_a_term_after_a_promotion() {
    let postgres = Postgres::generate(400, 8);
    for held_back in [false, true] {
        let (mut net, _, synced) = primary_dies_and_a_sync_runs(&postgres, 12).expect("WAL to sync");
        let log = log_up_to(&net, synced);
        let mut promoted = Postgres::promoted(&log, &PgTimelineHistory::first(), 2, 400, 12);
        let full = promoted.flush_lsn();
        let half = record_end_after(&promoted, synced + (full - synced) / 2);
        promoted.set_flush_lsn(half);

        let old = net.start_compute(postgres.clone());
        if held_back {
            // It greets while the log is still timeline 1's; its vote
            // requests wait behind a partition.
            net.connect_all(old);
            net.pump(old);
            for sk in 0..3 {
                while net.deliver_to_acceptor(old, sk) {}
                net.sync(sk);
                while net.deliver_to_proposer(old, sk) {}
            }
            net.pump(old);
            let votes_queued = (0..3).all(|sk| {
                let queued = &net.computes[old].links[sk].to_acceptor;
                queued.iter().any(|message| matches!(message, ProposerMessage::VoteRequest(_)))
            });
            assert!(votes_queued, "the old primary's shim asks for votes");
            (0..3).for_each(|sk| net.computes[old].links[sk].blocked_to_acceptor = true);
        }
        let n = net.start_compute(promoted.clone());
        net.connect_all(n);
        net.run_until_quiet();
        let new_term = net.elected_term(n).expect("the promoted server's shim is elected");
        assert_eq!(net.commit_lsn(n), half);
        let terms: Vec<Term> = (0..3).map(|sk| net.acceptors[sk].acceptor().term()).collect();

        if held_back {
            (0..3).for_each(|sk| net.computes[old].links[sk].blocked_to_acceptor = false);
        } else {
            net.connect_all(old);
        }
        net.run_until_quiet();
        let stopped = net.computes[old].stopped.clone().expect("the old primary's shim stops");
        assert_eq!(stopped, ProposerError::Superseded { timeline: 1, current: 2, switch_lsn: synced });
        assert!(stopped.is_fatal(), "{stopped}");
        assert_eq!(net.elected_term(old), None, "held back {held_back}: it never won a term");
        let terms_after: Vec<Term> = (0..3).map(|sk| net.acceptors[sk].acceptor().term()).collect();
        assert_eq!(terms_after, terms, "no safekeeper's term moved for the old primary");

        net.computes[n].postgres.set_flush_lsn(full);
        net.advance_time(HEARTBEAT_INTERVAL_MS);
        net.run_until_quiet();
        assert_eq!(net.elected_term(n), Some(new_term), "the new shim was not fenced");
        assert_eq!(net.commit_lsn(n), full, "its commits go on");
        assert_eq!(net.holders(&promoted, full), 3);
        let won_since: Vec<_> = net.pg_timeline_record.won.range(new_term..).collect();
        assert_eq!(won_since, vec![(&new_term, &Some(2))], "no term after the promotion was won on timeline 1");
    }
}

/// Liveness after a promotion that never took over: the promoted server's
/// shim wins votes from safekeepers 0 and 1 but its ProposerElected reaches
/// only safekeeper 0 before it dies (its term commits nothing). The old
/// primary's shim (timeline 1) then leads with 1 and 2 and commits all of
/// its WAL on them: legitimate, as no quorum ever held timeline 2. A fresh
/// shim of that primary greeting safekeeper 0 stops as superseded (one
/// safekeeper's word is taken: the shim cannot tell an uncommitted
/// promotion from a committed one), but a sync clears it: its donor is the
/// latest term's log (timeline 1), and safekeeper 0 drops its timeline 2
/// with the divergent tail that was all timeline 2 wrote. Then the shim
/// leads with all three (docs/failover.md, "A promotion that never
/// committed").
#[test]
fn an_uncommitted_promotion_on_one_safekeeper_is_cleared_by_a_sync() {
    let postgres = Postgres::generate(400, 9);
    // The primary had written half of its WAL when it was cut off.
    let mut cut_off = postgres.clone();
    cut_off.set_flush_lsn(record_end_after(&postgres, TIMELINE_START + (postgres.flush_lsn() - TIMELINE_START) / 2));
    let (mut net, _, synced) = primary_dies_and_a_sync_runs(&cut_off, 40).expect("WAL to sync");
    assert!(synced < postgres.flush_lsn());
    let log = log_up_to(&net, synced);
    let promoted = Postgres::promoted(&log, &PgTimelineHistory::first(), 2, 100, 13);
    let n = net.start_compute(promoted);
    net.connect(n, 0);
    net.connect(n, 1);
    // Step by step until it is elected, then its ProposerElected reaches 0 only.
    for _ in 0..20 {
        if net.elected_term(n).is_some() {
            break;
        }
        net.pump(n);
        for sk in 0..2 {
            while net.deliver_to_acceptor(n, sk) {}
            net.sync(sk);
            while net.deliver_to_proposer(n, sk) {}
        }
    }
    assert!(net.elected_term(n).is_some(), "{}", net.describe_acceptors());
    net.pump(n);
    assert!(net.computes[n].links[1].to_acceptor.iter().any(|m| matches!(m, ProposerMessage::ProposerElected(_))));
    while net.deliver_to_acceptor(n, 0) {}
    net.sync(0);
    net.kill(n);
    assert_eq!(net.acceptors[0].acceptor().state().pg_timelines.current, 2);
    assert_eq!(net.acceptors[1].acceptor().state().pg_timelines.current, 1);
    assert_eq!(net.pg_timeline_record.quorum_timeline, 1, "no quorum held timeline 2");

    // The old primary comes back with the rest of its WAL: its shim leads
    // with 1 and 2 and commits everything.
    let old = net.start_compute(postgres.clone());
    net.connect(old, 1);
    net.connect(old, 2);
    net.run_until_quiet();
    assert_eq!(net.commit_lsn(old), postgres.flush_lsn(), "{}", net.describe_acceptors());
    net.kill(old);

    // The operator restarts that primary's shim with all three named: safekeeper
    // 0's timeline 2 stops it, until a sync makes the log timeline 1 on all.
    let refused = net.start_compute(postgres.clone());
    net.connect_all(refused);
    net.run_until_quiet();
    assert!(
        matches!(net.computes[refused].stopped, Some(ProposerError::Superseded { .. })),
        "{:?}",
        net.computes[refused].stopped
    );
    net.kill(refused);
    let s = run_sync(&mut net, &postgres);
    assert_eq!(
        net.computes[s].node.proposer().synced_lsn(),
        Some(postgres.flush_lsn()),
        "{}",
        net.describe_acceptors()
    );
    net.kill(s);
    assert_eq!(net.acceptors[0].acceptor().state().pg_timelines.current, 1, "the sync cleared timeline 2");
    let again = net.start_compute(postgres.clone());
    net.connect_all(again);
    net.run_until_quiet();
    net.advance_time(HEARTBEAT_INTERVAL_MS);
    net.run_until_quiet();
    assert_eq!(net.computes[again].stopped, None, "the log's own primary is refused: {}", net.describe_acceptors());
    assert_eq!(net.commit_lsn(again), postgres.flush_lsn());
    assert_eq!(net.holders(&postgres, postgres.flush_lsn()), 3, "safekeeper 0 rejoins the log");
}

/// The harness's Postgres timeline invariant bites: told that a quorum's
/// log was on timeline 2, it fails the run as soon as a shim streaming
/// timeline 1 wins a term (here the first one: nothing refuses it, as no
/// safekeeper really is on timeline 2).
#[test]
#[should_panic(expected = "Postgres timeline invariant violated")]
fn the_pg_timeline_invariant_catches_an_old_timeline_winning() {
    let mut net = Net::new(3);
    net.pg_timeline_record.quorum_timeline = 2;
    let c = net.start_compute(Postgres::generate(20, 1));
    net.connect_all(c);
    net.run_until_quiet();
}
