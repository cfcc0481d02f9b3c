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

use super::{io_error, StorageError};
use postgres_wal::lsn::{Lsn, SegmentNo, WalSegmentSize};
use postgres_wal::timeline_history::PgTimelineHistory;

pub struct SegmentReader {
    dir: PathBuf,
    segment_size: WalSegmentSize,
    /// Names the files; a reader on another thread may know an older
    /// history than the owner, so a missing name is looked up again by
    /// segment number before it counts as removed.
    pg_timelines: PgTimelineHistory,
    /// The segment last read, kept open for the next read.
    open: Option<(SegmentNo, File)>,
    bytes_read: u64,
}

impl SegmentReader {
    pub fn new(dir: &Path, segment_size: WalSegmentSize) -> Self {
        SegmentReader {
            dir: dir.to_path_buf(),
            segment_size,
            pg_timelines: PgTimelineHistory::first(),
            open: None,
            bytes_read: 0,
        }
    }

    pub fn with_pg_timelines(mut self, history: PgTimelineHistory) -> Self {
        self.pg_timelines = history;
        self
    }

    /// Name files after `history` from now on (a timeline switch).
    pub fn set_pg_timelines(&mut self, history: PgTimelineHistory) {
        self.pg_timelines = history;
    }

    pub fn segment_size(&self) -> WalSegmentSize {
        self.segment_size
    }

    /// Path of the file holding `segment`, as this reader's history names it.
    pub fn segment_path(&self, segment: SegmentNo) -> PathBuf {
        self.dir.join(self.pg_timelines.segment_file_name(segment, self.segment_size))
    }

    /// The file that holds `segment` whatever timeline its name carries
    /// (the owner renamed it after a switch this reader has not heard of).
    fn find_segment_file(&self, segment: SegmentNo) -> Option<PathBuf> {
        let listing = std::fs::read_dir(&self.dir).ok()?;
        listing.filter_map(Result::ok).map(|entry| entry.path()).find(|path| {
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            SegmentNo::parse_file_name(name, self.segment_size).is_ok_and(|(_, found)| found == segment)
        })
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
        let mut path = self.segment_path(segment);
        if self.open.as_ref().is_none_or(|(cached, _)| *cached != segment) {
            self.open = None;
            let file = match File::open(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let renamed = self.find_segment_file(segment);
                    path = renamed.ok_or_else(|| StorageError::SegmentRemoved { path: path.display().to_string() })?;
                    File::open(&path)
                }
                other => other,
            };
            let file = file.map_err(|e| match e.kind() {
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
