//! A connection that is plain TCP or TLS over TCP, for the Postgres-wire
//! ports and links, split into a read half and a write half so one task
//! may read while another writes.
//!
//! Plain TCP splits without a lock (tokio's owned halves) and keeps its raw
//! socket reachable for the safekeeper's direct reply path; TLS halves
//! share the session through tokio's split (a lock per poll), since both
//! directions drive one rustls state.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// TLS over TCP, client or server side.
pub type TlsTcpStream = tokio_rustls::TlsStream<TcpStream>;

/// One of two byte streams, plain or TLS; reads and writes go to whichever
/// it is.
pub enum PlainOrTls<P, T> {
    Plain(P),
    Tls(T),
}

/// A whole connection, before it is split.
pub type Stream = PlainOrTls<TcpStream, Box<TlsTcpStream>>;
pub type ReadHalf = PlainOrTls<OwnedReadHalf, tokio::io::ReadHalf<TlsTcpStream>>;
pub type WriteHalf = PlainOrTls<OwnedWriteHalf, tokio::io::WriteHalf<TlsTcpStream>>;

impl<P, T> PlainOrTls<P, T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, PlainOrTls::Tls(_))
    }
}

impl Stream {
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            PlainOrTls::Plain(tcp) => {
                let (read, write) = tcp.into_split();
                (PlainOrTls::Plain(read), PlainOrTls::Plain(write))
            }
            PlainOrTls::Tls(tls) => {
                let (read, write) = tokio::io::split(*tls);
                (PlainOrTls::Tls(read), PlainOrTls::Tls(write))
            }
        }
    }
}

impl WriteHalf {
    /// The socket, when bytes written straight to it reach the peer as
    /// they are (plain TCP only: under TLS every byte goes through rustls).
    pub fn plain_socket(&self) -> Option<BorrowedFd<'_>> {
        match self {
            PlainOrTls::Plain(write) => Some(write.as_ref().as_fd()),
            PlainOrTls::Tls(_) => None,
        }
    }
}

impl<P: AsyncRead + Unpin, T: AsyncRead + Unpin> AsyncRead for PlainOrTls<P, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PlainOrTls::Plain(plain) => Pin::new(plain).poll_read(cx, buf),
            PlainOrTls::Tls(tls) => Pin::new(tls).poll_read(cx, buf),
        }
    }
}

impl<P: AsyncWrite + Unpin, T: AsyncWrite + Unpin> AsyncWrite for PlainOrTls<P, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PlainOrTls::Plain(plain) => Pin::new(plain).poll_write(cx, buf),
            PlainOrTls::Tls(tls) => Pin::new(tls).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PlainOrTls::Plain(plain) => Pin::new(plain).poll_write_vectored(cx, bufs),
            PlainOrTls::Tls(tls) => Pin::new(tls).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            PlainOrTls::Plain(plain) => plain.is_write_vectored(),
            PlainOrTls::Tls(tls) => tls.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PlainOrTls::Plain(plain) => Pin::new(plain).poll_flush(cx),
            PlainOrTls::Tls(tls) => Pin::new(tls).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PlainOrTls::Plain(plain) => Pin::new(plain).poll_shutdown(cx),
            PlainOrTls::Tls(tls) => Pin::new(tls).poll_shutdown(cx),
        }
    }
}
