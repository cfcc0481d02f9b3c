//! Test support: generated WAL, fake safekeepers that serve it per
//! docs/http-api.md (status, long-polled chunked WAL, feedback, 410), with
//! faults on demand, and a stub run as a task.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use integration_tests::fixture::wait_for_async;
use pageserver_stub::api;
use pageserver_stub::{RunSummary, StubConfig, Tuning};
use postgres_wal::lsn::{Lsn, WalSegmentSize};
use postgres_wal::wal::generator::WalGenerator;
use postgres_wal::wal::DecodedRecord;
use safekeeper_protocol::ids::{TenantId, TimelineId};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};

pub const SYSTEM_ID: u64 = 7_300_000_000_000_000_001;
pub const TENANT: &str = "0123456789abcdef0123456789abcdef";
pub const TIMELINE: &str = "fedcba9876543210fedcba9876543210";
/// Small segments so that lagging "more than a segment" is quick to reach.
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// Any test waiting longer than this for the stub has failed.
pub const TEST_DEADLINE_MS: u64 = 20_000;

pub fn segment_size() -> WalSegmentSize {
    WalSegmentSize::new(SEGMENT_BYTES).unwrap()
}

/// WAL a fake serves, and the records the generator says it holds.
#[derive(Clone)]
pub struct GeneratedWal {
    pub start: Lsn,
    pub bytes: Bytes,
    pub records: Vec<DecodedRecord>,
}

impl GeneratedWal {
    /// About 3 MiB from segment 1: records crossing pages, a 200 KiB
    /// record, an XLOG SWITCH, more records in the next segments.
    pub fn generate(seed: u64) -> GeneratedWal {
        let start = Lsn(SEGMENT_BYTES);
        let mut generator = WalGenerator::new(SYSTEM_ID, segment_size(), start);
        let mut records = generator.append_random_records(500, seed, 5000);
        records.push(generator.append_record(10, 0, 7, &vec![0x5A; 200 << 10]));
        records.push(generator.append_switch());
        records.extend(generator.append_random_records(500, seed + 1, 5000));
        let (from, bytes) = generator.take_bytes();
        assert_eq!(from, start);
        GeneratedWal { start, bytes: Bytes::from(bytes), records }
    }

    pub fn end(&self) -> Lsn {
        self.start + self.bytes.len() as u64
    }

    pub fn switch_record(&self) -> &DecodedRecord {
        self.records.iter().find(|record| record.is_switch()).expect("the generated WAL has a switch")
    }
}

/// What goes wrong with a fake, once it has served `after_bytes` of WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The body in flight ends abruptly; new connections are refused and
    /// pooled ones answer 503.
    Crash {
        after_bytes: u64,
    },
    /// Everything stops answering, the body in flight included.
    Hang {
        after_bytes: u64,
    },
}

struct FakeState {
    wal: GeneratedWal,
    commit: watch::Sender<Lsn>,
    oldest_kept: Mutex<Lsn>,
    /// Leave `oldest_kept_lsn` out of the status (it is optional), so only
    /// a WAL request finds out (410).
    hide_oldest_kept: AtomicBool,
    fault: Fault,
    served_bytes: AtomicU64,
    dead: AtomicBool,
    hung: AtomicBool,
    feedback: Mutex<Vec<Lsn>>,
    accept_loop: OnceLock<AbortHandle>,
    /// Largest body chunk; chunk sizes vary below it.
    max_chunk_bytes: u64,
}

impl FakeState {
    fn die(&self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Some(accept_loop) = self.accept_loop.get() {
            accept_loop.abort();
        }
    }
}

pub struct FakeSafekeeper {
    pub address: SocketAddr,
    state: Arc<FakeState>,
    server: JoinHandle<()>,
}

