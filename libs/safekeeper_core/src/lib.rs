//! One safekeeper timeline without the network: the consensus acceptor and
//! everything it needs to be durable. The safekeeper service runs it behind
//! its sockets; the simulation (compute_shim's proposer tests) runs the same
//! code against in-memory storage. No async runtime here.
//!
//! Table of contents:
//! - [`acceptor`]: the consensus acceptor as a pure state machine.
//! - [`control`]: the durable acceptor state (what the control file holds).
//! - [`storage`]: the storage traits; segment files, the control file, an
//!   in-memory model that can lose unsynced bytes.
//! - [`timeline`]: the driver that executes an acceptor's storage actions,
//!   then releases its replies.
//! - [`timeline_node`]: one timeline as a pure state machine: the driver,
//!   group commit, reply routing to connection ids, the peer-recovery
//!   handoff and retention (the service's owner and the simulation run it).
//! - [`recovery`]: restart: finding the end of valid WAL from the last checkpoint.
//! - [`retention`]: which WAL may be removed once consumed.

pub mod acceptor;
pub mod control;
pub mod recovery;
pub mod retention;
pub mod storage;
pub mod timeline;
pub mod timeline_node;
