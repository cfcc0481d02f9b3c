//! The safekeeper service: a quorum member that durably stores a Postgres
//! cluster's WAL and serves it. The timeline itself (acceptor, storage,
//! recovery) is `safekeeper_core`; this crate puts it on the network.
//!
//! Table of contents:
//! - [`service`]: the network service (pg wire port, HTTP, timeline owners).
//! - [`datadir`]: the data directory lock and node id.
//! - [`import`]: seeding a timeline from a Postgres `pg_wal` directory.

pub mod datadir;
pub mod import;
pub mod service;

// The service is written against these crate-local names of the shared
// crates (`crate::lsn::Lsn`, `crate::acceptor::Acceptor`), as when they
// lived in this crate.
use postgres_wal::{lsn, wal};
use safekeeper_api as client;
use safekeeper_core::{acceptor, control, recovery, retention, storage, timeline, timeline_node};
use safekeeper_protocol::{ids, protocol};
