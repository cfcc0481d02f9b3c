//! A deterministic network: real safekeeper timelines (the service's
//! `TimelineNode` over in-memory storage: the same batching, reply routing,
//! refusals and peer-recovery handoff as the service), shim nodes
//! (`crate::node::ShimNode`, the layer the driver runs: link identity is
//! its, not the harness's), one link per (shim, safekeeper) whose messages
//! the test delivers, drops or interleaves, and a Postgres model streaming
//! generated WAL (on Postgres timeline 1, or a standby promoted onto a
//! new timeline: [`Postgres::promoted`]). Acceptors validate every WAL byte,
//! so a wrong split, offset or page timeline fails; after every message a
//! safekeeper handles the harness checks the Postgres timeline invariant
//! ([`Net::check_pg_timeline_invariant`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use postgres_wal::lsn::{Lsn, PgTimelineId, WalSegmentSize};
use postgres_wal::timeline_history::{PgTimelineHistory, PgTimelineSwitch};
use postgres_wal::wal::generator::WalGenerator;
use postgres_wal::wal::{DecodeStep, WalDecoder};
use safekeeper_core::acceptor::AcceptorError;
use safekeeper_core::acceptor::PeerWal;
use safekeeper_core::control::ControlState;
use safekeeper_core::retention::RetentionPolicy;
use safekeeper_core::storage::WalStorage;
use safekeeper_core::timeline::MemoryTimeline;
use safekeeper_core::timeline_node::{
    ConnectionId, MemoryNode, NodeError as TimelineNodeError, PeerWalOutcome, RefusalCause, RetentionOutcome,
};
use safekeeper_protocol::ids::{ClusterId, NodeId, SystemId, TenantId, Term, TimelineId};
use safekeeper_protocol::protocol::{AcceptorMessage, ProposerMessage};

use crate::node::{LinkCommand, LinkEvent, LinkEventKind, LinkEventOutcome, LinkGeneration, NodeError, ShimNode};
use crate::proposer::{PeerFault, PeerState, Phase, ProposerConfig, ProposerError, SlotIndex, MAX_APPEND_CHUNK_BYTES};

pub const SYSTEM_ID: u64 = 7_000_000_000_000_000_002;
pub const SEGMENT_SIZE_BYTES: u64 = 1 << 20;
pub const TIMELINE_START: Lsn = Lsn(0x100_0000);
pub const HEARTBEAT_INTERVAL_MS: u64 = 100;
/// A connected acceptor silent this long is dropped and reconnected.
pub const SILENCE_TIMEOUT_MS: u64 = 20 * HEARTBEAT_INTERVAL_MS;
const MAX_ROUNDS: usize = 100_000;

pub fn segment_size() -> WalSegmentSize {
    WalSegmentSize::new(SEGMENT_SIZE_BYTES).expect("valid")
}

pub fn cluster() -> ClusterId {
    ClusterId { system_id: SystemId(SYSTEM_ID), tenant_id: TenantId([3; 16]), timeline_id: TimelineId([4; 16]) }
}

/// A fresh safekeeper timeline with node id `node_id` (no retention: the
/// simulation sends no consumer feedback).
pub fn new_acceptor(node_id: u64) -> MemoryNode {
    let state = ControlState::new_timeline(cluster(), 150000, segment_size());
    MemoryNode::new(MemoryTimeline::empty(NodeId(node_id), state), RetentionPolicy::default())
}

/// WAL of a Postgres primary from `TIMELINE_START`; `flushed_bytes` of it
/// exist so far (always a record end).
#[derive(Clone)]
pub struct Postgres {
    /// Shared by clones: a run starts many computes on one primary.
    pub wal: std::sync::Arc<[u8]>,
    pub record_ends: Vec<Lsn>,
    pub flushed_bytes: usize,
    /// Postgres removed its WAL below this (recycled segments).
    pub oldest_lsn: Lsn,
    /// Its timeline and their ancestors (`TIMELINE_HISTORY`): timeline 1
    /// unless it was promoted.
    pub pg_timelines: PgTimelineHistory,
}

impl Postgres {
    /// WAL of `records` random records (`seed`), all flushed.
    pub fn generate(records: usize, seed: u64) -> Postgres {
        Self::branches(records, 0, &[seed]).1.remove(0)
    }

