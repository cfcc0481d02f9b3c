//! In-memory storage that separates written from durable bytes.
//!
//! Used by unit/property tests and the simulation: [`MemoryWalStorage::crash`]
//! drops everything not synced, optionally keeping a prefix of the unsynced
//! bytes (a disk may persist some writes before the sync), and
//! `fail_next_sync` makes the next sync fail as an fsync error would.

use crate::control::ControlState;
use crate::storage::{ControlStore, StorageError, SyncedLsn, WalStorage};
use postgres_wal::lsn::Lsn;
use postgres_wal::timeline_history::PgTimelineHistory;

#[derive(Clone, Debug, Default)]
pub struct MemoryWalStorage {
    start_lsn: Lsn,
    /// Bytes from `start_lsn`; `[0, durable_len)` is durable.
    bytes: Vec<u8>,
    durable_len: usize,
    /// Number of syncs, to check group commit.
    pub sync_count: u64,
    /// The next sync fails (`StorageError::SyncFailed`) and durability
    /// stays where it was: a storage fault for tests.
    pub fail_next_sync: bool,
}

impl MemoryWalStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn offset(&self, lsn: Lsn) -> usize {
        usize::try_from(lsn - self.start_lsn).expect("in-memory WAL fits in memory")
    }

    /// Simulate a crash: unsynced bytes are lost except the first
    /// `keep_unsynced_bytes` of them (clamped).
    pub fn crash(&mut self, keep_unsynced_bytes: usize) {
        let keep = self.durable_len.saturating_add(keep_unsynced_bytes).min(self.bytes.len());
        self.bytes.truncate(keep);
        self.durable_len = keep;
    }

    /// Simulate a crash that tore a page write: as [`Self::crash`], but the
    /// kept unsynced bytes from `torn_from` (counted from the durable end)
    /// on hold garbage (a page half new, half stale). Durable bytes are
    /// never torn: a sync made them whole.
    pub fn crash_torn(&mut self, keep_unsynced_bytes: usize, torn_from: usize) {
        let durable = self.durable_len;
        self.crash(keep_unsynced_bytes);
        let start = (durable + torn_from).min(self.bytes.len());
        self.bytes[start..].iter_mut().for_each(|byte| *byte ^= 0xA5);
    }

    /// All bytes held, durable or not, from `start_lsn`.
    pub fn contents(&self) -> &[u8] {
        &self.bytes
    }
}

impl WalStorage for MemoryWalStorage {
    fn start_lsn(&self) -> Lsn {
        self.start_lsn
    }

    fn write_lsn(&self) -> Lsn {
        if self.start_lsn.is_valid() {
            self.start_lsn + self.bytes.len() as u64
        } else {
            Lsn(0)
        }
    }

    fn flush_lsn(&self) -> Lsn {
        if self.start_lsn.is_valid() {
            self.start_lsn + self.durable_len as u64
        } else {
            Lsn(0)
        }
    }

    fn initialize(&mut self, start: Lsn) -> Result<(), StorageError> {
        assert!(!self.start_lsn.is_valid(), "initialize only an empty timeline");
        *self = MemoryWalStorage { start_lsn: start, ..Self::default() };
        Ok(())
    }

    fn restart_empty(&mut self, start: Lsn) -> Result<(), StorageError> {
        assert!(self.start_lsn.is_valid() && self.bytes.is_empty(), "restart only an initialized, empty WAL");
        assert!(start > self.start_lsn, "a restarted WAL starts later");
        *self = MemoryWalStorage { start_lsn: start, sync_count: self.sync_count, ..Self::default() };
        Ok(())
    }

    fn write(&mut self, start: Lsn, bytes: &[u8]) -> Result<(), StorageError> {
        if start != self.write_lsn() {
            return Err(StorageError::NotContiguous { start, write_lsn: self.write_lsn() });
        }
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self) -> Result<SyncedLsn, StorageError> {
        if std::mem::take(&mut self.fail_next_sync) {
            let source = std::io::Error::other("injected fsync failure");
            return Err(StorageError::SyncFailed { what: "in-memory WAL".to_string(), source });
        }
        self.durable_len = self.bytes.len();
        self.sync_count += 1;
        Ok(SyncedLsn::new(self.write_lsn()))
    }

    fn truncate(&mut self, end: Lsn) -> Result<(), StorageError> {
        assert!(end >= self.start_lsn, "truncate inside the timeline");
        let keep = self.offset(end).min(self.bytes.len());
        self.bytes.truncate(keep);
        self.durable_len = self.durable_len.min(keep);
        Ok(())
    }

    fn read(&mut self, start: Lsn, buf: &mut [u8]) -> Result<(), StorageError> {
        let end = start + buf.len() as u64;
        if start < self.start_lsn || end > self.write_lsn() {
            return Err(StorageError::RangeNotAvailable {
                start,
                end,
                kept_start: self.start_lsn,
                kept_end: self.write_lsn(),
            });
        }
        let offset = self.offset(start);
        buf.copy_from_slice(&self.bytes[offset..offset + buf.len()]);
        Ok(())
    }

    fn remove_below(&mut self, end: Lsn) -> Result<(), StorageError> {
        assert!(end <= self.flush_lsn(), "removing WAL at {end} above the flush LSN {}", self.flush_lsn());
        if end <= self.start_lsn {
            return Ok(());
        }
        let removed_bytes = self.offset(end);
        self.bytes.drain(..removed_bytes);
        self.durable_len -= removed_bytes;
        self.start_lsn = end;
        Ok(())
    }

    /// Memory has no file names; the history lives in the control state.
    fn set_pg_timelines(&mut self, _history: &PgTimelineHistory) -> Result<(), StorageError> {
        Ok(())
    }
}

/// The control state as last persisted (the in-memory "file").
#[derive(Clone, Debug, Default)]
pub struct MemoryControlStore {
    pub persisted: Option<ControlState>,
    pub persist_count: u64,
}

impl ControlStore for MemoryControlStore {
    fn persist(&mut self, state: &ControlState) -> Result<(), StorageError> {
        self.persisted = Some(state.clone());
        self.persist_count += 1;
        Ok(())
    }
}
