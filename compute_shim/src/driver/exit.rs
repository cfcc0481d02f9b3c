//! What ends the shim and what it rides out. The shim is a long-running
//! service: a Postgres restart, a broken or ended replication stream, a
//! Postgres or quorum briefly unreachable are retried in the same process
//! (with a backoff, in a new term when the proposer must start over). Only
//! a refusal that no retry can fix ends it, each with its own exit status,
//! so that a supervisor (deploy/systemd/compute_shim.service) and an
//! operator can tell them apart. The table is docs/operations.md's.

use super::ShimError;
use crate::proposer::ProposerError;
use crate::replication::ReplicationError;

/// The process's exit status, by cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShimExit {
    /// SIGTERM or SIGINT: stepped down.
    SteppedDown = 0,
    /// Anything else that cannot go on (a port that cannot be bound, ...).
    Failed = 1,
    /// A flag or the connection string is wrong (clap's usage errors are 2 too).
    BadArguments = 2,
    /// Another compute_shim holds a higher term: it leads now.
    Fenced = 3,
    /// The safekeepers refuse this cluster, or the `--safekeepers` list
    /// names a node twice, a replaced node, or an inconsistent set.
    SafekeepersRefuse = 4,
    /// This Postgres is not the primary the safekeepers' log is of: behind
    /// it, diverged from it, on a superseded or unrelated timeline.
    NotTheLogsPrimary = 5,
    /// WAL the safekeepers need is gone from Postgres.
    WalGone = 6,
    /// A credential is refused: Postgres's (authentication, permissions)
    /// or a safekeeper's (the token). A supervisor may retry: the operator
    /// fixes the role or the token file meanwhile.
    CredentialsRefused = 7,
    /// Postgres is of a major version this build does not support.
    UnsupportedPostgres = 8,
}

impl ShimExit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// What to do about an error that ended one run of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transient: connect to Postgres again (after the backoff) and start
    /// a new term.
    Retry,
    Exit(ShimExit),
}

impl ShimError {
    pub fn verdict(&self) -> Verdict {
        match self {
            ShimError::Proposer(error) => proposer_verdict(error),
            ShimError::Replication(error) => replication_verdict(error),
            ShimError::SafekeeperRefused { .. } => Verdict::Exit(ShimExit::SafekeepersRefuse),
            ShimError::SafekeeperUnauthorized { .. } => Verdict::Exit(ShimExit::CredentialsRefused),
            ShimError::StreamEnded(_) => Verdict::Retry,
            ShimError::BadArguments(_) => Verdict::Exit(ShimExit::BadArguments),
            ShimError::UnsupportedPostgres(_) => Verdict::Exit(ShimExit::UnsupportedPostgres),
            ShimError::Stopped(_) => Verdict::Exit(ShimExit::Failed),
        }
    }
}

fn proposer_verdict(error: &ProposerError) -> Verdict {
    use ProposerError::*;
    let exit = match error {
        Fenced { .. } => ShimExit::Fenced,
        DuplicateSafekeeper { .. }
        | SafekeeperReplaced { .. }
        | CommitAboveTermStart { .. }
        | TermHistoryFull
        | TermsExhausted { .. } => ShimExit::SafekeepersRefuse,
        PostgresBehind { .. }
        | PostgresDiverged { .. }
        | Superseded { .. }
        | PromotedBelowLogEnd { .. }
        | UnrelatedTimeline { .. } => ShimExit::NotTheLogsPrimary,
        PostgresWalGone { .. } | PostgresWalRemoved { .. } => ShimExit::WalGone,
        NothingToSync => ShimExit::Failed,
        // The log holders were unreachable, or Postgres moved on during the
        // log check: a new election starts from what is reachable now. The
        // rest are not fatal (a peer fault, a full buffer) or are the
        // driver's own mistakes, which a fresh start from the log repairs.
        NoLogHolder { .. }
        | LogCheckWalRemoved { .. }
        | Peer { .. }
        | WalNotWanted
        | WalNotContiguous { .. }
        | WalBufferFull { .. } => return Verdict::Retry,
    };
    Verdict::Exit(exit)
}

/// SQLSTATE class 28 (invalid_authorization_specification) and
/// insufficient_privilege (a role without REPLICATION).
fn refuses_role(code: &str) -> bool {
    code.starts_with("28") || code == "42501"
}

