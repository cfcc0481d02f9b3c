//! The pull loop: pull from the source the [`Follower`] picks, decode,
//! save, report, until shutdown or a fatal error.
//!
//! One loop owns the decoder, the follower and the saved position, so there
//! is no locking around them: a pull streams its body while a housekeeping
//! tick (every `housekeeping_interval_ms`) takes in status polls, saves when
//! due, refreshes the status page and asks the follower whether to keep the
//! source. A pull ends after its body, on any failure, or when the follower
//! moves on; the next one starts at exactly the byte after the last one fed
//! to the decoder, whichever safekeeper serves it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use tokio::sync::watch;
use tokio::time::{interval_at, sleep_until, MissedTickBehavior};

use crate::api::{SafekeeperAddress, TimelineStatus};
use crate::background::{self, StatusPolls};
use crate::config::{RecordObserver, Tuning};
use crate::discovery::{describe_poll_problems, log_due};
use crate::follower::{Choice, Follower, FollowerTuning, Switch};
use crate::http::{Phase, SafekeeperNote, StubStatus, SwitchNote};
use crate::ingest::Ingest;
use crate::pull::{PullError, SafekeeperClient, WalEvent, WalPull};
use crate::run::RunSummary;
use crate::state::{self, Identity, SavedState};

/// An empty WAL answer faster than this did not long-poll; wait a
/// housekeeping interval before asking again rather than spin.
const MIN_EMPTY_ANSWER_MS: u64 = 10;

pub(crate) fn stop_requested(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow()
}

/// Completes once shutdown is requested. The watch guard `wait_for` returns
/// is dropped here, inside, because it must not live across an await.
pub(crate) async fn until_stopped(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|&stop| stop).await.is_err() {
        // The sender is gone without asking to stop (the shutdown future
        // panicked): nobody can ask any more, so never complete rather
        // than make every select loop spin.
        std::future::pending::<()>().await;
    }
}

/// The follower's knobs: lagging means more than one segment behind.
fn follower_tuning(tuning: &Tuning, segment_size: WalSegmentSize) -> FollowerTuning {
    FollowerTuning {
        lag_threshold_bytes: segment_size.bytes(),
        lag_grace_ms: tuning.lag_grace_ms,
        failure_cooldown_ms: tuning.failure_cooldown_ms,
        status_fresh_ms: tuning.status_fresh_ms,
    }
}

/// Everything the pull loop starts with.
pub(crate) struct DriverSetup {
    pub addresses: Vec<SafekeeperAddress>,
    pub tuning: Tuning,
    pub observer: Option<RecordObserver>,
    pub client: SafekeeperClient,
    pub identity: Identity,
    pub datadir: PathBuf,
    pub ingest: Ingest,
    pub polls: watch::Receiver<StatusPolls>,
    /// The position in the state file, if there is one.
    pub saved_lsn: Option<Lsn>,
    pub feedback: watch::Sender<Option<Lsn>>,
    pub status: watch::Sender<StubStatus>,
    pub shutdown: watch::Receiver<bool>,
}

pub(crate) struct Driver {
    addresses: Vec<SafekeeperAddress>,
    tuning: Tuning,
    observer: Option<RecordObserver>,
    client: SafekeeperClient,
    identity: Identity,
    datadir: PathBuf,
    ingest: Ingest,
    follower: Follower,
    polls: watch::Receiver<StatusPolls>,
    /// Per safekeeper: when the last poll taken into the follower was made.
    absorbed_at: Vec<Option<Instant>>,
    /// Per safekeeper: why its last status poll was not usable.
    peer_problems: Vec<Option<String>>,
    saved_lsn: Option<Lsn>,
    saved_this_run: bool,
    last_save_at: Option<Instant>,
    /// The latest saved position, for the feedback reporter.
    feedback: watch::Sender<Option<Lsn>>,
    status: watch::Sender<StubStatus>,
    shutdown: watch::Receiver<bool>,
    last_switch: Option<SwitchNote>,
    failed_pulls: u64,
    /// Set while no safekeeper can serve; when that was last logged.
    waiting_logged_at: Option<Instant>,
}

/// How a pull ended, when not fatally.
enum PullEnd {
    Completed { body_bytes: u64 },
    Abandoned,
}

impl Driver {
    pub(crate) fn new(setup: DriverSetup) -> Driver {
        let count = setup.addresses.len();
        Driver {
            follower: Follower::new(count, follower_tuning(&setup.tuning, setup.identity.segment_size)),
            addresses: setup.addresses,
            tuning: setup.tuning,
            observer: setup.observer,
            client: setup.client,
            identity: setup.identity,
            datadir: setup.datadir,
            ingest: setup.ingest,
            polls: setup.polls,
            absorbed_at: vec![None; count],
            peer_problems: vec![None; count],
            saved_lsn: setup.saved_lsn,
            saved_this_run: false,
            last_save_at: None,
            feedback: setup.feedback,
            status: setup.status,
            shutdown: setup.shutdown,
            last_switch: None,
            failed_pulls: 0,
            waiting_logged_at: None,
        }
    }

