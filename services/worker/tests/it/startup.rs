//! Start-up: the worker's health server answers once Redis is reachable.

use keel_shared::config::RuntimeConfig;
use keel_shared::testing::{self, TestRedis};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn serves_health_and_reflection_once_ready() {
    let redis = TestRedis::new();
    let (listener, addr) = testing::listener().await;
    let shutdown = CancellationToken::new();
    let config = keel_worker::Config {
        health_addr: addr,
        jobs_url: "http://127.0.0.1:1".into(),
        worker_token: Some("test-worker-token".into()),
        redis: redis.config.clone(),
        runtime: RuntimeConfig::default(),
    };
    let server = tokio::spawn(keel_worker::run(config, listener, shutdown.clone()));
    testing::assert_serving_with_reflection(addr, &[]).await;
    shutdown.cancel();
    server.await.unwrap().expect("clean shutdown");
}
