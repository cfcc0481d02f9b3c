//! Bounds-checked reads from a message body: running short, a string
//! without its NUL, text that is not UTF-8 or bytes left over are typed
//! errors naming the message, never a panic.

use bytes::{Buf, Bytes};

use crate::tag::printable;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("message '{}' is truncated: wanted {wanted} more bytes, {left} left", printable(*what))]
    Truncated { what: u8, wanted: usize, left: usize },
    #[error("message '{}' has an unterminated string", printable(*what))]
    UnterminatedString { what: u8 },
    #[error("message '{}' holds text that is not UTF-8", printable(*what))]
    NotUtf8 { what: u8 },
    #[error("message '{}' has {left} unexpected trailing bytes", printable(*what))]
    Trailing { what: u8, left: usize },
    #[error("message '{}' declares {count} {items}", printable(*what))]
    BadCount { what: u8, count: i64, items: &'static str },
}

/// A cursor over one message body; `what` (its tag, or the kind byte of a
/// CopyData sub-message) names it in errors.
#[derive(Debug)]
pub struct Body {
    bytes: Bytes,
    what: u8,
}

impl Body {
    pub fn new(what: u8, bytes: Bytes) -> Self {
        Body { bytes, what }
    }

    pub fn take(&mut self, len: usize) -> Result<Bytes, BodyError> {
        if self.bytes.len() < len {
            return Err(BodyError::Truncated { what: self.what, wanted: len, left: self.bytes.len() });
        }
        Ok(self.bytes.split_to(len))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BodyError> {
        Ok(self.take(N)?[..].try_into().expect("take returned N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, BodyError> {
        Ok(self.take(1)?[0])
    }

    pub fn i16(&mut self) -> Result<i16, BodyError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub fn i32(&mut self) -> Result<i32, BodyError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, BodyError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub fn i64(&mut self) -> Result<i64, BodyError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<String, BodyError> {
        let nul = self.bytes.iter().position(|b| *b == 0).ok_or(BodyError::UnterminatedString { what: self.what })?;
        let text = self.take(nul)?;
        self.bytes.advance(1);
        String::from_utf8(text.to_vec()).map_err(|_| BodyError::NotUtf8 { what: self.what })
    }

    /// A count field (i16 column count and the like) that must not be negative.
    pub fn count_i16(&mut self, items: &'static str) -> Result<usize, BodyError> {
        let count = self.i16()?;
        usize::try_from(count).map_err(|_| BodyError::BadCount { what: self.what, count: i64::from(count), items })
    }

    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.bytes)
    }

    /// Trailing bytes mean we and the peer disagree about the layout.
    pub fn finish(self) -> Result<(), BodyError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(BodyError::Trailing { what: self.what, left: self.bytes.len() })
        }
    }
}

/// A DataRow as text columns (`None` is SQL NULL): the simple query
/// protocol returns text.
pub fn parse_data_row(body: Bytes) -> Result<Vec<Option<String>>, BodyError> {
    let mut body = Body::new(crate::tag::DATA_ROW, body);
    let columns = body.count_i16("columns")?;
    let mut row = Vec::with_capacity(columns);
    for _ in 0..columns {
        let len = body.i32()?;
        row.push(match usize::try_from(len) {
            Ok(len) => {
                Some(String::from_utf8(body.take(len)?.to_vec()).map_err(|_| BodyError::NotUtf8 { what: body.what })?)
            }
            Err(_) if len == -1 => None,
            Err(_) => {
                return Err(BodyError::BadCount { what: body.what, count: i64::from(len), items: "bytes in a column" })
            }
        });
    }
    body.finish()?;
    Ok(row)
}

/// The column count of a RowDescription (callers know the shape of their
/// command's answer; names and types are skipped, but checked to be there).
pub fn parse_row_description(body: Bytes) -> Result<usize, BodyError> {
    let mut body = Body::new(crate::tag::ROW_DESCRIPTION, body);
    let columns = body.count_i16("columns")?;
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

    #[test]
    fn reads_are_bounded_and_typed() {
        let mut body = Body::new(b'x', Bytes::from_static(b"\x01\0\x02hi\0rest"));
        assert_eq!(body.u8().unwrap(), 1);
        assert_eq!(body.i16().unwrap(), 2);
        assert_eq!(body.cstr().unwrap(), "hi");
        assert_eq!(body.take(5).unwrap_err(), BodyError::Truncated { what: b'x', wanted: 5, left: 4 });
        assert_eq!(body.cstr().unwrap_err(), BodyError::UnterminatedString { what: b'x' });
        assert_eq!(
            Body::new(b'x', Bytes::from_static(b"ab")).finish().unwrap_err(),
            BodyError::Trailing { what: b'x', left: 2 }
        );
    }

    #[test]
    fn data_rows_with_nulls_and_truncation() {
        let row = parse_data_row(Bytes::from_static(b"\0\x02\0\0\0\x02hi\xff\xff\xff\xff")).unwrap();
        assert_eq!(row, vec![Some("hi".to_string()), None]);
        for bad in [&b"\0\x02\0\0\0\x05hi"[..], b"\xff\xff", b"\0\x01\xff\xff\xff\xfe", b"\0\x00x"] {
            assert!(parse_data_row(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn row_descriptions_count_columns() {
        let mut one = b"\0\x01id\0".to_vec();
        one.extend_from_slice(&[0; 18]);
        assert_eq!(parse_row_description(Bytes::from(one.clone())).unwrap(), 1);
        one.pop();
        assert!(parse_row_description(Bytes::from(one)).is_err());
    }
}
