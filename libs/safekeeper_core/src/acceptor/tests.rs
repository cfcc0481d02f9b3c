//! Acceptor rules, each test citing the rule it checks, plus a property test
//! over random message sequences. The message helpers are shared with the
//! timeline node's tests.

use super::*;
use crate::acceptor::PeerWal;
use crate::control::TermStart;
use crate::storage::WalStorage;
use crate::timeline::{MemoryTimeline, TimelineError};
use postgres_wal::lsn::WalSegmentSize;
use postgres_wal::timeline_history::PgTimelineHistory;
use postgres_wal::wal::generator::WalGenerator;
use safekeeper_protocol::ids::{SystemId, TenantId, TimelineId};
use safekeeper_protocol::protocol::{AppendRequest, Greeting, ProposerElected, VoteRequest};

pub(crate) const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;
pub(crate) const SEGMENT_SIZE_BYTES: u64 = 1 << 20;
pub(crate) const TIMELINE_START: Lsn = Lsn(0x100_0000);

pub(crate) fn segment_size() -> WalSegmentSize {
    WalSegmentSize::new(SEGMENT_SIZE_BYTES).unwrap()
}

pub(crate) fn cluster() -> ClusterId {
    ClusterId { system_id: SystemId(SYSTEM_ID), tenant_id: TenantId([1; 16]), timeline_id: TimelineId([2; 16]) }
}

pub(crate) fn fresh_state() -> ControlState {
    ControlState::new_timeline(cluster(), 150000, segment_size())
}

fn new_timeline() -> MemoryTimeline {
    MemoryTimeline::empty(NodeId(1), fresh_state())
}

fn history(entries: &[(u64, Lsn)]) -> TermHistory {
    TermHistory(entries.iter().map(|&(term, start_lsn)| TermStart { term: Term(term), start_lsn }).collect())
}

pub(crate) fn vote(term: u64) -> ProposerMessage {
    ProposerMessage::VoteRequest(VoteRequest {
        cluster: cluster(),
        term: Term(term),
        generation: MembershipGeneration::NOT_SET,
        pg_timeline: 1,
    })
}

pub(crate) fn elected(term: u64, entries: &[(u64, Lsn)]) -> ProposerMessage {
    let history = history(entries);
    let last = *history.0.last().unwrap();
    assert_eq!(last.term, Term(term));
    ProposerMessage::ProposerElected(ProposerElected {
        cluster: cluster(),
        term: Term(term),
        generation: MembershipGeneration::NOT_SET,
        term_start_lsn: last.start_lsn,
        timeline_start_lsn: TIMELINE_START,
        term_history: history,
        pg_timelines: PgTimelineHistory::first(),
    })
}

pub(crate) fn append(term: u64, begin_lsn: Lsn, wal: &[u8], commit_lsn: Lsn) -> ProposerMessage {
    ProposerMessage::AppendRequest(AppendRequest {
        cluster: cluster(),
        term: Term(term),
        generation: MembershipGeneration::NOT_SET,
        begin_lsn,
        end_lsn: begin_lsn + wal.len() as u64,
        commit_lsn,
        wal: Bytes::copy_from_slice(wal),
    })
}

fn append_response(message: Option<AcceptorMessage>) -> AppendResponse {
    match message {
        Some(AcceptorMessage::AppendResponse(response)) => response,
        other => panic!("expected an AppendResponse, got {other:?}"),
    }
}

fn vote_response(message: Option<AcceptorMessage>) -> VoteResponse {
    match message {
        Some(AcceptorMessage::VoteResponse(response)) => response,
        other => panic!("expected a VoteResponse, got {other:?}"),
    }
}

/// WAL of `count` records with payload sizes cycling through page-straddling
/// sizes, returned as one contiguous run of bytes.
fn generate(generator: &mut WalGenerator, count: usize) -> (Lsn, Vec<u8>) {
    for index in 0..count {
        let payload = vec![(index % 251) as u8; 40 + (index * 997) % 12_000];
        generator.append_record(10, 0x00, index as u32 + 1000, &payload);
    }
    generator.take_bytes()
}

/// Send WAL in appends that respect segment boundaries; returns the acks.
fn send_wal(timeline: &mut MemoryTimeline, term: u64, start: Lsn, wal: &[u8], commit: Lsn) -> AppendResponse {
    let mut offset = 0usize;
    while offset < wal.len() {
        let at = start + offset as u64;
        let to_segment_end = (at.next_segment_start(segment_size()) - at) as usize;
        let len = (wal.len() - offset).min(to_segment_end).min(32 * 1024);
        let reply = timeline.handle(append(term, at, &wal[offset..offset + len], commit)).unwrap();
        assert!(reply.is_none(), "appends are acknowledged only after a sync");
        offset += len;
    }
    append_response(timeline.sync_and_ack().unwrap())
}

/// A timeline elected in term 1 holding `records` records from TIMELINE_START.
fn timeline_with_wal(records: usize) -> (MemoryTimeline, WalGenerator) {
    let mut timeline = new_timeline();
    vote_response(timeline.handle(vote(1)).unwrap());
    append_response(timeline.handle(elected(1, &[(1, TIMELINE_START)])).unwrap());
    let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), TIMELINE_START);
    let (start, wal) = generate(&mut generator, records);
    assert_eq!(start, TIMELINE_START);
    let ack = send_wal(&mut timeline, 1, start, &wal, Lsn(0));
    assert_eq!(ack.flush_lsn, generator.end_lsn());
    (timeline, generator)
}

#[test]
fn greeting_checks_cluster_identity_and_parameters() {
    let mut timeline = new_timeline();
    let greeting = |cluster: ClusterId, segment: u32| {
        ProposerMessage::Greeting(Greeting {
            protocol_version: PROTOCOL_VERSION,
            cluster,
            pg_version: 150000,
            wal_segment_size_bytes: segment,
            proposer_id: [9; 16],
            generation: MembershipGeneration::NOT_SET,
            pg_timeline: 1,
        })
    };
    let ok = timeline.handle(greeting(cluster(), SEGMENT_SIZE_BYTES as u32)).unwrap();
    assert!(matches!(ok, Some(AcceptorMessage::GreetingResponse(GreetingResponse { node_id: NodeId(1), .. }))));
    let mut other = cluster();
    other.system_id = SystemId(42);
    let err = timeline.handle(greeting(other, SEGMENT_SIZE_BYTES as u32)).unwrap_err();
    assert!(matches!(err, TimelineError::Refused(AcceptorError::ClusterMismatch { .. })), "{err}");
    let err = timeline.handle(greeting(cluster(), 16 << 20)).unwrap_err();
    assert!(err.to_string().contains("wal segment size"), "{err}");
    // Every message is checked, not only the greeting.
    let mut wrong_timeline = cluster();
    wrong_timeline.timeline_id = TimelineId([3; 16]);
    let message = ProposerMessage::VoteRequest(VoteRequest {
        cluster: wrong_timeline,
        term: Term(5),
        generation: MembershipGeneration::NOT_SET,
        pg_timeline: 1,
    });
    assert!(timeline.handle(message).is_err());
    assert_eq!(timeline.acceptor().term(), Term(0), "a refused message changes nothing");
}

/// Rule: no term beyond `Term::MAX` is taken (a client cannot push the
/// term to where the next one would overflow); the limit itself is.
#[test]
fn terms_beyond_the_limit_are_refused() {
    let mut timeline = new_timeline();
    let err = timeline.handle(vote(u64::MAX)).unwrap_err();
    assert!(matches!(err, TimelineError::Refused(AcceptorError::TermBeyondLimit { .. })), "{err}");
    assert_eq!(timeline.acceptor().term(), Term(0), "a refused message changes nothing");
    assert!(vote_response(timeline.handle(vote(Term::MAX.0)).unwrap()).vote_given);
    assert_eq!(timeline.acceptor().term(), Term::MAX);
    assert_eq!(Term::MAX.next(), None);
}

/// Rule: a vote is granted only for a term above every term seen, and the
/// term is durable before the reply.
#[test]
fn vote_granted_only_for_higher_term_and_persisted_first() {
    let mut timeline = new_timeline();
    let granted = vote_response(timeline.handle(vote(3)).unwrap());
    assert!(granted.vote_given);
    assert_eq!(timeline.control().persisted.as_ref().unwrap().term, Term(3));
    for term in [3, 2, 0] {
        let refused = vote_response(timeline.handle(vote(term)).unwrap());
        assert!(!refused.vote_given, "term {term}");
        assert_eq!(refused.term, Term(3));
    }
    assert_eq!(timeline.control().persist_count, 1, "refusals persist nothing");
}

/// Rule: an append must start exactly at the write position.
#[test]
fn appends_with_gaps_or_rewrites_are_refused() {
    let (mut timeline, mut generator) = timeline_with_wal(20);
    let (start, wal) = generate(&mut generator, 3);
    let flush_before = timeline.acceptor().flush_lsn();
    for begin in [start + 8, Lsn(start.0 - 8), TIMELINE_START] {
        let err = timeline.handle(append(1, begin, &wal[..64], Lsn(0))).unwrap_err();
        assert!(matches!(err, TimelineError::Refused(AcceptorError::NotContiguous { .. })), "{err}");
    }
    assert_eq!(timeline.wal().write_lsn(), flush_before, "nothing written");
    send_wal(&mut timeline, 1, start, &wal, Lsn(0));
}

