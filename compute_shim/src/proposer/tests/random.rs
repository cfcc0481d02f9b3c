//! A seeded, deterministic simulation: random message interleavings across
//! links, dropped connections, one-way partitions (a direction stalls until
//! it heals or the connection drops), safekeeper crashes (unsynced WAL lost
//! but for a random prefix) and restarts, peer recovery (a safekeeper no
//! proposer is connected to copies committed WAL from another through
//! `append_peer_wal`), Postgres writing more, proposer
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
//!   its commit: it would refuse the message, which fails the run);
//! - (the harness, at every message a safekeeper handles) no term is won by
//!   a shim whose Postgres timeline is below one a quorum's log was on.
//!
//! With promotions (`promotions_keep_commits_safe`), a failover at random:
//! every shim dies, a sync makes the log final, a standby is promoted at
//! the synced LSN onto a new Postgres timeline and its shim starts; an older
//! primary may come back, and the healed cluster tries the oldest first.
//!
//! At the end every fault heals and a fresh proposer with every safekeeper
//! connected must commit all of Postgres's WAL (liveness).
//!
//! Liveness while faults last is [`super::liveness`]'s: with a healthy
//! majority, commits advance within a bound at every step, whatever the
//! minority does. It drives this [`Simulation`] and its checks.
//!
//! With membership changes (`membership_changes_keep_commits_safe`), five
//! safekeepers, shims started with the first three, and random requests
//! for sets of three to five: quorums are then those of each committing
//! proposer's configuration, checked when it acknowledges a commit, and
//! the election check covers every configuration.
//!
//! A search biased to Raft's figure 8 (`run_minority_terms`) must find the
//! lost commit when the commit rule is broken on purpose, and nothing with
//! the real rule.
//!
//! `SIM_SEEDS=N` runs N seeds (default [`DEFAULT_SEEDS`], and
//! [`MEMBERSHIP_DEFAULT_SEEDS`] of the longer membership runs); `SIM_SEED=S` runs
//! seed S alone. A failure prints its seed and the command that replays it.

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

use postgres_wal::lsn::Lsn;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use safekeeper_core::storage::WalStorage;
use safekeeper_protocol::ids::Term;
use safekeeper_protocol::membership::{Configuration, Member};

use super::harness::{acceptor_index, addr, Net, Postgres, HEARTBEAT_INTERVAL_MS, TIMELINE_START};
use crate::proposer::{PeerState, ProposerError};

pub const DEFAULT_SEEDS: u64 = 1_000;
/// A membership run is 1,000 steps over five safekeepers (about 80 ms).
pub const MEMBERSHIP_DEFAULT_SEEDS: u64 = 250;
const STEPS_PER_SEED: usize = 400;
const SAFEKEEPERS: usize = 3;
/// Safekeepers of the membership runs; shims start naming the first three.
const MEMBERSHIP_SAFEKEEPERS: usize = 5;
/// Chance per step that the latest shim is asked for another set.
const MEMBERSHIP_REQUEST_PER_MILLE: u32 = 10;
const MEMBERSHIP_STEPS_PER_SEED: usize = 1_000;
/// Rounds run after a membership request, at most.
const MEMBERSHIP_MAX_ROUNDS: usize = 40;
const MAX_COMPUTES_PER_SEED: usize = 6;
/// Seeds of `promotions_keep_commits_safe` by default.
const PROMOTION_DEFAULT_SEEDS: u64 = 300;
/// Chance per step of a failover in the promotion runs, and their most.
const PROMOTION_PER_MILLE: u32 = 8;
const MAX_PROMOTIONS_PER_SEED: usize = 2;
/// Heartbeat intervals a failover's sync gets.
const SYNC_HEARTBEATS: usize = 20;
/// Rounds a promoted server's shim gets before an older primary may return.
const FAILOVER_MAX_ROUNDS: usize = 40;
/// Records the promoted server writes on its new timeline.
const PROMOTED_RECORDS: usize = 150;
/// Rounds a two-voter election gets in a minority-term step.
const MINORITY_ELECTION_ROUNDS: usize = 50;
/// Minority terms in one seed of the figure-8 search.
const FIGURE_8_MINORITY_TERMS: usize = 6;
/// Rounds a short-lived minority term runs before it dies.
const SHORT_TERM_MAX_ROUNDS: usize = 12;
/// Seeds the search for the broken commit rule may take (it finds one
/// well within this; see `random_search_finds_a_broken_commit_rule`).
const BROKEN_RULE_SEARCH_SEEDS: u64 = 5_000;
/// Rounds the healed cluster gets to go quiet (it needs far fewer).
const MAX_HEAL_ROUNDS: usize = 100_000;

/// Seeds found failing once, replayed first in every run.
/// 2743: an acknowledgement owed to a dropped connection reached the next
/// one (a harness bug: the service sends it nowhere).
/// 10360: a second proposer's startup snapshot of Postgres's flush LSN was
/// passed by the first one's streaming (it refuses to lead and exits; see
/// `check`).
const REGRESSION_SEEDS: &[u64] = &[2743, 10360];

