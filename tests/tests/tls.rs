//! TLS on every port (issue 16; docs/security.md), with real processes in
//! secure mode (tests/src/secure.rs: one CA, TLS and tokens on every hop,
//! Postgres serving TLS and accepting TCP only over it):
//!
//! - a secure cluster commits; plaintext is refused on both safekeeper
//!   ports and on the shim's port, and a client that trusts another CA is
//!   refused, with nothing changed on the timeline;
//! - SIGHUP reloads a safekeeper's certificate: new handshakes get the new
//!   one, the shim's open link keeps streaming through the old session;
//! - a shim against a Postgres whose pg_hba has only `hostssl ...
//!   scram-sha-256`: refused (exit 7) without TLS or with an untrusted
//!   certificate, streaming with verify-full and its passfile;
//! - the pg port's negotiation as Postgres does it (GSSENCRequest 'N',
//!   SSLRequest 'S', direct TLS with ALPN, a second SSLRequest inside TLS
//!   refused), `--allow-plaintext`, the HTTP port's header-read timeout,
//!   and arbitrary first bytes never hanging or breaking the port
//!   (property test).
//!
//! pg_receivewal, a hot standby, pageserver_stub and peer recovery over TLS
//! with tokens are the serving, chaos and peer-recovery suites run in
//! secure mode (`SECURE_CLUSTER=1`, scripts/test).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::certs::TestCa;
use integration_tests::cluster::{QuorumCluster, TENANT, TIMELINE};
use integration_tests::fixture::wait_for;
use integration_tests::pg::PgOptions;
use integration_tests::processes::{
    http_request, https_request_as, plain_http_request_as, ComputeShim, Safekeeper, EXIT_TIMEOUT,
};
use integration_tests::secure::{self, Security};
use integration_tests::wal_files::snapshot_files;
use integration_tests::wire_client::{parse_error, startup_packet, WireClient};
use proptest::prelude::*;

const TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The HTTP port's default header-read timeout, and the margin a closed
/// connection is waited for beyond it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_MARGIN: Duration = Duration::from_secs(10);

fn security() -> &'static Security {
    secure::enable();
    secure::security().expect("secure mode is enabled")
}

fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// A client config trusting only `ca` (verify-full).
fn trusting(ca: &TestCa) -> Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(net::tls::client_config(Some(&ca.certificate), net::tls::Verification::Full)?))
}

/// psql in replication mode against a safekeeper's pg port with `sslmode`
/// (and the data token as the password): exit status and stderr.
fn psql_to_safekeeper(cluster: &QuorumCluster, index: usize, tls: &str) -> Result<(bool, String)> {
    let addr = cluster.safekeepers[index].pg_addr;
    let conninfo = format!(
        "host={} port={} user=compute dbname=replication replication=true options='{}' connect_timeout=10 {tls}",
        addr.ip(),
        addr.port(),
        QuorumCluster::timeline_options()
    );
    let mut psql = cluster.pg.command("psql");
    psql.env_remove("PGSSLMODE").env_remove("PGSSLROOTCERT");
    psql.args(["-X", "-At", "-d", &conninfo, "-c", "IDENTIFY_SYSTEM"]);
    let output = cluster.pg.run(psql, TIMEOUT)?;
    Ok((output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned()))
}

