//! One task per safekeeper keeps a WAL push link up: it reconnects with a
//! bounded backoff, forwards the acceptor's messages to the driver as
//! [`LinkEvent`]s and writes the proposer's messages it is given.
//!
//! Each (re)connection has a [`LinkGeneration`]; the node tags what it
//! sends with the generation it last saw connect, so messages meant for a
//! connection that has since died are dropped here instead of reaching the
//! next one ahead of its greeting. Which events are stale is the node's
//! decision (crate::node), not this task's.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use safekeeper_protocol::ids::{TenantId, TimelineId};
use safekeeper_protocol::protocol::ProposerMessage;

use crate::node::{LinkCommand, LinkEvent, LinkEventKind, LinkGeneration, ShimNode};
use crate::proposer::SlotIndex;
use crate::replication::ReplicationError;
use crate::safekeeper_link::{connect, LinkCredentials, LinkError, LinkReader, LinkWriter};
use crate::tcp_liveness::TcpLiveness;
use net::pg_tls::PgClientTls;
use utils::backoff::Backoff;

/// Messages queued for one safekeeper; the proposer's in-flight bound keeps
/// the queue far below this.
pub const LINK_OUTBOX_MESSAGES: usize = 4096;
/// Defaults of `--safekeeper-connect-timeout-ms`, `--reconnect-backoff-min-ms`
/// and `--reconnect-backoff-max-ms`.
pub const LINK_CONNECT_TIMEOUT_MS: u64 = 3_000;
pub const RECONNECT_BACKOFF_MIN_MS: u64 = 100;
pub const RECONNECT_BACKOFF_MAX_MS: u64 = 2_000;

/// How a link task connects and reconnects (the shim's flags).
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// Connect, start up and enter the WAL push within this.
    pub connect_timeout_ms: u64,
    pub tcp_liveness: TcpLiveness,
    /// Failed connects are retried after this, doubling...
    pub reconnect_backoff_min: Duration,
    /// ...up to this.
    pub reconnect_backoff_max: Duration,
    /// `--auth-token-file`: the token safekeepers that check tokens ask
    /// for, read at every connection (a rotated token needs no restart).
    pub auth_token_file: Option<PathBuf>,
    /// `--tls-ca`: links use TLS, verify-full against it.
    pub tls: Option<PgClientTls>,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            connect_timeout_ms: LINK_CONNECT_TIMEOUT_MS,
            tcp_liveness: TcpLiveness::default(),
            reconnect_backoff_min: Duration::from_millis(RECONNECT_BACKOFF_MIN_MS),
            reconnect_backoff_max: Duration::from_millis(RECONNECT_BACKOFF_MAX_MS),
            auth_token_file: None,
            tls: None,
        }
    }
}

impl LinkSettings {
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.reconnect_backoff_min, self.reconnect_backoff_max)
    }
}

/// A message for the connection of `generation`.
pub struct Outgoing {
    pub generation: LinkGeneration,
    pub message: ProposerMessage,
}

/// The driver's handle on one link task.
pub struct LinkControl {
    pub outbox: mpsc::Sender<Outgoing>,
    /// The connection the driver wants dropped (a protocol fault, or an
    /// outbox that stopped draining). Beside the outbox so it works when
    /// the outbox is full; a new connection then starts with a greeting.
    pub drop_generation: watch::Sender<Option<LinkGeneration>>,
}

pub struct LinkTarget {
    pub slot: SlotIndex,
    pub addr: String,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    /// Its connections are numbered after this one.
    pub first_generation: LinkGeneration,
    pub settings: LinkSettings,
}

/// The link tasks of one shim node, by its peer slot: started, stopped and
/// cut as the node asks, and handed what it transmits. The shim's driver
/// and the many-timelines benchmark both run their nodes through this.
pub struct LinkTasks {
    tenant_id: TenantId,
    timeline_id: TimelineId,
    settings: LinkSettings,
    /// `None` where no link task runs.
    links: Vec<Option<LinkControl>>,
    /// For every task, including those started later (membership changes).
    events: mpsc::Sender<LinkEvent>,
}

