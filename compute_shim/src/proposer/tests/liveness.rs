//! Liveness with a healthy majority (docs/proposer.md, "The quorum sets
//! the pace"): one shim and three safekeepers, of which one at a time (the
//! minority, chosen per seed, and changed only once it is healthy and
//! caught up) goes through long stretches of faults:
//! - silent: a SIGSTOP. Its connection stays up and nothing passes either
//!   way, for up to [`MAX_SILENCE_TIMEOUTS`] silence timeouts; the shim's
//!   reconnections are accepted (by its kernel) and are silent too;
//! - slow: its link passes messages in one step of every period of up to
//!   [`MAX_SLOW_PERIOD_HEARTBEATS`] heartbeat intervals (beyond the
//!   silence timeout at times);
//! - one-way partitioned; crashed (unsynced WAL lost but for a random
//!   prefix) and restarted later; its connection dropping again and again,
//!   each time reconnected after a backoff;
//! - caught up by peer recovery while it is behind.
//!
//! The other two and their links deliver every message within the step
//! that sends it. Postgres writes WAL in trickles and in bursts larger
//! than the shim's WAL buffer (a small one: [`BUFFER_BYTES`]), in all
//! several buffers' worth, so the buffer-full release of laggards is
//! exercised again and again.
//!
//! Invariants checked after every step: the safety ones of
//! [`super::random`] (the same `Simulation::check`), and liveness: while
//! Postgres has WAL beyond the shim's commit LSN, the commit LSN advances
//! within [`MAX_COMMIT_STALL_MS`] of simulated time, whatever the minority
//! does. At the end every fault heals: the minority must catch up under
//! the same shim with Postgres's bytes, then the healed-cluster check of
//! [`super::random`] runs (a fresh shim commits everything everywhere).
//!
//! A shim that never releases a laggard (`keep_laggards_for_tests`) must
//! be caught by the liveness invariant.
//!
//! `SIM_SEEDS=N` runs N seeds (default [`LIVENESS_DEFAULT_SEEDS`]);
//! `SIM_SEED=S` runs seed S alone.

use std::cell::Cell;

use postgres_wal::lsn::Lsn;
use rand::Rng;

use super::harness::{Postgres, HEARTBEAT_INTERVAL_MS, SILENCE_TIMEOUT_MS};
use super::random::{first_failing_seed, seeds_to_run, simulate_seeds, Simulation};
use crate::proposer::{PeerState, MIN_BUFFERED_WAL_BYTES};

pub const LIVENESS_DEFAULT_SEEDS: u64 = 20;
const STEPS_PER_SEED: usize = 4_000;
/// Simulated time a step takes, at most (each step draws 1 ms to this).
const MAX_STEP_MS: u64 = 20;
/// The WAL Postgres writes in a run (about 1.4 MiB, five and a half
/// buffers), and its generator's seed.
const RECORDS: usize = 450;
const WAL_SEED: u64 = 95;
/// The most WAL one XLogData message carries (Postgres's MAX_SEND_SIZE).
const MAX_XLOG_DATA_BYTES: usize = 128 << 10;
/// The shim's WAL buffer: the smallest allowed, one XLogData message
/// beside the largest record (6,000 bytes here). This run found that a
/// buffer of one message (what the floor was) stalls for good whatever the
/// minority does (seed 16): safekeepers acknowledge record ends only, so
/// the unfinished record at the buffer's end stays in it, and a whole
/// message no longer fits.
const BUFFER_BYTES: u64 = MIN_BUFFERED_WAL_BYTES;
/// Chance per step (per mille) that Postgres writes a burst of up to
/// [`MAX_BURST_RECORDS`] records (more than the buffer holds), and that it
/// writes a record or two.
const BURST_PER_MILLE: u32 = 2;
const MAX_BURST_RECORDS: usize = 100;
const TRICKLE_PER_MILLE: u32 = 30;
/// The longest silence, in silence timeouts: a process stopped for
/// about a minute of simulated time, thousands of steps.
const MAX_SILENCE_TIMEOUTS: u64 = 20;
const MAX_SLOW_PERIOD_HEARTBEATS: u64 = 30;
/// Chance per step (per mille) of a dropped connection while the minority
/// flaps, and of peer recovery for it while it is behind and its process
/// runs (always, once its faults are over).
const FLAP_PER_MILLE: u32 = 30;
const PEER_RECOVERY_PER_MILLE: u32 = 20;
/// Steps the healed cluster gets for the minority to catch up (each a
/// heartbeat interval; it needs far fewer).
const MAX_HEAL_STEPS: usize = 1_000;
/// Seeds the search for a shim that waits for its slowest member may take
/// (seed 1 catches it, and 6 of the first 20 do).
const KEPT_LAGGARD_SEARCH_SEEDS: u64 = 50;

