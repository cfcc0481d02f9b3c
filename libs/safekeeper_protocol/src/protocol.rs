//! Proposer ⇄ acceptor messages and their binary encoding.
//!
//! Every message is one tag byte followed by big-endian fields. Proposer
//! messages carry the cluster identity so two clusters' WAL can never mix.
//! The compute_shim and the safekeeper both use this module; it is the only
//! place the wire layout is written down in code (docs/protocol.md in prose).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::ids::{ClusterId, NodeId, SystemId, TenantId, Term, TimelineId};
use crate::membership::{Configuration, Member, MembershipGeneration, MAX_MEMBERS, MAX_MEMBER_ADDR_BYTES};
use crate::term_history::{TermHistory, TermStart, MAX_TERM_HISTORY_ENTRIES};
use postgres_wal::lsn::{Lsn, PgTimelineId};
use postgres_wal::timeline_history::{
    PgTimelineHistory, PgTimelineSwitch, MAX_PG_TIMELINE_SWITCHES, MAX_SWITCH_REASON_BYTES,
};

/// Version of this encoding, exchanged in the greeting. 2 added the WAL
/// digest exchange, 3 the membership configuration and its generation, 4
/// the Postgres timelines (greeting, votes, ProposerElected).
pub const PROTOCOL_VERSION: u32 = 4;
/// The greeting's Postgres timeline of a proposer that streams no Postgres
/// (`sync-safekeepers`): it adopts the donor's timelines.
pub const NO_PG_TIMELINE: PgTimelineId = 0;
/// Largest WAL payload in one AppendRequest. The proposer splits larger runs.
pub const MAX_APPEND_PAYLOAD_BYTES: usize = 1 << 20;
/// Largest encoded message of either direction (payload plus headers, or a
/// full term history).
pub const MAX_MESSAGE_BYTES: usize = MAX_APPEND_PAYLOAD_BYTES + 4096;

/// Largest range one WalDigestRequest may cover: bounds the reading the
/// owner thread does for one message.
pub const MAX_DIGEST_RANGE_BYTES: u64 = 16 << 20;

const CLUSTER_ID_BYTES: usize = 8 + 16 + 16;
const TERM_START_BYTES: usize = 16;

