//! Seed a safekeeper timeline from a Postgres `pg_wal` directory.
//!
//! The importer is a one-member proposer run in-process: it greets the
//! timeline's acceptor, wins a vote in a new term, announces itself with a
//! history that extends the acceptor's own log, and appends the WAL found in
//! `pg_wal` from the acceptor's flush LSN on, exactly as a networked proposer
//! would (segment-bounded appends, one sync per batch). It goes through the
//! same acceptor rules, so the result is byte-identical to `pg_wal` and a
//! repeated import only adds what is new. Used by `safekeeper import-pg-wal`
//! and by scripts/run-local.

use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use postgres_wal::lsn::{Lsn, SegmentNo, WalSegmentSize};
use postgres_wal::timeline_history::PgTimelineHistory;
use postgres_wal::wal::format::{LONG_PAGE_HEADER_BYTES, PG15_VERSION_NUM};
use postgres_wal::wal::{DecodeStep, WalDecoder};
use safekeeper_core::acceptor::{Acceptor, AcceptorConfig, RecoveredWal};
use safekeeper_core::control::{ControlState, TermStart};
use safekeeper_core::recovery::{recover_timeline, RecoveryError};
use safekeeper_core::storage::control_file::FileControlStore;
use safekeeper_core::storage::segments::SegmentStorage;
use safekeeper_core::timeline::{FileTimeline, Timeline, TimelineError};
use safekeeper_protocol::ids::{ClusterId, NodeId, SystemId, TenantId, Term, TimelineId};
use safekeeper_protocol::protocol::{
    AcceptorMessage, AppendRequest, Greeting, ProposerElected, ProposerMessage, VoteRequest, NO_PG_TIMELINE,
    PROTOCOL_VERSION,
};

/// WAL per append, like one replication message from Postgres.
pub const IMPORT_APPEND_BYTES: usize = 128 << 10;
/// Appends written before one sync (group commit).
pub const IMPORT_APPENDS_PER_SYNC: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{dir} holds no WAL segment files")]
    NoSegments { dir: String },
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} does not start with a PG15 long page header: {reason}")]
    NotPg15Wal { path: String, reason: String },
    #[error("the safekeeper's WAL ends at {flush_lsn}, but {dir} only holds WAL from {oldest_lsn}: the gap is gone")]
    WalGone { flush_lsn: Lsn, oldest_lsn: Lsn, dir: String },
    #[error("the safekeeper holds system {ours}, the WAL in pg_wal is from system {theirs}")]
    SystemMismatch { ours: SystemId, theirs: SystemId },
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    #[error("unexpected reply from the acceptor: {0}")]
    UnexpectedReply(String),
}

pub struct ImportRequest<'a> {
    /// The safekeeper data directory (the timeline lives under it).
    pub datadir: &'a Path,
    pub node_id: NodeId,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub pg_wal: &'a Path,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    pub term: Term,
    pub start_lsn: Lsn,
    pub flush_lsn: Lsn,
    pub imported_bytes: u64,
}

/// `<datadir>/<tenant>/<timeline>`.
pub fn timeline_dir(datadir: &Path, tenant_id: TenantId, timeline_id: TimelineId) -> PathBuf {
    datadir.join(tenant_id.to_string()).join(timeline_id.to_string())
}

/// The WAL in one `pg_wal` directory: its contiguous run of segments.
struct PgWal {
    dir: PathBuf,
    segment_size: WalSegmentSize,
    system_id: SystemId,
    first_segment: SegmentNo,
    segment_count: u64,
}

impl PgWal {
    fn open(dir: &Path) -> Result<PgWal, ImportError> {
        let io = |path: &Path, source| ImportError::Io { path: path.display().to_string(), source };
        let mut names: Vec<String> = fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        names.sort();
        let first = names.first().ok_or_else(|| ImportError::NoSegments { dir: dir.display().to_string() })?;
        let (segment_size, system_id) = read_long_header(&dir.join(first))?;
        let parse = |name: &str| SegmentNo::parse_file_name(name, segment_size).ok().map(|(_, segment)| segment);
        let first_segment = parse(first).ok_or_else(|| ImportError::NoSegments { dir: dir.display().to_string() })?;
        // Recycled future segments hold stale bytes but continue the run by
        // name; the decoder stops at them. A gap in names ends the run.
        let segment_count =
            names.iter().filter_map(|name| parse(name)).zip(first_segment.0..).take_while(|(s, n)| s.0 == *n).count();
        Ok(PgWal {
            dir: dir.to_path_buf(),
            segment_size,
            system_id,
            first_segment,
            segment_count: segment_count as u64,
        })
    }

