//! Reading WAL straight from a timeline's segment files with `pread`.
//!
//! The owner thread reads through it (recovery, [`super::WalStorage::read`]),
//! and so do the WAL consumers (HTTP pulls, replication streams) on their own
//! threads, without going through the owner: they read only below the commit
//! LSN, and committed bytes never change (no truncation goes below commit,
//! see `crate::acceptor`). The only thing that can happen to a committed
//! segment is its removal by retention, which a reader sees as
//! [`StorageError::SegmentRemoved`]; a reader that already opened the file
//! keeps reading it (unlink leaves open files intact).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::segments::PG_TIMELINE_ID;
use super::{io_error, StorageError};
use postgres_wal::lsn::{Lsn, SegmentNo, WalSegmentSize};

pub struct SegmentReader {
    dir: PathBuf,
    segment_size: WalSegmentSize,
    /// The segment last read, kept open for the next read.
    open: Option<(SegmentNo, File)>,
    bytes_read: u64,
}

impl SegmentReader {
    pub fn new(dir: &Path, segment_size: WalSegmentSize) -> Self {
        SegmentReader { dir: dir.to_path_buf(), segment_size, open: None, bytes_read: 0 }
    }

    pub fn segment_size(&self) -> WalSegmentSize {
        self.segment_size
    }

    /// Path of the file holding `segment`.
    pub fn segment_path(&self, segment: SegmentNo) -> PathBuf {
        self.dir.join(segment.file_name(PG_TIMELINE_ID, self.segment_size))
    }

    /// Bytes returned so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Forget the open file if it is `segment` or later: the owner is about
    /// to remove or rewrite those files, and a kept handle would still show
    /// the old bytes.
    pub fn forget_from(&mut self, segment: SegmentNo) {
        if self.open.as_ref().is_some_and(|(open, _)| *open >= segment) {
            self.open = None;
        }
    }

    /// Read exactly `buf.len()` bytes starting at `start`, across segment
    /// boundaries. The caller knows the range is written.
    pub fn read_exact(&mut self, start: Lsn, buf: &mut [u8]) -> Result<(), StorageError> {
        let mut pos = start;
        let mut filled = 0;
        while filled < buf.len() {
            let segment = pos.segment_no(self.segment_size);
            let offset = pos.segment_offset(self.segment_size);
            let len = ((self.segment_size.bytes() - offset) as usize).min(buf.len() - filled);
            self.pread(segment, offset, &mut buf[filled..filled + len])?;
            filled += len;
            pos = pos + len as u64;
        }
        self.bytes_read += buf.len() as u64;
        Ok(())
    }

    /// `pread` exactly `buf.len()` bytes of `segment` at `offset`.
    fn pread(&mut self, segment: SegmentNo, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        let path = self.segment_path(segment);
        if self.open.as_ref().is_none_or(|(cached, _)| *cached != segment) {
            self.open = None;
            let file = File::open(&path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StorageError::SegmentRemoved { path: path.display().to_string() },
                _ => io_error(format!("opening {}", path.display()), e),
            })?;
            self.open = Some((segment, file));
        }
        let (_, file) = self.open.as_ref().expect("handle opened above");
        file.read_exact_at(buf, offset)
            .map_err(|e| io_error(format!("reading {} bytes at offset {offset} of {}", buf.len(), path.display()), e))
    }
}
