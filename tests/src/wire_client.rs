//! A tiny blocking client of the safekeeper's Postgres wire port: the
//! startup, simple queries, and proposer messages in CopyBoth after
//! `START_WAL_PUSH`. Every socket read and write has a timeout. The framing
//! is `pq_wire`'s, the same the safekeeper and the shim use.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::{Bytes, BytesMut};
use pq_wire::error_fields::parse_error_fields;
use pq_wire::frame::{body_len, encode_message, parse_header, FRAME_HEADER_BYTES};
use pq_wire::tag;
use safekeeper_protocol::protocol::{AcceptorMessage, ProposerMessage};

/// Bound on every read and write (and the connect).
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest server message the client accepts.
const MAX_SERVER_MESSAGE_BYTES: usize = 1 << 20;

/// An ErrorResponse as the client sees it.
pub use pq_wire::error_fields::ErrorFields as ServerError;
pub use pq_wire::startup::encode_startup_packet as startup_packet;

/// A tiny frontend for the Postgres wire protocol (blocking, timeouts set).
pub struct WireClient {
    pub stream: TcpStream,
}

impl WireClient {
    pub fn raw(addr: SocketAddr) -> Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&addr, READ_TIMEOUT)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        Ok(stream)
    }

    /// Connect and complete the startup (up to the first ReadyForQuery).
    pub fn connect(addr: SocketAddr, parameters: &[(&str, &str)]) -> Result<WireClient> {
        let mut client = WireClient { stream: WireClient::raw(addr)? };
        client.stream.write_all(&startup_packet(parameters))?;
        loop {
            match client.read_message()? {
                (b'Z', _) => return Ok(client),
                (b'E', body) => bail!("startup refused: {:?}", parse_error(&body)),
                (b'R' | b'S' | b'K', _) => {}
                (tag, _) => bail!("unexpected message {:?} during startup", tag as char),
            }
        }
    }

    /// A connection for timeline `tenant`/`timeline` (hex ids).
    pub fn for_timeline(addr: SocketAddr, tenant: &str, timeline: &str) -> Result<WireClient> {
        WireClient::connect(addr, &[("user", "proposer"), ("tenant_id", tenant), ("timeline_id", timeline)])
    }

    pub fn send(&mut self, tag: u8, body: &[u8]) -> Result<()> {
        let mut frame = BytesMut::new();
        encode_message(&mut frame, tag, |out| out.extend_from_slice(body));
        self.stream.write_all(&frame)?;
        Ok(())
    }

    pub fn read_message(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        self.stream.read_exact(&mut header).context("reading a message header")?;
        let (tag, declared) = parse_header(header);
        let mut body = vec![0u8; body_len(tag, declared, MAX_SERVER_MESSAGE_BYTES)?];
        self.stream.read_exact(&mut body)?;
        Ok((tag, body))
    }

    pub fn query(&mut self, text: &str) -> Result<()> {
        let mut body = text.as_bytes().to_vec();
        body.push(0);
        self.send(b'Q', &body)
    }

    /// The next ErrorResponse (skipping nothing else: anything else fails).
    pub fn expect_error(&mut self) -> Result<ServerError> {
        match self.read_message()? {
            (b'E', body) => Ok(parse_error(&body)),
            (tag, _) => bail!("expected ErrorResponse, got {:?}", tag as char),
        }
    }

    /// The server closed the connection (EOF, or a reset after our writes).
    pub fn expect_closed(&mut self) -> Result<()> {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => Ok(()),
            Ok(_) => bail!("expected the connection to be closed, got more bytes"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e).context("expected a closed connection"),
        }
    }

    pub fn start_wal_push(&mut self) -> Result<()> {
        self.query("START_WAL_PUSH")?;
        let (tag, _) = self.read_message()?;
        ensure!(tag == b'W', "expected CopyBothResponse, got {:?}", tag as char);
        Ok(())
    }

    pub fn send_proposer(&mut self, message: &ProposerMessage) -> Result<()> {
        self.send(b'd', &message.encode())
    }

    /// Send `message`; the acceptor's answer, or the ErrorResponse that
    /// refused it.
    pub fn exchange(&mut self, message: &ProposerMessage) -> Result<std::result::Result<AcceptorMessage, ServerError>> {
        self.send_proposer(message)?;
        match self.read_message()? {
            (b'd', body) => Ok(Ok(AcceptorMessage::decode(body.into())?)),
            (b'E', body) => Ok(Err(parse_error(&body))),
            (tag, _) => bail!("unexpected message {:?} in CopyBoth", tag as char),
        }
    }

    pub fn recv_acceptor(&mut self) -> Result<AcceptorMessage> {
        match self.read_message()? {
            (b'd', body) => Ok(AcceptorMessage::decode(body.into())?),
            (b'E', body) => bail!("server error: {:?}", parse_error(&body)),
            (tag, _) => bail!("unexpected message {:?} in CopyBoth", tag as char),
        }
    }
}

/// The fields of an ErrorResponse body; a malformed one is reported as
/// its own "error" so a test shows what arrived.
pub fn parse_error(body: &[u8]) -> ServerError {
    parse_error_fields(tag::ERROR_RESPONSE, Bytes::copy_from_slice(body)).unwrap_or_else(|error| ServerError {
        message: format!("malformed ErrorResponse: {error}"),
        ..ServerError::default()
    })
}
