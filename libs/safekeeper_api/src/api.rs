//! The safekeeper HTTP contract (docs/http-api.md): paths, the timeline
//! status document as clients read it, and the headers of a WAL response
//! (the server writes them from the same constants). Pure parsing; everything a server sends is checked, never
//! trusted to be well formed.

use std::fmt;

use hyper::HeaderMap;
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::timeline_history::PgTimelineHistory;
use safekeeper_protocol::ids::{SystemId, TenantId, Term, TimelineId};
use safekeeper_protocol::membership::Configuration;
use safekeeper_protocol::term_history::TermHistory;
use serde::{Deserialize, Deserializer, Serialize};

/// Headers of a `GET .../wal` response (docs/http-api.md): the server sets
/// all five, a client reads the ones it needs.
pub const HEADER_START_LSN: &str = "x-start-lsn";
pub const HEADER_END_LSN: &str = "x-end-lsn";
pub const HEADER_COMMIT_LSN: &str = "x-commit-lsn";
pub const HEADER_FLUSH_LSN: &str = "x-flush-lsn";
pub const HEADER_TERM: &str = "x-term";

/// `GET /v1/tenant/{t}/timeline/{tl}` (also the answer to feedback): one
/// document, which the server writes from this type and clients read into
/// it. Fields a server may omit (older servers, or test fakes serving only
/// what a client needs) default to zero / empty; unknown fields are ignored
/// so the server can add more.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineStatus {
    #[serde(default)]
    pub tenant_id: TenantId,
    #[serde(default)]
    pub timeline_id: TimelineId,
    #[serde(deserialize_with = "system_id_from_number_or_text")]
    pub system_id: SystemId,
    #[serde(default)]
    pub pg_version: u32,
    /// Validated when read: a document with an impossible segment size is refused.
    pub wal_seg_size: WalSegmentSize,
    #[serde(default)]
    pub term: Term,
    #[serde(default)]
    pub last_log_term: Term,
    /// (term, start LSN) entries describing its log (peer recovery checks
    /// them against its own).
    #[serde(default)]
    pub term_history: TermHistory,
    pub timeline_start_lsn: Lsn,
    pub flush_lsn: Lsn,
    pub commit_lsn: Lsn,
    /// The highest commit LSN a proposer (or a peer's copy) reported: beyond
    /// `flush_lsn`, this safekeeper is behind the quorum.
    #[serde(default)]
    pub proposer_commit_lsn: Lsn,
    /// The term whose ProposerElected was accepted since the last restart
    /// or vote (WAL is taken only in it).
    #[serde(default)]
    pub elected_term: Option<Term>,
    #[serde(default)]
    pub remote_consistent_lsn: Lsn,
    /// First WAL byte still on disk (retention removed what is below);
    /// `0/0` when the server does not say.
    #[serde(default)]
    pub oldest_kept_lsn: Lsn,
    /// Bytes of segment files on disk.
    #[serde(default)]
    pub disk_bytes: u64,
    /// Segments removed by retention since the process started.
    #[serde(default)]
    pub removed_segments: u64,
    /// Set when a storage error stopped the timeline's owner.
    #[serde(default)]
    pub stopped_by_error: Option<String>,
    /// The safekeeper set as a proposer last wrote it (generation 0: none).
    #[serde(default)]
    pub membership: Configuration,
    /// Proposer connections pushing WAL right now.
    #[serde(default)]
    pub connected_proposers: usize,
    /// Who reads this timeline's WAL right now.
    #[serde(default)]
    pub consumers: Vec<ConsumerStatus>,
    #[serde(default)]
    pub peer_recovery: PeerRecoveryStatus,
    /// Which Postgres timeline wrote which part of the log (`current` is
    /// the one IDENTIFY_SYSTEM reports; `switches` its ancestors and where
    /// each ended, as in the `0000000N.history` file).
    #[serde(default)]
    pub pg_timelines: PgTimelineHistory,
}

