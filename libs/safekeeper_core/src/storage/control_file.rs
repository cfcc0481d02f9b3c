//! The control file: the acceptor's durable state for one timeline.
//!
//! Layout (all integers little-endian):
//!
//! | offset        | size | field                                   |
//! |---------------|------|-----------------------------------------|
//! | 0             | 4    | magic [`CONTROL_FILE_MAGIC`]            |
//! | 4             | 4    | format version [`CONTROL_FORMAT_VERSION`] |
//! | 8             | 4    | body length N (≤ [`MAX_CONTROL_BODY_BYTES`]) |
//! | 12            | N    | body: JSON of [`ControlState`]          |
//! | 12 + N        | 4    | CRC-32C of bytes `[0, 12 + N)`          |
//!
//! The file is replaced atomically (temp file, fsync, rename, directory
//! fsync), so after a crash it holds the old or the new state, never a mix.
//! A file that fails any check is reported, never repaired or overwritten
//! by loading: an operator decides what to do with it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{io_error, remove_stale_file, write_file_atomically, ControlStore, StorageError};
use crate::control::ControlState;

pub const CONTROL_FILE_NAME: &str = "safekeeper.control";
pub const CONTROL_TMP_FILE_NAME: &str = "safekeeper.control.tmp";
/// "SAFEC7L1" squeezed into hex: identifies our control files.
pub const CONTROL_FILE_MAGIC: u32 = 0x5AFE_C7F1;
pub const CONTROL_FORMAT_VERSION: u32 = 1;
/// magic + version + body length.
pub const CONTROL_HEADER_BYTES: usize = 12;
pub const CONTROL_CRC_BYTES: usize = 4;
/// Bounds the body (a term history of `MAX_TERM_HISTORY_ENTRIES` is far
/// smaller) so a corrupt length can never make us allocate gigabytes.
pub const MAX_CONTROL_BODY_BYTES: usize = 16 << 20;
pub const MAX_CONTROL_FILE_BYTES: usize = CONTROL_HEADER_BYTES + MAX_CONTROL_BODY_BYTES + CONTROL_CRC_BYTES;

const _: () = assert!(CONTROL_HEADER_BYTES == 3 * size_of::<u32>());
const _: () = assert!(CONTROL_CRC_BYTES == size_of::<u32>());
const _: () = assert!(MAX_CONTROL_FILE_BYTES <= u32::MAX as usize);

/// Why a control file's bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlDecodeError {
    #[error("file is {len_bytes} bytes, shorter than the {min_bytes}-byte header and checksum")]
    TooShort { len_bytes: usize, min_bytes: usize },
    #[error("file is larger than the maximum control file size of {MAX_CONTROL_FILE_BYTES} bytes")]
    TooLong,
    #[error("bad magic {found:#010X}, expected {CONTROL_FILE_MAGIC:#010X}: not a safekeeper control file")]
    BadMagic { found: u32 },
    #[error("unknown format version {found}, this safekeeper reads version {CONTROL_FORMAT_VERSION}")]
    UnknownVersion { found: u32 },
    #[error("body length {body_len_bytes} exceeds the maximum {MAX_CONTROL_BODY_BYTES}")]
    BodyTooLong { body_len_bytes: u32 },
    #[error("file is {len_bytes} bytes but its header says {expected_bytes} (truncated or trailing garbage)")]
    WrongLength { len_bytes: usize, expected_bytes: usize },
    #[error("CRC-32C mismatch: stored {stored:#010X}, computed {computed:#010X}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("body does not parse: {reason}")]
    BadBody { reason: String },
    #[error("term history is not well formed (terms must increase, start LSNs must not decrease)")]
    BadTermHistory,
}

