//! Where the WAL for the safekeepers comes from: what is held of it (the
//! buffer, and a catch-up run re-read below it) and how far back the
//! source can still resend. It knows nothing of Postgres itself (the log
//! check stays with the proposer), so another source (a donor safekeeper)
//! can feed it the same way.

use postgres_wal::lsn::{Lsn, WalSegmentSize};

use super::error::ProposerError;
use super::peer::{Link, Peers};
use super::wal_buffer::WalBuffer;

pub(super) struct WalSource {
    max_buffered_bytes: u64,
    segment_size: WalSegmentSize,
    /// Created by the first WAL taken, after the election.
    buffer: Option<WalBuffer>,
    /// WAL re-read below `buffer` for a safekeeper that (re)joined behind
    /// it; joined to the front of `buffer` once it reaches its start.
    catch_up: Option<WalBuffer>,
    /// The source no longer holds WAL below this (a segment it removed).
    removed_below: Lsn,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum TrimScope {
    /// Keep WAL for every safekeeper that acknowledged in our term.
    All,
    /// Keep WAL only for connected, streaming ones.
    Connected,
}

impl WalSource {
    pub fn new(max_buffered_bytes: u64, segment_size: WalSegmentSize) -> Self {
        WalSource { max_buffered_bytes, segment_size, buffer: None, catch_up: None, removed_below: Lsn::INVALID }
    }

    pub fn buffer(&self) -> Option<&WalBuffer> {
        self.buffer.as_ref()
    }

    pub fn catch_up(&self) -> Option<&WalBuffer> {
        self.catch_up.as_ref()
    }

    pub fn removed_below(&self) -> Lsn {
        self.removed_below
    }

    /// Where the next WAL must start once WAL flows: the catch-up's end
    /// while one runs, else where a lagging safekeeper needs one to start,
    /// else the buffer's end. `None` before the first WAL.
    pub fn wanted_from(&self, peers: &Peers) -> Option<Lsn> {
        let buffer = self.buffer.as_ref()?;
        if let Some(catch_up) = &self.catch_up {
            return Some(catch_up.end_lsn());
        }
        Some(self.catch_up_wanted(buffer, peers).unwrap_or(buffer.end_lsn()))
    }

    /// Whether WAL starting at `start_lsn` is catch-up WAL (below the buffer).
    pub fn is_below_buffer(&self, start_lsn: Lsn) -> bool {
        self.buffer.as_ref().is_some_and(|buffer| start_lsn < buffer.start_lsn())
    }

    /// Whether `len_bytes` more starting at `wanted_from` can be taken now,
    /// once streaming safekeepers whose flush is below `release_below` are
    /// let go of (`Lsn::INVALID`: none is). A catch-up always fits: it
    /// starts only if the buffer could hold all WAL from its start.
    pub fn can_accept(&self, len_bytes: u64, wanted_from: Option<Lsn>, peers: &Peers, release_below: Lsn) -> bool {
        match &self.buffer {
            None => len_bytes <= self.max_buffered_bytes,
            Some(buffer) if wanted_from.is_some_and(|lsn| lsn < buffer.start_lsn()) => true,
            Some(buffer) => {
                let floor = self.floor_above(peers, TrimScope::Connected, release_below).unwrap_or(buffer.start_lsn());
                let keep_bytes = buffer.end_lsn().checked_sub(floor.max(buffer.start_lsn())).unwrap_or(0);
                keep_bytes + len_bytes <= buffer.max_bytes()
            }
        }
    }

    /// Take WAL at the buffer's end (or the first WAL, which starts it),
    /// making room by giving up on absent safekeepers if needed; a full
    /// buffer refuses it unchanged.
    pub fn take(&mut self, start_lsn: Lsn, wal: &[u8], peers: &Peers) -> Result<(), ProposerError> {
        let incoming_bytes = wal.len() as u64;
        let max_bytes = self.max_buffered_bytes;
        let buffer = self.buffer.get_or_insert_with(|| WalBuffer::new(start_lsn, max_bytes));
        if !buffer.fits(incoming_bytes) {
            self.trim(peers, TrimScope::Connected);
        }
        let buffer = self.buffer.as_mut().expect("created above");
        if !buffer.fits(incoming_bytes) {
            return Err(ProposerError::WalBufferFull { buffered_bytes: buffer.len_bytes(), incoming_bytes, max_bytes });
        }
        buffer.push(wal);
        Ok(())
    }

    /// Catch-up WAL: kept until it reaches the buffer's start, then joined
    /// to its front. Bytes at or past the start are already buffered.
    pub fn take_catch_up(&mut self, start_lsn: Lsn, wal: &[u8]) {
        let buffer = self.buffer.as_mut().expect("a catch-up is below the buffer");
        let catch_up = self.catch_up.get_or_insert_with(|| WalBuffer::new(start_lsn, self.max_buffered_bytes));
        assert_eq!(catch_up.end_lsn(), start_lsn, "catch-up WAL is contiguous");
        let needed_bytes = (buffer.start_lsn() - start_lsn).min(wal.len() as u64) as usize;
        catch_up.push(&wal[..needed_bytes]);
        if catch_up.end_lsn() == buffer.start_lsn() {
            buffer.prepend(self.catch_up.take().expect("present"));
        }
    }