impl TimelineStatus {
    /// The first WAL byte the server still holds, when it says.
    pub fn oldest_kept(&self) -> Option<Lsn> {
        self.oldest_kept_lsn.is_valid().then_some(self.oldest_kept_lsn)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerKind {
    /// `GET .../wal`.
    Http,
    /// `START_REPLICATION` on the pg port (pg_receivewal, a standby).
    Replication,
}

/// One consumer of a timeline's WAL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    pub kind: ConsumerKind,
    pub peer: String,
    /// End of the WAL sent to it so far.
    pub position_lsn: Lsn,
    /// What it reported flushed on its side (replication clients only).
    pub reported_flush_lsn: Lsn,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRecoveryState {
    #[default]
    Idle,
    Copying,
}

/// Peer recovery of a timeline: copying committed WAL from a peer when behind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecoveryStatus {
    pub state: PeerRecoveryState,
    /// The peer copied from (last or current round).
    pub source: Option<String>,
    pub start_lsn: Option<Lsn>,
    /// The peer's commit LSN when the round began: where it ends.
    pub target_lsn: Option<Lsn>,
    /// Bytes copied and durable in the current or last round.
    pub copied_bytes: u64,
    /// Rounds that reached their target since the process started.
    pub completed_rounds: u64,
    /// How long the last completed round took.
    pub last_round_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// The contract leaves the JSON type of `system_id` open: the safekeeper
/// sends a number, and a decimal string (how Postgres prints it, and safe in
/// JSON tools that read numbers as doubles) is accepted too.
fn system_id_from_number_or_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemId, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(u64),
        Text(String),
    }
    match NumberOrText::deserialize(deserializer)? {
        NumberOrText::Number(value) => Ok(SystemId(value)),
        NumberOrText::Text(text) => text.parse().map(SystemId).map_err(serde::de::Error::custom),
    }
}

/// The LSN headers of a `GET .../wal` response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalResponseHeaders {
    pub start_lsn: Lsn,
    /// The body is exactly `end_lsn - start_lsn` bytes.
    pub end_lsn: Lsn,
    pub commit_lsn: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header {name} is missing")]
    Missing { name: &'static str },
    #[error("header {name} is not an LSN: {value:?}")]
    Malformed { name: &'static str, value: String },
    #[error("headers say the body ends at {end_lsn}, before its start {start_lsn}")]
    EndBeforeStart { start_lsn: Lsn, end_lsn: Lsn },
    #[error("the body was asked from {requested} but header {HEADER_START_LSN} says {start_lsn}")]
    WrongStart { requested: Lsn, start_lsn: Lsn },
    #[error("the body ends at {end_lsn}, past the {limit} asked for")]
    EndPastLimit { end_lsn: Lsn, limit: Lsn },
    #[error("the body ends at {end_lsn}, past the commit LSN {commit_lsn} the same response reports")]
    EndPastCommit { end_lsn: Lsn, commit_lsn: Lsn },
}

impl WalResponseHeaders {
    /// Parse and check against the request (`start_lsn`, `end_lsn` limit).
    pub fn parse(headers: &HeaderMap, requested: Lsn, limit: Lsn) -> Result<WalResponseHeaders, HeaderError> {
        let parsed = WalResponseHeaders {
            start_lsn: lsn_header(headers, HEADER_START_LSN)?,
            end_lsn: lsn_header(headers, HEADER_END_LSN)?,
            commit_lsn: lsn_header(headers, HEADER_COMMIT_LSN)?,
        };
        let WalResponseHeaders { start_lsn, end_lsn, commit_lsn } = parsed;
        if start_lsn != requested {
            return Err(HeaderError::WrongStart { requested, start_lsn });
        }
        if end_lsn < start_lsn {
            return Err(HeaderError::EndBeforeStart { start_lsn, end_lsn });
        }
        if end_lsn > limit {
            return Err(HeaderError::EndPastLimit { end_lsn, limit });
        }
        // Bytes past commit could still be truncated away: never decode
        // them. An empty body is fine even when we are ahead of this
        // safekeeper's commit LSN (`end` is then `start`).
        if end_lsn > start_lsn && end_lsn > commit_lsn {
            return Err(HeaderError::EndPastCommit { end_lsn, commit_lsn });
        }
        Ok(parsed)
    }

    pub fn body_len_bytes(&self) -> u64 {
        self.end_lsn - self.start_lsn
    }
}

fn lsn_header(headers: &HeaderMap, name: &'static str) -> Result<Lsn, HeaderError> {
    let value = headers.get(name).ok_or(HeaderError::Missing { name })?;
    let malformed = || HeaderError::Malformed { name, value: String::from_utf8_lossy(value.as_bytes()).into_owned() };
    value.to_str().map_err(|_| malformed())?.parse().map_err(|_| malformed())
}

/// URL paths of one timeline on a safekeeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimelinePaths {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
}