/// Rule: an append in a lower term is answered with the current term (fencing).
#[test]
fn lower_term_append_gets_the_higher_term() {
    let (mut timeline, mut generator) = timeline_with_wal(5);
    vote_response(timeline.handle(vote(2)).unwrap());
    let (start, wal) = generate(&mut generator, 1);
    let reply = append_response(timeline.handle(append(1, start, &wal, Lsn(0))).unwrap());
    assert_eq!(reply.term, Term(2));
    assert_eq!(timeline.wal().write_lsn(), start, "fenced append not written");
    // A term that was voted for but not yet elected may not append either.
    let err = timeline.handle(append(2, start, &wal, Lsn(0))).unwrap_err();
    assert!(matches!(err, TimelineError::Refused(AcceptorError::NotElected { .. })));
}

/// Rule: flush acknowledgements are record boundaries of synced WAL.
#[test]
fn flush_ack_stops_at_the_last_complete_record() {
    let (mut timeline, mut generator) = timeline_with_wal(5);
    let boundary = generator.end_lsn();
    let (start, wal) = generate(&mut generator, 1);
    let cut = wal.len() - 10;
    timeline.handle(append(1, start, &wal[..cut], Lsn(0))).unwrap();
    let ack = append_response(timeline.sync_and_ack().unwrap());
    assert_eq!(ack.flush_lsn, boundary, "half a record is not acknowledged");
    timeline.handle(append(1, start + cut as u64, &wal[cut..], Lsn(0))).unwrap();
    let ack = append_response(timeline.sync_and_ack().unwrap());
    assert_eq!(ack.flush_lsn, generator.end_lsn());
}

/// Group commit: many appends, one sync, one acknowledgement.
#[test]
fn many_appends_one_sync() {
    let (mut timeline, mut generator) = timeline_with_wal(1);
    let syncs_before = timeline.wal().sync_count;
    let (start, wal) = generate(&mut generator, 30);
    send_wal(&mut timeline, 1, start, &wal, Lsn(0));
    assert_eq!(timeline.wal().sync_count, syncs_before + 1);
    assert_eq!(timeline.sync_and_ack().unwrap(), None, "nothing pending, no sync");
    assert_eq!(timeline.wal().sync_count, syncs_before + 1);
}

/// Rule: commit_lsn never passes the local flush and never moves back.
#[test]
fn commit_is_capped_by_flush_and_monotonic() {
    let (mut timeline, mut generator) = timeline_with_wal(10);
    let flush = timeline.acceptor().flush_lsn();
    let heartbeat = |commit| append(1, flush, &[], commit);
    let ack = append_response(timeline.handle(heartbeat(flush + 1_000_000)).unwrap());
    assert_eq!(ack.commit_lsn, flush, "capped at flush");
    let ack = append_response(timeline.handle(heartbeat(Lsn(TIMELINE_START.0 + 100))).unwrap());
    assert_eq!(ack.commit_lsn, flush, "never backwards");
    // The proposer's earlier, higher commit applies as flush grows.
    let (start, wal) = generate(&mut generator, 2);
    let ack = send_wal(&mut timeline, 1, start, &wal, Lsn(0));
    assert_eq!(ack.commit_lsn, generator.end_lsn());
}

/// Rule: ProposerElected truncates only the tail that diverges from the
/// proposer's history, and never below commit_lsn.
#[test]
fn elected_truncates_only_the_divergent_tail() {
    let (mut timeline, generator) = timeline_with_wal(40);
    let flush = timeline.acceptor().flush_lsn();
    // Commit a prefix: the record boundary after 10 more records is past it,
    // so pick the boundary reported for a shorter log instead.
    let (mut short, _) = timeline_with_wal(10);
    let committed = short.acceptor().flush_lsn();
    append_response(timeline.handle(append(1, flush, &[], committed)).unwrap());
    assert_eq!(timeline.acceptor().commit_lsn(), committed);
    let _ = short.checkpoint();

    // Term 2's donor had our log only up to `committed`: our tail beyond is divergent.
    vote_response(timeline.handle(vote(2)).unwrap());
    let ack = append_response(timeline.handle(elected(2, &[(1, TIMELINE_START), (2, committed)])).unwrap());
    assert_eq!(ack.flush_lsn, committed);
    assert_eq!(timeline.wal().write_lsn(), committed, "tail truncated");
    assert_eq!(timeline.acceptor().last_log_term(), Term(2));

    // A proposer whose log agrees with ours up to our end truncates nothing.
    vote_response(timeline.handle(vote(3)).unwrap());
    let history = [(1, TIMELINE_START), (2, committed), (3, committed)];
    append_response(timeline.handle(elected(3, &history)).unwrap());
    assert_eq!(timeline.wal().write_lsn(), committed);

    // Truncating below commit is refused, and changes nothing.
    vote_response(timeline.handle(vote(4)).unwrap());
    let below = Lsn(committed.0 - 8);
    let err = timeline.handle(elected(4, &[(1, TIMELINE_START), (4, below)])).unwrap_err();
    assert!(matches!(err, TimelineError::Refused(AcceptorError::TruncateBelowCommit { .. })), "{err}");
    assert_eq!(timeline.wal().write_lsn(), committed);
    drop(generator);
}

/// A bad byte in appended WAL is refused; the write position does not move
/// and the correct bytes are accepted afterwards.
#[test]
fn corrupt_wal_is_refused_without_side_effects() {
    let (mut timeline, mut generator) = timeline_with_wal(3);
    let (start, wal) = generate(&mut generator, 3);
    let mut corrupt = wal.clone();
    corrupt[wal.len() / 2] ^= 0x40;
    let err = timeline.handle(append(1, start, &corrupt, Lsn(0))).unwrap_err();
    assert!(matches!(err, TimelineError::Refused(AcceptorError::InvalidWal { .. })), "{err}");
    assert_eq!(timeline.wal().write_lsn(), start);
    let ack = send_wal(&mut timeline, 1, start, &wal, Lsn(0));
    assert_eq!(ack.flush_lsn, generator.end_lsn());
}

/// An append may not span two segment files.
#[test]
fn appends_crossing_a_segment_are_refused() {
    let (mut timeline, mut generator) = timeline_with_wal(1);
    let (start, wal) = generate(&mut generator, 200);
    let at_segment_end = start.next_segment_start(segment_size());
    let first = (at_segment_end - start) as usize;
    let err = timeline.handle(append(1, start, &wal[..first + 16], Lsn(0))).unwrap_err();
    assert!(matches!(err, TimelineError::Refused(AcceptorError::CrossesSegment { .. })), "{err}");
}

mod random_sequences {
    //! Property: whatever a (possibly buggy or stale) proposer sends, the
    //! acceptor never truncates below commit, never moves commit back and
    //! never accepts a gap or a rewrite.
    use super::*;
    use proptest::prelude::*;

    /// One primary's WAL: every proposer streams these same bytes.
    struct Stream {
        bytes: Vec<u8>,
        boundaries: Vec<Lsn>,
    }

