//! Tokens on every port (issue 16; docs/security.md), with real processes:
//! three safekeepers started with `--auth-public-key` (peer recovery with a
//! `safekeeper_data` token), a PostgreSQL 15 primary whose shim presents a
//! `tenant` token, and tokens minted by `safekeeper token`.
//!
//! - The cluster commits; pageserver_stub follows with a `safekeeper_data`
//!   token; pg_receivewal streams with a `tenant` token as its password.
//! - Every HTTP endpoint and pg-port command is refused without a token,
//!   with an expired one, one signed by another key, another tenant's and
//!   too small a scope, with 401/403 (28P01/28000 on the pg port), and
//!   accepted with the right one; after all the refusals the timeline's
//!   status and files are unchanged.
//! - A shim without a token exits 7 and moves no term; the shim's own port
//!   refuses a membership change without an admin token.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{json_lsn, QuorumCluster, TENANT, TIMELINE};
use integration_tests::fixture::wait_for;
use integration_tests::pg::PgOptions;
use integration_tests::processes::{http_request_as, ComputeShim, PageserverStub, EXIT_TIMEOUT};
use integration_tests::tokens::TestKeys;
use integration_tests::wal_files::snapshot_files;

const OTHER_TENANT: &str = "99999999999999999999999999999999";
const TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

fn options() -> PgOptions {
    PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() }
}

/// The tokens of one test: the right ones and every kind of wrong one.
struct Tokens {
    tenant: String,
    data: String,
    admin: String,
    other_tenant: String,
    expired: String,
    foreign: String,
}

impl Tokens {
    fn mint(keys: &TestKeys) -> Result<Tokens> {
        Ok(Tokens {
            tenant: keys.token("tenant", Some(TENANT), 3600)?,
            data: keys.token("safekeeper_data", None, 3600)?,
            admin: keys.token("admin", None, 3600)?,
            other_tenant: keys.token("tenant", Some(OTHER_TENANT), 3600)?,
            expired: keys.expired_token("safekeeper_data", None)?,
            foreign: keys.foreign_token("admin", None)?,
        })
    }
}

