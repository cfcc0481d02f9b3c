//! The consensus protocol between the proposer (compute_shim) and the
//! acceptors (safekeepers), as data: no I/O, no async runtime (a CI check
//! keeps tokio out of this crate's tree). docs/protocol.md is the prose.
//!
//! - [`ids`]: `Term`, `NodeId`, `SystemId`, tenant and timeline ids, the cluster identity.
//! - [`term_history`]: which term wrote which part of the log.
//! - [`membership`]: the safekeeper set (configuration, generation, quorums).
//! - [`protocol`]: proposer ⇄ acceptor messages and their binary encoding.

pub mod ids;
pub mod membership;
pub mod protocol;
pub mod term_history;
