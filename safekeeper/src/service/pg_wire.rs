//! The server side of the Postgres v3 wire protocol, as far as a safekeeper
//! needs it: the startup packet, simple queries, ErrorResponse, CopyBoth.
//! (postgres-protocol implements the client side only.) The framing itself
//! is `pq_wire`'s, shared with the shim's clients and the tests' client;
//! this module adds the socket reads, their time bounds and the answers.
//!
//! Every read is bounded twice: by size (a length prefix above the limit is
//! refused before anything is allocated) and, once a frame has begun, by
//! time (a peer that sends half a frame cannot hold the connection forever).

use std::collections::HashMap;
use std::io;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::errors::{sqlstate, PgError};

pub use pq_wire::frame::Frame;
pub use pq_wire::startup::MAX_STARTUP_PACKET_BYTES;
use pq_wire::startup::{
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MIN_STARTUP_PACKET_BYTES, PROTOCOL_V3, SSL_REQUEST_CODE,
};
pub use pq_wire::tag::{self, printable};

/// Largest frame body accepted before START_WAL_PUSH (a query string).
pub const MAX_QUERY_MESSAGE_BYTES: usize = 64 << 10;

/// Why a read ended without a frame.
#[derive(Debug)]
pub enum WireError {
    /// The peer went away (EOF or socket error): nothing to answer.
    Disconnected(io::Error),
    /// The peer broke the protocol: answer with this error and close.
    Client(PgError),
}

impl From<PgError> for WireError {
    fn from(error: PgError) -> Self {
        WireError::Client(error)
    }
}

/// What the first packet of a connection asks for.
#[derive(Debug)]
pub enum StartupRequest {
    /// Protocol 3.0 with its parameters (user, database, options, ...).
    Startup(HashMap<String, String>),
    /// SSLRequest: TLS before the startup packet.
    SslRequest,
    /// GSSENCRequest: GSSAPI encryption, which we never offer ('N').
    GssEncRequest,
    /// A cancel key for some other connection: we keep no keys, so ignore it.
    Cancel,
}

/// Read the first packet (untagged: length word, protocol code, body).
pub async fn read_startup_packet<R: AsyncRead + Unpin>(reader: &mut R) -> Result<StartupRequest, WireError> {
    let len = reader.read_u32().await.map_err(WireError::Disconnected)? as usize;
    if !(MIN_STARTUP_PACKET_BYTES..=MAX_STARTUP_PACKET_BYTES).contains(&len) {
        return Err(protocol_violation(format!(
            "invalid startup packet length {len} (must be {MIN_STARTUP_PACKET_BYTES}..={MAX_STARTUP_PACKET_BYTES} bytes); \
             is this a Postgres client?"
        ))
        .into());
    }
    let mut body = vec![0u8; len - 4];
    reader.read_exact(&mut body).await.map_err(WireError::Disconnected)?;
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    match code {
        SSL_REQUEST_CODE => Ok(StartupRequest::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupRequest::GssEncRequest),
        CANCEL_REQUEST_CODE => Ok(StartupRequest::Cancel),
        PROTOCOL_V3 => Ok(StartupRequest::Startup(parse_startup_parameters(&body[4..])?)),
        other => Err(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("unsupported frontend protocol {}.{}: this server speaks 3.0", other >> 16, other & 0xFFFF),
        )
        .into()),
    }
}

/// NUL-terminated name/value pairs, ended by an empty name.
fn parse_startup_parameters(body: &[u8]) -> Result<HashMap<String, String>, PgError> {
    pq_wire::startup::parse_startup_parameters(body).map_err(|e| protocol_violation(e.to_string()))
}

