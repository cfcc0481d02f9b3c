//! Prometheus metrics (`GET /metrics`), on the `prometheus` crate: its
//! registry, label families and text encoder, and its Linux process
//! collector (CPU seconds, resident memory, open file descriptors).
//!
//! Counters and histograms are updated where things happen (the owner
//! thread holds its timeline's labelled handles: one atomic add each). LSNs,
//! terms and connection counts are gauges set from the status snapshots at
//! scrape time, so they can never disagree with `/v1/status`.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use safekeeper_protocol::ids::{TenantId, TimelineId};

const TIMELINE_LABELS: &[&str] = &["tenant_id", "timeline_id"];

pub struct Metrics {
    registry: Registry,
    flush_lsn: IntGaugeVec,
    commit_lsn: IntGaugeVec,
    remote_consistent_lsn: IntGaugeVec,
    oldest_kept_lsn: IntGaugeVec,
    term: IntGaugeVec,
    disk_bytes: IntGaugeVec,
    connected_proposers: IntGaugeVec,
    connected_consumers: IntGaugeVec,
    wal_bytes_written: IntCounterVec,
    wal_bytes_served: IntCounterVec,
    removed_segments: IntCounterVec,
    peer_recovery_bytes: IntCounterVec,
    peer_recovery_rounds: IntCounterVec,
    sync_seconds: HistogramVec,
    appends_per_sync: HistogramVec,
}

/// The handles one timeline's owner and readers update.
#[derive(Clone)]
pub struct TimelineMetrics {
    pub wal_bytes_written: IntCounter,
    pub wal_bytes_served: IntCounter,
    pub removed_segments: IntCounter,
    pub peer_recovery_bytes: IntCounter,
    pub peer_recovery_rounds: IntCounter,
    pub sync_seconds: Histogram,
    pub appends_per_sync: Histogram,
}

/// What the scrape reads off one timeline's status.
pub struct TimelineGauges {
    pub flush_lsn: u64,
    pub commit_lsn: u64,
    pub remote_consistent_lsn: u64,
    pub oldest_kept_lsn: u64,
    pub term: u64,
    pub disk_bytes: u64,
    pub connected_proposers: usize,
    pub connected_consumers: usize,
}

