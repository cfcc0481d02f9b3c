//! The durable per-timeline state of an acceptor (what the control file holds).

use serde::{Deserialize, Serialize};

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::timeline_history::PgTimelineHistory;
use safekeeper_protocol::ids::{ClusterId, Term};
use safekeeper_protocol::membership::Configuration;
// The term history is part of the protocol (votes and ProposerElected carry
// it); the control state stores it.
pub use safekeeper_protocol::term_history::{TermHistory, TermStart, MAX_TERM_HISTORY_ENTRIES};

/// Everything an acceptor must not forget across a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    pub cluster: ClusterId,
    pub pg_version: u32,
    pub wal_segment_size: WalSegmentSize,
    /// Highest term seen and promised: votes for lower terms are refused.
    pub term: Term,
    pub term_history: TermHistory,
    /// First LSN of this timeline's WAL on this safekeeper (a segment start).
    pub timeline_start_lsn: Lsn,
    /// Commit LSN as of the last control-file write; recovery decodes from
    /// here (a record boundary), so it is the checkpoint of the WAL scan.
    pub commit_lsn: Lsn,
    /// Highest position the WAL consumer (the page server) reported durable
    /// on its side; retention removes WAL only below it. Zero: none yet.
    /// (Absent from control files written before retention existed.)
    #[serde(default)]
    pub remote_consistent_lsn: Lsn,
    /// The safekeeper set as last written by a proposer (generation 0: none
    /// yet; absent from control files written before membership changes).
    #[serde(default)]
    pub membership: Configuration,
    /// Which Postgres timeline wrote which part of the log, as the elected
    /// proposer said (names the segment files; absent from control files
    /// written before timeline switches: timeline 1 throughout).
    #[serde(default)]
    pub pg_timelines: PgTimelineHistory,
}

impl ControlState {
    /// A timeline that holds no WAL and has seen no term yet.
    pub fn new_timeline(cluster: ClusterId, pg_version: u32, wal_segment_size: WalSegmentSize) -> ControlState {
        ControlState {
            cluster,
            pg_version,
            wal_segment_size,
            term: Term(0),
            term_history: TermHistory::default(),
            timeline_start_lsn: Lsn::INVALID,
            commit_lsn: Lsn::INVALID,
            remote_consistent_lsn: Lsn::INVALID,
            membership: Configuration::default(),
            pg_timelines: PgTimelineHistory::first(),
        }
    }
}
