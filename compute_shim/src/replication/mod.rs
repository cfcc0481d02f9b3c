//! A physical replication client of a PostgreSQL 15 primary, written on
//! `postgres-protocol` (tokio-postgres has no replication mode).
//!
//! - [`config`]: connection strings (libpq keyword/value or URI) and limits.
//! - [`client`]: startup, authentication (trust, cleartext, md5,
//!   SCRAM-SHA-256), simple queries, IDENTIFY_SYSTEM and slot commands.
//! - [`stream`]: START_REPLICATION's CopyBoth phase: XLogData and keepalives
//!   in, standby status updates out; cancel-safe for `tokio::select!`.
//! - [`passfile`]: the password from `~/.pgpass` / `PGPASSFILE` / `passfile=`.
//! - `wire`: bounded framing of backend messages; `auth`: the handshake.
//!
//! Every read has a timeout and every message a size limit; whatever the
//! peer sends becomes a [`ReplicationError`], never a panic.

mod auth;
pub mod client;
pub mod config;
mod error;
pub mod passfile;
pub mod stream;
pub(crate) mod wire;

pub use auth::AuthMethod;
pub use client::{ReplicationClient, SlotPosition, SystemIdentity};
pub use config::ReplicationConfig;
pub use error::{ReplicationError, ServerError};
pub use stream::{ReplicationEvent, ReplicationStream, StandbyStatus};
