//! The timelines this safekeeper serves: recovered at startup, created on a
//! proposer's first Greeting (at most `--max-timelines` of them), each run
//! by its owner task. A timeline that fails to recover at startup is kept
//! as broken (shown in the status with its error, refused to proposers)
//! while the others serve.
//!
//! A new timeline's directory appears atomically: it is built under a temp
//! name (`<timeline>.creating`) holding its first control file, fsynced,
//! renamed to `<timeline>` and the tenant directory fsynced. A crash leaves
//! either no timeline or a complete empty one; a leftover temp directory is
//! removed at the next startup.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch};

use super::consumers::Consumers;
use super::errors::{sqlstate, PgError};
use super::metrics::Metrics;
use super::owner::{fail_stop, spawn_owner, OwnerInput, PushConnection, TimelineShared};
use super::peer_recovery;
use crate::import::timeline_dir;
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use safekeeper_api::api::SafekeeperAddress;
use safekeeper_api::api::TimelineStatus;
use safekeeper_core::acceptor::{Acceptor, AcceptorConfig, RecoveredWal};
use safekeeper_core::control::ControlState;
use safekeeper_core::recovery::recover_timeline;
use safekeeper_core::retention::RetentionPolicy;
use safekeeper_core::storage::control_file::FileControlStore;
use safekeeper_core::storage::segments::SegmentStorage;
use safekeeper_core::storage::{fsync_dir, ControlStore, StorageError};
use safekeeper_core::timeline::{FileTimeline, Timeline};
use safekeeper_protocol::ids::{ClusterId, NodeId, TenantId, TimelineId};
use safekeeper_protocol::protocol::{Greeting, ProposerMessage};

/// Suffix of a timeline directory under construction.
const CREATING_SUFFIX: &str = ".creating";
/// Suffix of a timeline directory being deleted.
const DELETING_SUFFIX: &str = ".deleting";
/// Postgres major versions whose WAL this safekeeper decodes (PG15 only).
const SUPPORTED_PG_VERSIONS: std::ops::Range<u32> = 150_000..160_000;

/// One timeline's owner, as connections and the HTTP API reach it.
pub struct TimelineHandle {
    inputs: mpsc::Sender<OwnerInput>,
    snapshot: watch::Receiver<TimelineStatus>,
    task: tokio::task::JoinHandle<()>,
    proposers: AtomicUsize,
    /// The timeline's directory: WAL readers read its segment files.
    pub dir: PathBuf,
    pub shared: Arc<TimelineShared>,
    pub consumers: Arc<Consumers>,
}

impl TimelineHandle {
    pub fn snapshot(&self) -> TimelineStatus {
        self.snapshot.borrow().clone()
    }

    /// A receiver that sees every new snapshot (consumers wait on it for
    /// the commit LSN to move).
    pub fn watch_snapshot(&self) -> watch::Receiver<TimelineStatus> {
        self.snapshot.clone()
    }

    /// A consumer confirmed everything below `lsn` (monotonic); the owner
    /// applies retention and persists it.
    pub fn note_remote_consistent_lsn(&self, lsn: Lsn) {
        let previous = self.shared.remote_consistent_lsn.fetch_max(lsn.0, Ordering::Relaxed);
        if lsn.0 > previous {
            // A full queue means the owner is busy and applies retention
            // after its current batch anyway.
            let _ = self.inputs.try_send(OwnerInput::Wake);
        }
    }

    /// Connections currently in START_WAL_PUSH on this timeline.
    pub fn connected_proposers(&self) -> usize {
        self.proposers.load(Ordering::Relaxed)
    }

    pub(crate) fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Queue an input for the owner, waiting while its queue is full;
    /// `Err` once the owner has stopped.
    pub(crate) async fn send(&self, input: OwnerInput) -> Result<(), ()> {
        self.inputs.send(input).await.map_err(drop)
    }

    /// Count a pushing connection for as long as the guard lives.
    pub fn proposer_guard(self: &Arc<Self>) -> ProposerGuard {
        self.proposers.fetch_add(1, Ordering::Relaxed);
        ProposerGuard(self.clone())
    }

    /// Queue a message for the owner, waiting while its queue is full.
    pub async fn push(&self, connection: Arc<PushConnection>, message: ProposerMessage) -> Result<(), PgError> {
        self.inputs.send(OwnerInput::Push { connection, message }).await.map_err(|_| {
            PgError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "the timeline's owner has stopped (shutdown or storage error); reconnect to reopen it".to_string(),
            )
        })
    }
}

