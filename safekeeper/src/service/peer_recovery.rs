//! Peer recovery: a safekeeper whose WAL ends well below the commit LSN its
//! peers report copies the missing committed WAL from the most advanced
//! peer over the HTTP API (`GET .../wal`), through the owner and the same
//! acceptor checks as a proposer's WAL (`Acceptor::handle_peer_wal`: each
//! record decoded, the peer's term history agreeing with ours up to the end
//! of the copy, nothing past the peer's commit LSN). Without it, a
//! safekeeper that was down while Postgres recycled its WAL could never
//! catch up (the shim can resend only what Postgres still has).
//!
//! A new, empty safekeeper (its WAL initialized at the timeline start by
//! ProposerElected, nothing written) whose peers no longer keep WAL from
//! that start is bootstrapped: the copy starts at the first segment start
//! the most advanced peer keeps, and the acceptor restarts its empty WAL
//! there.
//!
//! One task per timeline, started with its owner when peers are configured
//! (`--peer-http`). It sleeps until the timeline learns that the quorum is
//! ahead of it (a proposer's message, or a peer's copy, shows a commit LSN
//! at least `MIN_LAG_BYTES` beyond its flush); only then does it ask the
//! peers, at most once per poll interval while that lasts. A timeline that
//! is current, or that no proposer speaks to, costs nothing. It copies
//! only under an accepted ProposerElected of the current term (so its
//! history is the current proposer's) and only while no proposer has sent
//! WAL for a while (a streaming proposer keeps it current itself). Once
//! caught up, the owner refuses the proposer connections that saw it
//! behind, once: the shim reconnects and streams from the new flush LSN.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{oneshot, watch};

use super::owner::OwnerInput;
use super::registry::{TimelineHandle, TimelinesConfig};
use postgres_wal::lsn::Lsn;
use safekeeper_api::api::{PeerRecoveryState, PeerRecoveryStatus, SafekeeperAddress, TimelinePaths, TimelineStatus};
use safekeeper_api::pull::{SafekeeperClient, WalEvent, WalPull};
use safekeeper_core::acceptor::PeerWal;

/// How often a timeline is looked at.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Copy only when at least this far behind the best peer's commit (one
/// WAL page: less is a proposer's message in flight).
pub const MIN_LAG_BYTES: u64 = 8 << 10;
/// A round that copied less than this ends recovery: the proposer resends
/// the rest from its buffer or from Postgres. A larger one is followed by
/// another round at once.
const HANDOFF_BELOW_BYTES: u64 = 4 << 20;
/// How long after a handoff the proposer gets to take over before
/// recovery looks again.
const HANDOFF_GRACE: Duration = Duration::from_secs(10);
/// A proposer that sent WAL this recently is streaming: stay out of its way.
const PROPOSER_QUIET: Duration = Duration::from_secs(3);
/// Largest piece handed to the owner (one acceptor write).
const PIECE_BYTES: usize = 1 << 20;
/// Pieces queued at the owner before waiting for the oldest.
const PIECES_IN_FLIGHT: usize = 32;
const CONNECT_TIMEOUT_MS: u64 = 2_000;
const STATUS_TIMEOUT_MS: u64 = 3_000;
/// A WAL body that stalls this long ends the round.
const BODY_STALL: Duration = Duration::from_secs(30);

/// Start peer recovery for a timeline; it ends with the timeline.
pub fn spawn(handle: &Arc<TimelineHandle>, config: &TimelinesConfig) {
    let snapshot = handle.snapshot();
    let paths = TimelinePaths { tenant_id: snapshot.tenant_id, timeline_id: snapshot.timeline_id };
    let peers = config.peers.clone();
    let client = SafekeeperClient::with_tls(paths, CONNECT_TIMEOUT_MS, config.peer_tls.clone())
        .with_auth_token_file(config.peer_auth_token_file.as_deref().map(Path::to_path_buf));
    let mut snapshots = handle.watch_snapshot();
    let handle = Arc::downgrade(handle);
    tokio::spawn(async move {
        let mut handed_off_at: Option<Instant> = None;
        loop {
            if !behind_the_quorum(&mut snapshots).await {
                return; // the owner is gone
            }
            // While behind, one look per interval: the proposer gets time to
            // stream, and an unreachable peer is not asked in a busy loop.
            tokio::time::sleep(POLL_INTERVAL).await;
            let Some(timeline) = handle.upgrade().filter(|timeline| timeline.is_running()) else { return };
            // After a handoff the proposer reconnects and resends the rest
            // (from its buffer, or re-reading Postgres); copying meanwhile
            // would append where it is about to.
            if handed_off_at.is_some_and(|at| at.elapsed() < HANDOFF_GRACE) {
                continue;
            }
            match recover(&timeline, &client, &peers).await {
                Ok(false) => {}
                Ok(true) => {
                    // Proposers that saw us behind reconnect and stream from
                    // here (unless one already streams to us again).
                    if !proposer_streaming(&timeline) {
                        let _ = timeline.send(OwnerInput::PeerRecoveryDone).await;
                        handed_off_at = Some(Instant::now());
                    }
                }
                Err(error) => {
                    // A condition that lasts (no peer can be copied from)
                    // is logged once, not every poll.
                    if last_error(&timeline).as_ref() != Some(&error) {
                        tracing::warn!(timeline_id = %timeline.snapshot().timeline_id, "peer recovery: {error}");
                    }
                    update(&timeline, |status| {
                        status.state = PeerRecoveryState::Idle;
                        status.last_error = Some(error);
                    });
                }
            }
        }
    });
}