impl Drop for FakeSafekeeper {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeSafekeeper {
    pub async fn start(wal: &GeneratedWal, commit: Lsn, fault: Fault) -> FakeSafekeeper {
        let state = Arc::new(FakeState {
            wal: wal.clone(),
            commit: watch::Sender::new(commit),
            oldest_kept: Mutex::new(wal.start),
            hide_oldest_kept: AtomicBool::new(false),
            fault,
            served_bytes: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            hung: AtomicBool::new(false),
            feedback: Mutex::new(Vec::new()),
            accept_loop: OnceLock::new(),
            max_chunk_bytes: 20_000,
        });
        let timeline = "/v1/tenant/{tenant_id}/timeline/{timeline_id}";
        let app = Router::new()
            .route(timeline, get(timeline_status))
            .route(&format!("{timeline}/wal"), get(wal_range))
            .route(&format!("{timeline}/feedback"), post(feedback))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        state.accept_loop.set(server.abort_handle()).unwrap();
        FakeSafekeeper { address, state, server }
    }

    /// Commit more WAL (never past the generated end, never backwards).
    pub fn advance_commit(&self, bytes: u64) {
        let end = self.state.wal.end();
        self.state.commit.send_modify(|commit| *commit = (*commit + bytes).min(end));
    }

    pub fn set_commit(&self, lsn: Lsn) {
        self.state.commit.send_modify(|commit| *commit = (*commit).max(lsn));
    }

    pub fn commit(&self) -> Lsn {
        *self.state.commit.borrow()
    }

    pub fn set_oldest_kept(&self, lsn: Lsn) {
        *self.state.oldest_kept.lock().unwrap() = lsn;
    }

    pub fn hide_oldest_kept_in_status(&self) {
        self.state.hide_oldest_kept.store(true, Ordering::SeqCst);
    }

    pub fn feedback(&self) -> Vec<Lsn> {
        self.state.feedback.lock().unwrap().clone()
    }

    pub fn served_bytes(&self) -> u64 {
        self.state.served_bytes.load(Ordering::SeqCst)
    }

    pub fn is_dead(&self) -> bool {
        self.state.dead.load(Ordering::SeqCst)
    }

    pub fn is_hung(&self) -> bool {
        self.state.hung.load(Ordering::SeqCst)
    }

    pub fn http_address(&self) -> String {
        self.address.to_string()
    }
}

/// Commit `step_bytes[i]` more on fake `i` every 10 ms until all are at the end.
pub fn spawn_commit_writer(fakes: Vec<Arc<FakeSafekeeper>>, step_bytes: Vec<u64>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        loop {
            ticker.tick().await;
            for (fake, step) in fakes.iter().zip(&step_bytes) {
                fake.advance_commit(*step);
            }
        }
    })
}

fn json_error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Dead or hung fakes answer like a dead or hung process would.
async fn fault_gate(state: &FakeState) -> Option<Response> {
    if state.hung.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if state.dead.load(Ordering::SeqCst) {
        return Some(json_error(StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_string()));
    }
    None
}

fn check_ids(tenant_id: &str, timeline_id: &str) -> Option<Response> {
    if tenant_id != TENANT || timeline_id != TIMELINE {
        return Some(json_error(StatusCode::NOT_FOUND, format!("no timeline {tenant_id}/{timeline_id}")));
    }
    None
}

async fn timeline_status(
    State(state): State<Arc<FakeState>>,
    UrlPath((tenant_id, timeline_id)): UrlPath<(String, String)>,
) -> Response {
    if let Some(answer) = fault_gate(&state).await.or_else(|| check_ids(&tenant_id, &timeline_id)) {
        return answer;
    }
    let commit = *state.commit.borrow();
    let oldest_kept = *state.oldest_kept.lock().unwrap();
    let mut status = json!({
        "tenant_id": tenant_id,
        "timeline_id": timeline_id,
        "system_id": SYSTEM_ID,
        "pg_version": 150000,
        "wal_seg_size": SEGMENT_BYTES,
        "term": 1,
        "timeline_start_lsn": state.wal.start,
        "flush_lsn": commit,
        "commit_lsn": commit,
        "oldest_kept_lsn": oldest_kept,
    });
    if state.hide_oldest_kept.load(Ordering::SeqCst) {
        status.as_object_mut().unwrap().remove("oldest_kept_lsn");
    }
    Json(status).into_response()
}