    /// Primaries sharing `prefix_records` records, then each writing
    /// `branch_records` of its own (one per seed): what a replaced compute
    /// looks like. Returns the fork point and the primaries.
    pub fn branches(prefix_records: usize, branch_records: usize, seeds: &[u64]) -> (Lsn, Vec<Postgres>) {
        let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), TIMELINE_START);
        let prefix = generator.append_random_records(prefix_records, 1, 6_000);
        let fork_lsn = generator.end_lsn();
        let primaries = seeds
            .iter()
            .map(|&seed| {
                let mut branch = generator.clone();
                let records = branch.append_random_records(branch_records, seed, 6_000);
                let record_ends: Vec<Lsn> = prefix.iter().chain(&records).map(|record| record.end_lsn).collect();
                let (_, wal) = branch.take_bytes();
                Postgres {
                    flushed_bytes: wal.len(),
                    wal: wal.into(),
                    record_ends,
                    oldest_lsn: TIMELINE_START,
                    pg_timelines: PgTimelineHistory::first(),
                }
            })
            .collect();
        (fork_lsn, primaries)
    }

    /// A standby fed by the safekeepers, promoted once it replayed `log`
    /// (the log from `TIMELINE_START`, written under `log_timelines`, up to
    /// a record end: what sync-safekeepers printed): its WAL is `log`, then
    /// `records` random records (`seed`) on timeline `new_timeline`
    /// (Postgres picks one above every timeline it knows of). The page
    /// holding the switch point keeps its old header; later pages name the
    /// new timeline; its history ends the log's timeline at the switch.
    pub fn promoted(
        log: &[u8],
        log_timelines: &PgTimelineHistory,
        new_timeline: PgTimelineId,
        records: usize,
        seed: u64,
    ) -> Postgres {
        let switch_lsn = TIMELINE_START + log.len() as u64;
        let mut decoder = WalDecoder::at_segment_start(TIMELINE_START, segment_size());
        decoder.feed(log);
        let mut record_ends = vec![];
        let mut last_record_start = Lsn::INVALID;
        let step = decoder.decode_available(|record| {
            record_ends.push(record.end_lsn);
            last_record_start = record.start_lsn;
        });
        assert!(matches!(step, Ok(DecodeStep::NeedMoreInput)), "the log decodes: {step:?}");
        assert_eq!(record_ends.last(), Some(&switch_lsn), "promoted at a record end of the log");
        let old_timeline = log_timelines.current;
        let mut generator =
            WalGenerator::resume(SYSTEM_ID, segment_size(), switch_lsn, last_record_start, old_timeline);
        generator.switch_timeline(new_timeline);
        record_ends.extend(generator.append_random_records(records, seed, 6_000).iter().map(|record| record.end_lsn));
        let (start, new_wal) = generator.take_bytes();
        assert_eq!(start, switch_lsn);
        let wal: Vec<u8> = log.iter().chain(&new_wal).copied().collect();
        let mut switches = log_timelines.switches.clone();
        switches.push(PgTimelineSwitch {
            timeline: old_timeline,
            end_lsn: switch_lsn,
            reason: "no recovery target specified".to_string(),
        });
        let pg_timelines = PgTimelineHistory { current: new_timeline, switches };
        pg_timelines.validate().expect("a valid history");
        Postgres { flushed_bytes: wal.len(), wal: wal.into(), record_ends, oldest_lsn: TIMELINE_START, pg_timelines }
    }

    /// The timeline it writes (and its shim streams).
    pub fn timeline(&self) -> PgTimelineId {
        self.pg_timelines.current
    }

    pub fn flush_lsn(&self) -> Lsn {
        TIMELINE_START + self.flushed_bytes as u64
    }

    /// Pretend only WAL up to `lsn` (a record end) was written so far.
    pub fn set_flush_lsn(&mut self, lsn: Lsn) {
        assert!(self.record_ends.contains(&lsn) || lsn == TIMELINE_START);
        self.flushed_bytes = (lsn - TIMELINE_START) as usize;
    }

    pub fn bytes(&self, begin: Lsn, end: Lsn) -> &[u8] {
        &self.wal[(begin - TIMELINE_START) as usize..(end - TIMELINE_START) as usize]
    }
}

/// One direction-pair of an in-memory connection.
#[derive(Default)]
pub struct Link {
    pub up: bool,
    /// The connection's generation, as the link task numbered it.
    pub generation: Option<LinkGeneration>,
    pub to_acceptor: VecDeque<ProposerMessage>,
    pub to_proposer: VecDeque<AcceptorMessage>,
    /// A one-way partition: messages in this direction wait (as TCP would
    /// keep retransmitting) until it heals or the connection is dropped.
    pub blocked_to_acceptor: bool,
    pub blocked_to_proposer: bool,
}

/// A link task, as the driver runs one for a slot the node wants.
struct LinkTask {
    slot: SlotIndex,
    /// Its latest connection's generation.
    generation: LinkGeneration,
}

/// A compute: a shim node and the Postgres it streams from.
pub struct Compute {
    pub node: ShimNode,
    pub postgres: Postgres,
    pub links: Vec<Link>,
    /// By safekeeper: the link task the node opened for it.
    tasks: Vec<Option<LinkTask>>,
    /// Where Postgres's stream to the proposer has reached.
    pub streamed_lsn: Option<Lsn>,
    /// A fatal error it stopped on (the shim would have exited).
    pub stopped: Option<ProposerError>,
    /// Size of the WAL pieces Postgres sends (XLogData messages).
    pub wal_piece_bytes: usize,
    /// A `sync-safekeepers` proposer: its WAL comes from its election's
    /// donor (that acceptor's durable WAL), not from `postgres` (kept only
    /// for the checks: the primary whose log it syncs).
    pub reads_donor: bool,
}

