//! Start-up: serve health and reflection when ready.

use keel_shared::testing::{self, TestDb, TestRedis};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn serves_health_and_reflection_once_ready() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let (listener, addr) = testing::listener().await;
    let shutdown = CancellationToken::new();
    let config = keel_jobs::Config::new(
        addr,
        db.config(),
        redis.config.clone(),
        testing::verifier_config(),
        "test-worker-token",
    );
    let server = tokio::spawn(keel_jobs::run(config, listener, shutdown.clone()));
    testing::assert_serving_with_reflection(
        addr,
        &[
            "keel.jobs.v1.JobsService",
            "keel.jobs.v1.JobRunnerService",
            "keel.jobs.v1.ScheduleService",
            "keel.admin.v1.AdminService",
        ],
    )
    .await;
    shutdown.cancel();
    server.await.unwrap().expect("clean shutdown");
}
