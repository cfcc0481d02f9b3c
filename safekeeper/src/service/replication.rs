//! START_REPLICATION for standard physical replication clients
//! (pg_receivewal, a standby's walreceiver): the committed WAL, streamed as
//! a walsender streams it.
//!
//! CopyBoth, as in Postgres: we send XLogData (`'w'`, start, WAL end, send
//! time, bytes; at most [`MAX_XLOGDATA_BYTES`] each) and keepalives (`'k'`)
//! every [`KEEPALIVE_INTERVAL`]; the client sends status updates (`'r'`:
//! written/flushed/applied positions) and hot-standby feedback (`'h'`,
//! ignored: a safekeeper has no snapshots to protect). Only WAL below the
//! commit LSN is ever sent: a standby must never replay WAL that a new
//! proposer could still truncate.
//!
//! The one exception is our `TERM n` option: the elected proposer of term
//! n (`compute_shim sync-safekeepers`) reads its donor's log, which is the
//! new term's log, up to the flush LSN. It is served only while this
//! safekeeper's term is n and it accepted n's ProposerElected (so nothing
//! but a higher term can truncate what is read), and the stream ends with
//! an error as soon as the term moves.
//!
//! A task reads the client's messages (its silence for
//! [`CLIENT_SILENCE_TIMEOUT`] ends the stream, like `wal_sender_timeout`;
//! after half of it keepalives ask for a reply, as a walsender's do);
//! this task waits for the commit LSN to move and writes. A client that
//! stops reading is dropped after [`CLIENT_WRITE_TIMEOUT`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use net::stream::WriteHalf;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::commands::StartReplication;
use super::connection::{Reader, FRAME_TIMEOUT};
use super::consumers::ConsumerKind;
use super::errors::{sqlstate, PgError};
use super::pg_wire::{encode, printable, protocol_violation, read_frame, tag, WireError};
use super::registry::TimelineHandle;
use super::wal_reader::ChunkReader;
use postgres_wal::lsn::Lsn;
use safekeeper_api::api::TimelineStatus;
use safekeeper_core::storage::StorageError;

/// WAL bytes per XLogData message (Postgres's MAX_SEND_SIZE: 16 pages).
pub const MAX_XLOGDATA_BYTES: usize = 128 << 10;
/// WAL read from disk at once (split into several XLogData messages).
const READ_CHUNK_BYTES: usize = 1 << 20;
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Postgres's default `wal_sender_timeout`.
pub const CLIENT_SILENCE_TIMEOUT: Duration = Duration::from_secs(60);
pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Client messages during streaming are small (status: 34 bytes).
const MAX_CLIENT_MESSAGE_BYTES: usize = 1024;
/// Microseconds from the Unix epoch to Postgres's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// How a replication stream ended.
pub enum StreamEnd {
    /// The client sent CopyDone: the session goes on with queries.
    CopyDone(Reader),
    /// The client left (Terminate or a closed socket).
    Closed,
}

/// The end of what `request` may be sent: the commit LSN, or for the
/// proposer of the current term its flush LSN. An error once the term is
/// not (or no longer) the proposer's.
fn readable_end(snapshot: &TimelineStatus, request: &StartReplication) -> Result<Lsn, PgError> {
    let Some(term) = request.proposer_term else { return Ok(snapshot.commit_lsn) };
    if snapshot.term != term || snapshot.elected_term != Some(term) {
        let elected = snapshot.elected_term.map_or("none".to_string(), |elected| elected.to_string());
        return Err(PgError::error(
            sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "this safekeeper is not in term {term} with that term's proposer elected (term {}, elected {elected}): \
                 its log beyond the commit LSN is not term {term}'s",
                snapshot.term
            ),
        ));
    }
    Ok(snapshot.flush_lsn)
}

