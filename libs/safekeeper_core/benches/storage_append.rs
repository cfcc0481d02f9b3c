//! Append-and-sync throughput of `SegmentStorage` against a baseline of
//! plain `write` + `fdatasync` into a preallocated, zero-filled file, on the
//! same disk. Each append is followed by a sync (one acknowledged batch);
//! the group-commit case syncs once per 16 appends. Both write modes are
//! measured; figures and analysis are in docs/storage.md.
//!
//! Run: `cargo bench -p safekeeper --bench storage_append`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::timeline_history::PgTimelineHistory;
use safekeeper_core::storage::segments::{SegmentStorage, SegmentWriteMode};
use safekeeper_core::storage::WalStorage;

struct Case {
    name: &'static str,
    append_bytes: usize,
    appends_per_sync: usize,
    total_bytes: u64,
}

const CASES: [Case; 3] = [
    Case { name: "8 KiB appends, sync each", append_bytes: 8 << 10, appends_per_sync: 1, total_bytes: 64 << 20 },
    Case { name: "128 KiB appends, sync each", append_bytes: 128 << 10, appends_per_sync: 1, total_bytes: 256 << 20 },
    Case { name: "16 x 8 KiB appends per sync", append_bytes: 8 << 10, appends_per_sync: 16, total_bytes: 256 << 20 },
];

/// Timeline start: the first byte of segment 1.
const START_LSN: Lsn = Lsn(16 << 20);

fn main() {
    // Cargo passes --bench; nothing to parse.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir in the target dir");
    println!("storage_append: in {} (16 MiB segments)", base.path().display());
    for case in &CASES {
        let baseline = bench_baseline(base.path(), case);
        let mbps = |elapsed: Duration| case.total_bytes as f64 / elapsed.as_secs_f64() / 1e6;
        println!("{}: write+fdatasync baseline {:.1} MB/s", case.name, mbps(baseline));
        for mode in [SegmentWriteMode::MemoryMap, SegmentWriteMode::Pwrite] {
            let storage = bench_storage(base.path(), case, mode);
            let ratio = baseline.as_secs_f64() / storage.as_secs_f64();
            let default = if mode == SegmentWriteMode::default() { " (default)" } else { "" };
            println!(
                "    SegmentStorage {:<10} {:>8.1} MB/s   ratio {ratio:.2}{default}",
                format!("{mode:?}"),
                mbps(storage)
            );
        }
    }
}

fn payload(case: &Case) -> Vec<u8> {
    (0..case.append_bytes).map(|i| (i % 251) as u8 + 1).collect()
}

/// Time to append `total_bytes` through SegmentStorage (segment creation
/// included: it is part of the real cost).
fn bench_storage(base: &Path, case: &Case, mode: SegmentWriteMode) -> Duration {
    let dir = tempfile::tempdir_in(base).expect("storage dir");
    let mut storage = SegmentStorage::open(dir.path(), WalSegmentSize::DEFAULT, &PgTimelineHistory::first())
        .expect("open")
        .with_write_mode(mode);
    storage.initialize(START_LSN).expect("initialize");
    let bytes = payload(case);
    let started = Instant::now();
    let mut written = 0;
    while written < case.total_bytes {
        for _ in 0..case.appends_per_sync {
            storage.write(storage.write_lsn(), &bytes).expect("write");
            written += bytes.len() as u64;
        }
        storage.sync().expect("sync");
    }
    started.elapsed()
}

/// Time to write the same bytes with pwrite + fdatasync into a file that
/// was preallocated and zero-filled beforehand (not timed).
fn bench_baseline(base: &Path, case: &Case) -> Duration {
    let path = base.join("baseline");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("create");
    preallocate_zeroed(&file, case.total_bytes);
    let bytes = payload(case);
    let started = Instant::now();
    let mut offset = 0;
    while offset < case.total_bytes {
        for _ in 0..case.appends_per_sync {
            file.write_all_at(&bytes, offset).expect("write");
            offset += bytes.len() as u64;
        }
        file.sync_data().expect("fdatasync");
    }
    let elapsed = started.elapsed();
    std::fs::remove_file(&path).expect("remove baseline file");
    elapsed
}

fn preallocate_zeroed(file: &File, size_bytes: u64) {
    let zeros = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < size_bytes {
        file.write_all_at(&zeros, offset).expect("zero-fill");
        offset += zeros.len() as u64;
    }
    file.sync_all().expect("fsync");
}
