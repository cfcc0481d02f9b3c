//! The CopyBoth phase: WAL and keepalives in, standby status updates out.
//!
//! Cancel safety: [`ReplicationStream::next_event`] and
//! [`ReplicationStream::send_status`] keep all their state (partly read
//! frames, partly written status messages) in the stream, so either may be
//! dropped at an await point inside `tokio::select!` and called again later
//! without losing or duplicating bytes. They take `&mut self`, so one task
//! drives both: select on `next_event()` and a timer, and call `send_status`
//! from the branch bodies.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes};
use net::stream::{ReadHalf, WriteHalf};
use postgres_protocol::message::frontend;
use postgres_wal::lsn::Lsn;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, trace};

use super::config::ReplicationConfig;
use super::wire::{parse_server_error, tag, Body, Frame, FrameReader, FrameWriter};
use super::ReplicationError;

/// Postgres timestamps count from 2000-01-01 00:00:00 UTC.
const POSTGRES_EPOCH_UNIX_SECONDS: u64 = 946_684_800;
/// 'r' + write + flush + apply + client time + reply flag.
const STATUS_UPDATE_BYTES: usize = 1 + 8 + 8 + 8 + 8 + 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// WAL bytes `[start, start + data.len())`; `wal_end` is the server's
    /// end of WAL when it sent them.
    XLogData { start: Lsn, wal_end: Lsn, send_time_us: i64, data: Bytes },
    /// The stream already answered a `reply_requested` keepalive with the
    /// last reported positions; callers with newer positions may send them.
    Keepalive { wal_end: Lsn, send_time_us: i64, reply_requested: bool },
    /// The server ended the stream (CopyDone: timeline switch or shutdown).
    End,
}

/// Positions last reported to the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StandbyStatus {
    pub write: Lsn,
    pub flush: Lsn,
    pub apply: Lsn,
}

pub struct ReplicationStream {
    reader: FrameReader<ReadHalf>,
    writer: FrameWriter<WriteHalf>,
    io_timeout_ms: u64,
    stream_timeout_ms: u64,
    last_received_at: Instant,
    /// A reply-requested status went out for the current silence.
    pinged: bool,
    last_status: StandbyStatus,
    /// Where the next XLogData must start: the stream has no gaps.
    received_end: Lsn,
    ended: bool,
}

impl ReplicationStream {
    pub(crate) fn new(
        reader: FrameReader<ReadHalf>,
        writer: FrameWriter<WriteHalf>,
        config: &ReplicationConfig,
        start: Lsn,
    ) -> Self {
        ReplicationStream {
            reader,
            writer,
            io_timeout_ms: config.io_timeout_ms,
            stream_timeout_ms: config.stream_timeout_ms,
            last_received_at: Instant::now(),
            pinged: false,
            last_status: StandbyStatus::default(),
            received_end: start,
            ended: false,
        }
    }

    /// LSN just past the last WAL byte received.
    pub fn received_end(&self) -> Lsn {
        self.received_end
    }

    pub fn last_status(&self) -> StandbyStatus {
        self.last_status
    }

    /// The next event. Cancel-safe (see the module docs).
    ///
    /// A walsender that hears from us regularly sends nothing while idle, so
    /// silence alone proves nothing: after half of `stream_timeout_ms` without
    /// a byte the stream re-sends the last status with reply requested, and
    /// only after the whole timeout does it fail.
    pub async fn next_event(&mut self) -> Result<ReplicationEvent, ReplicationError> {
        loop {
            if let Some(event) = self.try_next_event()? {
                return Ok(event);
            }
            let silence = Duration::from_millis(self.stream_timeout_ms);
            let now = Instant::now();
            if now >= self.last_received_at + silence {
                return Err(ReplicationError::Timeout {
                    what: "waiting for the walsender",
                    timeout_ms: self.stream_timeout_ms,
                });
            }
            let ping_at = self.last_received_at + silence / 2;
            if !self.pinged && now >= ping_at {
                debug!(silence_ms = (now - self.last_received_at).as_millis() as u64, "pinging the walsender");
                self.queue_status(self.last_status, true)?;
                self.pinged = true;
            }
            let wake_at = if self.pinged { self.last_received_at + silence } else { ping_at };
            let writing = self.writer.has_pending();
            tokio::select! {
                filled = self.reader.fill() => {
                    filled?;
                    self.last_received_at = Instant::now();
                    self.pinged = false;
                }
                flushed = self.writer.flush(), if writing => flushed?,
                () = sleep_until(wake_at) => {}
            }
        }
    }

