//! Fault injection for tests: WAL storage whose every sync takes longer,
//! as on a slow or overloaded disk (`safekeeper --fault-sync-delay-ms`).
//! The wrapper delegates every call to the storage it holds and sleeps
//! before `sync` only, so what is durable and when it is acknowledged is
//! exactly the inner storage's; the acknowledgement just comes later.
//! With a zero delay it costs one comparison per sync.

use std::time::Duration;

use super::{StorageError, SyncedLsn, WalStorage};
use postgres_wal::lsn::Lsn;
use postgres_wal::timeline_history::PgTimelineHistory;

/// `inner`, with `delay_per_sync` added to each [`WalStorage::sync`].
pub struct SyncDelayed<W> {
    inner: W,
    delay_per_sync: Duration,
}

impl<W: WalStorage> SyncDelayed<W> {
    /// `delay_per_sync` zero: no fault, the inner storage as it is.
    pub fn new(inner: W, delay_per_sync: Duration) -> Self {
        SyncDelayed { inner, delay_per_sync }
    }

    /// The wrapped storage (for what only it knows: its files, its sizes).
    pub fn inner(&self) -> &W {
        &self.inner
    }
}

impl<W: WalStorage> WalStorage for SyncDelayed<W> {
    fn start_lsn(&self) -> Lsn {
        self.inner.start_lsn()
    }
    fn write_lsn(&self) -> Lsn {
        self.inner.write_lsn()
    }
    fn flush_lsn(&self) -> Lsn {
        self.inner.flush_lsn()
    }
    fn initialize(&mut self, start: Lsn) -> Result<(), StorageError> {
        self.inner.initialize(start)
    }
    fn restart_empty(&mut self, start: Lsn) -> Result<(), StorageError> {
        self.inner.restart_empty(start)
    }
    fn write(&mut self, start: Lsn, bytes: &[u8]) -> Result<(), StorageError> {
        self.inner.write(start, bytes)
    }
    /// The caller runs storage on a blocking thread (the service's owner
    /// does), so sleeping here stalls this timeline as a slow fdatasync
    /// would, and appends queue up for the next batch meanwhile.
    fn sync(&mut self) -> Result<SyncedLsn, StorageError> {
        if !self.delay_per_sync.is_zero() {
            std::thread::sleep(self.delay_per_sync);
        }
        self.inner.sync()
    }
    fn truncate(&mut self, end: Lsn) -> Result<(), StorageError> {
        self.inner.truncate(end)
    }
    fn read(&mut self, start: Lsn, buf: &mut [u8]) -> Result<(), StorageError> {
        self.inner.read(start, buf)
    }
    fn remove_below(&mut self, end: Lsn) -> Result<(), StorageError> {
        self.inner.remove_below(end)
    }
    fn set_pg_timelines(&mut self, history: &PgTimelineHistory) -> Result<(), StorageError> {
        self.inner.set_pg_timelines(history)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::storage::memory::MemoryWalStorage;

    /// Rule: a delayed sync makes durable exactly what the inner storage's
    /// sync does, no sooner than the delay; everything else passes through.
    #[test]
    fn a_delayed_sync_is_the_inner_sync_later() {
        let delay = Duration::from_millis(30);
        let mut wal = SyncDelayed::new(MemoryWalStorage::new(), delay);
        wal.initialize(Lsn(0x100_0000)).unwrap();
        wal.write(Lsn(0x100_0000), b"record").unwrap();
        assert_eq!((wal.write_lsn(), wal.flush_lsn()), (Lsn(0x100_0006), Lsn(0x100_0000)));
        let started = Instant::now();
        let synced = wal.sync().unwrap();
        assert!(started.elapsed() >= delay, "synced after {:?}", started.elapsed());
        assert_eq!(synced.lsn(), Lsn(0x100_0006));
        assert_eq!(wal.inner().flush_lsn(), Lsn(0x100_0006));
        let mut back = [0u8; 6];
        wal.read(Lsn(0x100_0000), &mut back).unwrap();
        assert_eq!(&back, b"record");
    }
}
