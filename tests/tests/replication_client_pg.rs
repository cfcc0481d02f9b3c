//! The replication client against a real PostgreSQL 15: streamed WAL equals
//! `pg_wal`, status updates release synchronous commits, every supported
//! authentication method works, and a non-Postgres peer is a typed error.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use compute_shim::replication::{
    AuthMethod, ReplicationClient, ReplicationConfig, ReplicationError, ReplicationEvent, ReplicationStream,
};
use integration_tests::fixture::wait_for_async;
use integration_tests::pg::{PgCluster, PgOptions};
use postgres_wal::lsn::{Lsn, PgTimelineId, WalSegmentSize};
use postgres_wal::wal::WalDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const IO_TIMEOUT_MS: u64 = 10_000;
const STREAM_TIMEOUT_MS: u64 = 20_000;
/// Bound on any single wait for the server to reach a state.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the receive loop reports its position (and cancels next_event).
const STATUS_INTERVAL: Duration = Duration::from_millis(2);

fn started_cluster() -> Result<Arc<PgCluster>> {
    let mut pg = PgCluster::init(PgOptions::default())?;
    pg.start()?;
    Ok(Arc::new(pg))
}

fn config(conninfo: &str) -> Result<ReplicationConfig> {
    Ok(ReplicationConfig::parse(conninfo)?.with_io_timeout_ms(IO_TIMEOUT_MS).with_stream_timeout_ms(STREAM_TIMEOUT_MS))
}

fn superuser_config(pg: &PgCluster, application_name: &str) -> Result<ReplicationConfig> {
    config(&format!("{} application_name={application_name}", pg.connection_string("postgres")))
}

/// psql off the runtime's threads, so the stream keeps being served.
async fn psql(pg: &Arc<PgCluster>, sql: &str) -> Result<String> {
    let (pg, sql) = (Arc::clone(pg), sql.to_string());
    tokio::task::spawn_blocking(move || pg.psql(&sql)).await?
}

async fn wait_for_psql(pg: &Arc<PgCluster>, sql: &str, expected: &str) -> Result<()> {
    let what = format!("{sql:?} to give {expected:?}");
    wait_for_async(WAIT_TIMEOUT, &what, || async { Ok((psql(pg, sql).await? == expected).then_some(())) }).await
}

/// Receive WAL until the stream has passed `target`. With `report`, the
/// received position is reported every STATUS_INTERVAL from a select! arm,
/// which cancels `next_event` over and over: its cancel-safety is under test.
async fn receive_until(stream: &mut ReplicationStream, target: Lsn, report: bool, wal: &mut Vec<u8>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    let mut ticks = tokio::time::interval(STATUS_INTERVAL);
    while stream.received_end() < target {
        tokio::select! {
            event = stream.next_event() => match event? {
                ReplicationEvent::XLogData { data, .. } => wal.extend_from_slice(&data),
                ReplicationEvent::Keepalive { .. } => {}
                ReplicationEvent::End => bail!("stream ended at {}", stream.received_end()),
            },
            _ = ticks.tick(), if report => {
                let end = stream.received_end();
                stream.send_status(end, end, end, false).await?;
            }
            () = tokio::time::sleep_until(deadline) => bail!("stream at {}, not {target}, after {WAIT_TIMEOUT:?}", stream.received_end()),
        }
    }
    Ok(())
}

