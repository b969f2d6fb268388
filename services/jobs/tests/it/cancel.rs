//! CancelJob in each state.

use keel_proto::jobs::v1::*;
use tonic::Code;

use crate::support::{Svc, code};

async fn cancel(svc: &Svc, id: &str) -> Result<Job, tonic::Status> {
    svc.jobs
        .clone()
        .cancel_job(svc.u(CancelJobRequest { id: id.into() }))
        .await
        .map(|r| r.into_inner().job.unwrap())
}

async fn heartbeat(svc: &Svc, id: &str, attempt: i32) -> HeartbeatResponse {
    svc.runner
        .clone()
        .heartbeat(svc.w(HeartbeatRequest {
            id: id.into(),
            attempt,
            worker_id: "w-1".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_queued_job_is_cancelled_at_once_and_never_starts() {
    let svc = Svc::start().await;
    let later = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 3600,
        nanos: 0,
    };
    let job = svc
        .create(CreateJobRequest {
            kind: "later".into(),
            run_at: Some(later),
            ..Default::default()
        })
        .await;
    let cancelled = cancel(&svc, &job.id).await.unwrap();
    assert_eq!(cancelled.status(), JobStatus::Cancelled);
    assert!(cancelled.finished_at.is_some());
    // Its pending delivery is dropped, and a worker cannot start it.
    assert_eq!(svc.outbox_len().await, 0);
    let err = svc.start_job(&job.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("cancelled"), "{}", err.message());
    // Cancelling again: it is finished.
    assert_eq!(code(cancel(&svc, &job.id).await), Code::FailedPrecondition);
    let events: Vec<String> = svc.events(&job.id).await.into_iter().map(|e| e.0).collect();
    assert_eq!(events, ["created", "cancelled"]);
}

#[tokio::test]
async fn a_running_job_is_stopped_through_its_heartbeat() {
    let svc = Svc::start().await;
    let job = svc.create_kind("sleep").await;
    svc.start_job(&job.id).await.unwrap();
    assert!(!heartbeat(&svc, &job.id, 1).await.cancel_requested);

    let requested = cancel(&svc, &job.id).await.unwrap();
    assert_eq!(requested.status(), JobStatus::Running);
    assert!(requested.cancel_requested);
    // Repeating it while running is harmless and changes nothing.
    assert_eq!(cancel(&svc, &job.id).await.unwrap(), requested);

    assert!(heartbeat(&svc, &job.id, 1).await.cancel_requested);
    let stopped = svc.complete_job(&job.id, 1, true).await.unwrap();
    assert_eq!(stopped.status(), JobStatus::Cancelled);
    assert_eq!(code(cancel(&svc, &job.id).await), Code::FailedPrecondition);
    let events: Vec<String> = svc.events(&job.id).await.into_iter().map(|e| e.0).collect();
    assert_eq!(
        events,
        ["created", "started", "cancel_requested", "cancelled"]
    );
}

#[tokio::test]
async fn a_running_job_whose_attempt_fails_after_a_cancel_request_ends_cancelled() {
    let svc = Svc::start().await;
    let job = svc.create_kind("sleep").await;
    svc.start_job(&job.id).await.unwrap();
    cancel(&svc, &job.id).await.unwrap();
    let ended = svc.fail_job(&job.id, 1, true).await.unwrap();
    assert_eq!(ended.status(), JobStatus::Cancelled);
}

#[tokio::test]
async fn finished_jobs_cannot_be_cancelled() {
    let svc = Svc::start().await;
    let ok = svc.create_kind("echo").await;
    svc.start_job(&ok.id).await.unwrap();
    svc.complete_job(&ok.id, 1, false).await.unwrap();
    let err = cancel(&svc, &ok.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("succeeded"), "{}", err.message());

    let failed = svc.create_kind("fail").await;
    svc.start_job(&failed.id).await.unwrap();
    svc.fail_job(&failed.id, 1, false).await.unwrap();
    assert_eq!(
        code(cancel(&svc, &failed.id).await),
        Code::FailedPrecondition
    );
    assert_eq!(svc.get(&failed.id).await.status(), JobStatus::Failed);
}
