//! All of the benchmark's contact with `compute_shim`'s proposer: one
//! timeline's [`ShimNode`] (the pure proposer node the shim's driver runs)
//! driven over the shim's own link tasks (`driver::links`, START_WAL_PUSH on each safekeeper's pg
//! port), fed WAL by the caller instead of by Postgres. Kept in this one
//! module because the proposer's API is being reshaped: only this file
//! follows it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use compute_shim::driver::links::{spawn_link, LinkControl, LinkTarget, Outgoing};
use compute_shim::driver::startup::HEARTBEAT_INTERVAL_MS;
use compute_shim::node::{LinkCommand, LinkEvent, LinkEventOutcome, ShimNode};
use compute_shim::proposer::ProposerConfig;
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

/// A shim node for one timeline (the layer the shim's driver runs: the
/// proposer, link identity, timers), connected to every safekeeper.
pub struct TimelineProposer {
    node: ShimNode,
    cluster: ClusterId,
    /// By slot; `None` where the node runs no link task.
    links: Vec<Option<LinkControl>>,
    event_tx: mpsc::Sender<LinkEvent>,
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
            proposer_id: rand::random(),
            timeline_start_lsn: start_lsn,
            postgres_flush_lsn: start_lsn,
        };
        let (event_tx, events) = mpsc::channel(LINK_EVENTS_QUEUE);
        let mut timeline = TimelineProposer {
            node: ShimNode::new(config, 0),
            cluster,
            links: Vec::new(),
            event_tx,
            events,
            started_at: Instant::now(),
        };
        timeline.apply_link_commands();
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

    /// Hand the proposer `wal` at `start_lsn` (what `wal_wanted_from`
    /// names) and wait until a quorum committed it; its end.
    pub async fn commit(&mut self, start_lsn: Lsn, wal: &[u8], deadline: Instant) -> Result<Lsn> {
        let end = start_lsn + wal.len() as u64;
        anyhow::ensure!(self.node.can_accept_wal(wal.len() as u64), "the WAL buffer is full");
        self.node.handle_wal(self.now_ms(), start_lsn, wal)?;
        self.flush_transmits();
        while self.node.proposer().commit_lsn() < end {
            if Instant::now() >= deadline {
                bail!("commit of {end} not acknowledged in time (commit {})", self.node.proposer().commit_lsn());
            }
            self.step(deadline).await?;
        }
        Ok(end)
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
        self.flush_transmits();
        self.apply_link_commands();
        Ok(())
    }

    fn on_link_event(&mut self, event: LinkEvent) -> Result<()> {
        let slot = event.slot;
        if let LinkEventOutcome::PeerFault(fault) = self.node.handle_link_event(self.now_ms(), event)? {
            bail!("safekeeper {} broke the protocol: {fault}", self.node.peer_addr(slot));
        }
        self.apply_link_commands();
        Ok(())
    }

    /// Start, stop and cut link tasks as the node asks (as the shim's driver does).
    fn apply_link_commands(&mut self) {
        while let Some(command) = self.node.poll_link_command() {
            match command {
                LinkCommand::Open { slot, addr, first_generation } => {
                    let target = LinkTarget {
                        slot,
                        addr,
                        tenant_id: self.cluster.tenant_id,
                        timeline_id: self.cluster.timeline_id,
                        first_generation,
                    };
                    if self.links.len() <= slot.0 {
                        self.links.resize_with(slot.0 + 1, || None);
                    }
                    self.links[slot.0] = Some(spawn_link(target, self.event_tx.clone()));
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

    fn flush_transmits(&mut self) {
        while let Some(transmit) = self.node.poll_transmit() {
            let slot = transmit.slot;
            let outgoing = Outgoing { generation: transmit.generation, message: transmit.message };
            let link = self.links.get(slot.0).and_then(Option::as_ref);
            if !link.is_some_and(|link| link.outbox.try_send(outgoing).is_ok()) {
                // Not draining: the shim's answer, a new connection.
                self.node.handle_send_failed(self.now_ms(), slot);
                self.apply_link_commands();
            }
        }
    }
}
