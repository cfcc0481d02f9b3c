//! Making file system changes durable. A file's own fsync does not cover its
//! directory entry, and a rename is atomic but not durable until the
//! directory is synced: these helpers do both, in the order a crash
//! argument needs (docs/storage.md).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// fsync failed: what is durable is unknown from here on. Callers that
    /// hold acknowledged data treat it as fatal (fail-stop).
    #[error("sync of {what} failed: {source}")]
    SyncFailed { what: String, source: io::Error },
    #[error("no space left on device while {what}")]
    NoSpace { what: String },
    #[error("I/O error on {what}: {source}")]
    Io { what: String, source: io::Error },
}

/// Classify an I/O error: a full disk gets its own variant because the
/// caller can recover from it, other errors name the operation and file.
pub fn classify(what: impl Into<String>, source: io::Error) -> DurableError {
    let what = what.into();
    if source.kind() == io::ErrorKind::StorageFull {
        DurableError::NoSpace { what }
    } else {
        DurableError::Io { what, source }
    }
}

/// fsync a directory so that entries created, renamed or removed in it are
/// durable.
pub fn fsync_dir(dir: &Path) -> Result<(), DurableError> {
    let handle =
        File::open(dir).map_err(|e| classify(format!("opening directory {} to fsync it", dir.display()), e))?;
    handle
        .sync_all()
        .map_err(|source| DurableError::SyncFailed { what: format!("directory {}", dir.display()), source })
}

/// Durably replace `dir/name` with `bytes`: write `dir/tmp_name`, fsync it,
/// rename it over `name`, fsync `dir`. A crash at any point leaves either
/// the old or the new file under `name` (rename is atomic), plus perhaps a
/// stale temp file that the next write truncates.
pub fn write_file_atomically(dir: &Path, name: &str, tmp_name: &str, bytes: &[u8]) -> Result<(), DurableError> {
    let tmp_path = dir.join(tmp_name);
    let describe = |action: &str| format!("{action} {}", tmp_path.display());
    let mut tmp = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp_path)
        .map_err(|e| classify(describe("creating"), e))?;
    tmp.write_all(bytes).map_err(|e| classify(describe("writing"), e))?;
    tmp.sync_all().map_err(|source| DurableError::SyncFailed { what: tmp_path.display().to_string(), source })?;
    drop(tmp);
    let final_path = dir.join(name);
    std::fs::rename(&tmp_path, &final_path)
        .map_err(|e| classify(format!("renaming {} to {}", tmp_path.display(), final_path.display()), e))?;
    fsync_dir(dir)
}

/// Remove `dir/name` if it exists (a temp file a crash left behind), durably.
pub fn remove_stale_file(dir: &Path, name: &str) -> Result<(), DurableError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => fsync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(classify(format!("removing stale {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replacement is whole: the new bytes under the final name, no
    /// temp file left.
    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        write_file_atomically(dir.path(), "f", "f.tmp", b"one").unwrap();
        write_file_atomically(dir.path(), "f", "f.tmp", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"two");
        assert!(!dir.path().join("f.tmp").exists());
    }

    #[test]
    fn removing_a_missing_stale_file_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        remove_stale_file(dir.path(), "absent").unwrap();
        std::fs::write(dir.path().join("stale"), b"x").unwrap();
        remove_stale_file(dir.path(), "stale").unwrap();
        assert!(!dir.path().join("stale").exists());
    }

    #[test]
    fn a_missing_directory_is_an_io_error_naming_it() {
        let err = fsync_dir(Path::new("/nonexistent/dir")).unwrap_err();
        assert!(matches!(err, DurableError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/dir"), "{err}");
    }
}
