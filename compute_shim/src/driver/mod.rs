//! The tokio glue around the pure proposer: Postgres's replication stream
//! in, safekeeper links in and out, the quorum commit LSN back to Postgres
//! as its standby's write/flush/apply position, and a status snapshot for
//! the HTTP endpoint. All consensus decisions are the proposer's; this
//! module only moves bytes and time.
//!
//! - [`startup`]: what the shim learns from Postgres before it campaigns.
//! - [`links`]: one task per safekeeper connection.
//! - [`http`]: `GET /v1/status`, `GET`/`POST /v1/membership`.

pub mod http;
pub mod links;
pub mod startup;

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use postgres_wal::lsn::Lsn;
use safekeeper_protocol::ids::{SystemId, TenantId, TimelineId};
use safekeeper_protocol::protocol::ProposerMessage;

use crate::proposer::{MembershipRequestError, MembershipStatus, Proposer, ProposerError, ProposerStatus};
use crate::replication::{ReplicationClient, ReplicationConfig, ReplicationError, ReplicationEvent, ReplicationStream};
use links::{spawn_link, LinkControl, LinkEvent, LinkTarget, Outgoing};
use startup::ShimSetup;

/// Link events queued for the driver.
const LINK_EVENTS_QUEUE: usize = 4096;
/// How often the proposer's clock advances without other input, and how
/// often the status snapshot is refreshed.
const TICK_INTERVAL: Duration = Duration::from_millis(20);
/// A status update goes to Postgres at least this often even when commit
/// does not move, so its wal_sender_timeout never fires while the shim
/// holds back reading (backpressure) or the quorum is down.
const STATUS_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// A new walsender ignores standby replies for synchronous replication
/// while it is still in its catch-up state (PG15 `SyncRepReleaseWaiters`),
/// which it leaves only after its first send: the status a new stream gets
/// at once can arrive too early. For this long after a (re)start it is
/// repeated every [`FRESH_STREAM_STATUS_INTERVAL`], so waiting commits are
/// released within milliseconds, not after the next refresh (measured: a
/// 1.05 s stall after a catch-up restart, one run in eight).
const FRESH_STREAM_WINDOW: Duration = Duration::from_secs(1);
const FRESH_STREAM_STATUS_INTERVAL: Duration = Duration::from_millis(50);
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
    #[serde(flatten)]
    pub proposer: ProposerStatus,
}

/// One safekeeper's connection task and the generation it last reported.
struct LinkHandle {
    /// The proposer's peer slot incarnation this link was made for.
    incarnation: u64,
    control: LinkControl,
    generation: u64,
    /// The driver dropped the current connection: ignore what it still says.
    dropped: bool,
}

impl LinkHandle {
    /// Queue a message for the current connection; `false` if the queue is full.
    fn send(&self, message: ProposerMessage) -> bool {
        self.control.outbox.try_send(Outgoing { generation: self.generation, message }).is_ok()
    }

    /// End the current connection; the task reconnects.
    fn drop_connection(&mut self) {
        self.dropped = true;
        self.control.drop_generation.send_replace(self.generation);
    }
}

struct Driver {
    proposer: Proposer,
    /// By the proposer's peer slot; `None` where it wants no connection.
    links: Vec<Option<LinkHandle>>,
    /// For links started later (membership changes).
    link_events: mpsc::Sender<LinkEvent>,
    cluster: safekeeper_protocol::ids::ClusterId,
    /// The replication connection until streaming starts.
    client: Option<ReplicationClient>,
    /// For new replication connections: a restart at another LSN.
    replication_config: ReplicationConfig,
    stream: Option<ReplicationStream>,
    /// A new stream reports our position at once: until it does, Postgres
    /// counts no synchronous standby and commits wait.
    status_due: bool,
    /// When the current stream started (see [`FRESH_STREAM_WINDOW`]).
    stream_started_at: Instant,
    /// The slot was still held by a walsender that has not noticed its
    /// client left (ours before a restart, or a killed shim's): since when,
    /// and when to try again.
    slot_busy: Option<SlotBusy>,
    slot: String,
    pg_timeline: u32,
    status: ShimStatus,
    last_status_sent_at: Instant,
    started_at: Instant,
}

