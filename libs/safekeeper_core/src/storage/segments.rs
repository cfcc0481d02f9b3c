//! WAL segment files of one timeline, named and laid out exactly like `pg_wal`.
//!
//! A timeline directory holds a contiguous run of segment files
//! `TTTTTTTTXXXXXXXXYYYYYYYY`, each exactly `segment_size_bytes` long, whose
//! bytes equal the primary's `pg_wal` (so `pg_waldump` reads them). See
//! docs/storage.md for the crash argument; in short:
//!
//! - A segment is born as `<name>.partial-tmp`: space is reserved with
//!   `fallocate` (a full disk fails here, before any byte of WAL is accepted),
//!   then zeros are written so every block is a real, written block, then the
//!   file is fsynced, renamed to `<name>` and the directory fsynced. Writing
//!   zeros up front matters for speed: `fallocate` alone leaves "unwritten"
//!   extents, and the first data sync of each would also have to journal an
//!   extent conversion. With real blocks a steady-state sync is pure data.
//! - WAL is written into the segment's pages with `pwrite` (by default; or
//!   copied into its shared memory map, see [`SegmentWriteMode`]) and made
//!   durable by `msync` of the dirty byte range of each segment written since
//!   the last sync (group commit: many writes, one sync per touched segment).
//! - At most [`MAX_MAPPED_SEGMENTS`] segments are mapped at once; the least
//!   recently used is synced (if dirty) and unmapped to make room.
//! - Truncation zeroes the tail of the segment holding the new end, syncs it,
//!   then removes later segments (highest first, so the set on disk stays
//!   contiguous if we die midway) and fsyncs the directory.
//!
//! - Each file carries the Postgres timeline that wrote its last byte (see
//!   `postgres_wal::timeline_history`), as in the primary's `pg_wal`; when a
//!   proposer brings a new history, the files whose names change are renamed
//!   and the timeline's `0000000N.history` file is written next to them.
//!
//! After [`SegmentStorage::open`] the write position is unknown: recovery
//! (`crate::recovery`) decodes the WAL, finds the end of the last valid
//! record and calls [`SegmentStorage::set_recovered_end`].

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use super::reader::SegmentReader;
use super::{fsync_dir, io_error, StorageError, SyncedLsn, WalStorage};
use postgres_wal::lsn::{Lsn, PgTimelineId, SegmentNo, WalSegmentSize, SEGMENT_FILE_NAME_LEN};
use postgres_wal::timeline_history::PgTimelineHistory;
/// Most segments memory-mapped at once: bounds address space and the number
/// of maps a sync has to visit.
pub const MAX_MAPPED_SEGMENTS: usize = 4;
/// Suffix of a segment that is still being created (never holds WAL).
pub const TEMP_SEGMENT_SUFFIX: &str = ".partial-tmp";
/// Size of the zero buffer used to fill new segments.
const ZERO_FILL_CHUNK_BYTES: u64 = 1 << 20;
/// Granularity at which truncation checks for bytes that are already zero,
/// so it only dirties (and syncs) pages that actually held data.
const ZERO_CHECK_CHUNK_BYTES: usize = 4096;

/// Counters for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentStorageStats {
    /// `msync` calls (one per dirty segment per sync).
    pub msyncs: u64,
    /// `fdatasync` calls on segment files (recovery only).
    pub fdatasyncs: u64,
    pub segments_created: u64,
    pub segments_removed: u64,
    /// Memory maps created (a map evicted and used again counts twice).
    pub maps_created: u64,
    /// Bytes returned by `read`.
    pub bytes_read: u64,
}

/// How WAL bytes reach a segment's pages. Either way they are made durable
/// by msync of the segment's map (same pages: Linux has one page cache).
///
/// The default is [`Self::Pwrite`], chosen by measurement (docs/storage.md,
/// "Memory map vs pwrite"): the design brief prefers writes through the map,
/// but on ext4 the map stays at about 0.3-0.5x of `pwrite` + `fdatasync` for
/// append+sync even with segments created before timing or pre-faulted, while
/// `pwrite` matches the baseline once zero-filling is out of the way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SegmentWriteMode {
    /// memcpy into the shared map, as the design brief describes. Each
    /// append page takes a write fault (`page_mkwrite`) on the append path;
    /// pre-faulting with `MADV_POPULATE_WRITE` does not help, because the
    /// next msync's writeback write-protects the populated pages again.
    MemoryMap,
    /// `pwrite` into the file: no faults, the kernel copies into the page
    /// cache directly.
    #[default]
    Pwrite,
}

/// One mapped segment and the part of it written since its last msync.
struct MappedSegment {
    segment: SegmentNo,
    path: PathBuf,
    file: File,
    map: MmapMut,
    /// Byte offsets `[start, end)` within the segment not yet msynced.
    dirty: Option<(usize, usize)>,
}

impl MappedSegment {
    fn mark_dirty(&mut self, start: usize, end: usize) {
        debug_assert!(start < end && end <= self.map.len());
        self.dirty = Some(match self.dirty {
            Some((lo, hi)) => (lo.min(start), hi.max(end)),
            None => (start, end),
        });
    }

    /// msync the dirty range; returns whether an msync was issued.
    fn sync(&mut self) -> Result<bool, StorageError> {
        let Some((start, end)) = self.dirty else {
            return Ok(false);
        };
        self.map.flush_range(start, end - start).map_err(|source| StorageError::SyncFailed {
            what: format!("msync of {} bytes {start}..{end}", self.path.display()),
            source,
        })?;
        self.dirty = None;
        Ok(true)
    }
}