#[test]
fn plaintext_and_untrusted_certificates_are_refused_and_reloads_keep_connections() -> Result<()> {
    let security = security();
    let mut cluster = QuorumCluster::start(options())?;
    cluster.pg.psql_with_timeout("CREATE TABLE t AS SELECT generate_series(1, 20000) AS v", TIMEOUT)?;
    let flush = cluster.pg_flush_lsn()?;
    cluster.wait_shim_commit(flush, TIMEOUT)?;
    println!("a cluster with TLS and tokens on every hop committed to {flush}");

    // Plaintext and a foreign CA, on every port; nothing changes.
    let before = (cluster.timeline_status(0)?, snapshot_files(&cluster.timeline_dir(0))?);
    let foreign_ca = TestCa::generate("foreign-ca")?;
    let foreign = trusting(&foreign_ca)?;
    let shim_http = cluster.shim()?.http_addr;
    let sk0 = &cluster.safekeepers[0];
    for (port, addr) in [("safekeeper HTTP", sk0.http_addr), ("shim HTTP", shim_http)] {
        let token = Some(security.admin_token.as_str());
        let answer = plain_http_request_as(token, "GET", addr, "/v1/status", None, HTTP_TIMEOUT)?;
        ensure!(
            answer.status == 400 && answer.json()?["error"].as_str().is_some_and(|e| e.contains("HTTPS only")),
            "{port} in plaintext answered {} {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        let refused = https_request_as(&foreign, token, "GET", &addr.to_string(), "/v1/status", None, HTTP_TIMEOUT);
        ensure!(
            refused.as_ref().is_err_and(|e| format!("{e:#}").contains("UnknownIssuer")),
            "{port}: a client trusting another CA got {:?}",
            refused.map(|a| a.status)
        );
    }
    let (ok, stderr) = psql_to_safekeeper(&cluster, 0, "sslmode=disable")?;
    ensure!(!ok && stderr.contains("accepts TLS connections only"), "the pg port in plaintext: {stderr}");
    let foreign_root = format!("sslmode=verify-full sslrootcert={}", foreign_ca.certificate.display());
    let (ok, stderr) = psql_to_safekeeper(&cluster, 0, &foreign_root)?;
    ensure!(!ok && stderr.contains("certificate verify failed"), "the pg port, a foreign CA: {stderr}");
    let (ok, stderr) = psql_to_safekeeper(&cluster, 0, &security.libpq_conninfo())?;
    ensure!(ok, "psql with verify-full and a token: {stderr}");
    let after = (cluster.timeline_status(0)?, snapshot_files(&cluster.timeline_dir(0))?);
    ensure!(before.0["flush_lsn"] == after.0["flush_lsn"] && before.0["term"] == after.0["term"], "status moved");
    ensure!(before.1 == after.1, "safekeeper 0's files changed during the refusals");

    // Safekeeper 0 on certificate files of its own, then a reload to one
    // from another CA: new handshakes get it, the shim's link stays.
    let own_dir = tempfile::Builder::new().prefix("sk0-cert-").tempdir()?;
    let own = security.ca.issue(own_dir.path(), "sk0")?;
    let mut args = cluster.safekeepers[0].extra_args.clone();
    for (flag, path) in [("--tls-cert", &own.certificate), ("--tls-key", &own.key)] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    cluster.restart_safekeeper_with_args(0, args)?;
    let rotated = {
        cluster.pg.psql_with_timeout("INSERT INTO t SELECT generate_series(1, 5000)", TIMEOUT)?;
        let lsn = cluster.pg_flush_lsn()?;
        cluster.wait_safekeeper_flush(0, lsn, TIMEOUT).context("safekeeper 0 streaming again after its restart")?;
        let second_ca = TestCa::generate("second-ca")?;
        let fresh = second_ca.issue(own_dir.path(), "sk0-next")?;
        std::fs::copy(&fresh.certificate, &own.certificate)?;
        std::fs::copy(&fresh.key, &own.key)?;
        std::fs::set_permissions(&own.key, std::fs::Permissions::from_mode(0o600))?;
        second_ca
    };
    cluster.safekeepers[0].process.signal(nix::sys::signal::Signal::SIGHUP)?;
    let sk0_http = cluster.safekeepers[0].http_addr.to_string();
    let token = Some(security.admin_token.as_str());
    wait_for(TIMEOUT, "safekeeper 0 to serve the reloaded certificate", || {
        let answer = https_request_as(&trusting(&rotated)?, token, "GET", &sk0_http, "/v1/healthz", None, HTTP_TIMEOUT);
        Ok(answer.is_ok_and(|a| a.status == 200).then_some(()))
    })?;
    // A fresh config: the harness's shared one may resume a session from
    // before the reload, which presents no certificate at all.
    let old = https_request_as(&trusting(&security.ca)?, token, "GET", &sk0_http, "/v1/healthz", None, HTTP_TIMEOUT);
    ensure!(old.is_err(), "after the reload the old CA's clients still got through");
    // The shim trusts only the first CA: safekeeper 0 keeps receiving WAL
    // only if its link, opened before the reload, is still up.
    cluster.pg.psql_with_timeout("INSERT INTO t SELECT generate_series(1, 5000)", TIMEOUT)?;
    let lsn = cluster.pg_flush_lsn()?;
    cluster.wait_shim_commit(lsn, TIMEOUT)?;
    cluster.wait_safekeeper_flush(0, lsn, TIMEOUT).context("the link opened before the SIGHUP broke")?;
    let log = cluster.safekeepers[0].process.log_tail();
    ensure!(log.contains("TLS certificate reloaded"), "no reload in safekeeper 0's log: {log}");
    println!("SIGHUP: new handshakes get the new certificate; the open link streamed on to {lsn}");
    Ok(())
}

#[test]
fn a_shim_reaches_a_postgres_that_takes_only_tls_and_scram() -> Result<()> {
    let security = security();
    let cluster = QuorumCluster::start_without_shim(options())?;
    let pg = &cluster.pg;
    // No shim yet: this commit must not wait for the synchronous standby.
    pg.psql("SET synchronous_commit = local; CREATE ROLE shim LOGIN REPLICATION PASSWORD 'shim secret'")?;
    pg.write_data_file(
        "pg_hba.conf",
        "local all all trust\nlocal replication all trust\n\
         hostssl all shim 127.0.0.1/32 scram-sha-256\nhostssl replication shim 127.0.0.1/32 scram-sha-256\n",
    )?;
    pg.psql("SELECT pg_reload_conf()")?;
    let passfile = cluster.dir.path().join("pgpass");
    std::fs::write(&passfile, format!("127.0.0.1:{}:*:shim:shim secret\n", pg.port()))?;
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600))?;
    let conninfo = |tls: &str| {
        format!("host=127.0.0.1 port={} user=shim dbname=postgres passfile={} {tls}", pg.port(), passfile.display())
    };
    let other_ca = TestCa::generate("other-ca")?;
    let refusals = [
        ("sslmode=disable", "no pg_hba.conf entry"),
        (&*format!("sslmode=verify-full sslrootcert={}", other_ca.certificate.display()), "certificate"),
    ];
    for (tls, expected) in refusals {
        let mut args = cluster.shim_args();
        args.pg_conninfo = conninfo(tls);
        let mut shim = ComputeShim::spawn(&args, cluster.dir.path())?;
        let exit = shim.process.wait_exit(EXIT_TIMEOUT)?.with_context(|| format!("a shim with {tls} kept running"))?;
        let log = shim.process.log_tail();
        ensure!(exit.code() == Some(7) && log.contains(expected), "a shim with {tls}: {exit}: {log}");
        ensure!(cluster.timeline_status(0).is_err(), "a refused shim created the timeline");
    }
    let mut args = cluster.shim_args();
    args.pg_conninfo = conninfo(&security.libpq_conninfo());
    let mut shim = ComputeShim::spawn(&args, cluster.dir.path())?;
    shim.wait_elected(TIMEOUT)?;
    let sessions = pg.psql("SELECT ssl FROM pg_stat_ssl JOIN pg_stat_replication USING (pid)")?;
    ensure!(sessions == "t", "the shim's walsender session is not over TLS: {sessions:?}");
    println!("shim → Postgres: hostssl + scram-sha-256 with verify-full and a passfile");
    Ok(())
}

