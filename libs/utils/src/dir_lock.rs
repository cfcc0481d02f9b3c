//! One process per data directory: a lock file held with
//! `flock(LOCK_EX | LOCK_NB)` for the lifetime of the process. The kernel
//! drops the lock when the process dies, however it dies, so a stale file
//! never blocks a restart. The holder writes its pid into the file so a
//! second process can say who holds it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Longest lock file read back for the holder's pid.
const MAX_LOCK_FILE_BYTES: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "data directory {dir} is in use by another {program} (pid {holder}); only one process may use a data directory",
        holder = holder_pid.map_or_else(|| "unknown".to_string(), |pid| pid.to_string())
    )]
    Locked { dir: String, program: &'static str, holder_pid: Option<u32> },
    #[error("I/O error on {what}: {source}")]
    Io { what: String, source: io::Error },
}

/// Held for as long as this value lives.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl DirLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Lock `dir/lock_file_name` for `program`, or say which pid holds it.
pub fn lock_dir(dir: &Path, lock_file_name: &str, program: &'static str) -> Result<DirLock, LockError> {
    let path = dir.join(lock_file_name);
    let io_err = |what: &str, source| LockError::Io { what: format!("{what} {}", path.display()), source };
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
            return Err(LockError::Locked { dir: dir.display().to_string(), program, holder_pid });
        }
        Err((_, errno)) => return Err(io_err("locking", io::Error::from(errno))),
    };
    lock.set_len(0).map_err(|e| io_err("truncating", e))?;
    lock.rewind().map_err(|e| io_err("rewinding", e))?;
    writeln!(*lock, "{}", std::process::id()).map_err(|e| io_err("writing pid to", e))?;
    Ok(DirLock { _lock: lock, path })
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(MAX_LOCK_FILE_BYTES).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second lock of the same directory is refused and names the holder.
    #[test]
    fn second_lock_is_refused_naming_the_holder_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path(), "x.lock", "test").unwrap();
        // flock locks belong to the open file description, so a second open
        // in the same process conflicts just like another process would.
        let err = lock_dir(dir.path(), "x.lock", "test").unwrap_err();
        assert!(matches!(err, LockError::Locked { holder_pid: Some(pid), .. } if pid == std::process::id()), "{err}");
        assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
        drop(held);
        lock_dir(dir.path(), "x.lock", "test").unwrap();
    }
}
