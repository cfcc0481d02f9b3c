//! The `safekeeper` binary as a real process: a proposer pushing generated
//! WAL over the Postgres wire protocol, malformed input that must be refused
//! without harming other connections, psql, the HTTP status API, and the
//! data directory lock. Every socket read has a timeout; every child is
//! stopped by pid.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use integration_tests::fixture::wait_bounded;
use integration_tests::pg::DEFAULT_PG_BIN_DIR;
use integration_tests::processes::{http_request, Safekeeper};
use integration_tests::wire_client::{startup_packet, ServerError, WireClient, READ_TIMEOUT};
use nix::sys::signal::Signal;
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::wal::format::PG15_VERSION_NUM;
use postgres_wal::wal::generator::WalGenerator;
use safekeeper_protocol::ids::{ClusterId, SystemId, TenantId, Term, TimelineId};
use safekeeper_protocol::membership::MembershipGeneration;
use safekeeper_protocol::protocol::{
    AcceptorMessage, AppendRequest, AppendResponse, Greeting, ProposerElected, ProposerMessage, VoteRequest,
    PROTOCOL_VERSION,
};
use safekeeper_protocol::term_history::{TermHistory, TermStart};
use tempfile::TempDir;

const TENANT: &str = "0123456789abcdef0123456789abcdef";
const TIMELINE: &str = "fedcba9876543210fedcba9876543210";
const SYSTEM_ID: u64 = 7_300_000_000_000_000_001;
/// A segment start: a new timeline begins at the first byte of a segment.
const TIMELINE_START: Lsn = Lsn(0x100_0000);
/// WAL per append, as a proposer relays one replication message.
const APPEND_BYTES: u64 = 128 << 10;
const PSQL_TIMEOUT: Duration = Duration::from_secs(20);

fn cluster(system_id: u64) -> ClusterId {
    ClusterId {
        system_id: SystemId(system_id),
        tenant_id: TENANT.parse().expect("valid id"),
        timeline_id: TIMELINE.parse().expect("valid id"),
    }
}

/// A one-connection proposer driving generated WAL into a safekeeper.
struct Proposer {
    client: WireClient,
    cluster: ClusterId,
    term: Term,
    generator: WalGenerator,
    segment_size: WalSegmentSize,
}

impl Proposer {
    fn connect(addr: SocketAddr) -> Result<Proposer> {
        let mut client = WireClient::for_timeline(addr, TENANT, TIMELINE)?;
        client.start_wal_push()?;
        let segment_size = WalSegmentSize::DEFAULT;
        Ok(Proposer {
            client,
            cluster: cluster(SYSTEM_ID),
            term: Term(0),
            generator: WalGenerator::new(SYSTEM_ID, segment_size, TIMELINE_START),
            segment_size,
        })
    }

    fn greeting(&self) -> ProposerMessage {
        ProposerMessage::Greeting(Greeting {
            protocol_version: PROTOCOL_VERSION,
            cluster: self.cluster,
            pg_version: PG15_VERSION_NUM,
            wal_segment_size_bytes: self.segment_size.bytes() as u32,
            proposer_id: [7; 16],
            generation: MembershipGeneration::NOT_SET,
            pg_timeline: 1,
        })
    }

    /// Greet, win term `term` and announce a history starting at the
    /// timeline start (the safekeeper is empty).
    fn elect(&mut self, term: Term) -> Result<()> {
        self.client.send_proposer(&self.greeting())?;
        ensure!(matches!(self.client.recv_acceptor()?, AcceptorMessage::GreetingResponse(_)));
        self.client.send_proposer(&ProposerMessage::VoteRequest(VoteRequest {
            cluster: self.cluster,
            term,
            generation: MembershipGeneration::NOT_SET,
            pg_timeline: 1,
        }))?;
        match self.client.recv_acceptor()? {
            AcceptorMessage::VoteResponse(vote) if vote.vote_given => {}
            other => bail!("vote not given: {other:?}"),
        }
        let history = TermHistory(vec![TermStart { term, start_lsn: TIMELINE_START }]);
        let elected = ProposerElected {
            cluster: self.cluster,
            term,
            generation: MembershipGeneration::NOT_SET,
            term_start_lsn: TIMELINE_START,
            timeline_start_lsn: TIMELINE_START,
            term_history: history,
            pg_timelines: Default::default(),
        };
        self.client.send_proposer(&ProposerMessage::ProposerElected(elected))?;
        ensure!(matches!(self.client.recv_acceptor()?, AcceptorMessage::AppendResponse(_)));
        self.term = term;
        Ok(())
    }