pub struct Net {
    pub acceptors: Vec<MemoryNode>,
    /// Safekeepers whose process is down: connections to them fail.
    pub down: Vec<bool>,
    pub computes: Vec<Compute>,
    pub now_ms: u64,
    /// `connections[sk][c]`: the connection compute `c`'s current link to
    /// safekeeper `sk` is, as that safekeeper's node knows it.
    connections: Vec<Vec<Option<ConnectionId>>>,
    /// Connection ids only grow, as the service's do.
    next_connection_id: u64,
    pub max_in_flight_bytes: u64,
    pub max_buffered_wal_bytes: u64,
    /// The Postgres timeline invariant's record (see
    /// [`Net::check_pg_timeline_invariant`]).
    pub pg_timeline_record: PgTimelineRecord,
}

/// What [`Net::check_pg_timeline_invariant`] has seen so far.
#[derive(Default)]
pub struct PgTimelineRecord {
    /// Per term, the safekeepers that accepted its ProposerElected.
    accepted_by: BTreeMap<Term, BTreeSet<usize>>,
    /// Terms a quorum accepted, with the Postgres timeline of the
    /// proposer that won it (`None`: a sync, streaming no Postgres).
    pub won: BTreeMap<Term, Option<PgTimelineId>>,
    /// The highest Postgres timeline that the log a quorum held was ever on.
    pub quorum_timeline: PgTimelineId,
}

impl Net {
    pub fn new(safekeepers: usize) -> Net {
        Net {
            acceptors: (0..safekeepers).map(|i| new_acceptor(i as u64 + 1)).collect(),
            down: vec![false; safekeepers],
            computes: vec![],
            now_ms: 1_000,
            connections: vec![vec![]; safekeepers],
            next_connection_id: 1,
            max_in_flight_bytes: 256 << 10,
            max_buffered_wal_bytes: 4 << 20,
            pg_timeline_record: PgTimelineRecord::default(),
        }
    }

    /// `safekeepers` safekeepers and one compute streaming `postgres` to
    /// all of them, run until quiet (everything it has is committed).
    pub fn streaming(safekeepers: usize, postgres: Postgres) -> (Net, usize) {
        let mut net = Net::new(safekeepers);
        let c = net.start_compute(postgres);
        net.connect_all(c);
        net.run_until_quiet();
        (net, c)
    }

    /// Start a compute_shim for `postgres` naming every safekeeper;
    /// nothing is connected yet.
    pub fn start_compute(&mut self, postgres: Postgres) -> usize {
        let all: Vec<usize> = (0..self.acceptors.len()).collect();
        self.start_compute_with(postgres, &all)
    }

    /// Start a compute_shim whose `--safekeepers` names `safekeepers`.
    pub fn start_compute_with(&mut self, postgres: Postgres, safekeepers: &[usize]) -> usize {
        let mode = crate::proposer::ProposerMode::Stream { postgres_flush_lsn: postgres.flush_lsn() };
        self.start_proposer(postgres, safekeepers, mode)
    }

    /// Start `compute_shim sync-safekeepers` naming every safekeeper, after
    /// the primary `postgres` died; nothing is connected yet.
    pub fn start_sync(&mut self, postgres: Postgres) -> usize {
        let all: Vec<usize> = (0..self.acceptors.len()).collect();
        let c = self.start_proposer(postgres, &all, crate::proposer::ProposerMode::Sync);
        self.computes[c].reads_donor = true;
        c
    }

    fn start_proposer(
        &mut self,
        postgres: Postgres,
        safekeepers: &[usize],
        mode: crate::proposer::ProposerMode,
    ) -> usize {
        let config = ProposerConfig {
            cluster: cluster(),
            pg_version: 150000,
            wal_segment_size: segment_size(),
            safekeepers: safekeepers.iter().map(|&sk| addr(sk)).collect(),
            max_in_flight_bytes: self.max_in_flight_bytes,
            max_buffered_wal_bytes: self.max_buffered_wal_bytes,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            silence_timeout_ms: SILENCE_TIMEOUT_MS,
            proposer_id: [self.computes.len() as u8; 16],
            timeline_start_lsn: TIMELINE_START,
            pg_timelines: match mode {
                crate::proposer::ProposerMode::Sync => None,
                crate::proposer::ProposerMode::Stream { .. } => Some(postgres.pg_timelines.clone()),
            },
            mode,
        };
        self.computes.push(Compute {
            node: ShimNode::new(config, self.now_ms),
            postgres,
            links: (0..self.acceptors.len()).map(|_| Link::default()).collect(),
            tasks: (0..self.acceptors.len()).map(|_| None).collect(),
            streamed_lsn: None,
            stopped: None,
            wal_piece_bytes: MAX_APPEND_CHUNK_BYTES as usize,
            reads_donor: false,
        });
        self.computes.len() - 1
    }

