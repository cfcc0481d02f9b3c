//! Serving committed WAL over HTTP: `GET .../wal` (a byte range, long poll)
//! and `GET .../segment/{name}` (one whole committed segment).
//!
//! Both read the segment files directly (`SegmentReader`), chunk by chunk on
//! blocking threads, and stream the chunks: memory per response is one
//! chunk, whatever the range. The range never goes past the commit LSN seen
//! when the response starts, and committed bytes never change, so reading
//! beside the owner thread needs no coordination with it. Retention may
//! remove a segment meanwhile: before the headers are sent that is a 410;
//! after, the body is cut short (the client sees fewer bytes than
//! `x-end-lsn` promised, or curl's "partial file").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use safekeeper_api::api;
use serde::Deserialize;

use super::{lookup, parse_lsn, ApiError, PeerAddr};
use crate::service::consumers::ConsumerKind;
use crate::service::registry::TimelineHandle;
use crate::service::wal_reader::ChunkReader;
use crate::service::ServiceState;
use postgres_wal::lsn::{Lsn, PgTimelineId, SegmentNo};
use postgres_wal::timeline_history::{parse_history_file_name, PgTimelineHistory};
use safekeeper_api::api::TimelineStatus;
use safekeeper_core::storage::StorageError;

/// Bytes read from disk and sent as one body chunk.
pub const READ_CHUNK_BYTES: usize = 1 << 20;
/// Longest long poll a client may ask for; larger `wait_ms` is clamped.
pub const MAX_WAIT_MS: u64 = 60_000;

#[derive(Deserialize)]
pub struct WalParams {
    start_lsn: Option<String>,
    end_lsn: Option<String>,
    wait_ms: Option<String>,
}

pub async fn get_wal(
    State(state): State<Arc<ServiceState>>,
    Path((tenant_id, timeline_id)): Path<(String, String)>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    params: Result<Query<WalParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let handle = lookup(&state, &tenant_id, &timeline_id)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let start = parse_lsn("start_lsn", params.start_lsn.as_deref().ok_or_else(|| missing("start_lsn"))?)?;
    let end_limit = params.end_lsn.as_deref().map(|text| parse_lsn("end_lsn", text)).transpose()?;
    if end_limit.is_some_and(|end| end < start) {
        return Err(ApiError::bad_request(format!("end_lsn {} is below start_lsn {start}", end_limit.unwrap())));
    }
    let wait = match params.wait_ms.as_deref() {
        None => Duration::ZERO,
        Some(text) => {
            let ms: u64 =
                text.parse().map_err(|_| ApiError::bad_request(format!("wait_ms: not a number: {text:?}")))?;
            Duration::from_millis(ms.min(MAX_WAIT_MS))
        }
    };
    let mut snapshot = handle.snapshot();
    check_kept(&snapshot, start)?;
    if snapshot.commit_lsn <= start && !wait.is_zero() {
        snapshot = wait_for_commit_past(&handle, start, wait).await;
        check_kept(&snapshot, start)?;
    }
    let end = snapshot.commit_lsn.min(end_limit.unwrap_or(Lsn(u64::MAX))).max(start);
    let body = stream_range(&handle, &snapshot, start, end, ConsumerKind::Http, peer, 0).await?;
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_str(&value).expect("LSNs are ASCII"));
    };
    set(api::HEADER_START_LSN, start.to_string());
    set(api::HEADER_END_LSN, end.to_string());
    set(api::HEADER_COMMIT_LSN, snapshot.commit_lsn.to_string());
    set(api::HEADER_FLUSH_LSN, snapshot.flush_lsn.to_string());
    set(api::HEADER_TERM, snapshot.term.0.to_string());
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(response)
}

pub async fn get_segment(
    State(state): State<Arc<ServiceState>>,
    Path((tenant_id, timeline_id, name)): Path<(String, String, String)>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
) -> Result<Response, ApiError> {
    let handle = lookup(&state, &tenant_id, &timeline_id)?;
    let snapshot = handle.snapshot();
    if let Some(timeline) = parse_history_file_name(&name) {
        return history_file(&snapshot.pg_timelines, timeline, &name);
    }
    let segment_size = snapshot.wal_seg_size;
    let (segment_name, partial) = match name.strip_suffix(PARTIAL_SUFFIX) {
        Some(segment_name) => (segment_name, true),
        None => (name.as_str(), false),
    };
    let (pg_timeline, segment) = SegmentNo::parse_file_name(segment_name, segment_size)
        .map_err(|e| ApiError::bad_request(format!("segment name: {e}")))?;
    let not_found = |why: String| ApiError::new(StatusCode::NOT_FOUND, format!("segment {name}: {why}"));
    let stored_timeline = snapshot.pg_timelines.timeline_of_segment(segment, segment_size);
    if pg_timeline != stored_timeline {
        return Err(not_found(format!(
            "this segment is on Postgres timeline {stored_timeline} here, as {}",
            snapshot.pg_timelines.segment_file_name(segment, segment_size)
        )));
    }
    let start = segment.start_lsn(segment_size);
    let end = start
        .checked_add(segment_size.bytes())
        .ok_or_else(|| not_found("past the end of the LSN space".to_string()))?;
    if !snapshot.timeline_start_lsn.is_valid() || start < snapshot.timeline_start_lsn {
        return Err(not_found(format!("before this timeline's WAL starts ({})", snapshot.timeline_start_lsn)));
    }
    check_kept(&snapshot, start)?;
    let commit_lsn = snapshot.commit_lsn;
    if commit_lsn < end && !partial {
        return Err(not_found(format!(
            "not fully committed yet (commit LSN {commit_lsn}); its committed part is {segment_name}{PARTIAL_SUFFIX}"
        )));
    }
    if partial && commit_lsn <= start {
        return Err(not_found(format!("nothing of it is committed yet (commit LSN {commit_lsn})")));
    }
    // A `.partial` segment is the committed bytes, zeros after them (as
    // pg_receivewal leaves its last segment).
    let committed_end = end.min(commit_lsn);
    let padding_bytes = end - committed_end;
    let body = stream_range(&handle, &snapshot, start, committed_end, ConsumerKind::Http, peer, padding_bytes).await?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::CONTENT_LENGTH, HeaderValue::from(segment_size.bytes())),
        ],
        body,
    )
        .into_response())
}