    fn append(&self, begin_lsn: Lsn, wal: Vec<u8>, commit_lsn: Lsn) -> ProposerMessage {
        let end_lsn = begin_lsn + wal.len() as u64;
        let (cluster, term, wal) = (self.cluster, self.term, wal.into());
        ProposerMessage::AppendRequest(AppendRequest {
            cluster,
            term,
            generation: MembershipGeneration::NOT_SET,
            begin_lsn,
            end_lsn,
            commit_lsn,
            wal,
        })
    }

    /// Send everything generated since the last call in segment-bounded
    /// appends (pipelined), then read acks until the flush reaches the end.
    fn push_generated(&mut self, commit_lsn: Lsn) -> Result<AppendResponse> {
        let (mut position, bytes) = self.generator.take_bytes();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let to_segment_end = position.next_segment_start(self.segment_size) - position;
            let len = (rest.len() as u64).min(APPEND_BYTES).min(to_segment_end) as usize;
            let message = self.append(position, rest[..len].to_vec(), commit_lsn);
            self.client.send_proposer(&message)?;
            position = position + len as u64;
            rest = &rest[len..];
        }
        let end = self.generator.end_lsn();
        loop {
            match self.client.recv_acceptor()? {
                AcceptorMessage::AppendResponse(ack) if ack.flush_lsn >= end => {
                    ensure!(ack.flush_lsn == end, "flush {} past the generated end {end}", ack.flush_lsn);
                    return Ok(ack);
                }
                AcceptorMessage::AppendResponse(_) => {}
                other => bail!("unexpected reply {other:?}"),
            }
        }
    }

    fn generate(&mut self, records: usize, seed: u64) {
        self.generator.append_random_records(records, seed, 2000);
    }

    /// An empty append carrying `commit_lsn`; returns the ack.
    fn heartbeat(&mut self, flush_lsn: Lsn, commit_lsn: Lsn) -> Result<AppendResponse> {
        self.client.send_proposer(&self.append(flush_lsn, Vec::new(), commit_lsn))?;
        match self.client.recv_acceptor()? {
            AcceptorMessage::AppendResponse(ack) => Ok(ack),
            other => bail!("unexpected reply {other:?}"),
        }
    }
}

fn timeline_path() -> String {
    format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}")
}

fn json_lsn(value: &serde_json::Value, field: &str) -> Result<Lsn> {
    value[field].as_str().with_context(|| format!("{field} missing in {value}"))?.parse().context("bad LSN")
}

fn datadir() -> Result<(TempDir, std::path::PathBuf)> {
    let temp = tempfile::tempdir()?;
    let dir = temp.path().join("sk");
    Ok((temp, dir))
}

