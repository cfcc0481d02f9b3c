//! The tokio glue around the pure shim node (crate::node): Postgres's
//! replication stream in, safekeeper links in and out, the quorum commit
//! LSN back to Postgres as its standby's write/flush/apply position, and a
//! status snapshot for the HTTP endpoint. Every decision (consensus, which
//! link events count, when Postgres is told what) is the node's; this
//! module moves bytes and sleeps until the node's `poll_timeout`.
//!
//! - [`startup`]: what the shim learns from Postgres before it campaigns.
//! - [`sync`]: `sync-safekeepers`, the same loop with the election's donor
//!   as the WAL source instead of Postgres.
//! - [`service`]: the long-running shim around runs of this loop: retried
//!   outages, backoff, SIGTERM.
//! - [`exit`]: which errors end the shim, with which exit status.
//! - [`links`]: one task per safekeeper connection.
//! - [`http`]: `GET /v1/status`, `GET`/`POST /v1/membership`.

pub mod exit;
pub mod http;
pub mod links;
pub mod service;
pub mod startup;
pub mod sync;

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::ids::{ClusterId, SystemId, TenantId, TimelineId};

use crate::node::{LinkEvent, LinkEventKind, LinkEventOutcome, NodeError, ShimNode, SteppedDown};
use crate::proposer::{MembershipRequestError, MembershipStatus, ProposerConfig, ProposerError, ProposerStatus};
use crate::replication::{ReplicationClient, ReplicationConfig, ReplicationError, ReplicationEvent, ReplicationStream};
use links::{LinkSettings, LinkTasks};
use startup::ShimSetup;

/// Link events queued for the driver.
const LINK_EVENTS_QUEUE: usize = 4096;
/// How often the status snapshot for `GET /v1/status` is refreshed in
/// full (the commit LSN in it follows every report at once). Consensus
/// timing does not depend on it: that is the node's `poll_timeout`.
const STATUS_SNAPSHOT_INTERVAL: Duration = Duration::from_millis(20);
/// Largest XLogData payload a walsender sends (PG15's MAX_SEND_SIZE, 16
/// pages of 8 KiB): the room the proposer must have before we read more.
const MAX_XLOG_DATA_BYTES: u64 = 128 * 1024;
/// Events taken in one go before the proposer's output is sent: bounds the
/// latency a burst adds to its first commit.
const MAX_EVENTS_PER_BATCH: usize = 256;
/// "replication slot … is active for PID …".
const OBJECT_IN_USE: &str = "55006";
/// How long the slot may stay held by another walsender before the shim
/// gives up (another live shim on the same slot, say).
const SLOT_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
const SLOT_BUSY_RETRY_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error(transparent)]
    Proposer(#[from] ProposerError),
    #[error("Postgres replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("safekeeper {addr} refuses this cluster: {reason}")]
    SafekeeperRefused { addr: String, reason: String },
    #[error("safekeeper {addr} refuses this shim's token: {reason} (docs/security.md)")]
    SafekeeperUnauthorized { addr: String, reason: String },
    /// The WAL source ended its stream (a Postgres shutting down): retried.
    #[error("{0}")]
    StreamEnded(String),
    /// A flag's value is unusable.
    #[error("{0}")]
    BadArguments(String),
    /// Postgres is of a major version this build does not speak.
    #[error("{0}")]
    UnsupportedPostgres(String),
    #[error("{0}")]
    Stopped(String),
}

/// Membership requests queued for the driver (an operator's HTTP calls).
pub const MEMBERSHIP_REQUESTS_QUEUE: usize = 16;

/// An operator asks for a safekeeper set; the answer is the membership
/// status right after the request was taken, or why it was not.
pub struct MembershipRequest {
    pub safekeepers: Vec<String>,
    pub reply: oneshot::Sender<Result<MembershipStatus, MembershipRequestError>>,
}

/// What `GET /v1/status` shows: who we are, where Postgres's stream is,
/// and the proposer's own snapshot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShimStatus {
    pub system_id: SystemId,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub slot: String,
    pub postgres_timeline: u32,
    /// Where START_REPLICATION began; `None` until elected.
    pub streaming_from_lsn: Option<Lsn>,
    /// End of the WAL received from Postgres.
    pub received_lsn: Option<Lsn>,
    /// The flush position last reported to Postgres (= commit LSN).
    pub reported_flush_lsn: Lsn,
    /// The `--safekeepers` list (the set until a configuration is found).
    pub safekeeper_addrs: Vec<String>,
    /// The process around the runs of the proposer.
    pub service: ServiceStatus,
    #[serde(flatten)]
    pub proposer: ProposerStatus,
}

