//! The durable state: where decoding stopped and what it counted.
//!
//! One small JSON file in the data directory, replaced atomically: written to
//! a temp file, fsynced, renamed over the old one, then the directory is
//! fsynced so the rename itself is durable. A crash at any point leaves
//! either the old file or the new one, never a mix (docs/pageserver-stub.md
//! has the full crash argument). A lock file keeps a second stub off the
//! same directory, because two writers would each save their own counts.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use safekeeper_protocol::ids::{TenantId, TimelineId};
use serde::{Deserialize, Serialize};
use utils::dir_lock::{lock_dir, DirLock, LockError};
use utils::durable::{write_file_atomically, DurableError};

use crate::stats::{Counter, WalStats};

pub const STATE_FILE_NAME: &str = "pageserver_stub.state.json";
const STATE_TMP_FILE_NAME: &str = "pageserver_stub.state.json.tmp";
pub const LOCK_FILE_NAME: &str = "pageserver_stub.lock";
/// Bump when the meaning of a field changes; older files are refused.
pub const STATE_FORMAT_VERSION: u32 = 1;
/// Far beyond any real WAL position (2^62 bytes); a larger saved position is
/// damage, and arithmetic on it could overflow.
const MAX_PLAUSIBLE_LSN: Lsn = Lsn(1 << 62);
/// A valid state file is a few KiB (at most 256 counters); anything much
/// larger is not ours, and reading it whole would be a memory hazard.
const MAX_STATE_FILE_BYTES: u64 = 1 << 20;

/// The state file's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub format_version: u32,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    /// Postgres's database system identifier of the WAL.
    pub system_id: u64,
    pub wal_seg_size_bytes: u64,
    /// The decoder's record boundary: every record ending at or before it is
    /// counted below, none after it. Decoding resumes here.
    pub last_record_end_lsn: Lsn,
    pub records: u64,
    pub bytes: u64,
    /// Counters by pg_waldump's resource manager name.
    pub per_rmgr: BTreeMap<String, Counter>,
}

/// The cluster a state file must belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub system_id: u64,
    pub segment_size: WalSegmentSize,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path} is corrupt ({reason}); refusing to guess where decoding stopped: move it away to start over from the beginning of the timeline")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state file {path} belongs to {what} {saved}, but the safekeepers serve {served}: this data directory is for another cluster or timeline")]
    IdentityMismatch { path: PathBuf, what: &'static str, saved: String, served: String },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("saving the state file: {0}")]
    Save(#[from] DurableError),
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { action, path, source }
}

impl SavedState {
    pub fn new(identity: Identity, last_record_end_lsn: Lsn, stats: &WalStats) -> SavedState {
        let total = stats.total();
        SavedState {
            format_version: STATE_FORMAT_VERSION,
            tenant_id: identity.tenant_id,
            timeline_id: identity.timeline_id,
            system_id: identity.system_id,
            wal_seg_size_bytes: identity.segment_size.bytes(),
            last_record_end_lsn,
            records: total.records,
            bytes: total.bytes,
            per_rmgr: stats.by_name(),
        }
    }

    /// The counters, rebuilt; valid for a state that passed [`load`].
    pub fn stats(&self) -> WalStats {
        WalStats::from_names(&self.per_rmgr).unwrap_or_default()
    }

    /// Refuse a state saved for another cluster, timeline or segment size.
    pub fn check_identity(&self, served: &Identity, path: &Path) -> Result<(), StateError> {
        let mismatch = |what: &'static str, saved: String, served: String| {
            Err(StateError::IdentityMismatch { path: path.to_path_buf(), what, saved, served })
        };
        if self.tenant_id != served.tenant_id {
            return mismatch("tenant", self.tenant_id.to_string(), served.tenant_id.to_string());
        }
        if self.timeline_id != served.timeline_id {
            return mismatch("timeline", self.timeline_id.to_string(), served.timeline_id.to_string());
        }
        if self.system_id != served.system_id {
            return mismatch("database system id", self.system_id.to_string(), served.system_id.to_string());
        }
        if self.wal_seg_size_bytes != served.segment_size.bytes() {
            let served_bytes = served.segment_size.bytes();
            return mismatch("WAL segment size", self.wal_seg_size_bytes.to_string(), served_bytes.to_string());
        }
        Ok(())
    }

    /// Internal consistency: what a truncated or hand-edited file breaks.
    fn validate(&self) -> Result<(), String> {
        if self.format_version != STATE_FORMAT_VERSION {
            return Err(format!("format version {}, this build reads {STATE_FORMAT_VERSION}", self.format_version));
        }
        WalSegmentSize::new(self.wal_seg_size_bytes).map_err(|e| e.to_string())?;
        if !self.last_record_end_lsn.is_valid() || self.records == 0 {
            // A state is saved only after a record was decoded.
            return Err("it records no decoded record".to_string());
        }
        if self.last_record_end_lsn > MAX_PLAUSIBLE_LSN {
            return Err(format!("position {} is beyond any WAL ever written", self.last_record_end_lsn));
        }
        let stats = WalStats::from_names(&self.per_rmgr).map_err(|e| e.to_string())?;
        let total = stats.total();
        if (total.records, total.bytes) != (self.records, self.bytes) {
            return Err(format!(
                "totals say {} records / {} bytes but the per-rmgr counters add up to {total}",
                self.records, self.bytes
            ));
        }
        Ok(())
    }
}

