//! What every test shares: the one bounded wait (and its form for a child
//! process's exit) and the one way to hold a loopback port.
//!
//! Ports: our own binaries bind port 0 and report the port they got (see
//! `safekeeper::listen_addrs`), so nothing is guessed. A [`PortReservation`]
//! is for what cannot work that way: Postgres (it has no port 0), and a
//! safekeeper whose address others must be given before it starts (its
//! peers) or that must come back at the same address after a restart.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::ControlFlow;
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

/// How often a wait polls what it waits for.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A loopback port held for one process that binds it explicitly, for as
/// long as this value lives (across that process's restarts).
///
/// The socket is bound with SO_REUSEADDR and never listens. Linux then
/// lets another SO_REUSEADDR socket (Rust's std and tokio listeners,
/// Postgres) bind and listen on the same port, while it gives the port to
/// no one else: neither `bind(0)` nor an outgoing connection's ephemeral
/// port picks a port a socket is bound to. So a port chosen here cannot be
/// taken in between, which a "port that was free a moment ago" could. With
/// no listener on it, a connection is refused, as on any closed port.
pub struct PortReservation {
    _socket: Socket,
    addr: SocketAddr,
}

impl PortReservation {
    pub fn new() -> Result<PortReservation> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("creating a socket")?;
        socket.set_reuse_address(true).context("setting SO_REUSEADDR")?;
        let any_port = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        socket.bind(&any_port.into()).context("binding 127.0.0.1:0")?;
        let addr = socket.local_addr()?.as_socket().context("a loopback socket has an inet address")?;
        Ok(PortReservation { _socket: socket, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// The deadline and the last error of one wait (shared by the blocking and
/// the async form, so both time out and report alike).
struct Waiting<'a> {
    what: &'a str,
    timeout: Duration,
    deadline: Instant,
    last_error: Option<anyhow::Error>,
}

impl<'a> Waiting<'a> {
    fn new(timeout: Duration, what: &'a str) -> Waiting<'a> {
        Waiting { what, timeout, deadline: Instant::now() + timeout, last_error: None }
    }

    /// One check's outcome: done, or keep polling, or past the deadline.
    fn step<T>(&mut self, checked: Result<Option<T>>) -> ControlFlow<Result<T>> {
        match checked {
            Ok(Some(value)) => return ControlFlow::Break(Ok(value)),
            Ok(None) => {}
            Err(error) => self.last_error = Some(error),
        }
        if Instant::now() < self.deadline {
            return ControlFlow::Continue(());
        }
        let detail = self.last_error.take().map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
        let (timeout, what) = (self.timeout, self.what);
        ControlFlow::Break(Err(anyhow::anyhow!("timed out after {timeout:?} waiting for {what}{detail}")))
    }
}

/// Poll `check` until it yields a value or `timeout` passes. Errors from
/// `check` (a process still starting, say) count as "not yet"; the last one
/// is quoted if the wait times out.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let mut waiting = Waiting::new(timeout, what);
    loop {
        if let ControlFlow::Break(result) = waiting.step(check()) {
            return result;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// [`wait_for`] for async tests: the same bounded poll, sleeping on tokio.
pub async fn wait_for_async<T, F>(timeout: Duration, what: &str, mut check: impl FnMut() -> F) -> Result<T>
where
    F: Future<Output = Result<Option<T>>>,
{
    let mut waiting = Waiting::new(timeout, what);
    loop {
        if let ControlFlow::Break(result) = waiting.step(check().await) {
            return result;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Wait for `child` up to `timeout`; `None` if it is still running.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Join `handle`, waiting at most `timeout` for the thread to finish.
pub fn join_bounded<T>(handle: thread::JoinHandle<T>, timeout: Duration) -> Result<T> {
    wait_for(timeout, "a thread to finish", || Ok(handle.is_finished().then_some(())))?;
    handle.join().map_err(|_| anyhow::anyhow!("the thread panicked"))
}

#[cfg(test)]
mod tests {
    use anyhow::bail;

    use super::*;

    #[test]
    fn a_wait_times_out_and_quotes_the_last_error() {
        let mut calls = 0;
        let error = wait_for(Duration::from_millis(100), "nothing", || -> Result<Option<()>> {
            calls += 1;
            bail!("not yet: call {calls}")
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("timed out") && error.contains("waiting for nothing"), "{error}");
        assert!(error.contains("not yet: call"), "{error}");
        assert!(calls > 1, "polled more than once");
    }

    #[test]
    fn a_wait_returns_the_value_once_ready() {
        let mut calls = 0;
        let value = wait_for(Duration::from_secs(5), "the third call", || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .unwrap();
        assert_eq!(value, 3);
    }

    #[test]
    fn a_reserved_port_is_given_to_nobody_else_but_its_process_can_listen() {
        let reservation = PortReservation::new().unwrap();
        // Nothing listens: a connection is refused.
        assert!(std::net::TcpStream::connect(reservation.addr()).is_err());
        // bind(0) never hands it out (the kernel skips bound ports).
        let others: Vec<std::net::TcpListener> =
            (0..200).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        assert!(others.iter().all(|l| l.local_addr().unwrap().port() != reservation.port()));
        // The process it is meant for binds it explicitly (std sets
        // SO_REUSEADDR), and again after a restart.
        for _ in 0..2 {
            let listener = std::net::TcpListener::bind(reservation.addr()).unwrap();
            let _client = std::net::TcpStream::connect(reservation.addr()).unwrap();
            let _accepted = listener.accept().unwrap();
        }
    }
}
