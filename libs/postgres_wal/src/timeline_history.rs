//! Postgres timelines: which timeline wrote which LSN range, and the
//! `0000000N.history` file that says so.
//!
//! A server promoted out of recovery ends its timeline at the switch point
//! (the end of the last record it replayed) and writes on a new one. Its
//! history file lists every ancestor with the LSN at which it ended, one
//! line each: `<parent timeline>\t<switch point X/Y>\t<reason>`. The bytes
//! below a switch point are the same on both timelines; the segment that
//! holds a switch point exists, under the new timeline's name, as a copy of
//! the old one up to that point followed by the new timeline's WAL.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::lsn::{Lsn, PgTimelineId, SegmentNo, WalSegmentSize};
use crate::wal::format::PG_FIRST_TIMELINE_ID;
/// Most ancestors a history may list (bounds what a peer can make us store).
pub const MAX_PG_TIMELINE_SWITCHES: usize = 1_000;
/// Most bytes of a reason we keep (Postgres writes a short sentence).
pub const MAX_SWITCH_REASON_BYTES: usize = 256;

/// One ancestor: `timeline` ended at `end_lsn` (the switch point).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgTimelineSwitch {
    pub timeline: PgTimelineId,
    pub end_lsn: Lsn,
    /// Postgres's words for it (a comment; never interpreted).
    #[serde(default)]
    pub reason: String,
}

/// The history of Postgres timeline `current`: its ancestors, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgTimelineHistory {
    pub current: PgTimelineId,
    pub switches: Vec<PgTimelineSwitch>,
}

impl Default for PgTimelineHistory {
    fn default() -> Self {
        PgTimelineHistory::first()
    }
}

/// Why a history (a file, or one sent by a peer) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimelineHistoryError {
    #[error("line {line}: {reason}")]
    BadLine { line: usize, reason: String },
    #[error("timeline {timeline} is listed after timeline {previous}: timelines only go up")]
    NotIncreasing { previous: PgTimelineId, timeline: PgTimelineId },
    #[error("timeline {timeline} ends at {end_lsn}, before its parent's switch point {previous_end_lsn}")]
    SwitchPointsGoBack { timeline: PgTimelineId, end_lsn: Lsn, previous_end_lsn: Lsn },
    #[error("timeline {timeline} cannot descend from timeline {ancestor}: a child's id is above its parents'")]
    NotAChild { ancestor: PgTimelineId, timeline: PgTimelineId },
    #[error("more than {MAX_PG_TIMELINE_SWITCHES} ancestors")]
    TooLong,
    #[error("timeline id 0 is not a Postgres timeline")]
    ZeroTimeline,
}

impl PgTimelineHistory {
    /// Timeline 1, which has no ancestors.
    pub fn first() -> PgTimelineHistory {
        PgTimelineHistory { current: PG_FIRST_TIMELINE_ID, switches: vec![] }
    }

    /// Parse the history file of timeline `current` as Postgres writes it
    /// (`readTimeLineHistory` rules: blank lines and `#` comments skipped,
    /// ids strictly increasing, switch points never decreasing).
    pub fn parse_file(current: PgTimelineId, text: &str) -> Result<PgTimelineHistory, TimelineHistoryError> {
        let mut switches = vec![];
        for (index, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| TimelineHistoryError::BadLine { line: index + 1, reason: reason.to_string() };
            let mut fields = line.splitn(3, ['\t', ' ']);
            let timeline = fields.next().unwrap_or_default();
            let timeline: PgTimelineId = timeline.parse().map_err(|_| bad("the timeline id is not a number"))?;
            let end_lsn = fields.next().ok_or_else(|| bad("no switch point after the timeline id"))?;
            let end_lsn: Lsn = end_lsn.trim().parse().map_err(|_| bad("the switch point is not an LSN X/Y"))?;
            let reason = fields.next().unwrap_or_default().trim();
            let reason = truncate_to_char_boundary(reason, MAX_SWITCH_REASON_BYTES).to_string();
            switches.push(PgTimelineSwitch { timeline, end_lsn, reason });
        }
        let history = PgTimelineHistory { current, switches };
        history.validate()?;
        Ok(history)
    }

