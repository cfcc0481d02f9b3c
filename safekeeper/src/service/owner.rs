//! The single owner of one timeline: an async task, fed by a bounded tokio
//! channel, that moves inputs into the timeline's [`TimelineNode`] (over
//! the segment files and the control file) and its outputs onto
//! connections.
//!
//! Storage calls block (msync, fdatasync, fsync of the control file), so
//! each batch runs on the runtime's blocking pool (`spawn_blocking`; the
//! pool's size is capped where the runtime is built, so the threads do not
//! grow with the timelines): the task waits for its batch there, a slow
//! disk stalls that timeline, never the runtime, and an idle timeline holds
//! no thread. One batch: hand the node what is queued while its batch has
//! room, end the batch (one sync), apply retention, publish a status
//! snapshot, then hand the replies to the connections (`super::replies`:
//! written directly to an idle connection's socket, else queued for its
//! writer task).
//!
//! What goes where (reply routing, refusals, the peer-recovery handoff,
//! the order of retention's storage calls) is the node's decision
//! (`safekeeper_core::timeline_node`, which the simulation runs too); this loop only
//! maps connection ids to connections and measures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::errors::PgError;
use super::metrics::TimelineMetrics;
pub use super::replies::PushConnection;
use postgres_wal::lsn::Lsn;
use safekeeper_api::api::{PeerRecoveryStatus, TimelineStatus};
use safekeeper_core::acceptor::PeerWal;
use safekeeper_core::retention::RetentionPolicy;
use safekeeper_core::storage::control_file::FileControlStore;
use safekeeper_core::storage::segments::SegmentStorage;
use safekeeper_core::storage::sync_delay::SyncDelayed;
use safekeeper_core::storage::{StorageError, WalStorage};
use safekeeper_core::timeline::{FileTimeline, Timeline};
use safekeeper_core::timeline_node::{
    ConnectionId, NodeError, PeerWalOutcome, Refusal, RefusalCause, RetentionOutcome, TimelineNode,
};
use safekeeper_protocol::protocol::ProposerMessage;

/// Messages queued for one owner; senders wait when it is full (backpressure
/// on the proposers' connections, not unbounded memory: at most this many
/// messages of at most `MAX_MESSAGE_BYTES` each).
pub const OWNER_QUEUE_MESSAGES: usize = 256;
/// Exit code after a failed sync (fail-stop).
pub const FAIL_STOP_EXIT_CODE: i32 = 3;

pub enum OwnerInput {
    Push {
        connection: Arc<PushConnection>,
        message: ProposerMessage,
    },
    /// Committed WAL from a peer (peer recovery); `done` gets the flush LSN
    /// once the batch holding it is durable, or why it was refused.
    PeerWal {
        wal: PeerWal,
        done: oneshot::Sender<Result<Lsn, String>>,
    },
    /// Peer recovery caught this safekeeper up: connections of proposers
    /// that may consider it too far behind are refused when they next
    /// speak, so they reconnect and stream from its new flush LSN.
    PeerRecoveryDone,
    /// New consumer feedback arrived (in [`TimelineShared`]): apply retention.
    Wake,
    /// Finish the current batch, checkpoint the control file, acknowledge, exit.
    Shutdown(oneshot::Sender<()>),
}

/// What the owner shares with the HTTP API and WAL readers besides the
/// snapshot.
pub struct TimelineShared {
    /// Highest `remote_consistent_lsn` a consumer posted; the owner applies
    /// it (retention) and persists it.
    pub remote_consistent_lsn: AtomicU64,
    pub metrics: TimelineMetrics,
    /// When the owner last wrote WAL a proposer sent, or accepted a new
    /// proposer's ProposerElected (peer recovery stays out of the way of a
    /// proposer that streams or is about to).
    pub last_proposer_wal: Mutex<Option<Instant>>,
    /// What peer recovery is doing, for the status API.
    pub peer_recovery: Mutex<PeerRecoveryStatus>,
}

