//! One client connection on the pg port: startup, then simple queries
//! (`super::commands`) until START_WAL_PUSH hands the connection to
//! [`super::push`]; START_REPLICATION streams ([`super::replication`]) and
//! returns here when the client ends the copy.
//!
//! With `--auth-public-key` the startup asks for a password, which is the
//! client's token (docs/security.md); every command is then checked
//! against the token's scope and tenant ([`auth::Access`]) before it runs.
//!
//! Time limits: the startup packet must arrive within [`STARTUP_TIMEOUT`]
//! (an idle half-open connection must not hold a connection slot); once a
//! frame has begun, its rest must arrive within [`FRAME_TIMEOUT`]. Between
//! frames a session may idle without limit: proposers send heartbeats, and
//! a psql user may think.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use auth::{Access, Claims};
use net::stream::{ReadHalf, Stream, WriteHalf};

use super::commands::{parse_command, Command};
use super::errors::{sqlstate, PgError};
use super::pg_wire::{
    encode, printable, protocol_violation, query_text, read_frame, read_startup_packet, tag, StartupRequest,
    StartupSettings, WireError, MAX_QUERY_MESSAGE_BYTES,
};
use super::registry::TimelineHandle;
use super::replication::{self, StreamEnd};
use super::{push, ServiceState, ServiceTls};
use safekeeper_protocol::ids::{TenantId, TimelineId};

pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a FATAL error may take to reach a client before we just close.
pub const ERROR_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Buffered reader size; frames larger than this are read straight through.
pub const READ_BUFFER_BYTES: usize = 64 << 10;
/// SSL and GSS requests answered before the startup packet (one of each).
const MAX_ENCRYPTION_REQUESTS: usize = 2;
/// The first byte of a TLS handshake record: a client that starts TLS at
/// once (PostgreSQL 17's `sslnegotiation=direct`) instead of SSLRequest.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
pub const SERVER_VERSION: &str = "15.0 (safekeeper)";

pub type Reader = BufReader<ReadHalf>;

/// Serve one connection until it ends; never panics on client bytes.
pub async fn serve(tcp: TcpStream, state: Arc<ServiceState>, connection_id: u64) {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "unknown".to_string());
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let late = || {
        let message = format!("startup packet not received within {} s", STARTUP_TIMEOUT.as_secs());
        WireError::Client(protocol_violation(message))
    };
    // Encryption first, on the whole stream (a TLS upgrade replaces it).
    let mut stream = Some(Stream::Plain(tcp));
    let parameters = match timeout_at(deadline, negotiate(&mut stream, state.tls.as_deref())).await {
        Ok(Ok(Some(parameters))) => parameters,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => return send_error_to(stream.as_mut(), error).await,
        Err(_) => return send_error_to(stream.as_mut(), late()).await,
    };
    let Some(stream) = stream else { return };
    let (read, mut write) = stream.split();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let session = match timeout_at(deadline, startup(parameters, &mut reader, &mut write, &state)).await {
        Ok(Ok(session)) => session,
        Ok(Err(error)) => return send_error(&mut write, error).await,
        Err(_) => return send_error(&mut write, late()).await,
    };
    match query_loop(reader, &mut write, &session, &state, &peer).await {
        Ok(SessionEnd::Push(tenant_id, timeline_id, reader)) => {
            push::run(state, connection_id, tenant_id, timeline_id, reader, write).await;
        }
        Ok(SessionEnd::Closed) => {}
        Err(error) => send_error(&mut write, error).await,
    }
}

/// [`send_error`] on a stream that may be gone (a failed TLS handshake).
async fn send_error_to(stream: Option<&mut Stream>, error: WireError) {
    if let Some(stream) = stream {
        send_error(stream, error).await;
    }
}

