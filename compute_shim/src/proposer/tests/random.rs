//! A seeded, deterministic simulation: random message interleavings across
//! links, dropped connections, one-way partitions (a direction stalls until
//! it heals or the connection drops), safekeeper crashes (unsynced WAL lost
//! but for a random prefix) and restarts, Postgres writing more, proposer
//! restarts (the old one killed or left running until fenced, so two
//! proposers may be alive at once).
//!
//! Invariants checked after every step:
//! - a proposer's commit never goes back; at most one proposer is elected
//!   per term, and its term starts at or after every commit acknowledged
//!   before its election;
//! - the highest commit any proposer reported is durable on a quorum, with
//!   Postgres's bytes;
//! - every safekeeper's WAL below its own commit LSN is Postgres's bytes;
//!   its commit LSN never goes back while it runs, and the commit LSN in its
//!   control file never goes back at all (a safekeeper never truncates below
//!   its commit: it would refuse the message, which fails the run).
//!
//! At the end every fault heals and a fresh proposer with every safekeeper
//! connected must commit all of Postgres's WAL (liveness).
//!
//! `SIM_SEEDS=N` runs N seeds (default [`DEFAULT_SEEDS`]); `SIM_SEED=S` runs
//! seed S alone. A failure prints its seed and the command that replays it.

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safekeeper::ids::Term;
use safekeeper::lsn::Lsn;
use safekeeper::storage::WalStorage;

use super::harness::{Net, Postgres, TIMELINE_START};
use crate::proposer::ProposerError;

pub const DEFAULT_SEEDS: u64 = 1_000;
const STEPS_PER_SEED: usize = 400;
const SAFEKEEPERS: usize = 3;
const MAX_COMPUTES_PER_SEED: usize = 6;
/// Rounds the healed cluster gets to go quiet (it needs far fewer).
const MAX_HEAL_ROUNDS: usize = 100_000;

/// Seeds found failing once, replayed first in every run.
/// 2743: an acknowledgement owed to a dropped connection reached the next
/// one (a harness bug: the service sends it nowhere).
/// 10360: a second proposer's startup snapshot of Postgres's flush LSN was
/// passed by the first one's streaming (it refuses to lead and exits; see
/// `check`).
const REGRESSION_SEEDS: &[u64] = &[2743, 10360];

#[test]
fn random_failures_keep_commits_safe() {
    let postgres = Postgres::generate(380, 99);
    for seed in seeds_to_run() {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| Simulation::new(seed, &postgres).run())) {
            eprintln!(
                "simulation failed with seed {seed}; replay it alone with:\n  \
                 SIM_SEED={seed} cargo test -p compute_shim --lib random_failures_keep_commits_safe -- --nocapture"
            );
            resume_unwind(panic);
        }
    }
}

/// `SIM_SEED` alone, else the regression seeds and `0..SIM_SEEDS`.
fn seeds_to_run() -> Vec<u64> {
    let from_env = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|text| text.parse::<u64>().unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
    };
    if let Some(seed) = from_env("SIM_SEED") {
        return vec![seed];
    }
    let count = from_env("SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    REGRESSION_SEEDS.iter().copied().chain(0..count).collect()
}

struct Simulation {
    rng: StdRng,
    net: Net,
    postgres: Postgres,
    /// Commit each compute last reported.
    last_commit: Vec<Lsn>,
    highest_commit: Lsn,
    elected: HashMap<Term, usize>,
    /// Each safekeeper's commit LSN as last seen, in memory and persisted.
    acceptor_commit: Vec<Lsn>,
    persisted_commit: Vec<Lsn>,
}