    /// Connect compute `c` to safekeeper `sk`, if its node keeps a link
    /// task there (as the driver's tasks connect).
    pub fn connect(&mut self, c: usize, sk: usize) {
        assert!(!self.down[sk], "connecting to a safekeeper that is down");
        self.apply_link_commands(c);
        let compute = &mut self.computes[c];
        let Some(task) = compute.tasks[sk].as_mut() else { return };
        task.generation = task.generation.next();
        let (slot, generation) = (task.slot, task.generation);
        compute.links[sk] = Link { up: true, generation: Some(generation), ..Link::default() };
        let connected = LinkEvent { slot, generation, kind: LinkEventKind::Connected };
        let outcome = compute.node.handle_link_event(self.now_ms, connected).expect("connecting is never fatal");
        assert_eq!(outcome, LinkEventOutcome::Applied, "a new connection of a current task counts");
        self.open_connection(c, sk);
    }

    pub fn connect_all(&mut self, c: usize) {
        (0..self.acceptors.len()).for_each(|sk| self.connect(c, sk));
    }

    /// As the driver does: start, stop and cut link tasks as the node asks.
    /// A started or stopped task's connection goes without a word; a cut
    /// one reports its end (which the node knows to be stale).
    fn apply_link_commands(&mut self, c: usize) {
        while let Some(command) = self.computes[c].node.poll_link_command() {
            let compute = &mut self.computes[c];
            // A slot's task is found by slot: a reused slot names another
            // safekeeper than the task it replaces.
            let task_of =
                |slot: SlotIndex| compute.tasks.iter().position(|task| task.as_ref().is_some_and(|t| t.slot == slot));
            match command {
                LinkCommand::Open { slot, addr, first_generation } => {
                    if let Some(old) = task_of(slot) {
                        compute.tasks[old] = None;
                        compute.links[old] = Link::default();
                    }
                    let sk = acceptor_index(&addr);
                    compute.tasks[sk] = Some(LinkTask { slot, generation: first_generation });
                    compute.links[sk] = Link::default();
                }
                LinkCommand::Close { slot } => {
                    let sk = task_of(slot).expect("a task is closed once");
                    compute.tasks[sk] = None;
                    compute.links[sk] = Link::default();
                }
                LinkCommand::DropConnection { generation, slot } => {
                    let sk = task_of(slot).expect("a connection of a running task");
                    if compute.links[sk].generation == Some(generation) {
                        self.disconnect(c, sk);
                    }
                }
            }
        }
    }

    /// The proposer's peer slot for safekeeper `sk`, if it wants a link.
    pub fn slot(&self, c: usize, sk: usize) -> Option<SlotIndex> {
        let proposer = self.computes[c].node.proposer();
        proposer.peer_index(&addr(sk)).filter(|&slot| proposer.link_wanted(slot))
    }

    /// The state compute `c`'s proposer shows for safekeeper `sk`.
    pub fn peer_state(&self, c: usize, sk: usize) -> Option<PeerState> {
        let status = self.computes[c].node.proposer().status();
        status.safekeepers.into_iter().find(|peer| peer.addr == addr(sk)).map(|peer| peer.state)
    }

    /// Safekeeper `sk`'s process dies: its connections drop, WAL it had
    /// not synced is lost but for `keep_unsynced_bytes` of it. It stays
    /// down until [`Net::restart_safekeeper`].
    pub fn crash_safekeeper(&mut self, sk: usize, keep_unsynced_bytes: usize) {
        for c in 0..self.computes.len() {
            if self.computes[c].links[sk].up {
                self.disconnect(c, sk);
            }
        }
        let placeholder = new_acceptor(sk as u64 + 1);
        let crashed = std::mem::replace(&mut self.acceptors[sk], placeholder);
        self.acceptors[sk] = crashed.crash_and_restart(keep_unsynced_bytes);
        self.down[sk] = true;
    }

    pub fn restart_safekeeper(&mut self, sk: usize) {
        self.down[sk] = false;
    }

    /// Drop a connection: whatever was in flight on it is lost.
    pub fn disconnect(&mut self, c: usize, sk: usize) {
        self.close_connection(c, sk);
        let compute = &mut self.computes[c];
        let link = std::mem::take(&mut compute.links[sk]);
        if let (Some(generation), Some(task)) = (link.generation, &compute.tasks[sk]) {
            let reason = "closed by the test".to_string();
            let closed = LinkEvent { slot: task.slot, generation, kind: LinkEventKind::Disconnected { reason } };
            compute.node.handle_link_event(self.now_ms, closed).expect("a disconnection is never fatal");
        }
    }

    /// The compute's process dies: every connection of it is gone.
    pub fn kill(&mut self, c: usize) {
        (0..self.acceptors.len()).for_each(|sk| self.close_connection(c, sk));
        let compute = &mut self.computes[c];
        compute.links.iter_mut().for_each(|link| *link = Link::default());
        compute.stopped.get_or_insert(ProposerError::WalNotWanted);
    }

