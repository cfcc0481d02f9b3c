//! Which WAL a safekeeper may remove: the policy, as a pure function.
//!
//! WAL is kept for two readers: the page server, which reports with
//! `remote_consistent_lsn` what it has made durable on its side, and the
//! quorum itself (a lagging peer or a restarted proposer reads committed WAL
//! back). So only segments wholly below
//! `min(remote_consistent_lsn, commit_lsn) - one segment - keep_bytes` go:
//! nothing a consumer has not confirmed, nothing uncommitted, and one whole
//! segment of slack below the point both agree on (a consumer restarting at
//! its confirmed position still finds the segment it starts in). Without any
//! feedback (`remote_consistent_lsn` zero) nothing is removed at all.

use postgres_wal::lsn::{Lsn, WalSegmentSize};

/// How much WAL to keep beyond what the rule above requires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// `--wal-keep-bytes`: extra bytes kept below the horizon.
    pub keep_bytes: u64,
}

impl RetentionPolicy {
    /// The segment start below which every segment may be removed (`Lsn(0)`:
    /// nothing may go).
    pub fn removable_end(&self, commit_lsn: Lsn, remote_consistent_lsn: Lsn, segment_size: WalSegmentSize) -> Lsn {
        let confirmed = commit_lsn.min(remote_consistent_lsn);
        let slack_bytes = segment_size.bytes().saturating_add(self.keep_bytes);
        let end = Lsn(confirmed.0.saturating_sub(slack_bytes)).segment_start(segment_size);
        debug_assert!(end <= commit_lsn && end <= remote_consistent_lsn);
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn seg() -> WalSegmentSize {
        WalSegmentSize::new(SEG).unwrap()
    }

    #[test]
    fn keeps_everything_without_feedback() {
        let policy = RetentionPolicy::default();
        assert_eq!(policy.removable_end(Lsn(100 * SEG), Lsn(0), seg()), Lsn(0));
    }

    #[test]
    fn keeps_one_segment_below_the_lower_of_commit_and_feedback() {
        let policy = RetentionPolicy::default();
        // Feedback ahead of commit (it came from a faster safekeeper's WAL):
        // commit bounds it.
        assert_eq!(policy.removable_end(Lsn(10 * SEG + 5), Lsn(20 * SEG), seg()), Lsn(9 * SEG));
        assert_eq!(policy.removable_end(Lsn(20 * SEG), Lsn(10 * SEG + 5), seg()), Lsn(9 * SEG));
        // Exactly at a boundary: the segment before it is the slack.
        assert_eq!(policy.removable_end(Lsn(20 * SEG), Lsn(10 * SEG), seg()), Lsn(9 * SEG));
        assert_eq!(policy.removable_end(Lsn(20 * SEG), Lsn(SEG + 1), seg()), Lsn(0));
    }

    #[test]
    fn keep_bytes_keeps_more() {
        let policy = RetentionPolicy { keep_bytes: 3 * SEG };
        assert_eq!(policy.removable_end(Lsn(20 * SEG), Lsn(10 * SEG), seg()), Lsn(6 * SEG));
        let huge = RetentionPolicy { keep_bytes: u64::MAX };
        assert_eq!(huge.removable_end(Lsn(20 * SEG), Lsn(10 * SEG), seg()), Lsn(0));
    }
}