    fn stream() -> Stream {
        let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), TIMELINE_START);
        let mut boundaries = vec![TIMELINE_START];
        for index in 0..300usize {
            let payload = vec![index as u8; 16 + (index * 7919) % 9000];
            boundaries.push(generator.append_record(10, 0, index as u32, &payload).end_lsn);
        }
        let (start, bytes) = generator.take_bytes();
        assert_eq!(start, TIMELINE_START);
        Stream { bytes, boundaries }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Vote {
            term: u64,
        },
        /// Elected with a history made of (term, boundary index) pairs.
        Elected {
            term: u64,
            earlier: Vec<(u64, usize)>,
            start: usize,
        },
        Append {
            term: u64,
            shift: i64,
            len_bytes: usize,
            commit: usize,
        },
        Heartbeat {
            term: u64,
            commit: usize,
        },
        Sync,
    }

    fn op() -> impl Strategy<Value = Op> {
        let index = 0usize..301;
        prop_oneof![
            (0u64..6).prop_map(|term| Op::Vote { term }),
            (1u64..6, proptest::collection::vec((1u64..6, index.clone()), 0..3), index.clone())
                .prop_map(|(term, earlier, start)| Op::Elected { term, earlier, start }),
            (1u64..6, prop_oneof![8 => Just(0i64), 1 => Just(8i64), 1 => Just(-8i64)], 1usize..40_000, index.clone())
                .prop_map(|(term, shift, len_bytes, commit)| Op::Append { term, shift, len_bytes, commit }),
            (1u64..6, index).prop_map(|(term, commit)| Op::Heartbeat { term, commit }),
            Just(Op::Sync),
        ]
    }

    fn to_message(op: &Op, timeline: &MemoryTimeline, stream: &Stream) -> Option<ProposerMessage> {
        let boundary = |index: usize| stream.boundaries[index.min(stream.boundaries.len() - 1)];
        Some(match op {
            Op::Vote { term } => vote(*term),
            Op::Elected { term, earlier, start } => {
                let mut entries: Vec<(u64, Lsn)> =
                    earlier.iter().map(|&(t, i)| (t, boundary(i))).filter(|&(t, _)| t < *term).collect();
                entries.sort();
                entries.dedup_by_key(|entry| entry.0);
                entries.push((*term, boundary(*start)));
                let history = history(&entries);
                ProposerMessage::ProposerElected(ProposerElected {
                    cluster: cluster(),
                    term: Term(*term),
                    generation: MembershipGeneration::NOT_SET,
                    term_start_lsn: boundary(*start),
                    timeline_start_lsn: TIMELINE_START,
                    term_history: history,
                    pg_timelines: PgTimelineHistory::first(),
                })
            }
            Op::Append { term, shift, len_bytes, commit } => {
                let write = timeline.wal().write_lsn().max(TIMELINE_START);
                let begin = Lsn(write.0.checked_add_signed(*shift)?);
                let offset = usize::try_from(begin.checked_sub(TIMELINE_START)?).ok()?;
                let to_segment_end = (begin.next_segment_start(segment_size()) - begin) as usize;
                let len = (*len_bytes).min(to_segment_end).min(stream.bytes.len().checked_sub(offset)?);
                append(*term, begin, &stream.bytes[offset..offset + len], boundary(*commit))
            }
            Op::Heartbeat { term, commit } => append(*term, timeline.acceptor().flush_lsn(), &[], boundary(*commit)),
            Op::Sync => return None,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn acceptor_invariants_hold(ops in proptest::collection::vec(op(), 1..60)) {
            let stream = stream();
            let mut timeline = new_timeline();
            let mut max_commit = Lsn(0);
            for op in &ops {
                let commit_before = timeline.acceptor().commit_lsn();
                let write_before = timeline.wal().write_lsn();
                let result = match to_message(op, &timeline, &stream) {
                    Some(message) => timeline.handle(message).map(|_| ()),
                    None => timeline.sync_and_ack().map(|_| ()),
                };
                if let Err(TimelineError::Storage(error)) = result {
                    panic!("memory storage cannot fail: {error}");
                }
                let acceptor = timeline.acceptor();
                let write_after = timeline.wal().write_lsn();
                // Commit never moves back and never passes flush.
                prop_assert!(acceptor.commit_lsn() >= max_commit);
                max_commit = acceptor.commit_lsn();
                prop_assert!(acceptor.commit_lsn() <= acceptor.flush_lsn());
                // Truncation (the only way the log shrinks) never goes below commit.
                if write_after < write_before {
                    prop_assert!(write_after >= commit_before, "truncated to {write_after} below commit {commit_before}");
                }
                // No gap and no foreign byte: storage holds exactly the stream's prefix.
                let held = timeline.wal().contents();
                prop_assert_eq!(held, &stream.bytes[..held.len()]);
                // Flush acknowledgements are record boundaries: a record's
                // aligned end, or its end before the alignment padding when
                // the append stopped inside that padding (decoder docs).
                let flush = acceptor.flush_lsn();
                let record_end = |end: &Lsn| flush <= *end && end.0 - flush.0 < 8;
                prop_assert!(!flush.is_valid() || stream.boundaries.iter().any(record_end), "flush {flush}");
            }
        }
    }
}

fn digest_request(term: u64, start_lsn: Lsn, end_lsn: Lsn) -> ProposerMessage {
    ProposerMessage::WalDigestRequest(safekeeper_protocol::protocol::WalDigestRequest {
        cluster: cluster(),
        term: Term(term),
        generation: MembershipGeneration::NOT_SET,
        start_lsn,
        end_lsn,
    })
}

/// Rule: a digest is of durable WAL, computed from storage, and given only
/// to the proposer whose ProposerElected was accepted; a lower term is
/// answered with ours (fencing).
#[test]
fn wal_digest_is_of_durable_wal_for_the_elected_proposer_only() {
    let (mut timeline, generator) = timeline_with_wal(40);
    let flush = generator.end_lsn();
    let start = Lsn(flush.0 - 70_000);
    let reply = timeline.handle(digest_request(1, start, flush)).unwrap();
    let Some(AcceptorMessage::WalDigestResponse(response)) = reply else { panic!("expected a digest: {reply:?}") };
    let mut bytes = vec![0u8; (flush - start) as usize];
    timeline.wal_mut().read(start, &mut bytes).unwrap();
    let mut expected = safekeeper_protocol::protocol::WalDigester::default();
    expected.update(&bytes);
    assert_eq!((response.term, response.start_lsn, response.end_lsn), (Term(1), start, flush));
    assert_eq!(response.digest, expected.finish());

    // The last record's start is found from storage, even across a segment
    // boundary with nothing starting after it (a record spanning segments).
    let mut generator = generator;
    let spanning = generator.append_record(10, 0, 7, &vec![7u8; (SEGMENT_SIZE_BYTES + 5_000) as usize]);
    let (wal_start, wal) = generator.take_bytes();
    send_wal(&mut timeline, 1, wal_start, &wal, Lsn(0));
    let end = generator.end_lsn();
    assert!(end.0 - spanning.start_lsn.0 > SEGMENT_SIZE_BYTES, "the record spans a whole segment");
    let reply = timeline.handle(digest_request(1, end, end)).unwrap();
    let Some(AcceptorMessage::WalDigestResponse(last)) = reply else { panic!("expected a digest: {reply:?}") };
    assert_eq!(last.last_record_start_lsn, spanning.start_lsn, "the record ending at {end}");
    let before = timeline.handle(digest_request(1, spanning.start_lsn, spanning.start_lsn)).unwrap();
    let Some(AcceptorMessage::WalDigestResponse(before)) = before else { panic!("expected a digest") };
    assert!(before.last_record_start_lsn < spanning.start_lsn && before.last_record_start_lsn >= start);
    let flush = end;

    let beyond = timeline.handle(digest_request(1, start, flush + 1));
    assert!(matches!(beyond, Err(TimelineError::Refused(AcceptorError::DigestOutOfRange { .. }))), "{beyond:?}");
    let below = timeline.handle(digest_request(1, Lsn(TIMELINE_START.0 - 1), start));
    assert!(matches!(below, Err(TimelineError::Refused(AcceptorError::DigestOutOfRange { .. }))), "{below:?}");

    vote_response(timeline.handle(vote(3)).unwrap());
    let not_elected = timeline.handle(digest_request(3, start, flush));
    assert!(matches!(not_elected, Err(TimelineError::Refused(AcceptorError::NotElected { .. }))), "{not_elected:?}");
    let fenced = append_response(timeline.handle(digest_request(1, start, flush)).unwrap());
    assert_eq!(fenced.term, Term(3));
}

/// Two histories sharing a record boundary E: `ours` ends with two records
/// before E, `theirs` with one record spanning both, so the next record of
/// `theirs` links back (xl_prev) to a start that is not our last record's.
/// Returns (our WAL up to E with one record after it, E, their record at E).
fn forked_at_a_shared_boundary() -> (Vec<u8>, Lsn, Vec<u8>) {
    let mut ours = WalGenerator::new(SYSTEM_ID, segment_size(), TIMELINE_START);
    let mut theirs = ours.clone();
    // Long data blocks: 24-byte header + 5-byte block header + payload,
    // 8-aligned: 1032 + 1032 bytes = one 2064-byte record, on the first page.
    ours.append_record(10, 0, 1, &[1u8; 1003]);
    ours.append_record(10, 0, 2, &[2u8; 1003]);
    let spanning = theirs.append_record(10, 0, 3, &[3u8; 2035]);
    let boundary = ours.end_lsn();
    assert_eq!(spanning.end_lsn, boundary, "both histories have a record boundary at {boundary}");
    ours.append_record(10, 0, 4, &[4u8; 500]);
    let (_, ours) = ours.take_bytes();
    theirs.take_bytes();
    theirs.append_record(10, 0, 5, &[5u8; 500]);
    let (at, theirs) = theirs.take_bytes();
    assert_eq!(at, boundary);
    (ours, boundary, theirs)
}

/// Rule: a record appended where the acceptor resumed (after a restart or
/// a truncation) must link back to the last record stored before it: WAL
/// of another history is refused even when its records are valid.
#[test]
fn the_first_record_after_a_restart_or_truncation_must_link_back_to_the_log() {
    let (ours, boundary, theirs) = forked_at_a_shared_boundary();
    let until_boundary = &ours[..(boundary - TIMELINE_START) as usize];
    let refused = |timeline: &mut MemoryTimeline, term: u64| {
        let result = timeline.handle(append(term, boundary, &theirs, Lsn(0)));
        let error = result.expect_err("their record does not link back to ours");
        assert!(error.to_string().contains("links back to"), "{error}");
    };

    // Restart: the recovered acceptor resumes at the boundary.
    let mut timeline = new_timeline();
    vote_response(timeline.handle(vote(1)).unwrap());
    append_response(timeline.handle(elected(1, &[(1, TIMELINE_START)])).unwrap());
    send_wal(&mut timeline, 1, TIMELINE_START, until_boundary, Lsn(0));
    let mut timeline = timeline.crash_and_restart(0);
    vote_response(timeline.handle(vote(2)).unwrap());
    append_response(timeline.handle(elected(2, &[(1, TIMELINE_START), (2, boundary)])).unwrap());
    refused(&mut timeline, 2);
    let ack = send_wal(&mut timeline, 2, boundary, &ours[until_boundary.len()..], Lsn(0));
    assert_eq!(ack.flush_lsn, TIMELINE_START + ours.len() as u64, "our own next record is accepted");

    // Truncation: term 3 continues the log from the boundary.
    vote_response(timeline.handle(vote(3)).unwrap());
    let elected_3 = elected(3, &[(1, TIMELINE_START), (3, boundary)]);
    assert_eq!(append_response(timeline.handle(elected_3).unwrap()).flush_lsn, boundary, "truncated to {boundary}");
    refused(&mut timeline, 3);
}

fn peer_wal(begin_lsn: Lsn, wal: &[u8], history_entries: &[(u64, Lsn)], source_commit_lsn: Lsn) -> PeerWal {
    PeerWal { begin_lsn, wal: Bytes::copy_from_slice(wal), source_history: history(history_entries), source_commit_lsn }
}

/// Rule: WAL copied from a peer goes through the append checks and is
/// taken only from a peer whose log is ours (history agreeing up to the
/// end of the copy), only up to its commit LSN, and only under a
/// ProposerElected of our current term.
#[test]
fn peer_wal_is_taken_only_from_a_log_that_is_ours() {
    let (mut timeline, mut generator) = timeline_with_wal(5);
    let flush = generator.end_lsn();
    let (start, more) = generate(&mut generator, 3);
    assert_eq!(start, flush);
    let piece = &more[..more.len().min(20_000)];
    let end = flush + piece.len() as u64;
    let ours = [(1, TIMELINE_START)];
    let refused = |timeline: &mut MemoryTimeline, wal: PeerWal, why: &str| {
        let error = timeline.append_peer_wal(&wal).expect_err(why);
        assert!(matches!(error, TimelineError::Refused(_)), "{why}: {error}");
        assert_eq!(timeline.acceptor().write_lsn(), flush, "{why}: nothing written");
    };
    refused(&mut timeline, peer_wal(flush, piece, &ours, Lsn(end.0 - 1)), "beyond the peer's commit");
    refused(&mut timeline, peer_wal(flush, piece, &[(2, TIMELINE_START)], end), "another history");
    refused(
        &mut timeline,
        peer_wal(flush, piece, &[(1, TIMELINE_START), (2, flush)], end),
        "term 2 from the copy's start",
    );
    refused(&mut timeline, peer_wal(flush + 8, &piece[8..], &ours, end), "not at the write position");
    let mut garbage = piece.to_vec();
    garbage[100] ^= 0xff;
    refused(&mut timeline, peer_wal(flush, &garbage, &ours, end), "invalid WAL");

    // A later history entry beyond the copy does not matter.
    let commit = generator.end_lsn();
    timeline.append_peer_wal(&peer_wal(flush, piece, &[(1, TIMELINE_START), (4, commit)], commit)).unwrap();
    assert_eq!(timeline.sync_and_ack().unwrap(), None, "nobody waits for an acknowledgement");
    assert!(timeline.acceptor().flush_lsn() > flush, "the copy is durable up to its last record end");
    assert_eq!(timeline.acceptor().commit_lsn(), timeline.acceptor().flush_lsn(), "the peer's commit covers it");

    // A vote for a new term: no copying until its ProposerElected arrives.
    vote_response(timeline.handle(vote(2)).unwrap());
    let at = timeline.acceptor().write_lsn();
    let rest = &more[(at - flush) as usize..];
    let error = timeline.append_peer_wal(&peer_wal(at, &rest[..100.min(rest.len())], &ours, commit)).unwrap_err();
    assert!(error.to_string().contains("no proposer of our current term"), "{error}");
}

/// A restart at a record end that stops before the record's alignment
/// padding (as a stream cut there leaves it) resumes expecting the right
/// back-link: the next record of the same history is accepted.
#[test]
fn a_restart_at_an_unpadded_record_end_accepts_the_next_record() {
    let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), TIMELINE_START);
    generator.append_record(10, 0, 1, &[1u8; 1000]);
    let second = generator.append_record(10, 0, 2, &[2u8; 1000]);
    generator.append_record(10, 0, 3, &[3u8; 1000]);
    let (_, wal) = generator.take_bytes();
    // 24-byte header + 5-byte block header + 1000 bytes: the record's last
    // byte is 3 bytes short of its padded end.
    let unpadded_end = Lsn(second.end_lsn.0 - 3);
    let cut = (unpadded_end - TIMELINE_START) as usize;

    let mut timeline = new_timeline();
    vote_response(timeline.handle(vote(1)).unwrap());
    append_response(timeline.handle(elected(1, &[(1, TIMELINE_START)])).unwrap());
    let ack = send_wal(&mut timeline, 1, TIMELINE_START, &wal[..cut], Lsn(0));
    assert_eq!(ack.flush_lsn, unpadded_end, "the flush stops at the record's last byte");
    let mut timeline = timeline.crash_and_restart(0);
    vote_response(timeline.handle(vote(2)).unwrap());
    append_response(timeline.handle(elected(2, &[(1, TIMELINE_START), (2, unpadded_end)])).unwrap());
    let ack = send_wal(&mut timeline, 2, unpadded_end, &wal[cut..], Lsn(0));
    assert_eq!(ack.flush_lsn, TIMELINE_START + wal.len() as u64);
}