    pub fn is_running(&self, c: usize) -> bool {
        self.computes[c].stopped.is_none()
    }

    /// Move the proposer's output onto its links and Postgres's WAL into it.
    pub fn pump(&mut self, c: usize) -> bool {
        if !self.is_running(c) {
            return false;
        }
        self.apply_link_commands(c);
        let mut moved = self.feed_wal(c);
        let compute = &mut self.computes[c];
        while let Some(transmit) = compute.node.poll_transmit() {
            let sk = acceptor_index(compute.node.peer_addr(transmit.slot));
            let link = &mut compute.links[sk];
            assert_eq!(link.generation, Some(transmit.generation), "the node sent to a closed connection");
            link.to_acceptor.push_back(transmit.message);
            moved = true;
        }
        // The standby-status policy runs as in the driver (Postgres is
        // not modelled further): it never reports beyond the commit.
        if let Some(status) = compute.node.poll_standby_status(self.now_ms) {
            assert!(status.flush_lsn <= compute.node.proposer().commit_lsn(), "Postgres told more than committed");
        }
        moved
    }

    /// Postgres streams what it has, in pieces, while the proposer has room.
    /// Where the proposer wants WAL from elsewhere, the stream restarts
    /// there, as the driver's does; WAL Postgres removed is refused.
    fn feed_wal(&mut self, c: usize) -> bool {
        let now_ms = self.now_ms;
        // A sync reads its donor's log as the driver does (START_REPLICATION
        // ... TERM n: up to the donor's flush LSN).
        let donor_wal: Option<Vec<u8>> = self.computes[c].reads_donor.then(|| {
            let node = &self.computes[c].node;
            let donor = node.proposer().donor().map(|(slot, _)| acceptor_index(node.peer_addr(slot)));
            donor.map(|sk| self.durable_wal(sk).to_vec()).unwrap_or_default()
        });
        let compute = &mut self.computes[c];
        let (oldest_lsn, source_end) = match &donor_wal {
            Some(wal) => (TIMELINE_START, TIMELINE_START + wal.len() as u64),
            None => (compute.postgres.oldest_lsn, compute.postgres.flush_lsn()),
        };
        let mut moved = false;
        while let Some(wanted) = compute.node.wal_wanted_from() {
            if compute.streamed_lsn != Some(wanted) {
                if wanted < oldest_lsn {
                    compute.streamed_lsn = None;
                    compute.node.handle_stream_stopped(now_ms);
                    if let Err(error) = compute.node.handle_wal_unavailable(now_ms, wanted) {
                        self.stop(c, error);
                        return true;
                    }
                    moved = true;
                    continue;
                }
                compute.streamed_lsn = Some(wanted);
                compute.node.handle_stream_started(now_ms);
            }
            let end = source_end.min(wanted + compute.wal_piece_bytes as u64);
            if wanted >= end || !compute.node.can_accept_wal(end - wanted) {
                break;
            }
            let bytes = match &donor_wal {
                Some(wal) => &wal[(wanted - TIMELINE_START) as usize..(end - TIMELINE_START) as usize],
                None => compute.postgres.bytes(wanted, end),
            };
            let fed = compute.node.handle_wal(now_ms, wanted, bytes);
            if let Err(error) = fed {
                assert!(!matches!(error, ProposerError::WalBufferFull { .. }), "room was checked");
                self.stop(c, error);
                return true;
            }
            compute.streamed_lsn = Some(end);
            moved = true;
        }
        moved
    }

    /// Deliver the oldest message on the link to the acceptor: its
    /// safekeeper's node handles it in the batch under way (a full batch is
    /// synced first, as the service ends a batch at its bounds).
    pub fn deliver_to_acceptor(&mut self, c: usize, sk: usize) -> bool {
        if self.computes[c].links[sk].blocked_to_acceptor {
            return false;
        }
        let Some(message) = self.computes[c].links[sk].to_acceptor.pop_front() else { return false };
        let connection = self.connections[sk][c].expect("a link that is up has a connection");
        if self.acceptors[sk].batch_is_full() {
            self.sync(sk);
        }
        self.acceptors[sk].handle_message(connection, message).expect("memory storage does not fail");
        self.check_pg_timeline_invariant();
        self.close_refused(sk);
        true
    }