impl TimelineGauges {
    /// The values in the order of [`Metrics::gauge_families`].
    fn in_family_order(&self) -> [u64; 8] {
        [
            self.flush_lsn,
            self.commit_lsn,
            self.remote_consistent_lsn,
            self.oldest_kept_lsn,
            self.term,
            self.disk_bytes,
            self.connected_proposers as u64,
            self.connected_consumers as u64,
        ]
    }
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let family = IntGaugeVec::new(Opts::new(name, help), TIMELINE_LABELS).expect("valid metric definition");
    registry.register(Box::new(family.clone())).expect("metric names are unique");
    family
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    let family = IntCounterVec::new(Opts::new(name, help), TIMELINE_LABELS).expect("valid metric definition");
    registry.register(Box::new(family.clone())).expect("metric names are unique");
    family
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    let family = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), TIMELINE_LABELS)
        .expect("valid metric definition");
    registry.register(Box::new(family.clone())).expect("metric names are unique");
    family
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Only on Linux does the crate know how to read /proc; elsewhere the
        // process metrics are simply absent.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("the process collector registers once");
        let r = &registry;
        Metrics {
            flush_lsn: gauge(r, "safekeeper_flush_lsn", "End of the WAL durable on this safekeeper (byte position)"),
            commit_lsn: gauge(r, "safekeeper_commit_lsn", "Commit LSN known to this safekeeper (byte position)"),
            remote_consistent_lsn: gauge(
                r,
                "safekeeper_remote_consistent_lsn",
                "Highest position the page server reported durable (byte position)",
            ),
            oldest_kept_lsn: gauge(r, "safekeeper_oldest_kept_lsn", "First WAL byte still on disk (byte position)"),
            term: gauge(r, "safekeeper_term", "Current term of the timeline on this safekeeper"),
            disk_bytes: gauge(r, "safekeeper_wal_disk_bytes", "Bytes of segment files on disk"),
            connected_proposers: gauge(r, "safekeeper_connected_proposers", "Connections pushing WAL"),
            connected_consumers: gauge(r, "safekeeper_connected_consumers", "Connections reading WAL"),
            wal_bytes_written: counter(r, "safekeeper_wal_written_bytes_total", "WAL bytes written to segment files"),
            wal_bytes_served: counter(r, "safekeeper_wal_served_bytes_total", "WAL bytes sent to consumers"),
            removed_segments: counter(r, "safekeeper_removed_segments_total", "Segments removed by WAL retention"),
            peer_recovery_bytes: counter(
                r,
                "safekeeper_peer_recovery_bytes_total",
                "WAL bytes copied from peer safekeepers (peer recovery)",
            ),
            peer_recovery_rounds: counter(
                r,
                "safekeeper_peer_recovery_rounds_total",
                "Peer recovery rounds that reached their target",
            ),
            sync_seconds: histogram(
                r,
                "safekeeper_wal_sync_seconds",
                "Duration of one group-commit sync",
                exponential_buckets(25e-6, 2.0, 16).expect("valid buckets"),
            ),
            appends_per_sync: histogram(
                r,
                "safekeeper_appends_per_sync",
                "Append requests made durable by one sync (group commit)",
                exponential_buckets(1.0, 2.0, 8).expect("valid buckets"),
            ),
            registry,
        }
    }

    /// The handles of one timeline (created on first use).
    pub fn timeline(&self, tenant_id: TenantId, timeline_id: TimelineId) -> TimelineMetrics {
        let (tenant, timeline) = (tenant_id.to_string(), timeline_id.to_string());
        let labels = [tenant.as_str(), timeline.as_str()];
        TimelineMetrics {
            wal_bytes_written: self.wal_bytes_written.with_label_values(&labels),
            wal_bytes_served: self.wal_bytes_served.with_label_values(&labels),
            removed_segments: self.removed_segments.with_label_values(&labels),
            peer_recovery_bytes: self.peer_recovery_bytes.with_label_values(&labels),
            peer_recovery_rounds: self.peer_recovery_rounds.with_label_values(&labels),
            sync_seconds: self.sync_seconds.with_label_values(&labels),
            appends_per_sync: self.appends_per_sync.with_label_values(&labels),
        }
    }

    /// Forget a deleted timeline's series.
    pub fn remove_timeline(&self, tenant_id: TenantId, timeline_id: TimelineId) {
        let (tenant, timeline) = (tenant_id.to_string(), timeline_id.to_string());
        let labels = [tenant.as_str(), timeline.as_str()];
        for family in self.gauge_families() {
            let _ = family.remove_label_values(&labels);
        }
        let counters = [
            &self.wal_bytes_written,
            &self.wal_bytes_served,
            &self.removed_segments,
            &self.peer_recovery_bytes,
            &self.peer_recovery_rounds,
        ];
        for family in counters {
            let _ = family.remove_label_values(&labels);
        }
        for family in [&self.sync_seconds, &self.appends_per_sync] {
            let _ = family.remove_label_values(&labels);
        }
    }

    /// The gauge families, in the order of [`TimelineGauges::in_family_order`].
    fn gauge_families(&self) -> [&IntGaugeVec; 8] {
        [
            &self.flush_lsn,
            &self.commit_lsn,
            &self.remote_consistent_lsn,
            &self.oldest_kept_lsn,
            &self.term,
            &self.disk_bytes,
            &self.connected_proposers,
            &self.connected_consumers,
        ]
    }

    /// Set one timeline's gauges (at scrape time).
    pub fn set_gauges(&self, tenant_id: TenantId, timeline_id: TimelineId, values: &TimelineGauges) {
        let (tenant, timeline) = (tenant_id.to_string(), timeline_id.to_string());
        let labels = [tenant.as_str(), timeline.as_str()];
        let as_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        for (family, value) in self.gauge_families().into_iter().zip(values.in_family_order()) {
            family.with_label_values(&labels).set(as_i64(value));
        }
    }

    /// Everything in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encoding into memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
