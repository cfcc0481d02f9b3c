//! Framing of backend messages (tag byte, big-endian i32 length including
//! itself, body) and parsing of the bodies this client needs, over a tokio
//! socket. The framing is `pq_wire`'s (shared with the safekeeper's server
//! side and the tests' client).
//!
//! We frame ourselves instead of using `postgres_protocol::message::backend`
//! because that parser does not know CopyBothResponse ('W') and would buffer
//! whatever length a peer declares; here the declared length is checked
//! against a limit before a byte of the body is stored. Frontend messages are
//! built with `postgres_protocol::message::frontend`.

use bytes::BytesMut;
use pq_wire::frame::FrameError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use super::error::{ReplicationError, ServerError};

/// How much spare room each socket read asks for.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Queued but unsent output beyond which the peer is deemed not reading.
pub(crate) const MAX_PENDING_WRITE_BYTES: usize = 64 * 1024;

pub(crate) use pq_wire::body::Body;
pub(crate) use pq_wire::frame::Frame;
pub(crate) use pq_wire::tag;

/// Reads frames from a byte stream. All state lives in `self`, so a
/// cancelled [`FrameReader::fill`] loses nothing (`read_buf` either appends
/// bytes or does not run).
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_message_bytes: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, max_message_bytes: usize) -> Self {
        FrameReader { io, buf: BytesMut::with_capacity(READ_CHUNK_BYTES), max_message_bytes }
    }

    /// A complete frame if one is buffered. The declared length is checked
    /// before the body is waited for, so an absurd length fails at once.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        pq_wire::frame::decode_frame(&mut self.buf, self.max_message_bytes).map_err(|error| match error {
            FrameError::TooLarge { tag, declared, max_body_bytes, .. } => ReplicationError::MessageTooLarge {
                tag: char::from(tag),
                len_bytes: u64::from(declared),
                max_bytes: max_body_bytes,
            },
            FrameError::LengthTooShort { .. } => ReplicationError::protocol(error.to_string()),
        })
    }

    /// Read whatever the socket has (at least one byte). Cancel-safe.
    pub async fn fill(&mut self) -> Result<(), ReplicationError> {
        self.buf.reserve(READ_CHUNK_BYTES);
        match self.io.read_buf(&mut self.buf).await? {
            0 => Err(ReplicationError::UnexpectedEof),
            _ => Ok(()),
        }
    }

    /// The next frame, each socket read bounded by `timeout_ms`.
    pub async fn next_frame(&mut self, what: &'static str, timeout_ms: u64) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            let deadline = deadline_after_ms(timeout_ms);
            timeout_at(deadline, self.fill()).await.map_err(|_| ReplicationError::Timeout { what, timeout_ms })??;
        }
    }
}

/// Queues frontend messages and writes them out. Unsent bytes stay queued,
/// so a cancelled [`FrameWriter::flush`] resumes where it stopped.
pub(crate) struct FrameWriter<W> {
    io: W,
    out: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W) -> Self {
        FrameWriter { io, out: BytesMut::new() }
    }

    /// Append a message built by a `postgres_protocol::message::frontend` function.
    pub fn queue(&mut self, build: impl FnOnce(&mut BytesMut) -> std::io::Result<()>) -> Result<(), ReplicationError> {
        if self.out.len() > MAX_PENDING_WRITE_BYTES {
            return Err(ReplicationError::protocol(format!(
                "over {MAX_PENDING_WRITE_BYTES} bytes queued for the server: it is not reading"
            )));
        }
        build(&mut self.out)?;
        Ok(())
    }

    pub fn has_pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// Write everything queued. Cancel-safe.
    pub async fn flush(&mut self) -> Result<(), ReplicationError> {
        while !self.out.is_empty() {
            if self.io.write_buf(&mut self.out).await? == 0 {
                return Err(ReplicationError::Io(std::io::ErrorKind::WriteZero.into()));
            }
        }
        self.io.flush().await?;
        Ok(())
    }

    pub async fn flush_within(&mut self, what: &'static str, timeout_ms: u64) -> Result<(), ReplicationError> {
        timeout_at(deadline_after_ms(timeout_ms), self.flush())
            .await
            .map_err(|_| ReplicationError::Timeout { what, timeout_ms })?
    }
}

pub(crate) fn deadline_after_ms(timeout_ms: u64) -> Instant {
    Instant::now() + std::time::Duration::from_millis(timeout_ms)
}

/// ErrorResponse / NoticeResponse fields.
pub(crate) fn parse_server_error(frame: Frame) -> Result<ServerError, ReplicationError> {
    Ok(pq_wire::error_fields::parse_error_fields(frame.tag, frame.body)?)
}

/// A DataRow as text columns (the simple query protocol returns text).
pub(crate) fn parse_data_row(frame: Frame) -> Result<Vec<Option<String>>, ReplicationError> {
    Ok(pq_wire::body::parse_data_row(frame.body)?)
}

/// The column count of a RowDescription (names and types are not needed:
/// every helper knows the shape of its command's answer).
pub(crate) fn parse_row_description(frame: Frame) -> Result<usize, ReplicationError> {
    Ok(pq_wire::body::parse_row_description(frame.body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reader_over(bytes: &[u8], max: usize) -> FrameReader<&[u8]> {
        let mut reader = FrameReader::new(&[][..], max);
        reader.buf.extend_from_slice(bytes);
        reader
    }

    #[test]
    fn frames_split_and_reject_bad_lengths() {
        let mut reader = reader_over(b"Z\0\0\0\x05IC\0\0\0\x04", 16);
        let frame = reader.try_frame().unwrap().unwrap();
        assert_eq!((frame.tag, &frame.body[..]), (b'Z', &b"I"[..]));
        let frame = reader.try_frame().unwrap().unwrap();
        assert_eq!((frame.tag, frame.body.len()), (b'C', 0));
        assert!(reader.try_frame().unwrap().is_none());

        // The limit applies before the body arrives.
        let mut reader = reader_over(b"HTTP/1.1 400", 16 << 20);
        assert!(matches!(reader.try_frame(), Err(ReplicationError::MessageTooLarge { tag: 'H', .. })));
        let mut reader = reader_over(b"Z\0\0\0\x03", 16);
        assert!(matches!(reader.try_frame(), Err(ReplicationError::Protocol(_))));
    }

    #[test]
    fn error_response_fields() {
        let body = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0";
        let error = parse_server_error(Frame { tag: b'E', body: Bytes::from_static(body) }).unwrap();
        assert_eq!((error.severity.as_str(), error.code.as_str()), ("FATAL", "28P01"));
        let truncated = Frame { tag: b'E', body: Bytes::from_static(b"C28P01") };
        assert!(parse_server_error(truncated).is_err());
    }
}