/// Check the request; an ERROR here leaves the session usable.
pub fn check_request(handle: &TimelineHandle, request: &StartReplication) -> Result<(), PgError> {
    let snapshot = handle.snapshot();
    readable_end(&snapshot, request)?;
    let start = request.start_lsn;
    let history = &snapshot.pg_timelines;
    let timeline = request.pg_timeline;
    // A proposer (`TERM n`) reads the log, whichever timelines wrote it.
    if request.proposer_term.is_none() {
        if !history.contains(timeline) {
            return Err(PgError::error(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!(
                    "requested timeline {timeline} is not in this server's history (its latest timeline is {})",
                    history.current
                ),
            ));
        }
        if let Some(end) = history.end_of(timeline).filter(|&end| start > end) {
            return Err(PgError::error(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!(
                    "requested starting point {start} on timeline {timeline} is not in this server's history: this \
                     server's history forked from timeline {timeline} at {end}"
                ),
            ));
        }
    }
    let kept_from = snapshot.oldest_kept_lsn.max(snapshot.timeline_start_lsn);
    if !kept_from.is_valid() || start < kept_from {
        let segment = history.segment_file_name(start.segment_no(snapshot.wal_seg_size), snapshot.wal_seg_size);
        return Err(PgError::error(
            sqlstate::UNDEFINED_FILE,
            format!(
                "requested WAL segment {segment} has already been removed (this safekeeper keeps WAL from {kept_from})"
            ),
        ));
    }
    if start > snapshot.flush_lsn {
        return Err(PgError::error(
            sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "requested starting point {start} is ahead of the WAL flush position of this server {}",
                snapshot.flush_lsn
            ),
        ));
    }
    Ok(())
}

/// Where a stream of an older Postgres timeline ends (its switch point),
/// and the timeline that follows; `None` for the latest timeline and for a
/// proposer reading the log.
fn timeline_end(snapshot: &TimelineStatus, request: &StartReplication) -> Option<(Lsn, u32)> {
    if request.proposer_term.is_some() {
        return None;
    }
    let (next, end) = snapshot.pg_timelines.successor_of(request.pg_timeline)?;
    Some((end, next))
}

/// After a historic timeline's WAL, as a walsender does: which timeline
/// comes next and where it starts, then the end of the command.
fn next_timeline_result(out: &mut BytesMut, next_timeline: u32, start: Lsn) {
    encode::row_description(out, &[("next_tli", encode::INT8_OID), ("next_tli_startpos", encode::TEXT_OID)]);
    encode::data_row(out, &[Some(&next_timeline.to_string()), Some(&start.to_string())]);
    encode::command_complete(out, "START_STREAMING");
}

/// Stream committed WAL (or the proposer's log, `TERM n`) from
/// `request.start_lsn` until the client ends, or, on an older Postgres
/// timeline, until its switch point: then the stream ends as a walsender
/// ends it (CopyDone, the client's CopyDone, the next timeline and where it
/// starts), and the client asks again on that timeline.
pub async fn run(
    handle: Arc<TimelineHandle>,
    request: &StartReplication,
    reader: Reader,
    write: &mut WriteHalf,
    peer: String,
) -> Result<StreamEnd, WireError> {
    let mut out = BytesMut::new();
    if let Some((end, next_timeline)) =
        timeline_end(&handle.snapshot(), request).filter(|&(end, _)| end == request.start_lsn)
    {
        // Nothing of that timeline left to send: no COPY at all.
        next_timeline_result(&mut out, next_timeline, end);
        write_bounded(write, &out).await?;
        return Ok(StreamEnd::CopyDone(reader));
    }
    encode::copy_both_response(&mut out);
    write_bounded(write, &out).await?;
    let mut snapshots = handle.watch_snapshot();
    let segment_size = snapshots.borrow().wal_seg_size;
    let start = request.start_lsn;
    let mut chunks = ChunkReader::new(&handle, segment_size, start, start, ConsumerKind::Replication, peer);
    let (from_client, mut client_messages) = mpsc::channel(16);
    let mut client = AbortOnDrop(tokio::spawn(read_client(reader, from_client)));
    let mut last_heard = Instant::now();
    let mut keepalive = tokio::time::interval(KEEPALIVE_INTERVAL);
    tracing::debug!(slot = ?request.slot, %start, "START_REPLICATION");
    loop {
        // Read anew each time: a promotion can end the requested timeline
        // while it streams (the history changes before any WAL of the new
        // timeline is committed, so nothing past the switch point was sent).
        let (mut end_lsn, switch) = {
            let snapshot = snapshots.borrow_and_update();
            (readable_end(&snapshot, request).map_err(PgError::into_fatal)?, timeline_end(&snapshot, request))
        };
        if let Some((switch_lsn, _)) = switch {
            end_lsn = end_lsn.min(switch_lsn);
        }
        chunks.extend_to(end_lsn);
        chunks = send_available(chunks, end_lsn, write).await?;
        if let Some((switch_lsn, next_timeline)) = switch.filter(|&(end, _)| chunks.position() == end) {
            return end_of_timeline(client, write, switch_lsn, next_timeline).await;
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() {
                let message = "the timeline's owner stopped; reconnect".to_string();
                return Err(PgError::fatal(sqlstate::ADMIN_SHUTDOWN, message).into());
            },
            message = client_messages.recv() => match message {
                Some(heard) => {
                    last_heard = Instant::now();
                    if let Some(reported_flush_lsn) = heard {
                        chunks.consumer().set_reported_flush(reported_flush_lsn);
                    }
                }
                // The reader task ended: CopyDone, Terminate or an error.
                None => break,
            },
            _ = keepalive.tick() => {
                let mut out = BytesMut::new();
                // Like a walsender: a client silent for half the timeout
                // is asked to answer (one with status replies turned off
                // answers only when asked).
                let reply_requested = last_heard.elapsed() >= CLIENT_SILENCE_TIMEOUT / 2;
                encode::copy_data(&mut out, &keepalive_message(end_lsn, reply_requested));
                write_bounded(write, &out).await?;
            }
        }
    }
    match (&mut client.0).await {
        Ok(Ok(Some(reader))) => {
            let mut out = BytesMut::new();
            encode::copy_done(&mut out);
            encode::command_complete(&mut out, "START_STREAMING");
            write_bounded(write, &out).await?;
            Ok(StreamEnd::CopyDone(reader))
        }
        Ok(Ok(None)) => Ok(StreamEnd::Closed),
        Ok(Err(error)) => Err(error),
        Err(join_error) => Err(PgError::fatal("XX000", format!("replication reader failed: {join_error}")).into()),
    }
}

