//! A real PostgreSQL 15 cluster for integration tests.
//!
//! Each [`PgCluster`] lives in its own temporary directory (data directory,
//! Unix socket, server log), listens only on 127.0.0.1 at a reserved port, and is
//! stopped (by pid, never by name) when dropped. Postgres refuses to run as
//! root, so when the tests run as root every Postgres program runs as the
//! `postgres` OS user; otherwise as the current user.
//!
//! Every wait is bounded: commands get a timeout, startup and shutdown have
//! deadlines, and a timed-out child is killed.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{Pid, User};

use crate::fixture::{wait_bounded, PortReservation, POLL_INTERVAL};

/// Where Debian/Ubuntu install PostgreSQL 15; `PG_BIN_DIR` overrides it.
pub const DEFAULT_PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The OS user that runs Postgres when the tests run as root.
pub const PG_OS_USER: &str = "postgres";
/// The database superuser (`initdb -U`), whatever the OS user.
pub const PG_SUPERUSER: &str = "postgres";
pub const DEFAULT_WAL_SEGMENT_SIZE_MIB: u32 = 16;
/// How long an immediate shutdown may take before the process group is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of the server log quoted in error messages.
const LOG_TAIL_BYTES: u64 = 4096;

/// How to create a cluster.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `initdb --wal-segsize` (a power of two, 1..=1024).
    pub wal_segment_size_mib: u32,
    /// Extra `postgresql.conf` settings, appended after the defaults (so
    /// they override them), e.g. `("wal_keep_size", "1GB")`.
    pub settings: Vec<(String, String)>,
    pub bin_dir: PathBuf,
    /// Where programs missing from `bin_dir` are taken from (PostgreSQL
    /// 17's server-only package borrows 18's psql and pg_isready).
    pub client_bin_dir: Option<PathBuf>,
    /// Deadline for the server to accept connections after `start`.
    pub startup_timeout: Duration,
    /// Default deadline for `psql`, `pgbench` and other commands.
    pub command_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            wal_segment_size_mib: DEFAULT_WAL_SEGMENT_SIZE_MIB,
            settings: Vec::new(),
            bin_dir: std::env::var_os("PG_BIN_DIR").map_or_else(|| PathBuf::from(DEFAULT_PG_BIN_DIR), PathBuf::from),
            client_bin_dir: None,
            startup_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(120),
        }
    }
}

impl PgOptions {
    /// Add a `postgresql.conf` setting.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }
}

/// The OS identity Postgres programs run as (None: the current user).
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A PostgreSQL cluster in a temporary directory.
pub struct PgCluster {
    options: PgOptions,
    run_as: Option<RunAs>,
    /// Holds data, socket and log; removed on drop (after the server stops).
    base_dir: tempfile::TempDir,
    /// Postgres cannot bind port 0 and report it: its port is reserved for
    /// it (no one else gets it meanwhile), for its whole life.
    port: PortReservation,
    postmaster: Option<Child>,
}

