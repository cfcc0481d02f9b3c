//! Child process of the storage crash tests (tests/tests/storage_crash.rs).
//! The parent SIGKILLs it at random moments and checks what survived.
//!
//! Usage: storage_crash_child <wal|truncate|control> <dir> <seed> <incarnation> [history] [pending]
//!
//! It prints one line per durable event, each only after the event is
//! durable (stdout is a file; a line reaches it before the next step):
//! `recovered L`, `flushed L`, `commit L`, `truncating L@nonce`,
//! `truncated L@nonce`, `persisting N`, `persisted N`, `full`.

mod workload;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use postgres_wal::lsn::Lsn;
use postgres_wal::timeline_history::PgTimelineHistory;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safekeeper_core::recovery::recover_timeline;
use safekeeper_core::storage::control_file::FileControlStore;
use safekeeper_core::storage::segments::SegmentStorage;
use safekeeper_core::storage::{ControlStore, WalStorage};
use workload::{control_state_for_term, new_control_state, segment_size, Epoch, Workload, START_LSN};

/// WAL kept per directory in `wal` mode before the child stops appending.
const WAL_MODE_LIMIT_BYTES: u64 = 24 << 20;
/// In `truncate` mode: WAL length at which the child truncates.
const TRUNCATE_MODE_LIMIT_BYTES: u64 = 3 << 20;
/// Syncs between control-file writes (commit_lsn checkpoints).
const SYNCS_PER_CHECKPOINT: u32 = 6;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        bail!("usage: storage_crash_child <wal|truncate|control> <dir> <seed> <incarnation> [history] [pending]");
    }
    let dir = Path::new(&args[2]);
    let seed: u64 = args[3].parse().context("seed")?;
    let incarnation: u64 = args[4].parse().context("incarnation")?;
    let parse_epochs = |text: Option<&String>| -> Result<Vec<Epoch>> {
        let text = text.map(String::as_str).unwrap_or("");
        text.split(',').filter(|s| !s.is_empty()).map(|s| Epoch::parse(s).map_err(anyhow::Error::msg)).collect()
    };
    let history = parse_epochs(args.get(5))?;
    let pending = parse_epochs(args.get(6))?;
    match args[1].as_str() {
        "wal" => run_wal(dir, seed, incarnation, history, pending, None),
        "truncate" => run_wal(dir, seed, incarnation, history, pending, Some(TRUNCATE_MODE_LIMIT_BYTES)),
        "control" => run_control(dir),
        other => bail!("unknown mode {other:?}"),
    }
}

/// Append the deterministic stream with periodic syncs and checkpoints; with
/// `truncate_at_bytes`, truncate to a random boundary whenever the WAL is
/// that long, then continue with a new epoch of content.
fn run_wal(
    dir: &Path,
    seed: u64,
    incarnation: u64,
    mut history: Vec<Epoch>,
    pending: Vec<Epoch>,
    truncate_at_bytes: Option<u64>,
) -> Result<()> {
    let (mut storage, mut control_store, mut control, end) = match recover_timeline(dir)? {
        Some(recovered) => (recovered.storage, recovered.control_store, recovered.control, recovered.end_lsn),
        None => {
            let mut control_store = FileControlStore::new(dir)?;
            let control = new_control_state(Lsn::INVALID);
            control_store.persist(&control)?;
            let mut storage = SegmentStorage::open(dir, segment_size(), &PgTimelineHistory::first())?;
            storage.initialize(START_LSN)?;
            (storage, control_store, control, START_LSN)
        }
    };
    println!("recovered {end}");
    // Hold still until the parent has checked the recovered WAL (it writes
    // a line, or closes stdin).
    std::io::stdin().read_line(&mut String::new()).context("waiting for the parent")?;
    // A truncation the previous run was killed in took effect iff the WAL
    // now ends exactly there (nothing was appended after it).
    if let Some(epoch) = pending.first().filter(|e| e.lsn == end) {
        workload::push_epoch(&mut history, *epoch);
    }
    // Record boundaries at or above the persisted commit_lsn, with the
    // stream state there, as truncation targets.
    let mut snapshots: Vec<Workload> = Vec::new();
    let mut workload = Workload::new(seed, history);
    let keep_snapshot = |w: &Workload| w.end_lsn() >= control.commit_lsn;
    workload
        .advance_to(end, |w| {
            if keep_snapshot(w) {
                snapshots.push(w.clone())
            }
        })
        .map_err(anyhow::Error::msg)?;
    snapshots.push(workload.clone());
    let limit = START_LSN + truncate_at_bytes.unwrap_or(WAL_MODE_LIMIT_BYTES);
    let mut rng = StdRng::seed_from_u64(seed ^ incarnation.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut syncs = 0u32;
    loop {
        if workload.end_lsn() < limit {
            for _ in 0..rng.gen_range(1..=8) {
                workload.append_record();
            }
            let (start, bytes) = workload.take_bytes();
            write_split(&mut storage, start, &bytes)?;
            let synced = storage.sync()?.lsn();
            assert_eq!(synced, workload.end_lsn());
            println!("flushed {synced}");
            snapshots.push(workload.clone());
            syncs += 1;
            // In truncate mode checkpoints stay low so truncations can reach
            // back across several segments.
            let low_enough = truncate_at_bytes.is_none_or(|at| synced < START_LSN + at / 3);
            if syncs.is_multiple_of(SYNCS_PER_CHECKPOINT) && low_enough {
                control.commit_lsn = synced;
                control_store.persist(&control)?;
                println!("commit {synced}");
                snapshots.retain(|s| s.end_lsn() >= synced);
            }
        } else if truncate_at_bytes.is_some() {
            let candidates = snapshots.len() - 1; // never the current end
            if candidates == 0 {
                bail!("no truncation target below {}", workload.end_lsn());
            }
            workload = snapshots[rng.gen_range(0..candidates)].clone();
            let target = Epoch { lsn: workload.end_lsn(), nonce: rng.gen() };
            println!("truncating {}", target.to_arg());
            storage.truncate(target.lsn)?;
            println!("truncated {}", target.to_arg());
            snapshots.retain(|s| s.end_lsn() <= target.lsn);
            workload.begin_epoch(target.nonce);
        } else {
            println!("full");
            std::thread::sleep(Duration::from_secs(60));
            bail!("the parent should have killed us");
        }
    }
}

fn write_split(storage: &mut SegmentStorage, start: Lsn, bytes: &[u8]) -> Result<()> {
    let mut pos = start;
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = ((pos.next_segment_start(segment_size()) - pos) as usize).min(rest.len());
        storage.write(pos, &rest[..len])?;
        rest = &rest[len..];
        pos = pos + len as u64;
    }
    Ok(())
}

/// Persist ever higher terms; the parent checks the file is always whole.
fn run_control(dir: &Path) -> Result<()> {
    let loaded = FileControlStore::load(dir)?;
    let mut term = loaded.map_or(0, |state| state.term.0);
    println!("recovered {term}");
    let mut store = FileControlStore::new(dir)?;
    loop {
        term += 1;
        println!("persisting {term}");
        store.persist(&control_state_for_term(term))?;
        println!("persisted {term}");
    }
}
