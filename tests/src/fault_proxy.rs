//! A fault-injecting TCP proxy for chaos tests: it sits between a client
//! (compute_shim, pageserver_stub) and a server (a safekeeper port) on
//! loopback and does, on command, what a bad network does.
//!
//! Faults ([`Fault`]): added delay per chunk, every connection dropped (and
//! new ones refused while it lasts), a partition of both directions and a
//! one-way partition. A partition behaves as TCP does when packets are
//! lost: the bytes stop moving (nothing is delivered, the sender's buffers
//! fill) and arrive late once it heals, unless an endpoint gives up and
//! closes first. [`Fault::None`] heals.
//!
//! The proxy runs on its own thread with a current-thread tokio runtime, so
//! a test drives it from plain threads.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes moved per read.
const CHUNK_BYTES: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every chunk waits this long before it is forwarded.
    Delay(Duration),
    /// Existing connections are closed; new ones are closed at once.
    Drop,
    /// Nothing moves either way; connections stay open.
    Partition,
    /// Client-to-server bytes stall (the server hears nothing).
    ClientToServerStalled,
    /// Server-to-client bytes stall (the client hears nothing).
    ServerToClientStalled,
}

/// A running proxy; stops (closing every connection) when dropped.
pub struct FaultProxy {
    pub listen_addr: SocketAddr,
    pub upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    stats: Arc<Mutex<ProxyStats>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyStats {
    pub connections: u64,
    pub bytes_forwarded: u64,
    /// Times a direction stalled under a partition.
    pub stalls: u64,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a proxy port")?;
        std_listener.set_nonblocking(true)?;
        let listen_addr = std_listener.local_addr()?;
        let (fault, faults) = watch::channel(Fault::None);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let stats = Arc::new(Mutex::new(ProxyStats::default()));
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new().name(format!("proxy-{}", listen_addr.port())).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("a listener");
                tokio::select! {
                    _ = accept_loop(listener, upstream, faults, thread_stats) => {}
                    _ = stopped => {}
                }
            });
        })?;
        Ok(FaultProxy { listen_addr, upstream, fault, stats, stop: Some(stop), thread: Some(thread) })
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn stats(&self) -> ProxyStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Fault>,
    stats: Arc<Mutex<ProxyStats>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if *faults.borrow() == Fault::Drop {
            drop(client);
            continue;
        }
        stats.lock().unwrap_or_else(|e| e.into_inner()).connections += 1;
        let faults = faults.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let Ok(Ok(server)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
            else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let upstream_half =
                pump(client_read, server_write, Direction::ClientToServer, faults.clone(), stats.clone());
            let downstream_half = pump(server_read, client_write, Direction::ServerToClient, faults, stats);
            // Either direction ending (EOF, error, Drop fault) ends both.
            tokio::select! {
                _ = upstream_half => {}
                _ = downstream_half => {}
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    fn stalled_by(self, fault: Fault) -> bool {
        match fault {
            Fault::Partition => true,
            Fault::ClientToServerStalled => self == Direction::ClientToServer,
            Fault::ServerToClientStalled => self == Direction::ServerToClient,
            _ => false,
        }
    }
}

/// Copy one direction, applying the current fault to each chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Direction,
    mut faults: watch::Receiver<Fault>,
    stats: Arc<Mutex<ProxyStats>>,
) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        if direction.stalled_by(*faults.borrow()) {
            stats.lock().unwrap_or_else(|e| e.into_inner()).stalls += 1;
            // Stop reading: the sender's socket buffers fill, as under loss.
            if faults.wait_for(|fault| !direction.stalled_by(*fault)).await.is_err() {
                return;
            }
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            changed = faults.wait_for(|fault| *fault == Fault::Drop) => {
                let _ = changed;
                return;
            }
        };
        let len = match read {
            Ok(0) | Err(_) => return,
            Ok(len) => len,
        };
        let fault = *faults.borrow();
        if fault == Fault::Drop {
            return;
        }
        if direction.stalled_by(fault) {
            // Read just before the partition began: deliver after it heals.
            if faults.wait_for(|fault| !direction.stalled_by(*fault)).await.is_err() {
                return;
            }
        }
        if let Fault::Delay(delay) = fault {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..len]).await.is_err() {
            return;
        }
        stats.lock().unwrap_or_else(|e| e.into_inner()).bytes_forwarded += len as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;

    /// An echo server on loopback, for the proxy to stand in front of.
    fn echo_server() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(stream: &mut StdStream, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(bytes)?;
        let mut back = vec![0u8; bytes.len()];
        stream.read_exact(&mut back)?;
        Ok(back)
    }

    #[test]
    fn forwards_and_injects_each_fault() {
        let proxy = FaultProxy::start(echo_server()).unwrap();
        let connect = || {
            let stream = StdStream::connect(proxy.listen_addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            stream
        };
        let mut stream = connect();
        assert_eq!(round_trip(&mut stream, b"hello").unwrap(), b"hello");

        proxy.set(Fault::Partition);
        std::thread::sleep(Duration::from_millis(50));
        assert!(round_trip(&mut stream, b"held").is_err(), "a partition stalls");
        proxy.set(Fault::None);
        let mut late = [0u8; 4];
        stream.read_exact(&mut late).unwrap();
        assert_eq!(&late, b"held", "delivered once healed, nothing lost");
        proxy.set(Fault::ServerToClientStalled);
        let mut fresh = connect();
        assert!(round_trip(&mut fresh, b"one-way").is_err(), "the answer stalls");

        proxy.set(Fault::Delay(Duration::from_millis(100)));
        let mut slow = connect();
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut slow, b"slow").unwrap(), b"slow");
        assert!(started.elapsed() >= Duration::from_millis(200), "delayed each way");

        proxy.set(Fault::Drop);
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 1];
        assert!(matches!(slow.read(&mut buf), Ok(0) | Err(_)), "dropped");
        proxy.set(Fault::None);
        let mut healed = connect();
        assert_eq!(round_trip(&mut healed, b"healed").unwrap(), b"healed");
        let stats = proxy.stats();
        assert!(stats.connections >= 4 && stats.stalls > 0 && stats.bytes_forwarded > 0, "{stats:?}");
    }
}