impl PgCluster {
    /// Create a fresh cluster with `initdb` and write its configuration. The
    /// server is not started.
    pub fn init(options: PgOptions) -> Result<PgCluster> {
        let (run_as, base_dir) = base_dir_for_postgres("pg-test-")?;
        let mut cluster = PgCluster { options, run_as, base_dir, port: PortReservation::new()?, postmaster: None };
        let segsize = cluster.options.wal_segment_size_mib.to_string();
        let data_dir = cluster.data_dir();
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(&data_dir).args(["-U", PG_SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"]);
        // initdb's own fsync of the new files only costs time: nothing here
        // survives a machine crash anyway; the server itself runs fsync=on.
        initdb.args(["--no-sync", "--wal-segsize", &segsize]);
        cluster.run_checked(initdb, cluster.options.command_timeout).context("initdb")?;
        cluster.write_config()?;
        if let Some(security) = crate::secure::security() {
            cluster.require_tls(&security.leaf.certificate, &security.leaf.key)?;
        }
        Ok(cluster)
    }

    /// A new cluster (not started) from `pg_basebackup` of the running
    /// `source`, with `-X wal_mode` (`none`, `fetch` or `stream`). Its
    /// configuration is the source's, then this harness's (own port and
    /// socket), then `options.settings`; the caller adds `standby.signal` or
    /// `recovery.signal` with [`PgCluster::write_data_file`].
    pub fn from_base_backup(source: &PgCluster, options: PgOptions, wal_mode: &str) -> Result<PgCluster> {
        let (run_as, base_dir) = base_dir_for_postgres("pg-backup-")?;
        let mut cluster = PgCluster { options, run_as, base_dir, port: PortReservation::new()?, postmaster: None };
        let mut backup = source.command("pg_basebackup");
        backup.arg("-D").arg(cluster.data_dir()).args(["-X", wal_mode, "-c", "fast", "--no-sync"]);
        cluster.run_checked(backup, cluster.options.command_timeout).context("pg_basebackup")?;
        cluster.write_config()?;
        Ok(cluster)
    }

    /// Serve TLS with this certificate and accept TCP connections only over
    /// TLS (pg_hba: `hostssl` lines, trust; the Unix socket stays trust).
    pub fn require_tls(&mut self, certificate: &Path, key: &Path) -> Result<()> {
        self.write_data_file("server.crt", &fs::read_to_string(certificate)?)?;
        self.write_data_file("server.key", &fs::read_to_string(key)?)?;
        fs::set_permissions(self.data_dir().join("server.key"), fs::Permissions::from_mode(0o600))?;
        self.write_data_file(
            "pg_hba.conf",
            "local all all trust\nlocal replication all trust\n\
             hostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\n",
        )?;
        let mut conf = OpenOptions::new().append(true).open(self.data_dir().join("postgresql.conf"))?;
        writeln!(conf, "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'")?;
        Ok(())
    }

    /// Write `contents` to `name` in the data directory, readable by Postgres.
    pub fn write_data_file(&self, name: &str, contents: &str) -> Result<()> {
        let path = self.data_dir().join(name);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        if let Some(user) = self.run_as {
            nix::unistd::chown(&path, Some(user.uid.into()), Some(user.gid.into()))?;
        }
        Ok(())
    }

    /// A directory under this cluster's temp dir that Postgres programs
    /// (pg_receivewal, say) may write to.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let path = self.base_dir.path().join(name);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        if let Some(user) = self.run_as {
            nix::unistd::chown(&path, Some(user.uid.into()), Some(user.gid.into()))?;
        }
        Ok(path)
    }

    fn write_config(&mut self) -> Result<()> {
        let segment_mib = self.options.wal_segment_size_mib;
        let socket_dir = self.base_dir.path().display().to_string();
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "'127.0.0.1'".to_string()),
            ("unix_socket_directories", format!("'{socket_dir}'")),
            ("fsync", "on".to_string()),
            ("shared_buffers", "32MB".to_string()),
            ("max_connections", "40".to_string()),
            // Keep pg_wal small, within what Postgres allows for the segment size.
            ("min_wal_size", format!("{}MB", 2 * segment_mib)),
            ("max_wal_size", format!("{}MB", (4 * segment_mib).max(64))),
            ("log_line_prefix", "'%m [%p] '".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        settings.extend(self.options.settings.iter().cloned());
        let mut conf = OpenOptions::new()
            .append(true)
            .open(self.data_dir().join("postgresql.conf"))
            .context("opening postgresql.conf")?;
        writeln!(conf, "\n# Written by the integration test harness.")?;
        for (name, value) in settings {
            writeln!(conf, "{name} = {value}")?;
        }
        Ok(())
    }

