//! Durable storage of one timeline: WAL segments and the control file.
//!
//! The acceptor never touches storage itself: it emits actions that a driver
//! executes against these traits (see `crate::timeline`). Two implementations
//! exist: files on disk (`segments`, `control_file`) and memory (`memory`),
//! the latter able to simulate a crash that loses unsynced bytes. `sync_delay`
//! wraps either to slow its syncs (fault injection for tests).

pub mod control_file;
pub mod memory;
pub mod reader;
pub mod segments;
pub mod sync_delay;

use std::io;
use std::path::Path;

use utils::durable::{self, DurableError};

use crate::control::ControlState;
use postgres_wal::lsn::Lsn;
use postgres_wal::timeline_history::PgTimelineHistory;

/// Proof that WAL up to `lsn` is durable. Only storage implementations in
/// this crate construct it, so "durable before acknowledged" is in the types:
/// the acceptor releases a flush acknowledgement only in exchange for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncedLsn(Lsn);

impl SyncedLsn {
    pub(crate) fn new(lsn: Lsn) -> Self {
        SyncedLsn(lsn)
    }
    pub fn lsn(self) -> Lsn {
        self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// fsync/msync/fdatasync failed. Fatal by design (fail-stop): the page
    /// cache state after a failed sync is unknown, so we must not go on.
    #[error("FATAL: sync of {what} failed: {source}; the safekeeper stops (fail-stop) because it can no longer know what is durable")]
    SyncFailed { what: String, source: std::io::Error },
    #[error("I/O error on {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("write at {start} does not continue the WAL at {write_lsn}")]
    NotContiguous { start: Lsn, write_lsn: Lsn },
    #[error("WAL range {start}..{end} is not on disk (kept: {kept_start}..{kept_end})")]
    RangeNotAvailable { start: Lsn, end: Lsn, kept_start: Lsn, kept_end: Lsn },
    /// A segment file that should exist is gone: removed by retention
    /// while a consumer was about to read it.
    #[error("segment file {path} was removed (WAL retention)")]
    SegmentRemoved { path: String },
    #[error("segment file {path} is corrupt: {reason}")]
    CorruptSegment { path: String, reason: String },
    #[error("control file {path} is corrupt: {reason}")]
    CorruptControlFile { path: String, reason: String },
    #[error("no space left on device while {what}; nothing acknowledged was lost")]
    NoSpace { what: String },
}

impl StorageError {
    /// Errors after which the process must stop instead of carrying on.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StorageError::SyncFailed { .. })
    }
}

/// The WAL of one timeline: a contiguous byte range `[start_lsn, write_lsn)`,
/// of which `[start_lsn, flush_lsn)` is durable.
pub trait WalStorage {
    /// First LSN held (a segment start), or `Lsn(0)` for an empty timeline.
    fn start_lsn(&self) -> Lsn;
    /// End of the bytes written (durable or not).
    fn write_lsn(&self) -> Lsn;
    /// End of the bytes known durable.
    fn flush_lsn(&self) -> Lsn;
    /// Start an empty timeline at `start` (a segment start). Durable on return.
    fn initialize(&mut self, start: Lsn) -> Result<(), StorageError>;
    /// Drop a WAL that holds nothing beyond its start (nothing was ever
    /// written) and start it empty at `start`, a later segment start: a new
    /// safekeeper bootstrapped from a peer that no longer keeps the WAL at
    /// the old start. Durable on return. The old segments go first, so a
    /// crash midway leaves no segment or only the new one; the control file
    /// names `start` before this runs, and recovery finishes the job (see
    /// `crate::recovery`).
    fn restart_empty(&mut self, start: Lsn) -> Result<(), StorageError>;
    /// Append bytes at exactly `write_lsn()`; not durable until `sync`.
    /// Never crosses a segment boundary (the caller splits).
    fn write(&mut self, start: Lsn, bytes: &[u8]) -> Result<(), StorageError>;
    /// Make everything written durable: one sync for all writes since the last.
    fn sync(&mut self) -> Result<SyncedLsn, StorageError>;
    /// Durably remove every byte at or above `end` (zero-filled, synced) and
    /// set write/flush to `end`.
    fn truncate(&mut self, end: Lsn) -> Result<(), StorageError>;
    /// Read `buf.len()` bytes starting at `start`, all below `write_lsn()`.
    fn read(&mut self, start: Lsn, buf: &mut [u8]) -> Result<(), StorageError>;
    /// Durably remove the WAL below `end` (a segment start at or below the
    /// flush LSN's segment): whole segments only, oldest first, so what
    /// remains is contiguous even after a crash midway. Retention calls it;
    /// what is removed is gone for good.
    fn remove_below(&mut self, end: Lsn) -> Result<(), StorageError>;
    /// Name what is stored after `history` (which Postgres timeline wrote
    /// which LSNs) and keep its history file; durable on return.
    fn set_pg_timelines(&mut self, history: &PgTimelineHistory) -> Result<(), StorageError>;
}

/// Where the control state lives durably.
pub trait ControlStore {
    /// Atomically and durably replace the stored state.
    fn persist(&mut self, state: &ControlState) -> Result<(), StorageError>;
}

impl From<DurableError> for StorageError {
    fn from(error: DurableError) -> Self {
        match error {
            DurableError::SyncFailed { what, source } => StorageError::SyncFailed { what, source },
            DurableError::NoSpace { what } => StorageError::NoSpace { what },
            DurableError::Io { what, source } => StorageError::Io { what, source },
        }
    }
}

/// Classify an I/O error: a full disk gets its own variant because the
/// caller can recover from it (nothing acknowledged is lost), other errors
/// are reported with `what` naming the operation and file.
pub(crate) fn io_error(what: impl Into<String>, source: io::Error) -> StorageError {
    durable::classify(what, source).into()
}

/// fsync a directory so that entries created, renamed or removed in it are
/// durable (`utils::durable`, with a failed sync as a fatal [`StorageError`]).
pub fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    Ok(durable::fsync_dir(dir)?)
}

/// Durably replace `dir/name` with `bytes` (`utils::durable`).
pub fn write_file_atomically(dir: &Path, name: &str, tmp_name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    Ok(durable::write_file_atomically(dir, name, tmp_name, bytes)?)
}

/// Remove `dir/name` if it exists (a temp file a crash left behind), durably.
pub(crate) fn remove_stale_file(dir: &Path, name: &str) -> Result<(), StorageError> {
    Ok(durable::remove_stale_file(dir, name)?)
}
