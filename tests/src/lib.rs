//! Integration test harness.
//!
//! - [`pg`]: a real PostgreSQL 15 cluster in a temp dir (initdb, start/stop
//!   by pid, psql/pgbench, pg_wal access).
//! - [`processes`]: project binaries (the safekeeper) as child processes on
//!   free loopback ports, and a minimal HTTP GET.

pub mod pg;
pub mod processes;
