//! What streaming sends one safekeeper next, once we are elected: WAL
//! contiguous from its position (never across a segment boundary, bounded
//! per append and per window), else a heartbeat when one is due; or that it
//! is too far behind to be sent WAL at all.

use bytes::Bytes;
use postgres_wal::lsn::{Lsn, WalSegmentSize};

use super::config::{ProposerConfig, MAX_APPEND_CHUNK_BYTES};
use super::peer::{Link, Peer};
use super::wal_source::WalSource;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Nothing now: not streaming, or nothing to send and no heartbeat due.
    Nothing,
    /// An empty append at `at_lsn`: it learns the commit LSN.
    Heartbeat { at_lsn: Lsn },
    /// WAL `[begin_lsn, end_lsn)`; it is then sent up to `end_lsn`.
    Append { begin_lsn: Lsn, end_lsn: Lsn, wal: Bytes },
    /// Its WAL can no longer be sent (the source removed it, or it would not
    /// fit the buffer): it is too far behind from now on. Nothing is sent.
    TooFarBehind,
}

/// What to send `peer` next. No WAL flows until `log_checked` (Postgres's
/// WAL below the term start was shown to be the log's).
pub(super) fn next_send(peer: &Peer, wal: &WalSource, log_checked: bool, config: &ProposerConfig, now_ms: u64) -> Next {
    let heartbeat_due = now_ms.saturating_sub(peer.last_sent_ms) >= config.heartbeat_interval_ms;
    let heartbeat = |at_lsn| if heartbeat_due { Next::Heartbeat { at_lsn } } else { Next::Nothing };
    let next_lsn = match peer.link {
        // Heartbeats only: it learns the commit LSN (peer recovery copies up
        // to it), and its service can end this connection once it caught up,
        // so that the reconnection streams to it again.
        Link::TooFarBehind => return heartbeat(peer.flush_lsn.expect("too-far-behind safekeepers have acknowledged")),
        Link::Streaming { next_lsn } => next_lsn,
        _ => return Next::Nothing,
    };
    let flush_lsn = peer.flush_lsn.expect("streaming safekeepers have acknowledged");
    let Some(buffer_start) = wal.buffer().map(|buffer| buffer.start_lsn()) else {
        // Before WAL flows only what the source removed rules it out.
        return if wal.can_catch_up(next_lsn) { heartbeat(next_lsn) } else { Next::TooFarBehind };
    };
    if !log_checked {
        return heartbeat(next_lsn);
    }
    // Behind the buffer: served from the catch-up WAL once it has arrived,
    // or too far behind if the source cannot resend it.
    let Some(source) = wal.holding(next_lsn) else {
        debug_assert!(next_lsn < buffer_start, "the buffer holds all from its start");
        return if wal.can_catch_up(next_lsn) { heartbeat(next_lsn) } else { Next::TooFarBehind };
    };
    let range =
        next_append_range(next_lsn, flush_lsn, source.end_lsn(), config.wal_segment_size, config.max_in_flight_bytes);
    match range {
        Some((begin_lsn, end_lsn)) => Next::Append { begin_lsn, end_lsn, wal: source.slice(begin_lsn, end_lsn) },
        None => heartbeat(next_lsn),
    }
}

/// The range `[next_lsn, end)` of the next append to a safekeeper that has
/// flushed `flush_lsn` and been sent up to `next_lsn`, with WAL available up
/// to `available_end_lsn`; `None` if nothing is available or the window is full.
pub(super) fn next_append_range(
    next_lsn: Lsn,
    flush_lsn: Lsn,
    available_end_lsn: Lsn,
    segment_size: WalSegmentSize,
    max_in_flight_bytes: u64,
) -> Option<(Lsn, Lsn)> {
    assert!(flush_lsn <= next_lsn, "a safekeeper cannot have flushed what was not sent");
    let in_flight_bytes = next_lsn - flush_lsn;
    if next_lsn >= available_end_lsn || in_flight_bytes >= max_in_flight_bytes {
        return None;
    }
    // An acceptor refuses appends spanning two segment files.
    let to_segment_end = next_lsn.next_segment_start(segment_size) - next_lsn;
    let len = (available_end_lsn - next_lsn)
        .min(to_segment_end)
        .min(MAX_APPEND_CHUNK_BYTES)
        .min(max_in_flight_bytes - in_flight_bytes);
    Some((next_lsn, next_lsn + len))
}

#[cfg(test)]
mod tests {
    use super::super::peer::Peers;
    use super::super::wal_source::TrimScope;
    use super::*;

    fn segment() -> WalSegmentSize {
        WalSegmentSize::new(1 << 20).unwrap()
    }

    const HEARTBEAT_MS: u64 = 100;

    fn config() -> ProposerConfig {
        let config = ProposerConfig::for_tests();
        assert_eq!(config.heartbeat_interval_ms, HEARTBEAT_MS);
        config
    }

    fn peer(link: Link, flush_lsn: Lsn) -> Peer {
        let mut peer = Peer::new("sk".into(), 0);
        peer.link = link;
        peer.flush_lsn = Some(flush_lsn);
        peer
    }