/// The requested timeline's WAL is all sent: CopyDone, wait (bounded) for
/// the client's, then tell it the next timeline.
async fn end_of_timeline(
    mut client: AbortOnDrop<Result<Option<Reader>, WireError>>,
    write: &mut WriteHalf,
    switch_lsn: Lsn,
    next_timeline: u32,
) -> Result<StreamEnd, WireError> {
    let mut out = BytesMut::new();
    encode::copy_done(&mut out);
    write_bounded(write, &out).await?;
    let reader = match tokio::time::timeout(CLIENT_SILENCE_TIMEOUT, &mut client.0).await {
        Ok(Ok(Ok(Some(reader)))) => reader,
        Ok(Ok(Ok(None))) => return Ok(StreamEnd::Closed),
        Ok(Ok(Err(error))) => return Err(error),
        Ok(Err(join_error)) => {
            return Err(PgError::fatal("XX000", format!("replication reader failed: {join_error}")).into())
        }
        Err(_) => {
            let message =
                format!("the client did not end COPY within {} s after timeline end", CLIENT_SILENCE_TIMEOUT.as_secs());
            return Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, message).into());
        }
    };
    let mut out = BytesMut::new();
    next_timeline_result(&mut out, next_timeline, switch_lsn);
    write_bounded(write, &out).await?;
    Ok(StreamEnd::CopyDone(reader))
}

/// Send everything from the reader's position up to `end_lsn`.
async fn send_available(
    mut chunks: ChunkReader,
    end_lsn: Lsn,
    write: &mut WriteHalf,
) -> Result<ChunkReader, WireError> {
    loop {
        let start = chunks.position();
        let (next, chunk) = chunks.next_chunk(READ_CHUNK_BYTES).await;
        chunks = next;
        let bytes = match chunk {
            None => return Ok(chunks),
            Some(Ok(bytes)) => bytes,
            Some(Err(error @ StorageError::SegmentRemoved { .. })) => {
                return Err(PgError::fatal(sqlstate::UNDEFINED_FILE, error.to_string()).into())
            }
            Some(Err(error)) => return Err(PgError::fatal(sqlstate::IO_ERROR, error.to_string()).into()),
        };
        let mut out = BytesMut::with_capacity(bytes.len() + 64);
        let mut offset = 0;
        while offset < bytes.len() {
            let len = (bytes.len() - offset).min(MAX_XLOGDATA_BYTES);
            let piece = bytes.slice(offset..offset + len);
            encode::copy_data(&mut out, &xlogdata_message(start + offset as u64, end_lsn, &piece));
            offset += len;
        }
        write_bounded(write, &out).await?;
    }
}