    /// Follow until shutdown or a fatal error; then save what was decoded
    /// (also after a fatal error: everything before it was checked) and
    /// report it one last time.
    pub(crate) async fn run_to_end(mut self) -> anyhow::Result<RunSummary> {
        let outcome = self.follow().await;
        let final_save = self.save_if_due(true).await;
        self.publish_status(Phase::Stopped);
        if let (true, Some(lsn)) = (self.saved_this_run, self.saved_lsn) {
            let mut failing = vec![false; self.addresses.len()];
            let timeout_ms = self.tuning.feedback_timeout_ms;
            background::send_feedback_round(&self.client, &self.addresses, lsn, timeout_ms, &mut failing).await;
        }
        match (outcome, final_save) {
            (Err(error), Err(save_error)) => {
                tracing::error!(error = format!("{save_error:#}"), "saving the state after a fatal error failed too");
                Err(error)
            }
            (Err(error), Ok(())) | (Ok(()), Err(error)) => Err(error),
            (Ok(()), Ok(())) => Ok(self.summary()),
        }
    }

    async fn follow(&mut self) -> anyhow::Result<()> {
        while !stop_requested(&self.shutdown) {
            self.absorb_polls();
            let position = self.ingest.input_end_lsn();
            match self.follower.choose(position, Instant::now()) {
                Choice::Pull { index, switched } => {
                    if let Some(switch) = switched {
                        self.note_switch(switch, position);
                    }
                    self.waiting_logged_at = None;
                    self.publish_status(Phase::Following);
                    let started = Instant::now();
                    let end = self.pull_from(index).await?;
                    let answered_at_once = started.elapsed() < Duration::from_millis(MIN_EMPTY_ANSWER_MS);
                    if matches!(end, PullEnd::Completed { body_bytes: 0 }) && answered_at_once {
                        self.pause().await;
                    }
                }
                Choice::Wait => {
                    self.log_waiting(position);
                    self.publish_status(Phase::WaitingForSource);
                    self.pause().await;
                }
                Choice::WalGone => bail!(
                    "the WAL from {position} has been removed from every safekeeper ({}): this page server \
                     can no longer catch up by replaying WAL and needs a snapshot of the timeline",
                    self.address_list()
                ),
            }
            self.save_if_due(false).await?;
        }
        Ok(())
    }

    /// Stream one WAL response from safekeeper `index` into the decoder.
    async fn pull_from(&mut self, index: usize) -> anyhow::Result<PullEnd> {
        let address = self.addresses[index].clone();
        let mut shutdown = self.shutdown.clone();
        let start_lsn = self.ingest.input_end_lsn();
        let limit_lsn = Lsn(start_lsn.0.saturating_add(self.tuning.max_response_bytes));
        let started = Instant::now();
        let request_deadline = started + Duration::from_millis(self.tuning.request_timeout_ms);
        let silence = Duration::from_millis(self.tuning.silence_timeout_ms);
        let tick = Duration::from_millis(self.tuning.housekeeping_interval_ms);
        let mut housekeeping = interval_at((started + tick).into(), tick);
        // After a long decode, one catch-up tick is enough.
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_activity = started;
        let mut body_bytes = 0;
        let mut pull = WalPull::start(&self.client, &address, start_lsn, limit_lsn, self.tuning.long_poll_wait_ms);
        loop {
            let deadline = (last_activity + silence).min(request_deadline);
            tokio::select! {
                event = pull.next() => {
                    last_activity = Instant::now();
                    match event {
                        Ok(WalEvent::Opened(headers)) => {
                            self.follower.observe_commit(index, headers.commit_lsn);
                            body_bytes = headers.body_len_bytes();
                        }
                        Ok(WalEvent::Chunk(bytes)) => self.decode(&bytes, &address)?,
                        Ok(WalEvent::Complete) => return Ok(PullEnd::Completed { body_bytes }),
                        Err(error) => {
                            self.pull_failed(index, start_lsn, error);
                            return Ok(PullEnd::Abandoned);
                        }
                    }
                }
                () = sleep_until(deadline.into()) => {
                    self.pull_timed_out(index, started, last_activity, request_deadline);
                    return Ok(PullEnd::Abandoned);
                }
                _ = housekeeping.tick() => {
                    if !self.housekeep(index).await? {
                        return Ok(PullEnd::Abandoned);
                    }
                }
                () = until_stopped(&mut shutdown) => return Ok(PullEnd::Abandoned),
            }
        }
    }

