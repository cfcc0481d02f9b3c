//! A seeded simulation: random message interleavings across links, dropped
//! connections, reconnections, Postgres writing more, proposer restarts (the
//! old one killed or left running until fenced). Prints the failing seed.
//!
//! Invariants checked after every step: a proposer's commit never goes back;
//! the highest commit any proposer reported is durable on a quorum (bytes
//! compared whenever it moves); at most one proposer is elected per term.
//! At the end, a fresh proposer with every safekeeper connected commits all
//! of Postgres's WAL (liveness after healing).

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safekeeper::ids::Term;
use safekeeper::lsn::Lsn;

use super::harness::{Net, Postgres};
use crate::proposer::ProposerError;

const SEEDS: u64 = 200;
const STEPS_PER_SEED: usize = 400;
const SAFEKEEPERS: usize = 3;
const MAX_COMPUTES_PER_SEED: usize = 6;

#[test]
fn random_failures_keep_commits_safe() {
    let postgres = Postgres::generate(380, 99);
    for seed in 0..SEEDS {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| Simulation::new(seed, &postgres).run())) {
            eprintln!("random_failures_keep_commits_safe failed with seed {seed}");
            resume_unwind(panic);
        }
    }
}

struct Simulation {
    rng: StdRng,
    net: Net,
    postgres: Postgres,
    /// Commit each compute last reported.
    last_commit: Vec<Lsn>,
    highest_commit: Lsn,
    elected: HashMap<Term, usize>,
}

impl Simulation {
    fn new(seed: u64, postgres: &Postgres) -> Simulation {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut postgres = postgres.clone();
        postgres.set_flush_lsn(postgres.record_ends[rng.gen_range(0..postgres.record_ends.len() / 3)]);
        let mut net = Net::new(SAFEKEEPERS);
        net.max_in_flight_bytes = [128 << 10, 300 << 10][rng.gen_range(0..2)];
        net.max_buffered_wal_bytes = [256 << 10, 4 << 20][rng.gen_range(0..2)];
        Simulation { rng, net, postgres, last_commit: vec![], highest_commit: Lsn::INVALID, elected: HashMap::new() }
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
            if self.rng.gen_bool(0.8) {
                self.net.connect(c, sk);
            }
        }
    }

    fn random_step(&mut self) {
        let c = self.rng.gen_range(0..self.net.computes.len());
        let sk = self.rng.gen_range(0..SAFEKEEPERS);
        let running = self.net.is_running(c);
        match self.rng.gen_range(0..100) {
            0..=29 => drop(self.net.deliver_to_acceptor(c, sk)),
            30..=54 => drop(self.net.deliver_to_proposer(c, sk)),
            55..=64 => drop(self.net.sync(sk)),
            65..=79 => drop(self.net.pump(c)),
            80..=83 if running && self.net.computes[c].links[sk].up => self.net.disconnect(c, sk),
            84..=89 if running && !self.net.computes[c].links[sk].up => self.net.connect(c, sk),
            90..=93 => self.net.advance_time(self.rng.gen_range(10..250)),
            94..=97 => self.postgres_writes_more(),
            98..=99 if self.net.computes.len() < MAX_COMPUTES_PER_SEED => {
                let current = self.net.computes.len() - 1;
                if self.rng.gen_bool(0.5) {
                    self.net.kill(current);
                }
                self.start_compute();
            }
            _ => {}
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
        for c in 0..self.net.computes.len() {
            if let Some(error) = &self.net.computes[c].stopped {
                let expected = matches!(error, ProposerError::Fenced { .. } | ProposerError::WalNotWanted);
                assert!(expected, "compute {c} stopped: {error}");
            }
            let commit = self.net.commit_lsn(c);
            assert!(commit >= self.last_commit[c], "compute {c}: commit went back to {commit}");
            self.last_commit[c] = commit;
            if commit > self.highest_commit {
                self.highest_commit = commit;
                assert!(self.net.holders(&self.postgres, commit) > SAFEKEEPERS / 2, "commit {commit}");
            }
            if let Some(term) = self.net.elected_term(c) {
                let first = *self.elected.entry(term).or_insert(c);
                assert_eq!(first, c, "two proposers elected in term {term}");
            }
        }
        let durable =
            (0..SAFEKEEPERS).filter(|&sk| self.net.acceptors[sk].acceptor().flush_lsn() >= self.highest_commit);
        assert!(durable.count() > SAFEKEEPERS / 2, "commit {} is no longer on a quorum", self.highest_commit);
    }

    fn heal_and_check_liveness(mut self) {
        for c in 0..self.net.computes.len() {
            self.net.kill(c);
        }
        assert!(self.net.holders(&self.postgres, self.highest_commit) > SAFEKEEPERS / 2);
        let c = self.net.computes.len();
        self.net.start_compute(self.postgres.clone());
        self.last_commit.push(Lsn::INVALID);
        self.net.connect_all(c);
        self.net.run_until_quiet();
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