/// Returns `true` once the timeline knows the quorum's commit LSN to be at
/// least `MIN_LAG_BYTES` beyond its flush (less is a proposer's message in
/// flight), `false` once its owner is gone.
async fn behind_the_quorum(snapshots: &mut watch::Receiver<TimelineStatus>) -> bool {
    loop {
        if is_behind(&snapshots.borrow_and_update()) {
            return true;
        }
        if snapshots.changed().await.is_err() {
            return false;
        }
    }
}

fn is_behind(snapshot: &TimelineStatus) -> bool {
    snapshot.proposer_commit_lsn.0 >= snapshot.flush_lsn.0.saturating_add(MIN_LAG_BYTES)
}

fn update(timeline: &TimelineHandle, change: impl FnOnce(&mut PeerRecoveryStatus)) {
    change(&mut timeline.shared.peer_recovery.lock().unwrap_or_else(PoisonError::into_inner));
}

fn last_error(timeline: &TimelineHandle) -> Option<String> {
    timeline.shared.peer_recovery.lock().unwrap_or_else(PoisonError::into_inner).last_error.clone()
}

fn proposer_streaming(timeline: &TimelineHandle) -> bool {
    let last_wal = *timeline.shared.last_proposer_wal.lock().unwrap_or_else(PoisonError::into_inner);
    last_wal.is_some_and(|at| at.elapsed() < PROPOSER_QUIET)
}

fn may_copy(timeline: &TimelineHandle, snapshot: &TimelineStatus) -> bool {
    snapshot.elected_term == Some(snapshot.term) && !proposer_streaming(timeline) && snapshot.stopped_by_error.is_none()
}

/// Rounds follow each other at once while each still copies a lot (the
/// peers' commit moves on under load meanwhile), until one copies little
/// or finds nothing to copy. Returns whether any round ran.
async fn recover(
    timeline: &Arc<TimelineHandle>,
    client: &SafekeeperClient,
    peers: &[SafekeeperAddress],
) -> Result<bool, String> {
    let mut copied_any = false;
    while let Some(copied_bytes) = recover_once(timeline, client, peers).await? {
        copied_any = true;
        if copied_bytes < HANDOFF_BELOW_BYTES {
            break;
        }
    }
    Ok(copied_any)
}

/// One look: copy from the most advanced peer if we are behind it;
/// returns the bytes copied if a round ran.
async fn recover_once(
    timeline: &Arc<TimelineHandle>,
    client: &SafekeeperClient,
    peers: &[SafekeeperAddress],
) -> Result<Option<u64>, String> {
    let snapshot = timeline.snapshot();
    if !may_copy(timeline, &snapshot) {
        return Ok(None);
    }
    let Some(CopySource { peer, status, start_lsn }) = choose_source(client, peers, &snapshot).await? else {
        return Ok(None);
    };
    if start_lsn == snapshot.flush_lsn {
        tracing::info!(%peer, %start_lsn, target = %status.commit_lsn, "peer recovery: copying committed WAL");
    } else {
        tracing::info!(
            %peer, %start_lsn, target = %status.commit_lsn, our_start = %snapshot.timeline_start_lsn,
            "peer recovery: bootstrapping an empty WAL at the oldest segment the peer keeps"
        );
    }
    update(timeline, |recovery| {
        *recovery = PeerRecoveryStatus {
            state: PeerRecoveryState::Copying,
            source: Some(peer.to_string()),
            start_lsn: Some(start_lsn),
            target_lsn: Some(status.commit_lsn),
            copied_bytes: 0,
            completed_rounds: recovery.completed_rounds,
            last_round_ms: recovery.last_round_ms,
            last_error: None,
        }
    });
    let started = Instant::now();
    let reached = copy(timeline, client, &peer, &status, start_lsn).await?;
    let copied_bytes = reached - start_lsn;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(%peer, %reached, copied_bytes, seconds, "peer recovery: round done");
    timeline.shared.metrics.peer_recovery_rounds.inc();
    update(timeline, |recovery| {
        recovery.state = PeerRecoveryState::Idle;
        recovery.copied_bytes = copied_bytes;
        recovery.completed_rounds += 1;
        recovery.last_round_ms = Some(started.elapsed().as_millis() as u64);
    });
    Ok(Some(copied_bytes))
}

