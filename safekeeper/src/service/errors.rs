//! Errors sent to clients as ErrorResponse: a severity, a SQLSTATE and a
//! message. FATAL means the connection closes after it (as in Postgres);
//! ERROR leaves the session usable.

/// The SQLSTATE codes this server sends (Postgres's errcodes.txt names).
pub mod sqlstate {
    /// The codes a timeline node refuses with (documented there).
    pub use safekeeper_core::timeline_node::sqlstate::{
        ADMIN_SHUTDOWN, INVALID_PARAMETER_VALUE, IO_ERROR, OBJECT_NOT_IN_PREREQUISITE_STATE, PROTOCOL_VIOLATION,
    };
    /// A query that is not a command this port knows.
    pub const SYNTAX_ERROR: &str = "42601";
    /// Encryption, other protocol versions, the extended query protocol.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// A Greeting for a new timeline past `--max-timelines`.
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    /// Postgres's "requested WAL segment has already been removed".
    pub const UNDEFINED_FILE: &str = "58P01";
    pub const UNDEFINED_OBJECT: &str = "42704";
    /// The connection could not keep up with its replies.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// A valid token whose scope or tenant does not allow the command.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    /// No token, or one that is malformed, expired or not ours.
    pub const INVALID_PASSWORD: &str = "28P01";
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

    /// The same error, ending the session (an ERROR in the middle of a
    /// stream cannot leave it usable).
    pub fn into_fatal(self) -> PgError {
        PgError { severity: Severity::Fatal, ..self }
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