/// One Postgres primary (its shim restarts, two shims may overlap).
#[test]
fn random_failures_keep_commits_safe() {
    simulate("random_failures_keep_commits_safe", &[Postgres::generate(380, 99)], REGRESSION_SEEDS);
}

/// Two primaries whose WAL diverges at a fork point (a restored and
/// promoted primary while the old one's uncommitted tail sits on a
/// safekeeper). Seed 1634 found the hole the log check closes
/// (docs/proposer.md, "Checking Postgres against the log"): safekeepers
/// caught up from a primary whose WAL differed from the donor's log below
/// the term start, after which no primary could lead.
#[test]
fn two_primaries_keep_commits_safe() {
    let (_, lineages) = Postgres::branches(150, 230, &[99, 77]);
    simulate("two_primaries_keep_commits_safe", &lineages, &[1634]);
}

/// The simulation bites: with the commit rule's term-start floor removed
/// (Raft's figure 8 becomes possible), random search over the two-primary
/// runs, biased towards short minority terms, must find a violation of the
/// committed-WAL invariants.
#[test]
fn random_search_finds_a_broken_commit_rule() {
    let (_, lineages) = Postgres::branches(150, 230, &[99, 77]);
    let caught = first_failing_seed(0..BROKEN_RULE_SEARCH_SEEDS, |seed| {
        let mut simulation = Simulation::new(seed, &lineages);
        simulation.break_commit_rule = true;
        simulation.figure_8_bias = true;
        simulation.run_minority_terms()
    });
    let Some((seed, message)) = caught else {
        panic!("{BROKEN_RULE_SEARCH_SEEDS} seeds did not catch the broken commit rule")
    };
    // A lost commit shows as committed WAL off a majority or changed,
    // or as a safekeeper refusing to truncate below its commit LSN.
    let lost_commit =
        ["no longer on a majority", "no majority holds", "changed WAL committed before", "refusing to truncate"];
    assert!(
        lost_commit.iter().any(|symptom| message.contains(symptom)),
        "seed {seed} failed, but not on the committed WAL: {message}"
    );
    eprintln!("the broken commit rule was caught at seed {seed} (the panic above)");
}

/// The first of `seeds` whose `run` panics, with the panic's message: a
/// search that shows a check bites on a proposer broken on purpose.
pub(super) fn first_failing_seed(seeds: impl IntoIterator<Item = u64>, run: impl Fn(u64)) -> Option<(u64, String)> {
    seeds.into_iter().find_map(|seed| {
        let panic = catch_unwind(AssertUnwindSafe(|| run(seed))).err()?;
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
            .unwrap_or_default();
        Some((seed, message))
    })
}

/// Failovers at random: every shim dies with the primary's machine, a
/// sync makes the log final, a standby promoted at the synced LSN onto a
/// new Postgres timeline gets a shim; later restarts may bring back an
/// older timeline's primary, which must never lead again once a quorum's
/// log went on without it (the harness checks it at every message).
#[test]
fn promotions_keep_commits_safe() {
    let postgres = [Postgres::generate(380, 97)];
    let seeds = seeds_to_run(&[], PROMOTION_DEFAULT_SEEDS);
    let count = seeds.len();
    simulate_seeds("promotions_keep_commits_safe", &postgres, seeds, |mut simulation| {
        simulation.promotions = true;
        simulation.run()
    });
    // The runs must get somewhere: promoted timelines that a quorum's log
    // went on to, and older primaries refused afterwards.
    let [took_over, superseded] = [&SEEDS_WHERE_A_PROMOTION_TOOK_OVER, &SEEDS_WITH_A_SUPERSEDED_SHIM]
        .map(|counter| counter.load(Ordering::Relaxed) as usize);
    eprintln!("of {count} promotion runs: {took_over} went on to a promoted timeline, {superseded} superseded a shim");
    if count >= 100 {
        assert!(took_over * 4 > count, "only {took_over} of {count} runs went on to a promoted timeline");
        assert!(superseded * 10 > count, "only {superseded} of {count} runs superseded an old primary's shim");
    }
}

/// Promotion runs in which a quorum's log went on to a promoted timeline,
/// and in which an older timeline's shim stopped as superseded.
static SEEDS_WHERE_A_PROMOTION_TOOK_OVER: AtomicU64 = AtomicU64::new(0);
static SEEDS_WITH_A_SUPERSEDED_SHIM: AtomicU64 = AtomicU64::new(0);

/// The figure-8 search's runs with the real commit rule: no violation.
#[test]
fn minority_terms_keep_commits_safe() {
    let (_, lineages) = Postgres::branches(150, 230, &[99, 77]);
    simulate_with("minority_terms_keep_commits_safe", &lineages, &[], |mut simulation| {
        simulation.figure_8_bias = true;
        simulation.run_minority_terms()
    });
}