/// Write a FATAL error (if the peer is still there to read it).
pub async fn send_error<W: AsyncWrite + Unpin>(write: &mut W, error: WireError) {
    let error = match error {
        WireError::Client(error) => error,
        WireError::Disconnected(cause) => {
            tracing::debug!("connection ended by the peer: {cause}");
            return;
        }
    };
    tracing::debug!("closing connection: {error}");
    let mut out = BytesMut::new();
    encode::error_response(&mut out, &error);
    let _ = tokio::time::timeout(ERROR_FLUSH_TIMEOUT, write.write_all(&out)).await;
}

/// What comes before the startup packet, as Postgres does it: SSLRequest
/// answered 'S' and TLS negotiated when this port has a certificate ('N'
/// without), a GSSENCRequest answered 'N', a TLS ClientHello straight away
/// (direct TLS) accepted too. Then the startup packet: its parameters, or
/// `None` for a cancel request. With a certificate and without
/// `--allow-plaintext`, a startup in plaintext is refused (28000).
///
/// Reads exactly the packets' bytes (no read-ahead), so nothing a client
/// sends before the handshake can be taken for data inside TLS.
async fn negotiate(
    stream: &mut Option<Stream>,
    tls: Option<&ServiceTls>,
) -> Result<Option<HashMap<String, String>>, WireError> {
    if let (Some(tls), Some(Stream::Plain(tcp))) = (tls, stream.as_ref()) {
        let mut first = [0u8; 1];
        let peeked = tcp.peek(&mut first).await.map_err(WireError::Disconnected)?;
        if peeked == 1 && first[0] == TLS_HANDSHAKE_RECORD {
            upgrade(stream, tls).await?;
        }
    }
    let mut encryption_requests = 0;
    loop {
        let current = stream.as_mut().expect("the stream is back after every upgrade");
        let encrypted = current.is_tls();
        match read_startup_packet(current).await? {
            StartupRequest::Startup(parameters) => {
                if tls.is_some_and(|tls| !tls.allow_plaintext) && !encrypted {
                    return Err(PgError::fatal(
                        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                        "this safekeeper accepts TLS connections only (sslmode=require or stronger); \
                         plaintext is refused without --allow-plaintext"
                            .to_string(),
                    )
                    .into());
                }
                return Ok(Some(parameters));
            }
            StartupRequest::Cancel => return Ok(None),
            _ if encrypted => {
                return Err(protocol_violation("an encryption request inside TLS".to_string()).into());
            }
            _ if encryption_requests >= MAX_ENCRYPTION_REQUESTS => {
                return Err(protocol_violation("repeated encryption requests".to_string()).into());
            }
            StartupRequest::SslRequest if tls.is_some() => {
                current.write_all(&[encode::TLS_ACCEPTED]).await.map_err(WireError::Disconnected)?;
                upgrade(stream, tls.expect("checked")).await?;
            }
            StartupRequest::SslRequest | StartupRequest::GssEncRequest => {
                encryption_requests += 1;
                current.write_all(&[encode::ENCRYPTION_REFUSED]).await.map_err(WireError::Disconnected)?;
            }
        }
    }
}

/// Replace the plain stream by TLS over it. A failed handshake closes the
/// connection (there is no channel left to say why; the client's TLS
/// library does).
async fn upgrade(stream: &mut Option<Stream>, tls: &ServiceTls) -> Result<(), WireError> {
    let Some(Stream::Plain(tcp)) = stream.take() else { unreachable!("only a plain stream is upgraded") };
    let session = tls.pg.acceptor().accept(tcp).await.map_err(|error| {
        tracing::debug!("TLS handshake failed: {error}");
        WireError::Disconnected(error)
    })?;
    *stream = Some(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(session))));
    Ok(())
}

/// What the startup established.
struct Session {
    settings: StartupSettings,
    /// The client's token; `None` when this port checks none.
    claims: Option<Claims>,
}

impl Session {
    /// Whether the token allows `access`; a refusal ends the session.
    fn authorize(&self, access: Access) -> Result<(), PgError> {
        access.check(self.claims.as_ref()).map_err(|denied| {
            PgError::fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, format!("permission denied: {denied}"))
        })
    }
}