/// Read one tagged frame whose body may be at most `max_body_bytes`. Waiting
/// for a frame to begin is unbounded in time (idle is allowed); once its tag
/// has arrived, the rest must follow within `frame_timeout`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_body_bytes: usize,
    frame_timeout: Duration,
) -> Result<Frame, WireError> {
    let tag = reader.read_u8().await.map_err(WireError::Disconnected)?;
    let rest = async {
        let declared = reader.read_u32().await.map_err(WireError::Disconnected)?;
        let body_bytes = pq_wire::frame::body_len(tag, declared, max_body_bytes)
            .map_err(|e| WireError::Client(protocol_violation(e.to_string())))?;
        let mut body = vec![0u8; body_bytes];
        reader.read_exact(&mut body).await.map_err(WireError::Disconnected)?;
        Ok(Frame { tag, body: Bytes::from(body) })
    };
    match tokio::time::timeout(frame_timeout, rest).await {
        Ok(result) => result,
        Err(_) => Err(protocol_violation(format!(
            "message '{}' not received in full within {} ms",
            printable(tag),
            frame_timeout.as_millis()
        ))
        .into()),
    }
}

/// The text of a Query message (NUL-terminated UTF-8).
pub fn query_text(body: &[u8]) -> Result<String, PgError> {
    let mut input = body;
    let text =
        pq_wire::startup::take_cstring(&mut input, "query string").map_err(|e| protocol_violation(e.to_string()))?;
    if !input.is_empty() {
        return Err(protocol_violation("bytes after the query string's terminator".to_string()));
    }
    Ok(text)
}

pub fn protocol_violation(message: String) -> PgError {
    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, message)
}

/// Backend messages, appended to an output buffer.
pub mod encode {
    use super::*;

    use pq_wire::frame::{encode_message as message, put_cstring as cstring};

    /// The answer to an SSL or GSS encryption request we do not take.
    pub const ENCRYPTION_REFUSED: u8 = b'N';
    /// The answer to an SSLRequest on a port with a certificate.
    pub const TLS_ACCEPTED: u8 = b'S';

    pub fn authentication_ok(out: &mut BytesMut) {
        message(out, tag::AUTHENTICATION, |out| out.put_u32(0));
    }

    /// Asks for the password: the client's token (docs/security.md).
    pub fn authentication_cleartext_password(out: &mut BytesMut) {
        message(out, tag::AUTHENTICATION, |out| out.put_u32(3));
    }

    pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
        message(out, tag::PARAMETER_STATUS, |out| {
            cstring(out, name);
            cstring(out, value);
        });
    }

    /// Idle, not in a transaction.
    pub fn ready_for_query(out: &mut BytesMut) {
        message(out, tag::READY_FOR_QUERY, |out| out.put_u8(b'I'));
    }

    pub fn empty_query_response(out: &mut BytesMut) {
        message(out, tag::EMPTY_QUERY_RESPONSE, |_| {});
    }

    pub fn error_response(out: &mut BytesMut, error: &PgError) {
        pq_wire::error_fields::encode_error_response(out, error.severity.as_str(), error.code, &error.message);
    }

    /// CopyBoth with binary overall format and no columns, as walsenders send.
    pub fn copy_both_response(out: &mut BytesMut) {
        message(out, tag::COPY_BOTH_RESPONSE, |out| {
            out.put_u8(1);
            out.put_u16(0);
        });
    }

    pub fn copy_data(out: &mut BytesMut, payload: &[u8]) {
        message(out, tag::COPY_DATA, |out| out.put_slice(payload));
    }

    pub fn copy_done(out: &mut BytesMut) {
        message(out, tag::COPY_DONE, |_| {});
    }

    pub fn command_complete(out: &mut BytesMut, command_tag: &str) {
        message(out, tag::COMMAND_COMPLETE, |out| cstring(out, command_tag));
    }

    /// Type OIDs of the columns we return.
    pub const TEXT_OID: u32 = 25;
    pub const INT4_OID: u32 = 23;
    pub const INT8_OID: u32 = 20;
    pub const BYTEA_OID: u32 = 17;

    /// A RowDescription of text-format columns `(name, type oid)`.
    pub fn row_description(out: &mut BytesMut, columns: &[(&str, u32)]) {
        message(out, tag::ROW_DESCRIPTION, |out| {
            out.put_u16(u16::try_from(columns.len()).expect("a handful of columns"));
            for &(name, type_oid) in columns {
                cstring(out, name);
                out.put_u32(0); // table oid
                out.put_u16(0); // column number
                out.put_u32(type_oid);
                let type_len_bytes: i16 = match type_oid {
                    INT4_OID => 4,
                    INT8_OID => 8,
                    _ => -1,
                };
                out.put_i16(type_len_bytes);
                out.put_i32(-1); // type modifier
                out.put_u16(0); // text format
            }
        });
    }

    /// A DataRow of text values (`None` is SQL NULL).
    pub fn data_row(out: &mut BytesMut, values: &[Option<&str>]) {
        message(out, tag::DATA_ROW, |out| {
            out.put_u16(u16::try_from(values.len()).expect("a handful of columns"));
            for value in values {
                match value {
                    Some(text) => {
                        out.put_u32(u32::try_from(text.len()).expect("short values"));
                        out.put_slice(text.as_bytes());
                    }
                    None => out.put_i32(-1),
                }
            }
        });
    }
}

