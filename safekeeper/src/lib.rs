//! The safekeeper: a quorum member that durably stores a Postgres cluster's WAL.
//!
//! Table of contents:
//! - [`lsn`], [`ids`]: positions and identities.
//! - [`wal`]: the PG15 WAL format (decoder, generator).
//! - [`control`]: the durable acceptor state.
//! - [`membership`]: the safekeeper set (configuration, generation, quorums).
//! - [`storage`]: segment files, the control file, an in-memory model.
//! - [`protocol`]: proposer/acceptor messages and their encoding.
//! - [`acceptor`]: the consensus acceptor as a pure state machine.
//! - [`timeline`]: the driver that runs an acceptor against storage.
//! - [`recovery`]: finding the end of valid WAL after a restart.
//! - [`retention`]: which WAL may be removed once consumed.
//! - [`datadir`]: the data directory lock and node id.
//! - [`import`]: seeding a timeline from a Postgres `pg_wal` directory.
//! - [`listen_addrs`]: the `--listen-addrs-file` a process reports its bound ports in.
//! - [`service`]: the network service (pg wire port, HTTP, timeline owners).
//! - [`client`]: a client of that HTTP API (peer recovery, the page server stub).

pub mod acceptor;
pub mod client;
pub mod control;
pub mod datadir;
pub mod ids;
pub mod import;
pub mod listen_addrs;
pub mod lsn;
pub mod membership;
pub mod protocol;
pub mod recovery;
pub mod retention;
pub mod service;
pub mod storage;
pub mod timeline;
pub mod wal;
