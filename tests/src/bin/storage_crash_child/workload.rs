//! The deterministic WAL stream shared by the crash-test child (which writes
//! it) and the parent test (which checks what survived).
//!
//! The stream is a function of a seed and a history of epochs: records
//! starting at or after an epoch's LSN take their content from that epoch's
//! nonce. A truncation to T followed by new WAL starts a new epoch at T, so
//! stale bytes of the old epoch that survived a truncation would not match.
//!
//! Each side uses part of this file (the parent includes it with `#[path]`).
#![allow(dead_code)]

use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::wal::generator::WalGenerator;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use safekeeper_core::control::{ControlState, TermHistory, TermStart};
use safekeeper_protocol::ids::{ClusterId, SystemId, Term};

/// Small segments so a run crosses many segment boundaries.
pub const SEGMENT_SIZE_BYTES: u64 = 1 << 20;
pub const SYSTEM_ID: u64 = 7_300_000_000_000_000_042;
/// The timeline starts at segment 1.
pub const START_LSN: Lsn = Lsn(SEGMENT_SIZE_BYTES);

pub fn segment_size() -> WalSegmentSize {
    WalSegmentSize::new(SEGMENT_SIZE_BYTES).expect("a valid segment size")
}

/// Term history entries in `control` mode: a body of tens of KiB.
const CONTROL_MODE_HISTORY_ENTRIES: u64 = 1000;

pub fn new_control_state(commit_lsn: Lsn) -> ControlState {
    ControlState {
        cluster: ClusterId { system_id: SystemId(SYSTEM_ID), ..Default::default() },
        pg_version: 150_000,
        wal_segment_size: segment_size(),
        term: Term(1),
        term_history: TermHistory(vec![TermStart { term: Term(1), start_lsn: START_LSN }]),
        timeline_start_lsn: START_LSN,
        commit_lsn,
        remote_consistent_lsn: Lsn::INVALID,
        membership: Default::default(),
        pg_timelines: Default::default(),
    }
}

/// The control state the `control` mode writes for term `term`.
pub fn control_state_for_term(term: u64) -> ControlState {
    let mut state = new_control_state(Lsn(START_LSN.0 + term * 8));
    state.term = Term(term);
    let first = term.saturating_sub(CONTROL_MODE_HISTORY_ENTRIES) + 1;
    state.term_history =
        TermHistory((first..=term).map(|t| TermStart { term: Term(t), start_lsn: Lsn(t * 16) }).collect());
    state
}

/// A new epoch of content beginning at `lsn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch {
    pub lsn: Lsn,
    pub nonce: u64,
}

impl Epoch {
    pub fn to_arg(self) -> String {
        format!("{}@{}", self.lsn, self.nonce)
    }

    pub fn parse(text: &str) -> Result<Epoch, String> {
        let (lsn, nonce) = text.split_once('@').ok_or_else(|| format!("bad epoch {text:?}"))?;
        Ok(Epoch {
            lsn: lsn.parse().map_err(|e| format!("{e}"))?,
            nonce: nonce.parse().map_err(|e| format!("bad nonce in {text:?}: {e}"))?,
        })
    }
}

/// Add an epoch at `epoch.lsn`, dropping those it truncated away.
pub fn push_epoch(history: &mut Vec<Epoch>, epoch: Epoch) {
    history.retain(|e| e.lsn < epoch.lsn);
    history.push(epoch);
}

#[derive(Clone)]
pub struct Workload {
    seed: u64,
    generator: WalGenerator,
    content: StdRng,
    history: Vec<Epoch>,
    /// Index into `history` of the next epoch to start.
    next_epoch: usize,
}

impl Workload {
    pub fn new(seed: u64, history: Vec<Epoch>) -> Self {
        Workload {
            seed,
            generator: WalGenerator::new(SYSTEM_ID, segment_size(), START_LSN),
            content: StdRng::seed_from_u64(seed),
            history,
            next_epoch: 0,
        }
    }

    pub fn end_lsn(&self) -> Lsn {
        self.generator.end_lsn()
    }

    pub fn take_bytes(&mut self) -> (Lsn, Vec<u8>) {
        self.generator.take_bytes()
    }

    /// Start a new epoch at the current end (after a truncation to it).
    pub fn begin_epoch(&mut self, nonce: u64) {
        let epoch = Epoch { lsn: self.end_lsn(), nonce };
        push_epoch(&mut self.history, epoch);
        self.next_epoch = self.history.len() - 1;
    }

    /// Append the next record: mostly small, some spanning pages, a few
    /// spanning segments, now and then an XLOG SWITCH.
    pub fn append_record(&mut self) {
        if let Some(epoch) = self.history.get(self.next_epoch).filter(|e| e.lsn == self.end_lsn()) {
            self.content = StdRng::seed_from_u64(self.seed ^ epoch.nonce.rotate_left(17));
            self.next_epoch += 1;
        }
        let kind = self.content.gen_range(0..1000);
        if kind < 5 {
            self.generator.append_switch();
            return;
        }
        let len = match kind {
            5..=704 => self.content.gen_range(0..200),
            705..=954 => self.content.gen_range(200..20_000),
            955..=994 => self.content.gen_range(20_000..300_000),
            _ => self.content.gen_range(1_000_000..2_500_000),
        };
        let mut payload = vec![0u8; len];
        self.content.fill_bytes(&mut payload);
        let rmgr_id = [1u8, 9, 10, 11][self.content.gen_range(0..4)];
        let xid = self.content.next_u32();
        self.generator.append_record(rmgr_id, 0, xid, &payload);
    }

    /// Generate (and discard) records until the end is exactly `lsn`,
    /// showing `visit` the stream at each record boundary on the way.
    pub fn advance_to(&mut self, lsn: Lsn, mut visit: impl FnMut(&Workload)) -> Result<(), String> {
        while self.end_lsn() < lsn {
            visit(self);
            self.append_record();
            self.take_bytes();
        }
        if self.end_lsn() != lsn {
            return Err(format!("{lsn} is not a record boundary of the stream (next boundary {})", self.end_lsn()));
        }
        Ok(())
    }
}

/// The stream's bytes `[START_LSN, end)`, or an error if `end` is not a
/// record boundary of it.
pub fn expected_wal(seed: u64, history: &[Epoch], end: Lsn) -> Result<Vec<u8>, String> {
    let mut workload = Workload::new(seed, history.to_vec());
    let mut bytes = Vec::new();
    while workload.end_lsn() < end {
        workload.append_record();
        bytes.extend(workload.take_bytes().1);
    }
    if workload.end_lsn() != end {
        return Err(format!("{end} is not a record boundary of the stream (next boundary {})", workload.end_lsn()));
    }
    Ok(bytes)
}