fn snapshot_of(timeline: &Timeline<OwnedWal, FileControlStore>, metrics: &TimelineMetrics) -> TimelineStatus {
    let acceptor = timeline.acceptor();
    let state = acceptor.state();
    let wal = timeline.wal();
    TimelineStatus {
        tenant_id: state.cluster.tenant_id,
        timeline_id: state.cluster.timeline_id,
        system_id: state.cluster.system_id,
        pg_version: state.pg_version,
        wal_seg_size: state.wal_segment_size,
        term: state.term,
        last_log_term: acceptor.last_log_term(),
        term_history: state.term_history.clone(),
        timeline_start_lsn: state.timeline_start_lsn,
        flush_lsn: acceptor.flush_lsn(),
        commit_lsn: acceptor.commit_lsn(),
        proposer_commit_lsn: acceptor.proposer_commit_lsn(),
        elected_term: acceptor.elected_term(),
        remote_consistent_lsn: state.remote_consistent_lsn,
        oldest_kept_lsn: wal.start_lsn(),
        disk_bytes: wal.inner().files_end_lsn().checked_sub(wal.start_lsn()).unwrap_or(0),
        removed_segments: metrics.removed_segments.get(),
        stopped_by_error: None,
        membership: state.membership.clone(),
        pg_timelines: state.pg_timelines.clone(),
        // Live, filled in by the HTTP layer when it answers.
        connected_proposers: 0,
        consumers: Vec::new(),
        peer_recovery: PeerRecoveryStatus::default(),
    }
}

pub struct Owner {
    pub inputs: mpsc::Sender<OwnerInput>,
    pub snapshot: watch::Receiver<TimelineStatus>,
    pub task: tokio::task::JoinHandle<()>,
}

/// The segment files as the owner drives them: behind the fault-injection
/// wrapper, which does nothing unless `--fault-sync-delay-ms` is set.
type OwnedWal = SyncDelayed<SegmentStorage>;
/// The node of a timeline on disk.
type FileNode = TimelineNode<OwnedWal, FileControlStore>;

/// Start the owner task of `timeline` (on the current runtime);
/// `fault_sync_delay` is added to every WAL sync (zero in production).
pub fn spawn_owner(
    timeline: FileTimeline,
    shared: Arc<TimelineShared>,
    retention: RetentionPolicy,
    fault_sync_delay: Duration,
) -> Owner {
    let (acceptor, wal, control) = timeline.into_parts();
    let timeline = Timeline::new(acceptor, SyncDelayed::new(wal, fault_sync_delay), control);
    let (inputs, receiver) = mpsc::channel(OWNER_QUEUE_MESSAGES);
    let initial = snapshot_of(&timeline, &shared.metrics);
    shared.remote_consistent_lsn.fetch_max(initial.remote_consistent_lsn.0, Ordering::Relaxed);
    let (snapshot_tx, snapshot) = watch::channel(initial);
    let owner = OwnerState { node: TimelineNode::new(timeline, retention), shared, snapshot: snapshot_tx };
    let task = tokio::spawn(owner.run(receiver));
    Owner { inputs, snapshot, task }
}

/// Log and exit: after a failed sync nothing can be known to be durable.
pub fn fail_stop(error: &StorageError) -> ! {
    tracing::error!("FATAL: {error}; fail-stop: exiting with code {FAIL_STOP_EXIT_CODE}");
    eprintln!("safekeeper: FATAL: {error}; fail-stop");
    std::process::exit(FAIL_STOP_EXIT_CODE)
}

/// The owner's state, moved to the blocking pool for each batch and back.
struct OwnerState {
    node: FileNode,
    shared: Arc<TimelineShared>,
    snapshot: watch::Sender<TimelineStatus>,
}

