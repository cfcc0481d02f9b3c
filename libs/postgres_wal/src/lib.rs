//! PostgreSQL's write-ahead log as the safekeepers see it: no I/O, no
//! async runtime (a CI check keeps tokio out of this crate's tree).
//!
//! - [`lsn`]: `Lsn` ("X/Y"), segment sizes, numbers and file names.
//! - [`timeline_history`]: which Postgres timeline wrote which LSN range
//!   (the `0000000N.history` file).
//! - [`wal`]: page and record format, the incremental decoder, and (feature
//!   `testing`) a generator of valid WAL.

pub mod lsn;
pub mod timeline_history;
pub mod wal;

pub use lsn::Lsn;