/// Run until fenced, refused, or until Postgres's stream fails. Every
/// return is an error: the shim exits non-zero and a restart is a new term.
pub async fn run(
    setup: ShimSetup,
    status: watch::Sender<ShimStatus>,
    mut membership_requests: mpsc::Receiver<MembershipRequest>,
) -> Result<(), ShimError> {
    let (event_tx, mut events) = mpsc::channel(LINK_EVENTS_QUEUE);
    let mut driver = Driver::new(setup, event_tx);
    let mut tick = tokio::time::interval(TICK_INTERVAL);
    loop {
        let want_wal = driver.wants_wal();
        tokio::select! {
            event = events.recv() => {
                let event = event.expect("the driver holds a sender");
                driver.on_link_event(event)?;
            }
            Some(request) = membership_requests.recv() => {
                let now_ms = driver.now_ms();
                let result = driver.proposer.request_membership(request.safekeepers, now_ms);
                let _ = request.reply.send(result.map(|()| driver.proposer.membership_status()));
            }
            event = next_wal(&mut driver.stream), if want_wal => driver.on_replication_event(event)?,
            _ = tick.tick() => {
                driver.proposer.tick(driver.now_ms())?;
                status.send_replace(driver.snapshot());
            }
        }
        driver.drain_ready(&mut events)?;
        driver.sync_links();
        if !driver.wants_wal() {
            if let Some(stream) = driver.stream.as_mut() {
                stream.not_listening();
            }
        }
        driver.flush_transmits();
        driver.stream_where_wanted().await?;
        driver.report_commit(&status).await?;
    }
}

impl Driver {
    fn new(setup: ShimSetup, link_events: mpsc::Sender<LinkEvent>) -> Driver {
        let status = ShimStatus {
            system_id: setup.cluster.system_id,
            tenant_id: setup.cluster.tenant_id,
            timeline_id: setup.cluster.timeline_id,
            slot: setup.slot.clone(),
            postgres_timeline: setup.pg_timeline,
            safekeeper_addrs: setup.safekeepers.clone(),
            ..ShimStatus::default()
        };
        let mut driver = Driver {
            proposer: Proposer::new(setup.proposer_config()),
            links: vec![],
            link_events,
            cluster: setup.cluster,
            replication_config: setup.client.config().clone(),
            client: Some(setup.client),
            stream: None,
            status_due: false,
            stream_started_at: Instant::now(),
            slot_busy: None,
            slot: setup.slot,
            pg_timeline: setup.pg_timeline,
            status,
            last_status_sent_at: Instant::now(),
            started_at: Instant::now(),
        };
        driver.sync_links();
        driver
    }

    /// Keep one link task per safekeeper the proposer wants to talk to:
    /// start those of new members, stop those of removed ones.
    fn sync_links(&mut self) {
        let wanted = self.proposer.wanted_links();
        self.links.resize_with(wanted.len(), || None);
        for (index, wanted) in wanted.into_iter().enumerate() {
            let current = self.links[index].as_ref().map(|link| link.incarnation);
            if current == wanted.map(|(_, incarnation)| incarnation) {
                continue;
            }
            // Dropping the handle stops the task (its control channels close).
            self.links[index] = wanted.map(|(addr, incarnation)| {
                tracing::info!(safekeeper = %addr, "connecting");
                let target = LinkTarget {
                    index,
                    addr: addr.to_string(),
                    tenant_id: self.cluster.tenant_id,
                    timeline_id: self.cluster.timeline_id,
                    first_generation: links::first_generation(incarnation),
                };
                let control = spawn_link(target, self.link_events.clone());
                LinkHandle { incarnation, control, generation: 0, dropped: false }
            });
        }
    }

    /// The link of slot `index` if it is the current one for that slot.
    fn link(&mut self, index: usize) -> Option<&mut LinkHandle> {
        self.links.get_mut(index).and_then(Option::as_mut)
    }

    fn now_ms(&self) -> u64 {
        self.started_at.elapsed().as_millis() as u64
    }

