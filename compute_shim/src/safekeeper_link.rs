//! The proposer's connection to one safekeeper: a Postgres wire-protocol
//! startup naming the tenant and timeline, `START_WAL_PUSH`, then one
//! encoded proposer message per CopyData frame out and one acceptor message
//! per CopyData frame in (docs/service.md).
//!
//! The link is split into a reader and a writer so a driver can wait on
//! both in `tokio::select!`; both keep partial frames in `self` and are
//! cancel-safe.

use bytes::{BufMut, Bytes};
use net::pg_tls::PgClientTls;
use net::stream::{ReadHalf, WriteHalf};
use postgres_protocol::message::frontend;
use tokio::net::TcpStream;

use safekeeper_protocol::ids::{TenantId, TimelineId};
use safekeeper_protocol::protocol::{AcceptorMessage, DecodeError, ProposerMessage, MAX_MESSAGE_BYTES};

use crate::replication::wire::{deadline_after_ms, tag, FrameReader, FrameWriter};
use crate::replication::ReplicationError;
use crate::tcp_liveness::TcpLiveness;

/// Room for the CopyData framing around the largest protocol message.
const MAX_FRAME_BYTES: usize = MAX_MESSAGE_BYTES + 16;
/// Bytes of startup chatter (parameter statuses, notices) we put up with.
const MAX_STARTUP_FRAMES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("safekeeper {addr}: {source}")]
    Wire { addr: String, source: ReplicationError },
    #[error("safekeeper {addr} sent an undecodable message: {source}")]
    Decode { addr: String, source: DecodeError },
    #[error("safekeeper {addr}: unexpected {what}")]
    Unexpected { addr: String, what: String },
    #[error("safekeeper {addr} closed the WAL push stream")]
    Closed { addr: String },
    #[error("safekeeper {addr} checks tokens and asks for one: give --auth-token-file")]
    NoToken { addr: String },
}

pub struct LinkReader {
    addr: String,
    frames: FrameReader<ReadHalf>,
}

pub struct LinkWriter {
    addr: String,
    frames: FrameWriter<WriteHalf>,
}

/// How a link reaches its safekeeper (default: no token, plaintext).
#[derive(Default)]
pub struct LinkCredentials<'a> {
    /// The password the safekeeper asks for, when it checks tokens.
    pub token: Option<&'a str>,
    /// TLS (verify-full against `--tls-ca`); `None`: plaintext.
    pub tls: Option<&'a PgClientTls>,
}

/// Connect, negotiate TLS when configured, start up (answering a request
/// for the password with the token) and enter `START_WAL_PUSH`, all within
/// `timeout_ms`.
pub async fn connect(
    addr: &str,
    tenant_id: TenantId,
    timeline_id: TimelineId,
    timeout_ms: u64,
    liveness: &TcpLiveness,
    credentials: LinkCredentials<'_>,
) -> Result<(LinkReader, LinkWriter), LinkError> {
    let wire = |source: ReplicationError| LinkError::Wire { addr: addr.to_string(), source };
    let deadline = deadline_after_ms(timeout_ms);
    let timed_out = || wire(ReplicationError::Timeout { what: "connecting", timeout_ms });
    let socket = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| wire(e.into()))?;
    socket.set_nodelay(true).map_err(|e| wire(e.into()))?;
    liveness.apply(&socket).map_err(|e| wire(e.into()))?;
    let stream = match credentials.tls {
        Some(tls) => {
            let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
            tokio::time::timeout_at(deadline, tls.negotiate(socket, host))
                .await
                .map_err(|_| timed_out())?
                .map_err(|source| wire(ReplicationError::Tls { addr: addr.to_string(), source }))?
        }
        None => net::stream::Stream::Plain(socket),
    };
    let token = credentials.token;
    let (read, write) = stream.split();
    let mut reader = LinkReader { addr: addr.to_string(), frames: FrameReader::new(read, MAX_FRAME_BYTES) };
    let mut writer = LinkWriter { addr: addr.to_string(), frames: FrameWriter::new(write) };
    let (tenant, timeline) = (tenant_id.to_string(), timeline_id.to_string());
    let params = [
        ("user", "compute_shim"),
        ("application_name", "compute_shim"),
        ("tenant_id", tenant.as_str()),
        ("timeline_id", timeline.as_str()),
    ];
    writer.frames.queue(|buf| frontend::startup_message(params, buf)).map_err(wire)?;
    writer.frames.flush_within("sending startup", timeout_ms).await.map_err(wire)?;
    reader.await_copy_both(&mut writer, timeout_ms, token).await?;
    Ok((reader, writer))
}