/// The liveness bound. With the majority healthy, a stall has two causes
/// only. The election: its waits for the minority end after a heartbeat
/// interval each (the greeting wait once a quorum greeted, and the wait
/// for every voter's log end), plus the healthy pair's round trips for the
/// greeting, vote, ProposerElected and first append, a step each (six
/// steps, with slack). And a full buffer: the laggard is released at once
/// (`release_below`), so WAL flows again within the step. Other than
/// that, the pair commits in the step Postgres's WAL arrives (measured:
/// the longest stall is about one heartbeat interval, at the election).
/// The bound is well below the silence timeout on purpose: the majority
/// must not wait for a silent member to be dropped either.
const MAX_COMMIT_STALL_MS: u64 = 2 * HEARTBEAT_INTERVAL_MS + 6 * MAX_STEP_MS;
const _: () = assert!(MAX_COMMIT_STALL_MS < SILENCE_TIMEOUT_MS);

#[test]
fn a_healthy_majority_always_commits() {
    let postgres = [Postgres::generate(RECORDS, WAL_SEED)];
    let seeds = seeds_to_run(&[], LIVENESS_DEFAULT_SEEDS);
    let count = seeds.len();
    let seeds_with_a_release = Cell::new(0);
    simulate_seeds("a_healthy_majority_always_commits", &postgres, seeds, |simulation| {
        if LivenessRun::new(simulation, false).run() {
            seeds_with_a_release.set(seeds_with_a_release.get() + 1);
        }
    });
    // The runs must exercise the release: most seeds hold the minority too
    // far behind at some step (measured: 15 of the 20 default seeds, 192
    // of 300).
    let released = seeds_with_a_release.get();
    eprintln!("{released} of {count} liveness runs held the minority too far behind");
    if count >= 10 {
        assert!(released * 2 > count, "only {released} of {count} runs held the minority too far behind");
    }
}

/// The liveness check bites: a shim that keeps every laggard in its buffer
/// (the commit waits for the slowest member once the buffer is full, until
/// the silence timeout drops it) must fail it within a few seeds.
#[test]
fn the_liveness_check_catches_a_shim_that_waits_for_the_slowest_member() {
    let postgres = [Postgres::generate(RECORDS, WAL_SEED)];
    let caught = first_failing_seed(0..KEPT_LAGGARD_SEARCH_SEEDS, |seed| {
        LivenessRun::new(Simulation::new(seed, &postgres), true).run();
    });
    let Some((seed, message)) = caught else {
        panic!("{KEPT_LAGGARD_SEARCH_SEEDS} seeds did not catch a shim that keeps its laggards")
    };
    assert!(message.contains("commit stalled"), "seed {seed} failed, but not on liveness: {message}");
    eprintln!("the shim keeping its laggards was caught at seed {seed} (the panic above)");
}

/// What the minority goes through in a stretch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Healthy,
    /// Stopped (SIGSTOP): nothing passes either way, on any connection.
    Silent,
    /// Its link passes messages in one step of every `period_ms`.
    Slow {
        period_ms: u64,
    },
    /// One direction of its link stalls.
    OneWay {
        to_acceptor: bool,
    },
    /// Its process is down until the stretch ends.
    Crashed,
    /// Its connection drops at random; each time the link reconnects
    /// after a backoff.
    Flapping,
}