/// Method, path, and the status each named token gets.
type Endpoint<'a> = (&'a str, &'a str, &'a [(&'a str, u16)]);

fn http(token: Option<&str>, method: &str, addr: SocketAddr, path: &str) -> Result<u16> {
    let body = (method == "POST").then(|| serde_json::json!({ "remote_consistent_lsn": "0/0" }));
    Ok(http_request_as(token, method, addr, path, body.as_ref(), HTTP_TIMEOUT)?.status)
}

/// psql in replication mode against a safekeeper's pg port, the token
/// given as PGPASSWORD (never in argv): its exit status and stderr.
fn replication_command(
    cluster: &QuorumCluster,
    index: usize,
    token: Option<&str>,
    sql: &str,
) -> Result<(bool, String)> {
    let addr = cluster.safekeepers[index].pg_addr;
    let conninfo = format!(
        "host={} port={} user=compute dbname=replication replication=true options='{}' connect_timeout=10",
        addr.ip(),
        addr.port(),
        QuorumCluster::timeline_options()
    );
    let mut psql = Command::new(cluster.pg.bin("psql"));
    psql.args(["-X", "-A", "-t", "-w", "-d", &conninfo, "-c", sql]);
    psql.env_remove("PGPASSWORD");
    if let Some(token) = token {
        psql.env("PGPASSWORD", token);
    }
    let output = cluster.pg.run(psql, TIMEOUT)?;
    Ok((output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned()))
}

/// Test: a cluster with tokens on every hop commits, and a stranger (or a
/// client with the wrong token) can do nothing on any port.
#[test]
fn every_port_checks_tokens() -> Result<()> {
    let keys = TestKeys::generate()?;
    let tokens = Tokens::mint(&keys)?;
    let data_file = keys.file("data.token", &tokens.data)?;
    let tenant_file = keys.file("tenant.token", &tokens.tenant)?;
    let safekeeper_args: Vec<String> = [
        "--auth-public-key",
        &keys.public_key.display().to_string(),
        "--peer-auth-token-file",
        &data_file.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let cluster = QuorumCluster::start_without_shim_with(options(), &safekeeper_args)?;

    // A shim without a token is refused by every safekeeper: exit 7, no term.
    let mut stranger = ComputeShim::spawn(&cluster.shim_args(), cluster.dir.path())?;
    let exit = stranger.process.wait_exit(EXIT_TIMEOUT)?.context("a shim without a token kept running")?;
    let log = stranger.process.log_tail();
    ensure!(exit.code() == Some(7) && log.contains("token"), "a shim without a token: {exit}: {log}");
    let (code, _) = (http(Some(&tokens.admin), "GET", cluster.safekeepers[0].http_addr, "/v1/timelines")?, ());
    ensure!(code == 200, "the admin listing answered {code}");

    // With its tenant token (and its own port asking for tokens) it leads.
    let mut args = cluster.shim_args();
    args.extra = ["--auth-token-file", &tenant_file.display().to_string()]
        .into_iter()
        .chain(["--auth-public-key", &keys.public_key.display().to_string()])
        .map(String::from)
        .collect();
    let shim = ComputeShim::spawn(&args, cluster.dir.path())?;
    let shim_http = shim.http_addr;
    wait_for(TIMEOUT, "the shim to be elected with its token", || {
        let answer = http_request_as(Some(&tokens.tenant), "GET", shim_http, "/v1/status", None, HTTP_TIMEOUT)?;
        let status = answer.json()?;
        Ok((status["phase"] == "elected" && !status["streaming_from_lsn"].is_null()).then_some(()))
    })?;
    cluster.pg.psql_with_timeout("CREATE TABLE acked AS SELECT generate_series(1, 100000) AS v", TIMEOUT)?;
    let flush = cluster.pg_flush_lsn()?;
    let sk0 = cluster.safekeepers[0].http_addr;
    let timeline = format!("/v1/tenant/{TENANT}/timeline/{TIMELINE}");
    wait_for(TIMEOUT, "safekeeper 0 to hold the commit", || {
        let answer = http_request_as(Some(&tokens.data), "GET", sk0, &timeline, None, HTTP_TIMEOUT)?;
        Ok((json_lsn(&answer.json()?, "commit_lsn")? >= flush).then_some(()))
    })?;
    println!("with tokens on every hop: committed to {flush}");

    // The shim's own port: status for its tenant, membership for admins.
    let membership = serde_json::json!({ "safekeepers": cluster.safekeeper_addrs().iter().map(ToString::to_string).collect::<Vec<_>>() });
    for (token, expected) in
        [(None, 401), (Some(tokens.other_tenant.as_str()), 403), (Some(tokens.tenant.as_str()), 403)]
    {
        let answer = http_request_as(token, "POST", shim_http, "/v1/membership", Some(&membership), HTTP_TIMEOUT)?;
        ensure!(answer.status == expected, "shim POST /v1/membership with {token:?}: {}", answer.status);
    }
    let answer = http_request_as(None, "GET", shim_http, "/v1/status", None, HTTP_TIMEOUT)?;
    ensure!(answer.status == 401, "the shim's status without a token answered {}", answer.status);

    // Every safekeeper endpoint: who is refused, who is let in.
    let before = (
        http_request_as(Some(&tokens.admin), "GET", sk0, &timeline, None, HTTP_TIMEOUT)?.json()?,
        snapshot_files(&cluster.timeline_dir(0))?,
    );
    let start = json_lsn(&before.0, "timeline_start_lsn")?;
    let segment_size = cluster.segment_size()?;
    let segment_name = start.segment_no(segment_size).file_name(1, segment_size);
    let segment = format!("{timeline}/segment/{segment_name}");
    let wal = format!("{timeline}/wal?start_lsn={start}&end_lsn={}", start + 256);
    let feedback = format!("{timeline}/feedback");
    let other_timeline = format!("/v1/tenant/{OTHER_TENANT}/timeline/{TIMELINE}");
    let bad_tokens = [
        (None, 401, "no token"),
        (Some(tokens.expired.as_str()), 401, "an expired token"),
        (Some(tokens.foreign.as_str()), 401, "another key's token"),
        (Some("not.a.token"), 401, "a malformed token"),
    ];
    let endpoints: [Endpoint; 7] = [
        ("GET", "/v1/status", &[("tenant", 403), ("data", 200), ("admin", 200)]),
        ("GET", "/v1/timelines", &[("tenant", 403), ("data", 403), ("admin", 200)]),
        ("GET", &timeline, &[("tenant", 200), ("other", 403), ("data", 200), ("admin", 200)]),
        ("GET", &wal, &[("tenant", 200), ("other", 403), ("data", 200), ("admin", 403)]),
        ("GET", &segment, &[("tenant", 200), ("other", 403), ("data", 200), ("admin", 403)]),
        ("POST", &feedback, &[("tenant", 403), ("other", 403), ("admin", 403), ("data", 200)]),
        ("DELETE", &other_timeline, &[("tenant", 403), ("data", 403)]),
    ];
    let by_name = |name: &str| match name {
        "tenant" => &tokens.tenant,
        "other" => &tokens.other_tenant,
        "data" => &tokens.data,
        _ => &tokens.admin,
    };
    let mut checked = 0;
    for (method, path, allowed) in endpoints {
        for (token, expected, what) in bad_tokens {
            let code = http(token, method, sk0, path)?;
            ensure!(code == expected, "{method} {path} with {what}: {code}, expected {expected}");
            checked += 1;
        }
        for (name, expected) in allowed {
            let code = http(Some(by_name(name)), method, sk0, path)?;
            ensure!(code == *expected, "{method} {path} with the {name} token: {code}, expected {expected}");
            checked += 1;
        }
    }
    for open in ["/metrics", "/v1/healthz"] {
        ensure!(http(None, "GET", sk0, open)? == 200, "{open} is documented as open");
    }

    // The pg port: the token is the password.
    let pg_cases = [
        (None, false, "28P01", "no token"),
        (Some(tokens.expired.as_str()), false, "28P01", "an expired token"),
        (Some(tokens.foreign.as_str()), false, "28P01", "another key's token"),
        (Some(tokens.other_tenant.as_str()), false, "28000", "another tenant's token"),
        (Some(tokens.admin.as_str()), false, "28000", "an admin token"),
        (Some(tokens.tenant.as_str()), true, "", "the tenant token"),
        (Some(tokens.data.as_str()), true, "", "a safekeeper_data token"),
    ];
    for (token, accepted, code, what) in pg_cases {
        let (ok, stderr) = replication_command(&cluster, 0, token, "IDENTIFY_SYSTEM")?;
        ensure!(ok == accepted, "IDENTIFY_SYSTEM with {what}: accepted={ok}: {stderr}");
        // 28P01: the token itself is refused; 28000: it may not do this.
        let said = match code {
            "28P01" if token.is_none() => "password",
            "28P01" => "token authentication failed",
            "28000" => "permission denied",
            _ => "",
        };
        ensure!(stderr.contains(said), "IDENTIFY_SYSTEM with {what}: expected {code} ({said}), got: {stderr}");
        checked += 1;
    }
    // Pushing WAL needs the tenant's own token: a safekeeper_data one is refused.
    let (ok, stderr) = replication_command(&cluster, 0, Some(&tokens.data), "START_WAL_PUSH")?;
    ensure!(!ok && stderr.contains("permission denied"), "START_WAL_PUSH with a safekeeper_data token: {stderr}");

    let after = (
        http_request_as(Some(&tokens.admin), "GET", sk0, &timeline, None, HTTP_TIMEOUT)?.json()?,
        snapshot_files(&cluster.timeline_dir(0))?,
    );
    for field in ["term", "term_history", "flush_lsn", "commit_lsn"] {
        ensure!(
            before.0[field] == after.0[field],
            "{field} moved during the refusals: {} -> {}",
            before.0[field],
            after.0[field]
        );
    }
    ensure!(before.1 == after.1, "safekeeper 0's files changed during the refusals");
    println!("{checked} token checks on the HTTP and pg ports; nothing changed");

    // pg_receivewal with the tenant token as its password.
    let received = cluster.dir.path().join("received");
    std::fs::create_dir_all(&received)?;
    let addr = cluster.safekeepers[1].pg_addr;
    let mut receivewal = Command::new(cluster.pg.bin("pg_receivewal"));
    receivewal.args(["-w", "--no-loop", "-E", &flush.to_string(), "-D", &received.display().to_string()]);
    receivewal.args([
        "-d",
        &format!(
            "host={} port={} user=compute options='{}'",
            addr.ip(),
            addr.port(),
            QuorumCluster::timeline_options()
        ),
    ]);
    receivewal.env("PGPASSWORD", &tokens.tenant);
    let output = cluster.pg.run(receivewal, TIMEOUT)?;
    let files = std::fs::read_dir(&received)?.count();
    ensure!(
        files > 0,
        "pg_receivewal with a tenant token received nothing: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // pageserver_stub with the safekeeper_data token follows the commit.
    let http_addrs: Vec<SocketAddr> = cluster.safekeepers.iter().map(|sk| sk.http_addr).collect();
    let stub_args = ["--auth-token-file".to_string(), data_file.display().to_string()];
    let stub_dir = cluster.dir.path().join("stub");
    let stub = PageserverStub::start_with_args(&http_addrs, TENANT, TIMELINE, &stub_dir, &stub_args)?;
    wait_for(TIMEOUT, "pageserver_stub to follow with its token", || {
        Ok((json_lsn(&stub.status()?, "last_record_lsn")? >= flush).then_some(()))
    })?;
    // Key rotation: the foreign key added to safekeeper 0's key file and a
    // SIGHUP: tokens of both keys work there, with nothing restarted.
    let sk0 = cluster.safekeepers[0].http_addr;
    ensure!(http(Some(&tokens.foreign), "GET", sk0, "/v1/timelines")? == 401, "the foreign key is trusted already");
    let foreign_public = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&keys.foreign_private_key)
        .output()
        .context("openssl pkey -pubout")?;
    ensure!(foreign_public.status.success(), "openssl pkey -pubout failed");
    let mut both = std::fs::read(&keys.public_key)?;
    both.extend_from_slice(&foreign_public.stdout);
    std::fs::write(&keys.public_key, both)?;
    cluster.safekeepers[0].process.signal(nix::sys::signal::Signal::SIGHUP)?;
    wait_for(TIMEOUT, "safekeeper 0 to trust the added key", || {
        Ok((http(Some(&tokens.foreign), "GET", sk0, "/v1/timelines")? == 200).then_some(()))
    })?;
    ensure!(http(Some(&tokens.admin), "GET", sk0, "/v1/timelines")? == 200, "the old key is no longer trusted");
    println!("SIGHUP: safekeeper 0 trusts both keys of the rotation");
    drop(shim);
    Ok(())
}