/// What a round copies: from `peer`, `[start_lsn, status.commit_lsn)`.
struct CopySource {
    peer: SafekeeperAddress,
    status: TimelineStatus,
    start_lsn: Lsn,
}

/// The peer with the highest commit LSN at least `MIN_LAG_BYTES` beyond our
/// flush among those that still hold WAL from our flush on: the copy
/// continues our WAL. If none does (retention removed it everywhere) and
/// our WAL is empty (a new safekeeper: nothing written beyond its timeline
/// start), the most advanced peer bootstraps it: the copy starts at that
/// peer's oldest kept WAL, rounded up to a segment start. An error says why
/// peers that are ahead cannot be copied from.
async fn choose_source(
    client: &SafekeeperClient,
    peers: &[SafekeeperAddress],
    snapshot: &TimelineStatus,
) -> Result<Option<CopySource>, String> {
    let mut statuses = Vec::with_capacity(peers.len());
    for peer in peers {
        if let Ok(status) = client.timeline_status(peer, STATUS_TIMEOUT_MS).await {
            statuses.push((peer.clone(), status));
        }
    }
    pick_source(statuses, snapshot)
}

/// [`choose_source`] once the peers' statuses are in.
fn pick_source(
    statuses: Vec<(SafekeeperAddress, TimelineStatus)>,
    snapshot: &TimelineStatus,
) -> Result<Option<CopySource>, String> {
    let our_flush = snapshot.flush_lsn;
    let ahead = statuses.into_iter().filter(|(_, status)| {
        let same_timeline = status.system_id == snapshot.system_id && status.wal_seg_size == snapshot.wal_seg_size;
        same_timeline && status.commit_lsn.0.saturating_sub(our_flush.0) >= MIN_LAG_BYTES
    });
    let most_advanced = |candidates: Vec<(SafekeeperAddress, TimelineStatus)>| {
        candidates.into_iter().max_by_key(|(_, status)| status.commit_lsn)
    };
    let (holding, not_holding): (Vec<_>, Vec<_>) =
        ahead.partition(|(_, status)| status.oldest_kept().is_none_or(|oldest| oldest <= our_flush));
    if let Some((peer, status)) = most_advanced(holding) {
        return Ok(Some(CopySource { peer, status, start_lsn: our_flush }));
    }
    let Some((peer, status)) = most_advanced(not_holding) else { return Ok(None) };
    let oldest_kept = status.oldest_kept().expect("only peers that name their oldest kept WAL lack ours");
    let gone = format!(
        "no peer ahead of us holds WAL from our flush LSN {our_flush} any more (the most advanced, {peer}, keeps WAL from \
         {oldest_kept}, commit LSN {})",
        status.commit_lsn
    );
    if our_flush != snapshot.timeline_start_lsn {
        return Err(format!(
            "{gone}; this safekeeper holds WAL beyond its timeline start {}, so its log can only be continued, \
             not restarted at a later segment (bootstrapping is only for an empty WAL): it stays behind",
            snapshot.timeline_start_lsn
        ));
    }
    let segment_size = snapshot.wal_seg_size;
    let start_lsn = if oldest_kept.is_segment_start(segment_size) {
        Some(oldest_kept)
    } else {
        oldest_kept.segment_start(segment_size).checked_add(segment_size.bytes())
    };
    match start_lsn {
        Some(start_lsn) if status.commit_lsn.0.saturating_sub(start_lsn.0) >= MIN_LAG_BYTES => {
            Ok(Some(CopySource { peer, status, start_lsn }))
        }
        _ => Err(format!(
            "{gone}; bootstrapping this empty WAL needs committed WAL beyond the first segment start the peer \
             keeps, and it has none yet"
        )),
    }
}

