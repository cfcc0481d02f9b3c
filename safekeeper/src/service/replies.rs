//! How replies get from a timeline's owner thread onto a push connection's
//! socket, without the owner ever waiting for a client.
//!
//! Two paths, never interleaved:
//! - **direct**: while nothing is queued for the connection's writer task,
//!   the owner writes an acknowledgement itself, without blocking, through a
//!   second handle on the socket. That saves a wakeup of the async runtime
//!   per acknowledgement on the commit path.
//! - **queued**: otherwise (or for whatever a non-blocking write could not
//!   take) the encoded bytes go to the writer task's bounded queue, which
//!   writes them in order. While anything is queued or being written, the
//!   direct path stays closed, so bytes keep their order.
//!
//! A full queue means the client is not reading: the connection is dropped,
//! never waited for.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};

use super::errors::PgError;
use super::pg_wire::encode;
use safekeeper_protocol::protocol::AcceptorMessage;

/// What the writer task receives: encoded CopyData to write, or an error
/// after which the connection closes.
#[derive(Debug)]
pub enum Outgoing {
    Bytes(Bytes),
    Error(PgError),
}

/// A pushing connection as its timeline owner sees it.
#[derive(Debug)]
pub struct PushConnection {
    pub id: u64,
    queue: mpsc::Sender<Outgoing>,
    direct: Mutex<DirectPath>,
    /// Set once the connection was refused or dropped: the owner ignores
    /// whatever it had queued after that.
    closed: AtomicBool,
    /// Set when the owner gives up on the connection (its reply queue was
    /// full): the connection task closes the socket at once.
    dropped: watch::Sender<bool>,
}

#[derive(Debug)]
struct DirectPath {
    /// A duplicate of the connection's socket (non-blocking, like the
    /// original); `None` once the writer task is gone or a write failed.
    socket: Option<TcpStream>,
    /// Items handed to the writer task and not yet written.
    queued: usize,
}

impl PushConnection {
    /// `socket` is a duplicate handle for direct writes (`None`: queue only).
    pub fn new(id: u64, queue: mpsc::Sender<Outgoing>, socket: Option<TcpStream>) -> Self {
        PushConnection {
            id,
            queue,
            direct: Mutex::new(DirectPath { socket, queued: 0 }),
            closed: AtomicBool::new(false),
            dropped: watch::Sender::new(false),
        }
    }

    pub fn dropped(&self) -> watch::Receiver<bool> {
        self.dropped.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Send a reply without waiting: directly if the writer task is idle
    /// and the socket takes it all now, else through the queue.
    pub fn reply(&self, reply: &AcceptorMessage) {
        let mut out = BytesMut::new();
        encode::copy_data(&mut out, &reply.encode());
        let mut direct = self.direct.lock().unwrap_or_else(PoisonError::into_inner);
        let rest = if direct.queued == 0 { direct.write_what_fits(out.freeze()) } else { Some(out.freeze()) };
        if let Some(rest) = rest {
            self.enqueue(&mut direct, Outgoing::Bytes(rest));
        }
    }

    /// Send a FATAL error; the connection closes once it is written.
    /// Returns whether it was queued.
    pub fn refuse(&self, error: PgError) -> bool {
        let mut direct = self.direct.lock().unwrap_or_else(PoisonError::into_inner);
        let queued = self.enqueue(&mut direct, Outgoing::Error(error));
        self.closed.store(true, Ordering::Relaxed);
        queued
    }

    /// The writer task wrote `items` queued items.
    pub fn written(&self, items: usize) {
        let mut direct = self.direct.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(direct.queued >= items, "wrote more items than were queued");
        direct.queued -= items;
    }

    /// The writer task is gone: close the duplicate socket so the
    /// connection really closes.
    pub fn writer_stopped(&self) {
        self.direct.lock().unwrap_or_else(PoisonError::into_inner).socket = None;
    }

    fn enqueue(&self, direct: &mut DirectPath, item: Outgoing) -> bool {
        match self.queue.try_send(item) {
            Ok(()) => {
                direct.queued += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(connection = self.id, "reply queue full: the client is not reading; dropping it");
                self.closed.store(true, Ordering::Relaxed);
                self.dropped.send_replace(true);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.closed.store(true, Ordering::Relaxed);
                false
            }
        }
    }
}

impl DirectPath {
    /// Write as much of `bytes` as the socket takes without blocking;
    /// returns what is left (all of it without a socket).
    fn write_what_fits(&mut self, mut bytes: Bytes) -> Option<Bytes> {
        let Some(socket) = &self.socket else { return Some(bytes) };
        let mut socket: &TcpStream = socket;
        while !bytes.is_empty() {
            match socket.write(&bytes) {
                Ok(0) => break,
                Ok(written) => {
                    let _ = bytes.split_to(written);
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The writer task will meet the same error and end the
                    // connection; stop using this handle.
                    self.socket = None;
                    break;
                }
            }
        }
        (!bytes.is_empty()).then_some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;
    use safekeeper_protocol::ids::{NodeId, Term};
    use safekeeper_protocol::protocol::GreetingResponse;

    /// A connected pair: our non-blocking end (as tokio leaves it) and the peer.
    fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (ours, peer)
    }

