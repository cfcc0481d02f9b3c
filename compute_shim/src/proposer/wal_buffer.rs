//! WAL from Postgres, held until the safekeepers that need it have flushed it.

use bytes::{Bytes, BytesMut};
use postgres_wal::lsn::Lsn;

/// A contiguous, bounded run of WAL `[start_lsn, end_lsn)`.
#[derive(Debug)]
pub(super) struct WalBuffer {
    start_lsn: Lsn,
    bytes: BytesMut,
    max_bytes: u64,
}

impl WalBuffer {
    pub fn new(start_lsn: Lsn, max_bytes: u64) -> Self {
        WalBuffer { start_lsn, bytes: BytesMut::new(), max_bytes }
    }

    pub fn start_lsn(&self) -> Lsn {
        self.start_lsn
    }

    pub fn end_lsn(&self) -> Lsn {
        self.start_lsn + self.bytes.len() as u64
    }

    pub fn len_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn fits(&self, incoming_bytes: u64) -> bool {
        self.len_bytes() + incoming_bytes <= self.max_bytes
    }

    pub fn push(&mut self, wal: &[u8]) {
        assert!(self.fits(wal.len() as u64), "callers check fits() first");
        self.bytes.extend_from_slice(wal);
    }

    /// Forget WAL below `lsn` (clamped to the buffer; never moves back).
    pub fn trim_to(&mut self, lsn: Lsn) {
        let lsn = lsn.clamp(self.start_lsn, self.end_lsn());
        let _ = self.bytes.split_to((lsn - self.start_lsn) as usize);
        self.start_lsn = lsn;
    }

    /// Put `earlier`, which ends where this buffer starts, in front of it.
    pub fn prepend(&mut self, earlier: WalBuffer) {
        assert_eq!(earlier.end_lsn(), self.start_lsn, "prepended WAL must end where the buffer starts");
        let mut bytes = earlier.bytes;
        bytes.extend_from_slice(&self.bytes);
        self.bytes = bytes;
        self.start_lsn = earlier.start_lsn;
    }

    /// Whether `lsn` is inside `[start_lsn, end_lsn)`.
    pub fn holds(&self, lsn: Lsn) -> bool {
        self.start_lsn <= lsn && lsn < self.end_lsn()
    }

    /// A copy of `[begin, end)`, which must lie inside the buffer.
    pub fn slice(&self, begin: Lsn, end: Lsn) -> Bytes {
        assert!(self.start_lsn <= begin && begin <= end && end <= self.end_lsn(), "slice {begin}..{end} outside");
        let offset = (begin - self.start_lsn) as usize;
        Bytes::copy_from_slice(&self.bytes[offset..offset + (end - begin) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_trim_slice() {
        let mut buffer = WalBuffer::new(Lsn(100), 8);
        buffer.push(&[1, 2, 3, 4, 5]);
        assert!(!buffer.fits(4));
        buffer.trim_to(Lsn(102));
        assert_eq!((buffer.start_lsn(), buffer.end_lsn()), (Lsn(102), Lsn(105)));
        assert_eq!(&buffer.slice(Lsn(103), Lsn(105))[..], &[4, 5]);
        buffer.trim_to(Lsn(50));
        assert_eq!(buffer.start_lsn(), Lsn(102), "trimming never moves back");
        buffer.trim_to(Lsn(500));
        assert_eq!((buffer.start_lsn(), buffer.len_bytes()), (Lsn(105), 0), "clamped to the end");
    }

    #[test]
    fn prepend_joins_earlier_wal() {
        let mut later = WalBuffer::new(Lsn(103), 8);
        later.push(&[4, 5]);
        let mut earlier = WalBuffer::new(Lsn(100), 8);
        earlier.push(&[1, 2, 3]);
        later.prepend(earlier);
        assert_eq!((later.start_lsn(), later.end_lsn()), (Lsn(100), Lsn(105)));
        assert_eq!(&later.slice(Lsn(100), Lsn(105))[..], &[1, 2, 3, 4, 5]);
        assert!(later.holds(Lsn(104)) && !later.holds(Lsn(105)));
    }
}