/// The rest of the startup: the token (when this port checks tokens),
/// then AuthenticationOk and the server's parameters.
async fn startup(
    parameters: HashMap<String, String>,
    reader: &mut Reader,
    write: &mut WriteHalf,
    state: &ServiceState,
) -> Result<Session, WireError> {
    let settings = StartupSettings::from_parameters(&parameters)?;
    // Reject malformed ids now, where psql shows the error at connect time.
    let ids = timeline_ids(&settings)?;
    let claims = match &state.auth {
        Some(verifier) => Some(authenticate(reader, write, verifier).await?),
        None => None,
    };
    let session = Session { settings, claims };
    if let Some((tenant_id, _)) = ids {
        // A token for another tenant is refused before anything is served.
        session.authorize(Access::TimelineStatus(tenant_id))?;
    }
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
    Ok(session)
}

/// Ask for the password and check it as a token. Every failure is FATAL
/// 28P01, whose message says why but never repeats the token.
async fn authenticate(
    reader: &mut Reader,
    write: &mut WriteHalf,
    verifier: &auth::TokenVerifier,
) -> Result<Claims, WireError> {
    let mut out = BytesMut::new();
    encode::authentication_cleartext_password(&mut out);
    write.write_all(&out).await.map_err(WireError::Disconnected)?;
    let frame = read_frame(reader, auth::token::MAX_TOKEN_BYTES + 1, FRAME_TIMEOUT).await?;
    if frame.tag != tag::PASSWORD_MESSAGE {
        let message = format!("expected a password message (the token), got '{}'", printable(frame.tag));
        return Err(protocol_violation(message).into());
    }
    let refuse =
        |reason: String| PgError::fatal(sqlstate::INVALID_PASSWORD, format!("token authentication failed: {reason}"));
    let token = query_text(&frame.body).map_err(|_| refuse("the password message is not one string".into()))?;
    Ok(verifier.verify(&token).map_err(|error| refuse(error.to_string()))?)
}

/// Tenant and timeline ids, if the startup named them.
fn timeline_ids(settings: &StartupSettings) -> Result<Option<(TenantId, TimelineId)>, PgError> {
    let invalid =
        |e: safekeeper_protocol::ids::IdParseError| PgError::fatal(sqlstate::INVALID_PARAMETER_VALUE, e.to_string());
    let tenant_id = settings.tenant_id.as_deref().map(str::parse::<TenantId>).transpose().map_err(invalid)?;
    let timeline_id = settings.timeline_id.as_deref().map(str::parse::<TimelineId>).transpose().map_err(invalid)?;
    Ok(tenant_id.zip(timeline_id))
}

/// What the session does after its simple queries.
enum SessionEnd {
    Push(TenantId, TimelineId, Reader),
    Closed,
}