async fn write_bounded(write: &mut WriteHalf, bytes: &[u8]) -> Result<(), WireError> {
    match tokio::time::timeout(CLIENT_WRITE_TIMEOUT, write.write_all(bytes)).await {
        Ok(result) => result.map_err(WireError::Disconnected),
        Err(_) => Err(WireError::Disconnected(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the replication client read nothing for {} s", CLIENT_WRITE_TIMEOUT.as_secs()),
        ))),
    }
}

/// Read the client's messages, passing on each status update's flush LSN.
/// `Some(reader)` after CopyDone, `None` after Terminate or a closed socket.
/// The reader task; aborted when the stream ends on any path (an error
/// return included), so it never outlives its connection.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Read the client's messages: each one is passed on (with the flush LSN
/// of a status update), so the stream knows the client is alive.
/// `Some(reader)` after CopyDone, `None` after Terminate or a closed socket.
async fn read_client(mut reader: Reader, heard: mpsc::Sender<Option<Lsn>>) -> Result<Option<Reader>, WireError> {
    loop {
        let frame = match tokio::time::timeout(
            CLIENT_SILENCE_TIMEOUT,
            read_frame(&mut reader, MAX_CLIENT_MESSAGE_BYTES, FRAME_TIMEOUT),
        )
        .await
        {
            Ok(Ok(frame)) => frame,
            Ok(Err(WireError::Disconnected(_))) => return Ok(None),
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                let message = format!(
                    "terminating replication: no message from the client for {} s",
                    CLIENT_SILENCE_TIMEOUT.as_secs()
                );
                return Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, message).into());
            }
        };
        match frame.tag {
            tag::COPY_DATA => {
                let flush_lsn = parse_client_message(&frame.body)?;
                // Full: the streaming side is busy; the next one will do.
                let _ = heard.try_send(flush_lsn);
            }
            tag::COPY_DONE => return Ok(Some(reader)),
            tag::TERMINATE => return Ok(None),
            other => {
                let message = format!("unexpected message type '{}' during START_REPLICATION", printable(other));
                return Err(protocol_violation(message).into());
            }
        }
    }
}

/// The flush LSN of a standby status update; `None` for hot-standby feedback.
fn parse_client_message(body: &Bytes) -> Result<Option<Lsn>, PgError> {
    match body.first() {
        // 'r', write, flush, apply (u64 each), send time (i64), reply requested (u8)
        Some(b'r') if body.len() == 34 => {
            let flush = u64::from_be_bytes(body[9..17].try_into().expect("8 bytes"));
            Ok(Some(Lsn(flush)))
        }
        Some(b'h') => Ok(None),
        Some(&kind) => Err(protocol_violation(format!(
            "unexpected replication message '{}' of {} bytes",
            printable(kind),
            body.len()
        ))),
        None => Err(protocol_violation("empty CopyData during START_REPLICATION".to_string())),
    }
}

fn xlogdata_message(start: Lsn, wal_end: Lsn, wal: &[u8]) -> BytesMut {
    let mut message = BytesMut::with_capacity(25 + wal.len());
    message.put_u8(b'w');
    message.put_u64(start.0);
    message.put_u64(wal_end.0);
    message.put_i64(pg_now_us());
    message.put_slice(wal);
    message
}

fn keepalive_message(wal_end: Lsn, reply_requested: bool) -> BytesMut {
    let mut message = BytesMut::with_capacity(18);
    message.put_u8(b'k');
    message.put_u64(wal_end.0);
    message.put_i64(pg_now_us());
    message.put_u8(u8::from(reply_requested));
    message
}

