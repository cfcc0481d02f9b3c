//! Per-resource-manager record and byte counters.
//!
//! Names are PG15's, exactly as `pg_waldump --stats` prints them, so the
//! stub's counts can be compared with pg_waldump's line by line.

use std::collections::BTreeMap;
use std::fmt;

use postgres_wal::wal::DecodedRecord;
use serde::{Deserialize, Serialize};

pub use postgres_wal::wal::format::{rmgr_id_by_name, rmgr_name, PG15_RMGR_NAMES};

/// Records and their bytes (`xl_tot_len`: header and data, without page
/// headers or alignment padding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counter {
    pub records: u64,
    pub bytes: u64,
}

impl Counter {
    fn add(&mut self, records: u64, bytes: u64) {
        self.records += records;
        self.bytes += bytes;
    }
}

impl fmt::Display for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} records, {} bytes", self.records, self.bytes)
    }
}

/// Counters per resource manager id plus the totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    per_rmgr: BTreeMap<u8, Counter>,
    total: Counter,
}

/// A saved counter names a resource manager PG15 does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown resource manager name {0:?}")]
pub struct UnknownRmgrName(pub String);

impl WalStats {
    pub fn count(&mut self, record: &DecodedRecord) {
        let bytes = u64::from(record.total_len_bytes);
        self.per_rmgr.entry(record.rmgr_id).or_default().add(1, bytes);
        self.total.add(1, bytes);
    }

    /// Add every counter of `other` (used to show settled plus in-flight records).
    pub fn merged_with(&self, other: &WalStats) -> WalStats {
        let mut merged = self.clone();
        for (&rmgr_id, counter) in &other.per_rmgr {
            merged.per_rmgr.entry(rmgr_id).or_default().add(counter.records, counter.bytes);
        }
        merged.total.add(other.total.records, other.total.bytes);
        merged
    }

    pub fn total(&self) -> Counter {
        self.total
    }

    pub fn per_rmgr_id(&self) -> &BTreeMap<u8, Counter> {
        &self.per_rmgr
    }

    /// The counters keyed by pg_waldump's names.
    pub fn by_name(&self) -> BTreeMap<String, Counter> {
        self.per_rmgr.iter().map(|(&rmgr_id, &counter)| (rmgr_name(rmgr_id), counter)).collect()
    }

    /// Rebuild from counters keyed by name; the total is their sum.
    pub fn from_names(by_name: &BTreeMap<String, Counter>) -> Result<WalStats, UnknownRmgrName> {
        let mut stats = WalStats::default();
        for (name, counter) in by_name {
            let rmgr_id = rmgr_id_by_name(name).ok_or_else(|| UnknownRmgrName(name.clone()))?;
            stats.per_rmgr.entry(rmgr_id).or_default().add(counter.records, counter.bytes);
            stats.total.add(counter.records, counter.bytes);
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_wal::lsn::Lsn;
    use postgres_wal::wal::format::{MAX_BUILTIN_RMGR_ID, MIN_CUSTOM_RMGR_ID};

    fn record(rmgr_id: u8, total_len_bytes: u32) -> DecodedRecord {
        DecodedRecord {
            start_lsn: Lsn(0x28),
            end_lsn: Lsn(0x28 + u64::from(total_len_bytes)),
            prev_lsn: Lsn(0),
            total_len_bytes,
            xid: 1,
            rmgr_id,
            info: 0,
        }
    }

    /// Names are pg_waldump's: built-in ids by rmgrlist.h order, custom ids
    /// as `customNNN`; every name maps back to its id.
    #[test]
    fn names_match_pg_waldump_and_round_trip() {
        assert_eq!(rmgr_name(0), "XLOG");
        assert_eq!(rmgr_name(10), "Heap");
        assert_eq!(rmgr_name(21), "LogicalMessage");
        assert_eq!(rmgr_name(128), "custom128");
        for rmgr_id in (0..=MAX_BUILTIN_RMGR_ID).chain(MIN_CUSTOM_RMGR_ID..=u8::MAX) {
            assert_eq!(rmgr_id_by_name(&rmgr_name(rmgr_id)), Some(rmgr_id));
        }
        assert_eq!(rmgr_id_by_name("custom12"), None, "not a custom id");
        assert_eq!(rmgr_id_by_name("custom0200"), None, "not the canonical spelling");
        assert_eq!(rmgr_id_by_name("heap"), None);
    }

    #[test]
    fn counts_per_rmgr_and_survive_a_round_trip_by_name() {
        let mut stats = WalStats::default();
        for (rmgr_id, len) in [(10, 100), (10, 60), (1, 34), (130, 24)] {
            stats.count(&record(rmgr_id, len));
        }
        assert_eq!(stats.total(), Counter { records: 4, bytes: 218 });
        let by_name = stats.by_name();
        assert_eq!(by_name["Heap"], Counter { records: 2, bytes: 160 });
        assert_eq!(by_name["Transaction"], Counter { records: 1, bytes: 34 });
        assert_eq!(by_name["custom130"], Counter { records: 1, bytes: 24 });
        assert_eq!(WalStats::from_names(&by_name).unwrap(), stats);
        let bad = BTreeMap::from([("Heap3".to_string(), Counter::default())]);
        assert_eq!(WalStats::from_names(&bad), Err(UnknownRmgrName("Heap3".into())));
    }

    #[test]
    fn merging_adds_counters() {
        let mut settled = WalStats::default();
        settled.count(&record(10, 100));
        let mut in_flight = WalStats::default();
        in_flight.count(&record(0, 24));
        let merged = settled.merged_with(&in_flight);
        assert_eq!(merged.total(), Counter { records: 2, bytes: 124 });
        assert_eq!(merged.per_rmgr_id().len(), 2);
    }
}
