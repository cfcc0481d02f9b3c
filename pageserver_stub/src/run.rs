//! One run of the stub, start to end: lock and load the state, start the
//! background tasks, find the timeline, resume or start decoding, then hand
//! over to the pull loop.

use std::future::Future;

use anyhow::{ensure, Context};
use postgres_wal::lsn::Lsn;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::TimelinePaths;
use crate::background::{self, StatusPolls};
use crate::config::StubConfig;
use crate::discovery::{FoundTimeline, TimelineWait};
use crate::driver::{Driver, DriverSetup};
use crate::http::StubStatus;
use crate::ingest::Ingest;
use crate::pull::SafekeeperClient;
use crate::state::{self, Identity, SavedState};
use crate::stats::WalStats;

/// What a run achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub saved_lsn: Option<Lsn>,
    pub last_record_lsn: Option<Lsn>,
    /// Every record decoded, including those restored from the state file.
    pub stats: WalStats,
    pub switches: u64,
}

/// Run the stub until `shutdown` completes (then save and return `Ok`) or
/// a fatal error: a corrupt or foreign state file, undecodable WAL, WAL
/// removed from every safekeeper, a failed save. The status port is served
/// on `status_listener` meanwhile.
pub async fn run(
    config: StubConfig,
    status_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunSummary> {
    check_config(&config)?;
    let _lock = state::lock_data_dir(&config.datadir)?;
    let saved = state::load(&config.datadir)?;
    if let Some(saved) = &saved {
        tracing::info!(lsn = %saved.last_record_end_lsn, records = saved.records, "resuming from the state file");
    }
    // Dropping the set when this function returns aborts every background task.
    let mut tasks = JoinSet::new();
    let stop = forward_shutdown(&mut tasks, shutdown);
    let (status_tx, status_rx) = watch::channel(initial_status(saved.as_ref()));
    let (status_tls, allow_plaintext) = (config.status_tls.clone(), config.status_allow_plaintext);
    tasks.spawn(background::serve_status(status_listener, status_rx, status_tls, allow_plaintext));
    let paths = TimelinePaths { tenant_id: config.tenant_id, timeline_id: config.timeline_id };
    let client = SafekeeperClient::with_tls(paths, config.tuning.connect_timeout_ms, config.tls.clone())
        .with_auth_token_file(config.auth_token_file.clone());
    let polls = spawn_status_pollers(&mut tasks, &client, &config);

    let mut waiting = TimelineWait { polls: polls.clone(), shutdown: stop.clone(), status: &status_tx };
    let Some(found) = waiting.wait(&config.safekeepers, &config.tuning).await else {
        return Ok(RunSummary { saved_lsn: saved.map(|saved| saved.last_record_end_lsn), ..RunSummary::default() });
    };
    let identity = Identity {
        tenant_id: config.tenant_id,
        timeline_id: config.timeline_id,
        system_id: found.status.system_id.0,
        segment_size: found.segment_size,
    };
    tracing::info!(safekeeper = %config.safekeepers[found.index], system_id = identity.system_id,
        wal_seg_size = identity.segment_size.bytes(), timeline_start = %found.status.timeline_start_lsn,
        commit = %found.status.commit_lsn, "found the timeline");
    let ingest = open_ingest(saved.as_ref(), &found, &identity, &config)?;
    let saved_lsn = saved.map(|saved| saved.last_record_end_lsn);
    let feedback = spawn_feedback_reporter(&mut tasks, &client, &config, saved_lsn);
    let setup = DriverSetup {
        addresses: config.safekeepers,
        tuning: config.tuning,
        observer: config.record_observer,
        client,
        identity,
        datadir: config.datadir,
        ingest,
        polls,
        saved_lsn,
        feedback,
        status: status_tx,
        shutdown: stop,
    };
    Driver::new(setup).run_to_end().await
}

fn check_config(config: &StubConfig) -> anyhow::Result<()> {
    ensure!(!config.safekeepers.is_empty(), "no safekeepers given");
    let mut distinct = config.safekeepers.clone();
    distinct.sort_by_key(ToString::to_string);
    distinct.dedup();
    ensure!(distinct.len() == config.safekeepers.len(), "a safekeeper address is listed twice");
    let tuning = &config.tuning;
    ensure!(
        tuning.silence_timeout_ms > tuning.long_poll_wait_ms,
        "the silence timeout ({} ms) must exceed the long-poll wait ({} ms), or every idle long poll looks silent",
        tuning.silence_timeout_ms,
        tuning.long_poll_wait_ms
    );
    ensure!(tuning.max_response_bytes > 0 && tuning.housekeeping_interval_ms > 0, "zero sizes or intervals in tuning");
    Ok(())
}

/// A watch that turns true once `shutdown` completes; every wait selects on it.
fn forward_shutdown(
    tasks: &mut JoinSet<()>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> watch::Receiver<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tasks.spawn(async move {
        shutdown.await;
        stop_tx.send_replace(true);
    });
    stop_rx
}

fn spawn_status_pollers(
    tasks: &mut JoinSet<()>,
    client: &SafekeeperClient,
    config: &StubConfig,
) -> watch::Receiver<StatusPolls> {
    let (polls_tx, polls_rx) = watch::channel(vec![None; config.safekeepers.len()]);
    for (index, address) in config.safekeepers.iter().enumerate() {
        tasks.spawn(background::poll_status_forever(
            client.clone(),
            address.clone(),
            index,
            polls_tx.clone(),
            config.tuning.status_poll_interval_ms,
            config.tuning.status_timeout_ms,
        ));
    }
    polls_rx
}

/// The sender of saved positions; the reporter posts each to every safekeeper.
fn spawn_feedback_reporter(
    tasks: &mut JoinSet<()>,
    client: &SafekeeperClient,
    config: &StubConfig,
    saved_lsn: Option<Lsn>,
) -> watch::Sender<Option<Lsn>> {
    let (feedback_tx, mut feedback_rx) = watch::channel(saved_lsn);
    // A restart reports its saved position at once, as every save does.
    feedback_rx.mark_changed();
    tasks.spawn(background::report_feedback_forever(
        client.clone(),
        config.safekeepers.clone(),
        feedback_rx,
        config.tuning.feedback_timeout_ms,
    ));
    feedback_tx
}

/// Resume at the saved record end (after checking the state belongs to
/// this timeline), or start at the first byte of the timeline.
fn open_ingest(
    saved: Option<&SavedState>,
    found: &FoundTimeline,
    identity: &Identity,
    config: &StubConfig,
) -> anyhow::Result<Ingest> {
    let (segment_size, system_id) = (identity.segment_size, identity.system_id);
    match saved {
        Some(saved) => {
            saved.check_identity(identity, &state::state_file_path(&config.datadir))?;
            Ok(Ingest::resume(saved.last_record_end_lsn, segment_size, system_id, saved.stats()))
        }
        None => Ingest::from_timeline_start(found.status.timeline_start_lsn, segment_size, system_id)
            .with_context(|| format!("starting at the timeline start reported by {}", config.safekeepers[found.index])),
    }
}

fn initial_status(saved: Option<&SavedState>) -> StubStatus {
    let Some(saved) = saved else { return StubStatus::default() };
    StubStatus {
        last_record_lsn: Some(saved.last_record_end_lsn),
        records: saved.records,
        bytes: saved.bytes,
        per_rmgr: saved.per_rmgr.clone(),
        saved_lsn: Some(saved.last_record_end_lsn),
        system_id: Some(saved.system_id),
        wal_seg_size: Some(saved.wal_seg_size_bytes),
        ..StubStatus::default()
    }
}
