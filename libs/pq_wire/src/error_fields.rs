//! ErrorResponse and NoticeResponse bodies: a list of (field code, C
//! string) pairs ended by a zero byte.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::body::{Body, BodyError};
use crate::frame::{encode_message, put_cstring};
use crate::tag;

/// The fields callers branch on or show.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    /// Non-localised severity (`ERROR`, `FATAL`, `PANIC`): field `V`, or the
    /// localised `S` from a server too old to send `V`.
    pub severity: String,
    /// The SQLSTATE, e.g. `28P01` (invalid password).
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {}): {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// Parse an ErrorResponse / NoticeResponse body (`what`: its tag, for errors).
pub fn parse_error_fields(what: u8, body: Bytes) -> Result<ErrorFields, BodyError> {
    let mut body = Body::new(what, body);
    let mut fields = ErrorFields::default();
    let mut localized_severity = String::new();
    loop {
        let field = body.u8()?;
        if field == 0 {
            break;
        }
        let value = body.cstr()?;
        match field {
            b'V' => fields.severity = value,
            b'S' => localized_severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            b'D' => fields.detail = Some(value),
            b'H' => fields.hint = Some(value),
            _ => {}
        }
    }
    body.finish()?;
    if fields.severity.is_empty() {
        fields.severity = localized_severity;
    }
    Ok(fields)
}

/// Append an ErrorResponse with severity (as both `S` and `V`), SQLSTATE
/// and message.
pub fn encode_error_response(out: &mut BytesMut, severity: &str, code: &str, message: &str) {
    encode_message(out, tag::ERROR_RESPONSE, |out| {
        for (field, value) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', message)] {
            out.put_u8(field);
            put_cstring(out, value);
        }
        out.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_frame;

    #[test]
    fn error_response_fields_round_trip() {
        let mut out = BytesMut::new();
        encode_error_response(&mut out, "FATAL", "28P01", "password authentication failed");
        let frame = decode_frame(&mut out, 1024).unwrap().unwrap();
        assert_eq!(frame.tag, tag::ERROR_RESPONSE);
        let fields = parse_error_fields(frame.tag, frame.body).unwrap();
        assert_eq!((fields.severity.as_str(), fields.code.as_str()), ("FATAL", "28P01"));
        assert_eq!(fields.message, "password authentication failed");
    }

    #[test]
    fn localized_severity_is_the_fallback_and_truncation_an_error() {
        let fields = parse_error_fields(b'E', Bytes::from_static(b"SERREUR\0C42601\0Mx\0\0")).unwrap();
        assert_eq!(fields.severity, "ERREUR");
        assert!(parse_error_fields(b'E', Bytes::from_static(b"C28P01")).is_err());
    }
}