    fn start_lsn(&self) -> Lsn {
        self.first_segment.start_lsn(self.segment_size)
    }

    fn end_of_files(&self) -> Lsn {
        SegmentNo(self.first_segment.0 + self.segment_count).start_lsn(self.segment_size)
    }

    fn read(&self, start: Lsn, len_bytes: usize) -> Result<Vec<u8>, ImportError> {
        use std::os::unix::fs::FileExt;
        let segment = start.segment_no(self.segment_size);
        let path = self.dir.join(segment.file_name(1, self.segment_size));
        let io = |source| ImportError::Io { path: path.display().to_string(), source };
        let file = fs::File::open(&path).map_err(io)?;
        let mut buf = vec![0u8; len_bytes];
        file.read_exact_at(&mut buf, start.segment_offset(self.segment_size)).map_err(io)?;
        Ok(buf)
    }

    /// End of the valid WAL from `start` (a record boundary, or a segment
    /// start when `from_segment_start`).
    fn end_of_valid_wal(&self, start: Lsn, from_segment_start: bool) -> Result<Lsn, ImportError> {
        let mut decoder = if from_segment_start {
            WalDecoder::at_segment_start(start, self.segment_size)
        } else {
            WalDecoder::at_record_boundary(start, self.segment_size)
        };
        let mut position = start;
        while position < self.end_of_files() {
            let len = IMPORT_APPEND_BYTES.min((position.next_segment_start(self.segment_size) - position) as usize);
            decoder.feed(&self.read(position, len)?);
            position = position + len as u64;
            // A zero length or bytes that do not decode end the valid WAL.
            if !matches!(decoder.decode_available(|_| {}), Ok(DecodeStep::NeedMoreInput)) {
                break;
            }
        }
        Ok(decoder.boundary_lsn())
    }
}

fn read_long_header(path: &Path) -> Result<(WalSegmentSize, SystemId), ImportError> {
    use std::io::Read;
    let not_wal = |reason: String| ImportError::NotPg15Wal { path: path.display().to_string(), reason };
    let mut header = [0u8; LONG_PAGE_HEADER_BYTES as usize];
    fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .map_err(|e| ImportError::Io { path: path.display().to_string(), source: e })?;
    let system_id = u64::from_le_bytes(header[24..32].try_into().expect("8 bytes"));
    let segment_size_bytes = u32::from_le_bytes(header[32..36].try_into().expect("4 bytes"));
    let segment_size = WalSegmentSize::new(u64::from(segment_size_bytes)).map_err(|e| not_wal(e.to_string()))?;
    Ok((segment_size, SystemId(system_id)))
}

/// Import everything new in `request.pg_wal` into the timeline.
pub fn import_pg_wal(request: &ImportRequest<'_>) -> Result<ImportSummary, ImportError> {
    let pg_wal = PgWal::open(request.pg_wal)?;
    let cluster =
        ClusterId { system_id: pg_wal.system_id, tenant_id: request.tenant_id, timeline_id: request.timeline_id };
    let dir = timeline_dir(request.datadir, request.tenant_id, request.timeline_id);
    fs::create_dir_all(&dir).map_err(|e| ImportError::Io { path: dir.display().to_string(), source: e })?;
    let mut timeline = open_timeline(&dir, request.node_id, cluster, pg_wal.segment_size)?;
    let ours = timeline.acceptor().state().cluster.system_id;
    if ours != cluster.system_id {
        return Err(ImportError::SystemMismatch { ours, theirs: cluster.system_id });
    }

    let term = elect(&mut timeline, cluster, &pg_wal)?;
    let start_lsn = timeline.acceptor().flush_lsn();
    if start_lsn < pg_wal.start_lsn() {
        let dir = pg_wal.dir.display().to_string();
        return Err(ImportError::WalGone { flush_lsn: start_lsn, oldest_lsn: pg_wal.start_lsn(), dir });
    }
    let from_segment_start = start_lsn == timeline.acceptor().state().timeline_start_lsn;
    let end_lsn = pg_wal.end_of_valid_wal(start_lsn, from_segment_start)?;
    stream(&mut timeline, cluster, term, &pg_wal, start_lsn, end_lsn)?;
    timeline.checkpoint()?;
    let flush_lsn = timeline.acceptor().flush_lsn();
    Ok(ImportSummary { term, start_lsn, flush_lsn, imported_bytes: flush_lsn - start_lsn })
}

