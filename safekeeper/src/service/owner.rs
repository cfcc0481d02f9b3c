//! The single owner of one timeline: a dedicated thread that runs the
//! [`FileTimeline`] driver with group commit.
//!
//! Storage calls block (msync, fdatasync, fsync of the control file), so the
//! owner is an OS thread fed by a bounded tokio channel, not an async task:
//! a slow disk stalls this timeline's thread, never the runtime. One loop
//! iteration is one batch: take everything queued (up to a bound), `handle`
//! each message, one `sync_and_ack`, publish a status snapshot, then hand
//! the replies to the connections (`super::replies`: written directly to an
//! idle connection's socket, else queued for its writer task).
//!
//! Reply routing: a reply produced by `handle` (greeting, vote, elected,
//! heartbeat, a fencing answer) is already durable and goes to its sender;
//! the acknowledgement that `sync_and_ack` releases goes to every connection
//! whose WAL was written in the batch. Replies leave only after the sync, so
//! a connection sees them in the order it sent its messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::errors;
use super::metrics::TimelineMetrics;
use super::peer_recovery::PeerRecoveryStatus;
pub use super::replies::PushConnection;
use crate::acceptor::PeerWal;
use crate::control::TermHistory;
use crate::ids::{SystemId, TenantId, Term, TimelineId};
use crate::lsn::Lsn;
use crate::membership::Configuration;
use crate::protocol::{AcceptorMessage, ProposerMessage};
use crate::retention::RetentionPolicy;
use crate::storage::{StorageError, WalStorage};
use crate::timeline::{FileTimeline, TimelineError};

/// Messages queued for one owner; senders wait when it is full (backpressure
/// on the proposers' connections, not unbounded memory: at most this many
/// messages of at most `MAX_MESSAGE_BYTES` each).
pub const OWNER_QUEUE_MESSAGES: usize = 256;
/// Most messages handled before one sync.
pub const MAX_BATCH_MESSAGES: usize = 64;
/// Most WAL bytes written before one sync, so a batch's latency stays bounded.
pub const MAX_BATCH_WAL_BYTES: usize = 16 << 20;
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
    /// When the owner last wrote WAL a proposer sent (peer recovery stays
    /// out of the way of a proposer that streams).
    pub last_proposer_wal: Mutex<Option<Instant>>,
    /// What peer recovery is doing, for the status API.
    pub peer_recovery: Mutex<PeerRecoveryStatus>,
}

/// What the HTTP status shows of a timeline, as of the owner's last batch.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineSnapshot {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub system_id: SystemId,
    pub pg_version: u32,
    pub wal_seg_size: u64,
    pub term: Term,
    pub last_log_term: Term,
    pub term_history: TermHistory,
    pub timeline_start_lsn: Lsn,
    pub flush_lsn: Lsn,
    pub commit_lsn: Lsn,
    /// The term whose ProposerElected was accepted since the last restart
    /// or vote (WAL is taken only in it).
    pub elected_term: Option<Term>,
    pub remote_consistent_lsn: Lsn,
    /// First WAL byte still on disk (retention removed what is below).
    pub oldest_kept_lsn: Lsn,
    /// Bytes of segment files on disk.
    pub disk_bytes: u64,
    /// Segments removed by retention since this process started.
    pub removed_segments: u64,
    /// Set when a storage error stopped the owner; the next push reopens it.
    pub stopped_by_error: Option<String>,
    /// The safekeeper set as a proposer last wrote it (generation 0: none).
    pub membership: Configuration,
}

impl TimelineSnapshot {
    pub fn segment_size(&self) -> crate::lsn::WalSegmentSize {
        crate::lsn::WalSegmentSize::new(self.wal_seg_size).expect("a timeline's segment size was checked at creation")
    }
}