/// An SSLRequest, GSSENCRequest as bytes.
fn request(code: u32) -> [u8; 8] {
    let mut packet = [0u8; 8];
    packet[..4].copy_from_slice(&8u32.to_be_bytes());
    packet[4..].copy_from_slice(&code.to_be_bytes());
    packet
}
const SSL_REQUEST: u32 = (1234 << 16) | 5679;
const GSSENC_REQUEST: u32 = (1234 << 16) | 5680;

/// A blocking TLS client session on `tcp` (ALPN `alpn` offered).
fn tls_client(tcp: TcpStream, alpn: &[&[u8]]) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut config = (*security().client_tls).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
    let connection = rustls::ClientConnection::new(Arc::new(config), name)?;
    Ok(rustls::StreamOwned::new(connection, tcp))
}

/// Read one message (tag, body) from `stream`.
fn read_message(stream: &mut impl Read) -> Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header)?;
    let len = u32::from_be_bytes(header[1..].try_into()?) as usize;
    ensure!((4..1 << 20).contains(&len), "message length {len}");
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body)?;
    Ok((header[0], body))
}

/// The startup inside an established session: the token asked for and
/// accepted, up to ReadyForQuery.
fn start_up(stream: &mut (impl Read + Write), token: &str) -> Result<()> {
    stream.write_all(&startup_packet(&[("user", "compute"), ("tenant_id", TENANT), ("timeline_id", TIMELINE)]))?;
    loop {
        match read_message(stream)? {
            (b'R', body) if body == 3u32.to_be_bytes() => {
                let mut password = token.as_bytes().to_vec();
                password.push(0);
                let mut message = vec![b'p'];
                message.extend_from_slice(&(4 + password.len() as u32).to_be_bytes());
                message.extend_from_slice(&password);
                stream.write_all(&message)?;
            }
            (b'Z', _) => return Ok(()),
            (b'E', body) => bail!("startup refused: {:?}", parse_error(&body)),
            _ => {}
        }
    }
}