impl Simulation {
    fn new(seed: u64, postgres: &Postgres) -> Simulation {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut postgres = postgres.clone();
        postgres.set_flush_lsn(postgres.record_ends[rng.gen_range(0..postgres.record_ends.len() / 3)]);
        let mut net = Net::new(SAFEKEEPERS);
        net.max_in_flight_bytes = [128 << 10, 300 << 10][rng.gen_range(0..2)];
        net.max_buffered_wal_bytes = [256 << 10, 4 << 20][rng.gen_range(0..2)];
        Simulation {
            rng,
            net,
            postgres,
            last_commit: vec![],
            highest_commit: Lsn::INVALID,
            elected: HashMap::new(),
            acceptor_commit: vec![Lsn::INVALID; SAFEKEEPERS],
            persisted_commit: vec![Lsn::INVALID; SAFEKEEPERS],
        }
    }

    fn run(mut self) {
        self.start_compute();
        for _ in 0..STEPS_PER_SEED {
            self.random_step();
            self.check();
        }
        self.heal_and_check_liveness();
    }

    fn start_compute(&mut self) {
        let c = self.net.start_compute(self.postgres.clone());
        self.net.computes[c].wal_piece_bytes = self.rng.gen_range(1_000..140_000);
        self.last_commit.push(Lsn::INVALID);
        for sk in 0..SAFEKEEPERS {
            if !self.net.down[sk] && self.rng.gen_bool(0.8) {
                self.net.connect(c, sk);
            }
        }
    }

    fn random_step(&mut self) {
        let c = self.rng.gen_range(0..self.net.computes.len());
        let sk = self.rng.gen_range(0..SAFEKEEPERS);
        let running = self.net.is_running(c);
        let up = self.net.computes[c].links[sk].up;
        match self.rng.gen_range(0..1000) {
            0..=289 => drop(self.net.deliver_to_acceptor(c, sk)),
            290..=529 => drop(self.net.deliver_to_proposer(c, sk)),
            530..=629 => drop(self.net.sync(sk)),
            630..=769 => drop(self.net.pump(c)),
            770..=799 if running && up => self.net.disconnect(c, sk),
            800..=859 if running && !up && !self.net.down[sk] => self.net.connect(c, sk),
            860..=879 if up => self.toggle_partition(c, sk),
            880..=889 if !self.net.down[sk] => {
                let unsynced = self.net.acceptors[sk].wal().write_lsn() - self.net.acceptors[sk].wal().flush_lsn();
                let keep = self.rng.gen_range(0..=unsynced as usize);
                self.net.crash_safekeeper(sk, keep);
                self.acceptor_commit[sk] = Lsn::INVALID;
            }
            890..=909 if self.net.down[sk] => self.net.restart_safekeeper(sk),
            910..=939 => self.net.advance_time(self.rng.gen_range(10..250)),
            940..=979 => self.postgres_writes_more(),
            980..=999 if self.net.computes.len() < MAX_COMPUTES_PER_SEED => {
                let current = self.net.computes.len() - 1;
                if self.rng.gen_bool(0.5) {
                    self.net.kill(current);
                }
                self.start_compute();
            }
            _ => {}
        }
    }

    /// Stall one direction of a link, or heal it.
    fn toggle_partition(&mut self, c: usize, sk: usize) {
        let link = &mut self.net.computes[c].links[sk];
        if self.rng.gen_bool(0.5) {
            link.blocked_to_acceptor = !link.blocked_to_acceptor;
        } else {
            link.blocked_to_proposer = !link.blocked_to_proposer;
        }
    }

    fn postgres_writes_more(&mut self) {
        let ends = &self.postgres.record_ends;
        let next = ends.partition_point(|&end| end <= self.postgres.flush_lsn());
        let Some(&lsn) = ends.get((next + self.rng.gen_range(0..20)).min(ends.len() - 1)) else { return };
        self.postgres.set_flush_lsn(lsn);
        for compute in &mut self.net.computes {
            compute.postgres.set_flush_lsn(lsn);
        }
    }