    /// The file Postgres would write for this history (`writeTimeLineHistory`).
    pub fn file_text(&self) -> String {
        let mut text = String::new();
        for switch in &self.switches {
            writeln!(text, "{}\t{}\t{}", switch.timeline, switch.end_lsn, switch.reason).expect("writing to a String");
        }
        text
    }

    /// `0000000N.history`, the name of the current timeline's file.
    pub fn file_name(&self) -> String {
        history_file_name(self.current)
    }

    /// Ids strictly increase up to `current`, switch points never decrease.
    pub fn validate(&self) -> Result<(), TimelineHistoryError> {
        if self.switches.len() > MAX_PG_TIMELINE_SWITCHES {
            return Err(TimelineHistoryError::TooLong);
        }
        if self.current == 0 || self.switches.iter().any(|s| s.timeline == 0) {
            return Err(TimelineHistoryError::ZeroTimeline);
        }
        for pair in self.switches.windows(2) {
            let (previous, next) = (&pair[0], &pair[1]);
            if next.timeline <= previous.timeline {
                return Err(TimelineHistoryError::NotIncreasing {
                    previous: previous.timeline,
                    timeline: next.timeline,
                });
            }
            if next.end_lsn < previous.end_lsn {
                return Err(TimelineHistoryError::SwitchPointsGoBack {
                    timeline: next.timeline,
                    end_lsn: next.end_lsn,
                    previous_end_lsn: previous.end_lsn,
                });
            }
        }
        if let Some(last) = self.switches.last() {
            if last.timeline >= self.current {
                return Err(TimelineHistoryError::NotAChild { ancestor: last.timeline, timeline: self.current });
            }
        }
        Ok(())
    }

    /// The timeline that wrote the byte at `lsn` (`tliOfPointInHistory`).
    pub fn timeline_of(&self, lsn: Lsn) -> PgTimelineId {
        self.switches.iter().find(|switch| lsn < switch.end_lsn).map_or(self.current, |switch| switch.timeline)
    }

    /// Where `timeline` ended (`None`: it is the current one, or not in
    /// this history at all, which [`Self::contains`] tells apart).
    pub fn end_of(&self, timeline: PgTimelineId) -> Option<Lsn> {
        self.switches.iter().find(|switch| switch.timeline == timeline).map(|switch| switch.end_lsn)
    }

    /// Where this history left `timeline`, an older one than its current:
    /// its switch point, or (a timeline this history never had) the first
    /// switch to a timeline above it. Names the point a proposer of an old
    /// timeline was superseded at.
    pub fn left_at(&self, timeline: PgTimelineId) -> Lsn {
        self.end_of(timeline)
            .or_else(|| self.switches.iter().find(|switch| switch.timeline > timeline).map(|switch| switch.end_lsn))
            .or_else(|| self.switches.last().map(|switch| switch.end_lsn))
            .unwrap_or_default()
    }

    /// Whether `timeline` is the current timeline or one of its ancestors.
    pub fn contains(&self, timeline: PgTimelineId) -> bool {
        timeline == self.current || self.end_of(timeline).is_some()
    }

    /// The timeline that followed `timeline`, and where it began.
    pub fn successor_of(&self, timeline: PgTimelineId) -> Option<(PgTimelineId, Lsn)> {
        let index = self.switches.iter().position(|switch| switch.timeline == timeline)?;
        let next = self.switches.get(index + 1).map_or(self.current, |switch| switch.timeline);
        Some((next, self.switches[index].end_lsn))
    }

    /// The history of an ancestor (or of the current timeline): the
    /// switches before it. `None` if `timeline` is not in this history.
    pub fn of_ancestor(&self, timeline: PgTimelineId) -> Option<PgTimelineHistory> {
        if timeline == self.current {
            return Some(self.clone());
        }
        let index = self.switches.iter().position(|switch| switch.timeline == timeline)?;
        Some(PgTimelineHistory { current: timeline, switches: self.switches[..index].to_vec() })
    }