    /// Feed pulled bytes to the decoder; an undecodable record is fatal.
    fn decode(&mut self, bytes: &[u8], address: &SafekeeperAddress) -> anyhow::Result<()> {
        let observer = self.observer.as_deref();
        let fed = self.ingest.feed(bytes, |record| {
            if let Some(observe) = observer {
                observe(record);
            }
        });
        fed.map(drop).with_context(|| format!("decoding WAL pulled from {address}; refusing to skip any record"))
    }

    /// Periodic work during a pull; returns whether to keep pulling from `index`.
    async fn housekeep(&mut self, index: usize) -> anyhow::Result<bool> {
        self.absorb_polls();
        self.save_if_due(false).await?;
        let position = self.ingest.input_end_lsn();
        let keep = match self.follower.choose(position, Instant::now()) {
            Choice::Pull { index: chosen, switched } => {
                if let Some(switch) = switched {
                    self.note_switch(switch, position);
                }
                chosen == index
            }
            Choice::Wait | Choice::WalGone => false,
        };
        self.publish_status(Phase::Following);
        Ok(keep)
    }

    fn pull_failed(&mut self, index: usize, start_lsn: Lsn, error: PullError) {
        self.failed_pulls += 1;
        let address = &self.addresses[index];
        if let PullError::Gone { .. } = error {
            tracing::warn!(safekeeper = %address, %error, "the safekeeper no longer has the WAL we need");
            self.follower.wal_gone(index, start_lsn);
            return;
        }
        tracing::warn!(safekeeper = %address, start = %start_lsn, %error, "pulling WAL failed");
        self.follower.pull_failed(index, Instant::now(), error.to_string());
    }

    fn pull_timed_out(&mut self, index: usize, started: Instant, last_activity: Instant, request_deadline: Instant) {
        self.failed_pulls += 1;
        let now = Instant::now();
        let why = if now >= request_deadline {
            format!("the response did not complete within {} ms", now.duration_since(started).as_millis())
        } else {
            format!("silent for {} ms", now.duration_since(last_activity).as_millis())
        };
        tracing::warn!(safekeeper = %self.addresses[index], reason = %why, "abandoning a WAL pull");
        self.follower.pull_failed(index, now, why);
    }

    fn note_switch(&mut self, switch: Switch, at_lsn: Lsn) {
        let from = switch.from.map(|from| self.addresses[from].to_string());
        let to = self.addresses[switch.to].to_string();
        let reason = switch.reason.to_string();
        let commit = self.follower.commit_lsn(switch.to).map(|lsn| lsn.to_string()).unwrap_or_default();
        match &from {
            None => tracing::info!(source = %to, %reason, at = %at_lsn, source_commit = %commit, "pulling WAL"),
            Some(from) => tracing::info!(%from, %to, %reason, at = %at_lsn, to_commit = %commit,
                "switching WAL source"),
        }
        self.last_switch = Some(SwitchNote { from, to, reason, at_lsn });
    }

    fn log_waiting(&mut self, position: Lsn) {
        if log_due(self.waiting_logged_at) {
            self.waiting_logged_at = Some(Instant::now());
            let problems = describe_poll_problems(&self.addresses, &self.polls.borrow());
            tracing::warn!(position = %position, problems,
                "no safekeeper can serve WAL right now (failing, cooling down after a failure, or no fresh status); waiting");
        }
    }

    /// Wait a housekeeping interval, less if statuses change or on shutdown.
    async fn pause(&mut self) {
        let tick = Duration::from_millis(self.tuning.housekeeping_interval_ms);
        tokio::select! {
            _ = self.polls.changed() => {}
            () = tokio::time::sleep(tick) => {}
            () = until_stopped(&mut self.shutdown) => {}
        }
    }

    /// Take new status polls into the follower.
    fn absorb_polls(&mut self) {
        let polls = self.polls.borrow_and_update().clone();
        for (index, poll) in polls.into_iter().enumerate() {
            let Some(poll) = poll else { continue };
            if self.absorbed_at[index] == Some(poll.at) {
                continue;
            }
            self.absorbed_at[index] = Some(poll.at);
            let problem = match &poll.result {
                Ok(status) => match self.check_peer_identity(status) {
                    Ok(()) => {
                        self.follower.observe_status(index, poll.at, status.commit_lsn, status.oldest_kept());
                        None
                    }
                    Err(why) => {
                        // Never pull another cluster's WAL, even mid-stream.
                        self.follower.observe_status_failure(index);
                        self.follower.pull_failed(index, Instant::now(), why.clone());
                        Some(why)
                    }
                },
                Err(error) => {
                    self.follower.observe_status_failure(index);
                    Some(error.clone())
                }
            };
            self.note_peer_problem(index, problem);
        }
    }