pub fn state_file_path(datadir: &Path) -> PathBuf {
    datadir.join(STATE_FILE_NAME)
}

/// Read the state file: `None` if there is none (a first start), an error
/// if it cannot be trusted.
pub fn load(datadir: &Path) -> Result<Option<SavedState>, StateError> {
    let path = state_file_path(datadir);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("opening", &path)(e)),
    };
    let mut text = Vec::new();
    file.take(MAX_STATE_FILE_BYTES + 1).read_to_end(&mut text).map_err(io_error("reading", &path))?;
    let corrupt = |reason: String| StateError::Corrupt { path: path.clone(), reason };
    if text.len() as u64 > MAX_STATE_FILE_BYTES {
        return Err(corrupt(format!("larger than {MAX_STATE_FILE_BYTES} bytes")));
    }
    let state: SavedState = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    state.validate().map_err(corrupt)?;
    Ok(Some(state))
}

/// Replace the state file atomically and durably (temp file, fsync,
/// rename, directory fsync: a crash leaves the old or the new state).
pub fn save(datadir: &Path, state: &SavedState) -> Result<(), StateError> {
    let mut text = serde_json::to_vec_pretty(state).expect("a SavedState always serializes");
    text.push(b'\n');
    Ok(write_file_atomically(datadir, STATE_FILE_NAME, STATE_TMP_FILE_NAME, &text)?)
}

