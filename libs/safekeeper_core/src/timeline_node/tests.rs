//! Node rules, each test citing the rule it checks. Storage is the
//! in-memory model, wrapped to record the order of storage calls and to
//! inject a failing sync.

use std::cell::RefCell;
use std::rc::Rc;

use super::*;
use crate::acceptor::tests::{
    append, elected, fresh_state, segment_size, vote, SEGMENT_SIZE_BYTES, SYSTEM_ID, TIMELINE_START,
};
use crate::acceptor::{AcceptorConfig, RecoveredWal};
use crate::control::ControlState;
use crate::storage::SyncedLsn;
use postgres_wal::wal::generator::WalGenerator;
use safekeeper_protocol::ids::NodeId;

/// A storage call, in the order the node made it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Write,
    Sync,
    Persist { commit_lsn: Lsn, remote_consistent_lsn: Lsn },
    RemoveBelow(Lsn),
}

#[derive(Clone, Default)]
struct Probe {
    calls: Rc<RefCell<Vec<Call>>>,
    /// The next sync fails as fsync would (fail-stop).
    fail_sync: Rc<RefCell<bool>>,
}

impl Probe {
    fn record(&self, call: Call) {
        self.calls.borrow_mut().push(call);
    }
    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut self.calls.borrow_mut())
    }
}

struct ProbeWal {
    inner: MemoryWalStorage,
    probe: Probe,
}

impl WalStorage for ProbeWal {
    fn start_lsn(&self) -> Lsn {
        self.inner.start_lsn()
    }
    fn write_lsn(&self) -> Lsn {
        self.inner.write_lsn()
    }
    fn flush_lsn(&self) -> Lsn {
        self.inner.flush_lsn()
    }
    fn initialize(&mut self, start: Lsn) -> Result<(), StorageError> {
        self.inner.initialize(start)
    }
    fn restart_empty(&mut self, start: Lsn) -> Result<(), StorageError> {
        self.inner.restart_empty(start)
    }
    fn write(&mut self, start: Lsn, bytes: &[u8]) -> Result<(), StorageError> {
        self.probe.record(Call::Write);
        self.inner.write(start, bytes)
    }
    fn sync(&mut self) -> Result<SyncedLsn, StorageError> {
        if std::mem::take(&mut *self.probe.fail_sync.borrow_mut()) {
            let source = std::io::Error::other("injected fsync failure");
            return Err(StorageError::SyncFailed { what: "segment".to_string(), source });
        }
        self.probe.record(Call::Sync);
        self.inner.sync()
    }
    fn truncate(&mut self, end: Lsn) -> Result<(), StorageError> {
        self.inner.truncate(end)
    }
    fn read(&mut self, start: Lsn, buf: &mut [u8]) -> Result<(), StorageError> {
        self.inner.read(start, buf)
    }
    fn remove_below(&mut self, end: Lsn) -> Result<(), StorageError> {
        self.probe.record(Call::RemoveBelow(end));
        self.inner.remove_below(end)
    }
    fn set_pg_timelines(
        &mut self,
        history: &postgres_wal::timeline_history::PgTimelineHistory,
    ) -> Result<(), StorageError> {
        self.inner.set_pg_timelines(history)
    }
}

struct ProbeControl {
    inner: MemoryControlStore,
    probe: Probe,
}

impl ControlStore for ProbeControl {
    fn persist(&mut self, state: &ControlState) -> Result<(), StorageError> {
        self.probe
            .record(Call::Persist { commit_lsn: state.commit_lsn, remote_consistent_lsn: state.remote_consistent_lsn });
        self.inner.persist(state)
    }
}

type ProbeNode = TimelineNode<ProbeWal, ProbeControl>;

fn new_node(retention: RetentionPolicy) -> (ProbeNode, Probe) {
    let probe = Probe::default();
    let acceptor = Acceptor::new(
        NodeId(1),
        AcceptorConfig::default(),
        fresh_state(),
        RecoveredWal { end_lsn: Lsn::INVALID, decoder: None },
    );
    let wal = ProbeWal { inner: MemoryWalStorage::new(), probe: probe.clone() };
    let control = ProbeControl { inner: MemoryControlStore::default(), probe: probe.clone() };
    (TimelineNode::new(Timeline::new(acceptor, wal, control), retention), probe)
}

/// Generated WAL cut into appends that stay within segments.
struct Stream {
    wal: Vec<u8>,
    sent: usize,
}

