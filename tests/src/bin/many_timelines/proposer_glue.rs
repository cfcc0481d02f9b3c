//! All of the benchmark's contact with `compute_shim`: one timeline's
//! [`ShimNode`] (the proposer with the link identity and timers the shim's
//! driver runs) over the shim's own link tasks ([`LinkTasks`],
//! START_WAL_PUSH on each safekeeper's pg port), fed WAL by the caller
//! instead of by Postgres. Kept in this one module so the rest of the
//! benchmark does not follow the shim's API.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use compute_shim::driver::links::{LinkSettings, LinkTasks};
use compute_shim::driver::startup::HEARTBEAT_INTERVAL_MS;
use compute_shim::node::{LinkEvent, LinkEventOutcome, ShimNode};
use compute_shim::proposer::{ProposerConfig, ProposerMode, MAX_APPEND_CHUNK_BYTES};
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::wal::format::PG15_VERSION_NUM;
use safekeeper_protocol::ids::ClusterId;

/// Link events queued for one timeline (three links, a few messages each
/// in flight: far below this).
const LINK_EVENTS_QUEUE: usize = 256;

/// WAL in flight to one safekeeper and held for the slowest: each commit
/// here is one small record, so the shim's 16 MiB and 256 MiB (sized for a
/// Postgres stream) would only be memory a thousand timelines do not need.
const MAX_IN_FLIGHT_BYTES: u64 = 1 << 20;
const MAX_BUFFERED_WAL_BYTES: u64 = 4 << 20;

/// All WAL of the timeline so far, from its start: what Postgres's pg_wal
/// would hold (a run writes a few MiB per timeline at most).
struct Log {
    start_lsn: Lsn,
    bytes: Vec<u8>,
}

impl Log {
    fn end_lsn(&self) -> Lsn {
        self.start_lsn + self.bytes.len() as u64
    }
}

/// A shim node for one timeline, connected to every safekeeper.
pub struct TimelineProposer {
    node: ShimNode,
    links: LinkTasks,
    log: Log,
    events: mpsc::Receiver<LinkEvent>,
    started_at: Instant,
}

impl TimelineProposer {
    /// Start the links of a proposer for `cluster` on fresh safekeepers,
    /// whose timeline starts at the segment start `start_lsn`.
    pub fn start(cluster: ClusterId, segment_size: WalSegmentSize, start_lsn: Lsn, safekeepers: &[SocketAddr]) -> Self {
        let config = ProposerConfig {
            cluster,
            pg_version: PG15_VERSION_NUM,
            wal_segment_size: segment_size,
            safekeepers: safekeepers.iter().map(SocketAddr::to_string).collect(),
            max_in_flight_bytes: MAX_IN_FLIGHT_BYTES,
            max_buffered_wal_bytes: MAX_BUFFERED_WAL_BYTES,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            silence_timeout_ms: 20 * HEARTBEAT_INTERVAL_MS,
            proposer_id: rand::random(),
            timeline_start_lsn: start_lsn,
            mode: ProposerMode::Stream { postgres_flush_lsn: start_lsn },
            pg_timelines: Some(postgres_wal::timeline_history::PgTimelineHistory::first()),
        };
        let (event_tx, events) = mpsc::channel(LINK_EVENTS_QUEUE);
        let mut timeline = TimelineProposer {
            node: ShimNode::new(config, 0),
            links: LinkTasks::new(cluster.tenant_id, cluster.timeline_id, LinkSettings::default(), event_tx),
            log: Log { start_lsn, bytes: Vec::new() },
            events,
            started_at: Instant::now(),
        };
        timeline.links.apply_commands(&mut timeline.node);
        timeline
    }

    /// Wait (until `deadline`) for the election; where WAL must start.
    pub async fn wait_elected(&mut self, deadline: Instant) -> Result<Lsn> {
        loop {
            if let Some(lsn) = self.node.wal_wanted_from() {
                return Ok(lsn);
            }
            if Instant::now() >= deadline {
                bail!("not elected in time: {:?}", self.node.proposer().status().phase);
            }
            self.step(deadline).await?;
        }
    }

    /// Append `wal` (the next bytes of the log, at `start_lsn`) and wait
    /// until a quorum committed it; its end.
    pub async fn commit(&mut self, start_lsn: Lsn, wal: &[u8], deadline: Instant) -> Result<Lsn> {
        assert_eq!(start_lsn, self.log.end_lsn(), "WAL is handed over in order");
        self.log.bytes.extend_from_slice(wal);
        let end = self.log.end_lsn();
        while self.node.proposer().commit_lsn() < end {
            self.feed()?;
            if Instant::now() >= deadline {
                bail!("commit of {end} not acknowledged in time (commit {})", self.node.proposer().commit_lsn());
            }
            self.step(deadline).await?;
        }
        Ok(end)
    }

    /// Give the node the WAL it asks for, as Postgres's stream would: from
    /// wherever `wal_wanted_from` names (the log check re-reads a term's
    /// first WAL; a safekeeper that joined late is caught up from the
    /// timeline start), in chunks of at most one XLogData message.
    fn feed(&mut self) -> Result<()> {
        while let Some(wanted) = self.node.wal_wanted_from() {
            let end = self.log.end_lsn();
            if wanted >= end {
                break;
            }
            anyhow::ensure!(wanted >= self.log.start_lsn, "the proposer wants WAL from {wanted}, before the log");
            let from = (wanted - self.log.start_lsn) as usize;
            let len = (end - wanted).min(MAX_APPEND_CHUNK_BYTES) as usize;
            if !self.node.can_accept_wal(len as u64) {
                break; // backpressure: again after the next acknowledgement
            }
            self.node.handle_wal(self.now_ms(), wanted, &self.log.bytes[from..from + len])?;
        }
        let now_ms = self.now_ms();
        self.links.send_transmits(&mut self.node, now_ms);
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.started_at.elapsed().as_millis() as u64
    }

    /// One input (a link event, or the node's timer), then send what it
    /// made due; sleeps until the node's `poll_timeout` at most.
    async fn step(&mut self, deadline: Instant) -> Result<()> {
        let node_at = self.node.poll_timeout().map(|at_ms| self.started_at + Duration::from_millis(at_ms));
        let wake = node_at.map_or(deadline, |at| at.min(deadline));
        if let Ok(event) = tokio::time::timeout_at(wake.into(), self.events.recv()).await {
            self.on_link_event(event.context("the timeline holds a sender")?)?;
        }
        // Take what else is already there before sending (as the shim does).
        while let Ok(event) = self.events.try_recv() {
            self.on_link_event(event)?;
        }
        let now_ms = self.now_ms();
        if self.node.poll_timeout().is_some_and(|at_ms| at_ms <= now_ms) {
            self.node.handle_timeout(now_ms)?;
        }
        self.links.send_transmits(&mut self.node, now_ms);
        Ok(())
    }

    fn on_link_event(&mut self, event: LinkEvent) -> Result<()> {
        let slot = event.slot;
        if let LinkEventOutcome::PeerFault(fault) = self.node.handle_link_event(self.now_ms(), event)? {
            bail!("safekeeper {} broke the protocol: {fault}", self.node.peer_addr(slot));
        }
        self.links.apply_commands(&mut self.node);
        Ok(())
    }
}