fn snapshot_of(timeline: &FileTimeline, metrics: &TimelineMetrics) -> TimelineSnapshot {
    let acceptor = timeline.acceptor();
    let state = acceptor.state();
    let wal = timeline.wal();
    TimelineSnapshot {
        tenant_id: state.cluster.tenant_id,
        timeline_id: state.cluster.timeline_id,
        system_id: state.cluster.system_id,
        pg_version: state.pg_version,
        wal_seg_size: state.wal_segment_size.bytes(),
        term: state.term,
        last_log_term: acceptor.last_log_term(),
        term_history: state.term_history.clone(),
        timeline_start_lsn: state.timeline_start_lsn,
        flush_lsn: acceptor.flush_lsn(),
        commit_lsn: acceptor.commit_lsn(),
        elected_term: acceptor.elected_term(),
        remote_consistent_lsn: state.remote_consistent_lsn,
        oldest_kept_lsn: wal.start_lsn(),
        disk_bytes: wal.files_end_lsn().checked_sub(wal.start_lsn()).unwrap_or(0),
        removed_segments: metrics.removed_segments.get(),
        stopped_by_error: None,
        membership: state.membership.clone(),
    }
}

pub struct Owner {
    pub inputs: mpsc::Sender<OwnerInput>,
    pub snapshot: watch::Receiver<TimelineSnapshot>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Start the owner thread of `timeline`.
pub fn spawn_owner(
    timeline: FileTimeline,
    shared: Arc<TimelineShared>,
    retention: RetentionPolicy,
) -> std::io::Result<Owner> {
    let (inputs, receiver) = mpsc::channel(OWNER_QUEUE_MESSAGES);
    let initial = snapshot_of(&timeline, &shared.metrics);
    shared.remote_consistent_lsn.fetch_max(initial.remote_consistent_lsn.0, Ordering::Relaxed);
    let name = format!("owner-{}", &initial.timeline_id.to_string()[..8]);
    let (snapshot_tx, snapshot) = watch::channel(initial);
    let owner = OwnerThread { timeline, shared, retention, snapshot: snapshot_tx, handoff: Handoff::default() };
    let thread = std::thread::Builder::new().name(name).spawn(move || owner.run(receiver))?;
    Ok(Owner { inputs, snapshot, thread })
}

/// Log and exit: after a failed sync nothing can be known to be durable.
pub fn fail_stop(error: &StorageError) -> ! {
    tracing::error!("FATAL: {error}; fail-stop: exiting with code {FAIL_STOP_EXIT_CODE}");
    eprintln!("safekeeper: FATAL: {error}; fail-stop");
    std::process::exit(FAIL_STOP_EXIT_CODE)
}

/// The owner thread's state.
struct OwnerThread {
    timeline: FileTimeline,
    shared: Arc<TimelineShared>,
    retention: RetentionPolicy,
    snapshot: watch::Sender<TimelineSnapshot>,
    handoff: Handoff,
}

/// Connection ids only grow: after peer recovery, every proposer
/// connection at or below the highest id seen is refused once.
#[derive(Default)]
struct Handoff {
    highest_connection_id: u64,
    refuse_up_to: u64,
}

impl OwnerThread {
    fn run(mut self, mut inputs: mpsc::Receiver<OwnerInput>) {
        while let Some(first) = inputs.blocking_recv() {
            let batch = collect_batch(first, &mut inputs);
            if batch.peer_recovery_done {
                self.handoff.refuse_up_to = self.handoff.highest_connection_id;
            }
            let outcome = match process_batch(&mut self.timeline, &batch.items, &self.shared.metrics, &mut self.handoff)
            {
                Ok(outcome) => outcome,
                Err(error) => return self.stop_after(error),
            };
            if outcome.proposer_wal {
                *self.shared.last_proposer_wal.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            }
            if let Err(error) = self.apply_retention() {
                return self.stop_after(error);
            }
            // Status first: whoever saw an acknowledgement sees a status that
            // covers it.
            self.snapshot.send_replace(snapshot_of(&self.timeline, &self.shared.metrics));
            deliver(outcome.replies);
            let flush_lsn = self.timeline.acceptor().flush_lsn();
            for (done, result) in batch.peer_wal_done.into_iter().zip(outcome.peer_wal) {
                let _ = done.send(result.map(|()| flush_lsn));
            }
            if let Some(done) = batch.shutdown {
                checkpoint(&mut self.timeline);
                let _ = done.send(());
                return;
            }
        }
        // Every sender is gone: the service is going away.
        checkpoint(&mut self.timeline);
    }