    fn check(&mut self) {
        // Elections seen now happened after everything acknowledged so far.
        let acknowledged_before = self.highest_commit;
        for c in 0..self.net.computes.len() {
            if let Some(error) = &self.net.computes[c].stopped {
                let expected = match error {
                    ProposerError::Fenced { .. } | ProposerError::WalNotWanted => true,
                    // Its startup snapshot of Postgres's flush LSN was passed
                    // by WAL another (older) proposer streamed meanwhile: the
                    // shim exits and its restart succeeds. Real data loss
                    // (Postgres really behind) is not excused.
                    ProposerError::PostgresBehind { term_start_lsn, .. } => {
                        self.postgres.flush_lsn() >= *term_start_lsn
                    }
                    _ => false,
                };
                assert!(expected, "compute {c} stopped: {error}");
            }
            let commit = self.net.commit_lsn(c);
            assert!(commit >= self.last_commit[c], "compute {c}: commit went back to {commit}");
            self.last_commit[c] = commit;
            if commit > self.highest_commit {
                self.highest_commit = commit;
                self.net.check_commit_on_majority(&self.postgres, commit).unwrap();
            }
            if let Some(term) = self.net.elected_term(c) {
                let first = *self.elected.entry(term).or_insert_with(|| {
                    let start = self.net.computes[c].proposer.status().term_start_lsn.expect("elected");
                    assert!(
                        start >= acknowledged_before,
                        "compute {c}'s term {term} starts at {start}, below the acknowledged commit {acknowledged_before}; \
                         safekeepers: {}",
                        self.net.describe_acceptors()
                    );
                    c
                });
                assert_eq!(first, c, "two proposers elected in term {term}");
            }
        }
        self.net.check_commit_on_majority(&self.postgres, self.highest_commit).unwrap();
        self.check_safekeepers();
    }

    /// Each safekeeper: its committed WAL is Postgres's, its commit LSN
    /// does not go back (in memory while it runs; in its control file ever).
    fn check_safekeepers(&mut self) {
        for sk in 0..SAFEKEEPERS {
            let timeline = &self.net.acceptors[sk];
            let commit = timeline.acceptor().commit_lsn();
            assert!(commit >= self.acceptor_commit[sk], "safekeeper {sk}: commit went back to {commit}");
            self.acceptor_commit[sk] = commit;
            let persisted = timeline.control().persisted.as_ref().map_or(Lsn::INVALID, |state| state.commit_lsn);
            assert!(
                persisted >= self.persisted_commit[sk],
                "safekeeper {sk}: persisted commit went back to {persisted}"
            );
            self.persisted_commit[sk] = persisted;
            if commit > TIMELINE_START {
                let held = &self.net.durable_wal(sk)[..(commit - TIMELINE_START) as usize];
                assert!(held == self.postgres.bytes(TIMELINE_START, commit), "safekeeper {sk}: committed bytes differ");
            }
        }
    }

    fn heal_and_check_liveness(mut self) {
        for c in 0..self.net.computes.len() {
            self.net.kill(c);
        }
        for sk in 0..SAFEKEEPERS {
            self.net.restart_safekeeper(sk);
        }
        assert!(self.net.holders(&self.postgres, self.highest_commit) > SAFEKEEPERS / 2);
        let c = self.net.computes.len();
        self.net.start_compute(self.postgres.clone());
        self.last_commit.push(Lsn::INVALID);
        self.net.connect_all(c);
        // Checked round by round, so the new election is seen as it happens.
        for _ in 0..MAX_HEAL_ROUNDS {
            if !self.net.round() {
                break;
            }
            self.check();
        }
        self.check();
        let status = self.net.computes[c].proposer.status();
        assert_eq!(
            self.net.commit_lsn(c),
            self.postgres.flush_lsn(),
            "a healed cluster commits everything: {status:?} stopped {:?}",
            self.net.computes[c].stopped
        );
        assert_eq!(self.net.holders(&self.postgres, self.postgres.flush_lsn()), SAFEKEEPERS);
    }
}