    /// The Postgres timeline whose name a segment file carries: the one
    /// that wrote its last byte (the segment holding a switch point is the
    /// new timeline's, as in the promoted server's `pg_wal`).
    pub fn timeline_of_segment(&self, segment: SegmentNo, size: WalSegmentSize) -> PgTimelineId {
        // The last segment of the LSN space ends at u64::MAX: no overflow.
        let last_byte = Lsn(segment.start_lsn(size).0 + (size.bytes() - 1));
        self.timeline_of(last_byte)
    }

    /// The segment file name of `segment` in this history.
    pub fn segment_file_name(&self, segment: SegmentNo, size: WalSegmentSize) -> String {
        segment.file_name(self.timeline_of_segment(segment, size), size)
    }

    /// The part of this history a log starting at `start_lsn` needs:
    /// ancestors that ended at or below it wrote none of its bytes.
    pub fn from_lsn(&self, start_lsn: Lsn) -> PgTimelineHistory {
        let switches = self.switches.iter().filter(|switch| switch.end_lsn > start_lsn).cloned().collect();
        PgTimelineHistory { current: self.current, switches }
    }

    /// Whether `self` and `other` say the same about which timeline wrote
    /// each byte below `end_lsn`.
    pub fn agrees_below(&self, other: &PgTimelineHistory, end_lsn: Lsn) -> bool {
        let ends = |history: &PgTimelineHistory| -> Vec<(PgTimelineId, Lsn)> {
            let mut runs: Vec<(PgTimelineId, Lsn)> =
                history.switches.iter().filter(|s| s.end_lsn < end_lsn).map(|s| (s.timeline, s.end_lsn)).collect();
            runs.push((history.timeline_of(Lsn(end_lsn.0.saturating_sub(1))), end_lsn));
            runs
        };
        !end_lsn.is_valid() || ends(self) == ends(other)
    }
}

/// `0000000N.history`: the name of timeline `timeline`'s history file.
pub fn history_file_name(timeline: PgTimelineId) -> String {
    format!("{timeline:08X}.history")
}

/// The timeline a `0000000N.history` name names.
pub fn parse_history_file_name(name: &str) -> Option<PgTimelineId> {
    let hex = name.strip_suffix(".history")?;
    let valid = hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| u32::from_str_radix(hex, 16).ok()).flatten().filter(|&timeline| timeline != 0)
}