async fn feedback(
    State(state): State<Arc<FakeState>>,
    UrlPath((tenant_id, timeline_id)): UrlPath<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    if let Some(answer) = fault_gate(&state).await.or_else(|| check_ids(&tenant_id, &timeline_id)) {
        return answer;
    }
    let Some(lsn) = body["remote_consistent_lsn"].as_str().and_then(|text| text.parse::<Lsn>().ok()) else {
        return json_error(StatusCode::BAD_REQUEST, format!("bad feedback {body}"));
    };
    state.feedback.lock().unwrap().push(lsn);
    Json(json!({ "remote_consistent_lsn": lsn })).into_response()
}

async fn wal_range(
    State(state): State<Arc<FakeState>>,
    UrlPath((tenant_id, timeline_id)): UrlPath<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Some(answer) = fault_gate(&state).await.or_else(|| check_ids(&tenant_id, &timeline_id)) {
        return answer;
    }
    let lsn_param = |name: &str| params.get(name).map(|text| text.parse::<Lsn>());
    let (start, end_limit) = match (lsn_param("start_lsn"), lsn_param("end_lsn")) {
        (Some(Ok(start)), None) => (start, Lsn(u64::MAX)),
        (Some(Ok(start)), Some(Ok(end))) if end >= start => (start, end),
        _ => return json_error(StatusCode::BAD_REQUEST, format!("bad query {params:?}")),
    };
    let wait_ms: u64 = params.get("wait_ms").and_then(|text| text.parse().ok()).unwrap_or(0).min(60_000);
    let oldest_kept = *state.oldest_kept.lock().unwrap();
    if start < oldest_kept || start < state.wal.start {
        return json_error(StatusCode::GONE, format!("WAL below {oldest_kept} was removed"));
    }
    let mut commits = state.commit.subscribe();
    if wait_ms > 0 {
        let passed = commits.wait_for(|&commit| commit > start);
        let _ = tokio::time::timeout(Duration::from_millis(wait_ms), passed).await;
    }
    let commit = *commits.borrow();
    let end = end_limit.min(commit).max(start);
    let from = usize::try_from(start - state.wal.start).unwrap();
    let to = usize::try_from(end - state.wal.start).unwrap();
    let stream = futures_util::stream::unfold(
        BodyCursor { state: state.clone(), offset: from, end: to, rng: start.0 },
        BodyCursor::next_chunk,
    );
    Response::builder()
        .header(api::HEADER_START_LSN, start.to_string())
        .header(api::HEADER_END_LSN, end.to_string())
        .header(api::HEADER_COMMIT_LSN, commit.to_string())
        .header(api::HEADER_FLUSH_LSN, commit.to_string())
        .header(api::HEADER_TERM, "1")
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Streams `wal.bytes[offset..end]` in chunks of varying size, applying the fault.
struct BodyCursor {
    state: Arc<FakeState>,
    offset: usize,
    end: usize,
    rng: u64,
}

impl BodyCursor {
    async fn next_chunk(mut self) -> Option<(Result<Bytes, std::io::Error>, BodyCursor)> {
        if self.offset >= self.end {
            return None;
        }
        // SplitMix64: chunk sizes depend only on the start LSN.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mixed = (self.rng ^ (self.rng >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let mut take = (1 + (mixed ^ (mixed >> 29)) % self.state.max_chunk_bytes).min((self.end - self.offset) as u64);
        let served = self.state.served_bytes.load(Ordering::SeqCst);
        match self.state.fault {
            Fault::None => {}
            Fault::Crash { after_bytes } | Fault::Hang { after_bytes } if served >= after_bytes => {
                if let Fault::Hang { .. } = self.state.fault {
                    self.state.hung.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                self.state.die();
                self.offset = self.end;
                return Some((Err(std::io::Error::other("the fake safekeeper crashed")), self));
            }
            Fault::Crash { after_bytes } | Fault::Hang { after_bytes } => take = take.min(after_bytes - served),
        }
        // Let other tasks run between chunks, as a real server's writes do.
        tokio::task::yield_now().await;
        self.state.served_bytes.fetch_add(take, Ordering::SeqCst);
        let chunk = self.state.wal.bytes.slice(self.offset..self.offset + take as usize);
        self.offset += take as usize;
        Some((Ok(chunk), self))
    }
}

/// Time limits short enough for tests, long enough for a loaded machine.
pub fn test_tuning() -> Tuning {
    Tuning {
        status_poll_interval_ms: 50,
        status_timeout_ms: 300,
        status_fresh_ms: 500,
        connect_timeout_ms: 300,
        long_poll_wait_ms: 100,
        silence_timeout_ms: 600,
        request_timeout_ms: 10_000,
        max_response_bytes: 512 << 10,
        lag_grace_ms: 200,
        failure_cooldown_ms: 300,
        min_save_interval_ms: 50,
        feedback_timeout_ms: 300,
        housekeeping_interval_ms: 20,
    }
}

/// A stub running as a task, with its record log and status address.
pub struct RunningStub {
    pub status_address: SocketAddr,
    pub records: Arc<Mutex<Vec<DecodedRecord>>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<RunSummary>>,
}

impl RunningStub {
    pub async fn start(fakes: &[Arc<FakeSafekeeper>], datadir: &Path) -> RunningStub {
        RunningStub::start_with(fakes, datadir, test_tuning()).await
    }

    pub async fn start_with(fakes: &[Arc<FakeSafekeeper>], datadir: &Path, tuning: Tuning) -> RunningStub {
        // The stub's log, shown for failing tests (or with --nocapture).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let records = Arc::new(Mutex::new(Vec::new()));
        let log = records.clone();
        let config = StubConfig {
            safekeepers: fakes.iter().map(|fake| fake.http_address().parse().unwrap()).collect(),
            tenant_id: TENANT.parse::<TenantId>().unwrap(),
            timeline_id: TIMELINE.parse::<TimelineId>().unwrap(),
            datadir: PathBuf::from(datadir),
            tuning,
            record_observer: Some(Arc::new(move |record: &DecodedRecord| log.lock().unwrap().push(record.clone()))),
            auth_token_file: None,
            tls: None,
            status_tls: None,
            status_allow_plaintext: false,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let status_address = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(pageserver_stub::run(config, listener, async move {
            let _ = stopped.await;
        }));
        RunningStub { status_address, records, stop: Some(stop), task }
    }

    /// `GET /v1/status` of the stub.
    pub async fn status(&self) -> Value {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri = format!("http://{}/v1/status", self.status_address).parse().unwrap();
        let response = client.get(uri).await.expect("the stub's status port answers");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    /// Poll the status until `done` holds; panics after the test deadline.
    pub async fn wait_for_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let waited = wait_for_async(Duration::from_millis(TEST_DEADLINE_MS), what, || async {
            assert!(!self.task.is_finished(), "the stub stopped while waiting for {what}");
            let status = self.status().await;
            anyhow::Ok(done(&status).then_some(status))
        })
        .await;
        match waited {
            Ok(status) => status,
            Err(error) => panic!("{error}; last status: {:#}", self.status().await),
        }
    }

    /// Signal shutdown and return the run's result.
    pub async fn stop(mut self) -> anyhow::Result<RunSummary> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.finish().await
    }

    /// The run's result, for a run expected to end by itself.
    pub async fn finish(self) -> anyhow::Result<RunSummary> {
        tokio::time::timeout(Duration::from_millis(TEST_DEADLINE_MS), self.task)
            .await
            .expect("the stub ends within the test deadline")
            .expect("the stub task does not panic")
    }

    pub fn records(&self) -> Vec<DecodedRecord> {
        self.records.lock().unwrap().clone()
    }
}

pub fn lsn_field(status: &Value, name: &str) -> Option<Lsn> {
    status[name].as_str().and_then(|text| text.parse().ok())
}

/// Records and bytes per pg_waldump rmgr name, as the stub should count them.
pub fn expected_per_rmgr(records: &[DecodedRecord]) -> Value {
    let mut per_rmgr = serde_json::Map::new();
    for record in records {
        let name = pageserver_stub::stats::rmgr_name(record.rmgr_id);
        let entry = per_rmgr.entry(name).or_insert_with(|| json!({ "records": 0, "bytes": 0 }));
        entry["records"] = json!(entry["records"].as_u64().unwrap() + 1);
        entry["bytes"] = json!(entry["bytes"].as_u64().unwrap() + u64::from(record.total_len_bytes));
    }
    Value::Object(per_rmgr)
}
