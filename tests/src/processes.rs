//! Project binaries as child processes: build them once, start them on
//! loopback ports they bind themselves (port 0, reported through
//! `--listen-addrs-file`) or on reserved ones, stop them by pid. Every wait
//! is bounded.
//!
//! The tests crate cannot use `CARGO_BIN_EXE_*` of another package, so
//! [`binary`] runs `cargo build -p <package>` once per test process and
//! returns `target/debug/<name>`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use utils::listen_addrs::parse_listen_addrs;

use crate::fixture::{wait_bounded, wait_for, PortReservation};

/// How long `cargo build` of one package may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a started service may take to bind its ports.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a signalled process may take to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes of a child's log quoted in error messages.
const LOG_TAIL_BYTES: usize = 4096;
/// Largest HTTP response [`http_get`] reads.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Path of `target/debug/<name>`, built by `cargo build -p <package>` the
/// first time it is asked for in this process.
pub fn binary(package: &str, name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(package) {
        return Ok(path.clone());
    }
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command.current_dir(&root).args(["build", "--quiet", "-p", package, "--bin", name]);
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().context("spawning cargo build")?;
    let stderr = child.stderr.take();
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = stderr {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let Some(status) = wait_bounded(&mut child, BUILD_TIMEOUT)? else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("cargo build -p {package} did not finish within {BUILD_TIMEOUT:?}");
    };
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        bail!("cargo build -p {package} failed: {stderr}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let path = target.join("debug").join(name);
    built.insert(package.to_string(), path.clone());
    Ok(path)
}

/// A helper child (psql, pgbench) that is killed and reaped if the test
/// returns before it finished.
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    pub fn new(child: Child) -> KillOnDrop {
        KillOnDrop(Some(child))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("present until into_inner")
    }

    /// The child, no longer killed on drop (to collect its output).
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("present until into_inner")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A service child process writing to its own log file; SIGKILLed when
/// dropped. Every wait on it is bounded.
pub struct ServiceProcess {
    child: Option<Child>,
    name: &'static str,
    pub log_path: PathBuf,
}

impl ServiceProcess {
    /// Spawn `command` with stdout and stderr going to `log_path`.
    pub fn spawn(name: &'static str, mut command: Command, log_path: &Path) -> Result<ServiceProcess> {
        let log = File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
        command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = command.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(ServiceProcess { child: Some(child), name, log_path: log_path.to_path_buf() })
    }

    fn child_mut(&mut self) -> Result<&mut Child> {
        let name = self.name;
        self.child.as_mut().ok_or_else(|| anyhow!("{name} already stopped"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().with_context(|| format!("killing {}", self.name))?;
            child.wait()?;
        }
        Ok(())
    }

    /// Send `signal` without waiting (SIGSTOP/SIGCONT, or a stop whose exit
    /// is awaited later with [`ServiceProcess::wait_exit`]).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("{} already stopped", self.name))?;
        kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Send `signal` and wait (bounded) for the exit status.
    pub fn stop_with(&mut self, signal: Signal) -> Result<ExitStatus> {
        self.signal(signal)?;
        self.wait_exit(EXIT_TIMEOUT)?.ok_or_else(|| {
            anyhow!("{} did not exit within {EXIT_TIMEOUT:?} of {signal}: {}", self.name, self.log_tail())
        })
    }

    /// Wait up to `timeout` for the process to exit on its own; `None` if
    /// it is still running (it is then killed, so nothing outlives a test).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else { bail!("{} already stopped", self.name) };
        match wait_bounded(&mut child, timeout)? {
            Some(status) => Ok(Some(status)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Ok(None)
            }
        }
    }

    /// Whether the process is still running (reaping it if it exited).
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child_mut()?.try_wait()?)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let start = text.len().saturating_sub(LOG_TAIL_BYTES);
        text.get(start..).unwrap_or(&text).to_string()
    }

    /// Spawn `command` with `--listen-addrs-file` added and wait (bounded)
    /// until the process has bound its ports and reported them there; the
    /// addresses by listener name (`pg`, `http`).
    pub fn spawn_listening(
        name: &'static str,
        mut command: Command,
        log_path: &Path,
    ) -> Result<(ServiceProcess, HashMap<String, SocketAddr>)> {
        let addrs_path = log_path.with_extension("addrs");
        command.arg("--listen-addrs-file").arg(&addrs_path);
        let mut process = ServiceProcess::spawn(name, command, log_path)?;
        let reported = wait_for(READY_TIMEOUT, &format!("{name} to report its addresses"), || {
            // The file first: a process may report its ports and then exit
            // at once (a shim refusing to lead), which is its caller's to see.
            match std::fs::read_to_string(&addrs_path) {
                Ok(text) => return Ok(Some(parse_listen_addrs(&text))),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(error.into()),
            }
            match process.child_mut()?.try_wait()? {
                Some(status) => Ok(Some(Err(anyhow!("{name} exited at startup ({status}): {}", process.log_tail())))),
                None => Ok(None),
            }
        });
        let addrs = reported.and_then(|parsed| parsed).with_context(|| process.log_tail())?;
        Ok((process, addrs.into_iter().collect()))
    }
}