/// Rules of the membership configuration (docs/protocol.md, "Membership").
mod membership {
    use super::*;
    use safekeeper_protocol::membership::{Configuration, Member};
    use safekeeper_protocol::protocol::{MembershipResponse, SetMembership};

    fn member(id: u64) -> Member {
        Member { node_id: Some(NodeId(id)), pg_addr: format!("127.0.0.1:{}", 5000 + id) }
    }

    fn configuration(generation: u32, written_in_term: u64, ids: &[u64], new: Option<&[u64]>) -> Configuration {
        Configuration {
            generation: MembershipGeneration(generation),
            written_in_term: Term(written_in_term),
            members: ids.iter().map(|&id| member(id)).collect(),
            joint_new: new.map(|ids| ids.iter().map(|&id| member(id)).collect()),
        }
    }

    fn set(term: u64, configuration: Configuration) -> ProposerMessage {
        ProposerMessage::SetMembership(SetMembership { cluster: cluster(), term: Term(term), configuration })
    }

    fn with_generation(mut message: ProposerMessage, generation: u32) -> ProposerMessage {
        match &mut message {
            ProposerMessage::Greeting(m) => m.generation = MembershipGeneration(generation),
            ProposerMessage::VoteRequest(m) => m.generation = MembershipGeneration(generation),
            ProposerMessage::ProposerElected(m) => m.generation = MembershipGeneration(generation),
            ProposerMessage::AppendRequest(m) => m.generation = MembershipGeneration(generation),
            ProposerMessage::WalDigestRequest(m) => m.generation = MembershipGeneration(generation),
            ProposerMessage::SetMembership(_) => unreachable!("its generation is its configuration's"),
        }
        message
    }

    fn stored(reply: Option<AcceptorMessage>) -> (u32, Term) {
        match reply {
            Some(AcceptorMessage::MembershipResponse(MembershipResponse { generation, written_in_term, .. })) => {
                (generation.0, written_in_term)
            }
            other => panic!("expected a MembershipResponse, got {other:?}"),
        }
    }

    fn greeting() -> ProposerMessage {
        ProposerMessage::Greeting(Greeting {
            protocol_version: PROTOCOL_VERSION,
            cluster: cluster(),
            pg_version: 150000,
            wal_segment_size_bytes: SEGMENT_SIZE_BYTES as u32,
            proposer_id: [9; 16],
            generation: MembershipGeneration::NOT_SET,
            pg_timeline: 1,
        })
    }

    fn elected_in(term: u64) -> MemoryTimeline {
        let mut timeline = new_timeline();
        vote_response(timeline.handle(vote(term)).unwrap());
        append_response(timeline.handle(elected(term, &[(term, TIMELINE_START)])).unwrap());
        timeline
    }

    /// Rule: a configuration is stored (durably, before the answer) only
    /// from the proposer whose ProposerElected we accepted in our term.
    #[test]
    fn only_the_elected_proposer_writes_the_configuration() {
        let joint = configuration(1, 2, &[1, 2, 3], Some(&[1, 2, 4]));
        let mut voted = new_timeline();
        vote_response(voted.handle(vote(2)).unwrap());
        let err = voted.handle(set(2, joint.clone())).unwrap_err();
        assert!(matches!(err, TimelineError::Refused(AcceptorError::NotElected { .. })), "{err}");

        let mut timeline = elected_in(2);
        assert_eq!(stored(timeline.handle(set(2, joint.clone())).unwrap()), (1, Term(2)));
        assert_eq!(timeline.acceptor().state().membership, joint);
        assert_eq!(timeline.control().persisted.as_ref().unwrap().membership, joint, "persisted");
        // Again: idempotent.
        assert_eq!(stored(timeline.handle(set(2, joint.clone())).unwrap()), (1, Term(2)));
        // A fenced proposer learns the higher term and changes nothing.
        vote_response(timeline.handle(with_generation(vote(3), 1)).unwrap());
        let newer = configuration(2, 2, &[1, 2, 4], None);
        let reply = timeline.handle(set(2, newer)).unwrap();
        assert!(matches!(reply, Some(AcceptorMessage::MembershipResponse(MembershipResponse { term: Term(3), .. }))));
        assert_eq!(timeline.acceptor().state().membership, joint);
    }

    /// Rule: every proposer message but the greeting is refused below our
    /// generation; the greeting answers with the configuration.
    #[test]
    fn older_generations_are_refused_and_greetings_teach_the_newer_one() {
        let mut timeline = elected_in(2);
        let joint = configuration(1, 2, &[1, 2, 3], Some(&[1, 2, 4]));
        stored(timeline.handle(set(2, joint.clone())).unwrap());
        let err = timeline.handle(vote(5)).unwrap_err();
        assert!(
            matches!(
                err,
                TimelineError::Refused(AcceptorError::StaleGeneration {
                    ours: MembershipGeneration(1),
                    theirs: MembershipGeneration::NOT_SET
                })
            ),
            "{err}"
        );
        assert_eq!(timeline.acceptor().term(), Term(2), "the refused vote promised nothing");
        let err = timeline.handle(append(2, TIMELINE_START, &[], Lsn(0))).unwrap_err();
        assert!(matches!(err, TimelineError::Refused(AcceptorError::StaleGeneration { .. })), "{err}");
        match timeline.handle(greeting()).unwrap() {
            Some(AcceptorMessage::GreetingResponse(response)) => assert_eq!(response.configuration, joint),
            other => panic!("{other:?}"),
        }
        // A newer generation than ours is fine (the proposer is writing it).
        append_response(timeline.handle(with_generation(append(2, TIMELINE_START, &[], Lsn(0)), 2)).unwrap());
    }