/// Random safekeeper sets requested while everything else fails at random.
#[test]
fn membership_changes_keep_commits_safe() {
    let postgres = [Postgres::generate(380, 98)];
    let seeds = seeds_to_run(&[], MEMBERSHIP_DEFAULT_SEEDS);
    let count = seeds.len();
    simulate_seeds("membership_changes_keep_commits_safe", &postgres, seeds, |mut simulation| {
        simulation.enable_membership_changes();
        simulation.run()
    });
    // The runs must get somewhere: most seeds end in a configuration that
    // some change completed (generation 2 or more), measured 77% at first.
    let changed = SEEDS_WITH_A_COMPLETED_CHANGE.load(Ordering::Relaxed) as usize;
    eprintln!("{changed} of {count} membership runs ended after a completed change");
    if count >= 100 {
        assert!(changed * 2 > count, "only {changed} of {count} runs completed a change");
    }
}

/// Membership runs whose healed cluster counts in a configuration some
/// change completed (only `membership_changes_keep_commits_safe` counts).
static SEEDS_WITH_A_COMPLETED_CHANGE: AtomicU64 = AtomicU64::new(0);

fn simulate(test_name: &str, lineages: &[Postgres], regression_seeds: &[u64]) {
    simulate_with(test_name, lineages, regression_seeds, Simulation::run);
}

fn simulate_with(test_name: &str, lineages: &[Postgres], regression_seeds: &[u64], run: impl Fn(Simulation)) {
    simulate_seeds(test_name, lineages, seeds_to_run(regression_seeds, DEFAULT_SEEDS), run);
}

pub(super) fn simulate_seeds(test_name: &str, lineages: &[Postgres], seeds: Vec<u64>, run: impl Fn(Simulation)) {
    for seed in seeds {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(Simulation::new(seed, lineages)))) {
            eprintln!(
                "simulation failed with seed {seed}; replay it alone with:\n  \
                 SIM_SEED={seed} cargo test -p compute_shim --lib {test_name} -- --nocapture --include-ignored"
            );
            resume_unwind(panic);
        }
    }
}

/// `SIM_SEED` alone, else the regression seeds and `0..SIM_SEEDS`.
pub(super) fn seeds_to_run(regression_seeds: &[u64], default_count: u64) -> Vec<u64> {
    let from_env = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|text| text.parse::<u64>().unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
    };
    if let Some(seed) = from_env("SIM_SEED") {
        return vec![seed];
    }
    let count = from_env("SIM_SEEDS").unwrap_or(default_count);
    regression_seeds.iter().copied().chain(0..count).collect()
}

pub(super) struct Simulation {
    pub(super) rng: StdRng,
    pub(super) net: Net,
    /// Postgres primaries sharing WAL up to a fork point, then each writing
    /// its own: a failover, or two primaries restored from one backup.
    pub(super) lineages: Vec<Postgres>,
    /// The lineage each compute streams.
    lineage_of: Vec<usize>,
    /// The committed WAL as first acknowledged: it must never change.
    committed: Vec<u8>,
    /// Commit each compute last reported.
    last_commit: Vec<Lsn>,
    highest_commit: Lsn,
    elected: HashMap<Term, usize>,
    /// For every term a safekeeper has reached: the highest commit
    /// acknowledged before any vote for it was granted. Its term must start
    /// at or after it (votes describe the logs at grant time, so a vote
    /// delivered late does not make later commits "before the election").
    committed_before_votes: HashMap<Term, Lsn>,
    highest_term_seen: Term,
    /// Each safekeeper's commit LSN as last seen, in memory and persisted.
    acceptor_commit: Vec<Lsn>,
    persisted_commit: Vec<Lsn>,
    /// Every proposer counts flushes below its term start (tests only).
    break_commit_rule: bool,
    /// The search for figure 8: lineages switch more often.
    figure_8_bias: bool,
    safekeepers: usize,
    /// What every shim's `--safekeepers` names.
    initial_set: Vec<usize>,
    /// Random membership requests; quorums are the configurations'.
    membership_changes: bool,
    /// Each compute's configuration at the previous check.
    configuration_seen: Vec<Option<Configuration>>,
    /// Random failovers with promotions (`promotions_keep_commits_safe`).
    promotions: bool,
    promotions_done: usize,
}

impl Simulation {
    pub(super) fn new(seed: u64, lineages: &[Postgres]) -> Simulation {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut lineages = lineages.to_vec();
        // Within the shared prefix, so every lineage can start there.
        let initial = lineages[0].record_ends[rng.gen_range(0..lineages[0].record_ends.len() / 3)];
        lineages.iter_mut().for_each(|postgres| postgres.set_flush_lsn(initial));
        let mut net = Net::new(SAFEKEEPERS);
        net.max_in_flight_bytes = [128 << 10, 300 << 10][rng.gen_range(0..2)];
        net.max_buffered_wal_bytes = [256 << 10, 4 << 20][rng.gen_range(0..2)];
        Simulation {
            rng,
            net,
            lineages,
            lineage_of: vec![],
            committed: vec![],
            last_commit: vec![],
            highest_commit: Lsn::INVALID,
            elected: HashMap::new(),
            committed_before_votes: HashMap::new(),
            highest_term_seen: Term(0),
            acceptor_commit: vec![Lsn::INVALID; SAFEKEEPERS],
            persisted_commit: vec![Lsn::INVALID; SAFEKEEPERS],
            break_commit_rule: false,
            figure_8_bias: false,
            safekeepers: SAFEKEEPERS,
            initial_set: (0..SAFEKEEPERS).collect(),
            membership_changes: false,
            configuration_seen: vec![],
            promotions: false,
            promotions_done: 0,
        }
    }

