//! One client connection on the pg port: startup, then simple queries until
//! START_WAL_PUSH hands the connection to [`super::push`].
//!
//! Time limits: the startup packet must arrive within [`STARTUP_TIMEOUT`]
//! (an idle half-open connection must not hold a connection slot); once a
//! frame has begun, its rest must arrive within [`FRAME_TIMEOUT`]. Between
//! frames a session may idle without limit: proposers send heartbeats, and
//! a psql user may think.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::errors::{sqlstate, PgError};
use super::pg_wire::{
    encode, printable, protocol_violation, query_text, read_frame, read_startup_packet, tag, StartupRequest,
    StartupSettings, WireError, MAX_QUERY_MESSAGE_BYTES,
};
use super::{push, ServiceState};
use crate::ids::{TenantId, TimelineId};
use std::sync::Arc;

pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a FATAL error may take to reach a client before we just close.
pub const ERROR_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Buffered reader size; frames larger than this are read straight through.
pub const READ_BUFFER_BYTES: usize = 64 << 10;
/// SSL and GSS requests answered before the startup packet (one of each).
const MAX_ENCRYPTION_REQUESTS: usize = 2;
pub const SERVER_VERSION: &str = "15.0 (safekeeper)";
const START_WAL_PUSH: &str = "START_WAL_PUSH";
/// Characters of an unknown query quoted back in the error.
const QUOTED_QUERY_CHARS: usize = 80;

pub type Reader = BufReader<OwnedReadHalf>;

/// Serve one connection until it ends; never panics on client bytes.
pub async fn serve(stream: TcpStream, state: Arc<ServiceState>, connection_id: u64) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let settings = match tokio::time::timeout(STARTUP_TIMEOUT, startup(&mut reader, &mut write)).await {
        Ok(Ok(Some(settings))) => settings,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => return send_error(&mut write, error).await,
        Err(_) => {
            let message = format!("startup packet not received within {} s", STARTUP_TIMEOUT.as_secs());
            return send_error(&mut write, protocol_violation(message).into()).await;
        }
    };
    match query_loop(&mut reader, &mut write, &settings).await {
        Ok(Some((tenant_id, timeline_id))) => {
            push::run(state, connection_id, tenant_id, timeline_id, reader, write).await;
        }
        Ok(None) => {}
        Err(error) => send_error(&mut write, error).await,
    }
}

/// Write a FATAL error (if the peer is still there to read it).
pub async fn send_error(write: &mut OwnedWriteHalf, error: WireError) {
    let WireError::Client(error) = error else { return };
    tracing::debug!("closing connection: {error}");
    let mut out = BytesMut::new();
    encode::error_response(&mut out, &error);
    let _ = tokio::time::timeout(ERROR_FLUSH_TIMEOUT, write.write_all(&out)).await;
}

/// The startup exchange: `None` for a cancel request (close silently).
async fn startup(reader: &mut Reader, write: &mut OwnedWriteHalf) -> Result<Option<StartupSettings>, WireError> {
    let mut encryption_requests = 0;
    let parameters = loop {
        match read_startup_packet(reader).await? {
            StartupRequest::Startup(parameters) => break parameters,
            StartupRequest::Cancel => return Ok(None),
            StartupRequest::EncryptionRequest if encryption_requests < MAX_ENCRYPTION_REQUESTS => {
                encryption_requests += 1;
                write.write_all(&[encode::ENCRYPTION_REFUSED]).await.map_err(WireError::Disconnected)?;
            }
            StartupRequest::EncryptionRequest => {
                return Err(protocol_violation("repeated encryption requests".to_string()).into())
            }
        }
    };
    let settings = StartupSettings::from_parameters(&parameters)?;
    // Reject malformed ids now, where psql shows the error at connect time.
    timeline_ids(&settings)?;
    let mut out = BytesMut::new();
    encode::authentication_ok(&mut out);
    for (name, value) in [
        ("server_version", SERVER_VERSION),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        encode::parameter_status(&mut out, name, value);
    }
    encode::ready_for_query(&mut out);
    write.write_all(&out).await.map_err(WireError::Disconnected)?;
    Ok(Some(settings))
}

/// Tenant and timeline ids, if the startup named them.
fn timeline_ids(settings: &StartupSettings) -> Result<Option<(TenantId, TimelineId)>, PgError> {
    let invalid = |e: crate::ids::IdParseError| PgError::fatal(sqlstate::INVALID_PARAMETER_VALUE, e.to_string());
    let tenant_id = settings.tenant_id.as_deref().map(str::parse::<TenantId>).transpose().map_err(invalid)?;
    let timeline_id = settings.timeline_id.as_deref().map(str::parse::<TimelineId>).transpose().map_err(invalid)?;
    Ok(tenant_id.zip(timeline_id))
}

/// Simple queries until START_WAL_PUSH (returns its timeline) or Terminate
/// (returns `None`). An unknown command is an ERROR and the session goes
/// on, as in Postgres; a protocol violation ends it.
async fn query_loop(
    reader: &mut Reader,
    write: &mut OwnedWriteHalf,
    settings: &StartupSettings,
) -> Result<Option<(TenantId, TimelineId)>, WireError> {
    loop {
        let frame = read_frame(reader, MAX_QUERY_MESSAGE_BYTES, FRAME_TIMEOUT).await?;
        let mut out = BytesMut::new();
        match frame.tag {
            tag::QUERY => {
                let query = query_text(&frame.body)?;
                let command = query.trim().trim_end_matches(';').trim_end();
                if command.is_empty() {
                    encode::empty_query_response(&mut out);
                } else if command.eq_ignore_ascii_case(START_WAL_PUSH) {
                    match timeline_ids(settings)? {
                        Some(ids) => return Ok(Some(ids)),
                        None => encode::error_response(&mut out, &missing_ids()),
                    }
                } else {
                    // Like any other bad input on this port: refuse and close.
                    return Err(unknown_command(command).into());
                }
                encode::ready_for_query(&mut out);
            }
            tag::TERMINATE => return Ok(None),
            other if tag::EXTENDED_QUERY.contains(&other) => {
                let message = "the extended query protocol is not supported; send simple queries".to_string();
                return Err(PgError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, message).into());
            }
            other => {
                let message = format!("unexpected message type '{}' before START_WAL_PUSH", printable(other));
                return Err(protocol_violation(message).into());
            }
        }
        write.write_all(&out).await.map_err(WireError::Disconnected)?;
    }
}

fn missing_ids() -> PgError {
    PgError::error(
        sqlstate::INVALID_PARAMETER_VALUE,
        "START_WAL_PUSH needs the startup parameters tenant_id and timeline_id \
         (or options '-c tenant_id=<32 hex> -c timeline_id=<32 hex>')"
            .to_string(),
    )
}

fn unknown_command(command: &str) -> PgError {
    let mut quoted: String = command.chars().take(QUOTED_QUERY_CHARS).collect();
    if quoted.len() < command.len() {
        quoted.push_str("...");
    }
    PgError::fatal(
        sqlstate::SYNTAX_ERROR,
        format!("unsupported command \"{quoted}\": this safekeeper port accepts only {START_WAL_PUSH}"),
    )
}