    /// Start the server and wait (bounded) until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        assert!(self.postmaster.is_none(), "Postgres is already running");
        let log =
            OpenOptions::new().create(true).append(true).open(self.log_path()).context("opening the server log")?;
        let mut postgres = self.command("postgres");
        postgres.arg("-D").arg(self.data_dir()).arg("-p").arg(self.port.port().to_string());
        // Its own process group: a stray signal to the test's group does not
        // reach it, and on a failed shutdown the whole group can be killed.
        postgres.process_group(0).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = postgres.spawn().context("spawning postgres")?;
        self.postmaster = Some(child);
        let deadline = Instant::now() + self.options.startup_timeout;
        loop {
            if let Some(status) = self.postmaster.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                self.postmaster = None;
                bail!("postgres exited during startup ({status}); log:\n{}", self.log_tail());
            }
            let mut ready = self.command("pg_isready");
            ready.args(["-q", "-t", "1"]);
            if self.run(ready, Duration::from_secs(5)).is_ok_and(|out| out.status.success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop_immediate()?;
                bail!("postgres not ready within {:?}; log:\n{}", self.options.startup_timeout, self.log_tail());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Immediate shutdown (SIGQUIT to the postmaster, as `pg_ctl -m
    /// immediate`): no checkpoint, like a crash of the server processes.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_immediate()
    }

    /// Immediate shutdown; see [`PgCluster::stop`].
    pub fn stop_immediate(&mut self) -> Result<()> {
        self.stop_with(Signal::SIGQUIT)
    }

    /// Fast shutdown (SIGINT): disconnect clients, write a shutdown checkpoint.
    pub fn stop_fast(&mut self) -> Result<()> {
        self.stop_with(Signal::SIGINT)
    }

    /// Kill the postmaster and its children outright (SIGKILL to its group).
    pub fn kill(&mut self) -> Result<()> {
        self.stop_with(Signal::SIGKILL)
    }

    fn stop_with(&mut self, signal: Signal) -> Result<()> {
        let Some(mut child) = self.postmaster.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        let signalled = if signal == Signal::SIGKILL { killpg(pid, signal) } else { kill(pid, signal) };
        if let Err(error) = signalled {
            // Already gone (ESRCH) is fine as long as we reap it below.
            eprintln!("signal {signal} to postgres {pid}: {error}");
        }
        if wait_bounded(&mut child, STOP_TIMEOUT)?.is_some() {
            return Ok(());
        }
        // The postmaster leads its own group (see try_start): kill it all.
        let _ = killpg(pid, Signal::SIGKILL);
        child.wait().context("reaping postgres")?;
        bail!("postgres {pid} ignored {signal} for {STOP_TIMEOUT:?}; killed its process group")
    }

    pub fn is_running(&self) -> bool {
        self.postmaster.is_some()
    }

