//! One task per safekeeper keeps a WAL push link up: it reconnects with a
//! bounded backoff, forwards the acceptor's messages to the driver as
//! [`LinkEvent`]s and writes the proposer's messages it is given.
//!
//! Each (re)connection has a generation number. The driver tags what it
//! sends with the generation it last saw connect, so messages meant for a
//! connection that has since died are dropped instead of reaching the next
//! one ahead of its greeting. Generations carry the proposer's slot
//! incarnation in their high bits: a task stopped when its safekeeper was
//! let go can never be mistaken for the one started when it is wanted again.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use safekeeper_protocol::ids::{TenantId, TimelineId};
use safekeeper_protocol::protocol::{AcceptorMessage, ProposerMessage};

use crate::safekeeper_link::{connect, LinkError, LinkReader, LinkWriter};

/// Messages queued for one safekeeper; the proposer's in-flight bound keeps
/// the queue far below this.
pub const LINK_OUTBOX_MESSAGES: usize = 4096;
pub const LINK_CONNECT_TIMEOUT_MS: u64 = 3_000;
const RECONNECT_BACKOFF_MIN_MS: u64 = 100;
const RECONNECT_BACKOFF_MAX_MS: u64 = 2_000;

#[derive(Debug)]
pub enum LinkEvent {
    Connected {
        safekeeper: usize,
        generation: u64,
    },
    Message {
        safekeeper: usize,
        generation: u64,
        message: AcceptorMessage,
    },
    Disconnected {
        safekeeper: usize,
        generation: u64,
        reason: String,
    },
    /// The safekeeper refuses this cluster or its parameters (another
    /// system id, segment size or Postgres version under the same ids): a
    /// misconfiguration that retrying cannot fix. The link task has stopped.
    Refused {
        safekeeper: usize,
        incarnation: u64,
        reason: String,
    },
}

impl LinkEvent {
    pub fn safekeeper(&self) -> usize {
        match self {
            LinkEvent::Connected { safekeeper, .. }
            | LinkEvent::Message { safekeeper, .. }
            | LinkEvent::Disconnected { safekeeper, .. }
            | LinkEvent::Refused { safekeeper, .. } => *safekeeper,
        }
    }

    /// The proposer slot incarnation of the link task that sent it.
    pub fn incarnation(&self) -> u64 {
        match self {
            LinkEvent::Connected { generation, .. }
            | LinkEvent::Message { generation, .. }
            | LinkEvent::Disconnected { generation, .. } => incarnation_of(*generation),
            LinkEvent::Refused { incarnation, .. } => *incarnation,
        }
    }
}

/// The first generation of a link made for slot incarnation `incarnation`.
pub fn first_generation(incarnation: u64) -> u64 {
    incarnation << 32
}

/// The slot incarnation a link's generation belongs to.
fn incarnation_of(generation: u64) -> u64 {
    generation >> 32
}

/// A message for the connection of `generation`.
pub struct Outgoing {
    pub generation: u64,
    pub message: ProposerMessage,
}

/// The driver's handle on one link task.
pub struct LinkControl {
    pub outbox: mpsc::Sender<Outgoing>,
    /// The generation the driver wants dropped (a protocol fault, or an
    /// outbox that stopped draining). Beside the outbox so it works when
    /// the outbox is full; a new connection then starts with a greeting.
    pub drop_generation: watch::Sender<u64>,
}

pub struct LinkTarget {
    pub index: usize,
    pub addr: String,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    /// See [`first_generation`].
    pub first_generation: u64,
}

/// Start the task for one safekeeper.
pub fn spawn_link(target: LinkTarget, events: mpsc::Sender<LinkEvent>) -> LinkControl {
    let (outbox, inbox) = mpsc::channel(LINK_OUTBOX_MESSAGES);
    let (drop_generation, drops) = watch::channel(0);
    tokio::spawn(run_link(target, events, Inbox { messages: inbox, drops }));
    LinkControl { outbox, drop_generation }
}

struct Inbox {
    messages: mpsc::Receiver<Outgoing>,
    drops: watch::Receiver<u64>,
}

async fn run_link(target: LinkTarget, events: mpsc::Sender<LinkEvent>, mut inbox: Inbox) {
    let mut backoff_ms = RECONNECT_BACKOFF_MIN_MS;
    let mut generation = target.first_generation;
    let incarnation = incarnation_of(generation);
    loop {
        if inbox.drops.has_changed().is_err() {
            return; // the driver let go of this link (a removed safekeeper)
        }
        let connected = connect(&target.addr, target.tenant_id, target.timeline_id, LINK_CONNECT_TIMEOUT_MS).await;
        let (reader, writer) = match connected {
            Ok(link) => link,
            Err(error) if refuses_cluster(&error) => {
                let refused = LinkEvent::Refused { safekeeper: target.index, incarnation, reason: error.to_string() };
                let _ = events.send(refused).await;
                return;
            }
            Err(error) => {
                tracing::debug!(safekeeper = %target.addr, "connect failed: {error}");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MAX_MS);
                continue;
            }
        };
        backoff_ms = RECONNECT_BACKOFF_MIN_MS;
        generation += 1;
        let safekeeper = target.index;
        if events.send(LinkEvent::Connected { safekeeper, generation }).await.is_err() {
            return; // the driver is gone
        }
        let ended = serve(safekeeper, generation, reader, writer, &events, &mut inbox).await;
        let event = match &ended {
            Ok(LinkEnd::DriverStopped) => return,
            Ok(LinkEnd::DroppedByDriver) => {
                let reason = "dropped by the driver (a protocol fault or an outbox not draining)".to_string();
                LinkEvent::Disconnected { safekeeper, generation, reason }
            }
            Err(error) if refuses_cluster(error) => {
                LinkEvent::Refused { safekeeper, incarnation, reason: error.to_string() }
            }
            Err(error) => LinkEvent::Disconnected { safekeeper, generation, reason: error.to_string() },
        };
        tracing::info!(safekeeper = %target.addr, "link lost: {event:?}");
        let refused = matches!(event, LinkEvent::Refused { .. });
        if events.send(event).await.is_err() || refused {
            return;
        }
        // A safekeeper that keeps ending connections (breaking the
        // protocol, or refusing with FATAL: disk full, say) is not retried
        // in a tight loop.
        tokio::time::sleep(Duration::from_millis(RECONNECT_BACKOFF_MIN_MS)).await;
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
    safekeeper: usize,
    generation: u64,
    mut reader: LinkReader,
    mut writer: LinkWriter,
    events: &mpsc::Sender<LinkEvent>,
    inbox: &mut Inbox,
) -> Result<LinkEnd, LinkError> {
    let reading = async {
        loop {
            let message = reader.next_message().await?;
            if events.send(LinkEvent::Message { safekeeper, generation, message }).await.is_err() {
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
            if *inbox.drops.borrow_and_update() == generation {
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