    fn streaming(next_lsn: Lsn, flush_lsn: Lsn) -> Peer {
        peer(Link::Streaming { next_lsn }, flush_lsn)
    }

    /// A source holding `[start, start + len)`.
    fn source(start: Lsn, len: usize) -> WalSource {
        let config = config();
        let mut wal = WalSource::new(config.max_buffered_wal_bytes, config.wal_segment_size);
        wal.take(start, &vec![7; len], &Peers::for_tests(vec![])).unwrap();
        wal
    }

    #[test]
    fn streams_from_the_buffer_then_heartbeats_when_idle() {
        let start = Lsn(1 << 20);
        let wal = source(start, 1000);
        let sent = next_send(&streaming(start + 400, start), &wal, true, &config(), 0);
        let Next::Append { begin_lsn, end_lsn, wal: bytes } = sent else { panic!("{sent:?}") };
        assert_eq!((begin_lsn, end_lsn, bytes.len()), (start + 400, start + 1000, 600));
        let caught_up = streaming(start + 1000, start + 1000);
        assert_eq!(next_send(&caught_up, &wal, true, &config(), HEARTBEAT_MS - 1), Next::Nothing);
        assert_eq!(
            next_send(&caught_up, &wal, true, &config(), HEARTBEAT_MS),
            Next::Heartbeat { at_lsn: start + 1000 }
        );
    }

    /// Rule: no WAL in our term before the log check passed.
    #[test]
    fn no_wal_before_the_log_check() {
        let start = Lsn(1 << 20);
        let wal = source(start, 1000);
        let behind = streaming(start, start);
        assert_eq!(next_send(&behind, &wal, false, &config(), 0), Next::Nothing);
        assert_eq!(next_send(&behind, &wal, false, &config(), HEARTBEAT_MS), Next::Heartbeat { at_lsn: start });
    }

    #[test]
    fn behind_the_buffer_waits_for_the_catch_up_or_is_too_far_behind() {
        let config = config();
        let start = Lsn(4 << 20);
        let mut wal = source(start, 1000);
        wal.trim(&Peers::for_tests(vec![streaming(start + 1000, start + 1000)]), TrimScope::All);
        let lagging = streaming(start + 10, start + 10);
        assert_eq!(next_send(&lagging, &wal, true, &config, 0), Next::Nothing, "waits for the catch-up");
        wal.take_catch_up(start + 10, &[1; 20]);
        let sent = next_send(&lagging, &wal, true, &config, 0);
        assert!(matches!(sent, Next::Append { end_lsn, .. } if end_lsn == start + 30), "{sent:?}");
        wal.on_removed(start + 10);
        let far = streaming(start, start);
        assert_eq!(next_send(&far, &wal, true, &config, 0), Next::TooFarBehind, "its WAL was removed");
    }

    #[test]
    fn before_wal_flows_only_removal_makes_one_too_far_behind() {
        let config = config();
        let mut wal = WalSource::new(config.max_buffered_wal_bytes, config.wal_segment_size);
        let start = Lsn(2 << 20);
        assert_eq!(next_send(&streaming(start, start), &wal, true, &config, 0), Next::Nothing);
        wal.on_removed(start);
        assert_eq!(next_send(&streaming(start, start), &wal, true, &config, 0), Next::TooFarBehind);
    }

    #[test]
    fn too_far_behind_gets_heartbeats_at_its_flush() {
        let start = Lsn(1 << 20);
        let wal = source(start, 1000);
        let far = peer(Link::TooFarBehind, Lsn(5));
        assert_eq!(next_send(&far, &wal, true, &config(), 0), Next::Nothing);
        assert_eq!(next_send(&far, &wal, true, &config(), HEARTBEAT_MS), Next::Heartbeat { at_lsn: Lsn(5) });
        let greeting = peer(Link::Greeted, start);
        assert_eq!(next_send(&greeting, &wal, true, &config(), HEARTBEAT_MS), Next::Nothing, "not streaming");
    }

    /// Rule: appends never span two segments and carry at most 128 KiB.
    #[test]
    fn splits_at_segment_ends_and_chunk_size() {
        let seg_end = Lsn(2 << 20);
        let near_end = Lsn(seg_end.0 - 100);
        assert_eq!(
            next_append_range(near_end, near_end, seg_end + 5000, segment(), 1 << 20),
            Some((near_end, seg_end))
        );
        let start = Lsn(1 << 20);
        let (_, end) = next_append_range(start, start, start + (900 << 10), segment(), 1 << 20).unwrap();
        assert_eq!(end - start, MAX_APPEND_CHUNK_BYTES);
    }

    /// Rule: at most max_in_flight_bytes beyond the acknowledged flush.
    #[test]
    fn window_bounds_unacknowledged_bytes() {
        let flush = Lsn(1 << 20);
        let window = 200 << 10;
        let sent = flush + (150 << 10);
        let (_, end) = next_append_range(sent, flush, flush + (500 << 10), segment(), window).unwrap();
        assert_eq!(end - flush, window);
        assert_eq!(next_append_range(end, flush, flush + (500 << 10), segment(), window), None);
        assert_eq!(next_append_range(end, end, end, segment(), window), None, "nothing available");
    }
}