    /// Run SQL with `psql -At` (unaligned, tuples only) and return stdout.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_with_timeout(sql, self.options.command_timeout)
    }

    pub fn psql_with_timeout(&self, sql: &str, timeout: Duration) -> Result<String> {
        let mut psql = self.command("psql");
        psql.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        let output = self.run_checked(psql, timeout).with_context(|| format!("psql -c {sql:?}"))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_string())
    }

    /// Run `sql` with psql over a physical replication connection to
    /// 127.0.0.1:`port` (a walsender, or a safekeeper's pg port).
    pub fn psql_replication(&self, port: u16, sql: &str) -> Result<String> {
        self.psql_replication_with_options(port, "", sql)
    }

    /// [`PgCluster::psql_replication`] with libpq `options` (a safekeeper's
    /// pg port is told the timeline as `-c tenant_id=.. -c timeline_id=..`);
    /// `options` must not contain a single quote.
    pub fn psql_replication_with_options(&self, port: u16, options: &str, sql: &str) -> Result<String> {
        assert!(!options.contains('\''), "options with a quote: {options:?}");
        let mut psql = self.command("psql");
        let mut conninfo = format!("host=127.0.0.1 port={port} user={PG_SUPERUSER} replication=true");
        if !options.is_empty() {
            conninfo.push_str(&format!(" options='{options}'"));
        }
        psql.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", &conninfo, "-c", sql]);
        let output =
            self.run_checked(psql, self.options.command_timeout).with_context(|| format!("psql -c {sql:?}"))?;
        Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_string())
    }

    /// Run `pgbench` with `args` against the `postgres` database.
    pub fn pgbench(&self, args: &[&str]) -> Result<String> {
        let mut pgbench = self.command("pgbench");
        pgbench.args(args);
        let output =
            self.run_checked(pgbench, self.options.command_timeout).with_context(|| format!("pgbench {args:?}"))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A command for one of the Postgres programs, set up to run as the
    /// Postgres OS user with PGHOST/PGPORT/PGUSER/PGDATABASE pointing here.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin(program));
        command
            .current_dir(self.base_dir.path())
            .env("HOME", self.base_dir.path())
            .env("PGHOST", self.base_dir.path())
            .env("PGPORT", self.port.port().to_string())
            .env("PGUSER", PG_SUPERUSER)
            .env("PGDATABASE", "postgres")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE");
        // Secure mode: TCP connections (to the primary, to a safekeeper's
        // pg port) verify-full, with a token as the password a safekeeper
        // asks for; libpq ignores sslmode on the Unix socket.
        if let Some(security) = crate::secure::security() {
            command
                .env("PGSSLMODE", "verify-full")
                .env("PGSSLROOTCERT", security.ca_certificate())
                .env("PGPASSWORD", &security.data_token);
        }
        if let Some(user) = self.run_as {
            command.uid(user.uid).gid(user.gid);
        }
        command
    }

    /// Run a command to completion within `timeout`, capturing its output.
    pub fn run(&self, command: Command, timeout: Duration) -> Result<Output> {
        run_bounded(command, timeout)
    }

    /// Like [`PgCluster::run`], but a non-zero exit is an error quoting stderr.
    pub fn run_checked(&self, command: Command, timeout: Duration) -> Result<Output> {
        let program = format!("{:?}", command.get_program());
        let output = run_bounded(command, timeout)?;
        if !output.status.success() {
            bail!("{program} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim_end());
        }
        Ok(output)
    }

    /// Path of a Postgres program.
    pub fn bin(&self, name: &str) -> PathBuf {
        let own = self.options.bin_dir.join(name);
        match &self.options.client_bin_dir {
            Some(clients) if !own.exists() => clients.join(name),
            _ => own,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base_dir.path().join("data")
    }

    pub fn pg_wal_dir(&self) -> PathBuf {
        self.data_dir().join("pg_wal")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.base_dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port.port()
    }

    pub fn wal_segment_size_bytes(&self) -> u64 {
        u64::from(self.options.wal_segment_size_mib) << 20
    }

    /// A libpq connection string over TCP to `dbname` as the superuser
    /// (verify-full in secure mode).
    pub fn connection_string(&self, dbname: &str) -> String {
        let tls = crate::secure::security().map(|security| format!(" {}", security.libpq_conninfo()));
        format!("host=127.0.0.1 port={} user={PG_SUPERUSER} dbname={dbname}{}", self.port(), tls.unwrap_or_default())
    }

    /// A connection string over the Unix socket (trust, no TLS in any
    /// mode): for the harness's own workload clients, which are not a hop
    /// of the product.
    pub fn socket_connection_string(&self, dbname: &str) -> String {
        format!("host={} port={} user={PG_SUPERUSER} dbname={dbname}", self.socket_dir().display(), self.port())
    }

    pub fn log_path(&self) -> PathBuf {
        self.base_dir.path().join("postgres.log")
    }

    /// The end of the server log (for error messages).
    pub fn log_tail(&self) -> String {
        let Ok(mut file) = File::open(self.log_path()) else {
            return "(no log)".to_string();
        };
        let len = file.metadata().map(|meta| meta.len()).unwrap_or(0);
        let mut tail = Vec::new();
        let skip = len.saturating_sub(LOG_TAIL_BYTES);
        let _ =
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(skip)).and_then(|_| file.read_to_end(&mut tail));
        String::from_utf8_lossy(&tail).into_owned()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(error) = self.stop_immediate() {
            eprintln!("stopping postgres on drop: {error:#}");
        }
    }
}