/// `pg_wal` bytes `[start, end)`, across segment files.
fn read_pg_wal(pg: &PgCluster, timeline: PgTimelineId, seg: WalSegmentSize, start: Lsn, end: Lsn) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut position = start;
    while position < end {
        let chunk_end = end.min(position.next_segment_start(seg));
        let name = position.segment_no(seg).file_name(timeline, seg);
        let mut file = fs::File::open(pg.pg_wal_dir().join(&name)).with_context(|| format!("opening {name}"))?;
        file.seek(SeekFrom::Start(position.segment_offset(seg)))?;
        let len = chunk_end.0 - position.0;
        let mut chunk = vec![0u8; usize::try_from(len)?];
        file.read_exact(&mut chunk).with_context(|| format!("reading {len} bytes of {name}"))?;
        bytes.extend_from_slice(&chunk);
        position = chunk_end;
    }
    Ok(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_auth_streams_the_bytes_of_pg_wal() -> Result<()> {
    let pg = started_cluster()?;
    let mut client = ReplicationClient::connect(superuser_config(&pg, "shim_trust")?).await?;
    assert_eq!(client.auth_method(), AuthMethod::Trust);

    let identity = client.identify_system().await?;
    let system_id: u64 = psql(&pg, "SELECT system_identifier FROM pg_control_system()").await?.parse()?;
    assert_eq!(identity.system_id, system_id);
    assert_eq!(identity.timeline, 1);
    assert_eq!(identity.dbname, None, "a physical connection has no database");
    let segment_size_bytes = client.show_wal_segment_size().await?;
    assert_eq!(segment_size_bytes, pg.wal_segment_size_bytes());

    assert!(client.create_physical_slot_if_missing("shim_slot").await?, "first create makes the slot");
    assert!(!client.create_physical_slot_if_missing("shim_slot").await?, "second create finds it");
    let slot = client.read_slot("shim_slot").await?.context("READ_REPLICATION_SLOT lost the slot")?;
    ensure!(slot.restart_lsn.is_some_and(|lsn| lsn <= identity.xlogpos.next_segment_start(WalSegmentSize::DEFAULT)));
    assert_eq!(client.read_slot("no_such_slot").await?, None);
    // A physical walsender refuses SQL (feature_not_supported); the error
    // names its SQLSTATE and leaves the connection usable.
    let error = client.simple_query("SELECT 1").await.expect_err("SQL accepted on a physical walsender");
    assert_eq!(error.sqlstate(), Some("0A000"), "{error}");
    assert_eq!(client.simple_query("SHOW wal_segment_size").await?.len(), 1);

    let seg = WalSegmentSize::new(segment_size_bytes)?;
    let start = identity.xlogpos.segment_start(seg);
    let mut stream = client.start_replication("shim_slot", start, identity.timeline).await?;
    psql(&pg, "CREATE TABLE t (id int, pad text)").await?;
    psql(&pg, "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g").await?;
    let target: Lsn = psql(&pg, "SELECT pg_current_wal_flush_lsn()").await?.parse()?;

    let began = Instant::now();
    let mut wal = Vec::new();
    receive_until(&mut stream, target, true, &mut wal).await?;
    let end = stream.received_end();
    eprintln!("received {} bytes of WAL {start}..{end} in {:?}", wal.len(), began.elapsed());
    assert_eq!(wal.len() as u64, end.0 - start.0);
    let on_disk = read_pg_wal(&pg, identity.timeline, seg, start, end)?;
    ensure!(wal == on_disk, "streamed WAL differs from pg_wal in {start}..{end}");

    let mut decoder = WalDecoder::at_segment_start(start, seg);
    decoder.feed(&wal);
    let mut records = 0usize;
    decoder.decode_available(|_| records += 1)?;
    ensure!(records >= 20_000, "decoded only {records} records from {} bytes", wal.len());
    // The walsender takes our report as this client's flush position.
    stream.send_status(end, end, end, false).await?;
    let flush = "SELECT flush_lsn FROM pg_stat_replication WHERE application_name = 'shim_trust'";
    wait_for_psql(&pg, flush, &end.to_string()).await?;
    stream.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_updates_release_synchronous_commits() -> Result<()> {
    let pg = started_cluster()?;
    psql(&pg, "CREATE TABLE t (id int)").await?;
    let mut client = ReplicationClient::connect(superuser_config(&pg, "shim_sync")?).await?;
    let identity = client.identify_system().await?;
    let seg = WalSegmentSize::new(client.show_wal_segment_size().await?)?;
    client.create_physical_slot_if_missing("sync_slot").await?;
    let mut stream =
        client.start_replication("sync_slot", identity.xlogpos.segment_start(seg), identity.timeline).await?;
    let mut wal = Vec::new();
    receive_until(&mut stream, identity.xlogpos, false, &mut wal).await?;
    let first = stream.received_end();
    stream.send_status(first, first, first, false).await?;
    let state = "SELECT flush_lsn || '|' || sync_state FROM pg_stat_replication WHERE application_name = 'shim_sync'";
    wait_for_psql(&pg, state, &format!("{first}|async")).await?;

    psql(&pg, "ALTER SYSTEM SET synchronous_standby_names = 'shim_sync'").await?;
    psql(&pg, "SELECT pg_reload_conf()").await?;
    wait_for_psql(&pg, state, &format!("{first}|sync")).await?;

    let committer = Arc::clone(&pg);
    let commit = tokio::task::spawn_blocking(move || {
        let began = Instant::now();
        committer.psql_with_timeout("INSERT INTO t VALUES (1)", WAIT_TIMEOUT).map(|_| began.elapsed())
    });
    wait_for_psql(&pg, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'", "1").await?;
    // The commit record is flushed locally before the backend waits for us.
    let commit_flushed: Lsn = psql(&pg, "SELECT pg_current_wal_flush_lsn()").await?.parse()?;
    receive_until(&mut stream, commit_flushed, false, &mut wal).await?;
    // A non-zero flush below the commit does not release it.
    stream.send_status(stream.received_end(), first, first, false).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(!commit.is_finished(), "the commit returned before its WAL was reported flushed");

    let end = stream.received_end();
    stream.send_status(end, end, end, false).await?;
    let waited = tokio::time::timeout(WAIT_TIMEOUT, commit).await.context("commit still blocked")???;
    eprintln!("commit returned {waited:?} after it was issued");
    wait_for_psql(&pg, state, &format!("{end}|sync")).await?;
    Ok(())
}

/// Roles and pg_hba lines (first match wins, so ours go before initdb's trust).
const AUTH_HBA: &str = "host replication r_md5 127.0.0.1/32 md5\n\
                        host replication r_scram 127.0.0.1/32 scram-sha-256\n\
                        host replication r_plain 127.0.0.1/32 password\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_scram_and_cleartext_authenticate() -> Result<()> {
    let mut pg = PgCluster::init(PgOptions::default())?;
    let hba_path = pg.data_dir().join("pg_hba.conf");
    let original = fs::read_to_string(&hba_path)?;
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&hba_path)?
        .write_all(format!("{AUTH_HBA}{original}").as_bytes())?;
    pg.start()?;
    let pg = Arc::new(pg);
    psql(&pg, "SET password_encryption = 'md5'; CREATE ROLE r_md5 LOGIN REPLICATION PASSWORD 'md5 pw'").await?;
    psql(&pg, "CREATE ROLE r_scram LOGIN REPLICATION PASSWORD 'scram pw'").await?;
    psql(&pg, "CREATE ROLE r_plain LOGIN REPLICATION PASSWORD 'plain pw'").await?;

    let port = pg.port();
    let cases = [
        (format!("host=127.0.0.1 port={port} user=r_md5 password='md5 pw'"), AuthMethod::Md5),
        (format!("host=127.0.0.1 port={port} user=r_scram password='scram pw'"), AuthMethod::ScramSha256),
        (
            format!("postgresql://r_scram:scram%20pw@127.0.0.1:{port}/postgres?application_name=uri"),
            AuthMethod::ScramSha256,
        ),
        (format!("host=127.0.0.1 port={port} user=r_plain password='plain pw'"), AuthMethod::Cleartext),
    ];
    for (conninfo, method) in &cases {
        let mut client = ReplicationClient::connect(config(conninfo)?).await.with_context(|| conninfo.clone())?;
        assert_eq!(client.auth_method(), *method, "{conninfo}");
        client.identify_system().await?;
    }
    for user in ["r_md5", "r_scram", "r_plain"] {
        let wrong = config(&format!("host=127.0.0.1 port={port} user={user} password=wrong"))?;
        let error = ReplicationClient::connect(wrong).await.err().context("a wrong password was accepted")?;
        assert_eq!(error.sqlstate(), Some("28P01"), "{user}: {error}");
        assert!(error.to_string().contains("28P01"), "{error}");
        let none = config(&format!("host=127.0.0.1 port={port} user={user} passfile=/nonexistent"))?;
        let error = ReplicationClient::connect(none).await.err().context("no password was accepted")?;
        assert!(matches!(error, ReplicationError::PasswordRequired), "{user}: {error}");
    }

    // The password from a password file, so it need not be in argv: the
    // entry for this host, port, `replication` and user; a file others can
    // read is ignored, as libpq ignores it.
    use std::os::unix::fs::PermissionsExt;
    let passfile = pg.scratch_dir("passfile")?.join("pgpass");
    fs::write(&passfile, format!("# test\n127.0.0.1:{port}:replication:r_scram:scram pw\n*:*:*:r_md5:md5 pw\n"))?;
    fs::set_permissions(&passfile, fs::Permissions::from_mode(0o600))?;
    for (user, method) in [("r_scram", AuthMethod::ScramSha256), ("r_md5", AuthMethod::Md5)] {
        let conninfo = format!("host=127.0.0.1 port={port} user={user} passfile={}", passfile.display());
        let mut client = ReplicationClient::connect(config(&conninfo)?).await.with_context(|| conninfo.clone())?;
        assert_eq!(client.auth_method(), method, "{conninfo}");
        client.identify_system().await?;
    }
    fs::set_permissions(&passfile, fs::Permissions::from_mode(0o644))?;
    let readable = config(&format!("host=127.0.0.1 port={port} user=r_scram passfile={}", passfile.display()))?;
    let error = ReplicationClient::connect(readable).await.err().context("a world-readable passfile was used")?;
    assert!(matches!(error, ReplicationError::PasswordRequired), "{error}");
    Ok(())
}

/// A listener that reads the startup packet, answers with `reply` and
/// then, if `hang`, keeps the connection open without a word.
async fn fake_server(reply: &'static [u8], hang: bool) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else { return };
        let mut startup = [0u8; 256];
        let _ = socket.read(&mut startup).await;
        let _ = socket.write_all(reply).await;
        if hang {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    });
    Ok(port)
}