/// Simple queries until START_WAL_PUSH (returns its timeline) or Terminate.
/// START_REPLICATION streams and comes back here when the client ends the
/// copy. A command we do not know or a protocol violation ends the session
/// (like any bad input on this port); a command we know but cannot serve
/// (a timeline we do not have, WAL already removed) is an ERROR and the
/// session goes on, as in Postgres.
async fn query_loop(
    mut reader: Reader,
    write: &mut WriteHalf,
    session: &Session,
    state: &ServiceState,
    peer: &str,
) -> Result<SessionEnd, WireError> {
    let settings = &session.settings;
    let readable = |state| readable_timeline(state, session);
    loop {
        let frame = read_frame(&mut reader, MAX_QUERY_MESSAGE_BYTES, FRAME_TIMEOUT).await?;
        let mut out = BytesMut::new();
        match frame.tag {
            tag::QUERY => {
                let command = parse_command(&query_text(&frame.body)?)
                    .map_err(|e| PgError::fatal(sqlstate::SYNTAX_ERROR, e.to_string()))?;
                let answered = match command {
                    Command::Empty => {
                        encode::empty_query_response(&mut out);
                        Ok(())
                    }
                    Command::StartWalPush => match timeline_ids(settings)? {
                        Some((tenant_id, timeline_id)) => {
                            session.authorize(Access::PushWal(tenant_id))?;
                            return Ok(SessionEnd::Push(tenant_id, timeline_id, reader));
                        }
                        None => Err(missing_ids()),
                    },
                    Command::IdentifySystem => readable(state)?.map(|handle| identify_system(&mut out, &handle)),
                    Command::Show(name) => show(&mut out, state, session, &name)?,
                    Command::TimelineHistory(timeline) => {
                        readable(state)?.and_then(|handle| timeline_history(&mut out, &handle, timeline))
                    }
                    Command::ReadReplicationSlot(_) => {
                        // A safekeeper keeps no slots: a physical slot with no
                        // position, so the client starts where
                        // IDENTIFY_SYSTEM says, as with a new slot.
                        let columns = [
                            ("slot_type", encode::TEXT_OID),
                            ("restart_lsn", encode::TEXT_OID),
                            ("restart_tli", encode::INT8_OID),
                        ];
                        encode::row_description(&mut out, &columns);
                        encode::data_row(&mut out, &[Some("physical"), None, None]);
                        encode::command_complete(&mut out, "READ_REPLICATION_SLOT");
                        Ok(())
                    }
                    Command::StartReplication(request) => {
                        match readable(state)?
                            .and_then(|handle| replication::check_request(&handle, &request).map(|()| handle))
                        {
                            Ok(handle) => {
                                match replication::run(handle, &request, reader, write, peer.to_string()).await? {
                                    StreamEnd::CopyDone(returned) => reader = returned,
                                    StreamEnd::Closed => return Ok(SessionEnd::Closed),
                                }
                                Ok(())
                            }
                            Err(error) => Err(error),
                        }
                    }
                };
                if let Err(error) = answered {
                    encode::error_response(&mut out, &error);
                }
                encode::ready_for_query(&mut out);
            }
            tag::TERMINATE => return Ok(SessionEnd::Closed),
            other if tag::EXTENDED_QUERY.contains(&other) => {
                let message = "the extended query protocol is not supported; send simple queries".to_string();
                return Err(PgError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, message).into());
            }
            other => {
                let message = format!("unexpected message type '{}' outside of a copy", printable(other));
                return Err(protocol_violation(message).into());
            }
        }
        write.write_all(&out).await.map_err(WireError::Disconnected)?;
    }
}

/// The timeline a replication client means: the one named at startup, or
/// the only timeline here (so plain `pg_receivewal -h -p` works against a
/// single-timeline safekeeper).
fn resolve_timeline(state: &ServiceState, settings: &StartupSettings) -> Result<Arc<TimelineHandle>, PgError> {
    match timeline_ids(settings)? {
        Some((tenant_id, timeline_id)) => state.timelines.get(tenant_id, timeline_id).ok_or_else(|| {
            PgError::error(
                sqlstate::UNDEFINED_OBJECT,
                format!("timeline {tenant_id}/{timeline_id} does not exist on this safekeeper"),
            )
        }),
        None => match state.timelines.list().as_slice() {
            [only] => Ok(only.clone()),
            [] => Err(PgError::error(sqlstate::UNDEFINED_OBJECT, "this safekeeper has no timeline yet".to_string())),
            _ => Err(missing_ids()),
        },
    }
}

/// The timeline a replication command reads, if the token may read it:
/// the outer error (permission denied) ends the session, the inner one (no
/// such timeline) is an ERROR answer and the session goes on.
fn readable_timeline(
    state: &ServiceState,
    session: &Session,
) -> Result<Result<Arc<TimelineHandle>, PgError>, WireError> {
    let handle = match resolve_timeline(state, &session.settings) {
        Ok(handle) => handle,
        Err(error) => return Ok(Err(error)),
    };
    session.authorize(Access::ReadWal(handle.snapshot().tenant_id))?;
    Ok(Ok(handle))
}

