//! The stub's HTTP port: `GET /v1/status` (JSON, LSNs as "X/Y").

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use postgres_wal::lsn::Lsn;
use serde::Serialize;
use tokio::sync::watch;

use crate::stats::Counter;

/// What the stub is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No safekeeper has reported the timeline yet.
    #[default]
    WaitingForTimeline,
    /// Pulling and decoding.
    Following,
    /// No safekeeper can serve right now (all failing or cooling down).
    WaitingForSource,
    /// Shut down or failed; the process is about to exit.
    Stopped,
}

/// The status document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StubStatus {
    pub phase: Phase,
    /// End of the last decoded record (after a restart: the saved position
    /// until a new record arrives).
    pub last_record_lsn: Option<Lsn>,
    /// Just past the last byte pulled; a record in progress lies between
    /// `last_record_lsn` and here.
    pub received_lsn: Option<Lsn>,
    pub source_safekeeper: Option<String>,
    pub source_commit_lsn: Option<Lsn>,
    /// Highest commit LSN among safekeepers with a fresh status.
    pub best_commit_lsn: Option<Lsn>,
    /// `best_commit_lsn - last_record_lsn`.
    pub lag_bytes: Option<u64>,
    pub records: u64,
    pub bytes: u64,
    /// Changes of source since this process started.
    pub switches: u64,
    /// WAL requests that failed (error, silence, timeout, 410) since start.
    pub failed_pulls: u64,
    pub last_switch: Option<SwitchNote>,
    pub per_rmgr: BTreeMap<String, Counter>,
    /// The position in the state file (what was reported to safekeepers as
    /// `remote_consistent_lsn`).
    pub saved_lsn: Option<Lsn>,
    pub system_id: Option<u64>,
    pub wal_seg_size: Option<u64>,
    pub safekeepers: Vec<SafekeeperNote>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SwitchNote {
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    /// The byte position the new source continues from.
    pub at_lsn: Lsn,
}

/// One safekeeper as the stub sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SafekeeperNote {
    pub address: String,
    pub commit_lsn: Option<Lsn>,
    /// The last status poll's failure, if it failed.
    pub status_error: Option<String>,
}

pub fn router(status: watch::Receiver<StubStatus>) -> Router {
    Router::new()
        .route("/v1/status", get(stub_status))
        .fallback(|| async { utils::service::json_error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(status)
}

async fn stub_status(State(status): State<watch::Receiver<StubStatus>>) -> Json<StubStatus> {
    Json(status.borrow().clone())
}