impl Stream {
    fn new(records: usize) -> Stream {
        let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), TIMELINE_START);
        for index in 0..records {
            let payload = vec![(index % 251) as u8; 200 + (index * 997) % 12_000];
            generator.append_record(10, 0x00, index as u32 + 1000, &payload);
        }
        Stream { wal: generator.take_bytes().1, sent: 0 }
    }

    fn at(&self) -> Lsn {
        TIMELINE_START + self.sent as u64
    }

    /// The next append of at most `max_bytes`, in `term`, carrying `commit_lsn`.
    fn next(&mut self, term: u64, max_bytes: usize, commit_lsn: Lsn) -> Option<ProposerMessage> {
        let at = self.at();
        let to_segment_end = (at.next_segment_start(segment_size()) - at) as usize;
        let len = (self.wal.len() - self.sent).min(to_segment_end).min(max_bytes);
        if len == 0 {
            return None;
        }
        let message = append(term, at, &self.wal[self.sent..self.sent + len], commit_lsn);
        self.sent += len;
        Some(message)
    }
}

const A: ConnectionId = ConnectionId(1);
const B: ConnectionId = ConnectionId(2);
const C: ConnectionId = ConnectionId(3);

/// Vote and election from connection `A`, in one batch.
fn elect(node: &mut ProbeNode) {
    node.handle_message(A, vote(1)).unwrap();
    node.handle_message(A, elected(1, &[(1, TIMELINE_START)])).unwrap();
    let output = node.end_batch().unwrap();
    assert_eq!(output.replies.len(), 2, "vote and election answered: {:?}", output.replies);
    assert!(node.poll_close().is_none());
}

fn flush_of(reply: &AcceptorMessage) -> Lsn {
    match reply {
        AcceptorMessage::AppendResponse(response) => response.flush_lsn,
        other => panic!("expected an AppendResponse, got {other:?}"),
    }
}

/// Rule (docs/service.md, group commit): replies of `handle` go to their
/// sender in message order, and the acknowledgement the sync releases goes
/// to every connection whose WAL was written in the batch, in the order of
/// their first write; one sync serves the whole batch, and nothing leaves
/// the node before it.
#[test]
fn the_ack_goes_to_every_connection_that_wrote_after_one_sync() {
    let (mut node, probe) = new_node(RetentionPolicy::default());
    elect(&mut node);
    let mut stream = Stream::new(40);
    probe.take();
    node.handle_message(B, stream.next(1, 8192, Lsn(0)).unwrap()).unwrap();
    node.handle_message(C, vote(1)).unwrap(); // answered (refused: not a higher term)
    node.handle_message(A, stream.next(1, 8192, Lsn(0)).unwrap()).unwrap();
    node.handle_message(B, stream.next(1, 8192, Lsn(0)).unwrap()).unwrap();
    assert!(node.wal().flush_lsn() < node.wal().write_lsn(), "written, not yet durable");
    let output = node.end_batch().unwrap();
    assert_eq!(probe.take().iter().filter(|call| **call == Call::Sync).count(), 1, "one sync per batch");
    let to: Vec<ConnectionId> = output.replies.iter().map(|(connection, _)| *connection).collect();
    assert_eq!(to, vec![C, B, A], "the vote reply first, then the ack to each writer in first-write order");
    assert!(matches!(output.replies[0].1, AcceptorMessage::VoteResponse(_)));
    for (_, reply) in &output.replies[1..] {
        assert_eq!(flush_of(reply), node.acceptor().flush_lsn(), "the ack reports what the sync made durable");
    }
    assert_eq!(output.flush_lsn, node.acceptor().flush_lsn());
    assert_eq!(node.wal().flush_lsn(), node.wal().write_lsn(), "all written WAL was synced");
    assert_eq!((output.appends, output.proposer_wal_bytes), (3, stream.sent as u64));
    // The next batch owes nothing to these connections.
    assert!(node.end_batch().unwrap().replies.is_empty());
}

/// Rule: an acknowledgement owed to a connection that closed goes nowhere
/// (it must not reach the proposer's next connection), and replies of a
/// closed connection are dropped.
#[test]
fn a_closed_connection_gets_nothing_of_its_batch() {
    let (mut node, _) = new_node(RetentionPolicy::default());
    elect(&mut node);
    let mut stream = Stream::new(10);
    node.handle_message(B, stream.next(1, 8192, Lsn(0)).unwrap()).unwrap();
    node.handle_message(B, vote(1)).unwrap();
    node.handle_message(A, stream.next(1, 8192, Lsn(0)).unwrap()).unwrap();
    node.connection_closed(B);
    node.handle_message(B, stream.next(1, 8192, Lsn(0)).unwrap()).unwrap();
    let output = node.end_batch().unwrap();
    let to: Vec<ConnectionId> = output.replies.iter().map(|(connection, _)| *connection).collect();
    assert_eq!(to, vec![A]);
    assert_eq!(output.appends, 2, "a message of a closed connection is not handled");
}