    fn greeting(term: u64) -> AcceptorMessage {
        AcceptorMessage::GreetingResponse(GreetingResponse {
            node_id: NodeId(1),
            term: Term(term),
            configuration: Default::default(),
            pg_timelines: Default::default(),
        })
    }

    fn encoded(message: &AcceptorMessage) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode::copy_data(&mut out, &message.encode());
        out.to_vec()
    }

    /// Rule: with nothing queued, a reply goes straight to the socket.
    #[test]
    fn idle_writer_means_direct_writes() {
        let (ours, mut peer) = socket_pair();
        let (queue, mut queued) = mpsc::channel(8);
        let connection = PushConnection::new(1, queue, Some(ours));
        connection.reply(&greeting(1));
        let mut got = vec![0u8; encoded(&greeting(1)).len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, encoded(&greeting(1)));
        assert!(queued.try_recv().is_err(), "nothing went through the queue");
    }

    /// Rule: while anything is queued, replies queue behind it (order kept),
    /// and the direct path reopens once the writer reports it wrote them.
    #[test]
    fn pending_items_keep_replies_in_order() {
        let (ours, mut peer) = socket_pair();
        let (queue, mut queued) = mpsc::channel(8);
        let connection = PushConnection::new(1, queue.clone(), None);
        connection.reply(&greeting(1)); // no socket: queued
        *connection.direct.lock().unwrap() = DirectPath { socket: Some(ours), queued: 1 };
        connection.reply(&greeting(2));
        for term in [1, 2] {
            match queued.try_recv() {
                Ok(Outgoing::Bytes(bytes)) => assert_eq!(bytes.to_vec(), encoded(&greeting(term))),
                other => panic!("expected queued reply {term}, got {other:?}"),
            }
        }
        connection.written(2);
        connection.reply(&greeting(3));
        let mut got = vec![0u8; encoded(&greeting(3)).len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, encoded(&greeting(3)));
    }

    /// Rule: a socket that takes only part (the peer is not reading) leaves
    /// the rest to the queue, and later replies follow it there.
    #[test]
    fn a_full_socket_hands_the_rest_to_the_queue() {
        let (ours, _peer) = socket_pair();
        let (queue, mut queued) = mpsc::channel(1 << 16);
        let connection = PushConnection::new(1, queue, Some(ours));
        let mut replies = 0;
        while queued.is_empty() {
            connection.reply(&greeting(replies));
            replies += 1;
            assert!(replies < 10_000_000, "the socket never filled");
        }
        connection.reply(&greeting(u64::MAX));
        let mut last = None;
        while let Ok(Outgoing::Bytes(bytes)) = queued.try_recv() {
            last = Some(bytes);
        }
        assert_eq!(last.unwrap().to_vec(), encoded(&greeting(u64::MAX)), "the later reply queued behind the rest");
    }

    #[test]
    fn a_full_queue_drops_the_connection() {
        let (queue, _queued) = mpsc::channel(1);
        let connection = PushConnection::new(1, queue, None);
        connection.reply(&greeting(1));
        assert!(!connection.is_closed());
        connection.reply(&greeting(2));
        assert!(connection.is_closed() && *connection.dropped().borrow());
    }
}