    /// Invariant: no term is won (its ProposerElected accepted by a quorum)
    /// by a proposer whose Postgres timeline is below the timeline of a log
    /// a quorum held before: an old primary's shim never leads again after
    /// a failover. Checked after every message a safekeeper handles (the
    /// only way a term is accepted or a log's timeline changes).
    pub fn check_pg_timeline_invariant(&mut self) {
        let quorum = self.acceptors.len() / 2 + 1;
        let mut newly_won = vec![];
        for (sk, node) in self.acceptors.iter().enumerate() {
            let Some(term) = node.acceptor().elected_term() else { continue };
            let accepted = self.pg_timeline_record.accepted_by.entry(term).or_default();
            if accepted.insert(sk) && accepted.len() == quorum {
                newly_won.push(term);
            }
        }
        for term in newly_won {
            // Two proposers may campaign for one term; the one elected in it won.
            let of_term = |elected_only: bool| {
                self.computes.iter().position(|compute| {
                    let status = compute.node.proposer().status();
                    status.term == Some(term) && (!elected_only || status.phase == Phase::Elected)
                })
            };
            let winner = of_term(true).or_else(|| of_term(false));
            let winner = winner.unwrap_or_else(|| panic!("no proposer of term {term}, which a quorum accepted"));
            let compute = &self.computes[winner];
            let timeline = (!compute.reads_donor).then(|| compute.postgres.timeline());
            let floor = self.pg_timeline_record.quorum_timeline;
            assert!(
                timeline.is_none_or(|timeline| timeline >= floor),
                "Postgres timeline invariant violated: compute {winner} won term {term} streaming timeline {}, \
                 below timeline {floor} of a log a quorum held; {}",
                timeline.unwrap_or_default(),
                self.describe_acceptors()
            );
            self.pg_timeline_record.won.insert(term, timeline);
        }
        let mut timelines: Vec<PgTimelineId> =
            self.acceptors.iter().map(|node| node.acceptor().state().pg_timelines.current).collect();
        timelines.sort_unstable_by(|a, b| b.cmp(a));
        let held_by_quorum = timelines[quorum - 1];
        let record = &mut self.pg_timeline_record;
        record.quorum_timeline = record.quorum_timeline.max(held_by_quorum);
    }

    /// The safekeeper ends its batch: one sync, then the replies go to the
    /// connections the node addresses (none to a connection since closed).
    /// Returns whether it replied.
    pub fn sync(&mut self, sk: usize) -> bool {
        let output = match self.acceptors[sk].end_batch() {
            Ok(output) => output,
            // Fail-stop, as the service exits: nothing of the batch was
            // acknowledged, and what was not synced is lost with the process.
            Err(TimelineNodeError::Storage(error)) if error.is_fatal() => {
                self.crash_safekeeper(sk, 0);
                return true;
            }
            Err(error) => panic!("safekeeper {sk}: {error}"),
        };
        let retained = self.acceptors[sk].apply_retention().expect("memory storage does not fail");
        assert_eq!(retained, RetentionOutcome::Nothing, "the simulation sends no consumer feedback");
        let replied = !output.replies.is_empty();
        for (connection, reply) in output.replies {
            let Some(c) = self.compute_of(sk, connection) else { continue };
            let link = &mut self.computes[c].links[sk];
            if link.up {
                link.to_proposer.push_back(reply);
            }
        }
        replied
    }

    /// A new connection of compute `c` to safekeeper `sk` (its link was
    /// just made).
    fn open_connection(&mut self, c: usize, sk: usize) {
        let connections = &mut self.connections[sk];
        if connections.len() <= c {
            connections.resize(c + 1, None);
        }
        connections[c] = Some(ConnectionId(self.next_connection_id));
        self.next_connection_id += 1;
    }

    /// Compute `c`'s connection to `sk` is gone: its node owes it nothing more.
    fn close_connection(&mut self, c: usize, sk: usize) {
        if let Some(connection) = self.connections[sk].get_mut(c).and_then(Option::take) {
            self.acceptors[sk].connection_closed(connection);
        }
    }

    /// The compute whose current connection to `sk` is `connection`.
    fn compute_of(&self, sk: usize, connection: ConnectionId) -> Option<usize> {
        self.connections[sk].iter().position(|&current| current == Some(connection))
    }

    /// Act on the connections safekeeper `sk`'s node closed, as the shim
    /// does on the error it reads.
    fn close_refused(&mut self, sk: usize) {
        while let Some((connection, refusal)) = self.acceptors[sk].poll_close() {
            let Some(c) = self.compute_of(sk, connection) else { continue };
            match refusal.cause {
                // The shim's link reconnects and greets again: to learn a
                // newer configuration, or (after peer recovery caught this
                // safekeeper up) to stream from its new flush LSN.
                RefusalCause::Refused(AcceptorError::StaleGeneration { .. } | AcceptorError::NotAMember { .. })
                | RefusalCause::CaughtUpByPeers { .. } => {
                    self.disconnect(c, sk);
                    self.connect(c, sk);
                }
                RefusalCause::Refused(AcceptorError::SupersededTimeline { proposer_timeline, current, switch_lsn }) => {
                    // An old primary after a failover: the shim exits.
                    assert!(proposer_timeline < current && self.computes[c].postgres.timeline() == proposer_timeline);
                    let superseded = ProposerError::Superseded { timeline: proposer_timeline, current, switch_lsn };
                    self.stop(c, superseded);
                }
                RefusalCause::Refused(
                    error @ (AcceptorError::TimelineWentDown { .. } | AcceptorError::PgTimelinesDisagree { .. }),
                ) => {
                    // Legitimate only for a primary whose timelines are not the log's.
                    let ours = &self.acceptors[sk].acceptor().state().pg_timelines;
                    assert!(
                        self.computes[c].reads_donor || self.computes[c].postgres.pg_timelines != *ours,
                        "safekeeper {sk} refused compute {c}'s timelines although they are the log's: {error}"
                    );
                    self.kill(c);
                }
                RefusalCause::Refused(error) => {
                    // Legitimate only when the compute's primary diverged
                    // from the log (another lineage): the shim would exit
                    // refused.
                    let log = self.acceptors[sk].wal().contents();
                    assert!(
                        !self.computes[c].postgres.wal.starts_with(log),
                        "safekeeper {sk} refused compute {c}'s message although its log continues that primary's WAL: {error}"
                    );
                    self.kill(c);
                }
                RefusalCause::StorageFailed => panic!("memory storage does not fail: {}", refusal.message),
            }
        }
    }

