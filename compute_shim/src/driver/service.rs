//! The shim as a long-running service around runs of the driver's loop.
//!
//! A run connects to Postgres, campaigns in a new term and streams. When it
//! ends with an error, [`ShimError::verdict`] says whether to end the
//! process (a refusal no retry can fix, with its exit status) or to start
//! a new run after a backoff: a Postgres restart, a broken or ended
//! replication stream, a Postgres briefly unreachable, log holders out of
//! reach. A new run is a new term (the proposer starts over from what the
//! safekeepers hold), so nothing a failed run left half done can be
//! mistaken for committed. The HTTP port, its status and the membership
//! requests outlive the runs.
//!
//! SIGTERM/SIGINT (the `stop` flag): a run steps down (no more WAL taken,
//! what was taken committed, within `--step-down-timeout-ms`); between
//! runs the service stops at once, having nothing in flight.

use tokio::sync::{mpsc, watch};

use super::exit::{ShimExit, Verdict};
use super::startup::{connect_postgres, ShimOptions};
use super::{run, stop_requested, MembershipRequest, RunContext, ServiceState, ServiceStatus, ShimError, ShimStatus};
use crate::node::SteppedDown;

/// How the service ended.
#[derive(Debug)]
pub enum ServiceEnd {
    /// Asked to stop; `None` when no run was under way.
    SteppedDown(Option<SteppedDown>),
    /// A refusal that ends the process.
    Exit(ShimExit, ShimError),
}

/// Run the shim until it is asked to stop or refused.
pub async fn run_service(
    options: &ShimOptions,
    status: &watch::Sender<ShimStatus>,
    membership_requests: &mut mpsc::Receiver<MembershipRequest>,
    stop: &mut watch::Receiver<bool>,
) -> ServiceEnd {
    let mut backoff = options.links.backoff();
    let mut service = ServiceStatus::default();
    loop {
        service.state = ServiceState::ConnectingToPostgres;
        status.send_modify(|snapshot| snapshot.service = service.clone());
        let Some(setup) = between_runs(connect_postgres(options), membership_requests, stop).await else {
            return ServiceEnd::SteppedDown(None);
        };
        let ended = match setup {
            Ok(setup) => {
                tracing::info!(system_id = %setup.cluster.system_id, timeline_start = %setup.timeline_start_lsn,
                    postgres_flush = %setup.pg_flush_lsn, "connected to Postgres; campaigning");
                service.state = ServiceState::Running;
                let context = RunContext {
                    status,
                    membership_requests: &mut *membership_requests,
                    stop: &mut *stop,
                    links: options.links.clone(),
                    step_down_timeout_ms: options.step_down_timeout_ms,
                    service: service.clone(),
                };
                run(setup, context).await
            }
            Err(error) => Err(error),
        };
        let error = match ended {
            Ok(stepped_down) => return ServiceEnd::SteppedDown(Some(stepped_down)),
            Err(error) => error,
        };
        if let Verdict::Exit(exit) = error.verdict() {
            return ServiceEnd::Exit(exit, error);
        }
        // A run that got as far as streaming was a working setup: the
        // outage that ended it gets a quick first retry again.
        if status.borrow().streaming_from_lsn.is_some() {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(retry_in_ms = delay.as_millis() as u64, "{error}; retrying in a new term");
        service.restarts += 1;
        service.last_error = Some(error.to_string());
        service.state = ServiceState::WaitingToRetry;
        status.send_modify(|snapshot| {
            // What the failed run knew of Postgres and the proposer is gone.
            *snapshot = ShimStatus {
                service: service.clone(),
                tenant_id: options.tenant_id,
                timeline_id: options.timeline_id,
                slot: options.slot.clone(),
                safekeeper_addrs: options.safekeepers.clone(),
                ..ShimStatus::default()
            };
        });
        if between_runs(tokio::time::sleep(delay), membership_requests, stop).await.is_none() {
            return ServiceEnd::SteppedDown(None);
        }
    }
}

/// Wait for `work` outside a run: `None` if asked to stop first. No
/// proposer can take a membership request meanwhile: each is dropped at
/// once, which its HTTP caller gets as 503 (retry), rather than waiting
/// for a Postgres that may be down for long.
async fn between_runs<T>(
    work: impl std::future::Future<Output = T>,
    membership_requests: &mut mpsc::Receiver<MembershipRequest>,
    stop: &mut watch::Receiver<bool>,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            () = stop_requested(stop) => return None,
            Some(request) = membership_requests.recv() => drop(request),
        }
    }
}
