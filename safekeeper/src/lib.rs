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