struct LivenessRun {
    simulation: Simulation,
    shim: usize,
    minority: usize,
    fault: Fault,
    fault_ends_ms: u64,
    /// The minority's link task reconnects at this time (its backoff
    /// after the connection was lost), and whether it was up at the last
    /// look.
    reconnect_at_ms: u64,
    minority_link_was_up: bool,
    /// The window of a slow link's period in which it last passed messages.
    slow_window: u64,
    /// The commit LSN at the previous step, and since when it has not
    /// advanced while Postgres has WAL beyond it.
    last_commit: Lsn,
    stalled_since_ms: Option<u64>,
    /// The minority's stretches so far, for a failure's message.
    history: Vec<String>,
    minority_was_too_far_behind: bool,
}

impl LivenessRun {
    fn new(mut simulation: Simulation, keep_laggards: bool) -> LivenessRun {
        simulation.net.max_buffered_wal_bytes = BUFFER_BYTES;
        // Postgres starts with one record: everything else is written
        // during the run.
        let first_record_end = simulation.lineages[0].record_ends[0];
        simulation.lineages[0].set_flush_lsn(first_record_end);
        let shim = simulation.start_compute_connected(&[0, 1, 2]);
        // Postgres's XLogData messages carry at most 128 KiB (the driver
        // reads one once a whole one fits): no larger pieces.
        let piece_bytes = &mut simulation.net.computes[shim].wal_piece_bytes;
        *piece_bytes = (*piece_bytes).min(MAX_XLOG_DATA_BYTES);
        if keep_laggards {
            simulation.net.computes[shim].node.keep_laggards_for_tests();
        }
        let minority = simulation.rng.gen_range(0..3);
        LivenessRun {
            simulation,
            shim,
            minority,
            fault: Fault::Healthy,
            fault_ends_ms: 0,
            reconnect_at_ms: 0,
            minority_link_was_up: true,
            slow_window: 0,
            last_commit: Lsn::INVALID,
            stalled_since_ms: None,
            history: vec![],
            minority_was_too_far_behind: false,
        }
    }

    /// Runs the steps and the heal; returns whether the shim ever held
    /// the minority too far behind (released it from its buffer, or found
    /// it behind what the buffer and Postgres's WAL could serve).
    fn run(mut self) -> bool {
        for _ in 0..STEPS_PER_SEED {
            self.step();
        }
        self.heal_and_check_catch_up();
        self.simulation.heal_and_check_liveness();
        self.minority_was_too_far_behind
    }

    fn step(&mut self) {
        if self.simulation.net.now_ms >= self.fault_ends_ms {
            self.next_fault();
        }
        if self.fault == Fault::Flapping && self.simulation.rng.gen_ratio(FLAP_PER_MILLE, 1000) {
            self.drop_minority_connection();
        }
        self.reconnect_links();
        self.apply_fault_to_link();
        self.postgres_writes();
        self.simulation.net.round();
        self.recover_minority_from_peers();
        let step_ms = self.simulation.rng.gen_range(1..=MAX_STEP_MS);
        self.simulation.net.advance_time(step_ms);
        self.simulation.check();
        self.check_commit_advances();
        let minority_state = self.simulation.net.peer_state(self.shim, self.minority);
        self.minority_was_too_far_behind |= minority_state == Some(PeerState::TooFarBehind);
    }