/// What the shim as a service is doing (`service` in `GET /v1/status`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServiceStatus {
    pub state: ServiceState,
    /// Runs started again after a retried error (docs/operations.md).
    pub restarts: u64,
    /// The error the latest restart was for.
    pub last_error: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// Connecting to Postgres (and reading its identity).
    #[default]
    ConnectingToPostgres,
    /// Campaigning or elected: `phase` says which.
    Running,
    /// Waiting out the backoff after a retried error.
    WaitingToRetry,
    /// SIGTERM/SIGINT: taking no more WAL, committing what was taken.
    SteppingDown,
}

impl From<NodeError> for ShimError {
    fn from(error: NodeError) -> ShimError {
        match error {
            NodeError::Proposer(error) => ShimError::Proposer(error),
            NodeError::SafekeeperRefused { addr, reason } => ShimError::SafekeeperRefused { addr, reason },
            NodeError::SafekeeperUnauthorized { addr, reason } => ShimError::SafekeeperUnauthorized { addr, reason },
        }
    }
}

struct Driver {
    node: ShimNode,
    links: LinkTasks,
    source: WalSource,
    stream: Option<ReplicationStream>,
    status: ShimStatus,
    /// The node's clock: its milliseconds count from here.
    started_at: Instant,
    /// How long a step-down may take to commit what was taken.
    step_down_timeout_ms: u64,
}

/// Why a run of the driver's loop ended without an error.
enum DriveEnd {
    /// A sync is complete at this commit LSN.
    Synced(Lsn),
    /// Asked to stop (SIGTERM/SIGINT), it stepped down.
    SteppedDown(SteppedDown),
}

/// Everything one run of the driver needs besides what Postgres told.
pub struct RunContext<'a> {
    pub status: &'a watch::Sender<ShimStatus>,
    pub membership_requests: &'a mut mpsc::Receiver<MembershipRequest>,
    /// Turns true when the operator asks the shim to stop.
    pub stop: &'a mut watch::Receiver<bool>,
    pub links: LinkSettings,
    pub step_down_timeout_ms: u64,
    pub service: ServiceStatus,
}

/// The primary, through a physical replication slot.
struct PostgresSource {
    /// The replication connection until streaming starts.
    client: Option<ReplicationClient>,
    /// For new replication connections: a restart at another LSN.
    config: ReplicationConfig,
    slot: String,
    pg_timeline: u32,
    /// The slot was still held by a walsender that has not noticed its
    /// client left (ours before a restart, or a killed shim's): since
    /// when, and when to try again.
    slot_busy: Option<SlotBusy>,
}

/// Where the WAL the proposer sends the safekeepers comes from.
enum WalSource {
    /// The primary (boxed: its connection's buffers dwarf the donor's ids).
    Postgres(Box<PostgresSource>),
    /// `sync-safekeepers`: the election's donor, read as the proposer of
    /// our term (its log up to its flush LSN).
    Donor {
        tenant_id: TenantId,
        timeline_id: TimelineId,
        token_file: Option<std::path::PathBuf>,
        tls_ca: Option<std::path::PathBuf>,
    },
}

/// One run of the proposer against Postgres: until it is asked to stop
/// (it steps down), fenced, refused, or until Postgres's stream fails.
/// Whether an error is retried is the caller's ([`service`], [`exit`]).
pub async fn run(setup: ShimSetup, context: RunContext<'_>) -> Result<SteppedDown, ShimError> {
    let (event_tx, events) = mpsc::channel(LINK_EVENTS_QUEUE);
    let mut driver = Driver::new(setup, context.links, event_tx);
    driver.status.service = context.service;
    driver.step_down_timeout_ms = context.step_down_timeout_ms;
    match drive(driver, events, context.status, context.membership_requests, context.stop).await? {
        DriveEnd::SteppedDown(stepped_down) => Ok(stepped_down),
        DriveEnd::Synced(synced) => {
            unreachable!("a proposer streaming Postgres never completes a sync (it did at {synced})")
        }
    }
}

