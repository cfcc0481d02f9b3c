//! Tagged frames: a type byte, a big-endian u32 length that counts itself
//! and the body, then the body. The declared length is checked against the
//! caller's limit as soon as the header is in, before any body byte is
//! buffered, so a peer cannot make us allocate what it claims.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::tag::printable;

/// Tag byte and length word.
pub const FRAME_HEADER_BYTES: usize = 5;
/// The length word counts itself.
const LENGTH_WORD_BYTES: u32 = 4;

/// One message after the startup packet: its tag and body (length word excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message '{}' declares length {declared}, less than its own length word", printable(*tag))]
    LengthTooShort { tag: u8, declared: u32 },
    #[error("message '{}' of {body_bytes} bytes exceeds the limit of {max_body_bytes} bytes", printable(*tag))]
    TooLarge { tag: u8, declared: u32, body_bytes: usize, max_body_bytes: usize },
}

/// The body length a frame header declares, if within `max_body_bytes`.
pub fn body_len(tag: u8, declared: u32, max_body_bytes: usize) -> Result<usize, FrameError> {
    let body_bytes = declared.checked_sub(LENGTH_WORD_BYTES).ok_or(FrameError::LengthTooShort { tag, declared })?;
    let body_bytes = body_bytes as usize;
    if body_bytes > max_body_bytes {
        return Err(FrameError::TooLarge { tag, declared, body_bytes, max_body_bytes });
    }
    Ok(body_bytes)
}

/// The tag and declared length of a frame header.
pub fn parse_header(header: [u8; FRAME_HEADER_BYTES]) -> (u8, u32) {
    (header[0], u32::from_be_bytes([header[1], header[2], header[3], header[4]]))
}

/// Take one complete frame off the front of `buf`, if one is there. An
/// error means the stream is not framed as it must be: close it.
pub fn decode_frame(buf: &mut BytesMut, max_body_bytes: usize) -> Result<Option<Frame>, FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(None);
    };
    let (tag, declared) = parse_header(header.try_into().expect("the slice is a header long"));
    let body_bytes = body_len(tag, declared, max_body_bytes)?;
    if buf.len() < FRAME_HEADER_BYTES + body_bytes {
        return Ok(None);
    }
    let mut frame = buf.split_to(FRAME_HEADER_BYTES + body_bytes);
    frame.advance(FRAME_HEADER_BYTES);
    Ok(Some(Frame { tag, body: frame.freeze() }))
}

/// Append a message: `tag`, its length, and what `body` writes.
pub fn encode_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_u32(0);
    body(out);
    let len = u32::try_from(out.len() - len_at).expect("messages we build are far below 4 GiB");
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Append a NUL-terminated string. A NUL inside would end it early: callers
/// pass text they built, and client input quoted back is stripped of NULs.
pub fn put_cstring(out: &mut BytesMut, text: &str) {
    debug_assert!(!text.contains('\0'), "a C string with a NUL inside: {text:?}");
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_split_and_wait_for_the_rest() {
        let mut buf = BytesMut::from(&b"Z\0\0\0\x05IC\0\0\0\x04D\0\0"[..]);
        assert_eq!(decode_frame(&mut buf, 16).unwrap(), Some(Frame { tag: b'Z', body: Bytes::from_static(b"I") }));
        assert_eq!(decode_frame(&mut buf, 16).unwrap(), Some(Frame { tag: b'C', body: Bytes::new() }));
        assert_eq!(decode_frame(&mut buf, 16).unwrap(), None, "a partial header waits");
        assert_eq!(&buf[..], b"D\0\0", "nothing consumed while incomplete");
    }

    /// The limit applies before the body arrives: an HTTP reply on a pg
    /// port declares ~1.4 GB and is refused from its first five bytes.
    #[test]
    fn the_declared_length_is_checked_before_the_body() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 400"[..]);
        let err = decode_frame(&mut buf, 16 << 20).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { tag: b'H', .. }), "{err}");
        let mut buf = BytesMut::from(&b"Z\0\0\0\x03"[..]);
        assert_eq!(decode_frame(&mut buf, 16).unwrap_err(), FrameError::LengthTooShort { tag: b'Z', declared: 3 });
    }

    #[test]
    fn encoded_messages_decode_back() {
        let mut out = BytesMut::new();
        encode_message(&mut out, b'Q', |out| put_cstring(out, "SELECT 1"));
        assert_eq!(&out[..], b"Q\0\0\0\x0dSELECT 1\0");
        let frame = decode_frame(&mut out, 64).unwrap().unwrap();
        assert_eq!((frame.tag, &frame.body[..]), (b'Q', &b"SELECT 1\0"[..]));
    }

    proptest! {
        /// Any bytes in any chunking: frames or a typed error, never a panic,
        /// and never a body over the limit.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256), max in 0usize..64) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = decode_frame(&mut buf, max) {
                prop_assert!(frame.body.len() <= max);
            }
        }
    }
}
