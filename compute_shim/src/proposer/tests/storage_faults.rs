//! Storage faults on a safekeeper in the simulated network: its timeline
//! node over in-memory storage whose next sync fails as an fsync would.

use super::harness::{addr, Net, Postgres};

/// Rule (fail-stop, docs/service.md): a failed fsync stops the safekeeper
/// at once: nothing of that batch is acknowledged (the proposer never
/// counts WAL that did not become durable there), it serves nothing until
/// restarted, and the other two keep committing; restarted, it has what
/// it had synced and catches up.
#[test]
fn a_failed_fsync_stops_the_safekeeper_and_the_quorum_goes_on() {
    let full = Postgres::generate(600, 9);
    let mut postgres = full.clone();
    let half = postgres.record_ends[300];
    postgres.set_flush_lsn(half);
    let (mut net, c) = Net::streaming(3, postgres);
    assert_eq!(net.commit_lsn(c), half);
    let durable_before = net.durable_wal(2).to_vec();

    net.acceptors[2].inject_sync_failure();
    net.computes[c].postgres.set_flush_lsn(full.flush_lsn());
    net.run_until_quiet();
    assert!(net.down[2], "the safekeeper stopped at its failed sync");
    assert_eq!(net.durable_wal(2), &durable_before[..], "nothing more became durable there");
    let status = net.computes[c].node.proposer().status();
    let seen = status.safekeepers.iter().find(|peer| peer.addr == addr(2)).and_then(|peer| peer.flush_lsn);
    assert!(seen <= Some(half), "the proposer never saw an acknowledgement of the failed batch: {seen:?}");
    assert_eq!(net.commit_lsn(c), full.flush_lsn(), "the other two commit everything");

    net.restart_safekeeper(2);
    net.connect(c, 2);
    net.run_until_quiet();
    assert!(net.durable_wal(2) == &full.wal[..], "restarted, it catches up");
}