fn truncate_to_char_boundary(text: &str, max_bytes: usize) -> &str {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT_16_MIB: WalSegmentSize = WalSegmentSize::DEFAULT;

    fn switch(timeline: PgTimelineId, end: u64) -> PgTimelineSwitch {
        PgTimelineSwitch { timeline, end_lsn: Lsn(end), reason: "no recovery target specified".to_string() }
    }

    fn two_switches() -> PgTimelineHistory {
        PgTimelineHistory { current: 3, switches: vec![switch(1, 0x300_0100), switch(2, 0x500_0000)] }
    }

    #[test]
    fn a_postgres_file_round_trips() {
        // As Postgres 15 writes it after two promotions.
        let text = "1\t0/3000100\tno recovery target specified\n2\t0/5000000\tno recovery target specified\n";
        let history = PgTimelineHistory::parse_file(3, text).unwrap();
        assert_eq!(history, two_switches());
        assert_eq!(history.file_text(), text);
        assert_eq!(history.file_name(), "00000003.history");
        assert_eq!(parse_history_file_name("00000003.history"), Some(3));
        assert_eq!(parse_history_file_name("0000000G.history"), None);
        assert_eq!(parse_history_file_name("00000000.history"), None);
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let text = "# a comment\n\n  1\t0/3000100\tend\n";
        let history = PgTimelineHistory::parse_file(2, text).unwrap();
        assert_eq!(
            history.switches,
            vec![PgTimelineSwitch { timeline: 1, end_lsn: Lsn(0x300_0100), reason: "end".into() }]
        );
    }

    #[test]
    fn bad_files_name_the_line_and_the_rule() {
        let cases = [
            ("x\t0/1\tr\n", "line 1"),
            ("1\n", "no switch point"),
            ("1\tzz\tr\n", "not an LSN"),
            ("2\t0/10\tr\n1\t0/20\tr\n", "only go up"),
            ("1\t0/20\tr\n2\t0/10\tr\n", "before its parent"),
            ("1\t0/20\tr\n3\t0/30\tr\n", "cannot descend"),
        ];
        for (text, expected) in cases {
            let error = PgTimelineHistory::parse_file(3, text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn each_byte_belongs_to_the_timeline_that_wrote_it() {
        let history = two_switches();
        assert_eq!(history.timeline_of(Lsn(0x300_00FF)), 1);
        assert_eq!(history.timeline_of(Lsn(0x300_0100)), 2, "the switch point is the new timeline's first byte");
        assert_eq!(history.timeline_of(Lsn(0x4FF_FFFF)), 2);
        assert_eq!(history.timeline_of(Lsn(0x500_0000)), 3);
        assert_eq!(history.end_of(1), Some(Lsn(0x300_0100)));
        assert_eq!(history.end_of(3), None);
        assert_eq!(history.successor_of(1), Some((2, Lsn(0x300_0100))));
        assert_eq!(history.successor_of(2), Some((3, Lsn(0x500_0000))));
        assert_eq!(history.successor_of(3), None);
        assert!(history.contains(3) && history.contains(1) && !history.contains(4));
        assert_eq!(history.left_at(1), Lsn(0x300_0100));
        let skipped_two = PgTimelineHistory { current: 3, switches: vec![switch(1, 0x300_0100)] };
        assert_eq!(skipped_two.left_at(2), Lsn(0x300_0100), "never on 2: left where it went above it");
        assert_eq!(
            history.of_ancestor(2).unwrap(),
            PgTimelineHistory { current: 2, switches: vec![switch(1, 0x300_0100)] }
        );
    }

    #[test]
    fn segments_are_named_as_in_the_promoted_servers_pg_wal() {
        let history = two_switches();
        // The switch to 2 is inside segment 3: that segment is 2's.
        assert_eq!(history.segment_file_name(SegmentNo(2), SEGMENT_16_MIB), "000000010000000000000002");
        assert_eq!(history.segment_file_name(SegmentNo(3), SEGMENT_16_MIB), "000000020000000000000003");
        // The switch to 3 is at the start of segment 5: segment 4 stays 2's.
        assert_eq!(history.segment_file_name(SegmentNo(4), SEGMENT_16_MIB), "000000020000000000000004");
        assert_eq!(history.segment_file_name(SegmentNo(5), SEGMENT_16_MIB), "000000030000000000000005");
    }

    /// A client may name the last segment of the LSN space.
    #[test]
    fn the_last_segment_has_a_name() {
        let last = SegmentNo(u64::MAX / SEGMENT_16_MIB.bytes());
        assert_eq!(two_switches().timeline_of_segment(last, SEGMENT_16_MIB), 3);
    }

    #[test]
    fn agreement_is_about_the_bytes_below_a_point() {
        let history = two_switches();
        let only_first = PgTimelineHistory { current: 2, switches: vec![switch(1, 0x300_0100)] };
        assert!(history.agrees_below(&only_first, Lsn(0x500_0000)));
        assert!(!history.agrees_below(&only_first, Lsn(0x500_0001)));
        assert!(!history.agrees_below(&PgTimelineHistory::first(), Lsn(0x300_0101)));
        assert!(history.agrees_below(&PgTimelineHistory::first(), Lsn(0x300_0100)));
        assert_eq!(history.from_lsn(Lsn(0x400_0000)).switches, vec![switch(2, 0x500_0000)]);
    }
}