impl TimelinePaths {
    pub fn status(&self) -> String {
        format!("/v1/tenant/{}/timeline/{}", self.tenant_id, self.timeline_id)
    }

    /// A long poll for committed WAL from `start_lsn`, at most up to `end_lsn`.
    pub fn wal(&self, start_lsn: Lsn, end_lsn: Lsn, wait_ms: u64) -> String {
        format!("{}/wal?start_lsn={start_lsn}&end_lsn={end_lsn}&wait_ms={wait_ms}", self.status())
    }

    pub fn feedback(&self) -> String {
        format!("{}/feedback", self.status())
    }
}

/// The body of `POST .../feedback`.
pub fn feedback_body(remote_consistent_lsn: Lsn) -> String {
    serde_json::json!({ "remote_consistent_lsn": remote_consistent_lsn }).to_string()
}

/// The `{"error": "..."}` message of an error response, or the raw text
/// when it is not that shape.
pub fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => parsed.error,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

/// A safekeeper address as given on the command line (`host:port`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SafekeeperAddress(String);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid safekeeper address {0:?}: expected HOST:PORT")]
pub struct BadAddress(String);

impl std::str::FromStr for SafekeeperAddress {
    type Err = BadAddress;
    fn from_str(text: &str) -> Result<Self, BadAddress> {
        let bad = || BadAddress(text.to_string());
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let host_ok = !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ']);
        if !host_ok || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(SafekeeperAddress(text.to_string()))
    }
}

impl SafekeeperAddress {
    pub fn url(&self, path: &str) -> String {
        self.url_with_scheme("http", path)
    }

    /// `scheme://address/path` (`https` when the client speaks TLS).
    pub fn url_with_scheme(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.0)
    }
}