/// Serialize `state` into the file format.
pub fn encode_control_file(state: &ControlState) -> Vec<u8> {
    let body = serde_json::to_vec(state).expect("a ControlState always serializes");
    assert!(body.len() <= MAX_CONTROL_BODY_BYTES, "control state of {} bytes exceeds the bound", body.len());
    let mut bytes = Vec::with_capacity(CONTROL_HEADER_BYTES + body.len() + CONTROL_CRC_BYTES);
    bytes.extend_from_slice(&CONTROL_FILE_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&CONTROL_FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&body);
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Parse and check the file format; every field is checked before use.
pub fn decode_control_file(bytes: &[u8]) -> Result<ControlState, ControlDecodeError> {
    let min_bytes = CONTROL_HEADER_BYTES + CONTROL_CRC_BYTES;
    if bytes.len() < min_bytes {
        return Err(ControlDecodeError::TooShort { len_bytes: bytes.len(), min_bytes });
    }
    if bytes.len() > MAX_CONTROL_FILE_BYTES {
        return Err(ControlDecodeError::TooLong);
    }
    let u32_at = |offset: usize| u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
    let magic = u32_at(0);
    if magic != CONTROL_FILE_MAGIC {
        return Err(ControlDecodeError::BadMagic { found: magic });
    }
    let version = u32_at(4);
    if version != CONTROL_FORMAT_VERSION {
        return Err(ControlDecodeError::UnknownVersion { found: version });
    }
    let body_len_bytes = u32_at(8);
    if body_len_bytes as usize > MAX_CONTROL_BODY_BYTES {
        return Err(ControlDecodeError::BodyTooLong { body_len_bytes });
    }
    let crc_offset = CONTROL_HEADER_BYTES + body_len_bytes as usize;
    let expected_bytes = crc_offset + CONTROL_CRC_BYTES;
    if bytes.len() != expected_bytes {
        return Err(ControlDecodeError::WrongLength { len_bytes: bytes.len(), expected_bytes });
    }
    let stored = u32_at(crc_offset);
    let computed = crc32c::crc32c(&bytes[..crc_offset]);
    if stored != computed {
        return Err(ControlDecodeError::CrcMismatch { stored, computed });
    }
    let state: ControlState = serde_json::from_slice(&bytes[CONTROL_HEADER_BYTES..crc_offset])
        .map_err(|e| ControlDecodeError::BadBody { reason: e.to_string() })?;
    if !state.term_history.is_well_formed() {
        return Err(ControlDecodeError::BadTermHistory);
    }
    Ok(state)
}

/// The control file of one timeline directory.
pub struct FileControlStore {
    dir: PathBuf,
    persists: u64,
}

impl FileControlStore {
    /// A store writing into `dir`. Removes a temp file left by a write that
    /// crashed before its rename (it was never the control file).
    pub fn new(dir: &Path) -> Result<Self, StorageError> {
        remove_stale_file(dir, CONTROL_TMP_FILE_NAME)?;
        Ok(FileControlStore { dir: dir.to_path_buf(), persists: 0 })
    }

    /// The state stored in `dir`, or `None` if there is no control file (a
    /// new timeline). Read-only: a bad file is reported as
    /// `CorruptControlFile` and left exactly as it is.
    pub fn load(dir: &Path) -> Result<Option<ControlState>, StorageError> {
        let path = dir.join(CONTROL_FILE_NAME);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(format!("opening {}", path.display()), e)),
        };
        // Read at most one byte more than the largest valid file, so an
        // oversized file is reported without being read whole.
        let mut bytes = Vec::new();
        file.take(MAX_CONTROL_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error(format!("reading {}", path.display()), e))?;
        decode_control_file(&bytes)
            .map(Some)
            .map_err(|e| StorageError::CorruptControlFile { path: path.display().to_string(), reason: e.to_string() })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(CONTROL_FILE_NAME)
    }

    /// Number of successful `persist` calls (for tests and metrics).
    pub fn persist_count(&self) -> u64 {
        self.persists
    }
}

impl ControlStore for FileControlStore {
    fn persist(&mut self, state: &ControlState) -> Result<(), StorageError> {
        write_file_atomically(&self.dir, CONTROL_FILE_NAME, CONTROL_TMP_FILE_NAME, &encode_control_file(state))?;
        self.persists += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{TermHistory, TermStart};
    use postgres_wal::lsn::{Lsn, WalSegmentSize};
    use rand::{Rng, SeedableRng};
    use safekeeper_protocol::ids::{ClusterId, SystemId, Term};
    use std::fs;

    fn state(term: u64) -> ControlState {
        ControlState {
            cluster: ClusterId { system_id: SystemId(7_000_000_000_000_000_001), ..Default::default() },
            pg_version: 150_000,
            wal_segment_size: WalSegmentSize::DEFAULT,
            term: Term(term),
            term_history: TermHistory(
                (1..=term).map(|t| TermStart { term: Term(t), start_lsn: Lsn(0x100_0000 * t) }).collect(),
            ),
            timeline_start_lsn: Lsn(0x100_0000),
            commit_lsn: Lsn(0x123_4568),
            remote_consistent_lsn: Lsn(0x80_0000 * term),
            membership: Default::default(),
            pg_timelines: Default::default(),
        }
    }

    fn corrupt_reason(dir: &Path) -> String {
        match FileControlStore::load(dir) {
            Err(StorageError::CorruptControlFile { reason, .. }) => reason,
            other => panic!("expected CorruptControlFile, got {other:?}"),
        }
    }

    /// A well-formed file (magic, version, length, CRC) around any body.
    fn file_around(body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&CONTROL_FILE_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&CONTROL_FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(body);
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Control files written before retention existed have no
    /// remote_consistent_lsn: they load with zero (nothing confirmed).
    #[test]
    fn body_without_remote_consistent_lsn_loads_as_zero() {
        let mut body = serde_json::to_value(state(2)).unwrap();
        body.as_object_mut().unwrap().remove("remote_consistent_lsn");
        let loaded = decode_control_file(&file_around(&serde_json::to_vec(&body).unwrap())).unwrap();
        assert_eq!(loaded, ControlState { remote_consistent_lsn: Lsn::INVALID, ..state(2) });
    }

    #[test]
    fn persists_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FileControlStore::load(dir.path()).unwrap(), None, "no file: a new timeline");
        let mut store = FileControlStore::new(dir.path()).unwrap();
        store.persist(&state(3)).unwrap();
        assert_eq!(FileControlStore::load(dir.path()).unwrap(), Some(state(3)));
        store.persist(&state(4)).unwrap();
        assert_eq!(FileControlStore::load(dir.path()).unwrap(), Some(state(4)));
        assert!(!dir.path().join(CONTROL_TMP_FILE_NAME).exists());
    }