    /// Whether to read Postgres's stream now: it is where the proposer
    /// wants WAL from (else it is restarted first) and there is room.
    fn wants_wal(&self) -> bool {
        let Some(stream) = &self.stream else { return false };
        self.proposer.wal_wanted_from() == Some(stream.received_end())
            && self.proposer.can_accept_wal(MAX_XLOG_DATA_BYTES)
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
        let now_ms = self.now_ms();
        // Events of a link stopped since (a removed member's) are stale.
        let safekeeper = event.safekeeper();
        let Some(link) = self.link(safekeeper) else { return Ok(()) };
        if event.incarnation() != link.incarnation || !self.proposer.link_wanted(safekeeper) {
            return Ok(());
        }
        match event {
            LinkEvent::Connected { generation, .. } => {
                let link = self.link(safekeeper).expect("checked above");
                link.generation = generation;
                link.dropped = false;
                self.proposer.on_connected(safekeeper, now_ms);
            }
            LinkEvent::Message { generation, message, .. } => {
                let link = self.link(safekeeper).expect("checked above");
                if generation != link.generation || link.dropped {
                    return Ok(()); // from a connection the proposer already forgot
                }
                match self.proposer.on_message(safekeeper, message, now_ms) {
                    Err(ProposerError::Peer { fault, .. }) => {
                        let addr = self.proposer.peer_addr(safekeeper);
                        tracing::warn!(safekeeper = %addr, "protocol fault, reconnecting: {fault}");
                        self.disconnect(safekeeper);
                    }
                    other => other?,
                }
            }
            LinkEvent::Disconnected { generation, reason, .. } => {
                let link = self.link(safekeeper).expect("checked above");
                if generation == link.generation && !link.dropped {
                    tracing::warn!(safekeeper = %self.proposer.peer_addr(safekeeper), "disconnected: {reason}");
                    self.proposer.on_disconnected(safekeeper, now_ms);
                }
            }
            LinkEvent::Refused { reason, .. } => {
                // A member-to-be that refuses the cluster ends the change;
                // a member refusing it is a misconfiguration we cannot fix.
                if !self.proposer.on_link_refused(safekeeper, &reason) {
                    let addr = self.proposer.peer_addr(safekeeper).to_string();
                    return Err(ShimError::SafekeeperRefused { addr, reason });
                }
            }
        }
        Ok(())
    }

    fn on_replication_event(&mut self, event: Result<ReplicationEvent, ShimError>) -> Result<(), ShimError> {
        let event = match event {
            Ok(event) => event,
            Err(ShimError::Replication(error)) if is_wal_removed(&error) => {
                let stream = self.stream.take().expect("the event came from a stream");
                return self.on_wal_removed(stream.received_end(), &error);
            }
            Err(error) => return Err(error),
        };
        match event {
            ReplicationEvent::XLogData { start, data, .. } => {
                self.proposer.on_wal(start, &data)?;
                self.status.received_lsn = Some(start + data.len() as u64);
                Ok(())
            }
            ReplicationEvent::Keepalive { .. } => Ok(()),
            ReplicationEvent::End => Err(ShimError::Stopped("Postgres ended the replication stream".into())),
        }
    }

    /// Try again shortly, for a bounded time: a walsender whose client is
    /// gone exits as soon as it notices.
    fn on_slot_busy(&mut self, error: ReplicationError) -> Result<(), ShimError> {
        let now = Instant::now();
        let since = self.slot_busy.as_ref().map_or(now, |busy| busy.since);
        if now - since >= SLOT_BUSY_TIMEOUT {
            return Err(error.into());
        }
        tracing::info!("{error}; retrying");
        self.slot_busy = Some(SlotBusy { since, retry_at: now + SLOT_BUSY_RETRY_INTERVAL });
        Ok(())
    }

    /// The stream needed WAL at `lsn` that Postgres already removed: the
    /// proposer gives up on the safekeepers that needed it (or stops, if
    /// the quorum did). The next iteration streams from where it says.
    fn on_wal_removed(&mut self, lsn: Lsn, error: &ReplicationError) -> Result<(), ShimError> {
        tracing::warn!(%lsn, "Postgres no longer has this WAL: {error}");
        Ok(self.proposer.on_wal_unavailable(lsn)?)
    }