/// `0000000N.history` as a `restore_command` asks for it: timeline N's
/// history, if N is a timeline of this log that had ancestors. (A standby
/// following `latest` asks for the next id too: not found until a
/// promotion creates it.)
fn history_file(history: &PgTimelineHistory, timeline: PgTimelineId, name: &str) -> Result<Response, ApiError> {
    let of_timeline = history.of_ancestor(timeline).filter(|history| !history.switches.is_empty());
    let Some(of_timeline) = of_timeline else {
        let why = format!(
            "this log is on Postgres timeline {}, which has no timeline {timeline} with a history",
            history.current
        );
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("history file {name}: {why}")));
    };
    let text = of_timeline.file_text();
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], text).into_response())
}

fn missing(name: &str) -> ApiError {
    ApiError::bad_request(format!("query parameter {name} is required"))
}

/// 410 if `lsn` is below the WAL still kept.
fn check_kept(snapshot: &TimelineStatus, lsn: Lsn) -> Result<(), ApiError> {
    if snapshot.oldest_kept_lsn.is_valid() && lsn < snapshot.oldest_kept_lsn {
        return Err(ApiError::new(
            StatusCode::GONE,
            format!(
                "WAL at {lsn} was removed; this safekeeper keeps WAL from {} (start from a snapshot)",
                snapshot.oldest_kept_lsn
            ),
        ));
    }
    Ok(())
}

/// Wait up to `wait` for the commit LSN to pass `start`; the last snapshot.
async fn wait_for_commit_past(handle: &TimelineHandle, start: Lsn, wait: Duration) -> TimelineStatus {
    let mut snapshots = handle.watch_snapshot();
    // A closed channel (owner gone) or the timeout: answer with what we have.
    let _ = tokio::time::timeout(wait, snapshots.wait_for(|s| s.commit_lsn > start)).await;
    let latest = snapshots.borrow().clone();
    latest
}

/// The body streaming `[start, end)`. The first chunk is read before the
/// headers go out, so a removed segment is still a clean 410.
async fn stream_range(
    handle: &Arc<TimelineHandle>,
    snapshot: &TimelineStatus,
    start: Lsn,
    end: Lsn,
    kind: ConsumerKind,
    peer: SocketAddr,
    padding_bytes: u64,
) -> Result<Body, ApiError> {
    let chunks = ChunkReader::new(handle, snapshot.wal_seg_size, start, end, kind, peer.to_string());
    let (chunks, first) = chunks.next_chunk(READ_CHUNK_BYTES).await;
    let first = match first {
        None => return Ok(Body::empty()),
        Some(Ok(bytes)) => bytes,
        Some(Err(StorageError::SegmentRemoved { .. })) => {
            check_kept(&handle.snapshot(), start)?;
            return Err(ApiError::new(StatusCode::GONE, format!("WAL at {start} was removed meanwhile")));
        }
        Some(Err(error)) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())),
    };
    let rest = stream::unfold(Some(chunks), |chunks| async move {
        let (chunks, next) = chunks?.next_chunk(READ_CHUNK_BYTES).await;
        match next? {
            Ok(bytes) => Some((Ok(bytes), Some(chunks))),
            Err(error) => {
                tracing::warn!("WAL stream cut short: {error}");
                Some((Err(std::io::Error::other(error.to_string())), None))
            }
        }
    });
    let zero_chunks = padding_bytes.div_ceil(READ_CHUNK_BYTES as u64);
    let padding = stream::iter((0..zero_chunks).map(move |index| {
        let len = (padding_bytes - index * READ_CHUNK_BYTES as u64).min(READ_CHUNK_BYTES as u64);
        Ok(bytes::Bytes::from(vec![0u8; len as usize]))
    }));
    Ok(Body::from_stream(stream::once(async { Ok::<_, std::io::Error>(first) }).chain(rest).chain(padding)))
}

/// The suffix of a segment's committed part (`GET .../segment/<name>.partial`).
pub const PARTIAL_SUFFIX: &str = ".partial";