    fn stop_after(&self, error: StorageError) {
        tracing::error!(timeline = %self.snapshot.borrow().timeline_id, "owner stops after a storage error: {error}");
        self.snapshot.send_modify(|s| s.stopped_by_error = Some(error.to_string()));
    }

    /// Remove what the retention policy allows (cheap when nothing is due:
    /// a few comparisons per batch).
    fn apply_retention(&mut self) -> Result<(), StorageError> {
        let remote_consistent_lsn = Lsn(self.shared.remote_consistent_lsn.load(Ordering::Relaxed));
        let old_start = self.timeline.wal().start_lsn();
        match self.timeline.apply_retention(remote_consistent_lsn, &self.retention) {
            Ok(Some(new_start)) => {
                let segment_bytes = self.timeline.wal().segment_size().bytes();
                let removed = (new_start - old_start) / segment_bytes;
                self.shared.metrics.removed_segments.inc_by(removed);
                tracing::info!(%old_start, %new_start, removed, "WAL retention removed segments");
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(TimelineError::Storage(error)) if error.is_fatal() => fail_stop(&error),
            // Removal is housekeeping: WAL acceptance goes on, and the next
            // batch tries again (a segment left behind is only disk space).
            Err(TimelineError::Storage(error)) => {
                tracing::warn!("WAL retention failed, will retry: {error}");
                Ok(())
            }
            Err(TimelineError::Refused(error)) => unreachable!("retention refuses nothing: {error}"),
        }
    }
}

fn checkpoint(timeline: &mut FileTimeline) {
    match timeline.checkpoint() {
        Ok(()) => {}
        Err(TimelineError::Storage(error)) if error.is_fatal() => fail_stop(&error),
        Err(error) => tracing::error!("checkpoint at shutdown failed: {error}"),
    }
}

struct Batch {
    items: Vec<BatchItem>,
    /// Where each `BatchItem::PeerWal`'s outcome goes, in their order.
    peer_wal_done: Vec<oneshot::Sender<Result<Lsn, String>>>,
    peer_recovery_done: bool,
    shutdown: Option<oneshot::Sender<()>>,
}

/// What one batch handles, in arrival order.
enum BatchItem {
    Push(Arc<PushConnection>, ProposerMessage),
    PeerWal(PeerWal),
}

fn collect_batch(first: OwnerInput, inputs: &mut mpsc::Receiver<OwnerInput>) -> Batch {
    let mut batch = Batch { items: Vec::new(), peer_wal_done: Vec::new(), peer_recovery_done: false, shutdown: None };
    let mut wal_bytes = 0;
    let mut next = Some(first);
    while let Some(input) = next.take() {
        match input {
            OwnerInput::Shutdown(done) => {
                batch.shutdown = Some(done);
                break;
            }
            OwnerInput::Wake => {}
            OwnerInput::PeerRecoveryDone => batch.peer_recovery_done = true,
            OwnerInput::Push { connection, message } => {
                if let ProposerMessage::AppendRequest(append) = &message {
                    wal_bytes += append.wal.len();
                }
                batch.items.push(BatchItem::Push(connection, message));
            }
            OwnerInput::PeerWal { wal, done } => {
                wal_bytes += wal.wal.len();
                batch.items.push(BatchItem::PeerWal(wal));
                batch.peer_wal_done.push(done);
            }
        }
        if batch.items.len() < MAX_BATCH_MESSAGES && wal_bytes < MAX_BATCH_WAL_BYTES {
            next = inputs.try_recv().ok();
        }
    }
    batch
}

/// A reply and the connection it goes to.
type Reply<'a> = (&'a Arc<PushConnection>, AcceptorMessage);

/// What a batch produced: replies to deliver once the status is published,
/// and each peer WAL piece's outcome (in order).
struct BatchOutcome<'a> {
    replies: Vec<Reply<'a>>,
    peer_wal: Vec<Result<(), String>>,
    /// Whether a proposer's WAL was written.
    proposer_wal: bool,
}