/// Now, in microseconds since 2000-01-01 (Postgres's timestamp epoch).
fn pg_now_us() -> i64 {
    let unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    unix_us - PG_EPOCH_OFFSET_US
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekeeper_protocol::ids::Term;

    /// Rule: a standby gets committed WAL only; the elected proposer of the
    /// current term (`TERM n`) gets the log up to the flush LSN, and nobody
    /// else does: not another term, not a term whose ProposerElected this
    /// safekeeper has not accepted.
    #[test]
    fn only_the_current_terms_proposer_reads_beyond_the_commit_lsn() {
        let status = |term: u64, elected: Option<u64>| TimelineStatus {
            term: Term(term),
            elected_term: elected.map(Term),
            commit_lsn: Lsn(100),
            flush_lsn: Lsn(500),
            ..TimelineStatus::default()
        };
        let request = |term: Option<u64>| StartReplication {
            slot: None,
            start_lsn: Lsn(0),
            pg_timeline: 1,
            proposer_term: term.map(Term),
        };
        assert_eq!(readable_end(&status(7, Some(7)), &request(None)).unwrap(), Lsn(100));
        assert_eq!(readable_end(&status(7, Some(7)), &request(Some(7))).unwrap(), Lsn(500));
        for (ours, elected, asked) in [(8, Some(8), 7), (7, None, 7), (7, Some(6), 7), (7, Some(7), 8)] {
            let error = readable_end(&status(ours, elected), &request(Some(asked))).unwrap_err();
            assert_eq!(error.code, sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE);
            assert!(error.message.contains(&format!("not in term {asked}")), "{}", error.message);
        }
    }

    /// Rule: a stream of an older Postgres timeline ends at its switch
    /// point and names the next timeline; the latest timeline and a
    /// proposer's read (`TERM n`) have no end.
    #[test]
    fn an_older_timeline_ends_at_its_switch_point() {
        use postgres_wal::timeline_history::{PgTimelineHistory, PgTimelineSwitch};
        let switch = |timeline, end| PgTimelineSwitch { timeline, end_lsn: Lsn(end), reason: String::new() };
        let status = TimelineStatus {
            pg_timelines: PgTimelineHistory { current: 3, switches: vec![switch(1, 0x100), switch(2, 0x200)] },
            ..TimelineStatus::default()
        };
        let request = |pg_timeline, proposer_term: Option<u64>| StartReplication {
            slot: None,
            start_lsn: Lsn(0),
            pg_timeline,
            proposer_term: proposer_term.map(Term),
        };
        assert_eq!(timeline_end(&status, &request(1, None)), Some((Lsn(0x100), 2)));
        assert_eq!(timeline_end(&status, &request(2, None)), Some((Lsn(0x200), 3)));
        assert_eq!(timeline_end(&status, &request(3, None)), None);
        assert_eq!(timeline_end(&status, &request(1, Some(4))), None);
    }

    #[test]
    fn status_updates_give_the_flush_lsn() {
        let mut body = BytesMut::new();
        body.put_u8(b'r');
        body.put_u64(0x10);
        body.put_u64(0x20);
        body.put_u64(0x30);
        body.put_i64(0);
        body.put_u8(0);
        assert_eq!(parse_client_message(&body.freeze()).unwrap(), Some(Lsn(0x20)));
        assert_eq!(parse_client_message(&Bytes::from_static(b"h123")).unwrap(), None);
        assert!(parse_client_message(&Bytes::from_static(b"r12")).is_err());
        assert!(parse_client_message(&Bytes::from_static(b"")).is_err());
        assert!(parse_client_message(&Bytes::from_static(b"z")).is_err());
    }

    #[test]
    fn xlogdata_layout_matches_postgres() {
        let message = xlogdata_message(Lsn(0x0102), Lsn(0x0304), b"wal");
        assert_eq!(message[0], b'w');
        assert_eq!(&message[1..9], &0x0102u64.to_be_bytes());
        assert_eq!(&message[9..17], &0x0304u64.to_be_bytes());
        assert_eq!(&message[25..], b"wal");
        let keepalive = keepalive_message(Lsn(7), false);
        assert_eq!((keepalive[0], keepalive.len(), keepalive[17]), (b'k', 18, 0));
        assert_eq!(keepalive_message(Lsn(7), true)[17], 1);
    }

    proptest::proptest! {
        /// Rule: any CopyData body from a replication client is a status, a
        /// feedback message or a typed error; never a panic.
        #[test]
        fn client_messages_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = parse_client_message(&Bytes::from(bytes));
        }
    }
}
