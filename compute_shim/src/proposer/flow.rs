//! Which WAL to send one safekeeper next: contiguous from its position,
//! never across a segment boundary, bounded per append and per window.

use postgres_wal::lsn::{Lsn, WalSegmentSize};

use super::config::MAX_APPEND_CHUNK_BYTES;

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
    use super::*;

    fn segment() -> WalSegmentSize {
        WalSegmentSize::new(1 << 20).unwrap()
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