/// Stream `[start_lsn, peer's commit)` into the owner in pieces that never
/// cross a segment boundary; returns the flush LSN reached.
async fn copy(
    timeline: &Arc<TimelineHandle>,
    client: &SafekeeperClient,
    peer: &SafekeeperAddress,
    status: &TimelineStatus,
    start_lsn: Lsn,
) -> Result<Lsn, String> {
    let segment_size = timeline.snapshot().wal_seg_size;
    let mut pull = WalPull::start(client, peer, start_lsn, status.commit_lsn, 0);
    let mut in_flight: VecDeque<oneshot::Receiver<Result<Lsn, String>>> = VecDeque::new();
    let mut piece = BytesMut::new();
    let mut piece_start = start_lsn;
    let mut reached = start_lsn;
    loop {
        let event = tokio::time::timeout(BODY_STALL, pull.next())
            .await
            .map_err(|_| format!("{peer} sent nothing for {} s", BODY_STALL.as_secs()))?
            .map_err(|error| format!("{peer}: {error}"))?;
        let mut chunk = match event {
            WalEvent::Opened(_) => continue,
            WalEvent::Chunk(chunk) => chunk,
            WalEvent::Complete => break,
        };
        while !chunk.is_empty() {
            let piece_end = piece_start + piece.len() as u64;
            let to_segment_end = (piece_end.next_segment_start(segment_size) - piece_end) as usize;
            let room = to_segment_end.min(PIECE_BYTES - piece.len());
            let taken = chunk.split_to(room.min(chunk.len()));
            piece.extend_from_slice(&taken);
            if taken.len() == room {
                let full = std::mem::take(&mut piece).freeze();
                piece_start = send_piece(timeline, piece_start, full, status, &mut in_flight).await?;
                reached = reached.max(settle(&mut in_flight, PIECES_IN_FLIGHT).await?);
            }
        }
        let progress = reached - start_lsn;
        update(timeline, |recovery| recovery.copied_bytes = progress);
    }
    if !piece.is_empty() {
        let last = std::mem::take(&mut piece).freeze();
        send_piece(timeline, piece_start, last, status, &mut in_flight).await?;
    }
    Ok(reached.max(settle(&mut in_flight, 0).await?))
}

/// Queue one piece at the owner; returns where the next piece starts.
async fn send_piece(
    timeline: &TimelineHandle,
    begin_lsn: Lsn,
    wal: Bytes,
    status: &TimelineStatus,
    in_flight: &mut VecDeque<oneshot::Receiver<Result<Lsn, String>>>,
) -> Result<Lsn, String> {
    let end = begin_lsn + wal.len() as u64;
    let (done, outcome) = oneshot::channel();
    let wal =
        PeerWal { begin_lsn, wal, source_history: status.term_history.clone(), source_commit_lsn: status.commit_lsn };
    timeline.send(OwnerInput::PeerWal { wal, done }).await.map_err(|()| "the timeline's owner stopped".to_string())?;
    in_flight.push_back(outcome);
    Ok(end)
}