    /// Rule: once our configuration leaves us out, we answer only greetings
    /// (and proposers of a newer generation, which may name us again).
    #[test]
    fn a_removed_member_refuses_everything_but_greetings() {
        let mut timeline = elected_in(2);
        stored(timeline.handle(set(2, configuration(1, 2, &[1, 2, 3], Some(&[2, 3, 4])))).unwrap());
        stored(timeline.handle(set(2, configuration(2, 2, &[2, 3, 4], None))).unwrap());
        let err = timeline.handle(with_generation(vote(3), 2)).unwrap_err();
        assert!(
            matches!(
                err,
                TimelineError::Refused(AcceptorError::NotAMember { generation: MembershipGeneration(2), .. })
            ),
            "{err}"
        );
        assert!(matches!(timeline.handle(greeting()).unwrap(), Some(AcceptorMessage::GreetingResponse(_))));
        // A newer generation may add it back: heard.
        vote_response(timeline.handle(with_generation(vote(3), 3)).unwrap());
        // While a member's node id is unknown, we cannot tell: not refused.
        let mut unknown = elected_in(2);
        let mut old = configuration(1, 2, &[2, 3, 4], None);
        old.members[0].node_id = None;
        stored(unknown.handle(set(2, old)).unwrap());
        vote_response(unknown.handle(with_generation(vote(3), 1)).unwrap());
    }

    /// Rule: of two configurations, the higher generation wins, then the
    /// later term; a loser is not stored and the answer shows the winner.
    #[test]
    fn configurations_are_ordered_by_generation_then_term() {
        let mut timeline = elected_in(2);
        stored(timeline.handle(set(2, configuration(1, 1, &[1, 2, 3], Some(&[1, 2, 4])))).unwrap());
        let later = configuration(1, 2, &[1, 2, 3], Some(&[1, 2, 5]));
        assert_eq!(stored(timeline.handle(set(2, later.clone())).unwrap()), (1, Term(2)));
        assert_eq!(timeline.acceptor().state().membership, later);
        let earlier = configuration(1, 1, &[1, 2, 3], Some(&[1, 2, 4]));
        assert_eq!(stored(timeline.handle(set(2, earlier)).unwrap()), (1, Term(2)), "not replaced");
        assert_eq!(timeline.acceptor().state().membership, later);
    }

    #[test]
    fn malformed_configurations_are_refused() {
        let mut timeline = elected_in(2);
        let twice = configuration(1, 2, &[1, 1, 3], None);
        let err = timeline.handle(set(2, twice)).unwrap_err();
        assert!(matches!(err, TimelineError::Refused(AcceptorError::BadConfiguration { .. })), "{err}");
        let from_the_future = configuration(1, 3, &[1, 2, 3], None);
        let err = timeline.handle(set(2, from_the_future)).unwrap_err();
        assert!(matches!(err, TimelineError::Refused(AcceptorError::BadConfiguration { .. })), "{err}");
        assert!(!timeline.acceptor().state().membership.is_set());
    }
}

/// A peer's log from TIMELINE_START over more than `segments` segments.
fn peer_log(segments: u64) -> (WalGenerator, Vec<u8>) {
    let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), TIMELINE_START);
    let mut wal = Vec::new();
    while generator.end_lsn() < TIMELINE_START + segments * SEGMENT_SIZE_BYTES {
        let (start, more) = generate(&mut generator, 50);
        assert_eq!(start, TIMELINE_START + wal.len() as u64);
        wal.extend_from_slice(&more);
    }
    (generator, wal)
}

/// An empty timeline that accepted ProposerElected of term 1 (as a new
/// safekeeper does): its WAL is initialized at TIMELINE_START, nothing written.
fn empty_elected_timeline() -> MemoryTimeline {
    let mut timeline = new_timeline();
    vote_response(timeline.handle(vote(1)).unwrap());
    let ack = append_response(timeline.handle(elected(1, &[(1, TIMELINE_START)])).unwrap());
    assert_eq!(ack.flush_lsn, TIMELINE_START);
    timeline
}

/// Copy `log[from..to)` (offsets from TIMELINE_START) as a peer recovery
/// round does: pieces of at most 64 KiB that never cross a segment.
fn copy_from_peer(timeline: &mut MemoryTimeline, log: &[u8], from: Lsn, to: Lsn, source: &[(u64, Lsn)], commit: Lsn) {
    let mut at = from;
    while at < to {
        let end = at.next_segment_start(segment_size()).min(to).min(at + (64 << 10));
        let bytes = &log[(at - TIMELINE_START) as usize..(end - TIMELINE_START) as usize];
        timeline.append_peer_wal(&peer_wal(at, bytes, source, commit)).unwrap();
        at = end;
    }
    assert_eq!(timeline.sync_and_ack().unwrap(), None, "nobody waits for an acknowledgement");
}

/// Rule (bootstrap): an acceptor whose WAL is empty takes a peer's piece
/// that begins at a later segment start (the peers removed the WAL at its
/// start): its timeline restarts there, durably before the write, and it
/// goes on as if its log had always started there (votes report the new
/// start; the proposer's appends continue it).
#[test]
fn an_empty_wal_is_bootstrapped_at_a_peers_later_segment_start() {
    let (generator, log) = peer_log(3);
    let peer_commit = generator.end_lsn();
    let bootstrap_at = TIMELINE_START + 2 * SEGMENT_SIZE_BYTES;
    let first = &log[(bootstrap_at - TIMELINE_START) as usize..][..20_000];
    let empty = RecoveredWal { end_lsn: Lsn::INVALID, decoder: None };
    let mut acceptor = Acceptor::new(NodeId(1), AcceptorConfig::default(), fresh_state(), empty);
    let _ = acceptor.handle(vote(1)).unwrap();
    let _ = acceptor.handle(elected(1, &[(1, TIMELINE_START)])).unwrap();
    let ready = acceptor.handle_peer_wal(&peer_wal(bootstrap_at, first, &[(1, TIMELINE_START)], peer_commit));
    let actions = ready.unwrap().actions;
    assert!(
        matches!(&actions[..], [
            StorageAction::PersistControl(state),
            StorageAction::RestartEmptyWal { start_lsn },
            StorageAction::WriteWal { start_lsn: write_at, .. },
        ] if state.timeline_start_lsn == bootstrap_at && *start_lsn == bootstrap_at && *write_at == bootstrap_at),
        "the control file names the new start, then the WAL restarts, then the write: {actions:?}"
    );

    // The same through the driver, on a fresh empty timeline.
    let mut timeline = empty_elected_timeline();
    let persisted_before = timeline.control().persist_count;
    let ours = [(1, TIMELINE_START)];
    copy_from_peer(&mut timeline, &log, bootstrap_at, bootstrap_at + 200_000, &ours, peer_commit);
    let acceptor = timeline.acceptor();
    assert_eq!(acceptor.state().timeline_start_lsn, bootstrap_at);
    assert_eq!(timeline.wal().start_lsn(), bootstrap_at, "the WAL below the new start is not held");
    assert!(acceptor.flush_lsn() > bootstrap_at);
    assert_eq!(acceptor.commit_lsn(), acceptor.flush_lsn(), "the peer's commit covers the copy");
    let persisted = timeline.control().persisted.as_ref().unwrap();
    assert_eq!(persisted.timeline_start_lsn, bootstrap_at);
    assert!(persisted.commit_lsn >= bootstrap_at, "nothing below the new start may ever be truncated");
    assert!(timeline.control().persist_count > persisted_before);
    assert_eq!(
        timeline.wal().contents(),
        &log[(bootstrap_at - TIMELINE_START) as usize..(timeline.wal().write_lsn() - TIMELINE_START) as usize]
    );

    // Later rounds continue it; then the proposer's appends do.
    let flush = timeline.acceptor().flush_lsn();
    let handoff_at = TIMELINE_START + 3 * SEGMENT_SIZE_BYTES + 1000;
    let write_at = timeline.acceptor().write_lsn();
    copy_from_peer(&mut timeline, &log, write_at, handoff_at, &ours, peer_commit);
    assert!(timeline.acceptor().flush_lsn() > flush);
    let write_at = timeline.acceptor().write_lsn();
    let ack = send_wal(&mut timeline, 1, write_at, &log[(write_at - TIMELINE_START) as usize..], peer_commit);
    assert_eq!(ack.flush_lsn, peer_commit);

    // A vote reports the new start, and the history its log reaches.
    let response = vote_response(timeline.handle(vote(2)).unwrap());
    assert_eq!(response.timeline_start_lsn, bootstrap_at);
    assert_eq!(response.flush_lsn, peer_commit);
    assert_eq!(response.term_history, history(&[(1, TIMELINE_START)]));
}

