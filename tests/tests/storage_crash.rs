//! Crash consistency of segment storage, recovery and the control file with
//! real processes: a child (src/bin/storage_crash_child) writes, the test
//! SIGKILLs it at random moments, restarts it, and checks what survived.
//!
//! Rules checked (docs/storage.md):
//! - the recovered end is at or above every flush LSN the child reported;
//! - every byte below it is the generated stream (with the content epochs
//!   started by truncations that returned), so no stale byte survives a
//!   returned truncation and nothing below it is damaged;
//! - after recovery no byte at or above the end is non-zero;
//! - the control file always loads, as the old or the new state.
//!
//! Seeded: set STORAGE_CRASH_SEED to replay a run.

#[path = "../src/bin/storage_crash_child/workload.rs"]
mod workload;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postgres_wal::lsn::{Lsn, SegmentNo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safekeeper_core::storage::control_file::FileControlStore;
use workload::{control_state_for_term, push_epoch, segment_size, Epoch, Workload, SEGMENT_SIZE_BYTES, START_LSN};

const CHILD_BINARY: &str = env!("CARGO_BIN_EXE_storage_crash_child");
const ROUNDS: u32 = 100;
/// A fresh timeline directory every this many rounds (recovery from scratch
/// is covered too, and the WAL kept stays bounded).
const ROUNDS_PER_DIR: u32 = 15;
const LINE_TIMEOUT: Duration = Duration::from_secs(20);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(1);

fn test_seed(name: &str) -> u64 {
    let seed = match std::env::var("STORAGE_CRASH_SEED") {
        Ok(text) => text.parse().expect("STORAGE_CRASH_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    println!("{name}: seed {seed} (replay with STORAGE_CRASH_SEED={seed})");
    seed
}

/// A running child; killed by pid (SIGKILL) when dropped.
struct Child {
    process: std::process::Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Child {
    fn spawn(logs: &Path, incarnation: u64, args: &[String]) -> Child {
        let stdout_path = logs.join(format!("child-{incarnation}.out"));
        let stderr_path = logs.join(format!("child-{incarnation}.err"));
        let process = Command::new(CHILD_BINARY)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(fs::File::create(&stdout_path).unwrap())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn the crash child");
        Child { process, stdout_path, stderr_path }
    }

    /// Complete lines printed so far.
    fn lines(&self) -> Vec<String> {
        let text = fs::read_to_string(&self.stdout_path).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete.lines().map(str::to_owned).collect()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Wait (bounded) until a line starts with `prefix`; the child must not exit.
    fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.starts_with(prefix)) {
                return line;
            }
            if let Some(status) = self.process.try_wait().unwrap() {
                panic!("child exited ({status}) before printing {prefix:?}; stderr:\n{}", self.stderr());
            }
            assert!(Instant::now() < deadline, "child printed no {prefix:?} line within {LINE_TIMEOUT:?}");
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn release(&mut self) {
        let stdin = self.process.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(b"go\n").expect("the child reads stdin");
    }

    /// SIGKILL by pid and wait (bounded); returns everything it printed.
    fn kill(mut self) -> Vec<String> {
        self.kill_and_reap();
        if let Some(error) = self.stderr().lines().find(|l| l.starts_with("Error")) {
            panic!("child failed before the kill: {error}\n{}", self.stderr());
        }
        self.lines()
    }

    fn kill_and_reap(&mut self) {
        let _ = self.process.kill();
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while self.process.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "child {} did not die within {EXIT_TIMEOUT:?}", self.process.id());
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// What the end of WAL may be after the next recovery, given what the
/// killed child reported.
#[derive(Clone, Debug)]
struct Candidate {
    history: Vec<Epoch>,
    min_end: Lsn,
    /// Only `min_end` itself (a truncation that may have taken effect).
    exact: bool,
}

/// Expected bytes of one content history, generated on demand.
struct Expected {
    workload: Workload,
    bytes: Vec<u8>,
    boundaries: Vec<Lsn>,
}

impl Expected {
    fn new(seed: u64, history: &[Epoch]) -> Self {
        Expected { workload: Workload::new(seed, history.to_vec()), bytes: Vec::new(), boundaries: vec![START_LSN] }
    }

    /// Bytes `[START_LSN, end)` if `end` is a record boundary.
    fn upto(&mut self, end: Lsn) -> Option<&[u8]> {
        while self.workload.end_lsn() < end {
            self.workload.append_record();
            self.bytes.extend(self.workload.take_bytes().1);
            self.boundaries.push(self.workload.end_lsn());
        }
        self.boundaries.binary_search(&end).ok()?;
        Some(&self.bytes[..(end - START_LSN) as usize])
    }
}

/// One timeline directory driven by a sequence of child incarnations.
struct WalRun {
    mode: &'static str,
    dir: PathBuf,
    seed: u64,
    history: Vec<Epoch>,
    pending: Option<Epoch>,
    candidates: Vec<Candidate>,
    /// Expected streams by history (a truncation test has a few per run).
    expected: Vec<(Vec<Epoch>, Expected)>,
    stats: RunStats,
}

/// What the kills hit, to show the test exercises what it claims.
#[derive(Clone, Copy, Debug, Default)]
struct RunStats {
    recoveries_checked: u32,
    truncations_completed: u32,
    kills_during_truncation: u32,
    /// Recoveries that ended above the last reported flush (unsynced WAL
    /// that survived in the page cache).
    ends_above_flush: u32,
}

impl RunStats {
    fn add(&mut self, other: RunStats) {
        self.recoveries_checked += other.recoveries_checked;
        self.truncations_completed += other.truncations_completed;
        self.kills_during_truncation += other.kills_during_truncation;
        self.ends_above_flush += other.ends_above_flush;
    }
}

impl WalRun {
    fn new(mode: &'static str, dir: PathBuf, seed: u64) -> Self {
        fs::create_dir_all(&dir).unwrap();
        let candidates = vec![Candidate { history: vec![], min_end: START_LSN, exact: false }];
        WalRun {
            mode,
            dir,
            seed,
            history: vec![],
            pending: None,
            candidates,
            expected: vec![],
            stats: RunStats::default(),
        }
    }

    fn args(&self, incarnation: u64) -> Vec<String> {
        let epochs = |list: &[Epoch]| list.iter().map(|e| e.to_arg()).collect::<Vec<_>>().join(",");
        vec![
            self.mode.to_string(),
            self.dir.display().to_string(),
            self.seed.to_string(),
            incarnation.to_string(),
            epochs(&self.history),
            epochs(self.pending.as_slice()),
        ]
    }

    fn expected(&mut self, history: &[Epoch]) -> &mut Expected {
        let index = match self.expected.iter().position(|(h, _)| h == history) {
            Some(index) => index,
            None => {
                self.expected.push((history.to_vec(), Expected::new(self.seed, history)));
                self.expected.len() - 1
            }
        };
        &mut self.expected[index].1
    }

    /// Check a recovered end (the child is paused or dead: files are still).
    fn check_recovered(&mut self, end: Lsn) {
        let on_disk = read_wal(&self.dir, end);
        let candidates = self.candidates.clone();
        let matching = candidates.iter().find(|c| {
            let in_range = if c.exact { end == c.min_end } else { end >= c.min_end };
            in_range && self.expected(&c.history).upto(end).is_some_and(|bytes| bytes == on_disk.as_slice())
        });
        if matching.is_none() {
            let first_bad = candidates.first().and_then(|c| {
                let expected = self.expected(&c.history).upto(end)?.to_vec();
                expected.iter().zip(&on_disk).position(|(a, b)| a != b).map(|i| START_LSN + i as u64)
            });
            panic!(
                "{}: recovered end {end} matches no allowed outcome {candidates:?}; first differing byte vs the first: {first_bad:?}",
                self.dir.display()
            );
        }
        assert_tail_is_zero(&self.dir, end);
        if candidates.iter().all(|c| end > c.min_end) {
            self.stats.ends_above_flush += 1;
        }
        // The child's own rule for a pending truncation (see its run_wal).
        if let Some(epoch) = self.pending.take().filter(|e| e.lsn == end) {
            push_epoch(&mut self.history, epoch);
        }
        self.candidates = vec![Candidate { history: self.history.clone(), min_end: end, exact: false }];
        self.stats.recoveries_checked += 1;
    }

    /// Fold the killed child's report into the allowed outcomes.
    fn absorb(&mut self, lines: &[String]) {
        for line in lines {
            let (event, value) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match event {
                "recovered" => self.check_recovered(value.parse().unwrap()),
                "flushed" => {
                    let min_end = value.parse().unwrap();
                    self.candidates = vec![Candidate { history: self.history.clone(), min_end, exact: false }];
                }
                "truncating" => {
                    let epoch = Epoch::parse(value).unwrap();
                    let mut history = self.history.clone();
                    push_epoch(&mut history, epoch);
                    self.candidates.push(Candidate { history, min_end: epoch.lsn, exact: true });
                    self.pending = Some(epoch);
                }
                "truncated" => {
                    let epoch = Epoch::parse(value).unwrap();
                    push_epoch(&mut self.history, epoch);
                    self.pending = None;
                    self.stats.truncations_completed += 1;
                    // Unsynced WAL of the new epoch may survive a SIGKILL.
                    self.candidates =
                        vec![Candidate { history: self.history.clone(), min_end: epoch.lsn, exact: false }];
                }
                "commit" | "full" => {}
                other => panic!("unexpected child line {other:?}"),
            }
        }
        if lines.last().is_some_and(|l| l.starts_with("truncating")) {
            self.stats.kills_during_truncation += 1;
        }
    }
}

/// The WAL bytes `[START_LSN, end)` from the segment files.
fn read_wal(dir: &Path, end: Lsn) -> Vec<u8> {
    let mut bytes = Vec::with_capacity((end - START_LSN) as usize);
    let mut segment = START_LSN.segment_no(segment_size());
    while segment.start_lsn(segment_size()) < end {
        let file = fs::read(dir.join(segment.file_name(1, segment_size()))).unwrap();
        assert_eq!(file.len() as u64, SEGMENT_SIZE_BYTES);
        let len = ((end - segment.start_lsn(segment_size())) as usize).min(file.len());
        bytes.extend_from_slice(&file[..len]);
        segment = SegmentNo(segment.0 + 1);
    }
    bytes
}

/// After recovery to `end`: no file for a later segment, zeros above `end`.
fn assert_tail_is_zero(dir: &Path, end: Lsn) {
    let end_segment = end.segment_no(segment_size());
    let later = dir.join(SegmentNo(end_segment.0 + 1).file_name(1, segment_size()));
    assert!(!later.exists(), "{} survived recovery to {end}", later.display());
    if let Ok(file) = fs::read(dir.join(end_segment.file_name(1, segment_size()))) {
        let offset = end.segment_offset(segment_size()) as usize;
        let stale = file[offset..].iter().position(|&b| b != 0);
        assert_eq!(stale, None, "non-zero byte above the recovered end {end}");
    }
}

fn run_wal_rounds(mode: &'static str) {
    let started = Instant::now();
    let seed = test_seed(mode);
    let mut rng = StdRng::seed_from_u64(seed);
    let base = tempfile::tempdir().unwrap();
    let mut run: Option<WalRun> = None;
    let mut stats = RunStats::default();
    for round in 0..=ROUNDS {
        if round % ROUNDS_PER_DIR == 0 && round < ROUNDS {
            if let Some(finished) = run.take() {
                stats.add(finished.stats);
            }
            run = Some(WalRun::new(mode, base.path().join(format!("timeline-{round}")), rng.gen()));
        }
        let run = run.as_mut().unwrap();
        let mut child = Child::spawn(base.path(), u64::from(round), &run.args(u64::from(round)));
        // The child pauses after printing its recovered end, so the files
        // are still while that line is checked. A quarter of the kills land
        // during startup and recovery instead.
        let mut lines_checked = 0;
        if round < ROUNDS && rng.gen_bool(0.25) {
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..4000)));
        } else {
            run.absorb(&[child.wait_for_line("recovered")]);
            lines_checked = 1;
            if round == ROUNDS {
                break; // the last round only checks the final recovery
            }
            child.release();
            std::thread::sleep(Duration::from_millis(rng.gen_range(5..60)));
        }
        let lines = child.kill();
        run.absorb(&lines[lines_checked..]);
    }
    stats.add(run.expect("at least one run").stats);
    println!("{mode}: {ROUNDS} kills in {:?}: {stats:?}", started.elapsed());
    assert!(stats.recoveries_checked >= ROUNDS / 2, "too few recoveries were checked: {stats:?}");
}

#[test]
fn wal_survives_sigkill_at_random_moments() {
    run_wal_rounds("wal");
}

#[test]
fn truncation_survives_sigkill_at_random_moments() {
    run_wal_rounds("truncate");
}

#[test]
fn control_file_survives_sigkill_during_writes() {
    let started = Instant::now();
    let seed = test_seed("control");
    let mut rng = StdRng::seed_from_u64(seed);
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("timeline");
    fs::create_dir_all(&dir).unwrap();
    let mut stored_term = 0u64;
    for round in 0..ROUNDS {
        let args = ["control".to_string(), dir.display().to_string(), "0".to_string(), round.to_string()];
        let mut child = Child::spawn(base.path(), u64::from(round), &args);
        if rng.gen_bool(0.8) {
            child.wait_for_line("recovered");
        }
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..15_000)));
        let lines = child.kill();
        let mut allowed = vec![stored_term];
        for line in &lines {
            let (event, value) = line.split_once(' ').unwrap();
            let term: u64 = value.parse().unwrap();
            match event {
                "recovered" => assert_eq!(term, stored_term, "the child loaded another state than the last checked"),
                "persisting" => allowed.push(term),
                "persisted" => allowed = vec![term],
                other => panic!("unexpected child line {other:?}"),
            }
        }
        let loaded = FileControlStore::load(&dir).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let loaded_term = loaded.as_ref().map_or(0, |state| state.term.0);
        assert!(allowed.contains(&loaded_term), "round {round}: loaded term {loaded_term}, allowed {allowed:?}");
        if let Some(state) = loaded {
            assert_eq!(state, control_state_for_term(loaded_term));
        }
        stored_term = loaded_term;
    }
    println!("control: {ROUNDS} kills, last term {stored_term}, in {:?}", started.elapsed());
    assert!(stored_term > 0, "no control file write ever completed");
}