/// Wait until at most `keep` pieces are outstanding; returns the highest
/// flush LSN the owner reported.
async fn settle(in_flight: &mut VecDeque<oneshot::Receiver<Result<Lsn, String>>>, keep: usize) -> Result<Lsn, String> {
    let mut flushed = Lsn::INVALID;
    while in_flight.len() > keep {
        let outcome = in_flight.pop_front().expect("non-empty");
        let flush = outcome.await.map_err(|_| "the timeline's owner stopped".to_string())??;
        flushed = flushed.max(flush);
    }
    Ok(flushed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_wal::lsn::WalSegmentSize;
    use safekeeper_core::control::TermHistory;
    use safekeeper_protocol::ids::{SystemId, TenantId, Term, TimelineId};

    const SEGMENT_BYTES: u64 = 16 << 20;
    const SYSTEM_ID: u64 = 42;

    /// A safekeeper whose WAL starts at segment 1 and ends at `flush_lsn`.
    fn ours(flush_lsn: Lsn) -> TimelineStatus {
        TimelineStatus {
            tenant_id: TenantId([1; 16]),
            timeline_id: TimelineId([2; 16]),
            system_id: SystemId(SYSTEM_ID),
            pg_version: 150_000,
            wal_seg_size: WalSegmentSize::new(SEGMENT_BYTES).unwrap(),
            term: Term(3),
            last_log_term: Term(3),
            term_history: TermHistory::default(),
            timeline_start_lsn: Lsn(SEGMENT_BYTES),
            flush_lsn,
            commit_lsn: Lsn::INVALID,
            elected_term: Some(Term(3)),
            remote_consistent_lsn: Lsn::INVALID,
            oldest_kept_lsn: Lsn(SEGMENT_BYTES),
            disk_bytes: SEGMENT_BYTES,
            removed_segments: 0,
            ..TimelineStatus::default()
        }
    }

    /// Rule: peer recovery sleeps until a proposer (or a peer's copy)
    /// reported a commit LSN at least `MIN_LAG_BYTES` beyond our flush (less
    /// is a message in flight), and ends once the owner is gone.
    #[tokio::test]
    async fn recovery_wakes_only_when_the_quorum_is_known_to_be_ahead() {
        let flush = Lsn(SEGMENT_BYTES + 1000);
        let (owner, snapshots) = watch::channel(ours(flush));
        let woken_within_50ms = |snapshots: &watch::Receiver<TimelineStatus>| {
            let mut snapshots = snapshots.clone();
            async move { tokio::time::timeout(Duration::from_millis(50), behind_the_quorum(&mut snapshots)).await.ok() }
        };
        assert_eq!(woken_within_50ms(&snapshots).await, None, "nothing known ahead");
        owner.send_modify(|snapshot| snapshot.proposer_commit_lsn = flush + (MIN_LAG_BYTES - 1));
        assert_eq!(woken_within_50ms(&snapshots).await, None, "less than MIN_LAG_BYTES ahead");
        owner.send_modify(|snapshot| snapshot.proposer_commit_lsn = flush + MIN_LAG_BYTES);
        assert_eq!(woken_within_50ms(&snapshots).await, Some(true), "behind the quorum");
        owner.send_modify(|snapshot| snapshot.flush_lsn = flush + MIN_LAG_BYTES);
        assert_eq!(woken_within_50ms(&snapshots).await, None, "caught up");
        drop(owner);
        assert_eq!(woken_within_50ms(&snapshots).await, Some(false), "the owner is gone");
    }

    fn peer(port: u16, oldest_kept_lsn: Lsn, commit_lsn: Lsn) -> (SafekeeperAddress, TimelineStatus) {
        let status = TimelineStatus {
            system_id: SystemId(SYSTEM_ID),
            wal_seg_size: WalSegmentSize::new(SEGMENT_BYTES).unwrap(),
            timeline_start_lsn: Lsn(SEGMENT_BYTES),
            flush_lsn: commit_lsn,
            commit_lsn,
            oldest_kept_lsn,
            ..TimelineStatus::default()
        };
        (format!("127.0.0.1:{port}").parse().unwrap(), status)
    }

    fn picked(result: Result<Option<CopySource>, String>) -> (String, Lsn) {
        let source = result.expect("a source").expect("something to copy");
        (source.peer.to_string(), source.start_lsn)
    }

    /// A peer holding WAL from our flush is preferred (the copy continues
    /// our WAL); among those, the most advanced.
    #[test]
    fn a_peer_that_holds_our_end_continues_our_wal() {
        let segment = |n: u64| Lsn(n * SEGMENT_BYTES);
        let empty = ours(segment(1));
        let statuses =
            vec![peer(1, segment(1), segment(5)), peer(2, segment(1), segment(6)), peer(3, segment(4), segment(9))];
        assert_eq!(picked(pick_source(statuses, &empty)), ("127.0.0.1:2".to_string(), segment(1)));
        let caught_up = vec![peer(1, segment(1), segment(1) + (MIN_LAG_BYTES - 1))];
        assert!(pick_source(caught_up, &empty).unwrap().is_none(), "less than MIN_LAG_BYTES behind");
    }

    /// Bootstrap: with our WAL empty and no peer keeping its start, the
    /// copy starts at the most advanced peer's oldest kept WAL, rounded up
    /// to a segment start; a WAL holding anything is never restarted.
    #[test]
    fn an_empty_wal_is_bootstrapped_at_the_first_segment_the_peer_keeps() {
        let segment = |n: u64| Lsn(n * SEGMENT_BYTES);
        let empty = ours(segment(1));
        let statuses = vec![peer(1, segment(3), segment(7)), peer(2, segment(4), segment(9))];
        assert_eq!(picked(pick_source(statuses, &empty)), ("127.0.0.1:2".to_string(), segment(4)));
        let unaligned = vec![peer(1, segment(3) + 100, segment(7))];
        assert_eq!(picked(pick_source(unaligned, &empty)), ("127.0.0.1:1".to_string(), segment(4)));

        let nothing_beyond = vec![peer(1, segment(3) + 100, segment(4) + 100)];
        let error = pick_source(nothing_beyond, &empty).err().expect("nothing committed past the segment start");
        assert!(error.contains("bootstrapping this empty WAL needs committed WAL"), "{error}");

        let holding = ours(segment(1) + 50_000);
        let error = pick_source(vec![peer(1, segment(3), segment(7))], &holding).err().expect("WAL held");
        assert!(error.contains("can only be continued"), "{error}");
        assert!(error.contains("127.0.0.1:1"), "{error}");
    }
}