fn replication_verdict(error: &ReplicationError) -> Verdict {
    match error {
        ReplicationError::Config(_) | ReplicationError::InvalidSlotName(_) => Verdict::Exit(ShimExit::BadArguments),
        ReplicationError::Auth(_) | ReplicationError::PasswordRequired => Verdict::Exit(ShimExit::CredentialsRefused),
        // An untrusted certificate, TLS required but not offered, our own
        // CA file unusable: nothing changes by retrying.
        ReplicationError::Tls { source, .. } if source.is_refusal() => Verdict::Exit(ShimExit::CredentialsRefused),
        ReplicationError::Server(server) if refuses_role(&server.code) => Verdict::Exit(ShimExit::CredentialsRefused),
        // Refused connections, timeouts, a Postgres shutting down or
        // starting up (57P01, 57P03), too many connections (53300), a slot
        // still held by a walsender that has not noticed us gone (55006),
        // a connection cut mid-message.
        _ => Verdict::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_wal::lsn::Lsn;
    use safekeeper_protocol::ids::Term;

    fn server_error(code: &str) -> ShimError {
        let fields = crate::replication::ServerError { code: code.into(), ..Default::default() };
        ShimError::Replication(ReplicationError::Server(fields))
    }

    /// The refusals of docs/operations.md's table end the shim with their
    /// own status; what a restart of Postgres looks like is retried.
    #[test]
    fn refusals_exit_and_outages_are_retried() {
        let exit = |error: ShimError| error.verdict();
        assert_eq!(exit(ProposerError::Fenced { term: Term(3) }.into()), Verdict::Exit(ShimExit::Fenced));
        let behind = ProposerError::PostgresBehind { term_start_lsn: Lsn(2), postgres_flush_lsn: Lsn(1) };
        assert_eq!(exit(behind.into()), Verdict::Exit(ShimExit::NotTheLogsPrimary));
        let gone = ProposerError::PostgresWalRemoved { lsn: Lsn(1) };
        assert_eq!(exit(gone.into()), Verdict::Exit(ShimExit::WalGone));
        let refused = ShimError::SafekeeperRefused { addr: "a:1".into(), reason: "other system".into() };
        assert_eq!(exit(refused), Verdict::Exit(ShimExit::SafekeepersRefuse));
        let token = ShimError::SafekeeperUnauthorized { addr: "a:1".into(), reason: "token expired".into() };
        assert_eq!(exit(token), Verdict::Exit(ShimExit::CredentialsRefused));
        assert_eq!(exit(server_error("28P01")), Verdict::Exit(ShimExit::CredentialsRefused));
        assert_eq!(exit(server_error("42501")), Verdict::Exit(ShimExit::CredentialsRefused));
        assert_eq!(exit(ReplicationError::Config("bad".into()).into()), Verdict::Exit(ShimExit::BadArguments));
        let version = crate::driver::startup::check_postgres_version(160014).unwrap_err();
        assert!(version.to_string().contains("PostgreSQL 16") && version.to_string().contains("supported: 15"));
        assert_eq!(exit(version), Verdict::Exit(ShimExit::UnsupportedPostgres));
        for supported in [150000, 150018] {
            assert!(crate::driver::startup::check_postgres_version(supported).is_ok());
        }
        for unsupported in [140012, 160014, 170010, 180004, 190000] {
            assert!(crate::driver::startup::check_postgres_version(unsupported).is_err(), "{unsupported}");
        }

        for transient in ["57P01", "57P03", "53300", "55006", "XX000"] {
            assert_eq!(exit(server_error(transient)), Verdict::Retry, "{transient}");
        }
        assert_eq!(exit(ReplicationError::UnexpectedEof.into()), Verdict::Retry);
        let refused_connection = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let connect = ReplicationError::Connect { addr: "127.0.0.1:1".into(), source: refused_connection };
        assert_eq!(exit(connect.into()), Verdict::Retry);
        assert_eq!(exit(ShimError::StreamEnded("Postgres ended the replication stream".into())), Verdict::Retry);
        let no_holder = ProposerError::NoLogHolder { term_start_lsn: Lsn(1), waited_ms: 10 };
        assert_eq!(exit(no_holder.into()), Verdict::Retry);
    }
}
