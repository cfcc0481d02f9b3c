//! Reading a range of committed WAL for a consumer, chunk by chunk, on
//! blocking threads (`pread` of page-cache-warm segment files is fast, but
//! a cold disk must not stall the runtime). Shared by the HTTP WAL endpoints
//! and replication streams; see `safekeeper_core::storage::reader` for why reading
//! beside the owner thread is safe.

use std::sync::Arc;

use bytes::Bytes;
use prometheus::IntCounter;

use super::consumers::{ConsumerGuard, ConsumerKind};
use super::registry::TimelineHandle;
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use safekeeper_core::storage::reader::SegmentReader;
use safekeeper_core::storage::StorageError;

/// Reads `[pos, end)` chunk by chunk on blocking threads.
pub struct ChunkReader {
    reader: SegmentReader,
    pos: Lsn,
    end: Lsn,
    guard: ConsumerGuard,
    served: IntCounter,
}

impl ChunkReader {
    /// A reader of `[start, end)` of `handle`'s WAL, listed as a consumer
    /// for as long as it lives.
    pub fn new(
        handle: &Arc<TimelineHandle>,
        segment_size: WalSegmentSize,
        start: Lsn,
        end: Lsn,
        kind: ConsumerKind,
        peer: String,
    ) -> ChunkReader {
        ChunkReader {
            reader: SegmentReader::new(&handle.dir, segment_size).with_pg_timelines(handle.snapshot().pg_timelines),
            pos: start,
            end,
            guard: handle.consumers.register(kind, peer, start),
            served: handle.shared.metrics.wal_bytes_served.clone(),
        }
    }

    /// Next byte to read.
    pub fn position(&self) -> Lsn {
        self.pos
    }

    /// Read on up to `end` (the commit LSN moved).
    pub fn extend_to(&mut self, end: Lsn) {
        self.end = self.end.max(end);
    }

    pub fn consumer(&self) -> &ConsumerGuard {
        &self.guard
    }

    /// The next chunk of at most `max_bytes`, or `None` at the end.
    pub async fn next_chunk(mut self, max_bytes: usize) -> (Self, Option<Result<Bytes, StorageError>>) {
        if self.pos >= self.end {
            return (self, None);
        }
        let len = ((self.end - self.pos) as usize).min(max_bytes);
        let joined = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            let result = self.reader.read_exact(self.pos, &mut buf).map(|()| Bytes::from(buf));
            (self, result)
        })
        .await;
        let (mut chunks, result) = joined.expect("reading a segment file does not panic");
        if result.is_ok() {
            chunks.pos = chunks.pos + len as u64;
            chunks.guard.set_position(chunks.pos);
            chunks.served.inc_by(len as u64);
        }
        (chunks, Some(result))
    }
}