mod tag {
    pub const GREETING: u8 = b'g';
    pub const VOTE_REQUEST: u8 = b'v';
    pub const PROPOSER_ELECTED: u8 = b'e';
    pub const APPEND_REQUEST: u8 = b'a';
    pub const WAL_DIGEST_REQUEST: u8 = b'd';
    pub const SET_MEMBERSHIP: u8 = b'm';
    pub const GREETING_RESPONSE: u8 = b'G';
    pub const VOTE_RESPONSE: u8 = b'V';
    pub const APPEND_RESPONSE: u8 = b'A';
    pub const WAL_DIGEST_RESPONSE: u8 = b'D';
    pub const MEMBERSHIP_RESPONSE: u8 = b'M';
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub protocol_version: u32,
    pub cluster: ClusterId,
    pub pg_version: u32,
    pub wal_segment_size_bytes: u32,
    /// Random id of this proposer instance, for logs and status.
    pub proposer_id: [u8; 16],
    /// The generation of the proposer's configuration. Every proposer
    /// message carries it; an acceptor refuses those below its own
    /// (except the greeting, whose answer tells the proposer the newer one).
    pub generation: MembershipGeneration,
    /// The Postgres timeline the proposer streams ([`NO_PG_TIMELINE`]: none).
    pub pg_timeline: PgTimelineId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoteRequest {
    pub cluster: ClusterId,
    pub term: Term,
    pub generation: MembershipGeneration,
    /// As in the greeting: an acceptor whose log a later Postgres timeline
    /// wrote refuses the vote to a proposer streaming an older one.
    pub pg_timeline: PgTimelineId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposerElected {
    pub cluster: ClusterId,
    pub term: Term,
    pub generation: MembershipGeneration,
    /// Where the proposer's term begins writing (the donor's flush LSN).
    pub term_start_lsn: Lsn,
    /// First LSN of the timeline's WAL; an empty acceptor starts here.
    pub timeline_start_lsn: Lsn,
    /// The proposer's history, ending with (term, term_start_lsn).
    pub term_history: TermHistory,
    /// Which Postgres timeline wrote which part of the proposer's log: its
    /// Postgres's history (or, without Postgres, the donor's).
    pub pg_timelines: PgTimelineHistory,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendRequest {
    pub cluster: ClusterId,
    pub term: Term,
    pub generation: MembershipGeneration,
    pub begin_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_lsn: Lsn,
    /// `end_lsn - begin_lsn` bytes of WAL; empty for a heartbeat.
    pub wal: Bytes,
}

/// Ask an acceptor that accepted our ProposerElected for the digest of its
/// WAL in `[start_lsn, end_lsn)` (possibly empty), below its flush LSN, and
/// for the start of its last record ending at `end_lsn`: the new proposer
/// compares them with Postgres's WAL before sending any
/// (docs/proposer.md, "Checking Postgres against the log").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalDigestRequest {
    pub cluster: ClusterId,
    pub term: Term,
    pub generation: MembershipGeneration,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
}

/// The elected proposer writes its configuration (the one its messages'
/// generation names) to an acceptor that accepted its ProposerElected
/// (docs/protocol.md, "Membership").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetMembership {
    pub cluster: ClusterId,
    pub term: Term,
    pub configuration: Configuration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProposerMessage {
    Greeting(Greeting),
    VoteRequest(VoteRequest),
    ProposerElected(ProposerElected),
    AppendRequest(AppendRequest),
    WalDigestRequest(WalDigestRequest),
    SetMembership(SetMembership),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GreetingResponse {
    pub node_id: NodeId,
    pub term: Term,
    /// The acceptor's stored configuration (generation 0: none).
    pub configuration: Configuration,
    /// The Postgres timelines of the acceptor's log: a proposer whose
    /// Postgres is on a timeline this history superseded steps down here.
    pub pg_timelines: PgTimelineHistory,
}

/// The configuration an acceptor holds after a SetMembership: the one sent
/// (stored or already there) or one that takes precedence over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipResponse {
    pub term: Term,
    pub generation: MembershipGeneration,
    pub written_in_term: Term,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoteResponse {
    /// The acceptor's term after handling the request.
    pub term: Term,
    pub vote_given: bool,
    pub flush_lsn: Lsn,
    pub commit_lsn: Lsn,
    pub timeline_start_lsn: Lsn,
    pub term_history: TermHistory,
    pub pg_timelines: PgTimelineHistory,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendResponse {
    /// A term above the proposer's means it has been fenced off.
    pub term: Term,
    /// Durable end of WAL, always a record boundary.
    pub flush_lsn: Lsn,
    pub commit_lsn: Lsn,
}

/// SHA-256 of a WAL byte range.
pub type WalDigest = [u8; 32];

/// The one way both sides compute a [`WalDigest`], fed in any number of pieces.
#[derive(Clone, Default)]
pub struct WalDigester(Sha256);

impl WalDigester {
    pub fn update(&mut self, wal: &[u8]) {
        self.0.update(wal);
    }
    pub fn finish(self) -> WalDigest {
        self.0.finalize().into()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalDigestResponse {
    pub term: Term,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub digest: WalDigest,
    /// Start of the last record ending at or before `end_lsn` (what the
    /// `xl_prev` of the next record must name), or 0 if not held.
    pub last_record_start_lsn: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcceptorMessage {
    GreetingResponse(GreetingResponse),
    VoteResponse(VoteResponse),
    AppendResponse(AppendResponse),
    WalDigestResponse(WalDigestResponse),
    MembershipResponse(MembershipResponse),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("message truncated: needed {needed_bytes} more bytes for {field}")]
    Truncated { field: &'static str, needed_bytes: usize },
    #[error("message of {len_bytes} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge { len_bytes: usize },
    #[error("{trailing_bytes} unexpected bytes after the message")]
    TrailingBytes { trailing_bytes: usize },
    #[error("term history of {entries} entries exceeds the limit of {MAX_TERM_HISTORY_ENTRIES}")]
    HistoryTooLong { entries: u32 },
    #[error("append of {begin}..{end} carries {payload_bytes} bytes")]
    AppendLengthMismatch { begin: Lsn, end: Lsn, payload_bytes: usize },
    #[error("bad boolean byte {0}")]
    BadBool(u8),
    #[error("WAL digest range {start}..{end} is reversed or longer than {MAX_DIGEST_RANGE_BYTES} bytes")]
    BadDigestRange { start: Lsn, end: Lsn },
    #[error("bad membership configuration: {reason}")]
    BadConfiguration { reason: String },
    #[error("bad Postgres timeline history: {reason}")]
    BadPgTimelines { reason: String },
}

/// Bounds-checked reader over one message; every read names its field.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, field: &'static str, len: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < len {
            return Err(DecodeError::Truncated { field, needed_bytes: len - self.buf.remaining() });
        }
        Ok(())
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.need(field, 1)?;
        Ok(self.buf.get_u8())
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.need(field, 4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.need(field, 8)?;
        Ok(self.buf.get_u64())
    }
    fn bytes16(&mut self, field: &'static str) -> Result<[u8; 16], DecodeError> {
        self.need(field, 16)?;
        let mut out = [0u8; 16];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }
    fn bytes32(&mut self, field: &'static str) -> Result<[u8; 32], DecodeError> {
        self.need(field, 32)?;
        let mut out = [0u8; 32];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }
    fn digest_range(&mut self) -> Result<(Lsn, Lsn), DecodeError> {
        let (start, end) = (self.lsn("start lsn")?, self.lsn("end lsn")?);
        match end.0.checked_sub(start.0) {
            Some(0..=MAX_DIGEST_RANGE_BYTES) => Ok((start, end)),
            _ => Err(DecodeError::BadDigestRange { start, end }),
        }
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::BadBool(other)),
        }
    }
    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.u64(field).map(Lsn)
    }
    fn term(&mut self, field: &'static str) -> Result<Term, DecodeError> {
        self.u64(field).map(Term)
    }
    fn cluster(&mut self) -> Result<ClusterId, DecodeError> {
        self.need("cluster id", CLUSTER_ID_BYTES)?;
        Ok(ClusterId {
            system_id: SystemId(self.u64("system id")?),
            tenant_id: TenantId(self.bytes16("tenant id")?),
            timeline_id: TimelineId(self.bytes16("timeline id")?),
        })
    }
    fn history(&mut self) -> Result<TermHistory, DecodeError> {
        let entries = self.u32("term history length")?;
        if entries as usize > MAX_TERM_HISTORY_ENTRIES {
            return Err(DecodeError::HistoryTooLong { entries });
        }
        // Check the bytes are there before allocating for them.
        self.need("term history", entries as usize * TERM_START_BYTES)?;
        let mut history = Vec::with_capacity(entries as usize);
        for _ in 0..entries {
            history.push(TermStart { term: self.term("history term")?, start_lsn: self.lsn("history start lsn")? });
        }
        Ok(TermHistory(history))
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.need(field, 2)?;
        Ok(self.buf.get_u16())
    }
    fn members(&mut self) -> Result<Vec<Member>, DecodeError> {
        let bad = |reason: String| DecodeError::BadConfiguration { reason };
        let count = self.u8("member count")? as usize;
        if count > MAX_MEMBERS {
            return Err(bad(format!("{count} members, more than {MAX_MEMBERS}")));
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            let has_id = self.bool("member node id known")?;
            let id = self.u64("member node id")?;
            let len = self.u16("member address length")? as usize;
            if len > MAX_MEMBER_ADDR_BYTES {
                return Err(bad(format!("member address of {len} bytes")));
            }
            self.need("member address", len)?;
            let addr = self.buf.split_to(len);
            let pg_addr = String::from_utf8(addr.to_vec()).map_err(|_| bad("member address is not UTF-8".into()))?;
            members.push(Member { node_id: has_id.then_some(NodeId(id)), pg_addr });
        }
        Ok(members)
    }
    fn generation(&mut self) -> Result<MembershipGeneration, DecodeError> {
        self.u32("generation").map(MembershipGeneration)
    }
    fn configuration(&mut self) -> Result<Configuration, DecodeError> {
        let generation = self.generation()?;
        let written_in_term = self.term("configuration term")?;
        let members = self.members()?;
        let joint_new = if self.bool("joint")? { Some(self.members()?) } else { None };
        Ok(Configuration { generation, written_in_term, members, joint_new })
    }
    fn pg_timelines(&mut self) -> Result<PgTimelineHistory, DecodeError> {
        let bad = |reason: String| DecodeError::BadPgTimelines { reason };
        let current = self.u32("pg timeline")?;
        let count = self.u32("pg timeline switches")? as usize;
        if count > MAX_PG_TIMELINE_SWITCHES {
            return Err(bad(format!("{count} switches, more than {MAX_PG_TIMELINE_SWITCHES}")));
        }
        let mut switches = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let timeline = self.u32("switch timeline")?;
            let end_lsn = self.lsn("switch lsn")?;
            let len = self.u16("switch reason length")? as usize;
            if len > MAX_SWITCH_REASON_BYTES {
                return Err(bad(format!("a switch reason of {len} bytes")));
            }
            self.need("switch reason", len)?;
            let reason = String::from_utf8(self.buf.split_to(len).to_vec())
                .map_err(|_| bad("a switch reason is not UTF-8".into()))?;
            switches.push(PgTimelineSwitch { timeline, end_lsn, reason });
        }
        let history = PgTimelineHistory { current, switches };
        history.validate().map_err(|e| bad(e.to_string()))?;
        Ok(history)
    }
    fn finish(self) -> Result<(), DecodeError> {
        match self.buf.remaining() {
            0 => Ok(()),
            trailing_bytes => Err(DecodeError::TrailingBytes { trailing_bytes }),
        }
    }
}

fn start_reading(message: Bytes) -> Result<(u8, Reader), DecodeError> {
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge { len_bytes: message.len() });
    }
    let mut reader = Reader { buf: message };
    if reader.buf.is_empty() {
        return Err(DecodeError::Empty);
    }
    let tag = reader.u8("tag")?;
    Ok((tag, reader))
}