pub struct ProposerGuard(Arc<TimelineHandle>);

impl Drop for ProposerGuard {
    fn drop(&mut self) {
        self.0.proposers.fetch_sub(1, Ordering::Relaxed);
    }
}

type TimelineKey = (TenantId, TimelineId);

/// What a new `Timelines` is made with.
pub struct TimelinesConfig {
    pub node_id: NodeId,
    pub retention: RetentionPolicy,
    /// HTTP addresses of the other safekeepers, for peer recovery.
    pub peers: Arc<[SafekeeperAddress]>,
    /// The `safekeeper_data` token peer recovery presents to them.
    pub peer_auth_token_file: Option<Arc<Path>>,
    /// With `--tls-ca`: peers are reached over HTTPS, trusting that CA.
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// Most timelines held (served or broken); a Greeting for one more is
    /// refused with SQLSTATE 53400.
    pub max_timelines: usize,
    /// Fault injection for tests (`--fault-sync-delay-ms`): added to every
    /// WAL sync of every timeline; zero in production.
    pub fault_sync_delay: Duration,
}

/// A timeline that failed to load at startup, and why.
#[derive(Clone, Debug)]
pub struct BrokenTimeline {
    pub tenant_id: TenantId,
    pub timeline_id: TimelineId,
    pub error: String,
}

pub struct Timelines {
    datadir: PathBuf,
    config: TimelinesConfig,
    pub metrics: Arc<Metrics>,
    entries: Mutex<BTreeMap<TimelineKey, Arc<TimelineHandle>>>,
    /// Timelines recovery failed on: never served (serving would hide lost
    /// or damaged WAL), never created anew over, until an operator repairs
    /// or removes them and restarts.
    broken: BTreeMap<TimelineKey, BrokenTimeline>,
}

impl Timelines {
    /// Recover every timeline under `datadir` and start its owner. Blocking
    /// (recovery reads WAL). A timeline that fails to recover is logged and
    /// kept as broken, and the others serve: one damaged timeline must not
    /// take every other one offline.
    pub fn recover_all(datadir: &Path, config: TimelinesConfig) -> anyhow::Result<Timelines> {
        remove_unfinished_creations(datadir)?;
        let metrics = Arc::new(Metrics::new());
        let mut entries = BTreeMap::new();
        let mut broken = BTreeMap::new();
        let keys = list_timelines(datadir)?;
        for (key @ (tenant_id, timeline_id), recovered) in recover_in_parallel(datadir, &keys) {
            let recovered = match recovered {
                Ok(Some(recovered)) => recovered,
                Ok(None) => continue,
                Err(error) => {
                    tracing::error!(%tenant_id, %timeline_id, "timeline not served: {error}");
                    broken.insert(key, BrokenTimeline { tenant_id, timeline_id, error });
                    continue;
                }
            };
            let timeline = FileTimeline::from_recovered(recovered, config.node_id, AcceptorConfig::default());
            tracing::info!(%tenant_id, %timeline_id, flush_lsn = %timeline.acceptor().flush_lsn(), "recovered timeline");
            entries.insert(key, start(timeline, &metrics, &config));
        }
        Ok(Timelines { datadir: datadir.to_path_buf(), config, metrics, entries: Mutex::new(entries), broken })
    }

    /// Timelines that failed to load at startup, with their errors.
    pub fn broken(&self) -> Vec<BrokenTimeline> {
        self.broken.values().cloned().collect()
    }