/// IDENTIFY_SYSTEM as a walsender answers it: the latest Postgres timeline
/// of the log, and as the WAL position the commit LSN (nothing beyond it is
/// ever streamed).
fn identify_system(out: &mut BytesMut, handle: &TimelineHandle) {
    let snapshot = handle.snapshot();
    encode::row_description(
        out,
        &[
            ("systemid", encode::TEXT_OID),
            ("timeline", encode::INT4_OID),
            ("xlogpos", encode::TEXT_OID),
            ("dbname", encode::TEXT_OID),
        ],
    );
    let system_id = snapshot.system_id.0.to_string();
    let timeline = snapshot.pg_timelines.current.to_string();
    let position = snapshot.commit_lsn.to_string();
    encode::data_row(out, &[Some(&system_id), Some(&timeline), Some(&position), None]);
    encode::command_complete(out, "IDENTIFY_SYSTEM");
}

/// TIMELINE_HISTORY as a walsender answers it: the file's name and its
/// bytes. Timeline 1, and any timeline not in the log's history, has none.
fn timeline_history(out: &mut BytesMut, handle: &TimelineHandle, timeline: u32) -> Result<(), PgError> {
    let history = handle.snapshot().pg_timelines;
    let Some(of_timeline) = history.of_ancestor(timeline).filter(|history| !history.switches.is_empty()) else {
        return Err(PgError::error(
            sqlstate::UNDEFINED_FILE,
            format!(
                "could not open file \"{}\": Postgres timeline {timeline} has no history in this log (its timelines \
                 end at {})",
                postgres_wal::timeline_history::history_file_name(timeline),
                history.current
            ),
        ));
    };
    encode::row_description(out, &[("filename", encode::TEXT_OID), ("content", encode::BYTEA_OID)]);
    let (name, text) = (of_timeline.file_name(), of_timeline.file_text());
    encode::data_row(out, &[Some(&name), Some(&text)]);
    encode::command_complete(out, "TIMELINE_HISTORY");
    Ok(())
}

/// SHOW for the settings replication clients ask about. The outer error
/// (a token that may not read the timeline) ends the session; the inner
/// one is an ERROR answer.
fn show(
    out: &mut BytesMut,
    state: &ServiceState,
    session: &Session,
    name: &str,
) -> Result<Result<(), PgError>, WireError> {
    // The timeline's own settings need the right to read it.
    let timeline = || readable_timeline(state, session).map(|handle| handle.map(|handle| handle.snapshot()));
    let value = match name {
        "wal_segment_size" => {
            let bytes = match timeline()? {
                Ok(snapshot) => snapshot.wal_seg_size.bytes(),
                Err(error) => return Ok(Err(error)),
            };
            // Postgres's GUC unit display; clients parse "<n>MB" / "<n>GB".
            if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
                format!("{}GB", bytes >> 30)
            } else {
                format!("{}MB", bytes >> 20)
            }
        }
        "server_version" => SERVER_VERSION.to_string(),
        // The Postgres version whose WAL the named timeline holds (a sync
        // proposer, which has no Postgres, greets with it).
        "server_version_num" => match timeline()? {
            Ok(snapshot) => snapshot.pg_version.to_string(),
            Err(error) => return Ok(Err(error)),
        },
        // pg_receivewal creates its files with the server's data directory
        // permissions; ours are owner-only.
        "data_directory_mode" => "0700".to_string(),
        "integer_datetimes" => "on".to_string(),
        _ => {
            return Ok(Err(PgError::error(
                sqlstate::UNDEFINED_OBJECT,
                format!("unrecognized configuration parameter \"{name}\""),
            )))
        }
    };
    encode::row_description(out, &[(name, encode::TEXT_OID)]);
    encode::data_row(out, &[Some(&value)]);
    encode::command_complete(out, "SHOW");
    Ok(Ok(()))
}

fn missing_ids() -> PgError {
    PgError::error(
        sqlstate::INVALID_PARAMETER_VALUE,
        "name the timeline with the startup parameters tenant_id and timeline_id \
         (or options '-c tenant_id=<32 hex> -c timeline_id=<32 hex>')"
            .to_string(),
    )
}