/// The `postgres` OS user when running as root, else None (run as we are).
fn postgres_identity() -> Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = User::from_name(PG_OS_USER)
        .context("looking up the postgres OS user")?
        .ok_or_else(|| anyhow!("running as root needs an OS user {PG_OS_USER:?} to run Postgres as"))?;
    Ok(Some(RunAs { uid: user.uid.as_raw(), gid: user.gid.as_raw() }))
}

/// A fresh temp dir owned by whoever runs Postgres, and that identity.
fn base_dir_for_postgres(prefix: &str) -> Result<(Option<RunAs>, tempfile::TempDir)> {
    let run_as = postgres_identity()?;
    let base_dir = tempfile::Builder::new().prefix(prefix).tempdir().context("creating a temp dir")?;
    if let Some(user) = run_as {
        check_traversable(base_dir.path())?;
        nix::unistd::chown(base_dir.path(), Some(user.uid.into()), Some(user.gid.into()))
            .with_context(|| format!("giving {} to the {PG_OS_USER} user", base_dir.path().display()))?;
    }
    Ok((run_as, base_dir))
}

/// The Postgres user must be able to reach the temp dir through its parents.
fn check_traversable(dir: &Path) -> Result<()> {
    for parent in dir.ancestors().skip(1) {
        let mode = fs::metadata(parent).with_context(|| format!("stat {}", parent.display()))?.permissions().mode();
        if mode & 0o001 == 0 {
            bail!(
                "{} is not traversable by other users (mode {mode:o}); set TMPDIR to a directory the {PG_OS_USER} user can reach",
                parent.display()
            );
        }
    }
    Ok(())
}

/// Spawn `command`, collect its output, and kill it if it outlives `timeout`.
fn run_bounded(mut command: Command, timeout: Duration) -> Result<Output> {
    let description = format!("{:?} {:?}", command.get_program(), command.get_args().collect::<Vec<_>>());
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().with_context(|| format!("spawning {description}"))?;
    // Read both pipes concurrently so a chatty child cannot block on a full pipe.
    let stdout = drain_pipe(child.stdout.take());
    let stderr = drain_pipe(child.stderr.take());
    let Some(status) = wait_bounded(&mut child, timeout)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{description} did not finish within {timeout:?}");
    };
    let join = |reader: thread::JoinHandle<Vec<u8>>| reader.join().map_err(|_| anyhow!("pipe reader panicked"));
    Ok(Output { status, stdout: join(stdout)?, stderr: join(stderr)? })
}

fn drain_pipe(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness itself: configurable segment size, restart, and no
    /// process left behind after any kind of stop.
    #[test]
    fn cluster_starts_restarts_and_leaves_no_process() -> Result<()> {
        let mut pg = PgCluster::init(PgOptions { wal_segment_size_mib: 1, ..PgOptions::default() })?;
        pg.start()?;
        assert_eq!(pg.psql("SHOW wal_segment_size")?, "1MB");
        assert_eq!(pg.psql("SHOW listen_addresses")?, "127.0.0.1");
        pg.psql("CREATE TABLE t AS SELECT 1 AS x")?;
        pg.stop_fast()?;
        pg.start()?;
        assert_eq!(pg.psql("SELECT x FROM t")?, "1");
        let pid = Pid::from_raw(pg.postmaster.as_ref().map(|child| child.id() as i32).unwrap_or_default());
        pg.kill()?;
        assert!(!pg.is_running());
        assert_eq!(kill(pid, None), Err(nix::errno::Errno::ESRCH), "postmaster {pid} still exists");
        assert!(pg.psql_with_timeout("SELECT 1", Duration::from_secs(5)).is_err());
        pg.start()?;
        drop(pg);
        assert_eq!(kill(pid, None), Err(nix::errno::Errno::ESRCH));
        Ok(())
    }
}