/// Handle every item and sync once. A non-fatal storage error is returned
/// (the owner stops); a fatal one ends the process.
fn process_batch<'a>(
    timeline: &mut FileTimeline,
    items: &'a [BatchItem],
    metrics: &TimelineMetrics,
    handoff: &mut Handoff,
) -> Result<BatchOutcome<'a>, StorageError> {
    let mut outcome = BatchOutcome { replies: Vec::new(), peer_wal: Vec::new(), proposer_wal: false };
    let mut awaiting_ack: Vec<&Arc<PushConnection>> = Vec::new();
    let mut appends = 0u64;
    for item in items {
        let (connection, message) = match item {
            BatchItem::Push(connection, message) => (connection, message),
            BatchItem::PeerWal(wal) => {
                match timeline.append_peer_wal(wal) {
                    Ok(()) => {
                        appends += 1;
                        metrics.wal_bytes_written.inc_by(wal.wal.len() as u64);
                        metrics.peer_recovery_bytes.inc_by(wal.wal.len() as u64);
                        outcome.peer_wal.push(Ok(()));
                    }
                    Err(TimelineError::Refused(error)) => outcome.peer_wal.push(Err(error.to_string())),
                    Err(TimelineError::Storage(error)) => return Err(storage_failed(error, items)),
                }
                continue;
            }
        };
        if connection.is_closed() {
            continue;
        }
        handoff.highest_connection_id = handoff.highest_connection_id.max(connection.id);
        if connection.id <= handoff.refuse_up_to {
            connection.refuse(errors::caught_up_by_peers(timeline.acceptor().flush_lsn()));
            continue;
        }
        match timeline.handle(message.clone()) {
            Ok(Some(reply)) => outcome.replies.push((connection, reply)),
            // Only a write returns no reply: its ack comes with the sync.
            Ok(None) => {
                if let ProposerMessage::AppendRequest(append) = message {
                    appends += 1;
                    metrics.wal_bytes_written.inc_by(append.wal.len() as u64);
                    outcome.proposer_wal = true;
                }
                if !awaiting_ack.iter().any(|c| c.id == connection.id) {
                    awaiting_ack.push(connection);
                }
            }
            Err(TimelineError::Refused(error)) => {
                tracing::warn!(connection = connection.id, "refused: {error}");
                connection.refuse(errors::refusal(&error));
            }
            Err(TimelineError::Storage(error)) => return Err(storage_failed(error, items)),
        }
    }
    let sync_started = Instant::now();
    let synced = timeline.sync_and_ack();
    if appends > 0 {
        metrics.sync_seconds.observe(sync_started.elapsed().as_secs_f64());
        metrics.appends_per_sync.observe(appends as f64);
    }
    match synced {
        Ok(Some(ack)) => outcome.replies.extend(awaiting_ack.into_iter().map(|c| (c, ack.clone()))),
        Ok(None) => {}
        Err(TimelineError::Storage(error)) => return Err(storage_failed(error, items)),
        Err(TimelineError::Refused(error)) => unreachable!("sync_and_ack refuses nothing: {error}"),
    }
    Ok(outcome)
}

/// Replies go out in the order their messages came in.
fn deliver(replies: Vec<Reply<'_>>) {
    for (connection, reply) in replies {
        if !connection.is_closed() {
            connection.reply(&reply);
        }
    }
}

/// Fail-stop on a fatal error; otherwise tell every connection of the batch
/// (their replies are lost) and hand the error back.
fn storage_failed(error: StorageError, items: &[BatchItem]) -> StorageError {
    if error.is_fatal() {
        fail_stop(&error);
    }
    let reply = errors::storage_failure(&error);
    for item in items {
        if let BatchItem::Push(connection, _) = item {
            if !connection.is_closed() {
                connection.refuse(reply.clone());
            }
        }
    }
    error
}