/// The WAL of one timeline stored as Postgres segment files in one directory.
pub struct SegmentStorage {
    dir: PathBuf,
    segment_size: WalSegmentSize,
    write_mode: SegmentWriteMode,
    /// Segment files on disk: `[first_segment, end_segment)`, empty if equal.
    first_segment: SegmentNo,
    end_segment: SegmentNo,
    write_lsn: Lsn,
    flush_lsn: Lsn,
    /// Set by `open` when files exist, until `set_recovered_end`.
    recovery_pending: bool,
    /// Set after a failed sync: every later call fails (fail-stop).
    sync_failed: bool,
    /// Least recently used first; never more than `MAX_MAPPED_SEGMENTS`.
    mapped: Vec<MappedSegment>,
    /// A segment being zero-filled ahead of need under its temp name.
    spare: Option<(SegmentNo, std::thread::JoinHandle<Result<(), StorageError>>)>,
    /// Reads with `pread` (recovery and `read`).
    reader: SegmentReader,
    /// Which Postgres timeline names each segment file.
    pg_timelines: PgTimelineHistory,
    stats: SegmentStorageStats,
}

impl SegmentStorage {
    /// Open the timeline directory `dir`: remove leftover temp files, check
    /// that every segment file has a valid name and exactly
    /// `segment_size` bytes and that the set is contiguous. Never modifies a
    /// segment file's bytes; a bad one is reported as `CorruptSegment`.
    /// A file named for another Postgres timeline than `pg_timelines` (the
    /// control file's) says is renamed: a crash interrupted a switch, and
    /// the control file decides which history stands.
    ///
    /// With segment files present, write and flush positions stay unknown
    /// (reads may cover all files) until [`Self::set_recovered_end`].
    pub fn open(
        dir: &Path,
        segment_size: WalSegmentSize,
        pg_timelines: &PgTimelineHistory,
    ) -> Result<Self, StorageError> {
        let found = scan_segments(dir, segment_size)?;
        rename_to_history(dir, segment_size, &found, pg_timelines)?;
        let segments: Vec<SegmentNo> = found.iter().map(|&(segment, _)| segment).collect();
        let (first_segment, end_segment) = match (segments.first(), segments.last()) {
            (Some(&first), Some(&last)) => (first, SegmentNo(last.0 + 1)),
            _ => (SegmentNo(0), SegmentNo(0)),
        };
        Ok(SegmentStorage {
            dir: dir.to_path_buf(),
            segment_size,
            write_mode: SegmentWriteMode::default(),
            first_segment,
            end_segment,
            write_lsn: Lsn::INVALID,
            flush_lsn: Lsn::INVALID,
            recovery_pending: !segments.is_empty(),
            sync_failed: false,
            mapped: Vec::with_capacity(MAX_MAPPED_SEGMENTS),
            reader: SegmentReader::new(dir, segment_size).with_pg_timelines(pg_timelines.clone()),
            pg_timelines: pg_timelines.clone(),
            spare: None,
            stats: SegmentStorageStats::default(),
        })
    }

    /// Choose how appended bytes reach the pages (see [`SegmentWriteMode`]).
    pub fn with_write_mode(mut self, write_mode: SegmentWriteMode) -> Self {
        self.write_mode = write_mode;
        self
    }

    /// Finish recovery: WAL ends at `end` (the end of the last valid record).
    /// Durably removes every byte at or above `end` and fdatasyncs the
    /// segments holding `[durable_from, end)`, the WAL that recovery accepted
    /// but that a crashed process may have left in the page cache only. WAL
    /// below `durable_from` (the control file's commit LSN) was durable before
    /// the control file named it. Afterwards write and flush LSN are `end`.
    pub fn set_recovered_end(&mut self, durable_from: Lsn, end: Lsn) -> Result<(), StorageError> {
        assert!(self.recovery_pending, "set_recovered_end called twice or on a fresh timeline");
        assert!(
            self.start_lsn() <= durable_from && durable_from <= end && end <= self.files_end_lsn(),
            "recovered end {end} (scanned from {durable_from}) outside the files {}..{}",
            self.start_lsn(),
            self.files_end_lsn()
        );
        self.guarded(|storage| {
            storage.fdatasync_segments(durable_from, end)?;
            storage.truncate_files(end)?;
            storage.recovery_pending = false;
            Ok(())
        })
    }

