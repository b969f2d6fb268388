//! Start-up: serve health and reflection when ready.

use keel_shared::testing::{self, TestDb};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn serves_health_and_reflection_once_ready() {
    let db = TestDb::new().await;
    let (listener, addr) = testing::listener().await;
    let shutdown = CancellationToken::new();
    let config = keel_memory::Config::new(addr, db.config(), testing::verifier_config());
    let server = tokio::spawn(keel_memory::run(config, listener, shutdown.clone()));
    testing::assert_serving_with_reflection(addr, &["keel.memory.v1.MemoryService"]).await;
    shutdown.cancel();
    server.await.unwrap().expect("clean shutdown");
}