    /// Deliver the oldest reply on the link to the proposer. A fatal error
    /// stops the compute (the shim exits); a peer fault is a bug here.
    pub fn deliver_to_proposer(&mut self, c: usize, sk: usize) -> bool {
        if self.computes[c].links[sk].blocked_to_proposer {
            return false;
        }
        let Some(message) = self.computes[c].links[sk].to_proposer.pop_front() else { return false };
        if !self.is_running(c) {
            return true;
        }
        let compute = &mut self.computes[c];
        let (Some(task), Some(generation)) = (&compute.tasks[sk], compute.links[sk].generation) else {
            unreachable!("a connection belongs to a link task")
        };
        let event = LinkEvent { slot: task.slot, generation, kind: LinkEventKind::Message(message) };
        match compute.node.handle_link_event(self.now_ms, event) {
            Ok(LinkEventOutcome::PeerFault(PeerFault::NewerConfiguration { .. })) => {
                // The node dropped the connection; its task reconnects.
                self.apply_link_commands(c);
                self.connect(c, sk);
            }
            Ok(LinkEventOutcome::PeerFault(fault)) => {
                panic!("compute {c}: safekeeper {sk} broke the protocol: {fault}")
            }
            Ok(LinkEventOutcome::Applied | LinkEventOutcome::Stale) => {}
            Err(NodeError::Proposer(error)) => self.stop(c, error),
            Err(refused) => panic!("compute {c}: {refused}"),
        }
        true
    }

    /// The proposer returned a fatal error: the shim would exit with it.
    fn stop(&mut self, c: usize, error: ProposerError) {
        assert!(error.is_fatal(), "compute {c}: {error}");
        self.kill(c);
        self.computes[c].stopped = Some(error);
    }

    /// One round: every compute sends, every acceptor handles and syncs,
    /// every reply is delivered. Returns whether anything moved.
    pub fn round(&mut self) -> bool {
        let mut moved = false;
        for c in 0..self.computes.len() {
            moved |= self.pump(c);
            for sk in 0..self.acceptors.len() {
                while self.deliver_to_acceptor(c, sk) {
                    moved = true;
                }
            }
        }
        for sk in 0..self.acceptors.len() {
            moved |= self.sync(sk);
        }
        for c in 0..self.computes.len() {
            for sk in 0..self.acceptors.len() {
                while self.deliver_to_proposer(c, sk) {
                    moved = true;
                }
            }
        }
        moved
    }

    /// Rounds until nothing moves.
    pub fn run_until_quiet(&mut self) {
        for _ in 0..MAX_ROUNDS {
            if !self.round() {
                return;
            }
        }
        panic!("the network never went quiet");
    }

    /// Rounds until `done` holds.
    pub fn run_until(&mut self, mut done: impl FnMut(&Net) -> bool) {
        for _ in 0..MAX_ROUNDS {
            if done(self) {
                return;
            }
            self.round();
        }
        panic!("the condition never held");
    }

    pub fn advance_time(&mut self, ms: u64) {
        self.now_ms += ms;
        for c in 0..self.computes.len() {
            if self.is_running(c) {
                if let Err(error) = self.computes[c].node.handle_timeout(self.now_ms) {
                    self.stop(c, error);
                }
            }
        }
    }

    pub fn commit_lsn(&self, c: usize) -> Lsn {
        self.computes[c].node.proposer().commit_lsn()
    }

    pub fn elected_term(&self, c: usize) -> Option<Term> {
        let status = self.computes[c].node.proposer().status();
        (status.phase == Phase::Elected).then_some(status.term).flatten()
    }

    /// Each acceptor's term, history, flush and commit (for failure messages).
    pub fn describe_acceptors(&self) -> String {
        let describe = |(sk, timeline): (usize, &MemoryNode)| {
            let acceptor = timeline.acceptor();
            format!(
                "sk{sk}{} term {} history {:?} flush {} commit {}",
                if self.down[sk] { " (down)" } else { "" },
                acceptor.term(),
                acceptor.state().term_history.0.iter().map(|e| (e.term.0, e.start_lsn.to_string())).collect::<Vec<_>>(),
                acceptor.flush_lsn(),
                acceptor.commit_lsn()
            )
        };
        self.acceptors.iter().enumerate().map(describe).collect::<Vec<_>>().join("; ")
    }