/// The connections and waiters of the batch under way: the node addresses
/// its outputs by id, these are where they go.
#[derive(Default)]
struct Batch {
    connections: Vec<Arc<PushConnection>>,
    /// Each peer WAL piece's waiter and outcome, in order.
    peer_wal: Vec<(oneshot::Sender<Result<Lsn, String>>, PeerWalOutcome)>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Batch {
    fn connection(&self, id: ConnectionId) -> Option<&Arc<PushConnection>> {
        self.connections.iter().find(|connection| connection.id == id.0)
    }
}

/// Whether the owner goes on after a batch.
#[derive(PartialEq, Eq)]
enum AfterBatch {
    Continue,
    /// Shut down, or stopped by a storage error.
    Stop,
}

impl OwnerState {
    async fn run(self, inputs: mpsc::Receiver<OwnerInput>) {
        let mut state = (self, inputs);
        loop {
            let Some(first) = state.1.recv().await else {
                // Every sender is gone: the service is going away.
                let (mut owner, _) = state;
                let _ = tokio::task::spawn_blocking(move || owner.checkpoint()).await;
                return;
            };
            let (mut owner, mut inputs) = state;
            let joined = tokio::task::spawn_blocking(move || {
                let after = owner.batch(first, &mut inputs);
                (owner, inputs, after)
            })
            .await;
            match joined {
                Ok((owner, inputs, AfterBatch::Continue)) => state = (owner, inputs),
                Ok((_, _, AfterBatch::Stop)) => return,
                // As a thread would: the panic ends this timeline's owner.
                Err(error) => std::panic::resume_unwind(error.into_panic()),
            }
        }
    }

    /// One batch, blocking (storage I/O).
    fn batch(&mut self, first: OwnerInput, inputs: &mut mpsc::Receiver<OwnerInput>) -> AfterBatch {
        let finished = self.collect_batch(first, inputs).and_then(|batch| self.finish_batch(batch));
        finished.unwrap_or_else(|error| {
            self.stop_after(error, inputs);
            AfterBatch::Stop
        })
    }

    /// Hand the node what is queued while its batch has room (a full queue
    /// is not waited for: the batch ends with what is there).
    fn collect_batch(
        &mut self,
        first: OwnerInput,
        inputs: &mut mpsc::Receiver<OwnerInput>,
    ) -> Result<Batch, NodeError> {
        let mut batch = Batch::default();
        let mut next = Some(first);
        while let Some(input) = next.take() {
            match input {
                OwnerInput::Shutdown(done) => {
                    batch.shutdown = Some(done);
                    break;
                }
                OwnerInput::Wake => {}
                OwnerInput::PeerRecoveryDone => self.node.peer_recovery_done(),
                OwnerInput::Push { connection, message } => {
                    let id = ConnectionId(connection.id);
                    if connection.is_closed() {
                        self.node.connection_closed(id);
                    }
                    if batch.connection(id).is_none() {
                        batch.connections.push(connection);
                    }
                    let handled = self.node.handle_message(id, message);
                    self.close_refused(&batch);
                    handled?;
                }
                OwnerInput::PeerWal { wal, done } => {
                    let outcome = self.node.handle_peer_wal(&wal)?;
                    batch.peer_wal.push((done, outcome));
                }
            }
            if !self.node.batch_is_full() {
                next = inputs.try_recv().ok();
            }
        }
        Ok(batch)
    }