/// `sync-safekeepers` as a library call (docs/failover.md): the commit LSN
/// a quorum now holds, at or above every commit any earlier proposer
/// acknowledged. Bounded by `options.timeout`.
pub async fn sync_safekeepers(options: &sync::SyncOptions) -> Result<Lsn, ShimError> {
    startup::check_safekeeper_list(&options.safekeepers)?;
    let timeout_s = options.timeout.as_secs_f64();
    let work = async {
        let identity = sync::identify_timeline(options).await?;
        tracing::info!(system_id = %identity.cluster.system_id, "timeline identified; campaigning to sync");
        let config = startup::sync_proposer_config(&identity, &options.safekeepers);
        let (event_tx, events) = mpsc::channel(LINK_EVENTS_QUEUE);
        let source = WalSource::Donor {
            tenant_id: options.tenant_id,
            timeline_id: options.timeline_id,
            token_file: options.auth_token_file.clone(),
            tls_ca: options.tls_ca.clone(),
        };
        let links = LinkSettings {
            auth_token_file: options.auth_token_file.clone(),
            tls: options.tls_ca.as_deref().map(net::pg_tls::PgClientTls::verify_full),
            ..LinkSettings::default()
        };
        let driver =
            Driver::with_source(config, identity.cluster, options.safekeepers.clone(), source, links, event_tx);
        let (status, _) = watch::channel(ShimStatus::default());
        // Nobody asks a sync for a membership change (a closed channel),
        // nor to stop (a signal ends it at once).
        let (_, mut no_requests) = mpsc::channel(1);
        let (_never, mut no_stop) = watch::channel(false);
        drive(driver, events, &status, &mut no_requests, &mut no_stop).await
    };
    match tokio::time::timeout(options.timeout, work).await {
        Ok(Ok(DriveEnd::Synced(synced))) => Ok(synced),
        Ok(Ok(DriveEnd::SteppedDown(_))) => unreachable!("a sync is never asked to step down"),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ShimError::Stopped(format!(
            "no quorum of safekeepers completed the sync within {timeout_s} s (is a majority of --safekeepers up?)"
        ))),
    }
}

/// The driver's loop, until an error, until the proposer reports a
/// completed sync (only in sync mode), or until a step-down is over.
async fn drive(
    mut driver: Driver,
    mut events: mpsc::Receiver<LinkEvent>,
    status: &watch::Sender<ShimStatus>,
    membership_requests: &mut mpsc::Receiver<MembershipRequest>,
    stop: &mut watch::Receiver<bool>,
) -> Result<DriveEnd, ShimError> {
    let mut snapshot = tokio::time::interval(STATUS_SNAPSHOT_INTERVAL);
    loop {
        let want_wal = driver.wants_wal();
        let wake_at = driver.wake_at();
        tokio::select! {
            event = events.recv() => {
                let event = event.expect("the driver holds a sender");
                driver.on_link_event(event)?;
            }
            Some(request) = membership_requests.recv() => {
                let now_ms = driver.now_ms();
                let result = driver.node.handle_membership_request(now_ms, request.safekeepers);
                let _ = request.reply.send(result.map(|()| driver.node.proposer().membership_status()));
            }
            event = next_wal(&mut driver.stream), if want_wal => driver.on_replication_event(event)?,
            _ = sleep_until(wake_at) => {} // the timers are handled below, whichever branch woke us
            _ = snapshot.tick() => {
                status.send_replace(driver.snapshot());
            }
            () = stop_requested(stop), if driver.status.service.state != ServiceState::SteppingDown => {
                driver.step_down();
                status.send_replace(driver.snapshot());
            }
        }
        driver.drain_ready(&mut events)?;
        driver.handle_due_timeout()?;
        driver.apply_link_commands();
        if !driver.wants_wal() {
            if let Some(stream) = driver.stream.as_mut() {
                stream.not_listening();
            }
        }
        driver.flush_transmits();
        driver.stream_where_wanted().await?;
        driver.report_commit(status).await?;
        if let Some(synced) = driver.node.proposer().synced_lsn() {
            return Ok(DriveEnd::Synced(synced));
        }
        if let Some(stepped_down) = driver.node.poll_stepped_down() {
            status.send_replace(driver.snapshot());
            return Ok(DriveEnd::SteppedDown(stepped_down));
        }
    }
}