fn open_timeline(
    dir: &Path,
    node_id: NodeId,
    cluster: ClusterId,
    segment_size: WalSegmentSize,
) -> Result<FileTimeline, ImportError> {
    let config = AcceptorConfig::default();
    if let Some(recovered) = recover_timeline(dir)? {
        return Ok(FileTimeline::from_recovered(recovered, node_id, config));
    }
    let state = ControlState::new_timeline(cluster, PG15_VERSION_NUM, segment_size);
    let storage = SegmentStorage::open(dir, segment_size, &PgTimelineHistory::first()).map_err(TimelineError::from)?;
    let control = FileControlStore::new(dir).map_err(TimelineError::from)?;
    let acceptor = Acceptor::new(node_id, config, state, RecoveredWal { end_lsn: Lsn::INVALID, decoder: None });
    Ok(Timeline::new(acceptor, storage, control))
}

/// Greet, win a vote in a new term and announce a history extending the
/// acceptor's own log (a one-member quorum's donor is that member).
fn elect(timeline: &mut FileTimeline, cluster: ClusterId, pg_wal: &PgWal) -> Result<Term, ImportError> {
    // The import speaks for whatever configuration the timeline holds.
    let generation = timeline.acceptor().state().membership.generation;
    let greeting = Greeting {
        protocol_version: PROTOCOL_VERSION,
        cluster,
        pg_version: PG15_VERSION_NUM,
        wal_segment_size_bytes: pg_wal.segment_size.bytes() as u32,
        proposer_id: [0; 16],
        generation,
        // The import names no Postgres timeline: it keeps the log's.
        pg_timeline: NO_PG_TIMELINE,
    };
    timeline.handle(ProposerMessage::Greeting(greeting))?;
    let term = Term(timeline.acceptor().term().0 + 1);
    let vote = match timeline.handle(ProposerMessage::VoteRequest(VoteRequest {
        cluster,
        term,
        generation,
        pg_timeline: NO_PG_TIMELINE,
    }))? {
        Some(AcceptorMessage::VoteResponse(vote)) if vote.vote_given => vote,
        other => return Err(ImportError::UnexpectedReply(format!("{other:?}"))),
    };
    let has_wal = vote.timeline_start_lsn.is_valid();
    let term_start_lsn = if has_wal { vote.flush_lsn } else { pg_wal.start_lsn() };
    let timeline_start_lsn = if has_wal { vote.timeline_start_lsn } else { pg_wal.start_lsn() };
    let mut history = vote.term_history;
    history.0.push(TermStart { term, start_lsn: term_start_lsn });
    let elected = ProposerElected {
        cluster,
        term,
        generation,
        term_start_lsn,
        timeline_start_lsn,
        term_history: history,
        pg_timelines: vote.pg_timelines,
    };
    timeline.handle(ProposerMessage::ProposerElected(elected))?;
    Ok(term)
}

/// Append `[start, end)` in segment-bounded chunks, one sync per batch.
fn stream(
    timeline: &mut FileTimeline,
    cluster: ClusterId,
    term: Term,
    pg_wal: &PgWal,
    start: Lsn,
    end: Lsn,
) -> Result<(), ImportError> {
    let generation = timeline.acceptor().state().membership.generation;
    let mut position = start;
    let mut appends_since_sync = 0;
    while position < end {
        let to_segment_end = position.next_segment_start(pg_wal.segment_size) - position;
        let len = (end - position).min(to_segment_end).min(IMPORT_APPEND_BYTES as u64) as usize;
        let wal = Bytes::from(pg_wal.read(position, len)?);
        // One member: whatever it flushes is committed.
        let commit_lsn = timeline.acceptor().flush_lsn();
        let end_lsn = position + len as u64;
        let append = AppendRequest { cluster, term, generation, begin_lsn: position, end_lsn, commit_lsn, wal };
        timeline.handle(ProposerMessage::AppendRequest(append))?;
        position = position + len as u64;
        appends_since_sync += 1;
        if appends_since_sync == IMPORT_APPENDS_PER_SYNC || position == end {
            timeline.sync_and_ack()?;
            appends_since_sync = 0;
        }
    }
    let flush_lsn = timeline.acceptor().flush_lsn();
    let heartbeat = AppendRequest {
        cluster,
        term,
        generation,
        begin_lsn: flush_lsn,
        end_lsn: flush_lsn,
        commit_lsn: flush_lsn,
        wal: Bytes::new(),
    };
    timeline.handle(ProposerMessage::AppendRequest(heartbeat))?;
    Ok(())
}