    /// Sync, retention, status, then the replies and peer WAL outcomes.
    fn finish_batch(&mut self, batch: Batch) -> Result<AfterBatch, NodeError> {
        let sync_started = Instant::now();
        let output = self.node.end_batch();
        self.close_refused(&batch);
        let output = output?;
        let metrics = &self.shared.metrics;
        if output.appends > 0 {
            metrics.sync_seconds.observe(sync_started.elapsed().as_secs_f64());
            metrics.appends_per_sync.observe(output.appends as f64);
        }
        metrics.wal_bytes_written.inc_by(output.proposer_wal_bytes + output.peer_wal_bytes);
        metrics.peer_recovery_bytes.inc_by(output.peer_wal_bytes);
        self.apply_retention()?;
        // Status first: whoever saw an acknowledgement sees a status that
        // covers it.
        let snapshot = snapshot_of(self.node.timeline(), &self.shared.metrics);
        // A proposer just elected is about to stream (from its buffer or
        // Postgres): that counts as streaming for peer recovery, which would
        // otherwise copy into the gap and then hand off, costing the
        // proposer a reconnection.
        let newly_elected =
            snapshot.elected_term.is_some() && snapshot.elected_term != self.snapshot.borrow().elected_term;
        if output.proposer_wal_bytes > 0 || newly_elected {
            *self.shared.last_proposer_wal.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
        self.snapshot.send_replace(snapshot);
        for (id, reply) in output.replies {
            match batch.connection(id) {
                Some(connection) if !connection.is_closed() => connection.reply(&reply),
                _ => {}
            }
        }
        for (done, outcome) in batch.peer_wal {
            let _ = done.send(match outcome {
                PeerWalOutcome::Written => Ok(output.flush_lsn),
                PeerWalOutcome::Refused(error) => Err(error.to_string()),
            });
        }
        if let Some(done) = batch.shutdown {
            self.checkpoint();
            let _ = done.send(());
            return Ok(AfterBatch::Stop);
        }
        Ok(AfterBatch::Continue)
    }

    /// Send the node's refusals to their connections (each closes after it).
    fn close_refused(&mut self, batch: &Batch) {
        while let Some((id, refusal)) = self.node.poll_close() {
            if let RefusalCause::Refused(error) = &refusal.cause {
                tracing::warn!(connection = id.0, "refused: {error}");
            }
            if let Some(connection) = batch.connection(id).filter(|connection| !connection.is_closed()) {
                connection.refuse(pg_error(refusal));
            }
        }
    }

    /// A storage error stopped the node: fail-stop if it is fatal; else the
    /// timeline stops serving until reopened (the node refused the batch's
    /// connections), and so are the connections whose messages were still
    /// queued for this batch (their replies are lost).
    fn stop_after(&self, error: NodeError, inputs: &mut mpsc::Receiver<OwnerInput>) {
        let NodeError::Storage(error) = error else {
            unreachable!("the owner stops at the node's first storage error: {error}")
        };
        if error.is_fatal() {
            fail_stop(&error);
        }
        let refusal = pg_error(Refusal::storage_failed(&error));
        for _ in 0..safekeeper_core::timeline_node::MAX_BATCH_MESSAGES {
            let Ok(OwnerInput::Push { connection, .. }) = inputs.try_recv() else { break };
            if !connection.is_closed() {
                connection.refuse(refusal.clone());
            }
        }
        tracing::error!(timeline = %self.snapshot.borrow().timeline_id, "owner stops after a storage error: {error}");
        self.snapshot.send_modify(|s| s.stopped_by_error = Some(error.to_string()));
    }

    /// Note the consumers' feedback and remove what the retention policy
    /// allows (cheap when nothing is due: a few comparisons per batch).
    fn apply_retention(&mut self) -> Result<(), NodeError> {
        self.node.handle_feedback(Lsn(self.shared.remote_consistent_lsn.load(Ordering::Relaxed)));
        match self.node.apply_retention()? {
            RetentionOutcome::Nothing => {}
            RetentionOutcome::Removed { old_start, new_start } => {
                let segment_bytes = self.node.wal().inner().segment_size().bytes();
                let removed = (new_start - old_start) / segment_bytes;
                self.shared.metrics.removed_segments.inc_by(removed);
                tracing::info!(%old_start, %new_start, removed, "WAL retention removed segments");
            }
            // Removal is housekeeping: WAL acceptance goes on, and the next
            // batch tries again (a segment left behind is only disk space).
            RetentionOutcome::Failed(error) => tracing::warn!("WAL retention failed, will retry: {error}"),
        }
        Ok(())
    }

    fn checkpoint(&mut self) {
        match self.node.checkpoint() {
            Ok(()) => {}
            Err(NodeError::Storage(error)) if error.is_fatal() => fail_stop(&error),
            Err(error) => tracing::error!("checkpoint at shutdown failed: {error}"),
        }
    }
}

/// The node's refusal as the FATAL error the client reads.
fn pg_error(refusal: Refusal) -> PgError {
    PgError::fatal(refusal.sqlstate, refusal.message)
}