/// Create `datadir` if needed and lock it (flock, released however the
/// process dies), failing at once if another process holds the lock: two
/// stubs would each save their own counts.
pub fn lock_data_dir(datadir: &Path) -> Result<DirLock, StateError> {
    std::fs::create_dir_all(datadir).map_err(io_error("creating", datadir))?;
    Ok(lock_dir(datadir, LOCK_FILE_NAME, "pageserver_stub")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            tenant_id: "0123456789abcdef0123456789abcdef".parse().unwrap(),
            timeline_id: "fedcba9876543210fedcba9876543210".parse().unwrap(),
            system_id: 7_300_000_000_000_000_001,
            segment_size: WalSegmentSize::DEFAULT,
        }
    }

    fn sample_state() -> SavedState {
        let mut per_rmgr = BTreeMap::new();
        per_rmgr.insert("Heap".to_string(), Counter { records: 3, bytes: 300 });
        per_rmgr.insert("Transaction".to_string(), Counter { records: 1, bytes: 34 });
        SavedState {
            format_version: STATE_FORMAT_VERSION,
            tenant_id: identity().tenant_id,
            timeline_id: identity().timeline_id,
            system_id: identity().system_id,
            wal_seg_size_bytes: identity().segment_size.bytes(),
            last_record_end_lsn: Lsn(0x0100_0400),
            records: 4,
            bytes: 334,
            per_rmgr,
        }
    }

    #[test]
    fn round_trips_and_a_missing_file_is_a_first_start() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let state = sample_state();
        save(dir.path(), &state).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(state.clone()));
        assert_eq!(state.stats().total(), Counter { records: 4, bytes: 334 });
        // Saving goes through the temp file, which the rename consumes.
        assert!(!dir.path().join(STATE_TMP_FILE_NAME).exists());
    }

    /// A file that does not parse, is truncated, or whose totals disagree
    /// with its counters is refused with a message naming the file.
    #[test]
    fn corrupt_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &sample_state()).unwrap();
        let good = std::fs::read(state_file_path(dir.path())).unwrap();
        let mut inconsistent = sample_state();
        inconsistent.records += 1;
        let mut unknown_rmgr = sample_state();
        unknown_rmgr.per_rmgr.insert("Heap3".to_string(), Counter::default());
        let mut never_decoded = sample_state();
        never_decoded.last_record_end_lsn = Lsn::INVALID;
        let mut implausible = sample_state();
        implausible.last_record_end_lsn = Lsn(u64::MAX - 8);
        let bad_files: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            good[..good.len() / 2].to_vec(),
            Vec::new(),
            serde_json::to_vec(&inconsistent).unwrap(),
            serde_json::to_vec(&unknown_rmgr).unwrap(),
            serde_json::to_vec(&never_decoded).unwrap(),
            serde_json::to_vec(&implausible).unwrap(),
            String::from_utf8(good.clone()).unwrap().replace("\"records\": 4", "\"records\": \"4\"").into_bytes(),
        ];
        for bad in bad_files {
            std::fs::write(state_file_path(dir.path()), &bad).unwrap();
            let error = load(dir.path()).unwrap_err();
            assert!(matches!(error, StateError::Corrupt { .. }), "{error}");
            assert!(error.to_string().contains(STATE_FILE_NAME), "{error}");
        }
    }

    /// A crash before the rename leaves a temp file and the old state: the
    /// old state is what loads, and the next save replaces both.
    #[test]
    fn replacement_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let old = sample_state();
        save(dir.path(), &old).unwrap();
        std::fs::write(dir.path().join(STATE_TMP_FILE_NAME), b"{\"half\": ").unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(old.clone()));
        let mut new = old.clone();
        new.last_record_end_lsn = Lsn(0x0200_0000);
        new.per_rmgr.get_mut("Heap").unwrap().records += 1;
        new.records += 1;
        save(dir.path(), &new).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(new));
        assert!(!dir.path().join(STATE_TMP_FILE_NAME).exists());
    }

    #[test]
    fn identity_mismatches_are_refused() {
        let path = Path::new("/data/pageserver_stub.state.json");
        let state = sample_state();
        state.check_identity(&identity(), path).unwrap();
        let other_system = Identity { system_id: 42, ..identity() };
        let error = state.check_identity(&other_system, path).unwrap_err();
        assert!(error.to_string().contains("database system id 7300000000000000001"), "{error}");
        assert!(error.to_string().contains("serve 42"), "{error}");
        let other_size = Identity { segment_size: WalSegmentSize::new(1 << 20).unwrap(), ..identity() };
        assert!(matches!(state.check_identity(&other_size, path), Err(StateError::IdentityMismatch { .. })));
    }

    #[test]
    fn a_second_lock_holder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let datadir = dir.path().join("new");
        let _held = lock_data_dir(&datadir).unwrap();
        let error = lock_data_dir(&datadir).unwrap_err();
        assert!(error.to_string().contains(&format!("pid {}", std::process::id())), "{error}");
    }
}