fn put_cluster(out: &mut BytesMut, cluster: &ClusterId) {
    out.put_u64(cluster.system_id.0);
    out.put_slice(&cluster.tenant_id.0);
    out.put_slice(&cluster.timeline_id.0);
}

/// What every proposer message after the greeting starts with.
fn put_head(out: &mut BytesMut, tag: u8, cluster: &ClusterId, term: Term, generation: MembershipGeneration) {
    out.put_u8(tag);
    put_cluster(out, cluster);
    out.put_u64(term.0);
    out.put_u32(generation.0);
}

fn put_members(out: &mut BytesMut, members: &[Member]) {
    out.put_u8(u8::try_from(members.len()).expect("sets are bounded by MAX_MEMBERS"));
    for member in members {
        out.put_u8(u8::from(member.node_id.is_some()));
        out.put_u64(member.node_id.map_or(0, |id| id.0));
        out.put_u16(u16::try_from(member.pg_addr.len()).expect("addresses are bounded"));
        out.put_slice(member.pg_addr.as_bytes());
    }
}

fn put_configuration(out: &mut BytesMut, configuration: &Configuration) {
    out.put_u32(configuration.generation.0);
    out.put_u64(configuration.written_in_term.0);
    put_members(out, &configuration.members);
    out.put_u8(u8::from(configuration.joint_new.is_some()));
    if let Some(new) = &configuration.joint_new {
        put_members(out, new);
    }
}