/// Rule (bootstrap): only an empty WAL restarts, only at a segment start,
/// and only with a piece that passes every other check; a refused piece
/// changes nothing.
#[test]
fn bootstrap_is_refused_unless_the_wal_is_empty_and_the_piece_is_sound() {
    let (generator, log) = peer_log(3);
    let peer_commit = generator.end_lsn();
    let bootstrap_at = TIMELINE_START + 2 * SEGMENT_SIZE_BYTES;
    let at = |lsn: Lsn, len: usize| &log[(lsn - TIMELINE_START) as usize..][..len];
    let ours = [(1, TIMELINE_START)];
    let refused = |timeline: &mut MemoryTimeline, wal: PeerWal, why: &str| -> String {
        let before = timeline.acceptor().state().clone();
        let (write, persisted) = (timeline.acceptor().write_lsn(), timeline.control().persist_count);
        let error = timeline.append_peer_wal(&wal).expect_err(why);
        assert!(matches!(error, TimelineError::Refused(_)), "{why}: {error}");
        assert_eq!(timeline.acceptor().state(), &before, "{why}: state unchanged");
        assert_eq!(timeline.acceptor().write_lsn(), write, "{why}: nothing written");
        assert_eq!(timeline.control().persist_count, persisted, "{why}: nothing persisted");
        assert_eq!(timeline.wal().start_lsn(), before.timeline_start_lsn, "{why}: the WAL stays where it was");
        error.to_string()
    };

    // A WAL holding records is never restarted, whatever the peer holds.
    let (mut holding, _) = timeline_with_wal(5);
    let error =
        refused(&mut holding, peer_wal(bootstrap_at, at(bootstrap_at, 20_000), &ours, peer_commit), "not empty");
    assert!(error.contains("write position"), "{error}");

    let mut timeline = empty_elected_timeline();
    let error = refused(
        &mut timeline,
        peer_wal(bootstrap_at + 8192, at(bootstrap_at + 8192, 20_000), &ours, peer_commit),
        "not a segment start",
    );
    assert!(error.contains("segment start"), "{error}");
    let error = refused(
        &mut timeline,
        peer_wal(bootstrap_at, at(bootstrap_at, 20_000), &ours, bootstrap_at + 19_999),
        "beyond the peer's commit",
    );
    assert!(error.contains("commit"), "{error}");
    refused(
        &mut timeline,
        peer_wal(bootstrap_at, at(bootstrap_at, 20_000), &[(2, TIMELINE_START)], peer_commit),
        "another history",
    );
    let mut garbage = at(bootstrap_at, 20_000).to_vec();
    garbage[0] ^= 0xff; // the page magic: a record continued from the segment before is not checkable
    refused(&mut timeline, peer_wal(bootstrap_at, &garbage, &ours, peer_commit), "invalid WAL");
    refused(
        &mut timeline,
        peer_wal(bootstrap_at, at(bootstrap_at, SEGMENT_SIZE_BYTES as usize + 100), &ours, peer_commit),
        "crosses a segment",
    );
    // Without ProposerElected of the current term (a vote since), nothing.
    vote_response(timeline.handle(vote(2)).unwrap());
    let error =
        refused(&mut timeline, peer_wal(bootstrap_at, at(bootstrap_at, 20_000), &ours, peer_commit), "not elected");
    assert!(error.contains("no proposer of our current term"), "{error}");
}

/// Rule (bootstrap, crash safety): a crash after the bootstrap's control
/// write leaves the new start, with or without the copied WAL; a restart
/// after the copy was synced continues it (the proposer elected anew
/// streams from the recovered end).
#[test]
fn a_bootstrapped_wal_survives_a_crash_and_continues() {
    let (generator, log) = peer_log(3);
    let peer_commit = generator.end_lsn();
    let bootstrap_at = TIMELINE_START + 2 * SEGMENT_SIZE_BYTES;

    // Crash before the first sync: the new start, empty.
    let mut timeline = empty_elected_timeline();
    let first = &log[(bootstrap_at - TIMELINE_START) as usize..][..20_000];
    timeline.append_peer_wal(&peer_wal(bootstrap_at, first, &[(1, TIMELINE_START)], peer_commit)).unwrap();
    let timeline = timeline.crash_and_restart(0);
    assert_eq!(timeline.acceptor().state().timeline_start_lsn, bootstrap_at);
    assert_eq!(timeline.acceptor().flush_lsn(), bootstrap_at);
    assert_eq!(timeline.wal().start_lsn(), bootstrap_at);

    // Crash after a synced copy: recovery finds the copied records.
    let mut timeline = empty_elected_timeline();
    let ours = [(1, TIMELINE_START)];
    copy_from_peer(&mut timeline, &log, bootstrap_at, bootstrap_at + 300_000, &ours, peer_commit);
    let flush = timeline.acceptor().flush_lsn();
    let mut timeline = timeline.crash_and_restart(0);
    assert_eq!(timeline.acceptor().flush_lsn(), flush);
    assert_eq!(timeline.acceptor().state().timeline_start_lsn, bootstrap_at);
    assert_eq!(timeline.wal().start_lsn(), bootstrap_at);

    // A new proposer (its term starts at the peers' log end) is accepted
    // without truncating; recovery copies the rest of the peer's log, and
    // the proposer's new WAL follows it.
    vote_response(timeline.handle(vote(2)).unwrap());
    let term_2 = [(1, TIMELINE_START), (2, peer_commit)];
    assert_eq!(append_response(timeline.handle(elected(2, &term_2)).unwrap()).flush_lsn, flush, "nothing truncated");
    let write_at = timeline.acceptor().write_lsn();
    copy_from_peer(&mut timeline, &log, write_at, peer_commit, &term_2, peer_commit);
    assert_eq!(timeline.acceptor().flush_lsn(), peer_commit);
    let mut generator = generator;
    let (new_start, new_wal) = generate(&mut generator, 10);
    assert_eq!(new_start, peer_commit);
    let ack = send_wal(&mut timeline, 2, new_start, &new_wal, Lsn(0));
    assert_eq!(ack.flush_lsn, generator.end_lsn());
}

mod pg_timelines {
    //! Postgres timelines only go up (the acceptor's rules, acceptor.rs
    //! module docs): no vote for a superseded timeline, no ProposerElected
    //! whose history goes down or disagrees below the common point, no WAL
    //! whose pages name another timeline than the history or that puts a
    //! switch point inside a record. Every refusal leaves state and
    //! storage as they were.
    use super::*;
    use postgres_wal::lsn::PgTimelineId;
    use postgres_wal::timeline_history::PgTimelineSwitch;
    use postgres_wal::wal::format::WAL_PAGE_SIZE_BYTES;
    use safekeeper_protocol::protocol::NO_PG_TIMELINE;

    fn vote_on(term: u64, pg_timeline: PgTimelineId) -> ProposerMessage {
        ProposerMessage::VoteRequest(VoteRequest {
            cluster: cluster(),
            term: Term(term),
            generation: MembershipGeneration::NOT_SET,
            pg_timeline,
        })
    }

    fn elected_on(term: u64, entries: &[(u64, Lsn)], pg_timelines: PgTimelineHistory) -> ProposerMessage {
        let ProposerMessage::ProposerElected(mut message) = elected(term, entries) else { unreachable!() };
        message.pg_timelines = pg_timelines;
        ProposerMessage::ProposerElected(message)
    }

    /// Timeline `current`, whose ancestors ended at `switches` (oldest first).
    fn history_of(current: PgTimelineId, switches: &[(PgTimelineId, Lsn)]) -> PgTimelineHistory {
        let switches = switches
            .iter()
            .map(|&(timeline, end_lsn)| PgTimelineSwitch { timeline, end_lsn, reason: "promoted".into() })
            .collect();
        let history = PgTimelineHistory { current, switches };
        history.validate().unwrap();
        history
    }

    /// Everything a refusal must leave alone.
    #[derive(Debug, PartialEq)]
    struct Snapshot {
        state: ControlState,
        elected_term: Option<Term>,
        write_lsn: Lsn,
        flush_lsn: Lsn,
        wal: Vec<u8>,
        persisted: Option<ControlState>,
        persist_count: u64,
        sync_count: u64,
    }

    fn snapshot(timeline: &MemoryTimeline) -> Snapshot {
        Snapshot {
            state: timeline.acceptor().state().clone(),
            elected_term: timeline.acceptor().elected_term(),
            write_lsn: timeline.acceptor().write_lsn(),
            flush_lsn: timeline.acceptor().flush_lsn(),
            wal: timeline.wal().contents().to_vec(),
            persisted: timeline.control().persisted.clone(),
            persist_count: timeline.control().persist_count,
            sync_count: timeline.wal().sync_count,
        }
    }