/// Whether the server closes `tcp` within `limit` (reading, discarding).
fn closed_within(mut tcp: TcpStream, limit: Duration) -> Result<bool> {
    tcp.set_read_timeout(Some(limit))?;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(_) if started.elapsed() < limit => {}
            Ok(_) => return Ok(false),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
            Err(_) => return Ok(false),
        }
    }
}

#[test]
fn the_pg_port_negotiates_tls_as_postgres_does() -> Result<()> {
    let security = security();
    let dir = tempfile::Builder::new().prefix("tls-negotiation-").tempdir()?;
    let safekeeper = Safekeeper::start(1, &dir.path().join("sk1"))?;
    let (pg, http) = (safekeeper.pg_addr, safekeeper.http_addr);

    // GSSENCRequest: 'N'; then SSLRequest: 'S' and TLS; the startup inside.
    let mut tcp = WireClient::raw(pg)?;
    tcp.write_all(&request(GSSENC_REQUEST))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)?;
    ensure!(answer == *b"N", "GSSENCRequest answered {answer:?}");
    tcp.write_all(&request(SSL_REQUEST))?;
    tcp.read_exact(&mut answer)?;
    ensure!(answer == *b"S", "SSLRequest answered {answer:?}");
    let mut session = tls_client(tcp, &[])?;
    start_up(&mut session, &security.data_token)?;

    // A second SSLRequest inside TLS is a protocol violation.
    let mut session = tls_client(negotiated(pg)?, &[])?;
    session.write_all(&request(SSL_REQUEST))?;
    let (tag, body) = read_message(&mut session)?;
    ensure!(tag == b'E' && parse_error(&body).code == "08P01", "SSLRequest inside TLS: {:?}", parse_error(&body));

    // Direct TLS (PostgreSQL 17's sslnegotiation=direct): ALPN postgresql.
    let mut direct = tls_client(WireClient::raw(pg)?, &[b"postgresql"])?;
    start_up(&mut direct, &security.data_token)?;
    ensure!(direct.conn.alpn_protocol() == Some(b"postgresql"), "direct TLS without ALPN postgresql");

    // Plaintext startup: refused with 28000.
    let mut plain = WireClient::raw(pg)?;
    plain.write_all(&startup_packet(&[("user", "compute")]))?;
    let (tag, body) = read_message(&mut plain)?;
    ensure!(tag == b'E' && parse_error(&body).code == "28000", "plaintext startup: {:?}", parse_error(&body));

    // The HTTP port: a TLS handshake that never finishes and a request
    // head that never ends are both closed after the header-read timeout.
    let mut stalled_handshake = WireClient::raw(http)?;
    stalled_handshake.write_all(&[0x16, 0x03, 0x01])?;
    // WireClient::raw: its reads are bounded, the TLS handshake's included.
    let mut stalled_head = tls_client(WireClient::raw(http)?, &[])?;
    stalled_head.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n")?;
    stalled_head.flush()?;
    let limit = HEADER_READ_TIMEOUT + CLOSE_MARGIN;
    let started = Instant::now();
    let handshake_closed = std::thread::spawn(move || closed_within(stalled_handshake, limit));
    let head_closed = {
        stalled_head.sock.set_read_timeout(Some(limit))?;
        let mut rest = Vec::new();
        stalled_head.read_to_end(&mut rest).is_ok() || started.elapsed() < limit
    };
    ensure!(handshake_closed.join().expect("no panic")?, "a stalled TLS handshake held its connection");
    ensure!(head_closed && started.elapsed() < limit, "a request head that never ends held its connection");
    println!("stalled handshake and request head closed after {:?}", started.elapsed());

    // --allow-plaintext: both kinds on both ports.
    let open_dir = dir.path().join("sk2");
    let open = Safekeeper::start_with_args(2, &open_dir, vec!["--allow-plaintext".to_string()])?;
    let mut plain = WireClient::raw(open.pg_addr)?;
    start_up(&mut plain, &security.data_token)?;
    let token = Some(security.admin_token.as_str());
    let answer = plain_http_request_as(token, "GET", open.http_addr, "/v1/status", None, HTTP_TIMEOUT)?;
    ensure!(answer.status == 200, "plain HTTP with --allow-plaintext answered {}", answer.status);
    let answer = http_request("GET", open.http_addr, "/v1/status", None, HTTP_TIMEOUT)?;
    ensure!(answer.status == 200, "HTTPS with --allow-plaintext answered {}", answer.status);

    // Whatever a client sends first, the port answers or closes (never
    // hangs, never stops serving).
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    let first_bytes =
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..64),
            // Around the real codes: an SSLRequest or GSSENCRequest, bent.
            (any::<u32>(), prop_oneof![Just(SSL_REQUEST), Just(GSSENC_REQUEST), any::<u32>()])
                .prop_map(|(len, code)| [len.to_be_bytes(), code.to_be_bytes()].concat()),
            proptest::collection::vec(any::<u8>(), 1..64).prop_map(|mut bytes| {
                bytes[0] = 0x16;
                bytes
            }),
        ];
    runner
        .run(&first_bytes, |bytes| {
            let mut tcp = WireClient::raw(pg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let _ = tcp.write_all(&bytes);
            let _ = tcp.shutdown(std::net::Shutdown::Write);
            let closed = closed_within(tcp, Duration::from_secs(15)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(closed, "the pg port held a connection that sent {bytes:?} then EOF");
            Ok(())
        })
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let mut session = tls_client(negotiated(pg)?, &[])?;
    start_up(&mut session, &security.data_token).context("the pg port after the property test")?;
    let answer = http_request("GET", http, "/v1/healthz", None, HTTP_TIMEOUT)?;
    ensure!(answer.status == 200, "the HTTP port after the property test answered {}", answer.status);
    Ok(())
}

/// A TCP connection to `pg` past SSLRequest and its 'S'.
fn negotiated(pg: SocketAddr) -> Result<TcpStream> {
    let mut tcp = WireClient::raw(pg)?;
    tcp.write_all(&request(SSL_REQUEST))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)?;
    ensure!(answer == *b"S", "SSLRequest answered {answer:?}");
    Ok(tcp)
}
