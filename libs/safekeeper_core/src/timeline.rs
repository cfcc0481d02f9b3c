//! Runs an acceptor against storage: executes its actions in order and
//! releases replies only after they are durable. Synchronous and generic over
//! the storage traits, so tests and the simulation drive the same code the
//! service's per-timeline owner task does.

use crate::acceptor::{
    Acceptor, AcceptorConfig, AcceptorError, DigestToSend, PeerWal, Ready, RecoveredWal, StorageAction,
};
use crate::control::ControlState;
use crate::recovery::{decode_to_end, decoder_at, last_record_start, resume_decoder, RecoveredTimeline};
use crate::retention::RetentionPolicy;
use crate::storage::control_file::FileControlStore;
use crate::storage::memory::{MemoryControlStore, MemoryWalStorage};
use crate::storage::segments::SegmentStorage;
use crate::storage::{ControlStore, StorageError, WalStorage};
use postgres_wal::lsn::Lsn;
use safekeeper_protocol::ids::NodeId;
use safekeeper_protocol::protocol::{AcceptorMessage, ProposerMessage, WalDigestResponse, WalDigester};

#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The proposer sent something the rules refuse; the timeline is intact.
    #[error(transparent)]
    Refused(#[from] AcceptorError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub struct Timeline<W: WalStorage, C: ControlStore> {
    acceptor: Acceptor,
    wal: W,
    control: C,
}

impl<W: WalStorage, C: ControlStore> Timeline<W, C> {
    pub fn new(acceptor: Acceptor, wal: W, control: C) -> Self {
        Timeline { acceptor, wal, control }
    }

    pub fn acceptor(&self) -> &Acceptor {
        &self.acceptor
    }
    pub fn wal(&self) -> &W {
        &self.wal
    }
    pub fn wal_mut(&mut self) -> &mut W {
        &mut self.wal
    }
    pub fn control(&self) -> &C {
        &self.control
    }
    pub fn into_parts(self) -> (Acceptor, W, C) {
        (self.acceptor, self.wal, self.control)
    }

    /// Handle one message. Appends are written but acknowledged only by a
    /// later [`Timeline::sync_and_ack`] (group commit: many appends, one sync).
    pub fn handle(&mut self, message: ProposerMessage) -> Result<Option<AcceptorMessage>, TimelineError> {
        let ready = self.acceptor.handle(message)?;
        if let Some(digest) = ready.digest {
            return self.digest_reply(digest);
        }
        Ok(self.apply(ready)?)
    }

    /// Read and digest durable WAL for a `WalDigestRequest` the acceptor
    /// allowed, unless retention already removed its start.
    fn digest_reply(&mut self, range: DigestToSend) -> Result<Option<AcceptorMessage>, TimelineError> {
        let DigestToSend { term, start_lsn, end_lsn } = range;
        if start_lsn < self.wal.start_lsn() {
            return Err(TimelineError::Refused(AcceptorError::DigestOutOfRange {
                start_lsn,
                end_lsn,
                held_start_lsn: self.wal.start_lsn(),
                flush_lsn: self.acceptor.flush_lsn(),
            }));
        }
        const READ_BYTES: u64 = 1 << 20;
        let mut digester = WalDigester::default();
        let mut buf = vec![0u8; (end_lsn - start_lsn).min(READ_BYTES) as usize];
        let mut lsn = start_lsn;
        while lsn < end_lsn {
            let piece = &mut buf[..(end_lsn - lsn).min(READ_BYTES) as usize];
            self.wal.read(lsn, piece)?;
            digester.update(piece);
            lsn = lsn + piece.len() as u64;
        }
        let digest = digester.finish();
        let segment_size = self.acceptor.state().wal_segment_size;
        let last_record_start_lsn = last_record_start(&mut self.wal, end_lsn, segment_size)?.unwrap_or(Lsn::INVALID);
        Ok(Some(AcceptorMessage::WalDigestResponse(WalDigestResponse {
            term,
            start_lsn,
            end_lsn,
            digest,
            last_record_start_lsn,
        })))
    }

    /// Write committed WAL copied from a peer (peer recovery); durable with
    /// the next [`Timeline::sync_and_ack`].
    pub fn append_peer_wal(&mut self, wal: &PeerWal) -> Result<(), TimelineError> {
        let ready = self.acceptor.handle_peer_wal(wal)?;
        self.apply(ready)?;
        Ok(())
    }

    /// Sync everything written and return the append acknowledgement, if any
    /// append is waiting for one.
    pub fn sync_and_ack(&mut self) -> Result<Option<AcceptorMessage>, TimelineError> {
        if !self.acceptor.ack_pending() && self.wal.flush_lsn() == self.wal.write_lsn() {
            return Ok(None);
        }
        let synced = self.wal.sync()?;
        let ready = self.acceptor.on_synced(synced);
        Ok(self.apply(ready)?)
    }

    /// Persist the control state (used at shutdown).
    pub fn checkpoint(&mut self) -> Result<(), TimelineError> {
        let ready = self.acceptor.checkpoint();
        self.apply(ready)?;
        Ok(())
    }