    /// The caller is not reading for now (backpressure): silence while it
    /// does not listen proves nothing about the walsender, so the silence
    /// timeout counts from when it listens again.
    pub fn not_listening(&mut self) {
        self.last_received_at = Instant::now();
        self.pinged = false;
    }

    /// The next event if it is already buffered, without waiting: a caller
    /// drains a burst of WAL before acting on it once.
    pub fn try_next_event(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        while !self.ended {
            let Some(frame) = self.reader.try_frame()? else { return Ok(None) };
            if let Some(event) = self.handle(frame)? {
                return Ok(Some(event));
            }
        }
        Ok(Some(ReplicationEvent::End))
    }

    /// Report positions (a standby status update, 'r'). Postgres releases a
    /// synchronous commit once `flush` reaches it, and counts this client as
    /// a synchronous standby only while `flush` is non-zero. Cancel-safe: an
    /// interrupted write is finished by the next call of either method.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        self.queue_status(StandbyStatus { write, flush, apply }, reply_requested)?;
        self.writer.flush_within("sending a status update", self.io_timeout_ms).await
    }

    /// End streaming politely: CopyDone and Terminate, then drop the socket.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        if !self.ended {
            self.writer.queue(|buf| {
                frontend::copy_done(buf);
                Ok(())
            })?;
        }
        self.writer.queue(|buf| {
            frontend::terminate(buf);
            Ok(())
        })?;
        self.writer.flush_within("closing the stream", self.io_timeout_ms).await
    }

    fn queue_status(&mut self, status: StandbyStatus, reply_requested: bool) -> Result<(), ReplicationError> {
        let message = encode_status(status, postgres_now_us(SystemTime::now()), reply_requested);
        self.writer.queue(|buf| frontend::CopyData::new(&message[..]).map(|data| data.write(buf)))?;
        self.last_status = status;
        Ok(())
    }

    fn handle(&mut self, frame: Frame) -> Result<Option<ReplicationEvent>, ReplicationError> {
        match frame.tag {
            tag::COPY_DATA => {
                let event = parse_copy_data(frame.body)?;
                match &event {
                    ReplicationEvent::XLogData { start, data, .. } => self.accept_wal(*start, data.len())?,
                    ReplicationEvent::Keepalive { reply_requested: true, .. } => {
                        self.queue_status(self.last_status, false)?
                    }
                    _ => {}
                }
                Ok(Some(event))
            }
            tag::COPY_DONE => {
                // Answer so the server can send what follows (the next timeline).
                self.writer.queue(|buf| {
                    frontend::copy_done(buf);
                    Ok(())
                })?;
                self.ended = true;
                Ok(Some(ReplicationEvent::End))
            }
            // A walsender shutting down ends with CommandComplete ("COPY
            // 0", PG15 WalSndDone) and no CopyDone, once its standbys have
            // confirmed everything it sent: the end of this stream.
            tag::COMMAND_COMPLETE => {
                self.ended = true;
                Ok(Some(ReplicationEvent::End))
            }
            tag::ERROR_RESPONSE => Err(ReplicationError::Server(parse_server_error(frame)?)),
            tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS => Ok(None),
            _ => Err(ReplicationError::protocol(format!(
                "unexpected message {:?} while streaming",
                char::from(frame.tag)
            ))),
        }
    }

    /// A consensus leader must never see a gap or an overlap in WAL.
    fn accept_wal(&mut self, start: Lsn, len_bytes: usize) -> Result<(), ReplicationError> {
        if start != self.received_end {
            return Err(ReplicationError::protocol(format!(
                "XLogData starts at {start}, but the stream is at {}",
                self.received_end
            )));
        }
        let end = start
            .0
            .checked_add(len_bytes as u64)
            .ok_or_else(|| ReplicationError::protocol(format!("XLogData at {start} runs past the end of LSN space")))?;
        trace!(%start, len_bytes, "WAL received");
        self.received_end = Lsn(end);
        Ok(())
    }
}

