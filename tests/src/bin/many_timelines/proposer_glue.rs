//! All of the benchmark's contact with `compute_shim`'s proposer: one
//! timeline's [`Proposer`] (the pure state machine) driven over the shim's
//! own link tasks (`driver::links`, START_WAL_PUSH on each safekeeper's pg
//! port), fed WAL by the caller instead of by Postgres. Kept in this one
//! module because the proposer's API is being reshaped: only this file
//! follows it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;

use compute_shim::driver::links::{first_generation, spawn_link, LinkControl, LinkEvent, LinkTarget, Outgoing};
use compute_shim::driver::startup::HEARTBEAT_INTERVAL_MS;
use compute_shim::proposer::{Proposer, ProposerConfig, ProposerError, MAX_APPEND_CHUNK_BYTES};
use safekeeper::ids::ClusterId;
use safekeeper::lsn::{Lsn, WalSegmentSize};
use safekeeper::wal::format::PG15_VERSION_NUM;

/// Link events queued for one timeline (three links, a few messages each
/// in flight: far below this).
const LINK_EVENTS_QUEUE: usize = 256;
/// How often the proposer's clock advances without other input (the shim
/// uses 20 ms; a thousand timelines at that rate would cost the benchmark
/// more CPU than the safekeepers).
const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// WAL in flight to one safekeeper and held for the slowest: each commit
/// here is one small record, so the shim's 16 MiB and 256 MiB (sized for a
/// Postgres stream) would only be memory a thousand timelines do not need.
const MAX_IN_FLIGHT_BYTES: u64 = 1 << 20;
const MAX_BUFFERED_WAL_BYTES: u64 = 4 << 20;

/// One slot's link task and the connection generation it last reported.
struct Link {
    control: LinkControl,
    generation: u64,
}

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

/// A proposer for one timeline, connected to every safekeeper.
pub struct TimelineProposer {
    proposer: Proposer,
    log: Log,
    links: Vec<Link>,
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
        let proposer = Proposer::new(config);
        let (event_tx, events) = mpsc::channel(LINK_EVENTS_QUEUE);
        let links = proposer
            .wanted_links()
            .into_iter()
            .enumerate()
            .map(|(index, wanted)| {
                let (addr, incarnation) = wanted.expect("every command-line safekeeper is wanted at first");
                let target = LinkTarget {
                    index,
                    addr: addr.to_string(),
                    tenant_id: cluster.tenant_id,
                    timeline_id: cluster.timeline_id,
                    first_generation: first_generation(incarnation),
                };
                Link { control: spawn_link(target, event_tx.clone()), generation: 0 }
            })
            .collect();
        TimelineProposer {
            proposer,
            log: Log { start_lsn, bytes: Vec::new() },
            links,
            events,
            started_at: Instant::now(),
        }
    }

    /// Wait (until `deadline`) for the election; where WAL must start.
    pub async fn wait_elected(&mut self, deadline: Instant) -> Result<Lsn> {
        loop {
            if let Some(lsn) = self.proposer.wal_wanted_from() {
                return Ok(lsn);
            }
            if Instant::now() >= deadline {
                bail!("not elected in time: {:?}", self.proposer.status().phase);
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
        while self.proposer.commit_lsn() < end {
            self.feed()?;
            if Instant::now() >= deadline {
                bail!("commit of {end} not acknowledged in time (commit {})", self.proposer.commit_lsn());
            }
            self.step(deadline).await?;
        }
        Ok(end)
    }

    /// Give the proposer the WAL it asks for, as Postgres's stream would:
    /// from wherever `wal_wanted_from` names (the log check re-reads a
    /// term's first WAL; a safekeeper that joined late is caught up from
    /// the timeline start), in chunks of at most one XLogData message.
    fn feed(&mut self) -> Result<()> {
        while let Some(wanted) = self.proposer.wal_wanted_from() {
            let end = self.log.end_lsn();
            if wanted >= end {
                break;
            }
            anyhow::ensure!(wanted >= self.log.start_lsn, "the proposer wants WAL from {wanted}, before the log");
            let from = (wanted - self.log.start_lsn) as usize;
            let len = (end - wanted).min(MAX_APPEND_CHUNK_BYTES) as usize;
            if !self.proposer.can_accept_wal(len as u64) {
                break; // backpressure: again after the next acknowledgement
            }
            self.proposer.on_wal(wanted, &self.log.bytes[from..from + len])?;
        }
        self.flush_transmits();
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.started_at.elapsed().as_millis() as u64
    }

    /// One input (a link event or a tick), then send what it made due.
    async fn step(&mut self, deadline: Instant) -> Result<()> {
        let wake = deadline.min(Instant::now() + TICK_INTERVAL);
        match tokio::time::timeout_at(wake.into(), self.events.recv()).await {
            Ok(event) => self.on_link_event(event.context("the link tasks hold a sender")?)?,
            Err(_) => self.proposer.tick(self.now_ms())?,
        }
        // Take what else is already there before sending (as the shim does).
        while let Ok(event) = self.events.try_recv() {
            self.on_link_event(event)?;
        }
        self.flush_transmits();
        Ok(())
    }

    fn on_link_event(&mut self, event: LinkEvent) -> Result<()> {
        let now_ms = self.now_ms();
        match event {
            LinkEvent::Connected { safekeeper, generation } => {
                self.links[safekeeper].generation = generation;
                self.proposer.on_connected(safekeeper, now_ms);
            }
            LinkEvent::Message { safekeeper, generation, message } => {
                if generation != self.links[safekeeper].generation {
                    return Ok(()); // from a connection the proposer already forgot
                }
                match self.proposer.on_message(safekeeper, message, now_ms) {
                    Err(ProposerError::Peer { fault, .. }) => {
                        bail!("safekeeper {safekeeper} broke the protocol: {fault}")
                    }
                    other => other?,
                }
            }
            LinkEvent::Disconnected { safekeeper, generation, .. } => {
                if generation == self.links[safekeeper].generation {
                    self.proposer.on_disconnected(safekeeper, now_ms);
                }
            }
            LinkEvent::Refused { safekeeper, reason, .. } => bail!("safekeeper {safekeeper} refused: {reason}"),
        }
        Ok(())
    }

    fn flush_transmits(&mut self) {
        while let Some((safekeeper, message)) = self.proposer.poll_transmit() {
            let link = &self.links[safekeeper];
            let outgoing = Outgoing { generation: link.generation, message };
            if link.control.outbox.try_send(outgoing).is_err() {
                // Not draining: the shim's answer, a new connection.
                link.control.drop_generation.send_replace(link.generation);
                self.proposer.on_disconnected(safekeeper, self.now_ms());
            }
        }
    }
}