    /// Retention: note the consumer's confirmed position and remove the
    /// segments `policy` allows. Returns the new first LSN kept when
    /// something was removed. The control file is written first, so the
    /// commit LSN recovery starts decoding from is never in removed WAL, and
    /// the consumer's position survives a restart.
    pub fn apply_retention(
        &mut self,
        remote_consistent_lsn: Lsn,
        policy: &RetentionPolicy,
    ) -> Result<Option<Lsn>, TimelineError> {
        self.acceptor.note_remote_consistent_lsn(remote_consistent_lsn);
        let state = self.acceptor.state();
        let end = policy.removable_end(state.commit_lsn, state.remote_consistent_lsn, state.wal_segment_size);
        if end <= self.wal.start_lsn() {
            return Ok(None);
        }
        self.checkpoint()?;
        assert!(
            end <= self.acceptor.persisted_commit_lsn(),
            "retention would remove WAL at {end}, above the persisted commit LSN {}",
            self.acceptor.persisted_commit_lsn()
        );
        self.wal.remove_below(end)?;
        Ok(Some(end))
    }

    fn apply(&mut self, ready: Ready) -> Result<Option<AcceptorMessage>, StorageError> {
        for action in ready.actions {
            match action {
                StorageAction::InitializeWal { start_lsn } => self.wal.initialize(start_lsn)?,
                StorageAction::RestartEmptyWal { start_lsn } => self.wal.restart_empty(start_lsn)?,
                StorageAction::TruncateWal { end_lsn } => {
                    self.wal.truncate(end_lsn)?;
                    // The acceptor's decoder restarts at the truncation
                    // point; the stored WAL says which record it follows.
                    let decoder = resume_decoder(&mut self.wal, end_lsn, self.acceptor.state().wal_segment_size)?;
                    self.acceptor.resume_decoding_with(decoder);
                }
                StorageAction::WriteWal { start_lsn, wal } => self.wal.write(start_lsn, &wal)?,
                StorageAction::SetPgTimelines(history) => self.wal.set_pg_timelines(&history)?,
                StorageAction::PersistControl(state) => self.control.persist(&state)?,
            }
        }
        Ok(ready.reply)
    }
}

/// A timeline in memory (tests and simulations): storage that keeps
/// written and synced bytes apart.
pub type MemoryTimeline = Timeline<MemoryWalStorage, MemoryControlStore>;

impl MemoryTimeline {
    /// An empty timeline (no WAL yet) with the given control state.
    pub fn empty(node_id: NodeId, state: ControlState) -> MemoryTimeline {
        let acceptor = Acceptor::new(
            node_id,
            AcceptorConfig::default(),
            state,
            RecoveredWal { end_lsn: Lsn::INVALID, decoder: None },
        );
        Timeline::new(acceptor, MemoryWalStorage::new(), MemoryControlStore::default())
    }
}

impl MemoryTimeline {
    /// The process dies and restarts: WAL not synced is lost except the
    /// first `keep_unsynced_bytes` of it (a disk may persist some writes
    /// early), the acceptor restarts from the last persisted control state,
    /// and the end of WAL is found as recovery finds it on disk (decoding
    /// from the persisted commit LSN to the first invalid record, removing
    /// what lies beyond).
    pub fn crash_and_restart(self, keep_unsynced_bytes: usize) -> MemoryTimeline {
        self.crash_and_restart_with(|wal| wal.crash(keep_unsynced_bytes))
    }

    /// As [`Self::crash_and_restart`], with `crash` saying what the crash
    /// left of the WAL (e.g. [`MemoryWalStorage::crash_torn`]).
    pub fn crash_and_restart_with(self, crash: impl FnOnce(&mut MemoryWalStorage)) -> MemoryTimeline {
        let (acceptor, mut wal, control) = self.into_parts();
        let node_id = acceptor.node_id();
        crash(&mut wal);
        let state = control.persisted.clone().unwrap_or_else(|| {
            let fresh = acceptor.state();
            ControlState::new_timeline(fresh.cluster, fresh.pg_version, fresh.wal_segment_size)
        });
        if !state.timeline_start_lsn.is_valid() {
            // WAL initialized but never recorded in the control file: as on
            // disk, nothing in it was acknowledged, so it is rolled back.
            return Timeline::new(
                Acceptor::new(
                    node_id,
                    AcceptorConfig::default(),
                    state,
                    RecoveredWal { end_lsn: Lsn::INVALID, decoder: None },
                ),
                MemoryWalStorage::new(),
                control,
            );
        }
        let segment_size = state.wal_segment_size;
        let wal_start = wal.start_lsn();
        assert!(wal_start.is_valid(), "memory WAL is initialized before its control state records it");
        let scan_start = state.commit_lsn.max(wal_start);
        let mut decoder = decoder_at(scan_start, wal_start, segment_size);
        let written_end = wal.write_lsn();
        decode_to_end(&mut wal, &mut decoder, written_end).expect("memory storage does not fail");
        let end = decoder.boundary_lsn();
        wal.truncate(end).expect("memory storage does not fail");
        let decoder = resume_decoder(&mut wal, end, segment_size).expect("memory storage does not fail");
        let recovered = RecoveredWal { end_lsn: end, decoder: Some(decoder) };
        Timeline::new(Acceptor::new(node_id, AcceptorConfig::default(), state, recovered), wal, control)
    }
}

/// A timeline on disk: segment files and a control file.
pub type FileTimeline = Timeline<SegmentStorage, FileControlStore>;

impl FileTimeline {
    /// The timeline a restart resumes with, from what recovery found.
    pub fn from_recovered(recovered: RecoveredTimeline, node_id: NodeId, config: AcceptorConfig) -> FileTimeline {
        let wal = RecoveredWal { end_lsn: recovered.end_lsn, decoder: recovered.decoder };
        let acceptor = Acceptor::new(node_id, config, recovered.control, wal);
        Timeline::new(acceptor, recovered.storage, recovered.control_store)
    }
}
