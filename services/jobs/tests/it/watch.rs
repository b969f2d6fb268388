//! WatchJob: current state first, every transition, end after a terminal state.

use std::time::Duration;

use keel_proto::jobs::v1::*;
use keel_shared::config::RedisConfig;
use tonic::Code;

use crate::support::{Svc, WAIT};

async fn watch(svc: &Svc, id: &str) -> tonic::Streaming<WatchJobResponse> {
    svc.jobs
        .clone()
        .watch_job(svc.u(WatchJobRequest { id: id.into() }))
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut tonic::Streaming<WatchJobResponse>) -> Option<Job> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("watch stream stalled")
        .expect("watch stream error")
        .map(|r| r.job.unwrap())
}

fn state(job: &Job) -> (JobStatus, i32, bool) {
    (job.status(), job.attempt, job.cancel_requested)
}

#[tokio::test]
async fn a_watcher_sees_every_transition_and_the_stream_ends() {
    // No periodic re-read: every update must come from the announcements.
    let svc = Svc::start_with(|c| {
        c.watch_poll_ms = 600_000;
        c.retry_base_ms = 1;
        c.retry_max_ms = 1;
    })
    .await;
    let job = svc.create_kind("echo").await;
    let mut stream = watch(&svc, &job.id).await;
    let first = next(&mut stream).await.unwrap();
    assert_eq!(first, job);

    svc.start_when_due(&job.id).await;
    svc.fail_job(&job.id, 1, true).await.unwrap();
    svc.start_when_due(&job.id).await;
    svc.jobs
        .clone()
        .cancel_job(svc.u(CancelJobRequest { id: job.id.clone() }))
        .await
        .unwrap();
    let last = svc.complete_job(&job.id, 2, false).await.unwrap();

    let mut seen = vec![state(&first)];
    while let Some(job) = next(&mut stream).await {
        seen.push(state(&job));
    }
    use JobStatus::*;
    assert_eq!(
        seen,
        vec![
            (Queued, 0, false),
            (Running, 1, false),
            (Queued, 1, false),
            (Running, 2, false),
            (Running, 2, true),
            (Succeeded, 2, true),
        ]
    );
    assert_eq!(svc.get(&job.id).await, last);
}

#[tokio::test]
async fn watching_a_finished_job_sends_it_once_and_ends() {
    let svc = Svc::start().await;
    let job = svc.create_kind("echo").await;
    svc.start_job(&job.id).await.unwrap();
    let done = svc.complete_job(&job.id, 1, false).await.unwrap();
    let mut stream = watch(&svc, &job.id).await;
    assert_eq!(next(&mut stream).await, Some(done));
    assert_eq!(next(&mut stream).await, None);
}

#[tokio::test]
async fn without_redis_a_watcher_polls_postgres_and_still_ends() {
    let svc = Svc::start_with(|c| {
        c.redis = RedisConfig::new("redis://127.0.0.1:1", c.redis.redis_prefix.clone());
        c.watch_poll_ms = 50;
    })
    .await;
    let job = svc.create_kind("echo").await;
    let mut stream = watch(&svc, &job.id).await;
    assert_eq!(next(&mut stream).await.unwrap().status(), JobStatus::Queued);
    svc.start_job(&job.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    svc.complete_job(&job.id, 1, false).await.unwrap();
    let mut last = None;
    while let Some(job) = next(&mut stream).await {
        last = Some(job.status());
    }
    assert_eq!(last, Some(JobStatus::Succeeded));
}

#[tokio::test]
async fn watching_an_unknown_or_malformed_id_fails() {
    let svc = Svc::start().await;
    let err = svc
        .jobs
        .clone()
        .watch_job(svc.u(WatchJobRequest {
            id: uuid::Uuid::now_v7().to_string(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = svc
        .jobs
        .clone()
        .watch_job(svc.u(WatchJobRequest { id: "x".into() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