    #[test]
    fn leftover_temp_file_is_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        FileControlStore::new(dir.path()).unwrap().persist(&state(2)).unwrap();
        fs::write(dir.path().join(CONTROL_TMP_FILE_NAME), b"half-written").unwrap();
        assert_eq!(FileControlStore::load(dir.path()).unwrap(), Some(state(2)));
        FileControlStore::new(dir.path()).unwrap();
        assert!(!dir.path().join(CONTROL_TMP_FILE_NAME).exists());
    }

    /// Every single flipped byte is detected, and loading never changes the file.
    #[test]
    fn every_flipped_byte_is_reported_and_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        FileControlStore::new(dir.path()).unwrap().persist(&state(5)).unwrap();
        let path = dir.path().join(CONTROL_FILE_NAME);
        let good = fs::read(&path).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE);
        for position in 0..good.len() {
            let mut bad = good.clone();
            bad[position] ^= rng.gen_range(1..=255u8);
            fs::write(&path, &bad).unwrap();
            let reason = corrupt_reason(dir.path());
            assert!(!reason.is_empty());
            assert_eq!(fs::read(&path).unwrap(), bad, "byte {position}: load must not modify the file");
        }
    }

    #[test]
    fn each_kind_of_damage_has_a_clear_reason() {
        let good = encode_control_file(&state(2));
        let with_crc = |mut bytes: Vec<u8>| {
            let crc_offset = bytes.len() - CONTROL_CRC_BYTES;
            let crc = crc32c::crc32c(&bytes[..crc_offset]);
            bytes[crc_offset..].copy_from_slice(&crc.to_le_bytes());
            bytes
        };
        let set_u32 = |offset: usize, value: u32| {
            let mut bytes = good.clone();
            bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
            bytes
        };
        let mut bad_body = good.clone();
        bad_body[CONTROL_HEADER_BYTES] = b'[';
        let mut bad_history = state(3);
        bad_history.term_history.0.swap(0, 1);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "shorter than"),
            ("truncated", good[..good.len() - 1].to_vec(), "truncated"),
            ("trailing garbage", [good.clone(), vec![0]].concat(), "trailing garbage"),
            ("bad magic", set_u32(0, 0x1234_5678), "bad magic"),
            ("future version", set_u32(4, 2), "unknown format version 2"),
            ("oversized length", set_u32(8, u32::MAX), "exceeds the maximum"),
            ("crc", set_u32(good.len() - 4, 0), "CRC-32C mismatch"),
            ("body", with_crc(bad_body), "does not parse"),
            ("history", encode_control_file(&bad_history), "term history"),
        ];
        for (label, bytes, expected) in cases {
            let err = decode_control_file(&bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{label}: {err:?} should mention {expected:?}");
        }
    }

    #[test]
    fn oversized_file_is_rejected_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTROL_FILE_NAME);
        let mut bytes = encode_control_file(&state(1));
        bytes.resize(MAX_CONTROL_FILE_BYTES + 100, 0);
        fs::write(&path, &bytes).unwrap();
        assert!(corrupt_reason(dir.path()).contains("larger than the maximum"));
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    proptest::proptest! {
        /// Rule: any file content decodes to a state or a typed error.
        #[test]
        fn random_files_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = decode_control_file(&bytes);
        }

        /// A valid header and CRC around a random body: the JSON and the
        /// term-history checks must refuse it cleanly.
        #[test]
        fn random_bodies_with_a_valid_crc_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = decode_control_file(&file_around(&body));
        }
    }
}