    /// Five safekeepers, shims naming the first three, random requests.
    fn enable_membership_changes(&mut self) {
        let count = MEMBERSHIP_SAFEKEEPERS;
        let mut net = Net::new(count);
        net.max_in_flight_bytes = self.net.max_in_flight_bytes;
        net.max_buffered_wal_bytes = self.net.max_buffered_wal_bytes;
        self.net = net;
        self.safekeepers = count;
        self.acceptor_commit = vec![Lsn::INVALID; count];
        self.persisted_commit = vec![Lsn::INVALID; count];
        self.membership_changes = true;
    }

    /// The latest shim is asked for a random set of three to five.
    fn request_membership(&mut self) {
        let c = self.net.computes.len() - 1;
        let mut set: Vec<usize> = (0..self.safekeepers).collect();
        set.shuffle(&mut self.rng);
        set.truncate(self.rng.gen_range(3..=self.safekeepers));
        let target = set.into_iter().map(addr).collect();
        // A conflict with a change under way is an answer, not a failure.
        let _ = self.net.computes[c].node.handle_membership_request(self.net.now_ms, target);
        // The driver connects to the new members at once.
        if self.net.is_running(c) {
            let up: Vec<usize> = (0..self.safekeepers).filter(|&sk| !self.net.down[sk]).collect();
            for sk in up {
                if !self.net.computes[c].links[sk].up {
                    self.net.connect(c, sk);
                }
            }
        }
        // Some rounds, so that changes get somewhere before the next fault.
        for _ in 0..self.rng.gen_range(0..MEMBERSHIP_MAX_ROUNDS) {
            self.net.round();
            self.check();
        }
    }
    fn run(mut self) {
        self.start_compute();
        // Five safekeepers spread the same random steps thinner.
        let steps = if self.membership_changes { MEMBERSHIP_STEPS_PER_SEED } else { STEPS_PER_SEED };
        for _ in 0..steps {
            self.random_step();
            self.check();
        }
        self.heal_and_check_liveness();
    }

    /// The shape of Raft's figure 8: the current proposer dies, a new one
    /// is elected by exactly two safekeepers and either loses one of them
    /// right away, leaving its term's WAL on one safekeeper only, or runs a
    /// few rounds with both and dies (so a lagging voter holds part of the
    /// donor's older-term WAL: figure 8's step c).
    fn minority_term(&mut self) {
        let current = self.net.computes.len() - 1;
        self.net.kill(current);
        let up: Vec<usize> = (0..self.safekeepers).filter(|&sk| !self.net.down[sk]).collect();
        if up.len() < 2 {
            return self.start_compute();
        }
        let first = up[self.rng.gen_range(0..up.len())];
        let second = loop {
            let sk = up[self.rng.gen_range(0..up.len())];
            if sk != first {
                break sk;
            }
        };
        let c = self.start_compute_connected(&[first, second]);
        for _ in 0..MINORITY_ELECTION_ROUNDS {
            if self.net.elected_term(c).is_some() || !self.net.is_running(c) {
                break;
            }
            self.net.round();
            self.check();
        }
        if !self.net.is_running(c) {
            return;
        }
        if self.rng.gen_bool(0.5) {
            let lost = if self.rng.gen_bool(0.5) { first } else { second };
            self.net.disconnect(c, lost);
        } else {
            for _ in 0..self.rng.gen_range(0..SHORT_TERM_MAX_ROUNDS) {
                self.net.round();
                self.check();
            }
            self.net.kill(c);
        }
    }

    fn start_compute(&mut self) {
        let connected: Vec<usize> =
            (0..self.safekeepers).filter(|&sk| !self.net.down[sk] && self.rng.gen_bool(0.8)).collect();
        self.start_compute_connected(&connected);
    }

    /// A new proposer connected to `safekeepers`; returns its index.
    pub(super) fn start_compute_connected(&mut self, safekeepers: &[usize]) -> usize {
        // Mostly the same primary's shim restarting; sometimes another one.
        let switch_probability = if self.figure_8_bias { 0.6 } else { 0.3 };
        let lineage = match self.lineage_of.last() {
            Some(&previous) if self.rng.gen_bool(switch_probability) => (previous + 1) % self.lineages.len(),
            Some(&previous) => previous,
            None => 0,
        };
        self.lineage_of.push(lineage);
        let c = self.net.start_compute_with(self.lineages[lineage].clone(), &self.initial_set);
        if self.break_commit_rule {
            self.net.computes[c].node.break_commit_rule_for_tests();
        }
        self.net.computes[c].wal_piece_bytes = self.rng.gen_range(1_000..140_000);
        self.last_commit.push(Lsn::INVALID);
        for &sk in safekeepers {
            self.net.connect(c, sk);
        }
        c
    }

