//! A commit loop that records every acknowledgement: one session
//! inserting numbered rows into `acked`, one transaction each, as fast as
//! commits are acknowledged. What it saw acknowledged is what no later
//! event (a safekeeper replaced, the primary's machine dying and a
//! failover) may lose.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::fixture::join_bounded;
use crate::pg::PgCluster;

/// One loop writes at most this many rows, whatever happens.
pub const MAX_ROWS: i64 = 200_000;
/// Its session's commits are acknowledged once durable on a quorum.
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS acked (n bigint PRIMARY KEY, xid bigint)";

/// What the loop saw acknowledged, and when.
#[derive(Default)]
pub struct CommitReport {
    /// The xids (mod 2^32, as WAL records them) of acknowledged commits.
    pub xids: Vec<u32>,
    pub ack_times: Vec<Instant>,
    /// Why the loop ended early: its connection failed (the primary died).
    pub ended_by: Option<String>,
}

impl CommitReport {
    /// The longest wait for an acknowledgement that overlaps `[from, to]`.
    pub fn max_stall(&self, from: Instant, to: Instant) -> Duration {
        self.longest_stall(from, to).map_or(Duration::ZERO, |(stall, _)| stall)
    }

    /// The longest wait overlapping `[from, to]`, and when it began.
    pub fn longest_stall(&self, from: Instant, to: Instant) -> Option<(Duration, Instant)> {
        self.ack_times
            .windows(2)
            .filter(|pair| pair[1] > from && pair[0] < to)
            .map(|pair| (pair[1] - pair[0], pair[0]))
            .max_by_key(|(stall, _)| *stall)
    }
}

pub struct CommitLoop {
    thread: thread::JoinHandle<CommitReport>,
    stop: Arc<AtomicBool>,
}

impl CommitLoop {
    /// Create `acked` if missing and start the loop on `pg`.
    pub fn start(pg: &PgCluster) -> Result<CommitLoop> {
        pg.psql(CREATE_TABLE)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let (conninfo, stop) = (pg.socket_connection_string("postgres"), stop.clone());
            move || run(&conninfo, &stop)
        });
        Ok(CommitLoop { thread, stop })
    }

    /// Stop the loop (waiting at most `timeout` for its commit in flight)
    /// and return what it saw acknowledged.
    pub fn finish(self, timeout: Duration) -> Result<CommitReport> {
        self.stop.store(true, Ordering::Relaxed);
        join_bounded(self.thread, timeout).context("the commit loop")
    }
}

/// Insert rows until `stop`, `MAX_ROWS`, or the first error (recorded:
/// a commit whose answer never came is not acknowledged).
fn run(conninfo: &str, stop: &AtomicBool) -> CommitReport {
    let mut report = CommitReport::default();
    let mut client = match postgres::Client::connect(conninfo, postgres::NoTls) {
        Ok(client) => client,
        Err(error) => {
            report.ended_by = Some(format!("connecting: {error}"));
            return report;
        }
    };
    // Numbered after the rows an earlier loop left (a restarted primary).
    let mut n: i64 = match client.query_one("SELECT coalesce(max(n), -1) + 1 FROM acked", &[]) {
        Ok(row) => row.get(0),
        Err(error) => {
            report.ended_by = Some(format!("reading the last row: {error}"));
            return report;
        }
    };
    let last_n = n + MAX_ROWS;
    while !stop.load(Ordering::Relaxed) && n < last_n {
        let insert =
            "INSERT INTO acked (n, xid) VALUES ($1, txid_current()) RETURNING (txid_current() % 4294967296)::bigint";
        match client.query_one(insert, &[&n]) {
            Ok(row) => {
                report.xids.push(row.get::<_, i64>(0) as u32);
                report.ack_times.push(Instant::now());
            }
            Err(error) => {
                report.ended_by = Some(error.to_string());
                break;
            }
        }
        n += 1;
    }
    report
}