    /// `message` is refused with an error `matches` accepts, and nothing changed.
    fn assert_refused_unchanged(
        timeline: &mut MemoryTimeline,
        message: ProposerMessage,
        matches: impl Fn(&AcceptorError) -> bool,
    ) -> AcceptorError {
        let before = snapshot(timeline);
        let error = match timeline.handle(message) {
            Err(TimelineError::Refused(error)) => error,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(matches(&error), "unexpected refusal: {error}");
        assert_eq!(timeline.sync_and_ack().unwrap(), None, "nothing was left to sync or acknowledge");
        assert_eq!(snapshot(timeline), before, "a refused message changes nothing ({error})");
        error
    }

    /// The log of `timeline_with_wal(records)` continued in term 2 by a
    /// server promoted to timeline 2 at the log's end: returns the timeline
    /// (elected in term 2 under that history, no WAL of timeline 2 yet),
    /// a generator at the switch point on timeline 2, and the switch point.
    fn promoted_at_log_end(records: usize) -> (MemoryTimeline, WalGenerator, Lsn) {
        let (mut timeline, mut generator) = timeline_with_wal(records);
        let switch_lsn = timeline.acceptor().flush_lsn();
        assert_ne!(switch_lsn.block_offset(WAL_PAGE_SIZE_BYTES), 0, "the switch is inside a page");
        assert!(vote_response(timeline.handle(vote_on(2, 2)).unwrap()).vote_given);
        let history = history_of(2, &[(1, switch_lsn)]);
        let entries = [(1, TIMELINE_START), (2, switch_lsn)];
        append_response(timeline.handle(elected_on(2, &entries, history.clone())).unwrap());
        assert_eq!(timeline.acceptor().state().pg_timelines, history);
        assert_eq!(generator.switch_timeline(2), switch_lsn);
        (timeline, generator, switch_lsn)
    }

    /// Rule: no vote for a proposer streaming a Postgres timeline below the
    /// one that wrote our log (an old primary after a failover), and no term
    /// bump for it; the same or a newer timeline, and a sync proposer
    /// (`NO_PG_TIMELINE`), get votes as before.
    #[test]
    fn votes_are_refused_to_a_superseded_timeline_only() {
        let (mut timeline, _, switch_lsn) = promoted_at_log_end(10);
        let error = assert_refused_unchanged(&mut timeline, vote_on(3, 1), |error| {
            matches!(error, AcceptorError::SupersededTimeline { .. })
        });
        assert_eq!(error, AcceptorError::SupersededTimeline { proposer_timeline: 1, current: 2, switch_lsn });
        assert!(error.to_string().contains("old primary"), "{error}");
        assert_eq!(timeline.acceptor().term(), Term(2), "no term bump for the old primary");
        for (term, pg_timeline) in [(3, 2), (4, 3), (5, NO_PG_TIMELINE)] {
            let response = vote_response(timeline.handle(vote_on(term, pg_timeline)).unwrap());
            assert!(response.vote_given, "term {term}, timeline {pg_timeline}");
            assert_eq!(response.pg_timelines, history_of(2, &[(1, switch_lsn)]), "the vote shows the log's history");
            assert_eq!(timeline.control().persisted.as_ref().unwrap().term, Term(term));
        }
        // Refused however high its term.
        assert_refused_unchanged(&mut timeline, vote_on(1_000, 1), |error| {
            matches!(error, AcceptorError::SupersededTimeline { .. })
        });
    }

    /// Rule: a ProposerElected whose history ends on a timeline below the
    /// one that wrote WAL we keep is refused (timelines only go up), even
    /// from a term we voted for.
    #[test]
    fn elected_with_a_lower_timeline_is_refused() {
        let (mut timeline, mut generator, switch_lsn) = promoted_at_log_end(10);
        let (start, wal) = generate(&mut generator, 3);
        let kept_end = send_wal(&mut timeline, 2, start, &wal, Lsn(0)).flush_lsn;
        assert!(vote_response(timeline.handle(vote_on(3, NO_PG_TIMELINE)).unwrap()).vote_given);
        let entries = [(1, TIMELINE_START), (2, switch_lsn), (3, kept_end)];
        let error = assert_refused_unchanged(&mut timeline, elected_on(3, &entries, PgTimelineHistory::first()), |e| {
            matches!(e, AcceptorError::TimelineWentDown { .. })
        });
        assert_eq!(error, AcceptorError::TimelineWentDown { ours: 2, theirs: 1 });
        assert_eq!(timeline.acceptor().elected_term(), None, "term 3 was voted for, never accepted");
    }

    /// Rule: a ProposerElected whose history says another timeline wrote
    /// WAL we keep (below the common point) is refused: a promotion below
    /// our log's end on timeline 1, and two servers promoted to the same
    /// timeline 2 at different points.
    #[test]
    fn elected_whose_history_disagrees_below_the_common_point_is_refused() {
        let (mut timeline, _) = timeline_with_wal(10);
        let flush = timeline.acceptor().flush_lsn();
        let (short, _) = timeline_with_wal(5);
        let below = short.acceptor().flush_lsn();
        assert!(TIMELINE_START < below && below < flush);
        assert!(vote_response(timeline.handle(vote_on(2, 2)).unwrap()).vote_given);
        let entries = [(1, TIMELINE_START), (2, flush)];
        let error =
            assert_refused_unchanged(&mut timeline, elected_on(2, &entries, history_of(2, &[(1, below)])), |e| {
                matches!(e, AcceptorError::PgTimelinesDisagree { .. })
            });
        assert!(matches!(error, AcceptorError::PgTimelinesDisagree { lsn, .. } if lsn == flush), "{error}");

        // Our log went on to timeline 2 at `switch_lsn`; another standby,
        // promoted to timeline 2 earlier, is not our timeline 2.
        let (mut timeline, mut generator, switch_lsn) = promoted_at_log_end(10);
        let (start, wal) = generate(&mut generator, 3);
        let ack = send_wal(&mut timeline, 2, start, &wal, Lsn(0));
        assert_eq!(ack.flush_lsn, generator.end_lsn());
        let end = ack.flush_lsn;
        assert!(vote_response(timeline.handle(vote_on(3, 2)).unwrap()).vote_given);
        let entries = [(1, TIMELINE_START), (2, switch_lsn), (3, end)];
        let other_two = history_of(2, &[(1, below)]);
        assert_refused_unchanged(&mut timeline, elected_on(3, &entries, other_two), |e| {
            matches!(e, AcceptorError::PgTimelinesDisagree { .. })
        });
        // Nor a timeline 3 descending from that other timeline 2.
        let other_three = history_of(3, &[(1, below), (2, end)]);
        assert_refused_unchanged(&mut timeline, elected_on(3, &entries, other_three), |e| {
            matches!(e, AcceptorError::PgTimelinesDisagree { .. })
        });
        // A timeline 3 descending from ours, forking at our end, is fine.
        let ours_then_three = history_of(3, &[(1, switch_lsn), (2, end)]);
        append_response(timeline.handle(elected_on(3, &entries, ours_then_three.clone())).unwrap());
        assert_eq!(timeline.acceptor().state().pg_timelines, ours_then_three);
    }

    /// Rule: a new history is adopted with the term, and storage is told
    /// (`SetPgTimelines`: segment names, history file) before the control
    /// file that names it is written; the same history emits nothing.
    #[test]
    fn a_new_history_is_named_to_storage_before_the_control_file() {
        let (timeline, _) = timeline_with_wal(10);
        let flush = timeline.acceptor().flush_lsn();
        let (mut acceptor, _, _) = timeline.into_parts();
        let ready = acceptor.handle(vote_on(2, 2)).unwrap();
        assert!(ready.actions.iter().all(|action| !matches!(action, StorageAction::SetPgTimelines(_))));
        let history = history_of(2, &[(1, flush)]);
        let entries = [(1, TIMELINE_START), (2, flush)];
        let ready = acceptor.handle(elected_on(2, &entries, history.clone())).unwrap();
        let set_at = ready.actions.iter().position(|action| matches!(action, StorageAction::SetPgTimelines(_)));
        let persist_at = ready.actions.iter().position(|action| matches!(action, StorageAction::PersistControl(_)));
        let (Some(set_at), Some(persist_at)) = (set_at, persist_at) else {
            panic!("expected SetPgTimelines and PersistControl: {:?}", ready.actions)
        };
        assert!(set_at < persist_at, "storage learns the history before the control file: {:?}", ready.actions);
        assert_eq!(ready.actions[set_at], StorageAction::SetPgTimelines(Box::new(history.clone())));
        let StorageAction::PersistControl(state) = &ready.actions[persist_at] else { unreachable!() };
        assert_eq!(state.pg_timelines, history, "the control file names the new history");
        assert_eq!(acceptor.state().pg_timelines, history);
        // The next term under the same history: nothing to rename.
        let _ = acceptor.handle(vote_on(3, 2)).unwrap();
        let entries = [(1, TIMELINE_START), (2, flush), (3, flush)];
        let ready = acceptor.handle(elected_on(3, &entries, history)).unwrap();
        assert!(
            ready.actions.iter().all(|action| !matches!(action, StorageAction::SetPgTimelines(_))),
            "{:?}",
            ready.actions
        );
    }

    /// Rule: every page header that starts in an append names the timeline
    /// the history says wrote that page: after a switch at the log's end,
    /// pages of the old timeline or of a timeline not in the history are
    /// refused; the promoted server's pages are taken.
    #[test]
    fn an_append_whose_pages_name_the_wrong_timeline_is_refused() {
        let (mut timeline, promoted, switch_lsn) = promoted_at_log_end(10);
        for wrong in [1, 3] {
            let mut generator = continue_on(&promoted, (wrong != 1).then_some(wrong));
            let (start, wal) = generate(&mut generator, 8);
            assert!(start + wal.len() as u64 > switch_lsn.align_up(WAL_PAGE_SIZE_BYTES) + 24, "crosses a page");
            assert_eq!(start, switch_lsn);
            let error = assert_refused_unchanged(&mut timeline, append(2, start, &wal, Lsn(0)), |e| {
                matches!(e, AcceptorError::PageTimelineMismatch { .. })
            });
            let first_page = switch_lsn.align_up(WAL_PAGE_SIZE_BYTES);
            assert_eq!(
                error,
                AcceptorError::PageTimelineMismatch { page_lsn: first_page, expected: 2, found: wrong },
                "timeline {wrong}"
            );
        }
        let mut generator = promoted;
        let (start, wal) = generate(&mut generator, 8);
        let ack = send_wal(&mut timeline, 2, start, &wal, Lsn(0));
        assert_eq!(ack.flush_lsn, generator.end_lsn(), "the promoted server's WAL is taken");
    }

    /// A generator like `promoted` (on timeline 2 from its position), but
    /// writing pages of timeline 1 (`None`: the old primary's, as if no
    /// switch happened) or of `Some(timeline)`.
    fn continue_on(promoted: &WalGenerator, timeline: Option<PgTimelineId>) -> WalGenerator {
        let mut generator = promoted.clone();
        match timeline {
            Some(timeline) => {
                generator.switch_timeline(timeline);
            }
            None => {
                let (end, last) = (generator.end_lsn(), generator.last_record_start());
                generator = WalGenerator::resume(SYSTEM_ID, segment_size(), end, last, 1);
            }
        }
        generator
    }

    /// A log on timeline 1 ending at `flush`, then WAL `wal` from there: one
    /// small record ending at `record_end`, then the promoted server's
    /// records on timeline 2 (switched at `record_end`).
    fn switch_after_one_record(records: usize) -> (MemoryTimeline, Lsn, Lsn, Vec<u8>) {
        let (timeline, mut generator) = timeline_with_wal(records);
        let flush = timeline.acceptor().flush_lsn();
        let record = generator.append_record(10, 0, 77, &[7; 100]);
        assert_eq!(record.start_lsn.0 / WAL_PAGE_SIZE_BYTES, (record.end_lsn.0 - 1) / WAL_PAGE_SIZE_BYTES);
        generator.switch_timeline(2);
        let (start, wal) = generate(&mut generator, 4);
        assert_eq!(start, flush);
        (timeline, flush, record.end_lsn, wal)
    }

    /// Rule: a switch point inside (begin, end] of an append must be the
    /// end of a record decoded in that append; one inside a record is refused.
    #[test]
    fn a_switch_point_inside_a_record_is_refused() {
        let (mut timeline, flush, record_end, wal) = switch_after_one_record(10);
        let inside = Lsn(record_end.0 - 8);
        assert!(vote_response(timeline.handle(vote_on(2, 2)).unwrap()).vote_given);
        let entries = [(1, TIMELINE_START), (2, flush)];
        // The history's switch lies above our log: nothing held disagrees.
        append_response(timeline.handle(elected_on(2, &entries, history_of(2, &[(1, inside)]))).unwrap());
        let error = assert_refused_unchanged(&mut timeline, append(2, flush, &wal, Lsn(0)), |e| {
            matches!(e, AcceptorError::SwitchInsideRecord { .. })
        });
        assert_eq!(error, AcceptorError::SwitchInsideRecord { switch_lsn: inside });
        // Cut right at the switch point: the first piece holds no record end there either.
        let cut = (inside - flush) as usize;
        assert_refused_unchanged(&mut timeline, append(2, flush, &wal[..cut], Lsn(0)), |e| {
            matches!(e, AcceptorError::SwitchInsideRecord { .. })
        });
    }

    /// Rule (the accepting side): pages before the switch point on the old
    /// timeline (the page holding it keeps its old header), pages after it
    /// on the new, the switch at a record end: taken, in one append or cut
    /// anywhere, and the log's timelines are as the history says.
    #[test]
    fn a_correct_switch_inside_an_append_is_accepted() {
        for cut in [None, Some(0usize), Some(1), Some(100), Some(5_000)] {
            let (mut timeline, flush, record_end, wal) = switch_after_one_record(10);
            assert!(vote_response(timeline.handle(vote_on(2, 2)).unwrap()).vote_given);
            let entries = [(1, TIMELINE_START), (2, flush)];
            let history = history_of(2, &[(1, record_end)]);
            append_response(timeline.handle(elected_on(2, &entries, history.clone())).unwrap());
            let ack = match cut.map(|offset| (record_end - flush) as usize + offset) {
                None => send_wal(&mut timeline, 2, flush, &wal, Lsn(0)),
                Some(at) => {
                    timeline.handle(append(2, flush, &wal[..at], Lsn(0))).unwrap();
                    send_wal(&mut timeline, 2, flush + at as u64, &wal[at..], Lsn(0))
                }
            };
            assert_eq!(ack.flush_lsn, flush + wal.len() as u64, "cut {cut:?}");
            assert_eq!(timeline.acceptor().state().pg_timelines, history);
            // A sync proposer (no Postgres) continuing this log is heard.
            assert!(vote_response(timeline.handle(vote_on(3, NO_PG_TIMELINE)).unwrap()).vote_given);
        }
    }

    /// The first page of a new timeline can start at the switch point (a
    /// record ended at a page end): that page names the new timeline.
    #[test]
    fn a_switch_at_a_page_boundary_is_accepted() {
        let (mut timeline, mut generator) = timeline_with_wal(10);
        let flush = timeline.acceptor().flush_lsn();
        // Fill the page: a record ending exactly at the next page start.
        let page_end = flush.align_up(WAL_PAGE_SIZE_BYTES);
        let room = (page_end - flush) as usize;
        assert!(room > 24 + 5 + 8, "room for a record");
        let payload_len = room - 24 - if room - 24 - 2 < 256 { 2 } else { 5 };
        let record = generator.append_record(10, 0, 5, &vec![3; payload_len]);
        assert_eq!(record.end_lsn, page_end, "the record ends at the page end");
        let switch_lsn = generator.switch_timeline(2);
        let (start, wal) = generate(&mut generator, 3);
        assert!(vote_response(timeline.handle(vote_on(2, 2)).unwrap()).vote_given);
        let history = history_of(2, &[(1, switch_lsn)]);
        append_response(timeline.handle(elected_on(2, &[(1, TIMELINE_START), (2, flush)], history)).unwrap());
        let ack = send_wal(&mut timeline, 2, start, &wal, Lsn(0));
        assert_eq!(ack.flush_lsn, generator.end_lsn());
    }

    /// Rule: every page header that starts in an append is checked, also
    /// when the append ends inside that header (the next append starts
    /// past its first bytes). A page of timeline 1 after the switch to 2
    /// must be refused whatever the cut.
    #[test]

    fn a_wrong_page_timeline_split_across_appends_is_refused() {
        let (mut timeline, promoted, switch_lsn) = promoted_at_log_end(10);
        let mut generator = continue_on(&promoted, None);
        let (start, wal) = generate(&mut generator, 8);
        let first_page = switch_lsn.align_up(WAL_PAGE_SIZE_BYTES);
        let cut = (first_page - start) as usize + 6; // inside xlp_tli (bytes 4..8)
                                                     // The rest of that page only: the next page's header would be caught.
        let page_end = (first_page - start) as usize + WAL_PAGE_SIZE_BYTES as usize;
        assert!(wal.len() > page_end);
        let first = timeline.handle(append(2, start, &wal[..cut], Lsn(0)));
        let second = first.is_ok().then(|| timeline.handle(append(2, start + cut as u64, &wal[cut..page_end], Lsn(0))));
        let refused = first.is_err() || second.is_some_and(|reply| reply.is_err());
        let flush = timeline.sync_and_ack().ok().flatten().map(|reply| append_response(Some(reply)).flush_lsn);
        assert!(refused, "a page of timeline 1 at {first_page} was taken into timeline 2's log (flush now {flush:?})");
    }

    /// Rule: the common point of an empty log is its start, and an empty
    /// log keeps no WAL for a history to disagree about: a server promoted
    /// exactly at the timeline start is heard.
    #[test]

    fn an_empty_log_takes_a_switch_at_the_timeline_start() {
        let mut timeline = new_timeline();
        vote_response(timeline.handle(vote(1)).unwrap());
        append_response(timeline.handle(elected(1, &[(1, TIMELINE_START)])).unwrap());
        assert_eq!(timeline.acceptor().flush_lsn(), TIMELINE_START, "initialized, empty");
        assert!(vote_response(timeline.handle(vote_on(2, 2)).unwrap()).vote_given);
        let history = history_of(2, &[(1, TIMELINE_START)]);
        let entries = [(1, TIMELINE_START), (2, TIMELINE_START)];
        let reply = timeline.handle(elected_on(2, &entries, history.clone()));
        assert!(reply.is_ok(), "{reply:?}");
        assert_eq!(timeline.acceptor().state().pg_timelines, history);
    }

    /// Rule (what "timelines only go up" protects): the log's timelines
    /// never go down below the common point, where our WAL is kept. A newer
    /// timeline whose switch point is at or above the common point names
    /// only WAL of the divergent tail (a promotion whose term reached us
    /// but never a quorum): the proposer's log, which a quorum holds
    /// (nothing of ours above the common point is committed), must win, as
    /// the tail does.
    #[test]

    fn a_newer_timeline_only_in_the_divergent_tail_is_replaced() {
        let (mut timeline, mut generator, switch_lsn) = promoted_at_log_end(10);
        // Some uncommitted WAL of the promotion's term, on timeline 2.
        let (start, wal) = generate(&mut generator, 3);
        send_wal(&mut timeline, 2, start, &wal, Lsn(0));
        assert!(timeline.acceptor().commit_lsn() <= switch_lsn);
        // The log a quorum holds went on on timeline 1 in term 3 (started at
        // `switch_lsn`); a sync of term 4 continues it.
        assert!(vote_response(timeline.handle(vote_on(4, NO_PG_TIMELINE)).unwrap()).vote_given);
        let entries = [(1, TIMELINE_START), (3, switch_lsn), (4, switch_lsn)];
        let reply = timeline.handle(elected_on(4, &entries, PgTimelineHistory::first()));
        assert!(reply.is_ok(), "{reply:?}");
        assert_eq!(timeline.acceptor().flush_lsn(), switch_lsn, "the divergent tail is truncated");
        assert_eq!(timeline.acceptor().state().pg_timelines, PgTimelineHistory::first());
    }
}