    pub fn get_broken(&self, tenant_id: TenantId, timeline_id: TimelineId) -> Option<&BrokenTimeline> {
        self.broken.get(&(tenant_id, timeline_id))
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<TimelineKey, Arc<TimelineHandle>>> {
        // A panic while holding this lock is a bug elsewhere; the map itself
        // is always consistent (single inserts/removes), so keep serving.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, tenant_id: TenantId, timeline_id: TimelineId) -> Option<Arc<TimelineHandle>> {
        self.entries().get(&(tenant_id, timeline_id)).cloned()
    }

    pub fn list(&self) -> Vec<Arc<TimelineHandle>> {
        self.entries().values().cloned().collect()
    }

    /// The running owner of a timeline: reopened from disk if a storage
    /// error stopped it, created from `greeting` if it does not exist.
    pub async fn open_for_push(
        self: &Arc<Self>,
        cluster: ClusterId,
        greeting: Option<Greeting>,
    ) -> Result<Arc<TimelineHandle>, PgError> {
        if let Some(handle) = self.get(cluster.tenant_id, cluster.timeline_id).filter(|h| h.is_running()) {
            return Ok(handle);
        }
        let timelines = self.clone();
        tokio::task::spawn_blocking(move || timelines.open_blocking(cluster, greeting.as_ref()))
            .await
            .unwrap_or_else(|join_error| Err(internal(format!("opening the timeline panicked: {join_error}"))))
    }

    fn open_blocking(&self, cluster: ClusterId, greeting: Option<&Greeting>) -> Result<Arc<TimelineHandle>, PgError> {
        let key = (cluster.tenant_id, cluster.timeline_id);
        if let Some(broken) = self.broken.get(&key) {
            return Err(PgError::fatal(
                sqlstate::IO_ERROR,
                format!("timeline {}/{} failed to load at startup and is not served: {}", key.0, key.1, broken.error),
            ));
        }
        // Held across creation so two proposers cannot create one timeline twice.
        let mut entries = self.entries();
        let existing = entries.get(&key).cloned();
        let timeline = match existing {
            Some(handle) if handle.is_running() => return Ok(handle),
            Some(_) => self.reopen(key)?,
            None => {
                let Some(greeting) = greeting else {
                    return Err(PgError::fatal(
                        sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        format!(
                            "timeline {}/{} does not exist here; a push must begin with a Greeting to create it",
                            key.0, key.1
                        ),
                    ));
                };
                let held = entries.len() + self.broken.len();
                if held >= self.config.max_timelines {
                    tracing::warn!(
                        tenant_id = %key.0, timeline_id = %key.1, held,
                        "refusing to create a timeline: --max-timelines {} reached", self.config.max_timelines
                    );
                    return Err(PgError::fatal(
                        sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                        format!(
                            "timeline {}/{} not created: this safekeeper holds {held} timelines, the most --max-timelines {} allows",
                            key.0, key.1, self.config.max_timelines
                        ),
                    ));
                }
                self.create(greeting)?
            }
        };
        let handle = start(timeline, &self.metrics, &self.config);
        entries.insert(key, handle.clone());
        Ok(handle)
    }

    fn reopen(&self, (tenant_id, timeline_id): TimelineKey) -> Result<FileTimeline, PgError> {
        let dir = timeline_dir(&self.datadir, tenant_id, timeline_id);
        tracing::info!(%tenant_id, %timeline_id, "reopening a timeline stopped by a storage error");
        match recover_timeline(&dir) {
            Ok(Some(recovered)) => {
                Ok(FileTimeline::from_recovered(recovered, self.config.node_id, AcceptorConfig::default()))
            }
            Ok(None) => Err(internal(format!("timeline directory {} vanished", dir.display()))),
            Err(error) => Err(PgError::fatal(sqlstate::IO_ERROR, format!("reopening {}: {error}", dir.display()))),
        }
    }

    /// Create an empty timeline defined by the greeting (cluster id, Postgres
    /// version, segment size), as the importer builds a fresh one.
    fn create(&self, greeting: &Greeting) -> Result<FileTimeline, PgError> {
        let state = fresh_control_state(greeting)?;
        let cluster = greeting.cluster;
        let dir = create_timeline_dir(&self.datadir, &state).map_err(|error| {
            if error.is_fatal() {
                fail_stop(&error);
            }
            PgError::fatal(
                sqlstate::IO_ERROR,
                format!("creating timeline {}/{}: {error}", cluster.tenant_id, cluster.timeline_id),
            )
        })?;
        tracing::info!(tenant_id = %cluster.tenant_id, timeline_id = %cluster.timeline_id, system_id = %cluster.system_id, "created timeline");
        let io = |error: StorageError| PgError::fatal(sqlstate::IO_ERROR, error.to_string());
        let storage = SegmentStorage::open(&dir, state.wal_segment_size, &state.pg_timelines).map_err(io)?;
        let control = FileControlStore::new(&dir).map_err(io)?;
        let empty = RecoveredWal { end_lsn: Lsn::INVALID, decoder: None };
        let acceptor = Acceptor::new(self.config.node_id, AcceptorConfig::default(), state, empty);
        Ok(Timeline::new(acceptor, storage, control))
    }

    /// Ask every owner to finish its batch, checkpoint and stop; wait at most
    /// `timeout` for each step.
    pub async fn shutdown(&self, timeout: Duration) {
        let mut acks = Vec::new();
        for handle in self.list() {
            acks.extend(request_stop(&handle, timeout).await);
        }
        for (timeline_id, ack) in acks {
            wait_stopped(timeline_id, ack, timeout).await;
        }
    }

    /// Stop a timeline's owner and durably remove its directory: renamed to
    /// `<timeline>.deleting` (fsynced) first, so a crash midway leaves no
    /// half-deleted timeline that startup would try to recover; startup
    /// finishes such a removal. The directory goes only once the owner
    /// task has exited: one still finishing a batch would otherwise write
    /// its checkpoint into a timeline created anew at the same path.
    pub async fn delete(
        &self,
        tenant_id: TenantId,
        timeline_id: TimelineId,
        timeout: Duration,
    ) -> anyhow::Result<DeleteOutcome> {
        let Some(handle) = self.entries().remove(&(tenant_id, timeline_id)) else {
            return Ok(DeleteOutcome::NotFound);
        };
        if let Some((id, ack)) = request_stop(&handle, timeout).await {
            wait_stopped(id, ack, timeout).await;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while handle.is_running() {
            if tokio::time::Instant::now() >= deadline {
                self.entries().insert((tenant_id, timeline_id), handle);
                return Ok(DeleteOutcome::OwnerBusy);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.metrics.remove_timeline(tenant_id, timeline_id);
        let dir = handle.dir.clone();
        tokio::task::spawn_blocking(move || remove_timeline_dir(&dir)).await??;
        tracing::info!(%tenant_id, %timeline_id, "deleted timeline");
        Ok(DeleteOutcome::Deleted)
    }
}

/// What `Timelines::delete` did.
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    /// The owner did not stop in time (a slow sync); nothing was removed.
    OwnerBusy,
}

async fn request_stop(handle: &TimelineHandle, timeout: Duration) -> Option<(TimelineId, oneshot::Receiver<()>)> {
    let (done, ack) = oneshot::channel();
    let timeline_id = handle.snapshot().timeline_id;
    match tokio::time::timeout(timeout, handle.inputs.send(OwnerInput::Shutdown(done))).await {
        Ok(Ok(())) => Some((timeline_id, ack)),
        Ok(Err(_)) => None, // the owner already stopped
        Err(_) => {
            tracing::warn!(%timeline_id, "owner queue still full at shutdown");
            None
        }
    }
}

async fn wait_stopped(timeline_id: TimelineId, ack: oneshot::Receiver<()>, timeout: Duration) {
    if tokio::time::timeout(timeout, ack).await.is_err() {
        tracing::warn!(%timeline_id, "owner did not finish its batch within {timeout:?}");
    }
}

fn remove_timeline_dir(dir: &Path) -> anyhow::Result<()> {
    let parent = dir.parent().context("a timeline directory has a tenant directory")?;
    let mut doomed = dir.as_os_str().to_owned();
    doomed.push(DELETING_SUFFIX);
    fs::rename(dir, &doomed).with_context(|| format!("renaming {} for deletion", dir.display()))?;
    fsync_dir(parent)?;
    fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", Path::new(&doomed).display()))?;
    fsync_dir(parent)?;
    Ok(())
}

/// Threads recovering timelines at startup. Recovery is mostly waiting on
/// the disk (reading the last segment, fsyncing what it repairs), so more
/// threads than cores help; the bound keeps a node with thousands of
/// timelines from starting thousands of threads.
const RECOVERY_THREADS: usize = 16;

type Recovery = Result<Option<safekeeper_core::recovery::RecoveredTimeline>, String>;

/// Recover the timelines `keys` names on up to [`RECOVERY_THREADS`]
/// threads, each taking the next unrecovered one; the results come back
/// sorted by key. A node holding 1,000 timelines restarted in 3.8 s when
/// they were recovered one after another (scripts/bench-many-timelines).
fn recover_in_parallel(datadir: &Path, keys: &[TimelineKey]) -> Vec<(TimelineKey, Recovery)> {
    let next = AtomicUsize::new(0);
    let recover_some = || {
        let mut recovered = vec![];
        while let Some(&key @ (tenant_id, timeline_id)) = keys.get(next.fetch_add(1, Ordering::Relaxed)) {
            let dir = timeline_dir(datadir, tenant_id, timeline_id);
            let result = recover_timeline(&dir).map_err(|error| format!("recovering {}: {error:#}", dir.display()));
            recovered.push((key, result));
        }
        recovered
    };
    let mut results: Vec<(TimelineKey, Recovery)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..RECOVERY_THREADS.min(keys.len())).map(|_| scope.spawn(recover_some)).collect();
        // A panic in recovery is a bug: let it end startup.
        threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    results.sort_by_key(|(key, _)| *key);
    results
}

/// Start a timeline's owner task, and its peer recovery if peers are known.
fn start(timeline: FileTimeline, metrics: &Metrics, config: &TimelinesConfig) -> Arc<TimelineHandle> {
    let cluster = timeline.acceptor().state().cluster;
    let dir = timeline.wal().dir().to_path_buf();
    let shared = Arc::new(TimelineShared {
        remote_consistent_lsn: AtomicU64::new(0),
        metrics: metrics.timeline(cluster.tenant_id, cluster.timeline_id),
        last_proposer_wal: Mutex::new(None),
        peer_recovery: Mutex::default(),
    });
    let owner = spawn_owner(timeline, shared.clone(), config.retention, config.fault_sync_delay);
    let handle = Arc::new(TimelineHandle {
        inputs: owner.inputs,
        snapshot: owner.snapshot,
        task: owner.task,
        proposers: AtomicUsize::new(0),
        dir,
        shared,
        consumers: Arc::default(),
    });
    if !config.peers.is_empty() {
        peer_recovery::spawn(&handle, config);
    }
    handle
}

fn internal(message: String) -> PgError {
    PgError::fatal("XX000", message)
}

fn fresh_control_state(greeting: &Greeting) -> Result<ControlState, PgError> {
    let invalid = |message: String| PgError::fatal(sqlstate::INVALID_PARAMETER_VALUE, message);
    if !SUPPORTED_PG_VERSIONS.contains(&greeting.pg_version) {
        return Err(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("Postgres version {} is not supported: this safekeeper stores PG15 WAL", greeting.pg_version),
        ));
    }
    let wal_segment_size =
        WalSegmentSize::new(u64::from(greeting.wal_segment_size_bytes)).map_err(|e| invalid(e.to_string()))?;
    Ok(ControlState::new_timeline(greeting.cluster, greeting.pg_version, wal_segment_size))
}

/// Build `<datadir>/<tenant>/<timeline>` with its first control file under a
/// temp name, then rename it into place (see the module docs).
fn create_timeline_dir(datadir: &Path, state: &ControlState) -> Result<PathBuf, StorageError> {
    let cluster = state.cluster;
    let tenant_dir = datadir.join(cluster.tenant_id.to_string());
    let io = |what: String| move |source| StorageError::Io { what, source };
    if !tenant_dir.exists() {
        fs::create_dir(&tenant_dir).map_err(io(format!("creating {}", tenant_dir.display())))?;
        fsync_dir(datadir)?;
    }
    let final_dir = tenant_dir.join(cluster.timeline_id.to_string());
    let temp_dir = tenant_dir.join(format!("{}{CREATING_SUFFIX}", cluster.timeline_id));
    if temp_dir.exists() {
        fs::remove_dir_all(&temp_dir).map_err(io(format!("removing {}", temp_dir.display())))?;
    }
    fs::create_dir(&temp_dir).map_err(io(format!("creating {}", temp_dir.display())))?;
    // `persist` writes, fsyncs and renames the control file, then fsyncs temp_dir.
    FileControlStore::new(&temp_dir)?.persist(state)?;
    fs::rename(&temp_dir, &final_dir).map_err(io(format!("renaming {} into place", temp_dir.display())))?;
    fsync_dir(&tenant_dir)?;
    Ok(final_dir)
}

/// Remove timeline directories whose creation or deletion a crash interrupted.
fn remove_unfinished_creations(datadir: &Path) -> anyhow::Result<()> {
    for tenant in fs::read_dir(datadir).with_context(|| format!("reading {}", datadir.display()))? {
        let tenant = tenant?;
        if tenant.file_name().to_string_lossy().parse::<TenantId>().is_err() || !tenant.path().is_dir() {
            continue;
        }
        for entry in fs::read_dir(tenant.path())? {
            let path = entry?.path();
            let name = path.to_string_lossy();
            if name.ends_with(CREATING_SUFFIX) || name.ends_with(DELETING_SUFFIX) {
                tracing::info!(dir = %path.display(), "removing a timeline directory whose creation or deletion was interrupted");
                fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
                fsync_dir(&tenant.path())?;
            }
        }
    }
    Ok(())
}

/// `(tenant, timeline)` pairs: directories named by 32-hex ids, two deep.
pub fn list_timelines(datadir: &Path) -> anyhow::Result<Vec<(TenantId, TimelineId)>> {
    let mut found = vec![];
    for tenant in fs::read_dir(datadir).with_context(|| format!("reading {}", datadir.display()))? {
        let tenant = tenant?;
        let Ok(tenant_id) = tenant.file_name().to_string_lossy().parse::<TenantId>() else { continue };
        for timeline in fs::read_dir(tenant.path())? {
            if let Ok(timeline_id) = timeline?.file_name().to_string_lossy().parse::<TimelineId>() {
                found.push((tenant_id, timeline_id));
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekeeper_core::storage::control_file::CONTROL_FILE_NAME;
    use safekeeper_protocol::ids::SystemId;
    use safekeeper_protocol::membership::MembershipGeneration;
    use safekeeper_protocol::protocol::PROTOCOL_VERSION;

    const SEGMENT_SIZE_BYTES: u32 = 1 << 20;

    fn cluster(timeline: u8) -> ClusterId {
        ClusterId { system_id: SystemId(77), tenant_id: TenantId([7; 16]), timeline_id: TimelineId([timeline; 16]) }
    }

    fn greeting(cluster: ClusterId) -> Greeting {
        Greeting {
            protocol_version: PROTOCOL_VERSION,
            cluster,
            pg_version: 150000,
            wal_segment_size_bytes: SEGMENT_SIZE_BYTES,
            proposer_id: [1; 16],
            generation: MembershipGeneration::NOT_SET,
            pg_timeline: 1,
        }
    }

    fn config(max_timelines: usize) -> TimelinesConfig {
        TimelinesConfig {
            node_id: NodeId(1),
            retention: RetentionPolicy::default(),
            peers: Arc::from([]),
            peer_auth_token_file: None,
            peer_tls: None,
            max_timelines,
            fault_sync_delay: Duration::ZERO,
        }
    }

    /// Rules: a timeline that fails to recover at startup is reported
    /// broken with its error while the others serve (it is refused to
    /// proposers, never created anew over); `--max-timelines` counts it,
    /// and a Greeting past the limit is refused with SQLSTATE 53400.
    #[tokio::test]
    async fn a_broken_timeline_is_reported_while_the_others_serve_up_to_the_limit() {
        let datadir = tempfile::tempdir().unwrap();
        let state = |timeline| fresh_control_state(&greeting(cluster(timeline))).unwrap();
        create_timeline_dir(datadir.path(), &state(1)).unwrap();
        let damaged = create_timeline_dir(datadir.path(), &state(2)).unwrap();
        fs::write(damaged.join(CONTROL_FILE_NAME), b"not a control file").unwrap();

        let timelines = Arc::new(Timelines::recover_all(datadir.path(), config(3)).unwrap());
        let served: Vec<TimelineId> = timelines.list().iter().map(|handle| handle.snapshot().timeline_id).collect();
        assert_eq!(served, vec![TimelineId([1; 16])]);
        let broken = timelines.broken();
        assert_eq!(broken.len(), 1);
        assert_eq!(broken[0].timeline_id, TimelineId([2; 16]));
        assert!(broken[0].error.contains(CONTROL_FILE_NAME), "the error names what failed: {}", broken[0].error);

        let refused = timelines.open_for_push(cluster(2), Some(greeting(cluster(2)))).await.err().unwrap();
        assert_eq!(refused.code, sqlstate::IO_ERROR);
        assert!(refused.message.contains("failed to load at startup"), "{refused}");
        assert!(timelines.open_for_push(cluster(1), None).await.is_ok(), "the healthy one serves");

        // Two held (one served, one broken): room for one more.
        assert!(timelines.open_for_push(cluster(3), Some(greeting(cluster(3)))).await.is_ok());
        let refused = timelines.open_for_push(cluster(4), Some(greeting(cluster(4)))).await.err().unwrap();
        assert_eq!(refused.code, sqlstate::CONFIGURATION_LIMIT_EXCEEDED, "{refused}");
        assert!(refused.message.contains("--max-timelines 3"), "{refused}");
        assert!(!timeline_dir(datadir.path(), TenantId([7; 16]), TimelineId([4; 16])).exists(), "nothing created");
        timelines.shutdown(Duration::from_secs(10)).await;
        // The owner acknowledges the shutdown, then its task ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while timelines.list().iter().any(|handle| handle.is_running()) {
            assert!(tokio::time::Instant::now() < deadline, "every owner task stops");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