    /// Durably remove every segment file, leaving an empty (uninitialized)
    /// timeline. Recovery uses it to roll back an `initialize` that the
    /// control file never recorded, or to finish a `restart_empty`.
    pub fn remove_all_segments(&mut self) -> Result<(), StorageError> {
        self.guarded(|storage| {
            storage.mapped.clear();
            storage.reader.forget_from(SegmentNo(0));
            storage.remove_segments_from(storage.first_segment)?;
            storage.recovery_pending = false;
            storage.write_lsn = Lsn::INVALID;
            storage.flush_lsn = Lsn::INVALID;
            Ok(())
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn segment_size(&self) -> WalSegmentSize {
        self.segment_size
    }

    /// End of the segment files on disk (end of the last file).
    pub fn files_end_lsn(&self) -> Lsn {
        self.end_segment.start_lsn(self.segment_size)
    }

    pub fn is_recovery_pending(&self) -> bool {
        self.recovery_pending
    }

    pub fn stats(&self) -> SegmentStorageStats {
        self.stats
    }

    pub fn mapped_segment_count(&self) -> usize {
        self.mapped.len()
    }

    /// Path of the file holding `segment`.
    pub fn segment_path(&self, segment: SegmentNo) -> PathBuf {
        self.dir.join(self.pg_timelines.segment_file_name(segment, self.segment_size))
    }

    fn has_file(&self, segment: SegmentNo) -> bool {
        (self.first_segment..self.end_segment).contains(&segment)
    }

    /// Run `op`; if it fails fatally, refuse every later call (fail-stop).
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T, StorageError>) -> Result<T, StorageError> {
        if self.sync_failed {
            return Err(StorageError::SyncFailed {
                what: format!("an earlier sync in {}", self.dir.display()),
                source: io::Error::other("storage refuses all work after a failed sync"),
            });
        }
        let result = op(self);
        if result.as_ref().is_err_and(StorageError::is_fatal) {
            self.sync_failed = true;
        }
        result
    }

    /// Create `segment` (zero-filled, real blocks) durably under its final
    /// name. On failure the temp file is removed and nothing else changed.
    fn create_segment(&mut self, segment: SegmentNo) -> Result<(), StorageError> {
        assert!(
            self.first_segment == self.end_segment || segment == self.end_segment,
            "segment {segment:?} would not extend the contiguous files {:?}..{:?}",
            self.first_segment,
            self.end_segment
        );
        let final_path = self.segment_path(segment);
        let tmp_path = temp_segment_path(&final_path);
        // A spare prepared in the background for exactly this segment saves
        // the zero-fill on the append path. If it failed (say ENOSPC), the
        // synchronous attempt below reports the error properly.
        let spare_ready = match self.take_spare() {
            Some((spare, Ok(()))) if spare == segment => true,
            Some((spare, Ok(()))) => {
                let _ = fs::remove_file(temp_segment_path(&self.segment_path(spare)));
                false
            }
            _ => false,
        };
        if !spare_ready {
            if let Err(err) = create_zeroed_file(&tmp_path, self.segment_size.bytes()) {
                // Best effort: open() removes leftover temp files anyway.
                let _ = fs::remove_file(&tmp_path);
                return Err(err);
            }
        }
        fs::rename(&tmp_path, &final_path)
            .map_err(|e| io_error(format!("renaming {} to {}", tmp_path.display(), final_path.display()), e))?;
        fsync_dir(&self.dir)?;
        if self.first_segment == self.end_segment {
            self.first_segment = segment;
        }
        self.end_segment = SegmentNo(segment.0 + 1);
        self.stats.segments_created += 1;
        self.prepare_spare(self.end_segment);
        Ok(())
    }

    /// Start zero-filling `<segment>.partial-tmp` on a helper thread, so the
    /// next segment switch only renames. A spare never holds WAL: a crash
    /// leaves a temp file that `open` removes.
    fn prepare_spare(&mut self, segment: SegmentNo) {
        self.discard_spare();
        let tmp_path = temp_segment_path(&self.segment_path(segment));
        let size_bytes = self.segment_size.bytes();
        let worker = std::thread::Builder::new().name("segment-spare".to_string()).spawn(move || {
            let result = create_zeroed_file(&tmp_path, size_bytes);
            if result.is_err() {
                let _ = fs::remove_file(&tmp_path);
            }
            result
        });
        // No thread (resource limits): segments are simply created on demand.
        self.spare = worker.ok().map(|handle| (segment, handle));
    }

    /// Wait for the spare being prepared, if any.
    fn take_spare(&mut self) -> Option<(SegmentNo, Result<(), StorageError>)> {
        let (segment, handle) = self.spare.take()?;
        let result = handle.join().unwrap_or_else(|_| panic!("the segment spare thread panicked"));
        Some((segment, result))
    }

    /// Remove a prepared spare that will not be used.
    fn discard_spare(&mut self) {
        if let Some((segment, Ok(()))) = self.take_spare() {
            let _ = fs::remove_file(temp_segment_path(&self.segment_path(segment)));
        }
    }

    /// The map of `segment` (an existing file), mapping it if needed and
    /// evicting the least recently used map (synced first) to stay in bounds.
    fn mapped_segment(&mut self, segment: SegmentNo) -> Result<&mut MappedSegment, StorageError> {
        assert!(self.has_file(segment), "segment {segment:?} has no file");
        if let Some(index) = self.mapped.iter().position(|m| m.segment == segment) {
            let recent = self.mapped.remove(index);
            self.mapped.push(recent);
        } else {
            if self.mapped.len() == MAX_MAPPED_SEGMENTS {
                let mut oldest = self.mapped.remove(0);
                self.stats.msyncs += u64::from(oldest.sync()?);
            }
            let path = self.segment_path(segment);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_error(format!("opening {}", path.display()), e))?;
            // SAFETY: the map is only unsound if the file shrinks underneath
            // it (SIGBUS). Segment files are fixed-size and only this process
            // touches them: the data directory lock excludes other
            // safekeepers, and we remove a file only after dropping its map.
            let map =
                unsafe { MmapMut::map_mut(&file) }.map_err(|e| io_error(format!("mapping {}", path.display()), e))?;
            assert_eq!(map.len() as u64, self.segment_size.bytes(), "{} changed size while open", path.display());
            self.stats.maps_created += 1;
            self.mapped.push(MappedSegment { segment, path, file, map, dirty: None });
        }
        Ok(self.mapped.last_mut().expect("the segment was just pushed"))
    }

    /// msync every dirty mapped segment.
    fn sync_mapped(&mut self) -> Result<(), StorageError> {
        for mapped in &mut self.mapped {
            self.stats.msyncs += u64::from(mapped.sync()?);
        }
        Ok(())
    }

    fn fdatasync_segments(&mut self, from: Lsn, end: Lsn) -> Result<(), StorageError> {
        let first = from.segment_no(self.segment_size);
        let last = end.segment_no(self.segment_size);
        let on_disk: Vec<SegmentNo> = (first.0..=last.0).map(SegmentNo).filter(|s| self.has_file(*s)).collect();
        for segment in on_disk {
            let path = self.segment_path(segment);
            let file = File::open(&path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
            file.sync_data().map_err(|source| StorageError::SyncFailed {
                what: format!("fdatasync of {}", path.display()),
                source,
            })?;
            self.stats.fdatasyncs += 1;
        }
        Ok(())
    }

    /// Durably remove every byte at or above `end`; sets write/flush to `end`.
    /// Order matters for crash safety, see the module docs.
    fn truncate_files(&mut self, end: Lsn) -> Result<(), StorageError> {
        let end_segment = end.segment_no(self.segment_size);
        let later = SegmentNo(end_segment.0 + 1);
        // Bytes of later segments are being discarded: unmap without msync.
        self.mapped.retain(|m| m.segment < later);
        self.reader.forget_from(later);
        if self.has_file(end_segment) {
            let offset = end.segment_offset(self.segment_size) as usize;
            let mapped = self.mapped_segment(end_segment)?;
            zero_tail(mapped, offset);
        }
        // Also makes any unsynced writes below `end` durable, which the
        // flush LSN set below promises.
        self.sync_mapped()?;
        if self.spare.as_ref().is_some_and(|(spare, _)| *spare != later) {
            self.discard_spare();
        }
        self.remove_segments_from(later)?;
        self.write_lsn = end;
        self.flush_lsn = end;
        Ok(())
    }

    /// Remove segment files below `end_removed`, lowest first (the files
    /// left stay contiguous if we die midway), then fsync the directory.
    fn remove_segments_below(&mut self, end_removed: SegmentNo) -> Result<(), StorageError> {
        let end_removed = end_removed.min(self.end_segment);
        if self.first_segment >= end_removed {
            return Ok(());
        }
        // Below the flush LSN, so synced already; sync anyway rather than
        // reason about a map being dropped dirty.
        for mapped in self.mapped.iter_mut().filter(|m| m.segment < end_removed) {
            self.stats.msyncs += u64::from(mapped.sync()?);
        }
        self.mapped.retain(|m| m.segment >= end_removed);
        self.reader.forget_from(SegmentNo(0));
        while self.first_segment < end_removed {
            let path = self.segment_path(self.first_segment);
            fs::remove_file(&path).map_err(|e| io_error(format!("removing {}", path.display()), e))?;
            self.first_segment = SegmentNo(self.first_segment.0 + 1);
            self.stats.segments_removed += 1;
        }
        fsync_dir(&self.dir)
    }

    /// Remove segment files `>= first_removed`, highest first, then fsync
    /// the directory.
    fn remove_segments_from(&mut self, first_removed: SegmentNo) -> Result<(), StorageError> {
        let keep_end = first_removed.max(self.first_segment);
        if self.end_segment <= keep_end {
            return Ok(());
        }
        while self.end_segment > keep_end {
            let segment = SegmentNo(self.end_segment.0 - 1);
            assert!(self.mapped.iter().all(|m| m.segment != segment), "removing a mapped segment");
            let path = self.segment_path(segment);
            fs::remove_file(&path).map_err(|e| io_error(format!("removing {}", path.display()), e))?;
            self.end_segment = segment;
            self.stats.segments_removed += 1;
        }
        if self.first_segment == self.end_segment {
            self.first_segment = SegmentNo(0);
            self.end_segment = SegmentNo(0);
        }
        fsync_dir(&self.dir)
    }

    /// End of the bytes `read` may return.
    fn readable_end_lsn(&self) -> Lsn {
        if self.recovery_pending {
            self.files_end_lsn()
        } else {
            self.write_lsn
        }
    }
}

impl Drop for SegmentStorage {
    fn drop(&mut self) {
        // Do not leave a thread writing into the directory behind us.
        self.discard_spare();
    }
}

impl WalStorage for SegmentStorage {
    fn start_lsn(&self) -> Lsn {
        if self.first_segment == self.end_segment {
            Lsn::INVALID
        } else {
            self.first_segment.start_lsn(self.segment_size)
        }
    }

    /// `Lsn(0)` until recovery has set it.
    fn write_lsn(&self) -> Lsn {
        self.write_lsn
    }

    /// `Lsn(0)` until recovery has set it.
    fn flush_lsn(&self) -> Lsn {
        self.flush_lsn
    }

    fn initialize(&mut self, start: Lsn) -> Result<(), StorageError> {
        assert!(
            start.is_valid() && start.is_segment_start(self.segment_size),
            "timeline start {start} is not a segment start"
        );
        assert!(self.first_segment == self.end_segment, "initialize on a timeline that already has WAL");
        self.guarded(|storage| {
            storage.create_segment(start.segment_no(storage.segment_size))?;
            storage.recovery_pending = false;
            storage.write_lsn = start;
            storage.flush_lsn = start;
            Ok(())
        })
    }

    fn restart_empty(&mut self, start: Lsn) -> Result<(), StorageError> {
        assert!(!self.recovery_pending, "restart_empty before recovery set the end of WAL");
        let old_start = self.start_lsn();
        assert!(
            old_start.is_valid() && self.write_lsn == old_start && self.flush_lsn == old_start,
            "restart_empty on a WAL holding {old_start}..{}",
            self.write_lsn
        );
        assert!(start > old_start, "the restarted WAL starts at {start}, not after {old_start}");
        self.remove_all_segments()?;
        self.initialize(start)
    }

    fn write(&mut self, start: Lsn, bytes: &[u8]) -> Result<(), StorageError> {
        assert!(!self.recovery_pending, "write before recovery set the end of WAL");
        assert!(self.write_lsn.is_valid(), "write before initialize");
        if start != self.write_lsn {
            return Err(StorageError::NotContiguous { start, write_lsn: self.write_lsn });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let end = start + bytes.len() as u64;
        let segment = start.segment_no(self.segment_size);
        assert_eq!(
            segment,
            Lsn(end.0 - 1).segment_no(self.segment_size),
            "write {start}..{end} crosses a segment boundary: the caller must split it"
        );
        self.guarded(|storage| {
            if !storage.has_file(segment) {
                storage.create_segment(segment)?;
            }
            let offset = start.segment_offset(storage.segment_size) as usize;
            let write_mode = storage.write_mode;
            let mapped = storage.mapped_segment(segment)?;
            match write_mode {
                SegmentWriteMode::MemoryMap => mapped.map[offset..offset + bytes.len()].copy_from_slice(bytes),
                SegmentWriteMode::Pwrite => mapped.file.write_all_at(bytes, offset as u64).map_err(|e| {
                    io_error(
                        format!("writing {} bytes at offset {offset} of {}", bytes.len(), mapped.path.display()),
                        e,
                    )
                })?,
            }
            mapped.mark_dirty(offset, offset + bytes.len());
            storage.write_lsn = end;
            Ok(())
        })
    }

    fn sync(&mut self) -> Result<SyncedLsn, StorageError> {
        assert!(!self.recovery_pending, "sync before recovery set the end of WAL");
        self.guarded(|storage| {
            storage.sync_mapped()?;
            storage.flush_lsn = storage.write_lsn;
            Ok(SyncedLsn::new(storage.flush_lsn))
        })
    }

    fn truncate(&mut self, end: Lsn) -> Result<(), StorageError> {
        assert!(!self.recovery_pending, "truncate before recovery set the end of WAL");
        assert!(
            self.start_lsn() <= end && end <= self.write_lsn,
            "truncation to {end} outside the WAL {}..{}",
            self.start_lsn(),
            self.write_lsn
        );
        self.guarded(|storage| storage.truncate_files(end))
    }

    fn read(&mut self, start: Lsn, buf: &mut [u8]) -> Result<(), StorageError> {
        let end = start + buf.len() as u64;
        let (kept_start, kept_end) = (self.start_lsn(), self.readable_end_lsn());
        if buf.is_empty() {
            return Ok(());
        }
        if start < kept_start || end > kept_end {
            return Err(StorageError::RangeNotAvailable { start, end, kept_start, kept_end });
        }
        self.reader.read_exact(start, buf)?;
        self.stats.bytes_read += buf.len() as u64;
        Ok(())
    }

    fn remove_below(&mut self, end: Lsn) -> Result<(), StorageError> {
        assert!(!self.recovery_pending, "remove_below before recovery set the end of WAL");
        assert!(end.is_segment_start(self.segment_size), "retention removes whole segments, {end} is not a boundary");
        assert!(
            end <= self.flush_lsn.segment_start(self.segment_size),
            "removing WAL below {end} would remove the segment of the flush LSN {}",
            self.flush_lsn
        );
        self.guarded(|storage| storage.remove_segments_below(end.segment_no(storage.segment_size)))
    }

    /// Name the files after `history` from now on: write its history file
    /// (durably, before any name refers to its timeline), then rename every
    /// held segment whose name changes, then fsync the directory. A crash
    /// midway leaves names that [`Self::open`] puts right from the control
    /// file, which is persisted after this returns.
    fn set_pg_timelines(&mut self, history: &PgTimelineHistory) -> Result<(), StorageError> {
        self.guarded(|storage| {
            if *history == storage.pg_timelines {
                return Ok(());
            }
            if !history.switches.is_empty() {
                let name = history.file_name();
                let text = history.file_text();
                super::write_file_atomically(&storage.dir, &name, &format!("{name}.tmp"), text.as_bytes())?;
            }
            // A spare's temp name follows its final name: drop it rather
            // than track a rename.
            storage.discard_spare();
            let segment_size = storage.segment_size;
            let held: Vec<(SegmentNo, PgTimelineId)> = (storage.first_segment.0..storage.end_segment.0)
                .map(|n| (SegmentNo(n), storage.pg_timelines.timeline_of_segment(SegmentNo(n), segment_size)))
                .collect();
            rename_to_history(&storage.dir, segment_size, &held, history)?;
            storage.pg_timelines = history.clone();
            storage.reader.set_pg_timelines(history.clone());
            Ok(())
        })
    }
}

/// Zero `mapped` from `offset` to its end, touching only chunks that hold a
/// non-zero byte (a truncation of a mostly empty segment then dirties little).
fn zero_tail(mapped: &mut MappedSegment, offset: usize) {
    let len = mapped.map.len();
    let mut chunk_start = offset;
    while chunk_start < len {
        // Chunks end on ZERO_CHECK_CHUNK_BYTES boundaries (OS pages).
        let chunk_end = ((chunk_start / ZERO_CHECK_CHUNK_BYTES + 1) * ZERO_CHECK_CHUNK_BYTES).min(len);
        let chunk = &mut mapped.map[chunk_start..chunk_end];
        if chunk.iter().any(|&b| b != 0) {
            chunk.fill(0);
            mapped.mark_dirty(chunk_start, chunk_end);
        }
        chunk_start = chunk_end;
    }
}

fn temp_segment_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.as_os_str().to_owned();
    name.push(TEMP_SEGMENT_SUFFIX);
    PathBuf::from(name)
}

/// Create `path` with `size_bytes` of zeros in real (written) blocks, fsynced.
fn create_zeroed_file(path: &Path, size_bytes: u64) -> Result<(), StorageError> {
    let describe = |action: &str| format!("{action} {}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_error(describe("creating"), e))?;
    let len = i64::try_from(size_bytes).expect("segment sizes are at most 1 GiB");
    match fallocate(file.as_raw_fd(), FallocateFlags::empty(), 0, len) {
        // A file system without fallocate still gets real blocks from the
        // zero-fill below; it only loses the early, all-or-nothing ENOSPC.
        Ok(()) | Err(Errno::EOPNOTSUPP) => {}
        Err(errno) => return Err(io_error(describe("fallocate of"), io::Error::from(errno))),
    }
    let zeros = vec![0u8; ZERO_FILL_CHUNK_BYTES.min(size_bytes) as usize];
    let mut offset = 0;
    while offset < size_bytes {
        let len = (size_bytes - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..len], offset).map_err(|e| io_error(describe("zero-filling"), e))?;
        offset += len as u64;
    }
    file.sync_all()
        .map_err(|source| StorageError::SyncFailed { what: format!("fsync of new segment {}", path.display()), source })
}

/// Rename each of `files` (segment and the timeline its name carries) that
/// `history` names differently, then fsync `dir` if anything moved.
fn rename_to_history(
    dir: &Path,
    segment_size: WalSegmentSize,
    files: &[(SegmentNo, PgTimelineId)],
    history: &PgTimelineHistory,
) -> Result<(), StorageError> {
    let mut renamed = false;
    for &(segment, timeline) in files {
        let wanted = history.timeline_of_segment(segment, segment_size);
        if wanted == timeline {
            continue;
        }
        let from = dir.join(segment.file_name(timeline, segment_size));
        let to = dir.join(segment.file_name(wanted, segment_size));
        fs::rename(&from, &to).map_err(|e| io_error(format!("renaming {} to {}", from.display(), to.display()), e))?;
        renamed = true;
    }
    if renamed {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// List the segment files of `dir`: valid names, exact size, contiguous,
/// one file per segment, with the timeline each name carries. Removes
/// leftover temp segments (they never hold acknowledged WAL).
fn scan_segments(dir: &Path, segment_size: WalSegmentSize) -> Result<Vec<(SegmentNo, PgTimelineId)>, StorageError> {
    let listing = fs::read_dir(dir).map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
    let mut segments = Vec::new();
    let mut removed_temp = false;
    for entry in listing {
        let entry = entry.map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.ends_with(TEMP_SEGMENT_SUFFIX) {
            fs::remove_file(&path).map_err(|e| io_error(format!("removing leftover {}", path.display()), e))?;
            removed_temp = true;
        } else if looks_like_segment_name(&name) {
            segments.push(check_segment_file(&path, &name, segment_size)?);
        }
    }
    if removed_temp {
        fsync_dir(dir)?;
    }
    segments.sort();
    if let Some(pair) = segments.windows(2).find(|pair| pair[1].0 .0 != pair[0].0 .0 + 1) {
        let ((first, first_timeline), (second, second_timeline)) = (pair[0], pair[1]);
        let (first_name, second_name) =
            (first.file_name(first_timeline, segment_size), second.file_name(second_timeline, segment_size));
        let reason = if first == second {
            format!("two files hold segment {first_name} and {second_name}; left untouched")
        } else {
            format!("missing: the timeline has segments {first_name} and {second_name} but not the ones between")
        };
        let missing = SegmentNo(first.0 + 1).file_name(second_timeline, segment_size);
        return Err(StorageError::CorruptSegment { path: dir.join(missing).display().to_string(), reason });
    }
    Ok(segments)
}

/// Does `dir` hold any file named like a segment? (Checks names only.)
pub fn dir_has_segment_files(dir: &Path) -> Result<bool, StorageError> {
    let listing = fs::read_dir(dir).map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
    for entry in listing {
        let entry = entry.map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
        if entry.file_name().to_str().is_some_and(looks_like_segment_name) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Names of 24 hex digits are segments (or corrupt); anything else in the
/// directory (control file, ...) is not ours to judge.
fn looks_like_segment_name(name: &str) -> bool {
    name.len() == SEGMENT_FILE_NAME_LEN && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_segment_file(
    path: &Path,
    name: &str,
    segment_size: WalSegmentSize,
) -> Result<(SegmentNo, PgTimelineId), StorageError> {
    let corrupt = |reason: String| StorageError::CorruptSegment { path: path.display().to_string(), reason };
    let (timeline, segment) = SegmentNo::parse_file_name(name, segment_size).map_err(|e| corrupt(e.to_string()))?;
    if timeline == 0 {
        return Err(corrupt("names Postgres timeline 0, which does not exist".to_string()));
    }
    let metadata = fs::symlink_metadata(path).map_err(|e| io_error(format!("stat of {}", path.display()), e))?;
    if !metadata.is_file() {
        return Err(corrupt("not a regular file".to_string()));
    }
    if metadata.len() != segment_size.bytes() {
        return Err(corrupt(format!(
            "size is {} bytes, expected exactly {} (the segment size); left untouched",
            metadata.len(),
            segment_size.bytes()
        )));
    }
    Ok((segment, timeline))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG_BYTES: u64 = 1 << 20;

    fn seg_size() -> WalSegmentSize {
        WalSegmentSize::new(SEG_BYTES).unwrap()
    }

    fn fresh(dir: &Path, start: Lsn) -> SegmentStorage {
        let mut storage = SegmentStorage::open(dir, seg_size(), &PgTimelineHistory::first()).unwrap();
        storage.initialize(start).unwrap();
        storage
    }

    /// Deterministic non-zero filler for `[start, start + len)`.
    fn pattern(start: Lsn, len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| ((start.0 + i) % 251) as u8 + 1).collect()
    }

    /// Append `len` pattern bytes at the write position, split at segments.
    fn append(storage: &mut SegmentStorage, len: u64) {
        let end = storage.write_lsn() + len;
        while storage.write_lsn() < end {
            let start = storage.write_lsn();
            let chunk_end = start.next_segment_start(seg_size()).min(end);
            storage.write(start, &pattern(start, (chunk_end - start) as usize)).unwrap();
        }
    }

    /// Segment file names in `dir` (a spare being prepared is not one).
    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(TEMP_SEGMENT_SUFFIX))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn segments_on_disk_have_postgres_names_and_full_size() {
        let dir = tempfile::tempdir().unwrap();
        // 0/3000000 with 1 MiB segments is segment 0x30.
        let mut storage = fresh(dir.path(), Lsn(0x300_0000));
        append(&mut storage, SEG_BYTES + 10);
        storage.sync().unwrap();
        assert_eq!(file_names(dir.path()), ["000000010000000000000030", "000000010000000000000031"]);
        for name in file_names(dir.path()) {
            assert_eq!(fs::metadata(dir.path().join(name)).unwrap().len(), SEG_BYTES);
        }
        // The bytes on disk are exactly what was written, at LSN offsets.
        let on_disk = fs::read(dir.path().join("000000010000000000000031")).unwrap();
        assert_eq!(on_disk[..10], pattern(Lsn(0x310_0000), 10)[..]);
        assert!(on_disk[10..].iter().all(|&b| b == 0));
    }

    /// A promotion inside segment 0x31: that segment and later ones carry
    /// timeline 2, the history file sits beside them, reads and appends go
    /// on through the new names, and a reopen with the control file's
    /// history (old or new: a crash on either side of the control-file
    /// write) puts every name right.
    #[test]
    fn a_timeline_switch_renames_the_switch_segment_and_reopen_follows_the_control_file() {
        use postgres_wal::timeline_history::PgTimelineSwitch;
        let dir = tempfile::tempdir().unwrap();
        let mut storage = fresh(dir.path(), Lsn(0x300_0000));
        append(&mut storage, SEG_BYTES + 10);
        storage.sync().unwrap();
        let switch = PgTimelineSwitch { timeline: 1, end_lsn: Lsn(0x310_000A), reason: "promoted".into() };
        let promoted = PgTimelineHistory { current: 2, switches: vec![switch] };
        storage.set_pg_timelines(&promoted).unwrap();
        assert_eq!(
            file_names(dir.path()),
            ["000000010000000000000030", "00000002.history", "000000020000000000000031"]
        );
        let history_text = fs::read_to_string(dir.path().join("00000002.history")).unwrap();
        assert_eq!(history_text, "1\t0/310000A\tpromoted\n");
        append(&mut storage, SEG_BYTES);
        storage.sync().unwrap();
        assert!(file_names(dir.path()).contains(&"000000020000000000000032".to_string()));
        let mut bytes = vec![0u8; 20];
        storage.read(Lsn(0x310_0000 - 10), &mut bytes).unwrap();
        assert_eq!(bytes, pattern(Lsn(0x310_0000 - 10), 20), "reads cross the renamed boundary");
        drop(storage);
        // The control file still names timeline 1 (a crash before it was written).
        drop(SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first()).unwrap());
        let names = file_names(dir.path());
        assert!(
            names.contains(&"000000010000000000000031".to_string())
                && names.contains(&"000000010000000000000032".to_string()),
            "{names:?}"
        );
        // ... and after it was written.
        drop(SegmentStorage::open(dir.path(), seg_size(), &promoted).unwrap());
        let names = file_names(dir.path());
        assert!(
            names.contains(&"000000020000000000000031".to_string())
                && names.contains(&"000000010000000000000030".to_string()),
            "{names:?}"
        );
    }

    /// Two files holding one segment (say 00000001...31 and 00000002...31)
    /// cannot come from a rename; they are reported, never chosen between.
    #[test]
    fn two_files_for_one_segment_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = fresh(dir.path(), Lsn(0x300_0000));
        append(&mut storage, 10);
        storage.sync().unwrap();
        drop(storage);
        fs::copy(dir.path().join("000000010000000000000030"), dir.path().join("000000020000000000000030")).unwrap();
        let err = SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first()).err().unwrap();
        assert!(err.to_string().contains("two files hold segment"), "{err}");
    }

    /// Group commit: many writes, one msync per touched segment.
    #[test]
    fn many_writes_one_msync() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = fresh(dir.path(), Lsn(SEG_BYTES));
        for _ in 0..100 {
            append(&mut storage, 100);
        }
        assert_eq!(storage.stats().msyncs, 0);
        assert_eq!(storage.sync().unwrap().lsn(), Lsn(SEG_BYTES + 10_000));
        assert_eq!(storage.stats().msyncs, 1);
        // Nothing new written: a sync costs nothing.
        storage.sync().unwrap();
        assert_eq!(storage.stats().msyncs, 1);
        // Writes spanning two segments: one msync each.
        append(&mut storage, SEG_BYTES);
        storage.sync().unwrap();
        assert_eq!(storage.stats().msyncs, 3);
        assert_eq!(storage.flush_lsn(), storage.write_lsn());
    }

    #[test]
    fn writes_must_continue_at_write_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = fresh(dir.path(), Lsn(SEG_BYTES));
        append(&mut storage, 16);
        let err = storage.write(Lsn(SEG_BYTES + 8), b"x").unwrap_err();
        assert!(
            matches!(err, StorageError::NotContiguous { start, write_lsn } if start == Lsn(SEG_BYTES + 8) && write_lsn == Lsn(SEG_BYTES + 16))
        );
    }