#[test]
fn pushed_wal_is_acked_reported_and_survives_sigkill() -> Result<()> {
    let (_temp, dir) = datadir()?;
    let mut safekeeper = Safekeeper::start(1, &dir)?;
    let mut proposer = Proposer::connect(safekeeper.pg_addr)?;
    proposer.elect(Term(1))?;

    // Fill a segment to its end with an XLOG SWITCH, then continue in the
    // next one: appends must be split at the boundary.
    proposer.generate(2_000, 1);
    proposer.generator.append_switch();
    proposer.generate(2_000, 2);
    let ack = proposer.push_generated(Lsn::INVALID)?;
    let end = proposer.generator.end_lsn();
    ensure!(end > TIMELINE_START.next_segment_start(WalSegmentSize::DEFAULT), "WAL reaches the second segment");
    ensure!(ack.term == Term(1) && ack.flush_lsn == end, "{ack:?}");
    let ack = proposer.heartbeat(end, end)?;
    ensure!(ack.commit_lsn == end, "commit follows the proposer's commit: {ack:?}");

    let (status, timeline) = safekeeper.http_get(&timeline_path())?;
    ensure!(status == 200, "{timeline}");
    ensure!(timeline["term"] == 1 && timeline["last_log_term"] == 1, "{timeline}");
    ensure!(json_lsn(&timeline, "flush_lsn")? == end && json_lsn(&timeline, "commit_lsn")? == end, "{timeline}");
    ensure!(json_lsn(&timeline, "timeline_start_lsn")? == TIMELINE_START, "{timeline}");
    ensure!(timeline["system_id"] == SYSTEM_ID && timeline["wal_seg_size"] == 16 << 20, "{timeline}");
    ensure!(timeline["pg_version"] == PG15_VERSION_NUM && timeline["connected_proposers"] == 1, "{timeline}");
    ensure!(timeline["term_history"][0]["start_lsn"] == TIMELINE_START.to_string(), "{timeline}");

    safekeeper.process.kill()?;
    let mut restarted = Safekeeper::start(1, &dir)?;
    let (status, after) = restarted.http_get(&timeline_path())?;
    ensure!(status == 200 && after["term"] == 1 && json_lsn(&after, "flush_lsn")? == end, "after SIGKILL: {after}");
    ensure!(after["connected_proposers"] == 0, "{after}");

    // A clean stop exits 0 and keeps the same state.
    let status = restarted.process.stop_with(Signal::SIGTERM)?;
    ensure!(status.success(), "SIGTERM exit: {status}: {}", restarted.process.log_tail());
    let again = Safekeeper::start(1, &dir)?;
    let (_, final_state) = again.http_get(&timeline_path())?;
    ensure!(json_lsn(&final_state, "flush_lsn")? == end && json_lsn(&final_state, "commit_lsn")? == end);
    Ok(())
}

/// Send `bytes` on a fresh raw connection and return what comes back.
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Result<WireClient> {
    let mut client = WireClient { stream: WireClient::raw(addr)? };
    client.stream.write_all(bytes)?;
    Ok(client)
}

fn check_error(error: &ServerError, code: &str, words: &str) -> Result<()> {
    ensure!(error.code == code, "expected SQLSTATE {code}, got {error:?}");
    ensure!(error.message.contains(words), "message {:?} should mention {words:?}", error.message);
    Ok(())
}

