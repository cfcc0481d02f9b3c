//! Stepping down (the shim's SIGTERM): the node takes no more WAL, the
//! WAL it took gets its quorum, and only then, or at the bound, is it done.

use super::harness::{Net, Postgres};

const STEP_DOWN_TIMEOUT_MS: u64 = 5_000;

/// Elected, some WAL taken but not yet committed; Postgres has written
/// only part of its WAL (the test writes the rest when it likes).
fn net_with_wal_in_flight() -> (Net, usize, Postgres) {
    let postgres = Postgres::generate(600, 21);
    let mut partial = postgres.clone();
    partial.set_flush_lsn(postgres.record_ends[postgres.record_ends.len() / 2]);
    let mut net = Net::new(3);
    let c = net.start_compute(partial);
    net.connect_all(c);
    net.run_until(|net| {
        let proposer = net.computes[c].node.proposer();
        proposer.wal_end_lsn().is_some_and(|end| end > proposer.commit_lsn())
    });
    (net, c, postgres)
}

/// Rule: a stepping-down shim commits everything it took, takes nothing
/// more, and then reports itself done (not timed out).
#[test]
fn a_stepping_down_shim_commits_what_it_took_and_no_more() {
    let (mut net, c, postgres) = net_with_wal_in_flight();
    let taken = net.computes[c].node.proposer().wal_end_lsn().expect("WAL taken");
    net.computes[c].node.handle_step_down(net.now_ms, STEP_DOWN_TIMEOUT_MS);
    net.computes[c].postgres.set_flush_lsn(postgres.flush_lsn());
    assert!(taken < postgres.flush_lsn(), "Postgres has more to give");
    assert_eq!(net.computes[c].node.wal_wanted_from(), None, "no WAL is wanted while stepping down");
    assert!(net.computes[c].node.poll_stepped_down().is_none(), "not done with WAL in flight");
    net.run_until_quiet();
    let done = net.computes[c].node.poll_stepped_down().expect("done once committed");
    assert_eq!(done.wal_end_lsn, Some(taken), "no WAL was taken after the step-down began");
    assert_eq!(done.commit_lsn, taken, "everything taken was committed");
    assert!(!done.timed_out);
    assert!(net.check_commit_on_majority(&postgres, taken).is_ok());
}

/// Rule: without a quorum the step-down ends at its bound, saying that
/// the WAL taken was not all committed (a restart resends it).
#[test]
fn a_step_down_without_a_quorum_ends_at_its_bound() {
    let (mut net, c, _) = net_with_wal_in_flight();
    for sk in 1..3 {
        net.computes[c].links[sk].blocked_to_acceptor = true;
    }
    net.computes[c].node.handle_step_down(net.now_ms, STEP_DOWN_TIMEOUT_MS);
    net.run_until_quiet();
    assert!(net.computes[c].node.poll_stepped_down().is_none(), "the bound has not passed");
    let deadline_ms = net.now_ms + STEP_DOWN_TIMEOUT_MS;
    assert!(net.computes[c].node.poll_timeout().is_some_and(|at_ms| at_ms <= deadline_ms), "it wakes for the bound");
    net.advance_time(STEP_DOWN_TIMEOUT_MS);
    let done = net.computes[c].node.poll_stepped_down().expect("the bound passed");
    assert!(done.timed_out);
    assert!(done.commit_lsn < done.wal_end_lsn.expect("WAL taken"));
}

/// Rule: a shim asked to step down before it was elected is done at once.
#[test]
fn a_shim_not_yet_elected_steps_down_at_once() {
    let mut net = Net::new(3);
    let c = net.start_compute(Postgres::generate(50, 22));
    net.computes[c].node.handle_step_down(net.now_ms, STEP_DOWN_TIMEOUT_MS);
    let done = net.computes[c].node.poll_stepped_down().expect("nothing to wait for");
    assert_eq!(done.wal_end_lsn, None);
    assert!(!done.timed_out);
}
