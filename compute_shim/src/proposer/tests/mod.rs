//! The proposer against real acceptors over a simulated network.
//!
//! - [`harness`]: in-memory acceptors, links under the test's control, a
//!   Postgres that serves generated WAL.
//! - [`scenarios`]: one test per rule.
//! - [`membership`]: changing the safekeeper set.
//! - [`random`]: a seeded simulation with disconnects and proposer restarts.
//! - [`liveness`]: a healthy majority commits whatever its minority does.
//! - [`timers`]: the shim node's `poll_timeout` is when it needs a call.
//! - [`step_down`]: the shim stopping gracefully.
//! - [`storage_faults`]: a safekeeper's fsync failing (fail-stop).

mod harness;
mod liveness;
mod membership;
mod random;
mod scenarios;
mod step_down;
mod storage_faults;
mod timers;
