//! The compute shim: a physical replication client of a Postgres primary that
//! acts as the proposer of the safekeepers' consensus.
//!
//! - [`proposer`]: the proposer as a pure state machine (election, quorum
//!   commit, pipelined appends).
//! - [`replication`]: the Postgres replication-protocol client.

pub mod proposer;
pub mod replication;