/// Whether an error is the kind a case expects.
type ErrorCheck = fn(&ReplicationError) -> bool;

#[tokio::test]
async fn garbage_peers_give_typed_errors_within_the_timeout() -> Result<()> {
    const TIMEOUT_MS: u64 = 500;
    let cases: [(&[u8], bool, ErrorCheck); 5] = [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", false, |e| {
            matches!(e, ReplicationError::MessageTooLarge { tag: 'H', .. })
        }),
        (b"", true, |e| matches!(e, ReplicationError::Timeout { .. })),
        (b"R\0\0\0\x08\0\0", false, |e| matches!(e, ReplicationError::UnexpectedEof)),
        (b"R\0\0\0\x08\0\0\0\x2a", false, |e| matches!(e, ReplicationError::Auth(_))),
        (b"Q\0\0\0\x04", false, |e| matches!(e, ReplicationError::Protocol(_))),
    ];
    for (reply, hang, expected) in cases {
        let port = fake_server(reply, hang).await?;
        let conninfo = format!("host=127.0.0.1 port={port} user=x sslmode=disable");
        let began = Instant::now();
        let result = ReplicationClient::connect(config(&conninfo)?.with_io_timeout_ms(TIMEOUT_MS)).await;
        let error = result.err().context("a fake server was accepted")?;
        assert!(expected(&error), "reply {reply:?}: {error:?}");
        assert!(began.elapsed() < Duration::from_millis(TIMEOUT_MS + 1000), "took {:?}", began.elapsed());
    }
    // With libpq's default sslmode (prefer) the SSLRequest comes first: a
    // peer that answers neither 'S' nor 'N', or nothing, is an error in time.
    for (reply, hang) in [(&b"HTTP/1.1 400 Bad Request\r\n\r\n"[..], false), (b"", true)] {
        let port = fake_server(reply, hang).await?;
        let conninfo = format!("host=127.0.0.1 port={port} user=x");
        let began = Instant::now();
        let result = ReplicationClient::connect(config(&conninfo)?.with_io_timeout_ms(TIMEOUT_MS)).await;
        let error = result.err().context("a fake server was accepted")?;
        let typed = match &error {
            ReplicationError::Tls { source: net::pg_tls::PgTlsError::BadAnswer(b'H'), .. } => !hang,
            ReplicationError::Timeout { .. } => hang,
            _ => false,
        };
        assert!(typed, "SSLRequest answered {reply:?}: {error:?}");
        assert!(began.elapsed() < Duration::from_millis(TIMEOUT_MS + 1000), "took {:?}", began.elapsed());
    }
    Ok(())
}