impl LinkTasks {
    pub fn new(
        tenant_id: TenantId,
        timeline_id: TimelineId,
        settings: LinkSettings,
        events: mpsc::Sender<LinkEvent>,
    ) -> LinkTasks {
        LinkTasks { tenant_id, timeline_id, settings, links: Vec::new(), events }
    }

    /// Start, stop and cut link tasks as the node asks.
    pub fn apply_commands(&mut self, node: &mut ShimNode) {
        while let Some(command) = node.poll_link_command() {
            match command {
                LinkCommand::Open { slot, addr, first_generation } => {
                    tracing::info!(safekeeper = %addr, "connecting");
                    let target = LinkTarget {
                        slot,
                        addr,
                        tenant_id: self.tenant_id,
                        timeline_id: self.timeline_id,
                        first_generation,
                        settings: self.settings.clone(),
                    };
                    if self.links.len() <= slot.0 {
                        self.links.resize_with(slot.0 + 1, || None);
                    }
                    // Dropping a replaced handle stops its task (its control channels close).
                    self.links[slot.0] = Some(spawn_link(target, self.events.clone()));
                }
                LinkCommand::Close { slot } => self.links[slot.0] = None,
                LinkCommand::DropConnection { slot, generation } => {
                    if let Some(link) = &self.links[slot.0] {
                        link.drop_generation.send_replace(Some(generation));
                    }
                }
            }
        }
    }

    /// Hand every message the node transmits to its link task. A task
    /// whose outbox is full is not draining: its connection is dropped and
    /// a new one starts with a greeting (`ShimNode::handle_send_failed`).
    pub fn send_transmits(&mut self, node: &mut ShimNode, now_ms: u64) {
        self.apply_commands(node);
        while let Some(transmit) = node.poll_transmit() {
            let slot = transmit.slot;
            let outgoing = Outgoing { generation: transmit.generation, message: transmit.message };
            let link = self.links.get(slot.0).and_then(Option::as_ref);
            if link.is_none_or(|link| link.outbox.try_send(outgoing).is_err()) {
                tracing::warn!(safekeeper = %node.peer_addr(slot), "outbox full, reconnecting");
                node.handle_send_failed(now_ms, slot);
                self.apply_commands(node);
            }
        }
    }
}

/// Start the task for one safekeeper.
pub fn spawn_link(target: LinkTarget, events: mpsc::Sender<LinkEvent>) -> LinkControl {
    let (outbox, inbox) = mpsc::channel(LINK_OUTBOX_MESSAGES);
    let (drop_generation, drops) = watch::channel(None);
    tokio::spawn(run_link(target, events, Inbox { messages: inbox, drops }));
    LinkControl { outbox, drop_generation }
}

struct Inbox {
    messages: mpsc::Receiver<Outgoing>,
    drops: watch::Receiver<Option<LinkGeneration>>,
}

