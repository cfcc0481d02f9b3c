//! What a stub run is given: which timeline, where, and its time limits.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use postgres_wal::wal::DecodedRecord;
use safekeeper_protocol::ids::{TenantId, TimelineId};

use crate::api::SafekeeperAddress;

/// Called with every decoded record, in WAL order (a real page server would
/// apply it here; tests collect them).
pub type RecordObserver = Arc<dyn Fn(&DecodedRecord) + Send + Sync>;

#[derive(Clone)]
pub struct StubConfig {
    /// Safekeeper HTTP addresses; the index in this list names a safekeeper.
    pub safekeepers: Vec<SafekeeperAddress>,
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    /// Holds the state file and the lock file; created if missing.
    pub datadir: PathBuf,
    pub tuning: Tuning,
    pub record_observer: Option<RecordObserver>,
    /// The token (`safekeeper_data`, or `tenant` for this tenant) presented
    /// to safekeepers that check tokens; read at every request.
    pub auth_token_file: Option<PathBuf>,
    /// `--tls-ca`: the safekeepers are reached over HTTPS, trusting it.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// `--tls-cert`/`--tls-key`: the status port serves HTTPS...
    pub status_tls: Option<std::sync::Arc<net::tls::ServerTls>>,
    /// ...and with `--allow-plaintext` plain HTTP too.
    pub status_allow_plaintext: bool,
}

impl fmt::Debug for StubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StubConfig")
            .field("safekeepers", &self.safekeepers)
            .field("tenant_id", &self.tenant_id)
            .field("timeline_id", &self.timeline_id)
            .field("datadir", &self.datadir)
            .field("tuning", &self.tuning)
            .field("record_observer", &self.record_observer.is_some())
            .field("auth_token_file", &self.auth_token_file)
            .field("tls", &self.tls.is_some())
            .field("status_tls", &self.status_tls.is_some())
            .finish()
    }
}

/// Time limits and sizes. The defaults are for real use; tests shrink them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// How often every safekeeper's timeline status is polled.
    pub status_poll_interval_ms: u64,
    /// A status request not answered within this has failed.
    pub status_timeout_ms: u64,
    /// A status older than this no longer makes a safekeeper choosable.
    pub status_fresh_ms: u64,
    pub connect_timeout_ms: u64,
    /// The `wait_ms` of a WAL long poll.
    pub long_poll_wait_ms: u64,
    /// No response headers and no body bytes for this long: the source is
    /// silent, and is abandoned. Must exceed `long_poll_wait_ms`.
    pub silence_timeout_ms: u64,
    /// A whole WAL response, however large, must complete within this.
    pub request_timeout_ms: u64,
    /// Each WAL request asks for at most this much (its `end_lsn`), which
    /// bounds a response and gives regular save points.
    pub max_response_bytes: u64,
    /// A source lagging by more than a WAL segment for this long is left.
    pub lag_grace_ms: u64,
    /// A safekeeper that failed a pull is passed over for this long.
    pub failure_cooldown_ms: u64,
    /// Saves (each an fsync of a file and a directory) are at least this far apart.
    pub min_save_interval_ms: u64,
    pub feedback_timeout_ms: u64,
    /// How often a running pull re-checks the choice of source, saves if
    /// due and refreshes the status page.
    pub housekeeping_interval_ms: u64,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            status_poll_interval_ms: 1000,
            status_timeout_ms: 2000,
            status_fresh_ms: 3500,
            connect_timeout_ms: 2000,
            long_poll_wait_ms: 1000,
            silence_timeout_ms: 5000,
            request_timeout_ms: 120_000,
            max_response_bytes: 64 << 20,
            lag_grace_ms: 2000,
            failure_cooldown_ms: 1000,
            min_save_interval_ms: 200,
            feedback_timeout_ms: 2000,
            housekeeping_interval_ms: 100,
        }
    }
}
