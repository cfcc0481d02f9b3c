//! The page server stub: follows the safekeepers of one timeline, pulls the
//! committed WAL over HTTP from whichever has the highest commit LSN, decodes
//! and checks every record, counts them per resource manager, saves its
//! position durably and reports it back (docs/pageserver-stub.md).
//!
//! Table of contents:
//! - [`config`]: what a run is given (addresses, ids, time limits).
//! - [`api`], [`pull`]: the safekeeper's HTTP client (`safekeeper_api`).
//! - [`follower`]: which safekeeper to pull from (pure, time injected).
//! - [`ingest`]: the shared WAL decoder plus counters that match the saved position.
//! - [`stats`]: per-resource-manager counters and PG15's rmgr names.
//! - [`state`]: the durable state file and the data directory lock.
//! - [`background`]: status pollers, the feedback reporter, the status server.
//! - [`http`]: the status document and its route.
//! - [`discovery`]: waiting for a safekeeper to report the timeline.
//! - [`driver`]: the pull loop: choose, pull, decode, save, report.
//! - [`run`]: one run start to end, tying the pieces together.

pub mod background;
pub mod config;
pub mod discovery;
pub mod driver;
pub mod follower;
pub mod http;
pub mod ingest;
pub mod run;
pub mod state;
pub mod stats;

pub use safekeeper_api::{api, pull};

pub use config::{RecordObserver, StubConfig, Tuning};
pub use run::{run, RunSummary};
