//! Talking to a stack: gRPC channels, health, and the jobs the tests create.

use std::net::SocketAddr;
use std::time::Duration;

use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{CreateJobRequest, Job};
use keel_shared::testing;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{CALL_TIMEOUT, WAIT};

/// A channel that connects lazily and reconnects by itself after restarts;
/// every call on it has the [`CALL_TIMEOUT`] deadline.
pub fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL_TIMEOUT)
        .connect_lazy()
}

/// `http://a,http://b,...`: the URL form of several replicas of one service
/// (KEEL_JOBS_URL and the CLI's URLs).
pub fn urls(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A channel spreading its calls over the replicas at `addrs` (Keel's
/// client-side load balancing, `grpc_client::balanced_channel`); every call
/// on it has the [`CALL_TIMEOUT`] deadline.
pub fn balanced_channel(addrs: &[SocketAddr]) -> keel_shared::grpc_client::BalancedChannel {
    let endpoints = keel_shared::grpc_client::client_endpoints(&urls(addrs), &Default::default())
        .expect("endpoints")
        .into_iter()
        .map(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .timeout(CALL_TIMEOUT)
        })
        .collect();
    keel_shared::grpc_client::balanced_channel(endpoints)
}

/// A lazily connecting channel without a per-call deadline (for streams).
pub fn stream_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// The health of "" at `addr`, or None when it does not answer.
pub async fn health(addr: SocketAddr) -> Option<ServingStatus> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await.ok()?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(reply.into_inner().status())
}

/// Waits (up to [`WAIT`]) until `addr` reports `want`.
pub async fn wait_health(addr: SocketAddr, want: ServingStatus, what: &str) {
    testing::eventually(
        WAIT,
        &format!("{what} at {addr} to be {want:?}"),
        || async {
            let status = health(addr).await;
            if status != Some(want) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            status == Some(want)
        },
    )
    .await;
}

/// A CreateJob request of `kind` with `payload`.
pub fn job_request(kind: &str, payload: &Value, max_attempts: i32) -> CreateJobRequest {
    CreateJobRequest {
        kind: kind.into(),
        payload: Some(keel_shared::json::json_to_struct(payload)),
        max_attempts,
        ..Default::default()
    }
}

/// The i-th job of a mixed load: even ones `echo`, odd ones `sleep` of 50..300 ms.
pub fn mixed_job(i: usize) -> CreateJobRequest {
    if i.is_multiple_of(2) {
        job_request("echo", &serde_json::json!({ "i": i }), 20)
    } else {
        let ms = 50 + (i * 37) % 251;
        job_request("sleep", &serde_json::json!({ "ms": ms }), 20)
    }
}

pub async fn create_job(
    client: &JobsServiceClient<Channel>,
    token: &str,
    request: CreateJobRequest,
) -> Result<Job, tonic::Status> {
    client
        .clone()
        .create_job(testing::authed(request, token))
        .await
        .map(|r| r.into_inner().job.expect("CreateJob returns the job"))
}

/// A fresh database with one user, and that user's access token.
pub async fn tenant(email: &str) -> (testing::TestDb, String) {
    let db = testing::TestDb::new().await;
    let user = db.create_user(email).await;
    (db, testing::user_token(user, email))
}
