//! Proposer configuration and the fixed limits it is checked against.

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::timeline_history::PgTimelineHistory;
use safekeeper_protocol::ids::ClusterId;
use safekeeper_protocol::protocol::MAX_APPEND_PAYLOAD_BYTES;

/// Largest WAL payload the proposer puts in one AppendRequest: the size of a
/// Postgres XLogData message, so one chunk from Postgres is one append.
pub const MAX_APPEND_CHUNK_BYTES: u64 = 128 * 1024;
const _: () = assert!(MAX_APPEND_CHUNK_BYTES as usize <= MAX_APPEND_PAYLOAD_BYTES);

/// The smallest WAL buffer: room for a whole XLogData message beside the
/// unfinished record at its end (of up to a message; a longer record needs
/// a buffer of its length plus a message, see `assert_valid`).
pub const MIN_BUFFERED_WAL_BYTES: u64 = 2 * MAX_APPEND_CHUNK_BYTES;

/// Most safekeepers one proposer drives (a quorum of 8 is plenty).
pub const MAX_SAFEKEEPERS: usize = 15;

/// Control messages (Greeting, VoteRequest, ProposerElected) queued for one
/// safekeeper. At most one of each is outstanding per connection.
pub const MAX_QUEUED_CONTROL_MESSAGES: usize = 4;

#[derive(Clone, Debug)]
pub struct ProposerConfig {
    pub cluster: ClusterId,
    pub pg_version: u32,
    pub wal_segment_size: WalSegmentSize,
    /// The safekeepers' pg addresses from the command line: the set until
    /// a safekeeper shows a configuration (docs/proposer.md, "Membership").
    pub safekeepers: Vec<String>,
    /// WAL sent to one safekeeper beyond its acknowledged flush LSN. Must
    /// exceed the largest WAL record: an acceptor acknowledges only record
    /// ends, so a record longer than the window can never be acknowledged.
    pub max_in_flight_bytes: u64,
    /// WAL from Postgres held for safekeepers that have not flushed it yet.
    pub max_buffered_wal_bytes: u64,
    /// An idle safekeeper gets an empty append (carrying commit_lsn) this often.
    pub heartbeat_interval_ms: u64,
    /// A connected safekeeper that sent nothing for this long (it answers
    /// every heartbeat) is disconnected and reconnected: a hung process or
    /// link must not hold a connection, or WAL, for good.
    pub silence_timeout_ms: u64,
    pub proposer_id: [u8; 16],
    /// The segment start from which Postgres can stream (the segment holding
    /// the slot's restart_lsn, or IDENTIFY_SYSTEM's xlogpos for a new slot).
    /// A timeline whose safekeepers are all empty starts here.
    pub timeline_start_lsn: Lsn,
    pub mode: ProposerMode,
    /// Postgres's timeline and its ancestors (`TIMELINE_HISTORY`), which
    /// the term writes into the log; `None` without Postgres (a sync
    /// adopts the donor's).
    pub pg_timelines: Option<PgTimelineHistory>,
}

/// What the proposer is for: where its WAL comes from and when it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProposerMode {
    /// The shim's service: stream a Postgres primary's WAL for good.
    /// `postgres_flush_lsn`: Postgres's flush LSN at startup
    /// (IDENTIFY_SYSTEM's xlogpos); the proposer refuses to lead if the
    /// safekeepers' log ends beyond it.
    Stream { postgres_flush_lsn: Lsn },
    /// `sync-safekeepers` (docs/failover.md): no Postgres. The WAL source is
    /// the election's donor; nothing is checked against Postgres; the
    /// proposer is done ([`super::Proposer::synced_lsn`]) once the donor's
    /// log end is committed and every safekeeper it talks to knows it.
    /// `timeline_start_lsn` is then only a floor below any real log.
    Sync,
}

impl ProposerConfig {
    /// The config is built by the driver from constants and Postgres's
    /// answers; a bad one is a programming error, so this panics.
    pub(super) fn assert_valid(&self) {
        let count = self.safekeepers.len();
        assert!((1..=MAX_SAFEKEEPERS).contains(&count), "1..={MAX_SAFEKEEPERS} safekeepers");
        let distinct: std::collections::BTreeSet<&String> = self.safekeepers.iter().collect();
        assert_eq!(distinct.len(), count, "each safekeeper named once");
        assert!(self.max_in_flight_bytes >= MAX_APPEND_CHUNK_BYTES, "in-flight window below one append");
        // Safekeepers acknowledge record ends only, so the unfinished record
        // at the buffer's end stays in it until the rest arrives, and the
        // driver reads Postgres only while a whole XLogData message fits: a
        // buffer of one message stalls commits for good (the liveness
        // simulation found it). Records up to a message long need two.
        assert!(self.max_buffered_wal_bytes >= MIN_BUFFERED_WAL_BYTES, "WAL buffer below two XLogData messages");
        assert!(self.heartbeat_interval_ms > 0, "heartbeat interval must be positive");
        assert!(
            self.silence_timeout_ms >= 2 * self.heartbeat_interval_ms,
            "the silence timeout must allow a heartbeat and its answer"
        );
        let start = self.timeline_start_lsn;
        assert!(start.is_valid() && start.is_segment_start(self.wal_segment_size), "timeline start {start}");
        if let ProposerMode::Stream { postgres_flush_lsn } = self.mode {
            assert!(postgres_flush_lsn >= start, "Postgres's flush LSN is below where it can stream from");
        }
    }

    /// Three safekeepers, 1 MiB segments, a timeline from the first one.
    #[cfg(test)]
    pub(super) fn for_tests() -> Self {
        const SEG: u64 = 1 << 20;
        ProposerConfig {
            cluster: ClusterId::default(),
            pg_version: 150000,
            wal_segment_size: WalSegmentSize::new(SEG).unwrap(),
            safekeepers: vec!["a".into(), "b".into(), "c".into()],
            max_in_flight_bytes: 1 << 20,
            max_buffered_wal_bytes: 4 << 20,
            heartbeat_interval_ms: 100,
            proposer_id: [0; 16],
            timeline_start_lsn: Lsn(SEG),
            silence_timeout_ms: 10 * 500,
            mode: ProposerMode::Stream { postgres_flush_lsn: Lsn(10 * SEG) },
            pg_timelines: Some(PgTimelineHistory::first()),
        }
    }
}