    /// The current stretch ends; the next one starts, on another minority
    /// sometimes, but only once this one is healthy and caught up (the
    /// other two stay healthy throughout).
    fn next_fault(&mut self) {
        let net = &mut self.simulation.net;
        if self.fault == Fault::Crashed {
            net.restart_safekeeper(self.minority);
        }
        if self.fault == Fault::Healthy && self.minority_caught_up() && self.simulation.rng.gen_bool(0.5) {
            self.minority = (self.minority + self.simulation.rng.gen_range(1..3)) % 3;
        }
        let rng = &mut self.simulation.rng;
        let (fault, duration_ms) = match rng.gen_range(0..100) {
            0..=29 => {
                (Fault::Silent, rng.gen_range(SILENCE_TIMEOUT_MS / 2..=MAX_SILENCE_TIMEOUTS * SILENCE_TIMEOUT_MS))
            }
            30..=49 => {
                let period_ms = rng.gen_range(2..=MAX_SLOW_PERIOD_HEARTBEATS) * HEARTBEAT_INTERVAL_MS;
                (Fault::Slow { period_ms }, rng.gen_range(1_000..=30_000))
            }
            50..=59 => (Fault::OneWay { to_acceptor: rng.gen_bool(0.5) }, rng.gen_range(100..=5 * SILENCE_TIMEOUT_MS)),
            60..=74 => (Fault::Crashed, rng.gen_range(10..=20_000)),
            75..=84 => (Fault::Flapping, rng.gen_range(100..=5_000)),
            _ => (Fault::Healthy, rng.gen_range(100..=5_000)),
        };
        if fault == Fault::Crashed {
            self.simulation.crash_safekeeper(self.minority);
        }
        self.fault = fault;
        self.fault_ends_ms = self.simulation.net.now_ms + duration_ms;
        self.history
            .push(format!("at {} ms sk{} {fault:?} for {duration_ms} ms", self.simulation.net.now_ms, self.minority));
    }

    /// The shim streams to the minority and it has acknowledged the commit
    /// LSN: it may join the healthy pair.
    fn minority_caught_up(&self) -> bool {
        let status = self.simulation.net.computes[self.shim].node.proposer().status();
        let peer = status.safekeepers.iter().find(|peer| peer.addr == super::harness::addr(self.minority));
        peer.is_some_and(|peer| peer.state == PeerState::Streaming && peer.flush_lsn >= Some(status.commit_lsn))
    }

    fn drop_minority_connection(&mut self) {
        let net = &mut self.simulation.net;
        if net.computes[self.shim].links[self.minority].up {
            net.disconnect(self.shim, self.minority);
        }
    }

    /// As the driver's link tasks do: a link the shim wants whose
    /// connection is gone reconnects, at once to the healthy pair (whose
    /// connections nothing drops but the shim), to the minority after a
    /// backoff and only while its process is up.
    fn reconnect_links(&mut self) {
        let (shim, minority) = (self.shim, self.minority);
        let net = &mut self.simulation.net;
        if self.minority_link_was_up && !net.computes[shim].links[minority].up {
            self.reconnect_at_ms = net.now_ms + self.simulation.rng.gen_range(0..=2 * HEARTBEAT_INTERVAL_MS);
        }
        for sk in 0..3 {
            let backing_off = sk == minority && net.now_ms < self.reconnect_at_ms;
            if !net.computes[shim].links[sk].up && !net.down[sk] && !backing_off && net.slot(shim, sk).is_some() {
                net.connect(shim, sk);
            }
        }
        self.minority_link_was_up = net.computes[shim].links[minority].up;
    }

    /// Shut the directions of the minority's link its fault stalls.
    fn apply_fault_to_link(&mut self) {
        let now_ms = self.simulation.net.now_ms;
        let (to_acceptor, to_proposer) = match self.fault {
            Fault::Healthy | Fault::Crashed | Fault::Flapping => (true, true),
            Fault::Silent => (false, false),
            Fault::Slow { period_ms } => {
                let window = now_ms / period_ms;
                let open = window != self.slow_window;
                self.slow_window = window;
                (open, open)
            }
            Fault::OneWay { to_acceptor } => (!to_acceptor, to_acceptor),
        };
        let link = &mut self.simulation.net.computes[self.shim].links[self.minority];
        (link.blocked_to_acceptor, link.blocked_to_proposer) = (!to_acceptor, !to_proposer);
    }

