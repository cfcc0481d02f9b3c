//! START_WAL_PUSH: the connection in CopyBoth mode. Each CopyData from the
//! proposer holds one encoded `ProposerMessage`, forwarded to the timeline's
//! owner; each reply goes back as one CopyData holding an `AcceptorMessage`.
//!
//! Two halves run at once: this task reads frames and queues them for the
//! owner (waiting when the owner's queue is full: backpressure), a writer
//! task drains the connection's bounded reply queue onto the socket (the
//! owner writes replies itself while that queue is idle: see
//! `super::replies`). The owner never waits for a connection: if the reply
//! queue is full the connection is dropped. Any FATAL error is written by
//! the writer and then the connection closes.

use std::sync::Arc;

use bytes::BytesMut;
use net::stream::WriteHalf;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::connection::{Reader, ERROR_FLUSH_TIMEOUT, FRAME_TIMEOUT};
use super::errors::{sqlstate, PgError};
use super::pg_wire::{encode, printable, protocol_violation, read_frame, tag, WireError};
use super::registry::{ProposerGuard, TimelineHandle};
use super::replies::{Outgoing, PushConnection};
use super::ServiceState;
use safekeeper_protocol::ids::{TenantId, TimelineId};
use safekeeper_protocol::protocol::{ProposerMessage, MAX_MESSAGE_BYTES};

/// Replies queued for one connection before it counts as too slow.
pub const REPLY_QUEUE_MESSAGES: usize = 1024;
/// Replies coalesced into one socket write.
const WRITE_COALESCE_BYTES: usize = 64 << 10;

pub async fn run(
    state: Arc<ServiceState>,
    connection_id: u64,
    tenant_id: TenantId,
    timeline_id: TimelineId,
    mut reader: Reader,
    mut write: WriteHalf,
) {
    let mut out = BytesMut::new();
    encode::copy_both_response(&mut out);
    if write.write_all(&out).await.is_err() {
        return;
    }
    tracing::debug!(connection = connection_id, %tenant_id, %timeline_id, "START_WAL_PUSH");
    let (replies, reply_queue) = mpsc::channel(REPLY_QUEUE_MESSAGES);
    // A second handle for the owner's direct writes (see `replies`); under
    // TLS every byte goes through the session, so replies are queued only.
    let direct_socket = write.plain_socket().and_then(|fd| fd.try_clone_to_owned().ok()).map(std::net::TcpStream::from);
    let connection = Arc::new(PushConnection::new(connection_id, replies, direct_socket));
    let mut dropped = connection.dropped();
    // Built here, not in the task: an abort before its first poll still
    // closes the direct path.
    let stopped = WriterStopped(connection.clone());
    let mut writer = tokio::spawn(write_replies(write, reply_queue, stopped));
    let mut forwarder = Forwarder { state, connection, tenant_id, timeline_id, timeline: None };
    let ended = tokio::select! {
        result = forwarder.run(&mut reader) => result,
        // The writer ends after writing a FATAL error or when the socket fails.
        _ = &mut writer => return,
        _ = dropped.wait_for(|dropped| *dropped) => {
            let message = "the client did not read its replies fast enough; connection dropped".to_string();
            Err(WireError::Client(PgError::fatal(sqlstate::CONNECTION_FAILURE, message)))
        }
    };
    if let Err(WireError::Client(error)) = ended {
        tracing::debug!(connection = connection_id, "closing push connection: {error}");
        if forwarder.connection.refuse(error) {
            let _ = tokio::time::timeout(ERROR_FLUSH_TIMEOUT, &mut writer).await;
        }
    }
    writer.abort();
}

struct Forwarder {
    state: Arc<ServiceState>,
    connection: Arc<PushConnection>,
    tenant_id: TenantId,
    timeline_id: TimelineId,
    /// Opened by the first message (a Greeting creates a new timeline).
    timeline: Option<(Arc<TimelineHandle>, ProposerGuard)>,
}

impl Forwarder {
    /// Forward messages until the client ends the push or breaks the protocol.
    async fn run(&mut self, reader: &mut Reader) -> Result<(), WireError> {
        loop {
            let frame = read_frame(reader, MAX_MESSAGE_BYTES, FRAME_TIMEOUT).await?;
            match frame.tag {
                tag::COPY_DATA => {}
                // The proposer is done with this connection.
                tag::COPY_DONE | tag::COPY_FAIL | tag::TERMINATE => return Ok(()),
                other => {
                    let message = format!("unexpected message type '{}' during START_WAL_PUSH", printable(other));
                    return Err(protocol_violation(message).into());
                }
            }
            let message = ProposerMessage::decode(frame.body)
                .map_err(|e| protocol_violation(format!("invalid proposer message in CopyData: {e}")))?;
            self.check_ids(&message)?;
            let timeline = self.timeline(&message).await?;
            timeline.push(self.connection.clone(), message).await?;
        }
    }

    /// A message must be for the timeline this connection named at startup.
    fn check_ids(&self, message: &ProposerMessage) -> Result<(), PgError> {
        let cluster = message.cluster();
        if cluster.tenant_id != self.tenant_id || cluster.timeline_id != self.timeline_id {
            return Err(PgError::fatal(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!(
                    "message for timeline {}/{} on a connection opened for timeline {}/{}",
                    cluster.tenant_id, cluster.timeline_id, self.tenant_id, self.timeline_id
                ),
            ));
        }
        Ok(())
    }

    async fn timeline(&mut self, first: &ProposerMessage) -> Result<Arc<TimelineHandle>, PgError> {
        if let Some((timeline, _)) = &self.timeline {
            return Ok(timeline.clone());
        }
        let greeting = match first {
            ProposerMessage::Greeting(greeting) => Some(greeting.clone()),
            _ => None,
        };
        let timeline = self.state.timelines.open_for_push(*first.cluster(), greeting).await?;
        let guard = timeline.proposer_guard();
        self.timeline = Some((timeline.clone(), guard));
        Ok(timeline)
    }
}

/// Closes the owner's direct path however the writer task ends (aborted
/// included), so the socket really closes with the connection.
struct WriterStopped(Arc<PushConnection>);

impl Drop for WriterStopped {
    fn drop(&mut self) {
        self.0.writer_stopped();
    }
}

/// Write queued replies, coalescing whatever is queued into one write, and
/// tell the connection how many items went out (the owner writes directly
/// only while none are pending); an error is written last and ends the
/// connection.
async fn write_replies(mut write: WriteHalf, mut queue: mpsc::Receiver<Outgoing>, stopped: WriterStopped) {
    let connection = &stopped.0;
    let mut out = BytesMut::with_capacity(WRITE_COALESCE_BYTES);
    while let Some(mut item) = queue.recv().await {
        out.clear();
        let mut items = 0;
        let finished = loop {
            items += 1;
            match item {
                Outgoing::Bytes(bytes) => out.extend_from_slice(&bytes),
                Outgoing::Error(error) => {
                    encode::error_response(&mut out, &error);
                    break true;
                }
            }
            match queue.try_recv() {
                Ok(next) if out.len() < WRITE_COALESCE_BYTES => item = next,
                Ok(next) => {
                    // Over the coalescing bound: write, then carry on with it.
                    if write.write_all(&out).await.is_err() {
                        return;
                    }
                    connection.written(items);
                    out.clear();
                    items = 0;
                    item = next;
                }
                Err(_) => break false,
            }
        };
        if write.write_all(&out).await.is_err() || finished {
            let _ = write.shutdown().await;
            return;
        }
        connection.written(items);
    }
}