/// Rule: a refused message closes its connection at once with a SQLSTATE
/// (not waiting for the sync), and nothing else of the batch goes to it.
#[test]
fn a_refusal_closes_the_connection_with_a_sqlstate() {
    let (mut node, _) = new_node(RetentionPolicy::default());
    elect(&mut node);
    let mut stream = Stream::new(10);
    node.handle_message(B, stream.next(1, 8192, Lsn(0)).unwrap()).unwrap();
    // Term 2 was never elected here.
    node.handle_message(B, append(2, stream.at(), &stream.wal[stream.sent..stream.sent + 100], Lsn(0))).unwrap();
    let (connection, refusal) = node.poll_close().expect("refused at once");
    assert_eq!(connection, B);
    assert_eq!(refusal.sqlstate, sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE);
    assert!(matches!(refusal.cause, RefusalCause::Refused(AcceptorError::NotElected { .. })), "{refusal:?}");
    assert!(node.poll_close().is_none());
    assert!(node.end_batch().unwrap().replies.is_empty(), "the refused connection's ack is dropped");
}

/// Rule (peer-recovery handoff): once peer recovery caught this safekeeper
/// up, each proposer connection seen before is refused when it next
/// speaks, once; a connection opened after that (the proposer reconnecting)
/// is served.
#[test]
fn after_peer_recovery_each_older_connection_is_refused_once() {
    let (mut node, _) = new_node(RetentionPolicy::default());
    elect(&mut node);
    node.handle_message(B, vote(1)).unwrap();
    node.end_batch().unwrap();
    node.peer_recovery_done();
    let d = ConnectionId(4);
    node.handle_message(d, vote(1)).unwrap();
    node.handle_message(B, vote(1)).unwrap();
    node.handle_message(B, vote(1)).unwrap();
    node.handle_message(A, vote(1)).unwrap();
    let mut closed = vec![];
    while let Some((connection, refusal)) = node.poll_close() {
        assert_eq!(refusal.sqlstate, sqlstate::ADMIN_SHUTDOWN);
        assert_eq!(refusal.cause, RefusalCause::CaughtUpByPeers { flush_lsn: node.acceptor().flush_lsn() });
        closed.push(connection);
    }
    assert_eq!(closed, vec![B, A], "each older connection once, in the order they spoke");
    let to: Vec<ConnectionId> = node.end_batch().unwrap().replies.into_iter().map(|(c, _)| c).collect();
    assert_eq!(to, vec![d], "the newer connection is served");
    // A later recovery refuses only what was seen since.
    node.peer_recovery_done();
    node.handle_message(ConnectionId(5), vote(1)).unwrap();
    node.handle_message(d, vote(1)).unwrap();
    assert_eq!(node.poll_close().map(|(connection, _)| connection), Some(d));
    assert!(node.poll_close().is_none());
}

/// Rule (retention): the control file, holding the consumer's position and
/// a commit LSN at or above the removal point, is persisted before any
/// segment is removed; nothing is removed without feedback.
#[test]
fn retention_persists_the_control_file_before_removing_segments() {
    let (mut node, probe) = new_node(RetentionPolicy::default());
    elect(&mut node);
    let mut stream = Stream::new(1000);
    let end = TIMELINE_START + stream.wal.len() as u64;
    assert!(end > TIMELINE_START + 4 * SEGMENT_SIZE_BYTES, "the test needs several segments");
    while let Some(message) = stream.next(1, 64 << 10, end) {
        node.handle_message(A, message).unwrap();
        if node.batch_is_full() {
            node.end_batch().unwrap();
        }
    }
    node.end_batch().unwrap();
    // A heartbeat carries the commit LSN to the now durable end.
    node.handle_message(A, append(1, end, &[], end)).unwrap();
    node.end_batch().unwrap();
    assert_eq!(node.acceptor().commit_lsn(), end);
    assert_eq!(node.apply_retention().unwrap(), RetentionOutcome::Nothing, "no feedback, nothing removed");
    probe.take();
    let confirmed = TIMELINE_START + 3 * SEGMENT_SIZE_BYTES + 10;
    node.handle_feedback(confirmed);
    let outcome = node.apply_retention().unwrap();
    let new_start = TIMELINE_START + 2 * SEGMENT_SIZE_BYTES;
    assert_eq!(outcome, RetentionOutcome::Removed { old_start: TIMELINE_START, new_start });
    assert_eq!(
        probe.take(),
        vec![Call::Persist { commit_lsn: end, remote_consistent_lsn: confirmed }, Call::RemoveBelow(new_start)],
        "persist first, then remove"
    );
    assert_eq!(node.wal().start_lsn(), new_start);
    assert_eq!(node.apply_retention().unwrap(), RetentionOutcome::Nothing, "done once");
    assert!(probe.take().is_empty());
}