/// A CopyData payload from a walsender: 'w' XLogData or 'k' keepalive.
pub(crate) fn parse_copy_data(payload: Bytes) -> Result<ReplicationEvent, ReplicationError> {
    let Some(&kind) = payload.first() else {
        return Err(ReplicationError::protocol("empty CopyData while streaming"));
    };
    let mut body = Body::new(kind, payload);
    body.u8()?;
    match kind {
        b'w' => {
            let start = Lsn(body.u64()?);
            let wal_end = Lsn(body.u64()?);
            let send_time_us = body.i64()?;
            Ok(ReplicationEvent::XLogData { start, wal_end, send_time_us, data: body.rest() })
        }
        b'k' => {
            let wal_end = Lsn(body.u64()?);
            let send_time_us = body.i64()?;
            let reply_requested = body.u8()? != 0;
            body.finish()?;
            Ok(ReplicationEvent::Keepalive { wal_end, send_time_us, reply_requested })
        }
        other => {
            Err(ReplicationError::protocol(format!("unknown CopyData kind {:?} while streaming", char::from(other))))
        }
    }
}

pub(crate) fn encode_status(
    status: StandbyStatus,
    client_time_us: i64,
    reply_requested: bool,
) -> [u8; STATUS_UPDATE_BYTES] {
    let mut message = [0u8; STATUS_UPDATE_BYTES];
    let mut out = &mut message[..];
    out.put_u8(b'r');
    out.put_u64(status.write.0);
    out.put_u64(status.flush.0);
    out.put_u64(status.apply.0);
    out.put_i64(client_time_us);
    out.put_u8(u8::from(reply_requested));
    debug_assert!(out.is_empty());
    message
}

/// Microseconds since 2000-01-01; a clock before that gives a negative value.
pub(crate) fn postgres_now_us(now: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS);
    match now.duration_since(epoch) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 'w' + start + wal_end + send_time.
    const XLOG_DATA_HEADER_BYTES: usize = 1 + 8 + 8 + 8;

    #[test]
    fn xlog_data_and_keepalive_parse() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x0100_0000u64.to_be_bytes());
        w.extend_from_slice(&0x0100_0010u64.to_be_bytes());
        w.extend_from_slice(&(-5i64).to_be_bytes());
        w.extend_from_slice(b"wal!");
        let event = parse_copy_data(Bytes::from(w.clone())).unwrap();
        assert_eq!(
            event,
            ReplicationEvent::XLogData {
                start: Lsn(0x0100_0000),
                wal_end: Lsn(0x0100_0010),
                send_time_us: -5,
                data: Bytes::from_static(b"wal!")
            }
        );
        // Every truncation of the header is a typed error.
        for len in 0..XLOG_DATA_HEADER_BYTES {
            assert!(parse_copy_data(Bytes::copy_from_slice(&w[..len])).is_err(), "len {len}");
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&9i64.to_be_bytes());
        k.push(1);
        let event = parse_copy_data(Bytes::from(k.clone())).unwrap();
        assert_eq!(event, ReplicationEvent::Keepalive { wal_end: Lsn(7), send_time_us: 9, reply_requested: true });
        k.push(0);
        assert!(parse_copy_data(Bytes::from(k)).is_err(), "trailing byte");
        assert!(parse_copy_data(Bytes::from_static(b"x123")).is_err());
    }

    #[test]
    fn status_layout_is_big_endian() {
        let status = StandbyStatus { write: Lsn(1), flush: Lsn(2), apply: Lsn(3) };
        let message = encode_status(status, 0x0102, true);
        assert_eq!(message[0], b'r');
        assert_eq!(&message[1..9], &1u64.to_be_bytes());
        assert_eq!(&message[9..17], &2u64.to_be_bytes());
        assert_eq!(&message[17..25], &3u64.to_be_bytes());
        assert_eq!(&message[25..33], &0x0102i64.to_be_bytes());
        assert_eq!(message[33], 1);
    }

    #[test]
    fn postgres_epoch() {
        let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECONDS);
        assert_eq!(postgres_now_us(epoch + Duration::from_micros(42)), 42);
        assert_eq!(postgres_now_us(epoch - Duration::from_micros(42)), -42);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_copy_data_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = parse_copy_data(Bytes::from(bytes));
        }
    }
}
