//! Errors sent to clients as ErrorResponse: a severity, a SQLSTATE and a
//! message. FATAL means the connection closes after it (as in Postgres);
//! ERROR leaves the session usable.

use crate::acceptor::AcceptorError;
use crate::lsn::Lsn;
use crate::storage::StorageError;

/// The SQLSTATE codes this server sends (Postgres's errcodes.txt names).
pub mod sqlstate {
    /// Malformed frames, bad lengths, messages out of place, undecodable
    /// proposer messages.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// A query that is not a command this port knows.
    pub const SYNTAX_ERROR: &str = "42601";
    /// Encryption, other protocol versions, the extended query protocol.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// A bad tenant/timeline id, a cluster id or parameter the timeline refuses.
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// A proposer message that the acceptor's rules refuse in its state.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// An append whose WAL does not decode.
    pub const DATA_CORRUPTED: &str = "XX001";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const DISK_FULL: &str = "53100";
    pub const IO_ERROR: &str = "58030";
    /// Postgres's "requested WAL segment has already been removed".
    pub const UNDEFINED_FILE: &str = "58P01";
    pub const UNDEFINED_OBJECT: &str = "42704";
    /// The timeline's owner is gone (it stopped after a storage error, or
    /// the server is shutting down).
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// The connection could not keep up with its replies.
    pub const CONNECTION_FAILURE: &str = "08006";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
}

impl PgError {
    pub fn fatal(code: &'static str, message: String) -> PgError {
        PgError { severity: Severity::Fatal, code, message: without_nul(message) }
    }

    pub fn error(code: &'static str, message: String) -> PgError {
        PgError { severity: Severity::Error, code, message: without_nul(message) }
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)
    }
}

/// Messages may quote client input; a NUL would cut the C string short.
fn without_nul(message: String) -> String {
    if message.contains('\0') {
        message.replace('\0', "\\0")
    } else {
        message
    }
}

/// A proposer message the acceptor refused; the connection closes after it.
pub fn refusal(error: &AcceptorError) -> PgError {
    use AcceptorError::*;
    let code = match error {
        ClusterMismatch { .. } | ParameterMismatch { .. } => sqlstate::INVALID_PARAMETER_VALUE,
        InvalidWal { .. } | ZeroLengthRecord { .. } => sqlstate::DATA_CORRUPTED,
        BadTermHistory { .. } | BadTimelineStart { .. } | CrossesSegment { .. } | BadConfiguration { .. } => {
            sqlstate::PROTOCOL_VIOLATION
        }
        // Not a refusal of the cluster: the proposer greets again and learns
        // the newer configuration (or that this safekeeper left it).
        StaleGeneration { .. }
        | NotAMember { .. }
        | NotElected { .. }
        | NotContiguous { .. }
        | TruncateBelowCommit { .. }
        | DigestOutOfRange { .. }
        | PeerWalRefused { .. } => sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
    };
    PgError::fatal(code, format!("refused: {error}"))
}

/// Peer recovery caught this safekeeper up while a proposer considered it
/// behind: the proposer reconnects and streams from the new position.
pub fn caught_up_by_peers(flush_lsn: Lsn) -> PgError {
    PgError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        format!("caught up from peer safekeepers to {flush_lsn}; reconnect to stream from there"),
    )
}

/// A non-fatal storage error: the timeline stops serving until reopened.
pub fn storage_failure(error: &StorageError) -> PgError {
    let code = match error {
        StorageError::NoSpace { .. } => sqlstate::DISK_FULL,
        _ => sqlstate::IO_ERROR,
    };
    PgError::fatal(code, format!("storage error, timeline closed until reopened: {error}"))
}