/// Rule (fail-stop): after a failed sync nothing is known to be durable:
/// the batch's connections are refused, none gets an acknowledgement, and
/// the node serves nothing afterwards.
#[test]
fn a_failed_sync_stops_the_node_for_good() {
    let (mut node, probe) = new_node(RetentionPolicy::default());
    elect(&mut node);
    let mut stream = Stream::new(10);
    node.handle_message(A, stream.next(1, 8192, Lsn(0)).unwrap()).unwrap();
    node.handle_message(B, vote(1)).unwrap();
    *probe.fail_sync.borrow_mut() = true;
    match node.end_batch() {
        Err(NodeError::Storage(error)) => assert!(error.is_fatal(), "{error}"),
        other => panic!("expected the storage error, got {other:?}"),
    }
    let mut closed = vec![];
    while let Some((connection, refusal)) = node.poll_close() {
        assert_eq!((refusal.sqlstate, &refusal.cause), (sqlstate::IO_ERROR, &RefusalCause::StorageFailed));
        closed.push(connection);
    }
    assert_eq!(closed, vec![A, B]);
    assert!(node.stopped().is_some());
    assert!(matches!(node.handle_message(C, vote(1)), Err(NodeError::Stopped(_))));
    assert!(matches!(node.end_batch(), Err(NodeError::Stopped(_))));
    assert!(matches!(node.checkpoint(), Err(NodeError::Stopped(_))));
    assert!(node.poll_close().is_none(), "nothing more is handled");
}

/// Rule (group commit bounds): a batch ends after `MAX_BATCH_MESSAGES`
/// messages or `MAX_BATCH_WAL_BYTES` of WAL, whichever comes first.
#[test]
fn a_batch_is_full_at_its_message_bound() {
    let (mut node, _) = new_node(RetentionPolicy::default());
    elect(&mut node);
    for index in 0..MAX_BATCH_MESSAGES {
        assert!(!node.batch_is_full(), "full after {index} messages");
        node.handle_message(A, vote(1)).unwrap();
    }
    assert!(node.batch_is_full());
    assert_eq!(node.end_batch().unwrap().replies.len(), MAX_BATCH_MESSAGES);
    assert!(!node.batch_is_full(), "a new batch starts empty");
}

/// Rule (recovery, docs/storage.md): a page write torn by a crash (unsynced
/// bytes that reached the disk half new, half stale) is caught by recovery:
/// the restarted timeline ends at the last whole record before the tear,
/// keeps every synced byte, and takes the proposer's resent WAL from there.
#[test]
fn a_torn_page_write_is_cut_off_by_recovery() {
    let timeline = crate::timeline::MemoryTimeline::empty(NodeId(1), fresh_state());
    let mut node = MemoryNode::new(timeline, RetentionPolicy::default());
    node.handle_message(A, vote(1)).unwrap();
    node.handle_message(A, elected(1, &[(1, TIMELINE_START)])).unwrap();
    node.end_batch().unwrap();
    let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), TIMELINE_START);
    let records: Vec<_> =
        (0..60u32).map(|index| generator.append_record(10, 0, 1000 + index, &[index as u8; 3000])).collect();
    let wal = generator.take_bytes().1;
    let synced_end = records[19].end_lsn;
    let at = |lsn: Lsn| (lsn - TIMELINE_START) as usize;
    node.handle_message(A, append(1, TIMELINE_START, &wal[..at(synced_end)], Lsn(0))).unwrap();
    node.end_batch().unwrap();
    node.handle_message(A, append(1, synced_end, &wal[at(synced_end)..], Lsn(0))).unwrap();
    // The crash keeps every unsynced byte, torn from inside record 40 on.
    let torn_lsn = records[40].start_lsn + 100;
    let node = node.crash_and_restart_with(|wal| wal.crash_torn(usize::MAX, at(torn_lsn) - at(synced_end)));
    let end = node.acceptor().flush_lsn();
    assert_eq!(end, records[39].end_lsn, "recovery ends at the last whole record before the tear");
    assert_eq!(node.wal().write_lsn(), end, "the torn bytes are removed");
    assert_eq!(&node.wal().contents()[..at(end)], &wal[..at(end)], "what recovery kept is the WAL as written");
    let mut node = node;
    node.handle_message(A, vote(2)).unwrap();
    node.handle_message(A, elected(2, &[(1, TIMELINE_START), (2, end)])).unwrap();
    node.handle_message(A, append(2, end, &wal[at(end)..], Lsn(0))).unwrap();
    let output = node.end_batch().unwrap();
    assert!(node.poll_close().is_none(), "the resent WAL continues the recovered log");
    assert!(output
        .replies
        .iter()
        .any(|(_, reply)| matches!(reply, AcceptorMessage::AppendResponse(r) if r.flush_lsn == records[59].end_lsn)));
}
