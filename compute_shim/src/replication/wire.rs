//! Framing of backend messages (tag byte, big-endian i32 length including
//! itself, body) and parsing of the bodies this client needs.
//!
//! We frame ourselves instead of using `postgres_protocol::message::backend`
//! because that parser does not know CopyBothResponse ('W') and would buffer
//! whatever length a peer declares; here the declared length is checked
//! against a limit before a byte of the body is stored. Frontend messages are
//! built with `postgres_protocol::message::frontend`.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use super::error::{ReplicationError, ServerError};

/// How much spare room each socket read asks for.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Queued but unsent output beyond which the peer is deemed not reading.
pub(crate) const MAX_PENDING_WRITE_BYTES: usize = 64 * 1024;
/// Tag byte and length word.
const HEADER_BYTES: usize = 5;

pub(crate) mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// One backend message: its tag and body (without the length word).
pub(crate) struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    pub fn tag_char(&self) -> char {
        char::from(self.tag)
    }
}

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
        let Some(header) = self.buf.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let tag = header[0];
        let declared = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let Some(body_len) = declared.checked_sub(4) else {
            return Err(ReplicationError::protocol(format!(
                "message {:?} declares length {declared}, less than its own length word",
                char::from(tag)
            )));
        };
        let body_len = body_len as usize;
        if body_len > self.max_message_bytes {
            return Err(ReplicationError::MessageTooLarge {
                tag: char::from(tag),
                len_bytes: u64::from(declared),
                max_bytes: self.max_message_bytes,
            });
        }
        if self.buf.len() < HEADER_BYTES + body_len {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(HEADER_BYTES + body_len);
        frame.advance(HEADER_BYTES);
        Ok(Some(Frame { tag, body: frame.freeze() }))
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

/// Bounds-checked reads from a message body; running short is a typed error.
pub(crate) struct Body {
    bytes: Bytes,
    what: char,
}

impl Body {
    pub fn new(frame: Frame) -> Self {
        let what = frame.tag_char();
        Body { bytes: frame.body, what }
    }

    /// For sub-messages (CopyData payloads) named by their own kind byte.
    pub fn of_bytes(bytes: Bytes, what: char) -> Self {
        Body { bytes, what }
    }

    fn truncated(&self, wanted: usize) -> ReplicationError {
        ReplicationError::protocol(format!(
            "message {:?} is truncated: wanted {wanted} more bytes, {} left",
            self.what,
            self.bytes.len()
        ))
    }

    pub fn take(&mut self, len: usize) -> Result<Bytes, ReplicationError> {
        if self.bytes.len() < len {
            return Err(self.truncated(len));
        }
        Ok(self.bytes.split_to(len))
    }

    pub fn u8(&mut self) -> Result<u8, ReplicationError> {
        Ok(self.take(1)?[0])
    }

    pub fn i16(&mut self) -> Result<i16, ReplicationError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, ReplicationError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, ReplicationError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    pub fn i64(&mut self) -> Result<i64, ReplicationError> {
        Ok(self.u64()? as i64)
    }

    /// A NUL-terminated string.
    pub fn cstr(&mut self) -> Result<String, ReplicationError> {
        let Some(nul) = self.bytes.iter().position(|b| *b == 0) else {
            return Err(ReplicationError::protocol(format!("message {:?} has an unterminated string", self.what)));
        };
        let text = self.take(nul)?;
        self.bytes.advance(1);
        utf8(text, self.what)
    }

    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.bytes)
    }

    /// Trailing bytes mean we and the peer disagree about the layout.
    pub fn finish(self) -> Result<(), ReplicationError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(ReplicationError::protocol(format!(
                "message {:?} has {} unexpected trailing bytes",
                self.what,
                self.bytes.len()
            )))
        }
    }
}

fn utf8(bytes: Bytes, what: char) -> Result<String, ReplicationError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ReplicationError::protocol(format!("message {what:?} holds text that is not UTF-8")))
}

/// ErrorResponse / NoticeResponse fields.
pub(crate) fn parse_server_error(frame: Frame) -> Result<ServerError, ReplicationError> {
    let mut body = Body::new(frame);
    let mut error = ServerError::default();
    let mut localized_severity = String::new();
    loop {
        let field = body.u8()?;
        if field == 0 {
            break;
        }
        let value = body.cstr()?;
        match field {
            b'V' => error.severity = value,
            b'S' => localized_severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            b'D' => error.detail = Some(value),
            b'H' => error.hint = Some(value),
            _ => {}
        }
    }
    body.finish()?;
    if error.severity.is_empty() {
        error.severity = localized_severity;
    }
    Ok(error)
}

/// A DataRow as text columns (the simple query protocol returns text).
pub(crate) fn parse_data_row(frame: Frame) -> Result<Vec<Option<String>>, ReplicationError> {
    let mut body = Body::new(frame);
    let columns = body.i16()?;
    let columns =
        usize::try_from(columns).map_err(|_| ReplicationError::protocol(format!("DataRow with {columns} columns")))?;
    let mut row = Vec::with_capacity(columns);
    for _ in 0..columns {
        let len = body.i32()?;
        row.push(match usize::try_from(len) {
            Ok(len) => Some(utf8(body.take(len)?, 'D')?),
            Err(_) if len == -1 => None,
            Err(_) => return Err(ReplicationError::protocol(format!("DataRow column of length {len}"))),
        });
    }
    body.finish()?;
    Ok(row)
}

/// The column count of a RowDescription (names and types are not needed:
/// every helper knows the shape of its command's answer).
pub(crate) fn parse_row_description(frame: Frame) -> Result<usize, ReplicationError> {
    let mut body = Body::new(frame);
    let columns = body.i16()?;
    let columns = usize::try_from(columns)
        .map_err(|_| ReplicationError::protocol(format!("RowDescription with {columns} columns")))?;
    for _ in 0..columns {
        body.cstr()?;
        // table oid, column number, type oid, type size, type modifier, format
        body.take(4 + 2 + 4 + 2 + 4 + 2)?;
    }
    body.finish()?;
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn data_rows_with_nulls_and_truncation() {
        let body = b"\0\x02\0\0\0\x02hi\xff\xff\xff\xff";
        let row = parse_data_row(Frame { tag: b'D', body: Bytes::from_static(body) }).unwrap();
        assert_eq!(row, vec![Some("hi".to_string()), None]);
        for bad in [&b"\0\x02\0\0\0\x05hi"[..], b"\xff\xff", b"\0\x01\xff\xff\xff\xfe", b"\0\x00x"] {
            assert!(parse_data_row(Frame { tag: b'D', body: Bytes::copy_from_slice(bad) }).is_err(), "{bad:?}");
        }
    }
}