    /// The source removed WAL at `lsn`: nothing in its segment or below can
    /// be resent, and a catch-up running there cannot finish.
    pub fn on_removed(&mut self, lsn: Lsn) {
        self.removed_below = self.removed_below.max(lsn.next_segment_start(self.segment_size));
        self.catch_up = None;
    }

    /// Forget buffered WAL below what the safekeepers in `scope` still need.
    /// `Connected` (to make room) gives up on absent ones: they will be
    /// caught up from the source, or too far behind, if they come back.
    pub fn trim(&mut self, peers: &Peers, scope: TrimScope) {
        if let Some(floor) = self.trim_floor(peers, scope) {
            self.buffer.as_mut().expect("a floor implies a buffer").trim_to(floor);
        }
    }

    /// The lowest acknowledged flush still inside the buffer, among all
    /// safekeepers that acknowledged in our term or only connected ones.
    fn trim_floor(&self, peers: &Peers, scope: TrimScope) -> Option<Lsn> {
        self.floor_above(peers, scope, Lsn::INVALID)
    }

    /// [`Self::trim_floor`] ignoring flushes below `release_below`.
    fn floor_above(&self, peers: &Peers, scope: TrimScope, release_below: Lsn) -> Option<Lsn> {
        let buffer = self.buffer.as_ref()?;
        peers
            .iter()
            .filter(|peer| scope == TrimScope::All || matches!(peer.link, Link::Streaming { .. }))
            .filter(|peer| peer.link != Link::TooFarBehind)
            .filter_map(|peer| peer.flush_lsn)
            .filter(|&flush| flush >= buffer.start_lsn() && flush >= release_below)
            .min()
    }

    /// The lowest position of a streaming safekeeper below the buffer that
    /// the source may still be able to resend: where a catch-up starts.
    fn catch_up_wanted(&self, buffer: &WalBuffer, peers: &Peers) -> Option<Lsn> {
        peers
            .iter()
            .filter_map(|peer| match peer.link {
                Link::Streaming { next_lsn } if next_lsn < buffer.start_lsn() => Some(next_lsn),
                _ => None,
            })
            .filter(|&lsn| self.can_catch_up(lsn))
            .min()
    }

    /// Whether WAL from `lsn` can be re-read and held with the buffer: the
    /// source has not removed it, and all of `[lsn, buffer end)` fits the
    /// buffer's bound (so a catch-up can never stall the stream). Before
    /// the first WAL nothing is below the buffer: only removal counts.
    pub fn can_catch_up(&self, lsn: Lsn) -> bool {
        let fits = self.buffer.as_ref().is_none_or(|buffer| buffer.end_lsn() - lsn <= self.max_buffered_bytes);
        lsn >= self.removed_below && fits
    }

