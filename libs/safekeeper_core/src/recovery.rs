//! Restart: find the end of valid WAL in a timeline directory.
//!
//! Why decoding finds a safe end: an acceptor acknowledges a flush LSN only
//! at a record boundary of WAL it has synced, so every acknowledged flush
//! LSN is the end of a complete, valid record on disk. Decoding forward from
//! a known record boundary and stopping at the first thing that is not a
//! complete valid record (a zero length, an empty page, a torn or garbage
//! tail, the end of the files) therefore ends at or beyond every flush LSN
//! ever acknowledged.
//!
//! Why it is cheap: decoding starts at the control file's `commit_lsn`, not
//! at the start of the WAL. The acceptor persists `commit_lsn` only once its
//! own flush LSN has passed it, so the WAL below it is durable and valid and
//! need not be re-read: the work is proportional to the WAL written since
//! the last control-file write, not to all WAL kept.
//!
//! Then everything above the end is durably zeroed or removed (see
//! [`SegmentStorage::set_recovered_end`]): stale bytes from a dead proposer's
//! term must never be resurrected when later WAL makes them reachable.
//! Recovery is idempotent; if it is killed midway, the next run redoes it.

use std::path::Path;

use crate::control::ControlState;
use crate::storage::control_file::FileControlStore;
use crate::storage::segments::{dir_has_segment_files, SegmentStorage};
use crate::storage::{StorageError, WalStorage};
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::wal::{DecodeStep, WalDecodeError, WalDecoder};

/// Bytes read from the segment files per decoder feed.
pub const RECOVERY_READ_CHUNK_BYTES: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("timeline directory {dir} holds WAL segments but no control file; refusing to guess whose WAL it is")]
    SegmentsWithoutControlFile { dir: String },
    #[error(
        "timeline directory {dir}: the control file's commit_lsn {commit_lsn} is outside the WAL on disk \
         ({wal_start}..{wal_end}); committed WAL is missing"
    )]
    CommittedWalMissing { dir: String, commit_lsn: Lsn, wal_start: Lsn, wal_end: Lsn },
}

/// Why the scan for the end of WAL stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanStop {
    /// The timeline holds no WAL yet.
    NoWal,
    /// A zero record length or empty page: the normal end of WAL.
    EndOfWal,
    /// A record or page that does not decode: a torn write or stale bytes.
    InvalidTail(WalDecodeError),
    /// The segment files ended (their last record was complete or cut off).
    EndOfFiles,
}

/// A timeline ready to serve: its durable state and its WAL, with write and
/// flush LSN at `end_lsn`.
pub struct RecoveredTimeline {
    pub control: ControlState,
    pub control_store: FileControlStore,
    pub storage: SegmentStorage,
    /// End of the last complete valid record, or `Lsn(0)` with no WAL.
    pub end_lsn: Lsn,
    /// Positioned at `end_lsn` to decode WAL appended from there; `None`
    /// while the timeline holds no WAL. (It does not check the first new
    /// record's `xl_prev`: a fresh decoder cannot know it.)
    pub decoder: Option<WalDecoder>,
    pub stop: ScanStop,
    /// Where decoding started (the commit LSN, or the start of the WAL).
    pub scan_start_lsn: Lsn,
    pub records_decoded: u64,
}

/// Recover the timeline in `dir`: `None` if it has no control file and no
/// segments (it was never created here).
pub fn recover_timeline(dir: &Path) -> Result<Option<RecoveredTimeline>, RecoveryError> {
    let Some(control) = FileControlStore::load(dir)? else {
        if dir_has_segment_files(dir)? {
            return Err(RecoveryError::SegmentsWithoutControlFile { dir: dir.display().to_string() });
        }
        return Ok(None);
    };
    let control_store = FileControlStore::new(dir)?;
    let mut storage = SegmentStorage::open(dir, control.wal_segment_size, &control.pg_timelines)?;
    let wal = recover_wal(&control, &mut storage)?;
    Ok(Some(RecoveredTimeline {
        control,
        control_store,
        storage,
        end_lsn: wal.end_lsn,
        decoder: wal.decoder,
        stop: wal.stop,
        scan_start_lsn: wal.scan_start_lsn,
        records_decoded: wal.records_decoded,
    }))
}

struct RecoveredWal {
    end_lsn: Lsn,
    decoder: Option<WalDecoder>,
    stop: ScanStop,
    scan_start_lsn: Lsn,
    records_decoded: u64,
}