fn put_pg_timelines(out: &mut BytesMut, history: &PgTimelineHistory) {
    out.put_u32(history.current);
    out.put_u32(u32::try_from(history.switches.len()).expect("bounded by MAX_PG_TIMELINE_SWITCHES"));
    for switch in &history.switches {
        out.put_u32(switch.timeline);
        out.put_u64(switch.end_lsn.0);
        let reason = &switch.reason.as_bytes()[..switch.reason.len().min(MAX_SWITCH_REASON_BYTES)];
        out.put_u16(reason.len() as u16);
        out.put_slice(reason);
    }
}

fn put_history(out: &mut BytesMut, history: &TermHistory) {
    let entries = u32::try_from(history.0.len()).expect("term history length fits u32");
    out.put_u32(entries);
    for entry in &history.0 {
        out.put_u64(entry.term.0);
        out.put_u64(entry.start_lsn.0);
    }
}

impl ProposerMessage {
    pub fn cluster(&self) -> &ClusterId {
        match self {
            ProposerMessage::Greeting(m) => &m.cluster,
            ProposerMessage::VoteRequest(m) => &m.cluster,
            ProposerMessage::ProposerElected(m) => &m.cluster,
            ProposerMessage::AppendRequest(m) => &m.cluster,
            ProposerMessage::WalDigestRequest(m) => &m.cluster,
            ProposerMessage::SetMembership(m) => &m.cluster,
        }
    }

    /// The highest term the message names (its own, and those of a term
    /// history it carries); `None` for a greeting, which names none.
    pub fn highest_term(&self) -> Option<Term> {
        let history_max = |history: &TermHistory| history.0.iter().map(|entry| entry.term).max();
        match self {
            ProposerMessage::Greeting(_) => None,
            ProposerMessage::VoteRequest(m) => Some(m.term),
            ProposerMessage::ProposerElected(m) => Some(m.term.max(history_max(&m.term_history).unwrap_or_default())),
            ProposerMessage::AppendRequest(m) => Some(m.term),
            ProposerMessage::WalDigestRequest(m) => Some(m.term),
            ProposerMessage::SetMembership(m) => Some(m.term),
        }
    }