/// Tenant and timeline named by the startup packet: parameters `tenant_id`
/// and `timeline_id`, or `-c name=value` settings in `options` (so that any
/// libpq client, psql included, can name them).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StartupSettings {
    pub tenant_id: Option<String>,
    pub timeline_id: Option<String>,
    pub application_name: Option<String>,
}

impl StartupSettings {
    pub fn from_parameters(parameters: &HashMap<String, String>) -> Result<StartupSettings, PgError> {
        let mut settings = StartupSettings::default();
        if let Some(options) = parameters.get("options") {
            for (name, value) in parse_options(options)? {
                settings.set(&name, value);
            }
        }
        // Explicit parameters win over `options`, as in Postgres.
        for (name, value) in parameters {
            settings.set(name, value.clone());
        }
        Ok(settings)
    }

    fn set(&mut self, name: &str, value: String) {
        match name {
            "tenant_id" => self.tenant_id = Some(value),
            "timeline_id" => self.timeline_id = Some(value),
            "application_name" => self.application_name = Some(value),
            _ => {}
        }
    }
}

/// `options` as Postgres splits it: whitespace separates words, a backslash
/// escapes the next character; `-c name=value`, `-cname=value` and
/// `--name=value` set a parameter. Other switches are ignored.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, PgError> {
    let words = split_options(options);
    let mut settings = vec![];
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words.next().ok_or_else(|| invalid_options("-c at the end of options needs name=value"))?
        } else if let Some(rest) = word.strip_prefix("-c").or_else(|| word.strip_prefix("--")) {
            rest.to_string()
        } else {
            continue;
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| invalid_options(&format!("expected name=value in options, found {assignment:?}")))?;
        settings.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(settings)
}

