//! Integration test harness.
//!
//! - [`pg`]: a real PostgreSQL 15 cluster in a temp dir (initdb, start/stop
//!   by pid, psql/pgbench, pg_wal access).

pub mod pg;