#[test]
fn malformed_input_is_refused_while_a_proposer_keeps_being_acked() -> Result<()> {
    let (_temp, dir) = datadir()?;
    let safekeeper = Safekeeper::start(2, &dir)?;
    let addr = safekeeper.pg_addr;
    let mut proposer = Proposer::connect(addr)?;
    proposer.elect(Term(1))?;
    let mut seed = 10;
    let mut keep_pushing = |proposer: &mut Proposer| -> Result<()> {
        seed += 1;
        proposer.generate(50, seed);
        proposer.push_generated(Lsn::INVALID).map(drop).context("the healthy proposer stopped being acked")
    };
    keep_pushing(&mut proposer)?;

    // Garbage instead of a startup packet.
    let mut client = raw_exchange(addr, b"hello, is anybody there?\r\n")?;
    check_error(&client.expect_error()?, "08P01", "startup packet length")?;
    client.expect_closed()?;
    keep_pushing(&mut proposer)?;

    // A truncated startup packet, then the client gives up: a clean close.
    let mut client = raw_exchange(addr, &[0, 0, 0, 100, 0, 3])?;
    client.stream.shutdown(Shutdown::Write)?;
    client.expect_closed()?;

    // An oversized frame is refused from its length alone.
    let mut client = WireClient::for_timeline(addr, TENANT, TIMELINE)?;
    client.start_wal_push()?;
    client.stream.write_all(&[b'd', 0x7F, 0xFF, 0xFF, 0xFF])?;
    check_error(&client.expect_error()?, "08P01", "exceeds the limit")?;
    client.expect_closed()?;
    keep_pushing(&mut proposer)?;

    // Unknown commands: an error naming the command, and the session ends.
    for command in ["SELECT 1", "FOO"] {
        let mut client = WireClient::for_timeline(addr, TENANT, TIMELINE)?;
        client.query(command)?;
        let error = client.expect_error()?;
        check_error(&error, "42601", "unsupported command")?;
        ensure!(error.message.contains(command) && error.message.contains("START_WAL_PUSH"), "{error:?}");
        client.expect_closed()?;
    }
    // A message type that has no place here ends the session.
    let mut client = WireClient::for_timeline(addr, TENANT, TIMELINE)?;
    client.send(b'd', b"stray copy data")?;
    check_error(&client.expect_error()?, "08P01", "unexpected message type 'd'")?;
    client.expect_closed()?;

    // CopyData that is not a proposer message.
    let mut client = WireClient::for_timeline(addr, TENANT, TIMELINE)?;
    client.start_wal_push()?;
    client.send(b'd', b"\x7Fnot a proposer message")?;
    check_error(&client.expect_error()?, "08P01", "invalid proposer message")?;
    client.expect_closed()?;
    keep_pushing(&mut proposer)?;

    // Refused messages write nothing: the control file and flush stay put.
    let control_path = dir.join(TENANT).join(TIMELINE).join("safekeeper.control");
    let control_before = std::fs::read(&control_path).with_context(|| format!("reading {}", control_path.display()))?;
    let (_, before) = safekeeper.http_get(&timeline_path())?;

    // Another Postgres system's greeting on this timeline.
    let mut client = WireClient::for_timeline(addr, TENANT, TIMELINE)?;
    client.start_wal_push()?;
    let mut stranger = proposer.greeting();
    if let ProposerMessage::Greeting(greeting) = &mut stranger {
        greeting.cluster.system_id = SystemId(SYSTEM_ID + 1);
    }
    client.send_proposer(&stranger)?;
    check_error(&client.expect_error()?, "22023", "cluster")?;
    client.expect_closed()?;

    // Invalid WAL at the write position, in the elected term.
    let mut client = WireClient::for_timeline(addr, TENANT, TIMELINE)?;
    client.start_wal_push()?;
    let flush = proposer.generator.end_lsn();
    client.send_proposer(&proposer.append(flush, vec![0xAB; 4096], Lsn::INVALID))?;
    check_error(&client.expect_error()?, "XX001", "invalid WAL")?;
    client.expect_closed()?;

    // A message naming another timeline than the connection's.
    let mut client = WireClient::for_timeline(addr, TENANT, TIMELINE)?;
    client.start_wal_push()?;
    let mut elsewhere = proposer.greeting();
    if let ProposerMessage::Greeting(greeting) = &mut elsewhere {
        greeting.cluster.timeline_id = TimelineId([1; 16]);
        greeting.cluster.tenant_id = TenantId([2; 16]);
    }
    client.send_proposer(&elsewhere)?;
    check_error(&client.expect_error()?, "22023", "on a connection opened for timeline")?;

    let (_, after) = safekeeper.http_get(&timeline_path())?;
    ensure!(before["flush_lsn"] == after["flush_lsn"] && before["term"] == after["term"], "{before} vs {after}");
    ensure!(std::fs::read(&control_path)? == control_before, "a refused message changed the control file");
    let (status, other) =
        safekeeper.http_get("/v1/tenant/02020202020202020202020202020202/timeline/01010101010101010101010101010101")?;
    ensure!(status == 404, "no timeline was created for the stray message: {other}");
    keep_pushing(&mut proposer)?;
    Ok(())
}