    /// Where WAL for a safekeeper sent up to `next_lsn` is held: the buffer
    /// at or above its start, the catch-up below it once it has arrived.
    pub fn holding(&self, next_lsn: Lsn) -> Option<&WalBuffer> {
        let buffer = self.buffer.as_ref()?;
        if next_lsn >= buffer.start_lsn() {
            Some(buffer)
        } else {
            self.catch_up.as_ref().filter(|catch_up| catch_up.holds(next_lsn))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::peer::Peer;
    use super::super::peer::SlotIndex;
    use super::*;

    const SEGMENT_BYTES: u64 = 1 << 20;

    fn segment_size() -> WalSegmentSize {
        WalSegmentSize::new(SEGMENT_BYTES).unwrap()
    }

    fn streaming(next_lsn: u64, flush_lsn: u64) -> Peer {
        let mut peer = Peer::new(format!("sk{next_lsn}"), 0);
        peer.link = Link::Streaming { next_lsn: Lsn(next_lsn) };
        peer.flush_lsn = Some(Lsn(flush_lsn));
        peer
    }

    fn span(buffer: Option<&WalBuffer>) -> Option<(Lsn, Lsn)> {
        buffer.map(|buffer| (buffer.start_lsn(), buffer.end_lsn()))
    }

    #[test]
    fn full_buffer_makes_room_by_giving_up_on_absent_safekeepers() {
        let mut source = WalSource::new(8, segment_size());
        let mut absent = streaming(1000, 1000);
        absent.link = Link::Disconnected;
        let mut peers = Peers::for_tests(vec![streaming(1006, 1004), absent]);
        source.take(Lsn(1000), &[0; 6], &peers).unwrap();
        assert!(
            source.can_accept(4, Some(Lsn(1006)), &peers, Lsn::INVALID),
            "trimming to the connected flush makes room"
        );
        source.take(Lsn(1006), &[0; 4], &peers).unwrap();
        assert_eq!(span(source.buffer()), Some((Lsn(1004), Lsn(1010))));
        peers[SlotIndex(0)].flush_lsn = Some(Lsn(1004));
        assert!(!source.can_accept(3, Some(Lsn(1010)), &peers, Lsn::INVALID));
        let refused = source.take(Lsn(1010), &[0; 3], &peers);
        assert!(matches!(refused, Err(ProposerError::WalBufferFull { buffered_bytes: 6, incoming_bytes: 3, .. })));
        assert_eq!(span(source.buffer()), Some((Lsn(1004), Lsn(1010))), "refused unchanged");
    }

    /// The quorum sets the pace: a laggard behind the commit LSN does not
    /// hold the buffer once it may be released.
    #[test]
    fn a_laggard_behind_the_commit_lsn_does_not_hold_the_buffer() {
        let mut source = WalSource::new(8, segment_size());
        let peers = Peers::for_tests(vec![streaming(1008, 1008), streaming(1004, 1002)]);
        source.take(Lsn(1000), &[0; 8], &peers).unwrap();
        assert!(!source.can_accept(4, Some(Lsn(1008)), &peers, Lsn::INVALID), "kept for the laggard at 1002");
        assert!(source.can_accept(4, Some(Lsn(1008)), &peers, Lsn(1008)), "room once it is released");
    }

    #[test]
    fn trim_all_keeps_wal_for_absent_safekeepers() {
        let mut source = WalSource::new(64, segment_size());
        let mut absent = streaming(1002, 1002);
        absent.link = Link::Disconnected;
        let peers = Peers::for_tests(vec![streaming(1008, 1008), absent]);
        source.take(Lsn(1000), &[0; 8], &peers).unwrap();
        source.trim(&peers, TrimScope::All);
        assert_eq!(span(source.buffer()), Some((Lsn(1002), Lsn(1008))));
        source.trim(&peers, TrimScope::Connected);
        assert_eq!(span(source.buffer()), Some((Lsn(1008), Lsn(1008))));
    }

    #[test]
    fn catch_up_joins_the_front_of_the_buffer() {
        let mut source = WalSource::new(64, segment_size());
        let peers = Peers::for_tests(vec![streaming(1010, 1010), streaming(1002, 1002)]);
        source.take(Lsn(1000), &[1; 10], &peers).unwrap();
        source.trim(&Peers::for_tests(vec![streaming(1010, 1010)]), TrimScope::Connected);
        assert_eq!(span(source.buffer()), Some((Lsn(1010), Lsn(1010))));
        assert_eq!(source.wanted_from(&peers), Some(Lsn(1002)), "the lagging safekeeper wants a catch-up");
        assert!(source.is_below_buffer(Lsn(1002)));
        assert!(source.can_accept(SEGMENT_BYTES, Some(Lsn(1002)), &peers, Lsn::INVALID), "a catch-up always fits");
        source.take_catch_up(Lsn(1002), &[2; 4]);
        assert_eq!(source.wanted_from(&peers), Some(Lsn(1006)), "the catch-up goes on from its end");
        assert_eq!(source.holding(Lsn(1003)).map(WalBuffer::start_lsn), Some(Lsn(1002)));
        source.take_catch_up(Lsn(1006), &[2; 8]);
        assert!(source.catch_up().is_none(), "bytes past the buffer's start were dropped, the rest joined");
        assert_eq!(span(source.buffer()), Some((Lsn(1002), Lsn(1010))));
    }

    #[test]
    fn removed_wal_cannot_be_caught_up() {
        let mut source = WalSource::new(4 * SEGMENT_BYTES, segment_size());
        let segment = SEGMENT_BYTES;
        let peers = Peers::for_tests(vec![streaming(3 * segment, 3 * segment), streaming(segment + 5, segment + 5)]);
        source.take(Lsn(3 * segment), &[0; 4], &peers).unwrap();
        source.take_catch_up(Lsn(segment + 5), &[0; 4]);
        assert!(source.can_catch_up(Lsn(segment + 5)));
        source.on_removed(Lsn(segment + 100));
        assert_eq!(source.removed_below(), Lsn(2 * segment), "the whole segment is gone");
        assert!(source.catch_up().is_none(), "the catch-up running there is dropped");
        assert!(!source.can_catch_up(Lsn(segment + 5)));
        assert_eq!(source.wanted_from(&peers), Some(Lsn(3 * segment + 4)), "no catch-up is wanted");
        source.on_removed(Lsn(10));
        assert_eq!(source.removed_below(), Lsn(2 * segment), "never moves back");
    }

    #[test]
    fn a_catch_up_must_fit_the_buffer_bound() {
        let mut source = WalSource::new(16, segment_size());
        let peers = Peers::for_tests(vec![streaming(1020, 1020)]);
        source.take(Lsn(1010), &[0; 10], &peers).unwrap();
        assert!(source.can_catch_up(Lsn(1004)));
        assert!(!source.can_catch_up(Lsn(1003)), "[1003, 1020) is over 16 bytes");
    }
}