    fn postgres_writes(&mut self) {
        let rng = &mut self.simulation.rng;
        if rng.gen_ratio(BURST_PER_MILLE, 1000) {
            let records = rng.gen_range(1..MAX_BURST_RECORDS);
            self.simulation.postgres_writes(0, records);
        } else if rng.gen_ratio(TRICKLE_PER_MILLE, 1000) {
            let records = rng.gen_range(0..2);
            self.simulation.postgres_writes(0, records);
        }
    }

    /// Peer recovery for the minority while the shim does not stream to it
    /// (too far behind, or disconnected): at random while its process runs,
    /// and always once its faults are over. A stopped or crashed process
    /// copies nothing.
    fn recover_minority_from_peers(&mut self) {
        let per_mille = match self.fault {
            Fault::Silent | Fault::Crashed => return,
            Fault::Healthy => 1000,
            _ => PEER_RECOVERY_PER_MILLE,
        };
        if !self.simulation.rng.gen_ratio(per_mille, 1000) {
            return;
        }
        let net = &mut self.simulation.net;
        let source = (0..3)
            .filter(|&sk| sk != self.minority)
            .max_by_key(|&sk| net.acceptors[sk].acceptor().commit_lsn())
            .expect("two others");
        // It copies only while no shim streams to it.
        net.copy_from_peer(self.minority, source);
    }

    /// The liveness invariant: while Postgres has WAL beyond the commit
    /// LSN, the commit LSN advances within `MAX_COMMIT_STALL_MS`.
    fn check_commit_advances(&mut self) {
        let net = &self.simulation.net;
        let commit = net.commit_lsn(self.shim);
        let postgres_flush = net.computes[self.shim].postgres.flush_lsn();
        let pending = postgres_flush > commit;
        if commit > self.last_commit || !pending {
            self.stalled_since_ms = None;
        }
        self.last_commit = commit;
        if !pending {
            return;
        }
        let stalled_ms = net.now_ms - *self.stalled_since_ms.get_or_insert(net.now_ms);
        assert!(
            stalled_ms <= MAX_COMMIT_STALL_MS,
            "commit stalled at {commit} for {stalled_ms} ms (the bound is {MAX_COMMIT_STALL_MS} ms) with Postgres at \
             {postgres_flush} and a healthy majority; the minority's faults: {:?}; shim: {:?}; safekeepers: {}",
            self.history,
            net.computes[self.shim].node.proposer().status(),
            net.describe_acceptors()
        );
    }

    /// Every fault heals and Postgres writes all its WAL: the shim commits
    /// it and the minority catches up (from the shim, or from its peers
    /// once it is too far behind) with Postgres's bytes, as the healthy two
    /// do.
    fn heal_and_check_catch_up(&mut self) {
        if self.fault == Fault::Crashed {
            self.simulation.net.restart_safekeeper(self.minority);
        }
        self.fault = Fault::Healthy;
        self.reconnect_at_ms = 0;
        self.simulation.postgres_writes(0, RECORDS);
        let postgres = self.simulation.net.computes[self.shim].postgres.clone();
        let wal = postgres.bytes(super::harness::TIMELINE_START, postgres.flush_lsn());
        for _ in 0..MAX_HEAL_STEPS {
            let net = &self.simulation.net;
            if net.commit_lsn(self.shim) == postgres.flush_lsn() && (0..3).all(|sk| net.durable_wal(sk) == wal) {
                return;
            }
            self.reconnect_links();
            self.apply_fault_to_link();
            self.simulation.net.run_until_quiet();
            self.simulation.recover_too_far_behind(self.shim);
            self.simulation.net.advance_time(HEARTBEAT_INTERVAL_MS);
            self.simulation.check();
        }
        let holding: Vec<bool> = (0..3).map(|sk| self.simulation.net.durable_wal(sk) == wal).collect();
        panic!(
            "the healed cluster did not catch up: commit {} of {}, holding all of Postgres's WAL: {holding:?}; \
             shim: {:?}; safekeepers: {}",
            self.simulation.net.commit_lsn(self.shim),
            postgres.flush_lsn(),
            self.simulation.net.computes[self.shim].node.proposer().status(),
            self.simulation.net.describe_acceptors()
        );
    }
}
