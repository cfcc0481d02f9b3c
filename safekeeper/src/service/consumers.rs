//! The WAL consumers connected to a timeline (HTTP pulls and replication
//! streams), for the status API: who reads, from where, how far.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use postgres_wal::lsn::Lsn;

pub use safekeeper_api::api::{ConsumerKind, ConsumerStatus};

struct Consumer {
    kind: ConsumerKind,
    peer: String,
    position_lsn: AtomicU64,
    reported_flush_lsn: AtomicU64,
}

#[derive(Default)]
pub struct Consumers {
    next_id: AtomicU64,
    entries: Mutex<BTreeMap<u64, Arc<Consumer>>>,
}

impl Consumers {
    /// Register a consumer for as long as the returned guard lives.
    pub fn register(self: &Arc<Self>, kind: ConsumerKind, peer: String, position_lsn: Lsn) -> ConsumerGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let consumer = Arc::new(Consumer {
            kind,
            peer,
            position_lsn: AtomicU64::new(position_lsn.0),
            reported_flush_lsn: AtomicU64::new(0),
        });
        self.lock().insert(id, consumer.clone());
        ConsumerGuard { consumers: self.clone(), id, consumer }
    }

    pub fn list(&self) -> Vec<ConsumerStatus> {
        self.lock()
            .values()
            .map(|c| ConsumerStatus {
                kind: c.kind,
                peer: c.peer.clone(),
                position_lsn: Lsn(c.position_lsn.load(Ordering::Relaxed)),
                reported_flush_lsn: Lsn(c.reported_flush_lsn.load(Ordering::Relaxed)),
            })
            .collect()
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Consumer>>> {
        // The map is consistent after any panic (single inserts/removes).
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Keeps a consumer listed; updates its position.
pub struct ConsumerGuard {
    consumers: Arc<Consumers>,
    id: u64,
    consumer: Arc<Consumer>,
}

impl ConsumerGuard {
    pub fn set_position(&self, lsn: Lsn) {
        self.consumer.position_lsn.store(lsn.0, Ordering::Relaxed);
    }
    pub fn set_reported_flush(&self, lsn: Lsn) {
        self.consumer.reported_flush_lsn.store(lsn.0, Ordering::Relaxed);
    }
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        self.consumers.lock().remove(&self.id);
    }
}
