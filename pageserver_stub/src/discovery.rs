//! Finding the timeline: waiting until some safekeeper reports it (it may
//! not exist yet: the stub may start before the compute), and describing
//! what each safekeeper answered meanwhile.

use std::time::{Duration, Instant};

use postgres_wal::lsn::WalSegmentSize;
use tokio::sync::watch;

use crate::api::{SafekeeperAddress, TimelineStatus};
use crate::background::{StatusPoll, StatusPolls};
use crate::config::Tuning;
use crate::driver::until_stopped;
use crate::http::{SafekeeperNote, StubStatus};

/// While waiting for the timeline or for a usable source, say so this often.
pub const WAITING_LOG_INTERVAL_MS: u64 = 10_000;

/// A safekeeper's report of the timeline, good enough to start from.
pub struct FoundTimeline {
    pub index: usize,
    pub status: TimelineStatus,
    pub segment_size: WalSegmentSize,
}

/// Waiting until some safekeeper reports the timeline (it may not exist
/// yet: the stub may start before the compute).
pub struct TimelineWait<'a> {
    pub polls: watch::Receiver<StatusPolls>,
    pub shutdown: watch::Receiver<bool>,
    /// Shows each safekeeper's answer on the status page meanwhile.
    pub status: &'a watch::Sender<StubStatus>,
}

impl TimelineWait<'_> {
    /// The first safekeeper (by index) with a usable status, once every
    /// safekeeper has answered once or the status timeout passed, so the
    /// first choice of source sees them all. `None` on shutdown.
    pub async fn wait(&mut self, addresses: &[SafekeeperAddress], tuning: &Tuning) -> Option<FoundTimeline> {
        let started = Instant::now();
        let mut logged_at: Option<Instant> = None;
        loop {
            let (found, all_answered, problems) = {
                let polls = self.polls.borrow_and_update();
                let found = polls.iter().enumerate().find_map(|(index, poll)| usable_status(index, poll.as_ref()));
                let notes = notes_from_polls(addresses, &polls);
                self.status.send_modify(|status| status.safekeepers = notes);
                (found, polls.iter().all(Option::is_some), describe_poll_problems(addresses, &polls))
            };
            let waited_ms = started.elapsed().as_millis() as u64;
            if let Some(found) = found {
                if all_answered || waited_ms >= tuning.status_timeout_ms {
                    return Some(found);
                }
            } else if all_answered && log_due(logged_at) {
                logged_at = Some(Instant::now());
                tracing::info!(waited_ms, problems, "waiting for a safekeeper to report the timeline");
            }
            let tick = Duration::from_millis(tuning.housekeeping_interval_ms);
            tokio::select! {
                _ = self.polls.changed() => {}
                () = tokio::time::sleep(tick) => {}
                () = until_stopped(&mut self.shutdown) => return None,
            }
        }
    }
}

/// A waiting message is logged at once, then every `WAITING_LOG_INTERVAL_MS`.
pub fn log_due(logged_at: Option<Instant>) -> bool {
    logged_at.is_none_or(|at| at.elapsed() >= Duration::from_millis(WAITING_LOG_INTERVAL_MS))
}

fn usable_status(index: usize, poll: Option<&StatusPoll>) -> Option<FoundTimeline> {
    let status = poll?.result.as_ref().ok()?;
    let segment_size = timeline_shape(status).ok()?;
    Some(FoundTimeline { index, status: status.clone(), segment_size })
}

/// The segment size, if the status describes a timeline decoding can start
/// on: a start at a segment's first byte (the size itself was validated
/// when the document was read).
fn timeline_shape(status: &TimelineStatus) -> Result<WalSegmentSize, String> {
    let segment_size = status.wal_seg_size;
    if !status.timeline_start_lsn.is_segment_start(segment_size) {
        return Err(format!("timeline_start_lsn {} is not at a segment start", status.timeline_start_lsn));
    }
    Ok(segment_size)
}

fn notes_from_polls(addresses: &[SafekeeperAddress], polls: &StatusPolls) -> Vec<SafekeeperNote> {
    let note = |(address, poll): (&SafekeeperAddress, &Option<StatusPoll>)| {
        let result = poll.as_ref().map(|poll| &poll.result);
        SafekeeperNote {
            address: address.to_string(),
            commit_lsn: result.and_then(|result| result.as_ref().ok()).map(|status| status.commit_lsn),
            status_error: result.and_then(|result| result.as_ref().err()).cloned(),
        }
    };
    addresses.iter().zip(polls).map(note).collect()
}

pub fn describe_poll_problems(addresses: &[SafekeeperAddress], polls: &StatusPolls) -> String {
    let describe = |poll: &Option<StatusPoll>| match poll {
        None => "no answer yet".to_string(),
        Some(StatusPoll { result: Err(error), .. }) => error.clone(),
        Some(StatusPoll { result: Ok(status), .. }) => timeline_shape(status).err().unwrap_or_else(|| "ok".to_string()),
    };
    let lines: Vec<String> =
        addresses.iter().zip(polls).map(|(address, poll)| format!("{address}: {}", describe(poll))).collect();
    lines.join("; ")
}
