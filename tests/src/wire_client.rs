//! A tiny blocking client of the safekeeper's Postgres wire port: the
//! startup, simple queries, and proposer messages in CopyBoth after
//! `START_WAL_PUSH`. Every socket read and write has a timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use safekeeper_protocol::protocol::{AcceptorMessage, ProposerMessage};

/// Bound on every read and write (and the connect).
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest server message the client accepts.
const MAX_SERVER_MESSAGE_BYTES: usize = 1 << 20;

/// An ErrorResponse as the client sees it.
#[derive(Debug)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

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
        let mut frame = vec![tag];
        frame.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        frame.extend_from_slice(body);
        self.stream.write_all(&frame)?;
        Ok(())
    }

    pub fn read_message(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        self.stream.read_exact(&mut header).context("reading a message header")?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        ensure!((4..=MAX_SERVER_MESSAGE_BYTES).contains(&len), "bad server message length {len}");
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body)?;
        Ok((header[0], body))
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

pub fn startup_packet(parameters: &[(&str, &str)]) -> Vec<u8> {
    let mut body = (3u32 << 16).to_be_bytes().to_vec();
    for (name, value) in parameters {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = (body.len() as u32 + 4).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

pub fn parse_error(body: &[u8]) -> ServerError {
    let mut error = ServerError { severity: String::new(), code: String::new(), message: String::new() };
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'S' => error.severity = value,
            b'C' => error.code = value,
            b'M' => error.message = value,
            _ => {}
        }
    }
    error
}