impl fmt::Display for SafekeeperAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(start: &str, end: &str, commit: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in [(HEADER_START_LSN, start), (HEADER_END_LSN, end), (HEADER_COMMIT_LSN, commit)] {
            map.insert(name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn parses_the_status_document_and_ignores_extra_fields() {
        let text = r#"{"future_field": "x", "system_id": 7300000000000000001, "wal_seg_size": 16777216,
            "timeline_start_lsn": "0/1000000", "flush_lsn": "0/2000010", "commit_lsn": "0/2000000",
            "oldest_kept_lsn": "0/1000000", "term": 3}"#;
        let status: TimelineStatus = serde_json::from_str(text).unwrap();
        assert_eq!(status.system_id, SystemId(7_300_000_000_000_000_001));
        assert_eq!(status.commit_lsn, Lsn(0x200_0000));
        assert_eq!(status.oldest_kept(), Some(Lsn(0x100_0000)));
        let as_text = text
            .replace("7300000000000000001", "\"7300000000000000001\"")
            .replace(r#""oldest_kept_lsn": "0/1000000","#, "");
        let status: TimelineStatus = serde_json::from_str(&as_text).unwrap();
        assert_eq!(status.system_id, SystemId(7_300_000_000_000_000_001));
        assert_eq!(status.oldest_kept(), None);
        assert!(serde_json::from_str::<TimelineStatus>(&text.replace("0/2000000", "bogus")).is_err());
    }

    #[test]
    fn wal_headers_are_checked_against_the_request() {
        let (start, limit) = (Lsn(0x100), Lsn(0x10000));
        let ok = WalResponseHeaders::parse(&headers("0/100", "0/200", "0/300"), start, limit).unwrap();
        assert_eq!(ok.body_len_bytes(), 0x100);
        // A long poll that timed out on a safekeeper behind us: empty, fine.
        let behind = WalResponseHeaders::parse(&headers("0/100", "0/100", "0/80"), start, limit).unwrap();
        assert_eq!(behind.body_len_bytes(), 0);
        let cases = [
            (headers("0/100", "0/200", "nope"), "not an LSN"),
            (headers("0/180", "0/200", "0/300"), "asked from 0/100"),
            (headers("0/100", "0/80", "0/300"), "before its start"),
            (headers("0/100", "0/20000", "0/30000"), "past the 0/10000"),
            (headers("0/100", "0/400", "0/300"), "past the commit LSN"),
        ];
        for (map, expected) in cases {
            let error = WalResponseHeaders::parse(&map, start, limit).unwrap_err();
            assert!(error.to_string().contains(expected), "{error} should say {expected}");
        }
        let mut missing = headers("0/100", "0/200", "0/300");
        missing.remove(HEADER_END_LSN);
        let error = WalResponseHeaders::parse(&missing, start, limit).unwrap_err();
        assert_eq!(error, HeaderError::Missing { name: HEADER_END_LSN });
    }

    #[test]
    fn paths_addresses_and_error_bodies() {
        let paths = TimelinePaths {
            tenant_id: "0123456789abcdef0123456789abcdef".parse().unwrap(),
            timeline_id: "fedcba9876543210fedcba9876543210".parse().unwrap(),
        };
        assert_eq!(
            paths.wal(Lsn(0x1_0000_0028), Lsn(0x1_0100_0000), 1000),
            "/v1/tenant/0123456789abcdef0123456789abcdef/timeline/fedcba9876543210fedcba9876543210\
             /wal?start_lsn=1/28&end_lsn=1/1000000&wait_ms=1000"
        );
        let address: SafekeeperAddress = "127.0.0.1:7676".parse().unwrap();
        assert_eq!(address.url("/v1/status"), "http://127.0.0.1:7676/v1/status");
        for bad in ["127.0.0.1", ":80", "host:port", "a/b:80", "h:70000"] {
            assert!(bad.parse::<SafekeeperAddress>().is_err(), "{bad}");
        }
        assert_eq!(
            error_message(br#"{"error": "WAL below 0/1000000 was removed"}"#),
            "WAL below 0/1000000 was removed"
        );
        assert_eq!(error_message(b"plain text\n"), "plain text");
        assert_eq!(feedback_body(Lsn(0x1_0000_0028)), r#"{"remote_consistent_lsn":"1/28"}"#);
    }

    /// The server writes the document from the same type clients read it
    /// into: what it serializes reads back unchanged.
    #[test]
    fn the_status_document_round_trips() {
        let status = TimelineStatus {
            system_id: SystemId(7),
            term: Term(3),
            commit_lsn: Lsn(0x1_0000_0000),
            oldest_kept_lsn: Lsn(1 << 24),
            consumers: vec![ConsumerStatus {
                kind: ConsumerKind::Replication,
                peer: "127.0.0.1:5".into(),
                position_lsn: Lsn(9),
                reported_flush_lsn: Lsn(8),
            }],
            peer_recovery: PeerRecoveryStatus { state: PeerRecoveryState::Copying, ..PeerRecoveryStatus::default() },
            ..TimelineStatus::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["commit_lsn"], "1/0", "LSNs are X/Y strings");
        assert_eq!(json["peer_recovery"]["state"], "copying");
        assert_eq!(serde_json::from_value::<TimelineStatus>(json).unwrap(), status);
    }
}
