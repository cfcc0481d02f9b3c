//! Pieces every binary of the project needs, written once:
//!
//! - [`backoff`]: exponential backoff between reconnection attempts.
//! - [`durable`]: durable file replacement, directory fsync, classified I/O errors.
//! - [`dir_lock`]: one process per data directory (an flock'ed lock file naming its pid).
//! - [`listen_addrs`]: the `--listen-addrs-file` a process reports its bound ports in.
//! - [`service`] (feature `service`): logging setup, the JSON error body
//!   every HTTP port answers with.

pub mod backoff;
pub mod dir_lock;
pub mod durable;
pub mod listen_addrs;
#[cfg(feature = "service")]
pub mod service;