fn split_options(options: &str) -> Vec<String> {
    let mut words = vec![];
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

fn invalid_options(message: &str) -> PgError {
    PgError::fatal(sqlstate::INVALID_PARAMETER_VALUE, message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use pq_wire::startup::encode_startup_packet as startup_packet;

    async fn startup(bytes: &[u8]) -> Result<StartupRequest, WireError> {
        read_startup_packet(&mut &bytes[..]).await
    }

    #[tokio::test]
    async fn startup_parameters_and_options_name_the_timeline() {
        let packet = startup_packet(&[("user", "x"), ("options", "-c tenant_id=aa  -ctimeline_id=bb --other=1")]);
        let StartupRequest::Startup(parameters) = startup(&packet).await.unwrap() else { panic!("not a startup") };
        let settings = StartupSettings::from_parameters(&parameters).unwrap();
        assert_eq!(settings.tenant_id.as_deref(), Some("aa"));
        assert_eq!(settings.timeline_id.as_deref(), Some("bb"));
    }

    #[tokio::test]
    async fn explicit_parameters_win_over_options() {
        let packet = startup_packet(&[("tenant_id", "direct"), ("options", "-c tenant_id=from\\ options")]);
        let StartupRequest::Startup(parameters) = startup(&packet).await.unwrap() else { panic!("not a startup") };
        assert_eq!(StartupSettings::from_parameters(&parameters).unwrap().tenant_id.as_deref(), Some("direct"));
        assert_eq!(parse_options("-c a=b\\ c").unwrap(), vec![("a".to_string(), "b c".to_string())]);
    }

    #[tokio::test]
    async fn bad_startup_packets_are_protocol_errors_not_panics() {
        let mut garbage = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        let too_long = (MAX_STARTUP_PACKET_BYTES as u32 + 1).to_be_bytes();
        let unterminated = [0, 0, 0, 11, 0, 3, 0, 0, b'u', b's', b'r'];
        for bytes in [&garbage[..], &too_long[..], &[0, 0, 0, 2][..], &unterminated[..]] {
            match startup(bytes).await {
                Err(WireError::Client(error)) => assert_eq!(error.code, sqlstate::PROTOCOL_VIOLATION, "{error:?}"),
                other => panic!("expected a protocol violation for {bytes:?}, got {other:?}"),
            }
        }
        garbage.truncate(2);
        assert!(matches!(startup(&garbage).await, Err(WireError::Disconnected(_))));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading_the_body() {
        let header = [b'd', 0xFF, 0xFF, 0xFF, 0xFF];
        let result = read_frame(&mut &header[..], 1024, Duration::from_secs(1)).await;
        let Err(WireError::Client(error)) = result else { panic!("expected a client error: {result:?}") };
        assert!(error.message.contains("exceeds the limit of 1024 bytes"), "{}", error.message);
    }

    #[test]
    fn error_response_layout() {
        let mut out = BytesMut::new();
        encode::error_response(&mut out, &PgError::error(sqlstate::SYNTAX_ERROR, "no".to_string()));
        assert_eq!(&out[..], b"E\0\0\0\x1eSERROR\0VERROR\0C42601\0Mno\0\0");
    }

    /// Rule: no bytes a client sends make the frontend decoders panic or
    /// allocate beyond their bounds: each returns a frame or a typed error.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
            tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(future)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn startup_packets(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                let mut reader = bytes.as_slice();
                if let Ok(StartupRequest::Startup(parameters)) = block_on(read_startup_packet(&mut reader)) {
                    let _ = StartupSettings::from_parameters(&parameters);
                }
            }

            /// A valid header whose body is random: what the parameter
            /// parser sees.
            #[test]
            fn startup_parameters(body in proptest::collection::vec(any::<u8>(), 0..300)) {
                let mut packet = ((body.len() + 8) as u32).to_be_bytes().to_vec();
                packet.extend_from_slice(&PROTOCOL_V3.to_be_bytes());
                packet.extend_from_slice(&body);
                let mut reader = packet.as_slice();
                if let Ok(StartupRequest::Startup(parameters)) = block_on(read_startup_packet(&mut reader)) {
                    let _ = StartupSettings::from_parameters(&parameters);
                }
            }

            #[test]
            fn options_strings(options in ".{0,120}") {
                let parameters = HashMap::from([("options".to_string(), options)]);
                let _ = StartupSettings::from_parameters(&parameters);
            }

            #[test]
            fn frames(bytes in proptest::collection::vec(any::<u8>(), 0..400), max_body_bytes in 0usize..512) {
                let mut reader = bytes.as_slice();
                let result = block_on(read_frame(&mut reader, max_body_bytes, Duration::from_secs(1)));
                if let Ok(frame) = result {
                    prop_assert!(frame.body.len() <= max_body_bytes);
                    let _ = query_text(&frame.body);
                }
            }
        }
    }
}
