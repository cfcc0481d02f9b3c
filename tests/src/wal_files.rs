//! Reading WAL the way an oracle would: bytes of Postgres-named segment
//! files, `pg_waldump`'s record list, and the transactions whose commit
//! records a range of WAL holds (decoded with the shared decoder).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use postgres_wal::lsn::{Lsn, PgTimelineId, WalSegmentSize};
use postgres_wal::wal::{DecodeStep, WalDecoder};

use crate::pg::PgCluster;

const PG_WALDUMP_TIMEOUT: Duration = Duration::from_secs(120);
/// Resource manager of transaction records (RM_XACT_ID) and the opcode of
/// a commit (XLOG_XACT_COMMIT under XLOG_XACT_OPMASK), from PG15's headers.
const RM_XACT_ID: u8 = 1;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
/// Postgres's timeline 1: every test cluster's WAL is on it.
const PG_TIMELINE: u32 = 1;

/// Bytes `[start, end)` of the WAL in `dir` (Postgres-named segment files,
/// or `.partial` ones as pg_receivewal leaves them).
pub fn read_wal(dir: &Path, segment_size: WalSegmentSize, start: Lsn, end: Lsn) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut position = start;
    while position < end {
        let segment = position.segment_no(segment_size);
        // pg_receivewal names the segment it is still writing `<name>.partial`.
        let name = segment.file_name(PG_TIMELINE, segment_size);
        let mut path = dir.join(&name);
        if !path.exists() && dir.join(format!("{name}.partial")).exists() {
            path = dir.join(format!("{name}.partial"));
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(bytes.len() as u64 == segment_size.bytes(), "{} is not a whole segment", path.display());
        let from = position.segment_offset(segment_size) as usize;
        let to = (end.min(position.next_segment_start(segment_size)) - segment.start_lsn(segment_size)) as usize;
        out.extend_from_slice(&bytes[from..to]);
        position = position.next_segment_start(segment_size);
    }
    Ok(out)
}

/// Bytes `[start, end)` of Postgres timeline `tli` in `dir` (a pg_wal, or
/// a safekeeper's timeline directory), read from the segment files named
/// for `tli` (what [`read_wal`] does for timeline 1).
pub fn read_pg_wal(
    dir: &Path,
    tli: PgTimelineId,
    segment_size: WalSegmentSize,
    start: Lsn,
    end: Lsn,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut position = start;
    while position < end {
        let segment = position.segment_no(segment_size);
        let path = dir.join(segment.file_name(tli, segment_size));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(bytes.len() as u64 == segment_size.bytes(), "{} is not a whole segment", path.display());
        let to = end.min(position.next_segment_start(segment_size));
        let from = position.segment_offset(segment_size) as usize;
        out.extend_from_slice(&bytes[from..from + (to - position) as usize]);
        position = to;
    }
    Ok(out)
}

/// Record LSNs `pg_waldump` lists in `[start, end)` of `dir`; its failure
/// (a gap, a bad record before `end`) is an error.
pub fn waldump_lsns(pg: &PgCluster, dir: &Path, start: Lsn, end: Lsn) -> Result<Vec<Lsn>> {
    waldump(pg, dir, None, start, end)
}

/// [`waldump_lsns`] of the segment files of Postgres timeline `tli`
/// (`pg_waldump -t tli`).
pub fn waldump_timeline_lsns(pg: &PgCluster, dir: &Path, tli: PgTimelineId, start: Lsn, end: Lsn) -> Result<Vec<Lsn>> {
    waldump(pg, dir, Some(tli), start, end)
}

fn waldump(pg: &PgCluster, dir: &Path, tli: Option<PgTimelineId>, start: Lsn, end: Lsn) -> Result<Vec<Lsn>> {
    let mut command = Command::new(pg.bin("pg_waldump"));
    command.arg("-p").arg(dir).arg("-s").arg(start.to_string()).arg("-e").arg(end.to_string());
    if let Some(tli) = tli {
        command.arg("-t").arg(tli.to_string());
    }
    let output = pg.run(command, PG_WALDUMP_TIMEOUT)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "pg_waldump on {} failed: {stderr}", dir.display());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let lsn = line.split("lsn: ").nth(1).context("no lsn")?.split(',').next().context("no comma")?;
            Ok(lsn.parse()?)
        })
        .collect()
}

/// The xids of every transaction whose commit record lies wholly inside
/// `[start, end)` of the WAL in `dir`. `start` must be a segment start.
/// Decoding checks page headers, CRCs and the xl_prev chain, so a gap or a
/// changed byte is an error here.
pub fn committed_xids(dir: &Path, segment_size: WalSegmentSize, start: Lsn, end: Lsn) -> Result<HashSet<u32>> {
    let mut decoder = WalDecoder::at_segment_start(start, segment_size);
    decoder.feed(&read_wal(dir, segment_size, start, end)?);
    let mut xids = HashSet::new();
    let step = decoder
        .decode_available(|record| {
            if record.rmgr_id == RM_XACT_ID && record.info & XLOG_XACT_OPMASK == XLOG_XACT_COMMIT {
                xids.insert(record.xid);
            }
        })
        .with_context(|| format!("decoding {} from {start} to {end}", dir.display()))?;
    if let DecodeStep::EndOfWal { lsn } = step {
        bail!("WAL in {} ends at {lsn}, before {end}", dir.display());
    }
    Ok(xids)
}

/// Every file directly under `dir` with its bytes, to show nothing changed.
pub fn snapshot_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = vec![];
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.push((path.clone(), std::fs::read(&path)?));
        }
    }
    files.sort();
    Ok(files)
}