    #[test]
    #[should_panic(expected = "crosses a segment boundary")]
    fn a_write_across_segments_is_a_caller_bug() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = fresh(dir.path(), Lsn(SEG_BYTES));
        append(&mut storage, SEG_BYTES - 4);
        let _ = storage.write(storage.write_lsn(), &[1; 8]);
    }

    #[test]
    fn reads_span_segments_and_stop_at_write_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = fresh(dir.path(), Lsn(SEG_BYTES));
        append(&mut storage, 3 * SEG_BYTES);
        // Not synced yet: reads still see the written bytes.
        let start = Lsn(SEG_BYTES + SEG_BYTES / 2);
        let mut buf = vec![0; 2 * SEG_BYTES as usize];
        storage.read(start, &mut buf).unwrap();
        assert_eq!(buf, pattern(start, buf.len()));
        let past_end = storage.read(Lsn(4 * SEG_BYTES - 4), &mut [0; 8]).unwrap_err();
        assert!(matches!(past_end, StorageError::RangeNotAvailable { .. }));
        let before_start = storage.read(Lsn(SEG_BYTES - 1), &mut [0; 2]).unwrap_err();
        assert!(matches!(before_start, StorageError::RangeNotAvailable { .. }));
    }

    /// Bound: never more than MAX_MAPPED_SEGMENTS maps, and an evicted dirty
    /// segment is synced before it is unmapped (its bytes stay durable).
    #[test]
    fn mapped_segments_are_bounded_and_evictions_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = fresh(dir.path(), Lsn(SEG_BYTES));
        let segments = MAX_MAPPED_SEGMENTS as u64 + 3;
        for _ in 0..segments {
            append(&mut storage, SEG_BYTES);
            assert!(storage.mapped_segment_count() <= MAX_MAPPED_SEGMENTS);
        }
        assert_eq!(storage.mapped_segment_count(), MAX_MAPPED_SEGMENTS);
        assert_eq!(storage.stats().msyncs, 3, "each of the 3 evicted dirty segments was synced");
        storage.sync().unwrap();
        assert_eq!(storage.stats().msyncs, segments);
        assert_eq!(storage.stats().maps_created, segments);
    }

    #[test]
    fn truncation_across_segments_zeroes_tail_and_removes_later_files() {
        let dir = tempfile::tempdir().unwrap();
        let start = Lsn(0x10 * SEG_BYTES);
        let mut storage = fresh(dir.path(), start);
        append(&mut storage, 4 * SEG_BYTES + 100);
        storage.sync().unwrap();
        assert_eq!(file_names(dir.path()).len(), 5);
        let end = start + SEG_BYTES + 1234;
        storage.truncate(end).unwrap();
        assert_eq!((storage.write_lsn(), storage.flush_lsn()), (end, end));
        assert_eq!(file_names(dir.path()), ["000000010000000000000010", "000000010000000000000011"]);
        let second = fs::read(dir.path().join("000000010000000000000011")).unwrap();
        assert_eq!(second[..1234], pattern(start + SEG_BYTES, 1234)[..]);
        assert!(second[1234..].iter().all(|&b| b == 0), "tail above the truncation point is zero");
        // Idempotent.
        storage.truncate(end).unwrap();
        assert_eq!(file_names(dir.path()).len(), 2);
        // Writing continues at the new end and creates segments again.
        append(&mut storage, SEG_BYTES);
        storage.sync().unwrap();
        let mut buf = vec![0; SEG_BYTES as usize];
        storage.read(end, &mut buf).unwrap();
        assert_eq!(buf, pattern(end, buf.len()));
        assert_eq!(file_names(dir.path()).len(), 3);
    }

    #[test]
    fn truncation_to_a_segment_start_keeps_that_file_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let start = Lsn(SEG_BYTES);
        let mut storage = fresh(dir.path(), start);
        append(&mut storage, 2 * SEG_BYTES + 5);
        storage.truncate(start + SEG_BYTES).unwrap();
        assert_eq!(file_names(dir.path()), ["000000010000000000000001", "000000010000000000000002"]);
        assert!(fs::read(dir.path().join("000000010000000000000002")).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn reopen_finds_segments_and_waits_for_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let start = Lsn(SEG_BYTES);
        {
            let mut storage = fresh(dir.path(), start);
            append(&mut storage, SEG_BYTES + 500);
            storage.sync().unwrap();
        }
        fs::write(dir.path().join(format!("000000010000000000000003{TEMP_SEGMENT_SUFFIX}")), b"junk").unwrap();
        let mut storage = SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first()).unwrap();
        assert!(storage.is_recovery_pending());
        assert_eq!((storage.start_lsn(), storage.files_end_lsn()), (start, Lsn(3 * SEG_BYTES)));
        assert!(
            !dir.path().join(format!("000000010000000000000003{TEMP_SEGMENT_SUFFIX}")).exists(),
            "temp file removed"
        );
        // Before recovery, the whole files are readable (recovery scans them).
        let mut buf = vec![0; 600];
        storage.read(start + SEG_BYTES, &mut buf).unwrap();
        assert_eq!(buf[..500], pattern(start + SEG_BYTES, 500)[..]);
        storage.set_recovered_end(start, start + SEG_BYTES + 200).unwrap();
        assert_eq!(storage.flush_lsn(), start + SEG_BYTES + 200);
        storage.read(start + SEG_BYTES, &mut buf[..200]).unwrap();
        assert!(storage.read(start + SEG_BYTES, &mut buf[..201]).is_err());
        let second = fs::read(dir.path().join("000000010000000000000002")).unwrap();
        assert!(second[200..].iter().all(|&b| b == 0));
    }

    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
        file_names(dir).into_iter().map(|n| (n.clone(), fs::read(dir.join(n)).unwrap())).collect()
    }

    /// Bad input: a short or long segment is reported, named, and untouched.
    #[test]
    fn wrong_size_segments_are_reported_and_left_untouched() {
        for (label, new_len) in [("truncated", SEG_BYTES - 1000), ("too long", SEG_BYTES + 1)] {
            let dir = tempfile::tempdir().unwrap();
            {
                let mut storage = fresh(dir.path(), Lsn(SEG_BYTES));
                append(&mut storage, SEG_BYTES + 10);
                storage.sync().unwrap();
            }
            let victim = dir.path().join("000000010000000000000002");
            File::options().write(true).open(&victim).unwrap().set_len(new_len).unwrap();
            let before = snapshot(dir.path());
            let err = SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first()).err().expect(label);
            let StorageError::CorruptSegment { path, reason } = &err else { panic!("{label}: unexpected {err}") };
            assert!(path.ends_with("000000010000000000000002"), "{label}: {err}");
            assert!(reason.contains(&new_len.to_string()) && reason.contains(&SEG_BYTES.to_string()), "{label}: {err}");
            assert_eq!(snapshot(dir.path()), before, "{label}: files must be unchanged");
        }
    }

    #[test]
    fn a_gap_or_a_bad_name_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut storage = fresh(dir.path(), Lsn(SEG_BYTES));
            append(&mut storage, 2 * SEG_BYTES + 10);
            storage.sync().unwrap();
        }
        fs::rename(dir.path().join("000000010000000000000002"), dir.path().join("keep")).unwrap();
        let err = SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first()).err().unwrap();
        assert!(err.to_string().contains("000000010000000000000002") && err.to_string().contains("missing"), "{err}");
        fs::rename(dir.path().join("keep"), dir.path().join("000000010000000000000002")).unwrap();
        fs::write(dir.path().join("000000010000000000001000"), vec![0; SEG_BYTES as usize]).unwrap();
        let err = SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first()).err().unwrap();
        assert!(err.to_string().contains("000000010000000000001000"), "{err}");
    }
}