/// AuthenticationCleartextPassword: the safekeeper wants the token.
const AUTH_CLEARTEXT_PASSWORD: u32 = 3;
const AUTH_OK: u32 = 0;

impl LinkReader {
    /// Answer the startup up to CopyBothResponse: the token when asked for
    /// it, START_WAL_PUSH once ready; errors are the server's.
    async fn await_copy_both(
        &mut self,
        writer: &mut LinkWriter,
        timeout_ms: u64,
        token: Option<&str>,
    ) -> Result<(), LinkError> {
        let wire = |source: ReplicationError| LinkError::Wire { addr: self.addr.clone(), source };
        let unexpected = |what: String| LinkError::Unexpected { addr: self.addr.clone(), what };
        let mut push_asked = false;
        for _ in 0..MAX_STARTUP_FRAMES {
            let frame = self.frames.next_frame("starting the WAL push", timeout_ms).await.map_err(wire)?;
            match frame.tag {
                tag::COPY_BOTH_RESPONSE => return Ok(()),
                tag::ERROR_RESPONSE => {
                    let error = crate::replication::wire::parse_server_error(frame).map_err(wire)?;
                    return Err(wire(ReplicationError::Server(error)));
                }
                tag::AUTHENTICATION => match frame
                    .body
                    .get(..4)
                    .map(|code| u32::from_be_bytes(code.try_into().expect("4 bytes")))
                {
                    Some(AUTH_OK) => {}
                    Some(AUTH_CLEARTEXT_PASSWORD) => {
                        let token = token.ok_or_else(|| LinkError::NoToken { addr: self.addr.clone() })?;
                        writer.frames.queue(|buf| frontend::password_message(token.as_bytes(), buf)).map_err(wire)?;
                        writer.frames.flush_within("sending the token", timeout_ms).await.map_err(wire)?;
                    }
                    other => return Err(unexpected(format!("authentication request {other:?}"))),
                },
                tag::PARAMETER_STATUS | tag::BACKEND_KEY_DATA | tag::NOTICE_RESPONSE => {}
                tag::READY_FOR_QUERY if !push_asked => {
                    push_asked = true;
                    writer.frames.queue(|buf| frontend::query("START_WAL_PUSH", buf)).map_err(wire)?;
                    writer.frames.flush_within("sending START_WAL_PUSH", timeout_ms).await.map_err(wire)?;
                }
                other => {
                    let what = format!("message {:?} during startup", char::from(other));
                    return Err(LinkError::Unexpected { addr: self.addr.clone(), what });
                }
            }
        }
        let what = format!("more than {MAX_STARTUP_FRAMES} startup messages");
        Err(LinkError::Unexpected { addr: self.addr.clone(), what })
    }

    /// The next acceptor message. Cancel-safe.
    pub async fn next_message(&mut self) -> Result<AcceptorMessage, LinkError> {
        let wire = |addr: &str, source: ReplicationError| LinkError::Wire { addr: addr.to_string(), source };
        loop {
            if let Some(frame) = self.frames.try_frame().map_err(|e| wire(&self.addr, e))? {
                return match frame.tag {
                    tag::COPY_DATA => AcceptorMessage::decode(frame.body)
                        .map_err(|source| LinkError::Decode { addr: self.addr.clone(), source }),
                    tag::ERROR_RESPONSE => {
                        let error =
                            crate::replication::wire::parse_server_error(frame).map_err(|e| wire(&self.addr, e))?;
                        Err(wire(&self.addr, ReplicationError::Server(error)))
                    }
                    tag::COPY_DONE => Err(LinkError::Closed { addr: self.addr.clone() }),
                    other => {
                        let what = format!("message {:?} in the WAL push stream", char::from(other));
                        Err(LinkError::Unexpected { addr: self.addr.clone(), what })
                    }
                };
            }
            self.frames.fill().await.map_err(|e| wire(&self.addr, e))?;
        }
    }
}

impl LinkWriter {
    /// Queue and write one message. If the call is cancelled the message
    /// stays queued and the next call writes it before its own (so do not
    /// send it again).
    pub async fn send(&mut self, message: &ProposerMessage) -> Result<(), LinkError> {
        let wire = |addr: &str, source: ReplicationError| LinkError::Wire { addr: addr.to_string(), source };
        let payload: Bytes = message.encode();
        self.frames
            .queue(|buf| {
                buf.put_u8(tag::COPY_DATA);
                buf.put_u32(4 + payload.len() as u32);
                buf.put_slice(&payload);
                Ok(())
            })
            .map_err(|e| wire(&self.addr, e))?;
        self.frames.flush().await.map_err(|e| wire(&self.addr, e))
    }
}