impl RecoveredWal {
    fn empty() -> Self {
        RecoveredWal {
            end_lsn: Lsn::INVALID,
            decoder: None,
            stop: ScanStop::NoWal,
            scan_start_lsn: Lsn::INVALID,
            records_decoded: 0,
        }
    }
}

fn recover_wal(control: &ControlState, storage: &mut SegmentStorage) -> Result<RecoveredWal, RecoveryError> {
    let segment_size = control.wal_segment_size;
    let missing = |storage: &SegmentStorage| RecoveryError::CommittedWalMissing {
        dir: storage.dir().display().to_string(),
        commit_lsn: control.commit_lsn,
        wal_start: storage.start_lsn(),
        wal_end: storage.files_end_lsn(),
    };
    if !control.timeline_start_lsn.is_valid() {
        // No WAL was ever recorded in the control file. Segments here come
        // from an `initialize` whose control-file write never happened;
        // nothing in them was acknowledged, so roll it back.
        if control.commit_lsn.is_valid() {
            return Err(missing(storage));
        }
        storage.remove_all_segments()?;
        return Ok(RecoveredWal::empty());
    }
    if storage.start_lsn().is_valid() && storage.files_end_lsn() <= control.timeline_start_lsn {
        // Segments wholly below the timeline start are an empty WAL that a
        // bootstrap from a peer replaced: the control file already names
        // the new start, the storage had not moved yet (`restart_empty`).
        // They held nothing (a bootstrap requires an empty WAL).
        storage.remove_all_segments()?;
    }
    if !storage.start_lsn().is_valid() {
        // Crashed between the control-file write and creating the first
        // segment (of a new timeline or of a bootstrap): redo the creation.
        if control.commit_lsn > control.timeline_start_lsn {
            return Err(missing(storage));
        }
        let start = control.timeline_start_lsn;
        storage.initialize(start)?;
        let decoder = Some(decoder_at(start, start, segment_size));
        return Ok(RecoveredWal {
            end_lsn: start,
            decoder,
            stop: ScanStop::NoWal,
            scan_start_lsn: start,
            records_decoded: 0,
        });
    }
    let wal_start = storage.start_lsn();
    let scan_start = control.commit_lsn.max(wal_start);
    if scan_start > storage.files_end_lsn() {
        return Err(missing(storage));
    }
    let mut decoder = decoder_at(scan_start, wal_start, segment_size);
    let files_end = storage.files_end_lsn();
    let (stop, records_decoded) = decode_to_end(storage, &mut decoder, files_end)?;
    let end = decoder.boundary_lsn();
    if let ScanStop::InvalidTail(err) = &stop {
        tracing::info!(dir = %storage.dir().display(), %end, "WAL ends at an invalid tail: {err}");
    }
    storage.set_recovered_end(scan_start, end)?;
    let decoder = Some(resume_decoder(storage, end, segment_size)?);
    Ok(RecoveredWal { end_lsn: end, decoder, stop, scan_start_lsn: scan_start, records_decoded })
}

/// A decoder for WAL continuing at the record boundary `lsn`. At the first
/// byte of the WAL kept, the segment may begin with the tail of a record
/// from an earlier segment, which only `at_segment_start` knows to skip.
pub fn decoder_at(lsn: Lsn, wal_start: Lsn, segment_size: WalSegmentSize) -> WalDecoder {
    if lsn == wal_start {
        WalDecoder::at_segment_start(lsn, segment_size)
    } else {
        WalDecoder::at_record_boundary(lsn, segment_size)
    }
}

/// A decoder continuing the stored WAL at the record boundary `lsn`, which
/// checks that the next record links back to the last one stored.
pub fn resume_decoder(
    storage: &mut impl WalStorage,
    lsn: Lsn,
    segment_size: WalSegmentSize,
) -> Result<WalDecoder, StorageError> {
    let mut decoder = decoder_at(lsn, storage.start_lsn(), segment_size);
    if lsn != storage.start_lsn() {
        if let Some(prev) = last_record_start(storage, lsn, segment_size)? {
            decoder.expect_prev_record(prev);
        }
    }
    Ok(decoder)
}