async fn run_link(target: LinkTarget, events: mpsc::Sender<LinkEvent>, mut inbox: Inbox) {
    let mut backoff = target.settings.backoff();
    let mut generation = target.first_generation;
    let slot = target.slot;
    let event = |generation, kind| LinkEvent { slot, generation, kind };
    loop {
        if inbox.drops.has_changed().is_err() {
            return; // the driver let go of this link (a removed safekeeper)
        }
        let settings = &target.settings;
        let token = match settings.auth_token_file.as_deref().map(auth::token::read_token_file).transpose() {
            Ok(token) => token,
            Err(error) => {
                tracing::warn!(safekeeper = %target.addr, "not connecting: {error}");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let connected = connect(
            &target.addr,
            target.tenant_id,
            target.timeline_id,
            settings.connect_timeout_ms,
            &settings.tcp_liveness,
            LinkCredentials { token: token.as_deref(), tls: settings.tls.as_ref() },
        )
        .await;
        let (reader, writer) = match connected {
            Ok(link) => link,
            Err(error) if refuses_cluster(&error) => {
                let _ = events.send(event(generation, LinkEventKind::Refused { reason: error.to_string() })).await;
                return;
            }
            Err(error) if refuses_token(&error) => {
                let _ = events.send(event(generation, LinkEventKind::Unauthorized { reason: error.to_string() })).await;
                return;
            }
            // An untrusted certificate or a safekeeper without TLS: one
            // member's configuration, which its operator fixes; the others
            // keep committing meanwhile, so keep trying, loudly.
            Err(error) if refuses_tls(&error) => {
                tracing::warn!(safekeeper = %target.addr, "TLS refused, retrying: {error}");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            Err(error) => {
                tracing::debug!(safekeeper = %target.addr, "connect failed: {error}");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        backoff.reset();
        generation = generation.next();
        if events.send(event(generation, LinkEventKind::Connected)).await.is_err() {
            return; // the driver is gone
        }
        let ended = serve(slot, generation, reader, writer, &events, &mut inbox).await;
        let kind = match &ended {
            Ok(LinkEnd::DriverStopped) => return,
            Ok(LinkEnd::DroppedByDriver) => {
                let reason = "dropped by the driver (a protocol fault or an outbox not draining)".to_string();
                LinkEventKind::Disconnected { reason }
            }
            Err(error) if refuses_cluster(error) => LinkEventKind::Refused { reason: error.to_string() },
            Err(error) => LinkEventKind::Disconnected { reason: error.to_string() },
        };
        tracing::info!(safekeeper = %target.addr, "link lost: {kind:?}");
        let refused = matches!(kind, LinkEventKind::Refused { .. });
        if events.send(event(generation, kind)).await.is_err() || refused {
            return;
        }
        // A safekeeper that keeps ending connections (breaking the
        // protocol, or refusing with FATAL: disk full, say) is not retried
        // in a tight loop.
        tokio::time::sleep(target.settings.reconnect_backoff_min).await;
    }
}

/// Why a connection ended without a socket error.
enum LinkEnd {
    DriverStopped,
    DroppedByDriver,
}

/// SQLSTATEs with which a safekeeper refuses a cluster, not a connection:
/// invalid_parameter_value (another system id, segment size or ids) and
/// feature_not_supported (another Postgres version).
const REFUSAL_SQLSTATES: [&str; 2] = ["22023", "0A000"];

/// invalid_password (no token, a bad or expired one) and
/// invalid_authorization_specification (another tenant's, too small a
/// scope), or a request for a token we do not have.
fn refuses_token(error: &LinkError) -> bool {
    match error {
        LinkError::Wire { source, .. } => source.sqlstate().is_some_and(|code| code.starts_with("28")),
        LinkError::NoToken { .. } => true,
        _ => false,
    }
}

fn refuses_tls(error: &LinkError) -> bool {
    matches!(error, LinkError::Wire { source: ReplicationError::Tls { source, .. }, .. } if source.is_refusal())
}

fn refuses_cluster(error: &LinkError) -> bool {
    match error {
        LinkError::Wire { source, .. } => source.sqlstate().is_some_and(|code| REFUSAL_SQLSTATES.contains(&code)),
        _ => false,
    }
}

/// Shuttle messages until the connection fails or the driver drops it or
/// stops. Reading and
/// writing run side by side: a safekeeper that stops reading our appends
/// until we read its replies must never deadlock with us.
async fn serve(
    slot: SlotIndex,
    generation: LinkGeneration,
    mut reader: LinkReader,
    mut writer: LinkWriter,
    events: &mpsc::Sender<LinkEvent>,
    inbox: &mut Inbox,
) -> Result<LinkEnd, LinkError> {
    let reading = async {
        loop {
            let message = reader.next_message().await?;
            if events.send(LinkEvent { slot, generation, kind: LinkEventKind::Message(message) }).await.is_err() {
                return Ok(LinkEnd::DriverStopped);
            }
        }
    };
    let writing = async {
        while let Some(outgoing) = inbox.messages.recv().await {
            if outgoing.generation == generation {
                writer.send(&outgoing.message).await?;
            } // else: meant for an earlier connection
        }
        Ok(LinkEnd::DriverStopped)
    };
    let dropped = async {
        loop {
            if inbox.drops.changed().await.is_err() {
                return Ok(LinkEnd::DriverStopped);
            }
            if *inbox.drops.borrow_and_update() == Some(generation) {
                return Ok(LinkEnd::DroppedByDriver);
            }
        }
    };
    tokio::select! {
        ended = reading => ended,
        ended = writing => ended,
        ended = dropped => ended,
    }
}