    fn flush_transmits(&mut self) {
        self.sync_links();
        while let Some((safekeeper, message)) = self.proposer.poll_transmit() {
            let sent = self.link(safekeeper).is_some_and(|link| link.send(message));
            if !sent {
                // Not draining: drop the connection rather than the message
                // (a gap would be refused anyway); the next connection
                // resumes from the safekeeper's flush LSN.
                tracing::warn!(safekeeper = %self.proposer.peer_addr(safekeeper), "outbox full, reconnecting");
                self.disconnect(safekeeper);
            }
        }
    }

    fn disconnect(&mut self, safekeeper: usize) {
        if let Some(link) = self.link(safekeeper) {
            link.drop_connection();
        }
        self.proposer.on_disconnected(safekeeper, self.now_ms());
    }

    /// Keep Postgres's stream where the proposer wants WAL from: start it
    /// once elected, restart it lower to catch up a safekeeper that joined
    /// behind the buffer, and back at the buffer's end afterwards.
    async fn stream_where_wanted(&mut self) -> Result<(), ShimError> {
        let Some(wanted) = self.proposer.wal_wanted_from() else { return Ok(()) };
        if let Some(stream) = &self.stream {
            if stream.received_end() == wanted {
                return Ok(());
            }
            tracing::info!(from = %stream.received_end(), to = %wanted, "restarting replication");
        }
        if self.slot_busy.as_ref().is_some_and(|busy| Instant::now() < busy.retry_at) {
            return Ok(());
        }
        // One walsender per slot: the old stream goes first.
        self.stream = None;
        let client = match self.client.take() {
            Some(client) => client,
            None => ReplicationClient::connect(self.replication_config.clone()).await?,
        };
        tracing::info!(from = %wanted, slot = %self.slot, "starting replication");
        let stream = match client.start_replication(&self.slot, wanted, self.pg_timeline).await {
            Err(error) if is_wal_removed(&error) => return self.on_wal_removed(wanted, &error),
            Err(error) if error.sqlstate() == Some(OBJECT_IN_USE) => return self.on_slot_busy(error),
            started => started?,
        };
        self.slot_busy = None;
        self.stream = Some(stream);
        self.status.streaming_from_lsn = Some(wanted);
        self.status_due = true;
        self.stream_started_at = Instant::now();
        Ok(())
    }

    /// Tell Postgres the quorum commit LSN as write/flush/apply: it releases
    /// commits waiting for synchronous replication up to there. The status
    /// snapshot follows at once, so an operator who saw a commit return
    /// sees a commit LSN covering it.
    async fn report_commit(&mut self, status: &watch::Sender<ShimStatus>) -> Result<(), ShimError> {
        let Some(stream) = self.stream.as_mut() else { return Ok(()) };
        let commit = self.proposer.commit_lsn();
        let moved = commit > self.status.reported_flush_lsn;
        let since_sent = self.last_status_sent_at.elapsed();
        let fresh_stream = self.stream_started_at.elapsed() < FRESH_STREAM_WINDOW;
        let refresh_due =
            since_sent >= STATUS_REFRESH_INTERVAL || fresh_stream && since_sent >= FRESH_STREAM_STATUS_INTERVAL;
        if !moved && !self.status_due && !refresh_due {
            return Ok(());
        }
        // Before anything is committed there is nothing true to report: a
        // zero flush keeps Postgres from counting us as a sync standby.
        let reported = commit.max(self.status.reported_flush_lsn);
        stream.send_status(reported, reported, reported, false).await?;
        self.status.reported_flush_lsn = reported;
        self.last_status_sent_at = Instant::now();
        self.status_due = false;
        if moved {
            // Cheap on the commit path: the full snapshot waits for the tick.
            status.send_modify(|snapshot| {
                snapshot.proposer.commit_lsn = commit;
                snapshot.reported_flush_lsn = reported;
            });
        }
        Ok(())
    }

    fn snapshot(&self) -> ShimStatus {
        ShimStatus { proposer: self.proposer.status(), ..self.status.clone() }
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

async fn next_wal(stream: &mut Option<ReplicationStream>) -> Result<ReplicationEvent, ShimError> {
    match stream.as_mut() {
        Some(stream) => Ok(stream.next_event().await?),
        None => std::future::pending().await,
    }
}