/// Feed the stored WAL to `decoder` from its position until the WAL stops
/// being valid or `files_end` (the end of what may be read) is reached.
/// Reads at most one chunk past the end of valid WAL.
pub fn decode_to_end(
    storage: &mut impl WalStorage,
    decoder: &mut WalDecoder,
    files_end: Lsn,
) -> Result<(ScanStop, u64), StorageError> {
    let mut buf = vec![0u8; RECOVERY_READ_CHUNK_BYTES];
    let mut records = 0;
    loop {
        match decoder.next_record() {
            Ok(DecodeStep::Record(_)) => records += 1,
            Ok(DecodeStep::EndOfWal { .. }) => return Ok((ScanStop::EndOfWal, records)),
            Err(err) => return Ok((ScanStop::InvalidTail(err), records)),
            Ok(DecodeStep::NeedMoreInput) => {
                let pos = decoder.input_end_lsn();
                if pos >= files_end {
                    return Ok((ScanStop::EndOfFiles, records));
                }
                let len = ((files_end - pos) as usize).min(buf.len());
                storage.read(pos, &mut buf[..len])?;
                decoder.feed(&buf[..len]);
            }
        }
    }
}

/// The start of the last record that ends at or before `end` (a record
/// boundary of the stored WAL: a record's end, with or without its
/// alignment padding), or `None` if no record ends there within the WAL
/// still held. Decodes forward from a segment start (where the decoder can
/// begin: a continuation from the segment before is skipped), going one
/// segment further back while no record is found.
pub fn last_record_start(
    storage: &mut impl WalStorage,
    end: Lsn,
    segment_size: WalSegmentSize,
) -> Result<Option<Lsn>, StorageError> {
    if end <= storage.start_lsn() {
        return Ok(None);
    }
    let mut segment_start = Lsn(end.0 - 1).segment_start(segment_size);
    // Records report their end with the padding (Postgres's EndRecPtr);
    // a boundary may stop before it.
    let padded_end = end.align_up(8);
    let mut buf = vec![0u8; RECOVERY_READ_CHUNK_BYTES];
    while segment_start >= storage.start_lsn() {
        let mut decoder = WalDecoder::at_segment_start(segment_start, segment_size);
        let mut last = None;
        loop {
            match decoder.next_record() {
                Ok(DecodeStep::Record(record)) if record.end_lsn <= padded_end => last = Some(record.start_lsn),
                Ok(DecodeStep::NeedMoreInput) if decoder.input_end_lsn() < end => {
                    let pos = decoder.input_end_lsn();
                    let len = ((end - pos) as usize).min(buf.len());
                    storage.read(pos, &mut buf[..len])?;
                    decoder.feed(&buf[..len]);
                }
                // Past `end`, out of input, or invalid: what was found stands.
                _ => break,
            }
        }
        if last.is_some() {
            return Ok(last);
        }
        match segment_start.0.checked_sub(segment_size.bytes()) {
            Some(previous) => segment_start = Lsn(previous),
            None => break,
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::TermHistory;
    use crate::storage::ControlStore;
    use postgres_wal::timeline_history::PgTimelineHistory;
    use postgres_wal::wal::generator::WalGenerator;
    use safekeeper_protocol::ids::{ClusterId, SystemId, Term};
    use std::fs;

    const SEG_BYTES: u64 = 1 << 20;
    const SYSTEM_ID: u64 = 7_123_456_789;

    fn seg_size() -> WalSegmentSize {
        WalSegmentSize::new(SEG_BYTES).unwrap()
    }

    fn control(start: Lsn, commit: Lsn) -> ControlState {
        ControlState {
            cluster: ClusterId { system_id: SystemId(SYSTEM_ID), ..Default::default() },
            pg_version: 150_000,
            wal_segment_size: seg_size(),
            term: Term(1),
            term_history: TermHistory::default(),
            timeline_start_lsn: start,
            commit_lsn: commit,
            remote_consistent_lsn: Lsn::INVALID,
            membership: Default::default(),
            pg_timelines: Default::default(),
        }
    }

    /// Write `bytes` at `start`, split at segment boundaries.
    fn write_split(storage: &mut SegmentStorage, start: Lsn, bytes: &[u8]) {
        let mut pos = start;
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = ((pos.next_segment_start(seg_size()) - pos) as usize).min(rest.len());
            storage.write(pos, &rest[..len]).unwrap();
            rest = &rest[len..];
            pos = pos + len as u64;
        }
    }

    /// A timeline with `wal_bytes` of generated WAL and a control file whose
    /// commit_lsn is the record end nearest below `commit_at_bytes`.
    fn build_timeline(dir: &Path, wal_bytes: u64, commit_at_bytes: Option<u64>) -> (WalGenerator, Lsn) {
        let start = Lsn(4 * SEG_BYTES);
        let mut generator = WalGenerator::new(SYSTEM_ID, seg_size(), start);
        let mut commit = Lsn::INVALID;
        let mut seed = 0;
        while generator.end_lsn() < start + wal_bytes {
            if commit_at_bytes.is_some_and(|at| generator.end_lsn() <= start + at) {
                commit = generator.end_lsn();
            }
            generator.append_random_records(10, seed, 20_000);
            seed += 1;
        }
        let mut storage = SegmentStorage::open(dir, seg_size(), &PgTimelineHistory::first()).unwrap();
        storage.initialize(start).unwrap();
        let (from, bytes) = generator.take_bytes();
        write_split(&mut storage, from, &bytes);
        storage.sync().unwrap();
        FileControlStore::new(dir).unwrap().persist(&control(start, commit)).unwrap();
        (generator, commit)
    }

    /// The recovery cost rule: bytes read are the WAL since commit_lsn plus
    /// at most one read chunk, however much WAL is kept.
    #[test]
    fn recovery_reads_only_wal_since_commit_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let wal_bytes = 12 * SEG_BYTES;
        let (generator, commit) = build_timeline(dir.path(), wal_bytes, Some(wal_bytes - 300_000));
        let recovered = recover_timeline(dir.path()).unwrap().unwrap();
        assert_eq!(recovered.end_lsn, generator.end_lsn());
        assert_eq!(recovered.scan_start_lsn, commit);
        let read = recovered.storage.stats().bytes_read;
        let since_commit = generator.end_lsn() - commit;
        assert!(
            read <= since_commit + RECOVERY_READ_CHUNK_BYTES as u64,
            "read {read} bytes, WAL since commit {since_commit}"
        );

        // The same WAL without a checkpoint is scanned from the start.
        let dir = tempfile::tempdir().unwrap();
        let (generator, _) = build_timeline(dir.path(), wal_bytes, None);
        let recovered = recover_timeline(dir.path()).unwrap().unwrap();
        assert_eq!(recovered.end_lsn, generator.end_lsn());
        assert!(recovered.storage.stats().bytes_read >= wal_bytes);
    }

    #[test]
    fn torn_tail_is_cut_at_the_last_complete_record_and_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut generator, _) = build_timeline(dir.path(), 3 * SEG_BYTES, Some(SEG_BYTES));
        let good_end = generator.end_lsn();
        // A record whose second half never reached the disk, then garbage
        // in a later segment that must not survive either.
        generator.append_record(10, 0, 42, &[0xAB; 30_000]);
        let (from, bytes) = generator.take_bytes();
        {
            let mut storage = SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first()).unwrap();
            storage.set_recovered_end(storage.start_lsn(), good_end).unwrap();
            let half = &bytes[..bytes.len() / 2];
            assert_eq!(from, good_end);
            write_split(&mut storage, from, half);
            let torn_end = storage.write_lsn();
            let next = torn_end.next_segment_start(seg_size());
            write_split(&mut storage, torn_end, &vec![0x55; (next - torn_end) as usize]);
            write_split(&mut storage, next, &[0x77; 5000]);
            storage.sync().unwrap();
        }
        let mut recovered = recover_timeline(dir.path()).unwrap().unwrap();
        assert_eq!(recovered.end_lsn, good_end);
        assert!(matches!(recovered.stop, ScanStop::InvalidTail(_)), "{:?}", recovered.stop);
        assert_eq!(recovered.storage.files_end_lsn(), good_end.next_segment_start(seg_size()), "later segment removed");
        let tail_len = (recovered.storage.files_end_lsn() - good_end) as usize;
        let path = recovered.storage.segment_path(good_end.segment_no(seg_size()));
        let file = fs::read(path).unwrap();
        assert!(file[file.len() - tail_len..].iter().all(|&b| b == 0), "bytes above the end are zero");
        // The decoder continues at the end: appending the record again works.
        let mut decoder = recovered.decoder.take().unwrap();
        decoder.feed(&bytes);
        assert!(matches!(decoder.next_record(), Ok(DecodeStep::Record(r)) if r.start_lsn >= good_end));
        // Idempotent.
        drop(recovered);
        assert_eq!(recover_timeline(dir.path()).unwrap().unwrap().end_lsn, good_end);
    }

    #[test]
    fn missing_pieces() {
        // Nothing at all: a timeline never created here.
        let dir = tempfile::tempdir().unwrap();
        assert!(recover_timeline(dir.path()).unwrap().is_none());

        // Control file recorded a start but the first segment was never made.
        let start = Lsn(2 * SEG_BYTES);
        FileControlStore::new(dir.path()).unwrap().persist(&control(start, Lsn::INVALID)).unwrap();
        let recovered = recover_timeline(dir.path()).unwrap().unwrap();
        assert_eq!((recovered.end_lsn, recovered.storage.write_lsn()), (start, start));
        assert!(recovered.decoder.is_some());
        drop(recovered);

        // Segments created but the control file never named a start: rolled back.
        FileControlStore::new(dir.path()).unwrap().persist(&control(Lsn::INVALID, Lsn::INVALID)).unwrap();
        let recovered = recover_timeline(dir.path()).unwrap().unwrap();
        assert_eq!(recovered.end_lsn, Lsn::INVALID);
        assert!(recovered.decoder.is_none());
        assert!(!recovered.storage.start_lsn().is_valid());
        drop(recovered);

        // Committed WAL beyond the files: refuse.
        FileControlStore::new(dir.path()).unwrap().persist(&control(start, start + 3 * SEG_BYTES)).unwrap();
        SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first()).unwrap().initialize(start).unwrap();
        let err = recover_timeline(dir.path()).err().unwrap();
        assert!(matches!(err, RecoveryError::CommittedWalMissing { .. }), "{err}");

        // Segments without a control file: refuse.
        fs::remove_file(dir.path().join(crate::storage::control_file::CONTROL_FILE_NAME)).unwrap();
        let err = recover_timeline(dir.path()).err().unwrap();
        assert!(matches!(err, RecoveryError::SegmentsWithoutControlFile { .. }), "{err}");
    }

    /// A bootstrap from a peer (`restart_empty` after the control file
    /// named the new start) killed at any point: recovery ends at the old
    /// empty start if the control file still names it, else at the new
    /// start, and never keeps a segment below the start.
    #[test]
    fn a_bootstrap_killed_midway_recovers_at_one_start() {
        let (old_start, new_start) = (Lsn(2 * SEG_BYTES), Lsn(5 * SEG_BYTES));
        let dir = tempfile::tempdir().unwrap();
        let persist = |start: Lsn| FileControlStore::new(dir.path()).unwrap().persist(&control(start, start)).unwrap();
        let segment_files = || {
            let mut names: Vec<String> = fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .filter(|name| name.len() == postgres_wal::lsn::SEGMENT_FILE_NAME_LEN)
                .collect();
            names.sort();
            names
        };
        let name = |lsn: Lsn| lsn.segment_no(seg_size()).file_name(1, seg_size());
        persist(old_start);
        SegmentStorage::open(dir.path(), seg_size(), &PgTimelineHistory::first())
            .unwrap()
            .initialize(old_start)
            .unwrap();

        // Killed before the control file write: the old empty WAL.
        let recovered = recover_timeline(dir.path()).unwrap().unwrap();
        assert_eq!((recovered.end_lsn, recovered.storage.start_lsn()), (old_start, old_start));
        drop(recovered);

        // Killed after it, before the old segment went: the new start.
        persist(new_start);
        let recovered = recover_timeline(dir.path()).unwrap().unwrap();
        assert_eq!((recovered.end_lsn, recovered.storage.start_lsn()), (new_start, new_start));
        assert_eq!(segment_files(), vec![name(new_start)]);
        drop(recovered);

        // The whole step, then a restart: the same.
        persist(old_start);
        fs::remove_file(dir.path().join(name(new_start))).unwrap();
        let mut recovered = recover_timeline(dir.path()).unwrap().unwrap();
        persist(new_start);
        recovered.storage.restart_empty(new_start).unwrap();
        assert_eq!(segment_files(), vec![name(new_start)]);
        assert_eq!((recovered.storage.write_lsn(), recovered.storage.flush_lsn()), (new_start, new_start));
        drop(recovered);
        let recovered = recover_timeline(dir.path()).unwrap().unwrap();
        assert_eq!((recovered.end_lsn, recovered.storage.start_lsn()), (new_start, new_start));
    }
}