    /// The generation of the sender's configuration.
    pub fn generation(&self) -> MembershipGeneration {
        match self {
            ProposerMessage::Greeting(m) => m.generation,
            ProposerMessage::VoteRequest(m) => m.generation,
            ProposerMessage::ProposerElected(m) => m.generation,
            ProposerMessage::AppendRequest(m) => m.generation,
            ProposerMessage::WalDigestRequest(m) => m.generation,
            ProposerMessage::SetMembership(m) => m.configuration.generation,
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        match self {
            ProposerMessage::Greeting(m) => {
                out.put_u8(tag::GREETING);
                out.put_u32(m.protocol_version);
                put_cluster(&mut out, &m.cluster);
                out.put_u32(m.pg_version);
                out.put_u32(m.wal_segment_size_bytes);
                out.put_slice(&m.proposer_id);
                out.put_u32(m.generation.0);
                out.put_u32(m.pg_timeline);
            }
            ProposerMessage::VoteRequest(m) => {
                put_head(&mut out, tag::VOTE_REQUEST, &m.cluster, m.term, m.generation);
                out.put_u32(m.pg_timeline);
            }
            ProposerMessage::ProposerElected(m) => {
                put_head(&mut out, tag::PROPOSER_ELECTED, &m.cluster, m.term, m.generation);
                out.put_u64(m.term_start_lsn.0);
                out.put_u64(m.timeline_start_lsn.0);
                put_history(&mut out, &m.term_history);
                put_pg_timelines(&mut out, &m.pg_timelines);
            }
            ProposerMessage::AppendRequest(m) => {
                out.reserve(m.wal.len() + 80);
                put_head(&mut out, tag::APPEND_REQUEST, &m.cluster, m.term, m.generation);
                out.put_u64(m.begin_lsn.0);
                out.put_u64(m.end_lsn.0);
                out.put_u64(m.commit_lsn.0);
                out.put_slice(&m.wal);
            }
            ProposerMessage::WalDigestRequest(m) => {
                put_head(&mut out, tag::WAL_DIGEST_REQUEST, &m.cluster, m.term, m.generation);
                out.put_u64(m.start_lsn.0);
                out.put_u64(m.end_lsn.0);
            }
            ProposerMessage::SetMembership(m) => {
                let generation = m.configuration.generation;
                put_head(&mut out, tag::SET_MEMBERSHIP, &m.cluster, m.term, generation);
                put_configuration(&mut out, &m.configuration);
            }
        }
        out.freeze()
    }

    /// Decode one message. The WAL payload of an append shares `message`'s
    /// buffer (no copy).
    pub fn decode(message: Bytes) -> Result<ProposerMessage, DecodeError> {
        let (tag, mut r) = start_reading(message)?;
        let decoded = match tag {
            tag::GREETING => ProposerMessage::Greeting(Greeting {
                protocol_version: r.u32("protocol version")?,
                cluster: r.cluster()?,
                pg_version: r.u32("pg version")?,
                wal_segment_size_bytes: r.u32("wal segment size")?,
                proposer_id: r.bytes16("proposer id")?,
                generation: r.generation()?,
                pg_timeline: r.u32("pg timeline")?,
            }),
            tag::VOTE_REQUEST => ProposerMessage::VoteRequest(VoteRequest {
                cluster: r.cluster()?,
                term: r.term("term")?,
                generation: r.generation()?,
                pg_timeline: r.u32("pg timeline")?,
            }),
            tag::PROPOSER_ELECTED => ProposerMessage::ProposerElected(ProposerElected {
                cluster: r.cluster()?,
                term: r.term("term")?,
                generation: r.generation()?,
                term_start_lsn: r.lsn("term start lsn")?,
                timeline_start_lsn: r.lsn("timeline start lsn")?,
                term_history: r.history()?,
                pg_timelines: r.pg_timelines()?,
            }),
            tag::APPEND_REQUEST => {
                let cluster = r.cluster()?;
                let term = r.term("term")?;
                let generation = r.generation()?;
                let begin_lsn = r.lsn("begin lsn")?;
                let end_lsn = r.lsn("end lsn")?;
                let commit_lsn = r.lsn("commit lsn")?;
                let wal = std::mem::take(&mut r.buf);
                let length_ok = end_lsn.0.checked_sub(begin_lsn.0) == Some(wal.len() as u64);
                if !length_ok || wal.len() > MAX_APPEND_PAYLOAD_BYTES {
                    return Err(DecodeError::AppendLengthMismatch {
                        begin: begin_lsn,
                        end: end_lsn,
                        payload_bytes: wal.len(),
                    });
                }
                let append = AppendRequest { cluster, term, generation, begin_lsn, end_lsn, commit_lsn, wal };
                ProposerMessage::AppendRequest(append)
            }
            tag::WAL_DIGEST_REQUEST => {
                let cluster = r.cluster()?;
                let term = r.term("term")?;
                let generation = r.generation()?;
                let (start_lsn, end_lsn) = r.digest_range()?;
                ProposerMessage::WalDigestRequest(WalDigestRequest { cluster, term, generation, start_lsn, end_lsn })
            }
            tag::SET_MEMBERSHIP => {
                let cluster = r.cluster()?;
                let term = r.term("term")?;
                let generation = r.generation()?;
                let configuration = r.configuration()?;
                if configuration.generation != generation {
                    let reason = format!("generation {generation} carries configuration {}", configuration.generation);
                    return Err(DecodeError::BadConfiguration { reason });
                }
                ProposerMessage::SetMembership(SetMembership { cluster, term, configuration })
            }
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(decoded)
    }
}

impl AcceptorMessage {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        match self {
            AcceptorMessage::GreetingResponse(m) => {
                out.put_u8(tag::GREETING_RESPONSE);
                out.put_u64(m.node_id.0);
                out.put_u64(m.term.0);
                put_configuration(&mut out, &m.configuration);
                put_pg_timelines(&mut out, &m.pg_timelines);
            }
            AcceptorMessage::VoteResponse(m) => {
                out.put_u8(tag::VOTE_RESPONSE);
                out.put_u64(m.term.0);
                out.put_u8(u8::from(m.vote_given));
                out.put_u64(m.flush_lsn.0);
                out.put_u64(m.commit_lsn.0);
                out.put_u64(m.timeline_start_lsn.0);
                put_history(&mut out, &m.term_history);
                put_pg_timelines(&mut out, &m.pg_timelines);
            }
            AcceptorMessage::AppendResponse(m) => {
                out.put_u8(tag::APPEND_RESPONSE);
                out.put_u64(m.term.0);
                out.put_u64(m.flush_lsn.0);
                out.put_u64(m.commit_lsn.0);
            }
            AcceptorMessage::WalDigestResponse(m) => {
                out.put_u8(tag::WAL_DIGEST_RESPONSE);
                out.put_u64(m.term.0);
                out.put_u64(m.start_lsn.0);
                out.put_u64(m.end_lsn.0);
                out.put_slice(&m.digest);
                out.put_u64(m.last_record_start_lsn.0);
            }
            AcceptorMessage::MembershipResponse(m) => {
                out.put_u8(tag::MEMBERSHIP_RESPONSE);
                out.put_u64(m.term.0);
                out.put_u32(m.generation.0);
                out.put_u64(m.written_in_term.0);
            }
        }
        out.freeze()
    }

    pub fn decode(message: Bytes) -> Result<AcceptorMessage, DecodeError> {
        let (tag, mut r) = start_reading(message)?;
        let decoded = match tag {
            tag::GREETING_RESPONSE => AcceptorMessage::GreetingResponse(GreetingResponse {
                node_id: NodeId(r.u64("node id")?),
                term: r.term("term")?,
                configuration: r.configuration()?,
                pg_timelines: r.pg_timelines()?,
            }),
            tag::VOTE_RESPONSE => AcceptorMessage::VoteResponse(VoteResponse {
                term: r.term("term")?,
                vote_given: r.bool("vote given")?,
                flush_lsn: r.lsn("flush lsn")?,
                commit_lsn: r.lsn("commit lsn")?,
                timeline_start_lsn: r.lsn("timeline start lsn")?,
                term_history: r.history()?,
                pg_timelines: r.pg_timelines()?,
            }),
            tag::APPEND_RESPONSE => AcceptorMessage::AppendResponse(AppendResponse {
                term: r.term("term")?,
                flush_lsn: r.lsn("flush lsn")?,
                commit_lsn: r.lsn("commit lsn")?,
            }),
            tag::WAL_DIGEST_RESPONSE => {
                let term = r.term("term")?;
                let (start_lsn, end_lsn) = r.digest_range()?;
                AcceptorMessage::WalDigestResponse(WalDigestResponse {
                    term,
                    start_lsn,
                    end_lsn,
                    digest: r.bytes32("digest")?,
                    last_record_start_lsn: r.lsn("last record start lsn")?,
                })
            }
            tag::MEMBERSHIP_RESPONSE => AcceptorMessage::MembershipResponse(MembershipResponse {
                term: r.term("term")?,
                generation: r.generation()?,
                written_in_term: r.term("configuration term")?,
            }),
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cluster() -> impl Strategy<Value = ClusterId> {
        (any::<u64>(), any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(|(s, t, l)| ClusterId {
            system_id: SystemId(s),
            tenant_id: TenantId(t),
            timeline_id: TimelineId(l),
        })
    }

    fn history() -> impl Strategy<Value = TermHistory> {
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8).prop_map(|entries| {
            TermHistory(entries.into_iter().map(|(t, l)| TermStart { term: Term(t), start_lsn: Lsn(l) }).collect())
        })
    }

    /// Valid histories: increasing ids below `current`, switch points in order.
    fn pg_timelines() -> impl Strategy<Value = PgTimelineHistory> {
        proptest::collection::vec((1u32..4, 0u64..1 << 30, "[a-z ]{0,30}"), 0..4).prop_map(|steps| {
            let (mut timeline, mut end) = (0u32, 0u64);
            let mut switches = vec![];
            for (id_step, lsn_step, reason) in steps {
                timeline += id_step;
                end += lsn_step;
                switches.push(PgTimelineSwitch { timeline, end_lsn: Lsn(end), reason });
            }
            PgTimelineHistory { current: timeline + 1, switches }
        })
    }

    fn proposer_message() -> impl Strategy<Value = ProposerMessage> {
        prop_oneof![
            (any::<u32>(), cluster(), any::<u32>(), any::<u32>(), any::<[u8; 16]>()).prop_map(|(v, c, pg, seg, id)| {
                ProposerMessage::Greeting(Greeting {
                    protocol_version: v,
                    cluster: c,
                    pg_version: pg,
                    wal_segment_size_bytes: seg,
                    proposer_id: id,
                    generation: MembershipGeneration(seg.rotate_left(7)),
                    pg_timeline: pg.rotate_left(3),
                })
            }),
            (cluster(), any::<u64>(), any::<u32>()).prop_map(|(c, t, g)| ProposerMessage::VoteRequest(VoteRequest {
                cluster: c,
                term: Term(t),
                generation: MembershipGeneration(g),
                pg_timeline: g.rotate_left(5),
            })),
            (cluster(), any::<u64>(), any::<u64>(), any::<u64>(), history(), pg_timelines()).prop_map(
                |(c, t, s, ts, h, pg_timelines)| {
                    ProposerMessage::ProposerElected(ProposerElected {
                        cluster: c,
                        term: Term(t),
                        generation: MembershipGeneration(t as u32),
                        term_start_lsn: Lsn(s),
                        timeline_start_lsn: Lsn(ts),
                        term_history: h,
                        pg_timelines,
                    })
                }
            ),
            (cluster(), any::<u64>(), 0u64..1 << 40, any::<u64>(), proptest::collection::vec(any::<u8>(), 0..512))
                .prop_map(|(c, t, begin, commit, wal)| {
                    ProposerMessage::AppendRequest(AppendRequest {
                        cluster: c,
                        term: Term(t),
                        generation: MembershipGeneration((commit >> 32) as u32),
                        begin_lsn: Lsn(begin),
                        end_lsn: Lsn(begin + wal.len() as u64),
                        commit_lsn: Lsn(commit),
                        wal: Bytes::from(wal),
                    })
                }),
            (cluster(), any::<u64>(), 0u64..1 << 40, 0..=MAX_DIGEST_RANGE_BYTES).prop_map(|(c, t, start, len)| {
                ProposerMessage::WalDigestRequest(WalDigestRequest {
                    cluster: c,
                    term: Term(t),
                    generation: MembershipGeneration(len as u32),
                    start_lsn: Lsn(start),
                    end_lsn: Lsn(start + len),
                })
            }),
            (cluster(), any::<u64>(), configuration()).prop_map(|(c, t, configuration)| {
                ProposerMessage::SetMembership(SetMembership { cluster: c, term: Term(t), configuration })
            }),
        ]
    }

    fn members() -> impl Strategy<Value = Vec<Member>> {
        proptest::collection::vec((any::<Option<u64>>(), "[a-z0-9.:]{1,40}"), 0..=MAX_MEMBERS).prop_map(|members| {
            members.into_iter().map(|(id, pg_addr)| Member { node_id: id.map(NodeId), pg_addr }).collect()
        })
    }

    fn configuration() -> impl Strategy<Value = Configuration> {
        (any::<u32>(), any::<u64>(), members(), proptest::option::of(members())).prop_map(
            |(generation, term, members, joint_new)| Configuration {
                generation: MembershipGeneration(generation),
                written_in_term: Term(term),
                members,
                joint_new,
            },
        )
    }

    fn acceptor_message() -> impl Strategy<Value = AcceptorMessage> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), configuration(), pg_timelines()).prop_map(
                |(n, t, configuration, pg_timelines)| {
                    AcceptorMessage::GreetingResponse(GreetingResponse {
                        node_id: NodeId(n),
                        term: Term(t),
                        configuration,
                        pg_timelines,
                    })
                }
            ),
            (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(t, g, w)| {
                AcceptorMessage::MembershipResponse(MembershipResponse {
                    term: Term(t),
                    generation: MembershipGeneration(g),
                    written_in_term: Term(w),
                })
            }),
            (any::<u64>(), any::<bool>(), any::<u64>(), any::<u64>(), any::<u64>(), history(), pg_timelines())
                .prop_map(|(t, given, f, c, s, h, pg_timelines)| {
                    AcceptorMessage::VoteResponse(VoteResponse {
                        term: Term(t),
                        vote_given: given,
                        flush_lsn: Lsn(f),
                        commit_lsn: Lsn(c),
                        timeline_start_lsn: Lsn(s),
                        term_history: h,
                        pg_timelines,
                    })
                }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(t, f, c)| {
                AcceptorMessage::AppendResponse(AppendResponse { term: Term(t), flush_lsn: Lsn(f), commit_lsn: Lsn(c) })
            }),
            (any::<u64>(), 0u64..1 << 40, 0..=MAX_DIGEST_RANGE_BYTES, any::<[u8; 32]>(), any::<u64>()).prop_map(
                |(t, start, len, d, last)| {
                    AcceptorMessage::WalDigestResponse(WalDigestResponse {
                        term: Term(t),
                        start_lsn: Lsn(start),
                        end_lsn: Lsn(start + len),
                        digest: d,
                        last_record_start_lsn: Lsn(last),
                    })
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn proposer_messages_round_trip(message in proposer_message()) {
            prop_assert_eq!(ProposerMessage::decode(message.encode()).unwrap(), message);
        }

        #[test]
        fn acceptor_messages_round_trip(message in acceptor_message()) {
            prop_assert_eq!(AcceptorMessage::decode(message.encode()).unwrap(), message);
        }

        /// Every strict prefix of a valid message is a typed error, never a panic.
        #[test]
        fn truncated_messages_are_errors(message in proposer_message(), cut in any::<prop::sample::Index>()) {
            let encoded = message.encode();
            let len = cut.index(encoded.len());
            // An append cut inside its payload is caught by the length check.
            prop_assert!(ProposerMessage::decode(encoded.slice(..len)).is_err());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ProposerMessage::decode(Bytes::from(bytes.clone()));
            let _ = AcceptorMessage::decode(Bytes::from(bytes));
        }
    }

    #[test]
    fn history_length_is_checked_before_allocating() {
        let mut out = BytesMut::new();
        out.put_u8(tag::VOTE_RESPONSE);
        out.put_slice(&[0u8; 8 + 1 + 8 + 8 + 8]);
        out.put_u32(u32::MAX);
        assert_eq!(AcceptorMessage::decode(out.freeze()), Err(DecodeError::HistoryTooLong { entries: u32::MAX }));
    }

    #[test]
    fn pg_timelines_that_go_down_are_refused() {
        let mut out = BytesMut::new();
        let history = PgTimelineHistory {
            current: 2,
            switches: vec![PgTimelineSwitch { timeline: 3, end_lsn: Lsn(16), reason: String::new() }],
        };
        put_pg_timelines(&mut out, &history);
        let mut reader = Reader { buf: out.freeze() };
        let error = reader.pg_timelines().unwrap_err().to_string();
        assert!(error.contains("cannot descend"), "{error}");
    }

    #[test]
    fn digest_ranges_are_checked() {
        let request = |start: u64, end: u64| {
            ProposerMessage::WalDigestRequest(WalDigestRequest {
                cluster: ClusterId::default(),
                term: Term(1),
                generation: MembershipGeneration::NOT_SET,
                start_lsn: Lsn(start),
                end_lsn: Lsn(end),
            })
            .encode()
        };
        for (start, end) in [(10, 9), (0, MAX_DIGEST_RANGE_BYTES + 1)] {
            let result = ProposerMessage::decode(request(start, end));
            assert!(matches!(result, Err(DecodeError::BadDigestRange { .. })), "{start}..{end}: {result:?}");
        }
        assert!(ProposerMessage::decode(request(0, MAX_DIGEST_RANGE_BYTES)).is_ok());
        assert!(ProposerMessage::decode(request(10, 10)).is_ok(), "an empty range asks only for the last record");
    }

    #[test]
    fn digests_do_not_depend_on_how_the_bytes_are_split() {
        let wal: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut whole = WalDigester::default();
        whole.update(&wal);
        let mut pieces = WalDigester::default();
        for piece in wal.chunks(333) {
            pieces.update(piece);
        }
        let whole = whole.finish();
        assert_eq!(whole, pieces.finish());
        let mut changed = WalDigester::default();
        changed.update(&wal[..9_999]);
        changed.update(&[wal[9_999] ^ 1]);
        assert_ne!(whole, changed.finish());
    }

    #[test]
    fn oversized_messages_are_refused() {
        let huge = Bytes::from(vec![tag::APPEND_REQUEST; MAX_MESSAGE_BYTES + 1]);
        assert!(matches!(ProposerMessage::decode(huge), Err(DecodeError::TooLarge { .. })));
    }
}