/// Random bytes, random frames and random HTTP requests against both ports
/// of a running safekeeper while a proposer streams: every connection is
/// refused or answered, no HTTP answer to a client's request is a 500, the
/// proposer keeps being acknowledged, and the process never panics.
#[test]
fn random_input_on_both_ports_leaves_a_streaming_proposer_unaffected() -> Result<()> {
    use rand::{Rng, SeedableRng};
    let (_temp, dir) = datadir()?;
    let mut safekeeper = Safekeeper::start(6, &dir)?;
    let mut proposer = Proposer::connect(safekeeper.pg_addr)?;
    proposer.elect(Term(1))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5AFE);
    let random_bytes = |rng: &mut rand::rngs::StdRng, max: usize| -> Vec<u8> {
        let len = rng.gen_range(0..max);
        (0..len).map(|_| rng.gen()).collect()
    };
    // Fire and forget: write, read whatever comes back until the server
    // closes or a short timeout, ignore every error (resets are fine).
    let throw_at = |addr: SocketAddr, bytes: &[u8]| {
        if let Ok(mut stream) = TcpStream::connect_timeout(&addr, READ_TIMEOUT) {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = stream.write_all(bytes);
            let _ = stream.shutdown(Shutdown::Write);
            let mut sink = Vec::new();
            let _ = stream.take(1 << 20).read_to_end(&mut sink);
        }
    };
    let paths = ["/wal", "/segment/", "/feedback", "", "/nothing"];
    let alphabet: Vec<char> = "0123456789abcdefABCDEF/%?&=+-_.:~ \u{7f}é😀xyz".chars().collect();
    for round in 0..300 {
        match rng.gen_range(0..6) {
            0 => throw_at(safekeeper.pg_addr, &random_bytes(&mut rng, 3000)),
            1 => {
                // A valid startup, then a random frame, possibly truncated.
                let mut bytes = startup_packet(&[("user", "fuzz"), ("tenant_id", TENANT), ("timeline_id", TIMELINE)]);
                let body = random_bytes(&mut rng, 600);
                let tag = [b'Q', b'd', b'c', b'X', b'p', rng.gen()][rng.gen_range(0..6)];
                bytes.push(tag);
                bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                bytes.extend_from_slice(&body);
                bytes.truncate(rng.gen_range(0..=bytes.len()));
                throw_at(safekeeper.pg_addr, &bytes);
            }
            2 => {
                // START_WAL_PUSH, then random CopyData bodies.
                let mut bytes = startup_packet(&[("user", "fuzz"), ("tenant_id", TENANT), ("timeline_id", TIMELINE)]);
                let query = b"START_WAL_PUSH\0";
                bytes.push(b'Q');
                bytes.extend_from_slice(&(query.len() as u32 + 4).to_be_bytes());
                bytes.extend_from_slice(query);
                let body = random_bytes(&mut rng, 300);
                bytes.push(b'd');
                bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
                bytes.extend_from_slice(&body);
                throw_at(safekeeper.pg_addr, &bytes);
            }
            3 => throw_at(safekeeper.http_addr, &random_bytes(&mut rng, 3000)),
            4 => {
                // A well-formed request with random path and query text.
                let text: String =
                    (0..rng.gen_range(0..40)).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect();
                let encoded: String = text.bytes().map(|b| format!("%{b:02X}")).collect();
                let raw = if rng.gen_bool(0.5) { text.replace(' ', "+") } else { encoded };
                let path = format!(
                    "{}{}?start_lsn={raw}&end_lsn={raw}&wait_ms={raw}",
                    timeline_path(),
                    paths[rng.gen_range(0..paths.len())]
                );
                let method = ["GET", "POST", "DELETE", "PUT"][rng.gen_range(0..3)];
                let body = (method == "POST").then(|| serde_json::json!({ "remote_consistent_lsn": text }));
                // DELETE only on a timeline that does not exist: this one must keep serving.
                let path = if method == "DELETE" { path.replace(TIMELINE, &"9".repeat(32)) } else { path };
                if let Ok(answer) =
                    http_request(method, safekeeper.http_addr, &path, body.as_ref(), Duration::from_secs(10))
                {
                    ensure!(
                        answer.status != 500,
                        "{method} {path} answered 500: {:?}",
                        String::from_utf8_lossy(&answer.body)
                    );
                    ensure!(answer.status == 200 || answer.json().is_ok(), "{method} {path}: error body is not JSON");
                }
            }
            _ => {
                // A truncated HTTP request.
                let mut request = format!(
                    "GET {}/wal?start_lsn=0/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",
                    timeline_path()
                )
                .into_bytes();
                request.truncate(rng.gen_range(0..=request.len()));
                throw_at(safekeeper.http_addr, &request);
            }
        }
        if round % 25 == 0 {
            proposer.generate(20, round);
            proposer.push_generated(Lsn::INVALID).context("the streaming proposer stopped being acknowledged")?;
            ensure!(safekeeper.http_get("/v1/status")?.0 == 200);
        }
    }
    proposer.generate(20, 9999);
    let ack = proposer.push_generated(Lsn::INVALID)?;
    ensure!(ack.flush_lsn == proposer.generator.end_lsn(), "{ack:?}");
    ensure!(safekeeper.process.exit_status()?.is_none(), "the safekeeper exited: {}", safekeeper.process.log_tail());
    let log = std::fs::read_to_string(&safekeeper.process.log_path)?;
    ensure!(!log.contains("panicked"), "a panic in the log:\n{log}");
    Ok(())
}

