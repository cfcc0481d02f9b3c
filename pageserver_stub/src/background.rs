//! The tasks that run beside the pull loop: one status poller per
//! safekeeper, the feedback reporter, and the status HTTP server.
//!
//! Pollers run independently so a hung safekeeper delays only its own
//! status; each publishes its latest result into a watch channel, which
//! keeps exactly one value per safekeeper (bounded by construction).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use postgres_wal::lsn::Lsn;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::api::{SafekeeperAddress, TimelineStatus};
use crate::http::{self, StubStatus};
use crate::pull::{PullError, SafekeeperClient};

/// The latest status poll of one safekeeper.
#[derive(Clone, Debug)]
pub struct StatusPoll {
    pub at: Instant,
    pub result: Result<TimelineStatus, String>,
}

/// One entry per safekeeper, `None` until its first poll completes.
pub type StatusPolls = Vec<Option<StatusPoll>>;

/// Poll `address`'s timeline status every `interval_ms`, forever.
pub async fn poll_status_forever(
    client: SafekeeperClient,
    address: SafekeeperAddress,
    index: usize,
    polls: watch::Sender<StatusPolls>,
    interval_ms: u64,
    timeout_ms: u64,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = client.timeline_status(&address, timeout_ms).await.map_err(|error| error.to_string());
        let poll = StatusPoll { at: Instant::now(), result };
        polls.send_modify(|polls| polls[index] = Some(poll));
    }
}

/// How soon a position that did not land on every safekeeper (one down,
/// or not committed that far yet) is sent again when no newer one comes.
const FEEDBACK_RETRY: Duration = Duration::from_secs(1);

/// POST every newly saved position to every safekeeper, until the sender
/// is dropped. Intermediate positions are skipped when rounds are slower
/// than saves: only the latest matters. A position some safekeeper did not
/// take is sent again every [`FEEDBACK_RETRY`] until all have it, so an
/// idle stub's last position still reaches a safekeeper that was behind.
pub async fn report_feedback_forever(
    client: SafekeeperClient,
    addresses: Vec<SafekeeperAddress>,
    mut saved: watch::Receiver<Option<Lsn>>,
    timeout_ms: u64,
) {
    let mut failing = vec![false; addresses.len()];
    let mut all_landed = true;
    loop {
        let retry = async {
            if all_landed {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(FEEDBACK_RETRY).await;
        };
        tokio::select! {
            changed = saved.changed() => if changed.is_err() { return },
            () = retry => {}
        }
        let latest = *saved.borrow_and_update();
        if let Some(lsn) = latest {
            all_landed = send_feedback_round(&client, &addresses, lsn, timeout_ms, &mut failing).await;
        }
    }
}

/// One round of feedback to every safekeeper, concurrently; whether every
/// one took it. Best effort: a failure is logged when a safekeeper starts
/// failing and when it recovers, not on every save.
pub async fn send_feedback_round(
    client: &SafekeeperClient,
    addresses: &[SafekeeperAddress],
    remote_consistent_lsn: Lsn,
    timeout_ms: u64,
    failing: &mut [bool],
) -> bool {
    let sends = addresses.iter().map(|address| client.send_feedback(address, remote_consistent_lsn, timeout_ms));
    let results = join_all(sends).await;
    let all_landed = results.iter().all(Result::is_ok);
    for ((address, result), was_failing) in addresses.iter().zip(results).zip(failing.iter_mut()) {
        match result {
            Ok(()) => {
                if *was_failing {
                    tracing::info!(safekeeper = %address, lsn = %remote_consistent_lsn, "feedback is accepted again");
                }
                tracing::debug!(safekeeper = %address, lsn = %remote_consistent_lsn, "sent remote_consistent_lsn");
                *was_failing = false;
            }
            // This safekeeper has not committed that far yet (the stub
            // reads from whichever is ahead): not a failure to report; the
            // position is sent again (see `report_feedback_forever`).
            Err(PullError::Status { status: 409, .. }) => {
                tracing::debug!(safekeeper = %address, lsn = %remote_consistent_lsn, "feedback ahead of the safekeeper's commit LSN");
            }
            Err(error) => {
                if !*was_failing {
                    tracing::warn!(safekeeper = %address, lsn = %remote_consistent_lsn, %error,
                        "sending feedback failed; retrying with every later save");
                }
                *was_failing = true;
            }
        }
    }
    all_landed
}

/// Most connections the status port holds at once.
const MAX_STATUS_CONNECTIONS: usize = 64;

/// The status port (HTTPS with `tls`), with the shared accept loop's
/// connection cap and timeouts; runs until aborted.
pub async fn serve_status(
    listener: TcpListener,
    status: watch::Receiver<StubStatus>,
    tls: Option<std::sync::Arc<net::tls::ServerTls>>,
    allow_plaintext: bool,
) {
    let options = net::http_server::HttpServerOptions::plain(MAX_STATUS_CONNECTIONS).with_tls(tls, allow_plaintext);
    let (_serve_forever, stop) = watch::channel(false);
    net::http_server::serve(listener, http::router(status), options, stop).await;
}