/// The address reported for listener `name`.
fn reported(addrs: &HashMap<String, SocketAddr>, name: &str) -> Result<SocketAddr> {
    addrs.get(name).copied().ok_or_else(|| anyhow!("no {name} address among those reported: {addrs:?}"))
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A safekeeper's two ports, held for it while this lives (its peers or a
/// shim were told them before it started; restarts come back to them).
pub struct SafekeeperPorts {
    pub pg: PortReservation,
    pub http: PortReservation,
}

impl SafekeeperPorts {
    pub fn reserve() -> Result<Arc<SafekeeperPorts>> {
        Ok(Arc::new(SafekeeperPorts { pg: PortReservation::new()?, http: PortReservation::new()? }))
    }
}

/// Where a safekeeper is started.
enum Listen {
    /// Port 0: the kernel picks, the process reports.
    AnyPort,
    /// Exactly these (a restart), held by `ports` if they were reserved.
    At { pg: SocketAddr, http: SocketAddr, ports: Option<Arc<SafekeeperPorts>> },
}

/// A `safekeeper` serving a data directory; SIGKILLed when dropped.
pub struct Safekeeper {
    pub process: ServiceProcess,
    pub id: u64,
    pub datadir: PathBuf,
    pub pg_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Flags beyond id, datadir and addresses (kept across restarts).
    pub extra_args: Vec<String>,
    /// The reservation of its ports, if it was started on reserved ones.
    ports: Option<Arc<SafekeeperPorts>>,
}

impl Safekeeper {
    /// Start on ports the kernel picks; returns once it listens.
    pub fn start(id: u64, datadir: &Path) -> Result<Safekeeper> {
        Safekeeper::start_with_args(id, datadir, vec![])
    }

    /// Start with `extra_args` (e.g. `--wal-keep-bytes N`) on ports the
    /// kernel picks.
    pub fn start_with_args(id: u64, datadir: &Path, extra_args: Vec<String>) -> Result<Safekeeper> {
        Safekeeper::launch(id, datadir, Listen::AnyPort, extra_args)
    }

    /// Start with `extra_args` on the reserved `ports` (which others were
    /// told already); the reservation is held as long as the safekeeper and
    /// its restarts are.
    pub fn start_reserved(
        id: u64,
        datadir: &Path,
        ports: Arc<SafekeeperPorts>,
        extra_args: Vec<String>,
    ) -> Result<Safekeeper> {
        let (pg, http) = (ports.pg.addr(), ports.http.addr());
        Safekeeper::launch(id, datadir, Listen::At { pg, http, ports: Some(ports) }, extra_args)
    }

    fn launch(id: u64, datadir: &Path, listen: Listen, extra_args: Vec<String>) -> Result<Safekeeper> {
        let (pg, http, ports) = match listen {
            Listen::AnyPort => (ANY_LOOPBACK_PORT, ANY_LOOPBACK_PORT, None),
            Listen::At { pg, http, ports } => (pg, http, ports),
        };
        let (process, addrs) = Safekeeper::spawn(id, datadir, pg, http, &extra_args)?;
        let (pg_addr, http_addr) = (reported(&addrs, "pg")?, reported(&addrs, "http")?);
        ensure!(pg.port() == 0 || pg == pg_addr, "safekeeper asked to listen on {pg} reports {pg_addr}");
        ensure!(http.port() == 0 || http == http_addr, "safekeeper asked to listen on {http} reports {http_addr}");
        Ok(Safekeeper { process, id, datadir: datadir.to_path_buf(), pg_addr, http_addr, extra_args, ports })
    }

    fn spawn(
        id: u64,
        datadir: &Path,
        pg: SocketAddr,
        http: SocketAddr,
        extra_args: &[String],
    ) -> Result<(ServiceProcess, HashMap<String, SocketAddr>)> {
        let log_path = datadir.with_extension(format!("{}.log", unique_suffix()));
        let mut command = Command::new(binary("safekeeper", "safekeeper")?);
        command.arg("--id").arg(id.to_string()).arg("--datadir").arg(datadir);
        command.arg("--listen-pg").arg(pg.to_string()).arg("--listen-http").arg(http.to_string());
        command.args(extra_args);
        if let Some(security) = crate::secure::security() {
            command.args(crate::secure::not_given(security.safekeeper_args(), extra_args));
        }
        ServiceProcess::spawn_listening("safekeeper", command, &log_path)
    }

    /// Run a second `safekeeper` on `datadir` and expect it to exit; returns
    /// its exit status and output.
    pub fn run_expecting_exit(id: u64, datadir: &Path) -> Result<(ExitStatus, String)> {
        let log_path = datadir.with_extension(format!("{}.log", unique_suffix()));
        let mut command = Command::new(binary("safekeeper", "safekeeper")?);
        command.arg("--id").arg(id.to_string()).arg("--datadir").arg(datadir);
        command.arg("--listen-pg").arg(ANY_LOOPBACK_PORT.to_string());
        command.arg("--listen-http").arg(ANY_LOOPBACK_PORT.to_string());
        let mut process = ServiceProcess::spawn("safekeeper", command, &log_path)?;
        let status = process
            .wait_exit(EXIT_TIMEOUT)?
            .ok_or_else(|| anyhow!("safekeeper on {} kept running", datadir.display()))?;
        Ok((status, process.log_tail()))
    }

    /// The same safekeeper started again on its data directory and ports.
    pub fn restart(&self) -> Result<Safekeeper> {
        self.restart_with_args(self.extra_args.clone())
    }

    /// [`Safekeeper::restart`] with other flags (they replace the old ones).
    pub fn restart_with_args(&self, extra_args: Vec<String>) -> Result<Safekeeper> {
        let listen = Listen::At { pg: self.pg_addr, http: self.http_addr, ports: self.ports.clone() };
        Safekeeper::launch(self.id, &self.datadir, listen, extra_args)
    }

    /// `GET path` on the HTTP port.
    pub fn http_get(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        http_get(self.http_addr, path)
    }
}

/// `--listen-* 127.0.0.1:0`: the kernel picks a free port, the process
/// reports it.
const ANY_LOOPBACK_PORT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A `compute_shim` streaming a Postgres primary to safekeepers; SIGKILLed
/// when dropped.
pub struct ComputeShim {
    pub process: ServiceProcess,
    pub http_addr: SocketAddr,
}

/// What a `compute_shim` is started with.
#[derive(Clone, Debug)]
pub struct ShimArgs {
    pub pg_conninfo: String,
    pub safekeepers: Vec<SocketAddr>,
    pub tenant_id: String,
    pub timeline_id: String,
    pub application_name: String,
    pub slot: String,
    /// More flags, as given (`--max-buffered-wal-mib 8`, ...).
    pub extra: Vec<String>,
}

impl ComputeShim {
    /// Start and wait until its HTTP port answers (not until it is elected:
    /// see [`ComputeShim::wait_elected`]).
    pub fn start(args: &ShimArgs, log_dir: &Path) -> Result<ComputeShim> {
        ComputeShim::spawn(args, log_dir)
    }

    /// Start and wait only until it reports its HTTP port, which it binds
    /// before anything can fail (for a shim expected to exit).
    pub fn spawn(args: &ShimArgs, log_dir: &Path) -> Result<ComputeShim> {
        let addrs: Vec<String> = args.safekeepers.iter().map(SocketAddr::to_string).collect();
        let mut command = Command::new(binary("compute_shim", "compute_shim")?);
        command.arg("--pg").arg(&args.pg_conninfo).arg("--safekeepers").arg(addrs.join(","));
        command.arg("--tenant-id").arg(&args.tenant_id).arg("--timeline-id").arg(&args.timeline_id);
        command.arg("--application-name").arg(&args.application_name).arg("--slot").arg(&args.slot);
        command.arg("--listen-http").arg(ANY_LOOPBACK_PORT.to_string()).args(&args.extra);
        if let Some(security) = crate::secure::security() {
            command.args(crate::secure::not_given(security.shim_args(), &args.extra));
        }
        let log_path = log_dir.join(format!("compute_shim.{}.log", unique_suffix()));
        let (process, addrs) = ServiceProcess::spawn_listening("compute_shim", command, &log_path)?;
        Ok(ComputeShim { process, http_addr: reported(&addrs, "http")? })
    }

    /// `GET /v1/status`; if the shim is not answering, the error quotes
    /// its log (it may have exited).
    pub fn status(&self) -> Result<serde_json::Value> {
        let (code, body) = http_get(self.http_addr, "/v1/status")
            .with_context(|| format!("compute_shim status; its log ends: {}", self.process.log_tail()))?;
        ensure!(code == 200, "compute_shim status answered {code}: {body}");
        Ok(body)
    }

    /// Wait (bounded) until the shim is elected and streaming from Postgres.
    pub fn wait_elected(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let elected = wait_for(timeout, "compute_shim to be elected and streaming", || {
            if let Some(status) = self.process.exit_status()? {
                return Ok(Some(Err(anyhow!("compute_shim exited ({status}): {}", self.process.log_tail()))));
            }
            let status = self.status()?;
            let streaming = status["phase"] == "elected" && !status["streaming_from_lsn"].is_null();
            Ok(streaming.then_some(Ok(status)))
        });
        elected.and_then(|exited_or_status| exited_or_status).with_context(|| self.process.log_tail())
    }
}

/// What one `compute_shim sync-safekeepers` run printed.
pub struct SyncRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl SyncRun {
    /// The LSN on stdout's last line (the command's contract).
    pub fn commit_lsn(&self) -> Result<postgres_wal::lsn::Lsn> {
        ensure!(self.status.success(), "sync-safekeepers failed ({}): {}", self.status, self.stderr_last_line());
        let last = self.stdout.lines().last().context("sync-safekeepers printed nothing")?;
        last.trim().parse().with_context(|| format!("the last line of sync-safekeepers' stdout, {last:?}"))
    }

    pub fn stderr_last_line(&self) -> &str {
        self.stderr.lines().last().unwrap_or_default()
    }
}

/// Run `compute_shim sync-safekeepers` to its end (bounded: its own
/// `--timeout-s` plus a margin); stdout and stderr go to files in `log_dir`.
pub fn sync_safekeepers(
    safekeepers: &[SocketAddr],
    tenant_id: &str,
    timeline_id: &str,
    timeout_s: u64,
    log_dir: &Path,
) -> Result<SyncRun> {
    let addrs: Vec<String> = safekeepers.iter().map(SocketAddr::to_string).collect();
    let mut command = Command::new(binary("compute_shim", "compute_shim")?);
    command.arg("sync-safekeepers").arg("--safekeepers").arg(addrs.join(","));
    command.arg("--tenant-id").arg(tenant_id).arg("--timeline-id").arg(timeline_id);
    command.arg("--timeout-s").arg(timeout_s.to_string());
    if let Some(security) = crate::secure::security() {
        command
            .arg("--auth-token-file")
            .arg(&security.tenant_token_file)
            .arg("--tls-ca")
            .arg(security.ca_certificate());
    }
    let suffix = unique_suffix();
    let (stdout_path, stderr_path) =
        (log_dir.join(format!("sync.{suffix}.stdout")), log_dir.join(format!("sync.{suffix}.log")));
    command.stdin(Stdio::null()).stdout(File::create(&stdout_path)?).stderr(File::create(&stderr_path)?);
    let mut child = KillOnDrop::new(command.spawn().context("starting compute_shim sync-safekeepers")?);
    let limit = Duration::from_secs(timeout_s) + EXIT_TIMEOUT;
    let Some(status) = wait_bounded(child.child(), limit)? else {
        bail!("sync-safekeepers ran past {limit:?} despite --timeout-s {timeout_s}");
    };
    Ok(SyncRun {
        status,
        stdout: std::fs::read_to_string(&stdout_path)?,
        stderr: std::fs::read_to_string(&stderr_path)?,
    })
}

impl ComputeShim {
    /// `GET /v1/membership`: the configuration and a change under way.
    pub fn membership(&self) -> Result<serde_json::Value> {
        let (code, body) = http_get(self.http_addr, "/v1/membership")
            .with_context(|| format!("compute_shim membership; its log ends: {}", self.process.log_tail()))?;
        ensure!(code == 200, "compute_shim membership answered {code}: {body}");
        Ok(body)
    }

    /// `POST /v1/membership` asking for the safekeeper set `pg_addrs`: the
    /// answer's status and JSON body (202 taken, 400 invalid, 409 conflict).
    pub fn request_membership(&self, pg_addrs: &[SocketAddr]) -> Result<(u16, serde_json::Value)> {
        let addrs: Vec<String> = pg_addrs.iter().map(SocketAddr::to_string).collect();
        let body = serde_json::json!({ "safekeepers": addrs });
        let answer = http_request("POST", self.http_addr, "/v1/membership", Some(&body), HTTP_TIMEOUT)?;
        Ok((answer.status, answer.json().context("POST /v1/membership")?))
    }
}

/// A `pageserver_stub` following the safekeepers; SIGKILLed when dropped.
pub struct PageserverStub {
    pub process: ServiceProcess,
    pub http_addr: SocketAddr,
    pub datadir: PathBuf,
    pub safekeepers_http: Vec<SocketAddr>,
    /// More flags, as given (`--auth-token-file F`, ...); a restart keeps them.
    pub extra_args: Vec<String>,
}

impl PageserverStub {
    /// Start on a port the kernel picks; returns once it listens.
    pub fn start(safekeepers_http: &[SocketAddr], tenant_id: &str, timeline_id: &str, datadir: &Path) -> Result<Self> {
        PageserverStub::start_with_args(safekeepers_http, tenant_id, timeline_id, datadir, &[])
    }

    /// [`PageserverStub::start`] with more flags.
    pub fn start_with_args(
        safekeepers_http: &[SocketAddr],
        tenant_id: &str,
        timeline_id: &str,
        datadir: &Path,
        extra_args: &[String],
    ) -> Result<Self> {
        let addrs: Vec<String> = safekeepers_http.iter().map(SocketAddr::to_string).collect();
        let mut command = Command::new(binary("pageserver_stub", "pageserver_stub")?);
        command.arg("--safekeepers-http").arg(addrs.join(","));
        command.arg("--tenant-id").arg(tenant_id).arg("--timeline-id").arg(timeline_id);
        command.arg("--datadir").arg(datadir).arg("--listen-http").arg(ANY_LOOPBACK_PORT.to_string());
        command.args(extra_args);
        if let Some(security) = crate::secure::security() {
            command.args(crate::secure::not_given(security.stub_args(), extra_args));
        }
        let log_path = datadir.with_extension(format!("{}.log", unique_suffix()));
        let (process, addrs) = ServiceProcess::spawn_listening("pageserver_stub", command, &log_path)?;
        Ok(PageserverStub {
            process,
            http_addr: reported(&addrs, "http")?,
            datadir: datadir.to_path_buf(),
            safekeepers_http: safekeepers_http.to_vec(),
            extra_args: extra_args.to_vec(),
        })
    }

    /// Start again on the same data directory (a new port).
    pub fn restart(&self, tenant_id: &str, timeline_id: &str) -> Result<Self> {
        PageserverStub::start_with_args(&self.safekeepers_http, tenant_id, timeline_id, &self.datadir, &self.extra_args)
    }

    /// `GET /v1/status`; the error quotes its log if it does not answer.
    pub fn status(&self) -> Result<serde_json::Value> {
        let (code, body) = http_get(self.http_addr, "/v1/status")
            .with_context(|| format!("pageserver_stub status; its log ends: {}", self.process.log_tail()))?;
        ensure!(code == 200, "pageserver_stub status answered {code}: {body}");
        Ok(body)
    }
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `GET path` answered with JSON (an error body included): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, serde_json::Value)> {
    let answer = http_request("GET", addr, path, None, HTTP_TIMEOUT)?;
    Ok((answer.status, answer.json().with_context(|| format!("GET {path}"))?))
}

/// An HTTP answer: status, headers (lowercase names), body bytes.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Result<&str> {
        self.headers.get(name).map(String::as_str).ok_or_else(|| anyhow!("no header {name} in {:?}", self.headers))
    }
}

