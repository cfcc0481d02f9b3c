//! The shim's WAL push link against a real `safekeeper` process.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use compute_shim::safekeeper_link::{connect, LinkCredentials, LinkError};
use compute_shim::tcp_liveness::TcpLiveness;
use integration_tests::processes::Safekeeper;
use postgres_wal::lsn::WalSegmentSize;
use postgres_wal::wal::format::PG15_VERSION_NUM;
use safekeeper_protocol::ids::{ClusterId, NodeId, SystemId, TenantId, Term, TimelineId};
use safekeeper_protocol::membership::MembershipGeneration;
use safekeeper_protocol::protocol::{AcceptorMessage, Greeting, ProposerMessage, VoteRequest, PROTOCOL_VERSION};

const CONNECT_TIMEOUT_MS: u64 = 5_000;
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn cluster(system_id: u64) -> Result<ClusterId> {
    Ok(ClusterId {
        system_id: SystemId(system_id),
        tenant_id: "11111111111111111111111111111111".parse()?,
        timeline_id: "22222222222222222222222222222222".parse()?,
    })
}

fn greeting(cluster: ClusterId) -> ProposerMessage {
    ProposerMessage::Greeting(Greeting {
        protocol_version: PROTOCOL_VERSION,
        cluster,
        pg_version: PG15_VERSION_NUM,
        wal_segment_size_bytes: WalSegmentSize::DEFAULT.bytes() as u32,
        proposer_id: [1; 16],
        generation: MembershipGeneration::NOT_SET,
        pg_timeline: 1,
    })
}

#[tokio::test]
async fn link_greets_votes_and_reports_refusals() -> Result<()> {
    let datadir = tempfile::tempdir()?;
    let safekeeper = Safekeeper::start(7, &datadir.path().join("sk"))?;
    let addr = safekeeper.pg_addr.to_string();
    let ours = cluster(42)?;
    let (tenant_id, timeline_id): (TenantId, TimelineId) = (ours.tenant_id, ours.timeline_id);

    let (mut reader, mut writer) =
        connect(&addr, tenant_id, timeline_id, CONNECT_TIMEOUT_MS, &TcpLiveness::default(), LinkCredentials::default())
            .await?;
    writer.send(&greeting(ours)).await?;
    match tokio::time::timeout(REPLY_TIMEOUT, reader.next_message()).await?? {
        AcceptorMessage::GreetingResponse(response) => ensure!(response.node_id == NodeId(7)),
        other => bail!("expected a greeting response, got {other:?}"),
    }
    writer
        .send(&ProposerMessage::VoteRequest(VoteRequest {
            cluster: ours,
            term: Term(3),
            generation: MembershipGeneration::NOT_SET,
            pg_timeline: 1,
        }))
        .await?;
    match tokio::time::timeout(REPLY_TIMEOUT, reader.next_message()).await?? {
        AcceptorMessage::VoteResponse(vote) => ensure!(vote.vote_given && vote.term == Term(3)),
        other => bail!("expected a vote, got {other:?}"),
    }

    // Another cluster's proposer on the same timeline is refused with a clear error.
    let (mut reader, mut writer) =
        connect(&addr, tenant_id, timeline_id, CONNECT_TIMEOUT_MS, &TcpLiveness::default(), LinkCredentials::default())
            .await?;
    writer.send(&greeting(cluster(43)?)).await?;
    match tokio::time::timeout(REPLY_TIMEOUT, reader.next_message()).await? {
        Err(LinkError::Wire { source, .. }) => {
            ensure!(source.to_string().contains("cluster"), "unclear refusal: {source}");
        }
        other => bail!("expected a refusal, got {other:?}"),
    }

    // Nothing listening (a reserved port never listens): a bounded connect
    // error, not a hang.
    let closed = integration_tests::fixture::PortReservation::new()?.port();
    let result = connect(
        &format!("127.0.0.1:{closed}"),
        tenant_id,
        timeline_id,
        CONNECT_TIMEOUT_MS,
        &TcpLiveness::default(),
        LinkCredentials::default(),
    )
    .await;
    ensure!(result.is_err(), "connecting to a closed port must fail");
    Ok(())
}
