//! Graceful shutdown: running jobs finish within the grace period, or are
//! failed back for a retry (and not acknowledged) when it runs out.

use keel_proto::jobs::v1::JobStatus;
use keel_worker::Registry;
use serde_json::json;

use crate::support::Env;

#[tokio::test]
async fn shutdown_lets_a_running_job_finish_within_the_grace_period() {
    let env = Env::start().await;
    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;
    let job = env.create("sleep", json!({"ms": 1000}), 3).await;
    env.wait_for(&job.id, JobStatus::Running).await;
    worker.stop().await;

    // No worker runs any more: what is recorded now was done by the one that stopped.
    let job = env.get(&job.id).await;
    assert_eq!(job.status(), JobStatus::Succeeded);
    assert_eq!(job.attempt, 1);
    assert_eq!(env.pending().await, 0);
}

#[tokio::test]
async fn after_the_grace_period_a_running_job_is_failed_back_and_runs_elsewhere() {
    let env = Env::start().await;
    let mut config = env.worker_config();
    config.job_grace_ms = 200;
    let first = env.start_worker(config, Registry::with_builtins()).await;
    let job = env.create("sleep", json!({"ms": 4000}), 3).await;
    env.wait_for(&job.id, JobStatus::Running).await;
    first.stop().await;

    let stopped = env.get(&job.id).await;
    assert_eq!(
        stopped.status(),
        JobStatus::Queued,
        "handed back for a retry"
    );
    assert_eq!(stopped.error, "worker shutting down");
    assert_eq!(stopped.attempt, 1);
    assert_eq!(
        env.pending().await,
        1,
        "the unfinished message is not acknowledged"
    );

    let second = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;
    let job = env.wait_for(&job.id, JobStatus::Succeeded).await;
    assert_eq!(job.attempt, 2);
    env.wait_drained().await;
    second.stop().await;
}

#[tokio::test]
async fn sigterm_drains_the_worker_process() {
    let env = Env::start().await;
    let mut child = env.spawn_binary();
    let job = env.create("sleep", json!({"ms": 1500}), 3).await;
    env.wait_for(&job.id, JobStatus::Running).await;

    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = child.wait().await.expect("wait for the worker");
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");

    let job = env.get(&job.id).await;
    assert_eq!(job.status(), JobStatus::Succeeded);
    assert_eq!(job.attempt, 1);
}