    fn check_peer_identity(&self, status: &TimelineStatus) -> Result<(), String> {
        if status.system_id.0 != self.identity.system_id {
            return Err(format!(
                "it serves database system {}, not {}: a different cluster",
                status.system_id, self.identity.system_id
            ));
        }
        if status.wal_seg_size != self.identity.segment_size {
            return Err(format!(
                "it reports {}-byte WAL segments, not {}",
                status.wal_seg_size.bytes(),
                self.identity.segment_size.bytes()
            ));
        }
        Ok(())
    }

    /// Log a safekeeper's status problem when it starts or changes, and its recovery.
    fn note_peer_problem(&mut self, index: usize, problem: Option<String>) {
        let address = &self.addresses[index];
        match (&self.peer_problems[index], &problem) {
            (None, None) => {}
            (Some(_), None) => tracing::info!(safekeeper = %address, "timeline status is available again"),
            (old, Some(new)) if old.as_ref() != Some(new) => {
                tracing::warn!(safekeeper = %address, problem = %new, "timeline status unusable");
            }
            _ => {}
        }
        self.peer_problems[index] = problem;
    }

    /// Save the settled position and counters, at most every
    /// `min_save_interval_ms` unless `force`; then report it as feedback.
    async fn save_if_due(&mut self, force: bool) -> anyhow::Result<()> {
        let boundary = self.ingest.boundary_lsn();
        // Only positions a decoder reached are saved: before the first
        // record, a fresh start must skip a leading continuation, which a
        // restart at a record boundary would not.
        let nothing_new = self.ingest.settled_stats().total().records == 0 || self.saved_lsn == Some(boundary);
        let too_soon =
            self.last_save_at.is_some_and(|at| at.elapsed() < Duration::from_millis(self.tuning.min_save_interval_ms));
        if nothing_new || (too_soon && !force) {
            return Ok(());
        }
        let state = SavedState::new(self.identity, boundary, self.ingest.settled_stats());
        let datadir = self.datadir.clone();
        tokio::task::spawn_blocking(move || state::save(&datadir, &state))
            .await
            .context("the save task died")?
            .context("saving the position; without it, progress would not survive a restart")?;
        tracing::debug!(lsn = %boundary, "saved");
        self.saved_lsn = Some(boundary);
        self.saved_this_run = true;
        self.last_save_at = Some(Instant::now());
        // Durable first, reported second: a safekeeper may delete WAL below it.
        self.feedback.send_replace(Some(boundary));
        Ok(())
    }

    fn publish_status(&mut self, phase: Phase) {
        let now = Instant::now();
        let stats = self.ingest.all_stats();
        let source = self.follower.source();
        let best_commit_lsn = self.follower.best_commit_lsn(now);
        let last_record_lsn = self.ingest.last_record_end_lsn();
        let lag_from = last_record_lsn.unwrap_or(self.ingest.boundary_lsn());
        let safekeepers = (0..self.addresses.len())
            .map(|index| SafekeeperNote {
                address: self.addresses[index].to_string(),
                commit_lsn: self.follower.commit_lsn(index),
                status_error: self.peer_problems[index].clone(),
            })
            .collect();
        let status = StubStatus {
            phase,
            last_record_lsn,
            received_lsn: Some(self.ingest.input_end_lsn()),
            source_safekeeper: source.map(|index| self.addresses[index].to_string()),
            source_commit_lsn: source.and_then(|index| self.follower.commit_lsn(index)),
            best_commit_lsn,
            lag_bytes: best_commit_lsn.map(|best| best.0.saturating_sub(lag_from.0)),
            records: stats.total().records,
            bytes: stats.total().bytes,
            switches: self.follower.switches(),
            failed_pulls: self.failed_pulls,
            last_switch: self.last_switch.clone(),
            per_rmgr: stats.by_name(),
            saved_lsn: self.saved_lsn,
            system_id: Some(self.identity.system_id),
            wal_seg_size: Some(self.identity.segment_size.bytes()),
            safekeepers,
        };
        self.status.send_replace(status);
    }

    fn address_list(&self) -> String {
        let addresses: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        addresses.join(", ")
    }

    fn summary(&self) -> RunSummary {
        RunSummary {
            saved_lsn: self.saved_lsn,
            last_record_lsn: self.ingest.last_record_end_lsn(),
            stats: self.ingest.all_stats(),
            switches: self.follower.switches(),
        }
    }
}
