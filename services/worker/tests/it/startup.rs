//! Start-up and health: SERVING only while Redis and the jobs service answer;
//! an outage of the jobs service is ridden out.

use std::net::SocketAddr;

use keel_proto::jobs::v1::JobStatus;
use keel_shared::testing::{self, TestRedis, eventually};
use keel_worker::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{Env, WAIT, WORKER_TOKEN};

async fn status(addr: SocketAddr) -> ServingStatus {
    HealthClient::new(testing::channel(addr).await)
        .check(HealthCheckRequest::default())
        .await
        .expect("health check")
        .into_inner()
        .status()
}

#[tokio::test]
async fn serves_health_and_reflection_once_ready() {
    let env = Env::start().await;
    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;
    testing::assert_serving_with_reflection(worker.health_addr, &[]).await;
    worker.stop().await;
}

#[tokio::test]
async fn missing_worker_token_stops_start_up_naming_it() {
    let redis = TestRedis::new();
    let (listener, addr) = testing::listener().await;
    let mut config = keel_worker::Config::new(
        addr,
        "http://127.0.0.1:1",
        WORKER_TOKEN,
        redis.config.clone(),
    );
    config.worker_token = None;
    let err = keel_worker::run(config, listener, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "KEEL_WORKER_TOKEN is not set");
}

#[tokio::test]
async fn health_follows_the_jobs_service_and_the_worker_rides_out_its_outage() {
    let mut env = Env::start().await;
    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;
    let addr = worker.health_addr;
    eventually(WAIT, "SERVING", || async {
        status(addr).await == ServingStatus::Serving
    })
    .await;

    env.stop_jobs().await;
    eventually(
        WAIT,
        "NOT_SERVING while the jobs service is down",
        || async { status(addr).await == ServingStatus::NotServing },
    )
    .await;

    env.restart_jobs().await;
    eventually(WAIT, "SERVING again", || async {
        status(addr).await == ServingStatus::Serving
    })
    .await;
    let job = env.create("echo", json!({"after": "outage"}), 1).await;
    env.wait_for(&job.id, JobStatus::Succeeded).await;
    worker.stop().await;
}

#[tokio::test]
async fn a_worker_without_redis_keeps_trying_and_stops_cleanly() {
    let env = Env::start().await;
    let mut config = env.worker_config();
    config.redis = keel_shared::config::RedisConfig::new("redis://127.0.0.1:1", "nowhere");
    let worker = env.start_worker(config, Registry::with_builtins()).await;
    let addr = worker.health_addr;
    // The jobs service answers, Redis does not: never SERVING, never exiting.
    for _ in 0..3 {
        assert_eq!(status(addr).await, ServingStatus::NotServing);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(worker.is_running());
    worker.stop().await;
}