/// Resolves once the stop flag is true (at once if it already is);
/// never if nobody can set it.
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|&stop| stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Driver {
    fn new(setup: ShimSetup, links: LinkSettings, link_events: mpsc::Sender<LinkEvent>) -> Driver {
        let config = setup.proposer_config();
        let source = WalSource::Postgres(Box::new(PostgresSource {
            config: setup.client.config().clone(),
            client: Some(setup.client),
            slot: setup.slot.clone(),
            pg_timeline: setup.pg_timeline,
            slot_busy: None,
        }));
        let mut driver = Driver::with_source(config, setup.cluster, setup.safekeepers, source, links, link_events);
        driver.status.slot = setup.slot;
        driver.status.postgres_timeline = setup.pg_timeline;
        driver
    }

    fn with_source(
        config: ProposerConfig,
        cluster: ClusterId,
        safekeepers: Vec<String>,
        source: WalSource,
        links: LinkSettings,
        link_events: mpsc::Sender<LinkEvent>,
    ) -> Driver {
        let status = ShimStatus {
            system_id: cluster.system_id,
            tenant_id: cluster.tenant_id,
            timeline_id: cluster.timeline_id,
            safekeeper_addrs: safekeepers,
            ..ShimStatus::default()
        };
        let mut driver = Driver {
            node: ShimNode::new(config, 0),
            links: LinkTasks::new(cluster.tenant_id, cluster.timeline_id, links, link_events),
            source,
            stream: None,
            status,
            started_at: Instant::now(),
            step_down_timeout_ms: 0,
        };
        driver.apply_link_commands();
        driver
    }

    /// Take no more WAL; the loop ends once what was taken is committed
    /// or the step-down timeout passed.
    fn step_down(&mut self) {
        tracing::info!(
            timeout_ms = self.step_down_timeout_ms,
            "asked to stop: stepping down (no more WAL taken from Postgres; committing what was taken)"
        );
        self.status.service.state = ServiceState::SteppingDown;
        self.node.handle_step_down(self.now_ms(), self.step_down_timeout_ms);
    }

    /// Start, stop and cut link tasks as the node asks.
    fn apply_link_commands(&mut self) {
        self.links.apply_commands(&mut self.node);
    }

    /// When the node's next timer falls due, or the slot is tried again.
    fn wake_at(&self) -> Option<Instant> {
        let node_at = self.node.poll_timeout().map(|at_ms| self.started_at + Duration::from_millis(at_ms));
        // Only while a stream is wanted and missing: `stream_where_wanted`
        // then retries (and sets the next retry), so a passed one cannot spin.
        let retrying = self.stream.is_none() && self.node.wal_wanted_from().is_some();
        let slot_busy = match &self.source {
            WalSource::Postgres(postgres) => postgres.slot_busy.as_ref(),
            WalSource::Donor { .. } => None,
        };
        let slot_retry_at = slot_busy.filter(|_| retrying).map(|busy| busy.retry_at);
        node_at.into_iter().chain(slot_retry_at).min()
    }

    /// Timers of the node that fell due (checked after every wake, so a
    /// busy link cannot starve them).
    fn handle_due_timeout(&mut self) -> Result<(), ShimError> {
        let now_ms = self.now_ms();
        if self.node.poll_timeout().is_some_and(|at_ms| at_ms <= now_ms) {
            self.node.handle_timeout(now_ms)?;
        }
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.started_at.elapsed().as_millis() as u64
    }

    /// Whether to read Postgres's stream now: it is where the proposer
    /// wants WAL from (else it is restarted first) and there is room.
    fn wants_wal(&self) -> bool {
        let Some(stream) = &self.stream else { return false };
        self.node.wal_wanted_from() == Some(stream.received_end()) && self.node.can_accept_wal(MAX_XLOG_DATA_BYTES)
    }

    /// Take in everything that already arrived before acting on it: a burst
    /// of commits becomes one append per safekeeper and one status update,
    /// not one of each per commit (fewer messages and syscalls everywhere).
    fn drain_ready(&mut self, events: &mut mpsc::Receiver<LinkEvent>) -> Result<(), ShimError> {
        for _ in 0..MAX_EVENTS_PER_BATCH {
            let mut progressed = false;
            if let Ok(event) = events.try_recv() {
                self.on_link_event(event)?;
                progressed = true;
            }
            if self.wants_wal() {
                let stream = self.stream.as_mut().expect("wants_wal checked");
                if let Some(event) = stream.try_next_event().map_err(ShimError::from).transpose() {
                    self.on_replication_event(event)?;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        Ok(())
    }

    fn on_link_event(&mut self, event: LinkEvent) -> Result<(), ShimError> {
        let slot = event.slot;
        let reason = match &event.kind {
            LinkEventKind::Disconnected { reason } => Some(reason.clone()),
            _ => None,
        };
        match self.node.handle_link_event(self.now_ms(), event)? {
            LinkEventOutcome::PeerFault(fault) => {
                let addr = self.node.peer_addr(slot);
                tracing::warn!(safekeeper = %addr, "protocol fault, reconnecting: {fault}");
            }
            LinkEventOutcome::Applied if reason.is_some() => {
                let reason = reason.expect("checked");
                tracing::warn!(safekeeper = %self.node.peer_addr(slot), "disconnected: {reason}");
            }
            LinkEventOutcome::Applied | LinkEventOutcome::Stale => {}
        }
        self.apply_link_commands();
        Ok(())
    }

    fn on_replication_event(&mut self, event: Result<ReplicationEvent, ShimError>) -> Result<(), ShimError> {
        let event = match event {
            Ok(event) => event,
            Err(ShimError::Replication(error)) if is_wal_removed(&error) => {
                let stream = self.stream.take().expect("the event came from a stream");
                self.node.handle_stream_stopped(self.now_ms());
                return self.on_wal_removed(stream.received_end(), &error);
            }
            Err(error) => return Err(error),
        };
        match event {
            ReplicationEvent::XLogData { start, data, .. } => {
                self.node.handle_wal(self.now_ms(), start, &data)?;
                self.status.received_lsn = Some(start + data.len() as u64);
                Ok(())
            }
            ReplicationEvent::Keepalive { .. } => Ok(()),
            ReplicationEvent::End => Err(ShimError::StreamEnded(match self.source {
                WalSource::Postgres(_) => "Postgres ended the replication stream".into(),
                WalSource::Donor { .. } => "the donor safekeeper ended its stream".into(),
            })),
        }
    }

    /// Try again shortly, for a bounded time: a walsender whose client is
    /// gone exits as soon as it notices.
    fn on_slot_busy(slot_busy: &mut Option<SlotBusy>, error: ReplicationError) -> Result<(), ShimError> {
        let now = Instant::now();
        let since = slot_busy.as_ref().map_or(now, |busy| busy.since);
        if now - since >= SLOT_BUSY_TIMEOUT {
            return Err(error.into());
        }
        tracing::info!("{error}; retrying");
        *slot_busy = Some(SlotBusy { since, retry_at: now + SLOT_BUSY_RETRY_INTERVAL });
        Ok(())
    }

    /// The stream needed WAL at `lsn` that Postgres already removed: the
    /// proposer gives up on the safekeepers that needed it (or stops, if
    /// the quorum did). The next iteration streams from where it says.
    fn on_wal_removed(&mut self, lsn: Lsn, error: &ReplicationError) -> Result<(), ShimError> {
        tracing::warn!(%lsn, "Postgres no longer has this WAL: {error}");
        Ok(self.node.handle_wal_unavailable(self.now_ms(), lsn)?)
    }

    fn flush_transmits(&mut self) {
        let now_ms = self.now_ms();
        self.links.send_transmits(&mut self.node, now_ms);
    }

    /// Keep the WAL stream where the proposer wants WAL from: start it
    /// once elected, restart it lower to catch up a safekeeper that joined
    /// behind the buffer, and back at the buffer's end afterwards.
    async fn stream_where_wanted(&mut self) -> Result<(), ShimError> {
        let Some(wanted) = self.node.wal_wanted_from() else { return Ok(()) };
        if let Some(stream) = &self.stream {
            if stream.received_end() == wanted {
                return Ok(());
            }
            tracing::info!(from = %stream.received_end(), to = %wanted, "restarting the WAL stream");
        }
        if let WalSource::Postgres(postgres) = &self.source {
            if postgres.slot_busy.as_ref().is_some_and(|busy| Instant::now() < busy.retry_at) {
                return Ok(());
            }
        }
        // One walsender per slot: the old stream goes first.
        if self.stream.take().is_some() {
            self.node.handle_stream_stopped(self.now_ms());
        }
        let started = match &mut self.source {
            WalSource::Postgres(postgres) => {
                let PostgresSource { client, config, slot, pg_timeline, slot_busy } = &mut **postgres;
                let client = match client.take() {
                    Some(client) => client,
                    None => ReplicationClient::connect(config.clone()).await?,
                };
                tracing::info!(from = %wanted, %slot, "starting replication");
                match client.start_replication(slot, wanted, *pg_timeline).await {
                    Err(error) if error.sqlstate() == Some(OBJECT_IN_USE) => {
                        return Self::on_slot_busy(slot_busy, error)
                    }
                    started => {
                        if started.is_ok() {
                            *slot_busy = None;
                        }
                        started
                    }
                }
            }
            WalSource::Donor { tenant_id, timeline_id, token_file, tls_ca } => {
                let (donor, term) = self.node.proposer().donor().expect("WAL is wanted only once elected");
                let addr = self.node.peer_addr(donor).to_string();
                tracing::info!(from = %wanted, donor = %addr, %term, "reading the donor's log");
                let (token_file, tls_ca) = (token_file.as_deref(), tls_ca.as_deref());
                let config = sync::safekeeper_replication_config(&addr, *tenant_id, *timeline_id, token_file, tls_ca)?;
                match ReplicationClient::connect(config).await {
                    Ok(client) => client.start_donor_replication(wanted, term).await,
                    Err(error) => Err(error),
                }
            }
        };
        let stream = match started {
            Err(error) if is_wal_removed(&error) => return self.on_wal_removed(wanted, &error),
            started => started?,
        };
        self.stream = Some(stream);
        self.status.streaming_from_lsn = Some(wanted);
        self.node.handle_stream_started(self.now_ms());
        Ok(())
    }

    /// Tell Postgres the quorum commit LSN as write/flush/apply: it releases
    /// commits waiting for synchronous replication up to there. The status
    /// snapshot follows at once, so an operator who saw a commit return
    /// sees a commit LSN covering it.
    async fn report_commit(&mut self, status: &watch::Sender<ShimStatus>) -> Result<(), ShimError> {
        if let WalSource::Donor { .. } = self.source {
            return Ok(()); // a safekeeper is not waiting for our commit LSN
        }
        let now_ms = self.now_ms();
        let Some(stream) = self.stream.as_mut() else { return Ok(()) };
        let Some(update) = self.node.poll_standby_status(now_ms) else { return Ok(()) };
        stream.send_status(update.write_lsn, update.flush_lsn, update.apply_lsn, false).await?;
        let moved = update.flush_lsn > self.status.reported_flush_lsn;
        self.status.reported_flush_lsn = update.flush_lsn;
        if moved {
            // Cheap on the commit path: the full snapshot waits for its interval.
            status.send_modify(|snapshot| {
                snapshot.proposer.commit_lsn = update.flush_lsn;
                snapshot.reported_flush_lsn = update.flush_lsn;
            });
        }
        Ok(())
    }

    fn snapshot(&self) -> ShimStatus {
        ShimStatus { proposer: self.node.proposer().status(), ..self.status.clone() }
    }
}

struct SlotBusy {
    since: Instant,
    retry_at: Instant,
}

/// Postgres's answer when a stream needs a WAL segment it already removed:
/// "requested WAL segment … has already been removed" (undefined_file).
fn is_wal_removed(error: &ReplicationError) -> bool {
    const UNDEFINED_FILE: &str = "58P01";
    match error {
        ReplicationError::Server(server) => {
            server.code == UNDEFINED_FILE || server.message.contains("has already been removed")
        }
        _ => false,
    }
}

/// Wait until `at`, or forever when nothing is due.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn next_wal(stream: &mut Option<ReplicationStream>) -> Result<ReplicationEvent, ShimError> {
    match stream.as_mut() {
        Some(stream) => Ok(stream.next_event().await?),
        None => std::future::pending().await,
    }
}
