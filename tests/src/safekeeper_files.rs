//! Comparing two safekeepers' timeline directories: the same segment
//! files, under the same names (the Postgres timeline each carries), with
//! the same bytes below an LSN.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use postgres_wal::lsn::{Lsn, SegmentNo, WalSegmentSize};

/// Segment file names in `dir` of segments at or below the one holding
/// `end` (`end` itself excluded when it is a segment start), sorted.
pub fn segment_names_up_to(dir: &Path, segment_size: WalSegmentSize, end: Lsn) -> Result<Vec<String>> {
    let last = Lsn(end.0.saturating_sub(1)).segment_no(segment_size);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| SegmentNo::parse_file_name(name, segment_size).is_ok_and(|(_, segment)| segment <= last))
        .collect();
    names.sort();
    Ok(names)
}

/// `a` and `b` hold the same last segment below `end` under the same name,
/// and every segment both hold has the same bytes below `end`. Returns the
/// name of the segment holding `end`'s last byte.
pub fn same_wal_up_to(a: &Path, b: &Path, segment_size: WalSegmentSize, end: Lsn) -> Result<String> {
    let (ours, theirs) = (segment_names_up_to(a, segment_size, end)?, segment_names_up_to(b, segment_size, end)?);
    let last = ours.last().context("no segment below the end")?.clone();
    ensure!(theirs.last() == Some(&last), "segment names differ: {ours:?} vs {theirs:?}");
    for name in ours.iter().filter(|name| theirs.contains(name)) {
        let (_, segment) = SegmentNo::parse_file_name(name, segment_size)?;
        let start = segment.start_lsn(segment_size);
        let len = (end.0.min(start.0 + segment_size.bytes()) - start.0) as usize;
        let (x, y) = (std::fs::read(a.join(name))?, std::fs::read(b.join(name))?);
        ensure!(x[..len] == y[..len], "{} and {} differ in {name} below {end}", a.display(), b.display());
    }
    Ok(last)
}