    /// Peer recovery as the service runs it: `source`'s committed WAL from
    /// `sk`'s write position, in pieces within segments, through the node's
    /// `handle_peer_wal`, then a sync and the handoff (the node refuses the
    /// proposer connections it saw, once, when they next speak). Only while
    /// no running compute streams WAL to `sk` (the service copies only after
    /// proposers were quiet for a while). A refusal ends the copy, as it
    /// ends a round.
    pub fn copy_from_peer(&mut self, sk: usize, source: usize) -> bool {
        if sk == source || self.down[sk] || self.down[source] {
            return false;
        }
        // The service copies only after proposers were quiet for seconds:
        // here, only while every running compute connected to `sk` holds it
        // too far behind (sending heartbeats only).
        let streams_to_sk = |compute: &Compute| {
            compute.stopped.is_none()
                && compute.links[sk].up
                && compute
                    .node
                    .proposer()
                    .status()
                    .safekeepers
                    .iter()
                    .any(|peer| peer.addr == addr(sk) && peer.state != PeerState::TooFarBehind)
        };
        if self.computes.iter().any(streams_to_sk) {
            return false;
        }
        let state = self.acceptors[source].acceptor().state();
        let (history, commit) = (state.term_history.clone(), state.commit_lsn);
        let start = self.acceptors[sk].acceptor().write_lsn();
        if commit <= start || !start.is_valid() {
            return false;
        }
        let committed =
            self.durable_wal(source)[(start - TIMELINE_START) as usize..(commit - TIMELINE_START) as usize].to_vec();
        let mut at = start;
        for piece in split_at_segments(start, &committed, self.acceptors[sk].acceptor().state().wal_segment_size) {
            let wal = PeerWal {
                begin_lsn: at,
                wal: Bytes::copy_from_slice(piece),
                source_history: history.clone(),
                source_commit_lsn: commit,
            };
            if self.acceptors[sk].batch_is_full() {
                self.sync(sk);
            }
            match self.acceptors[sk].handle_peer_wal(&wal).expect("memory storage does not fail") {
                PeerWalOutcome::Written => at = at + piece.len() as u64,
                PeerWalOutcome::Refused(_) => break,
            }
        }
        self.sync(sk);
        self.acceptors[sk].peer_recovery_done();
        true
    }

    /// Durable WAL of an acceptor, from the timeline start.
    pub fn durable_wal(&self, sk: usize) -> &[u8] {
        let wal = self.acceptors[sk].wal();
        if !wal.start_lsn().is_valid() {
            return &[];
        }
        assert_eq!(wal.start_lsn(), TIMELINE_START);
        &wal.contents()[..(wal.flush_lsn() - TIMELINE_START) as usize]
    }

    /// The simulation's safety invariant: an acknowledged commit stays
    /// durable, with the primary's bytes, on a majority.
    pub fn check_commit_on_majority(&self, postgres: &Postgres, commit: Lsn) -> Result<(), String> {
        let holders = self.holders(postgres, commit);
        if holders > self.acceptors.len() / 2 {
            return Ok(());
        }
        Err(format!(
            "acknowledged commit {commit} is no longer on a majority ({holders} of {} hold its bytes); {}",
            self.acceptors.len(),
            self.describe_acceptors()
        ))
    }

    /// Acceptors whose durable WAL holds `postgres`'s bytes up to `lsn`.
    pub fn holders(&self, postgres: &Postgres, lsn: Lsn) -> usize {
        if lsn <= TIMELINE_START {
            return self.acceptors.len(); // nothing committed yet
        }
        self.holders_of(postgres.bytes(TIMELINE_START, lsn))
    }

    /// Acceptors whose durable WAL begins with `wal` (from the timeline start).
    pub fn holders_of(&self, wal: &[u8]) -> usize {
        (0..self.acceptors.len()).filter(|&sk| self.durable_wal(sk).starts_with(wal)).count()
    }
}

/// Safekeeper `sk`'s address as proposers name it.
pub fn addr(sk: usize) -> String {
    format!("sk{sk}")
}

pub fn acceptor_index(addr: &str) -> usize {
    addr.strip_prefix("sk").and_then(|index| index.parse().ok()).expect("harness addresses are skN")
}

/// `wal` starting at `start`, cut where segments end.
fn split_at_segments(start: Lsn, wal: &[u8], segment_size: WalSegmentSize) -> Vec<&[u8]> {
    let mut pieces = vec![];
    let (mut at, mut rest) = (start, wal);
    while !rest.is_empty() {
        let len = ((at.next_segment_start(segment_size) - at) as usize).min(rest.len());
        let (piece, tail) = rest.split_at(len);
        pieces.push(piece);
        at = at + len as u64;
        rest = tail;
    }
    pieces
}
