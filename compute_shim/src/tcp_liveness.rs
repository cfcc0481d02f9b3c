//! How a connection to a dead or unreachable host ends within seconds
//! however little is sent on it: TCP keepalive probes while it is idle, and
//! a user timeout (TCP_USER_TIMEOUT) while sent data goes unacknowledged.
//! A hung process whose kernel still acknowledges is not caught this way:
//! that is the proposer's silence timeout (docs/proposer.md). Set on every
//! connection the shim opens: to Postgres and to every safekeeper.

use std::time::Duration;

use tokio::net::TcpStream;

/// Defaults of `--tcp-keepalive-idle-s`, `--tcp-keepalive-interval-s`,
/// `--tcp-keepalive-probes` and `--tcp-user-timeout-ms`.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_PROBES: u32 = 5;
pub const USER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLiveness {
    /// An idle connection gets keepalive probes after this long...
    pub keepalive_idle: Duration,
    /// ...this often...
    pub keepalive_interval: Duration,
    /// ...and is closed by the kernel after this many unanswered ones.
    pub keepalive_probes: u32,
    /// Sent data unacknowledged by the peer's kernel this long closes it.
    pub user_timeout: Duration,
}

impl Default for TcpLiveness {
    fn default() -> Self {
        TcpLiveness {
            keepalive_idle: KEEPALIVE_IDLE,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_probes: KEEPALIVE_PROBES,
            user_timeout: USER_TIMEOUT,
        }
    }
}

impl TcpLiveness {
    pub fn apply(&self, socket: &TcpStream) -> std::io::Result<()> {
        let socket = socket2::SockRef::from(socket);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.keepalive_idle)
            .with_interval(self.keepalive_interval)
            .with_retries(self.keepalive_probes);
        socket.set_tcp_keepalive(&keepalive)?;
        socket.set_tcp_user_timeout(Some(self.user_timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is configured is what the socket gets.
    #[tokio::test]
    async fn sockets_get_the_configured_liveness() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let liveness = TcpLiveness {
            keepalive_idle: Duration::from_secs(7),
            keepalive_interval: Duration::from_secs(2),
            keepalive_probes: 3,
            user_timeout: Duration::from_millis(4_500),
        };
        liveness.apply(&socket).unwrap();
        let socket = socket2::SockRef::from(&socket);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), liveness.keepalive_idle);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), liveness.keepalive_interval);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), liveness.keepalive_probes);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(liveness.user_timeout));
    }
}
