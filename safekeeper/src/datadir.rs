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

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::ids::NodeId;
use crate::storage::{write_file_atomically, StorageError};

pub const LOCK_FILE_NAME: &str = "safekeeper.lock";
pub const NODE_ID_FILE_NAME: &str = "safekeeper.id";
const NODE_ID_TMP_FILE_NAME: &str = "safekeeper.id.tmp";
/// Longest node id file we read (a u64 in decimal plus a newline fits).
const MAX_NODE_ID_FILE_BYTES: u64 = 64;
/// Longest pid text we read from someone else's lock file.
const MAX_LOCK_FILE_BYTES: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data directory {dir} is in use by another {program} (pid {holder}); only one process may use a data directory",
        holder = holder_pid.map_or_else(|| "unknown".to_string(), |pid| pid.to_string())
    )]
    Locked { dir: String, program: &'static str, holder_pid: Option<u32> },
    #[error("data directory {dir} belongs to node id {stored}, but this safekeeper was started with --id {requested}")]
    NodeIdMismatch { dir: String, stored: NodeId, requested: NodeId },
    #[error("node id file {path} is damaged: {reason}")]
    BadNodeIdFile { path: String, reason: String },
    #[error("I/O error on {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The held lock on a data directory; released when dropped (or when the
/// process exits).
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl DataDirLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Take the exclusive lock of `datadir`, failing at once if another process
/// (or another handle in this one) holds it.
pub fn lock_data_dir(datadir: &Path) -> Result<DataDirLock, DataDirError> {
    lock_dir(datadir, LOCK_FILE_NAME, "safekeeper")
}

/// Lock `dir` through its file `lock_file_name` (see the module docs); the
/// error names `program` as the holder. Other programs with a data
/// directory (pageserver_stub) use it too.
pub fn lock_dir(dir: &Path, lock_file_name: &str, program: &'static str) -> Result<DataDirLock, DataDirError> {
    let datadir = dir;
    let path = datadir.join(lock_file_name);
    let io_err = |what: &str, source| DataDirError::Io { what: format!("{what} {}", path.display()), source };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err("opening", e))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let holder_pid = read_pid(&mut file);
            return Err(DataDirError::Locked { dir: datadir.display().to_string(), program, holder_pid });
        }
        Err((_, errno)) => return Err(io_err("locking", io::Error::from(errno))),
    };
    // We hold the lock: record our pid for whoever is refused next.
    lock.set_len(0).map_err(|e| io_err("truncating", e))?;
    lock.rewind().map_err(|e| io_err("rewinding", e))?;
    writeln!(*lock, "{}", std::process::id()).map_err(|e| io_err("writing pid to", e))?;
    Ok(DataDirLock { _lock: lock, path })
}

/// The holder's pid, if the file holds one (it may be mid-write).
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(MAX_LOCK_FILE_BYTES).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Check `requested` against the directory's node id, recording it on the
/// first start. Call with the lock held.
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
    fn second_lock_is_refused_naming_the_holder_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open
        // in the same process conflicts just like another process would.
        let err = lock_data_dir(dir.path()).unwrap_err();
        assert!(matches!(err, DataDirError::Locked { holder_pid: Some(pid), .. } if pid == std::process::id()));
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        drop(held);
        lock_data_dir(dir.path()).expect("the lock is free again once dropped");
    }

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
