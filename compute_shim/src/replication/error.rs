//! Errors of the replication client. Everything that comes from the network
//! is a typed error here; nothing the peer sends can make the client panic.

use std::io;

/// An ErrorResponse from the server, with the fields callers branch on
/// (`pq_wire`'s, shared with the safekeeper and the tests).
pub use pq_wire::error_fields::ErrorFields as ServerError;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("invalid connection string: {0}")]
    Config(String),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("TLS with {addr}: {source}")]
    Tls { addr: String, source: net::pg_tls::PgTlsError },
    #[error("{what} timed out after {timeout_ms} ms")]
    Timeout { what: &'static str, timeout_ms: u64 },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("the server closed the connection")]
    UnexpectedEof,
    #[error("server error: {0}")]
    Server(ServerError),
    /// The peer sent something that is not the PostgreSQL protocol as we
    /// expect it at this point (also what a non-Postgres peer produces).
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("message {tag:?} declares {len_bytes} bytes, over the limit of {max_bytes} bytes")]
    MessageTooLarge { tag: char, len_bytes: u64, max_bytes: usize },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("the server asks for a password and the connection string has none")]
    PasswordRequired,
    #[error("invalid replication slot name {0:?}: use 1..=63 characters of a-z, 0-9 and _")]
    InvalidSlotName(String),
    /// A previous call failed or was cancelled part-way, so where the
    /// connection stands in the protocol is unknown: reconnect.
    #[error("the connection is unusable after an earlier failed or cancelled call")]
    ConnectionBroken,
}

/// A message body that does not hold what its type promises.
impl From<pq_wire::body::BodyError> for ReplicationError {
    fn from(error: pq_wire::body::BodyError) -> Self {
        ReplicationError::Protocol(error.to_string())
    }
}

impl ReplicationError {
    /// The SQLSTATE when the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(error) => Some(&error.code),
            _ => None,
        }
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        ReplicationError::Protocol(detail.into())
    }
}