    /// The figure-8 search: a first proposer commits on all three, then a
    /// run of minority terms on random pairs and lineages, each followed by
    /// a few rounds, with Postgres writing more in between.
    fn run_minority_terms(mut self) {
        self.start_compute();
        for _ in 0..FIGURE_8_MINORITY_TERMS {
            for _ in 0..self.rng.gen_range(0..3) {
                self.postgres_writes_more();
            }
            self.minority_term();
            for _ in 0..self.rng.gen_range(0..SHORT_TERM_MAX_ROUNDS) {
                self.net.round();
                self.check();
            }
        }
        self.heal_and_check_liveness();
    }

    fn random_step(&mut self) {
        if self.membership_changes && self.rng.gen_ratio(MEMBERSHIP_REQUEST_PER_MILLE, 1000) {
            return self.request_membership();
        }
        if self.promotions
            && self.promotions_done < MAX_PROMOTIONS_PER_SEED
            && self.rng.gen_ratio(PROMOTION_PER_MILLE, 1000)
        {
            return self.failover();
        }
        let c = self.rng.gen_range(0..self.net.computes.len());
        let sk = self.rng.gen_range(0..self.safekeepers);
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
            880..=886 if !self.net.down[sk] => self.crash_safekeeper(sk),
            887..=889 => self.peer_recovery(),
            890..=909 if self.net.down[sk] => self.net.restart_safekeeper(sk),
            910..=939 => self.net.advance_time(self.rng.gen_range(10..250)),
            940..=979 => self.postgres_writes_more(),
            980..=989 if self.net.computes.len() < MAX_COMPUTES_PER_SEED => {
                let current = self.net.computes.len() - 1;
                if self.rng.gen_bool(0.5) {
                    self.net.kill(current);
                }
                self.start_compute();
            }
            990..=999 if self.net.computes.len() < MAX_COMPUTES_PER_SEED => self.minority_term(),
            _ => {}
        }
    }

    /// The primary's machine dies (every shim with it); a sync over the
    /// safekeepers that are up makes the log final; a standby fed by them
    /// is promoted at the synced LSN onto a timeline above every one known
    /// and its shim starts. Nothing happens past the sync without a quorum.
    fn failover(&mut self) {
        (0..self.net.computes.len()).for_each(|c| self.net.kill(c));
        let up: Vec<usize> = (0..self.safekeepers).filter(|&sk| !self.net.down[sk]).collect();
        if up.len() <= self.safekeepers / 2 {
            return;
        }
        let lineage = *self.lineage_of.last().expect("a compute ran");
        let s = self.net.start_sync(self.lineages[lineage].clone());
        self.lineage_of.push(lineage);
        self.last_commit.push(Lsn::INVALID);
        up.iter().for_each(|&sk| self.net.connect(s, sk));
        for _ in 0..SYNC_HEARTBEATS {
            for _ in 0..MAX_HEAL_ROUNDS {
                if !self.net.round() {
                    break;
                }
                self.check();
            }
            if self.net.computes[s].node.proposer().synced_lsn().is_some() || !self.net.is_running(s) {
                break;
            }
            self.net.advance_time(HEARTBEAT_INTERVAL_MS);
        }
        let synced = self.net.computes[s].node.proposer().synced_lsn();
        self.net.kill(s);
        // A log holding no record yet gives a standby nothing to replay
        // (and see `an_empty_log_takes_a_switch_at_the_timeline_start`).
        let Some(synced) = synced.filter(|&synced| synced > TIMELINE_START) else { return };
        let holder = up
            .iter()
            .copied()
            .find(|&sk| self.net.acceptors[sk].acceptor().commit_lsn() == synced)
            .expect("the sync told a quorum");
        let log = self.net.durable_wal(holder)[..(synced - TIMELINE_START) as usize].to_vec();
        let log_timelines = self.net.acceptors[holder].acceptor().state().pg_timelines.clone();
        let newest = self.lineages.iter().map(|postgres| postgres.timeline()).max().expect("lineages");
        let seed = self.rng.gen();
        let mut promoted = Postgres::promoted(&log, &log_timelines, newest + 1, PROMOTED_RECORDS, seed);
        let ends = &promoted.record_ends;
        let first_new = ends.partition_point(|&end| end <= synced);
        let flush = ends[(first_new + self.rng.gen_range(0..20)).min(ends.len() - 1)];
        promoted.set_flush_lsn(flush);
        self.lineages.push(promoted);
        self.promotions_done += 1;
        // The promoted server's shim, given some rounds to take over; then,
        // sometimes, an older primary comes back (its machine rebooted).
        self.start_lineage_shim(self.lineages.len() - 1, &up);
        for _ in 0..self.rng.gen_range(0..FAILOVER_MAX_ROUNDS) {
            self.net.round();
            self.check();
        }
        if self.rng.gen_bool(0.5) {
            let older = self.rng.gen_range(0..self.lineages.len() - 1);
            let up: Vec<usize> = (0..self.safekeepers).filter(|&sk| !self.net.down[sk]).collect();
            self.start_lineage_shim(older, &up);
        }
    }

    /// A shim for `lineage`'s primary, connected to most of `safekeepers`.
    fn start_lineage_shim(&mut self, lineage: usize, safekeepers: &[usize]) {
        self.lineage_of.push(lineage);
        let c = self.net.start_compute_with(self.lineages[lineage].clone(), &self.initial_set);
        self.net.computes[c].wal_piece_bytes = self.rng.gen_range(1_000..140_000);
        self.last_commit.push(Lsn::INVALID);
        for &sk in safekeepers {
            if self.rng.gen_bool(0.8) {
                self.net.connect(c, sk);
            }
        }
    }

    /// The most lagging safekeeper copies from the one with the highest
    /// commit LSN, as the service's peer recovery picks its source.
    fn peer_recovery(&mut self) {
        let acceptor = |sk: usize| self.net.acceptors[sk].acceptor();
        let lagging = (0..self.safekeepers).min_by_key(|&sk| acceptor(sk).write_lsn()).expect("safekeepers");
        let source = (0..self.safekeepers).max_by_key(|&sk| acceptor(sk).commit_lsn()).expect("safekeepers");
        self.net.copy_from_peer(lagging, source);
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

    /// Safekeeper `sk`'s process dies, keeping a random prefix of the WAL
    /// it had not synced; it stays down until restarted.
    pub(super) fn crash_safekeeper(&mut self, sk: usize) {
        let unsynced = self.net.acceptors[sk].wal().write_lsn() - self.net.acceptors[sk].wal().flush_lsn();
        let keep = self.rng.gen_range(0..=unsynced as usize);
        self.net.crash_safekeeper(sk, keep);
        self.acceptor_commit[sk] = Lsn::INVALID;
    }

    fn postgres_writes_more(&mut self) {
        let lineage = self.rng.gen_range(0..self.lineages.len());
        let more_records = self.rng.gen_range(0..20);
        self.postgres_writes(lineage, more_records);
    }

    /// `lineage`'s primary writes `more_records + 1` records (fewer at the
    /// end of its WAL), and its shims' Postgres with it.
    pub(super) fn postgres_writes(&mut self, lineage: usize, more_records: usize) {
        let postgres = &mut self.lineages[lineage];
        let ends = &postgres.record_ends;
        let next = ends.partition_point(|&end| end <= postgres.flush_lsn());
        let Some(&lsn) = ends.get((next + more_records).min(ends.len() - 1)) else { return };
        postgres.set_flush_lsn(lsn);
        for (c, compute) in self.net.computes.iter_mut().enumerate() {
            if self.lineage_of[c] == lineage {
                compute.postgres.set_flush_lsn(lsn);
            }
        }
    }

    pub(super) fn check(&mut self) {
        // Votes granted in the last step came after everything acknowledged
        // by the previous check (a vote for a term moves an acceptor to it).
        let highest_term =
            (0..self.safekeepers).map(|sk| self.net.acceptors[sk].acceptor().term()).max().expect("safekeepers");
        for term in self.highest_term_seen.0 + 1..=highest_term.0 {
            self.committed_before_votes.insert(Term(term), self.highest_commit);
        }
        self.highest_term_seen = self.highest_term_seen.max(highest_term);
        for c in 0..self.net.computes.len() {
            if let Some(error) = &self.net.computes[c].stopped {
                let expected = match error {
                    ProposerError::Fenced { .. } | ProposerError::WalNotWanted => true,
                    // Refusing to lead is right when its primary is another
                    // lineage, or its startup snapshot of the flush LSN was
                    // passed by WAL an older proposer streamed meanwhile (the
                    // shim exits; its restart succeeds). Safety is judged by
                    // the committed WAL, not by who may lead.
                    ProposerError::PostgresBehind { .. } => true,
                    // Only another lineage's WAL may differ from the log.
                    ProposerError::PostgresDiverged { .. } => self.lineages.len() > 1,
                    // The only safekeeper holding the log to the term start
                    // stayed away: the shim exits to be elected anew.
                    ProposerError::NoLogHolder { .. } => true,
                    // An older timeline's primary after a failover, seen
                    // by a safekeeper on a newer one.
                    ProposerError::Superseded { timeline, current, .. } => {
                        let newest = (0..self.safekeepers)
                            .map(|sk| self.net.acceptors[sk].acceptor().state().pg_timelines.current)
                            .max()
                            .expect("safekeepers");
                        timeline < current && *current <= newest
                    }
                    // A promoted server whose log went on on the old
                    // timeline before it took over (an old primary's shim
                    // led meanwhile) cannot continue it.
                    ProposerError::PromotedBelowLogEnd { .. } => self.lineages.len() > 1,
                    // A failover before any WAL reached a safekeeper.
                    ProposerError::NothingToSync => self.net.computes[c].reads_donor,
                    _ => false,
                };
                assert!(expected, "compute {c} stopped: {error}");
            }
            let commit = self.net.commit_lsn(c);
            assert!(commit >= self.last_commit[c], "compute {c}: commit went back to {commit}");
            self.last_commit[c] = commit;
            if commit > self.highest_commit {
                self.highest_commit = commit;
                self.record_committed(c, commit);
            }
            if self.membership_changes {
                let configuration = self.configuration_of(c);
                if self.configuration_seen.len() <= c {
                    self.configuration_seen.resize(c + 1, None);
                }
                self.configuration_seen[c] = Some(configuration);
            }
            if let Some(term) = self.net.elected_term(c) {
                let first = *self.elected.entry(term).or_insert_with(|| {
                    let start = self.net.computes[c].node.proposer().status().term_start_lsn.expect("elected");
                    let acknowledged_before = self.committed_before_votes[&term];
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
        // Compared once: a holder of all of it holds its own committed part.
        let holds_committed: Vec<bool> =
            (0..self.safekeepers).map(|sk| self.net.durable_wal(sk).starts_with(&self.committed)).collect();
        let holders = holds_committed.iter().filter(|&&holds| holds).count();
        // With membership changes, "a majority" is each committing
        // proposer's configuration's, checked in `record_committed`.
        assert!(
            self.membership_changes || holders > SAFEKEEPERS / 2,
            "the committed WAL up to {} is no longer on a majority ({holders} hold it); {}",
            self.highest_commit,
            self.net.describe_acceptors()
        );
        self.check_safekeepers(&holds_committed);
    }

    /// Compute `c` reported `commit`, the highest so far: a majority must
    /// hold the same bytes up to it, and they extend the committed WAL.
    fn record_committed(&mut self, c: usize, commit: Lsn) {
        if self.membership_changes {
            return self.record_committed_in_configuration(c, commit);
        }
        let len = (commit - TIMELINE_START) as usize;
        let prefixes: Vec<&[u8]> = (0..SAFEKEEPERS)
            .map(|sk| self.net.durable_wal(sk))
            .filter(|wal| wal.len() >= len)
            .map(|wal| &wal[..len])
            .collect();
        let majority = prefixes
            .iter()
            .find(|candidate| prefixes.iter().filter(|other| other == candidate).count() > SAFEKEEPERS / 2)
            .unwrap_or_else(|| {
                panic!(
                    "compute {c} reported commit {commit}, but no majority holds the same bytes up to it; {}",
                    self.net.describe_acceptors()
                )
            });
        assert!(majority.starts_with(&self.committed), "commit {commit} changed WAL committed before");
        let known = self.committed.len();
        self.committed.extend_from_slice(&majority[known..]);
    }

    /// Membership runs (one lineage): compute `c` reported `commit`, so the
    /// safekeepers holding its primary's bytes up to it are a quorum of the
    /// configuration it counts in, and they extend the committed WAL.
    fn record_committed_in_configuration(&mut self, c: usize, commit: Lsn) {
        let postgres = &self.net.computes[c].postgres;
        let wal = postgres.bytes(TIMELINE_START, commit).to_vec();
        assert!(wal.starts_with(&self.committed), "commit {commit} changed WAL committed before");
        // Its configuration may have moved on within the last step (one
        // round can take a change through several phases): the commit was
        // counted in one of those it held since the previous check, which
        // are this one, the previous one, or one it wrote in between (held
        // by some safekeeper now).
        let current = self.configuration_of(c);
        let previous = self.configuration_seen.get(c).cloned().flatten().unwrap_or_else(|| current.clone());
        let between = |configuration: &Configuration| {
            (previous.precedence()..=current.precedence()).contains(&configuration.precedence())
        };
        let candidates: Vec<Configuration> = (0..self.safekeepers)
            .map(|sk| self.net.acceptors[sk].acceptor().state().membership.clone())
            .filter(|configuration| configuration.is_set() && between(configuration))
            .chain([previous.clone(), current.clone()])
            .collect();
        let holds = |member: &Member| self.net.durable_wal(acceptor_index(&member.pg_addr)).starts_with(&wal);
        assert!(
            candidates.iter().any(|configuration| configuration.is_quorum(holds)),
            "compute {c} reported commit {commit}, but no quorum of its configuration {current:?} (or {previous:?}) \
             holds it; {}",
            self.net.describe_acceptors()
        );
        self.committed = wal;
    }

    /// The configuration compute `c` counts quorums in.
    fn configuration_of(&self, c: usize) -> Configuration {
        let status = self.net.computes[c].node.proposer().membership_status();
        Configuration {
            generation: status.generation,
            written_in_term: status.written_in_term,
            members: status.members,
            joint_new: status.joint_new,
        }
    }

    /// Each safekeeper: its committed WAL is Postgres's, its commit LSN
    /// does not go back (in memory while it runs; in its control file ever).
    /// `holds_committed[sk]`: its durable WAL starts with all the committed
    /// WAL (so its own committed part needs no second comparison).
    fn check_safekeepers(&mut self, holds_committed: &[bool]) {
        for (sk, &holds_all) in holds_committed.iter().enumerate() {
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
                let len = (commit - TIMELINE_START) as usize;
                assert!(len <= self.committed.len(), "safekeeper {sk}: commit {commit} beyond any acknowledged");
                if holds_all {
                    continue;
                }
                let held = &self.net.durable_wal(sk)[..len];
                assert!(held == &self.committed[..len], "safekeeper {sk}: committed bytes differ");
            }
        }
    }

    pub(super) fn heal_and_check_liveness(mut self) {
        for c in 0..self.net.computes.len() {
            self.net.kill(c);
        }
        for sk in 0..self.safekeepers {
            self.net.restart_safekeeper(sk);
        }
        assert!(self.membership_changes || self.net.holders_of(&self.committed) > SAFEKEEPERS / 2);
        // The operator starts a primary that has written all its WAL and
        // whose WAL continues the safekeepers' log; the wrong one refuses to
        // lead (or is refused), and then the other one is tried.
        let mut failures = vec![];
        // Oldest first: after failovers, older primaries must be refused.
        for lineage in 0..self.lineages.len() {
            let mut postgres = self.lineages[lineage].clone();
            postgres.set_flush_lsn(*postgres.record_ends.last().expect("records"));
            match self.heal_with(lineage, postgres) {
                Ok(()) => return self.count_promotion_coverage(),
                Err(failure) => failures.push(failure),
            }
        }
        panic!("no primary could lead the healed cluster: {failures:?}");
    }

    fn count_promotion_coverage(&self) {
        if !self.promotions {
            return;
        }
        if self.net.pg_timeline_record.quorum_timeline > 1 {
            SEEDS_WHERE_A_PROMOTION_TOOK_OVER.fetch_add(1, Ordering::Relaxed);
        }
        let superseded = |c: &super::harness::Compute| matches!(c.stopped, Some(ProposerError::Superseded { .. }));
        if self.net.computes.iter().any(superseded) {
            SEEDS_WITH_A_SUPERSEDED_SHIM.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A fresh proposer for `postgres` with every safekeeper connected must
    /// commit all of its WAL, or stop refusing to lead.
    fn heal_with(&mut self, lineage: usize, postgres: Postgres) -> Result<(), String> {
        self.lineage_of.push(lineage);
        let c = self.net.computes.len();
        self.net.start_compute_with(postgres.clone(), &self.initial_set);
        self.last_commit.push(Lsn::INVALID);
        // Checked round by round, so the new election is seen as it happens.
        // Safekeepers a configuration names are connected as the driver
        // would, once the proposer wants them.
        for _ in 0..MAX_HEAL_ROUNDS {
            let connected = self.connect_wanted(c);
            if !self.net.round() && !connected && !self.recover_too_far_behind(c) {
                break;
            }
            self.check();
        }
        self.check();
        let status = self.net.computes[c].node.proposer().status();
        if self.net.commit_lsn(c) == postgres.flush_lsn() {
            let members: Vec<usize> =
                status.safekeepers.iter().filter(|peer| peer.member).map(|peer| acceptor_index(&peer.addr)).collect();
            let holding = members
                .iter()
                .filter(|&&sk| self.net.durable_wal(sk) == postgres.bytes(TIMELINE_START, postgres.flush_lsn()))
                .count();
            assert_eq!(holding, members.len(), "every member holds all the WAL: {status:?}");
            assert!(self.membership_changes || members.len() == SAFEKEEPERS);
            if status.membership.generation.0 >= 2 {
                SEEDS_WITH_A_COMPLETED_CHANGE.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        // It refused to lead, or a safekeeper refused its WAL (another
        // lineage's log): `check` already judged the reason.
        let refused = self.net.computes[c].stopped.is_some() || status.phase != crate::proposer::Phase::Elected;
        assert!(
            refused,
            "a healed cluster commits everything of an elected primary: {status:?}; {}",
            self.net.describe_acceptors()
        );
        self.net.kill(c);
        Err(format!("lineage {lineage}: {status:?} stopped {:?}", self.net.computes[c].stopped))
    }

    /// Peer recovery for the safekeepers compute `c` holds too far behind
    /// (a new member whose WAL Postgres no longer has, say), then the
    /// service's handoff: the safekeeper's node refuses the connection when
    /// it next speaks (its next heartbeat, so time moves on by one
    /// interval), once, and the shim reconnects. Returns whether any was
    /// copied to.
    pub(super) fn recover_too_far_behind(&mut self, c: usize) -> bool {
        let source = (0..self.safekeepers)
            .max_by_key(|&sk| self.net.acceptors[sk].acceptor().commit_lsn())
            .expect("safekeepers");
        let mut copied = false;
        for sk in 0..self.safekeepers {
            if self.net.peer_state(c, sk) == Some(PeerState::TooFarBehind) && self.net.copy_from_peer(sk, source) {
                copied = true;
            }
        }
        if copied {
            self.net.advance_time(HEARTBEAT_INTERVAL_MS);
        }
        copied
    }

    /// Connect compute `c` to every safekeeper it wants but is not
    /// connected to; returns whether it connected any.
    fn connect_wanted(&mut self, c: usize) -> bool {
        let mut connected = false;
        for sk in 0..self.safekeepers {
            if !self.net.computes[c].links[sk].up && self.net.slot(c, sk).is_some() {
                self.net.connect(c, sk);
                connected = true;
            }
        }
        connected
    }
}
