//! The compute shim: a physical replication client of a Postgres primary that
//! acts as the proposer of the safekeepers' consensus.
//!
//! - [`node`]: the shim node, pure: the proposer, link identity, the
//!   standby-status policy and its timers; what the driver and the
//!   simulation run.
//! - [`proposer`]: the proposer as a pure state machine (election, quorum
//!   commit, pipelined appends).
//! - [`replication`]: the Postgres replication-protocol client.
//! - [`safekeeper_link`]: the WAL push connection to one safekeeper.
//! - [`tcp_liveness`]: keepalive and user timeout on every connection.
//! - [`driver`]: the tokio glue that runs the proposer against Postgres and
//!   the safekeepers, and the HTTP status port.

pub mod driver;
pub mod node;
pub mod proposer;
pub mod replication;
pub mod safekeeper_link;
pub mod tcp_liveness;