/// One HTTP request with a bounded wait (chunked bodies decoded); a 4xx or
/// 5xx is an answer, not an error. `body` is sent as JSON when given.
pub fn http_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<HttpAnswer> {
    http_request_as(None, method, addr, path, body, timeout)
}

/// [`http_request`] presenting `token` as `Authorization: Bearer`. In
/// secure mode ([`crate::secure`]) over HTTPS, with the token the request
/// needs when `token` is `None`.
pub fn http_request_as(
    token: Option<&str>,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<HttpAnswer> {
    if let Some(security) = crate::secure::security() {
        let token = token.unwrap_or_else(|| security.token_for(method, path));
        return https_request_as(&security.client_tls, Some(token), method, &addr.to_string(), path, body, timeout);
    }
    plain_http_request_as(token, method, addr, path, body, timeout)
}

/// A byte stream a test writes raw HTTP on (TLS in secure mode).
pub trait ReadWrite: Read + std::io::Write + Send {}
impl<T: Read + std::io::Write + Send> ReadWrite for T {}

/// A raw connection to an HTTP port, for requests written by hand: TLS in
/// secure mode (the handshake done), plain TCP otherwise. The second value
/// is the socket underneath, for its timeouts.
pub fn raw_http_connection(addr: SocketAddr) -> Result<(Box<dyn ReadWrite>, std::net::TcpStream)> {
    let tcp = std::net::TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    // Bounded reads and writes, the TLS handshake's included.
    tcp.set_read_timeout(Some(HTTP_TIMEOUT))?;
    tcp.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let socket = tcp.try_clone()?;
    let Some(security) = crate::secure::security() else { return Ok((Box::new(tcp), socket)) };
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let mut session = rustls::ClientConnection::new(security.client_tls.clone(), name)?;
    let mut tcp = tcp;
    while session.is_handshaking() {
        session.complete_io(&mut tcp)?;
    }
    Ok((Box::new(rustls::StreamOwned::new(session, tcp)), socket))
}

/// [`http_request_as`] in plaintext whatever the mode (a TLS-only port's
/// refusal, say).
pub fn plain_http_request_as(
    token: Option<&str>,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<HttpAnswer> {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    send_request(&agent, token, method, &format!("http://{addr}{path}"), body)
}

/// [`http_request_as`] over HTTPS to `host:port`, trusting what `tls`
/// trusts (the name checked is `host`).
pub fn https_request_as(
    tls: &std::sync::Arc<rustls::ClientConfig>,
    token: Option<&str>,
    method: &str,
    host_port: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<HttpAnswer> {
    let agent = ureq::AgentBuilder::new().timeout(timeout).tls_config(tls.clone()).build();
    send_request(&agent, token, method, &format!("https://{host_port}{path}"), body)
}

fn send_request(
    agent: &ureq::Agent,
    token: Option<&str>,
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
) -> Result<HttpAnswer> {
    let path = url;
    let mut request = agent.request(method, url);
    if let Some(token) = token {
        request = request.set("authorization", &format!("Bearer {token}"));
    }
    let result = match body {
        Some(json) => request.set("content-type", "application/json").send_string(&json.to_string()),
        None => request.call(),
    };
    let response = match result {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(error) => bail!("{method} {path}: {error}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .filter_map(|name| response.header(&name).map(|value| (name.to_ascii_lowercase(), value.to_string())))
        .collect();
    let mut body = Vec::new();
    response.into_reader().take(MAX_HTTP_BODY_BYTES).read_to_end(&mut body)?;
    Ok(HttpAnswer { status, headers, body })
}

/// Largest body [`http_request`] reads (WAL ranges in tests stay far below).
const MAX_HTTP_BODY_BYTES: u64 = 1 << 30;
