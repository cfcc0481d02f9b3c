//! The data directory: one safekeeper process per directory (a lock file)
//! and a fixed node id (an id file).
//!
//! - `safekeeper.lock` is locked with `flock(LOCK_EX | LOCK_NB)` for the
//!   lifetime of the process; the kernel drops the lock when the process
//!   dies, however it dies, so a stale file never blocks a restart. The
//!   holder writes its pid into the file so a second process can say who
//!   holds it.
//! - `safekeeper.id` holds the node id as decimal text. It is written
//!   atomically on first start; later starts must pass the same id, because
//!   peers know this directory's WAL under that id.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

pub use utils::dir_lock::{lock_dir, DirLock, LockError};
use utils::durable::{write_file_atomically, DurableError};

use safekeeper_protocol::ids::NodeId;

pub const LOCK_FILE_NAME: &str = "safekeeper.lock";
pub const NODE_ID_FILE_NAME: &str = "safekeeper.id";
const NODE_ID_TMP_FILE_NAME: &str = "safekeeper.id.tmp";
/// Longest node id file we read (a u64 in decimal plus a newline fits).
const MAX_NODE_ID_FILE_BYTES: u64 = 64;
/// Longest pid text we read from someone else's lock file.

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("data directory {dir} belongs to node id {stored}, but this safekeeper was started with --id {requested}")]
    NodeIdMismatch { dir: String, stored: NodeId, requested: NodeId },
    #[error("node id file {path} is damaged: {reason}")]
    BadNodeIdFile { path: String, reason: String },
    #[error("I/O error on {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Write(#[from] DurableError),
}

/// The held lock on a data directory; released when dropped (or when the
/// process exits).
pub fn lock_data_dir(datadir: &Path) -> Result<DirLock, DataDirError> {
    Ok(lock_dir(datadir, LOCK_FILE_NAME, "safekeeper")?)
}

pub fn ensure_node_id(datadir: &Path, requested: NodeId) -> Result<(), DataDirError> {
    let path = datadir.join(NODE_ID_FILE_NAME);
    let stored = match File::open(&path) {
        Ok(file) => read_node_id(file, &path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let text = format!("{}\n", requested.0);
            write_file_atomically(datadir, NODE_ID_FILE_NAME, NODE_ID_TMP_FILE_NAME, text.as_bytes())?;
            return Ok(());
        }
        Err(source) => return Err(DataDirError::Io { what: format!("opening {}", path.display()), source }),
    };
    if stored != requested {
        return Err(DataDirError::NodeIdMismatch { dir: datadir.display().to_string(), stored, requested });
    }
    Ok(())
}

fn read_node_id(file: File, path: &Path) -> Result<NodeId, DataDirError> {
    let bad = |reason: String| DataDirError::BadNodeIdFile { path: path.display().to_string(), reason };
    let mut bytes = Vec::new();
    file.take(MAX_NODE_ID_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|source| DataDirError::Io { what: format!("reading {}", path.display()), source })?;
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8 text".to_string()))?;
    let id = text.trim_end_matches('\n');
    id.parse::<u64>().map(NodeId).map_err(|_| bad(format!("expected a decimal node id, found {id:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_recorded_then_enforced() {
        let dir = tempfile::tempdir().unwrap();
        ensure_node_id(dir.path(), NodeId(7)).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join(NODE_ID_FILE_NAME)).unwrap(), "7\n");
        ensure_node_id(dir.path(), NodeId(7)).unwrap();
        let err = ensure_node_id(dir.path(), NodeId(8)).unwrap_err();
        assert!(matches!(err, DataDirError::NodeIdMismatch { stored: NodeId(7), requested: NodeId(8), .. }), "{err}");
        assert!(err.to_string().contains("--id 8"), "{err}");
    }

    #[test]
    fn damaged_node_id_file_is_an_error_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_ID_FILE_NAME);
        std::fs::write(&path, "seven\n").unwrap();
        let err = ensure_node_id(dir.path(), NodeId(7)).unwrap_err();
        assert!(matches!(err, DataDirError::BadNodeIdFile { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "seven\n");
    }
}