#[test]
fn psql_connects_and_gets_an_error_for_unknown_commands() -> Result<()> {
    let (_temp, dir) = datadir()?;
    let safekeeper = Safekeeper::start(3, &dir)?;
    let connstr = format!(
        "host=127.0.0.1 port={} user=operator dbname=x connect_timeout=10 options='-c tenant_id={TENANT} -c timeline_id={TIMELINE}'",
        safekeeper.pg_addr.port()
    );
    let psql = std::path::Path::new(DEFAULT_PG_BIN_DIR).join("psql");
    let mut child = Command::new(&psql)
        .arg(&connstr)
        .args(["-X", "-c", "FOO"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", psql.display()))?;
    let Some(status) = wait_bounded(&mut child, PSQL_TIMEOUT)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("psql hung on an unknown command");
    };
    let mut stderr = String::new();
    child.stderr.take().context("stderr")?.read_to_string(&mut stderr)?;
    ensure!(!status.success(), "psql should fail on an unknown command");
    ensure!(stderr.contains("FATAL:") && stderr.contains("unsupported command \"FOO\""), "psql said: {stderr}");
    Ok(())
}

#[test]
fn http_status_answers_json_and_rejects_bad_ids() -> Result<()> {
    let (_temp, dir) = datadir()?;
    let safekeeper = Safekeeper::start(4, &dir)?;
    let (status, node) = safekeeper.http_get("/v1/status")?;
    ensure!(status == 200 && node["node_id"] == 4 && node["timelines"].as_array().is_some(), "{node}");
    ensure!(node["uptime_s"].is_u64() && node["version"].is_string(), "{node}");

    let (status, body) = safekeeper.http_get(&timeline_path())?;
    ensure!(status == 404 && body["error"].as_str().is_some_and(|e| e.contains("does not exist")), "{body}");
    let (status, body) = safekeeper.http_get(&format!("/v1/tenant/nothex/timeline/{TIMELINE}"))?;
    ensure!(status == 400 && body["error"].as_str().is_some_and(|e| e.contains("tenant id")), "{body}");
    let (status, body) = safekeeper.http_get(&format!("/v1/tenant/{TENANT}/timeline/123"))?;
    ensure!(status == 400 && body["error"].as_str().is_some_and(|e| e.contains("timeline id")), "{body}");
    let (status, body) = safekeeper.http_get("/v1/nothing/here")?;
    ensure!(status == 404 && body["error"].is_string(), "{body}");

    // A created timeline shows up in the node status.
    let mut proposer = Proposer::connect(safekeeper.pg_addr)?;
    proposer.elect(Term(3))?;
    let (_, node) = safekeeper.http_get("/v1/status")?;
    let timelines = node["timelines"].as_array().context("timelines")?;
    ensure!(timelines.len() == 1 && timelines[0]["timeline_id"] == TIMELINE && timelines[0]["term"] == 3, "{node}");
    Ok(())
}

/// DELETE stops the owner and removes the directory for good (also across
/// a restart); /v1/timelines and /metrics follow.
#[test]
fn deleted_timeline_is_gone_and_metrics_follow() -> Result<()> {
    let (_temp, dir) = datadir()?;
    let safekeeper = Safekeeper::start(5, &dir)?;
    let mut proposer = Proposer::connect(safekeeper.pg_addr)?;
    proposer.elect(Term(1))?;
    proposer.generate(500, 7);
    proposer.push_generated(Lsn::INVALID)?;
    let end = proposer.generator.end_lsn();
    proposer.heartbeat(end, end)?;
    let (_, list) = safekeeper.http_get("/v1/timelines")?;
    ensure!(list.as_array().is_some_and(|l| l.len() == 1 && l[0]["timeline_id"] == TIMELINE), "{list}");
    let metrics = http_request("GET", safekeeper.http_addr, "/metrics", None, Duration::from_secs(10))?;
    let text = String::from_utf8(metrics.body)?;
    let series = format!("safekeeper_commit_lsn{{tenant_id=\"{TENANT}\",timeline_id=\"{TIMELINE}\"}} {}", end.0);
    ensure!(text.contains(&series), "no {series} in:\n{text}");
    ensure!(text.contains("safekeeper_wal_sync_seconds_bucket") && text.contains("process_resident_memory_bytes"));
    drop(proposer);

    let deleted = http_request("DELETE", safekeeper.http_addr, &timeline_path(), None, Duration::from_secs(30))?;
    ensure!(deleted.status == 200 && deleted.json()?["deleted"] == true, "{:?}", deleted.json());
    let timeline_dir = dir.join(TENANT).join(TIMELINE);
    ensure!(!timeline_dir.exists(), "{} still exists", timeline_dir.display());
    let (status, _) = safekeeper.http_get(&timeline_path())?;
    ensure!(status == 404);
    let again = http_request("DELETE", safekeeper.http_addr, &timeline_path(), None, Duration::from_secs(30))?;
    ensure!(again.status == 404);
    let (_, list) = safekeeper.http_get("/v1/timelines")?;
    ensure!(list.as_array().is_some_and(Vec::is_empty), "{list}");
    drop(safekeeper);
    let restarted = Safekeeper::start(5, &dir)?;
    let (status, _) = restarted.http_get(&timeline_path())?;
    ensure!(status == 404, "a deleted timeline came back after a restart");
    Ok(())
}

#[test]
fn a_second_safekeeper_on_the_same_datadir_is_refused() -> Result<()> {
    let (_temp, dir) = datadir()?;
    let first = Safekeeper::start(5, &dir)?;
    let (status, output) = Safekeeper::run_expecting_exit(5, &dir)?;
    ensure!(!status.success(), "the second safekeeper must fail");
    let holder = first.process.pid().context("first is running")?;
    ensure!(output.contains("in use by another safekeeper") && output.contains(&format!("pid {holder}")), "{output}");
    Ok(())
}

/// Test: `--max-http-connections` holds: idle clients holding every slot
/// do not get one more in (it is closed at once), and a freed slot serves
/// again; the pg port is unaffected.
#[test]
fn the_http_port_caps_its_connections() -> Result<()> {
    let (_temp, dir) = datadir()?;
    let safekeeper = Safekeeper::start_with_args(1, &dir, vec!["--max-http-connections".into(), "2".into()])?;
    let idle: Vec<TcpStream> =
        (0..2).map(|_| TcpStream::connect(safekeeper.http_addr)).collect::<std::io::Result<_>>()?;
    // Both slots are taken once the server has accepted them.
    std::thread::sleep(Duration::from_millis(300));
    let refused = http_request("GET", safekeeper.http_addr, "/v1/healthz", None, Duration::from_secs(5));
    ensure!(refused.is_err(), "a third HTTP connection was served: {:?}", refused.map(|answer| answer.status));
    Proposer::connect(safekeeper.pg_addr).context("the pg port has its own cap")?;
    drop(idle);
    let answer = integration_tests::fixture::wait_for(Duration::from_secs(10), "a freed slot to serve again", || {
        Ok(http_request("GET", safekeeper.http_addr, "/v1/healthz", None, Duration::from_secs(5)).ok())
    })?;
    ensure!(answer.status == 200, "healthz answered {}", answer.status);
    Ok(())
}
