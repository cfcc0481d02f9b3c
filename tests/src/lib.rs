//! Integration test harness.
//!
//! - [`fixture`]: the one bounded wait and the one port reservation.
//! - [`pg`]: a real PostgreSQL 15 cluster in a temp dir (initdb, start/stop
//!   by pid, psql/pgbench, pg_wal access).
//! - [`pg_versions`]: PostgreSQL 16, 17 and 18 binaries (`PG16_BINDIR`, ...).
//! - [`processes`]: project binaries (safekeeper, compute_shim,
//!   pageserver_stub) as child processes on loopback ports they pick and
//!   report, and a minimal HTTP client.
//! - [`cluster`]: Postgres whose commits wait for three safekeepers
//!   through compute_shim.
//! - [`commit_loop`]: a session committing as fast as it is acknowledged,
//!   recording every acknowledged xid.
//! - [`wal_files`]: WAL bytes, pg_waldump and committed xids of a directory.
//! - [`safekeeper_files`]: two safekeepers' segment files compared.
//! - [`tokens`]: key pairs and tokens (`safekeeper token`) for the auth tests.
//! - [`certs`]: a test CA and the certificates it signs (openssl), for the TLS tests.
//! - [`secure`]: TLS and tokens on every hop of a cluster (`SECURE_CLUSTER=1`).
//! - [`fault_proxy`]: a TCP proxy that injects network faults on command.
//! - [`minority`]: one safekeeper's gray failures (hung, slow disk, slow or
//!   cut link) injected and healed, and a phase's commit-latency figures.
//! - [`wire_client`]: a blocking client of the safekeeper's Postgres wire port.

pub mod certs;
pub mod cluster;
pub mod commit_loop;
pub mod fault_proxy;
pub mod fixture;
pub mod minority;
pub mod pg;
pub mod pg_versions;
pub mod processes;
pub mod safekeeper_files;
pub mod secure;
pub mod tokens;
pub mod wal_files;
pub mod wire_client;
