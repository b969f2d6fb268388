//! Jobs through JobRunnerService: success, retries, leases, refused transitions.

use keel_proto::jobs::v1::*;
use keel_shared::testing;
use tonic::Code;

use crate::support::{Svc, WAIT, code};

fn ev(event: &str, status: &str, attempt: i32) -> (String, String, i32) {
    (event.into(), status.into(), attempt)
}

#[tokio::test]
async fn a_job_runs_to_success_and_late_calls_are_refused() {
    let svc = Svc::start().await;
    let payload = keel_shared::json::json_to_struct(&serde_json::json!({"n": 1, "s": "x"}));
    let job = svc
        .create(CreateJobRequest {
            kind: "echo".into(),
            payload: Some(payload.clone()),
            priority: 5,
            ..Default::default()
        })
        .await;
    assert_eq!(job.status(), JobStatus::Queued);
    assert_eq!((job.attempt, job.max_attempts, job.priority), (0, 3, 5));
    assert_eq!(job.user_id, svc.user.to_string());
    assert_eq!(uuid::Uuid::parse_str(&job.id).unwrap().get_version_num(), 7);

    // Delivered to the stream.
    testing::eventually(WAIT, "job in the stream", || async {
        svc.stream_ids().await == vec![job.id.clone()]
    })
    .await;

    let started = svc.start_job(&job.id).await.unwrap();
    let running = started.job.unwrap();
    assert_eq!(running.status(), JobStatus::Running);
    assert_eq!(running.attempt, 1);
    assert_eq!(running.payload, Some(payload));
    assert!(running.started_at.is_some());
    let lease = started.lease_expires_at.unwrap();

    // A duplicate StartJob (redelivery) changes nothing.
    let dup = svc.start_job(&job.id).await.unwrap_err();
    assert_eq!(dup.code(), Code::FailedPrecondition);
    assert!(
        dup.message().contains("already running"),
        "{}",
        dup.message()
    );

    let beat = svc
        .runner
        .clone()
        .heartbeat(svc.w(HeartbeatRequest {
            id: job.id.clone(),
            attempt: 1,
            worker_id: "w-1".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!beat.cancel_requested);
    let extended = beat.lease_expires_at.unwrap();
    assert!((extended.seconds, extended.nanos) > (lease.seconds, lease.nanos));

    // A stale attempt cannot complete it.
    let stale = svc.complete_job(&job.id, 2, false).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);

    let done = svc.complete_job(&job.id, 1, false).await.unwrap();
    assert_eq!(done.status(), JobStatus::Succeeded);
    assert_eq!(
        done.output,
        Some(keel_shared::json::json_to_struct(
            &serde_json::json!({"ok": true})
        ))
    );
    assert!(done.finished_at.is_some());
    assert_eq!(svc.get(&job.id).await, done);

    // Duplicates and late calls: refused, nothing changes.
    for result in [
        svc.complete_job(&job.id, 1, false).await,
        svc.fail_job(&job.id, 1, true).await,
        svc.start_job(&job.id).await.map(|r| r.job.unwrap()),
    ] {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("succeeded"), "{}", err.message());
    }
    let beat = svc
        .runner
        .clone()
        .heartbeat(svc.w(HeartbeatRequest {
            id: job.id.clone(),
            attempt: 1,
            worker_id: "w-1".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(beat), Code::FailedPrecondition);
    assert_eq!(svc.get(&job.id).await, done);

    assert_eq!(
        svc.events(&job.id).await,
        vec![
            ev("created", "queued", 0),
            ev("started", "running", 1),
            ev("succeeded", "succeeded", 1)
        ]
    );
    // Delivered exactly once.
    assert_eq!(svc.stream_ids().await, vec![job.id.clone()]);
}

#[tokio::test]
async fn retryable_failures_back_off_until_max_attempts_then_fail() {
    let svc = Svc::start_with(|c| {
        c.retry_base_ms = 20;
        c.retry_max_ms = 100;
    })
    .await;
    let job = svc
        .create(CreateJobRequest {
            kind: "flaky".into(),
            max_attempts: 3,
            ..Default::default()
        })
        .await;
    // Like a worker: start it once it is in the stream.
    testing::eventually(WAIT, "job delivered", || async {
        svc.stream_counts().await.get(&job.id) == Some(&1)
    })
    .await;

    for attempt in 1..=3 {
        let started = svc.start_when_due(&job.id).await.job.unwrap();
        assert_eq!(started.attempt, attempt);
        let failed = svc.fail_job(&job.id, attempt, true).await.unwrap();
        assert_eq!(failed.error, format!("boom {attempt}"));
        if attempt < 3 {
            assert_eq!(failed.status(), JobStatus::Queued);
            // Backed off: due later than the failure.
            let run_at = failed.run_at.unwrap();
            let updated = failed.updated_at.unwrap();
            assert!((run_at.seconds, run_at.nanos) > (updated.seconds, updated.nanos));
            // Re-delivered to the stream once due.
            testing::eventually(WAIT, "retry re-delivered", || async {
                svc.stream_counts().await.get(&job.id) == Some(&(attempt as usize + 1))
            })
            .await;
        } else {
            assert_eq!(failed.status(), JobStatus::Failed);
            assert!(failed.finished_at.is_some());
        }
    }
    // A late FailJob of an earlier attempt changes nothing.
    assert_eq!(
        code(svc.fail_job(&job.id, 2, true).await),
        Code::FailedPrecondition
    );
    assert_eq!(svc.get(&job.id).await.status(), JobStatus::Failed);
    assert_eq!(
        svc.events(&job.id).await,
        vec![
            ev("created", "queued", 0),
            ev("started", "running", 1),
            ev("retry_scheduled", "queued", 1),
            ev("started", "running", 2),
            ev("retry_scheduled", "queued", 2),
            ev("started", "running", 3),
            ev("failed", "failed", 3),
        ]
    );
    svc.wait_delivered().await;
    assert_eq!(svc.stream_counts().await.get(&job.id), Some(&3));
}

#[tokio::test]
async fn a_non_retryable_failure_fails_at_once() {
    let svc = Svc::start().await;
    let job = svc.create_kind("fail").await;
    svc.start_job(&job.id).await.unwrap();
    let failed = svc.fail_job(&job.id, 1, false).await.unwrap();
    assert_eq!(failed.status(), JobStatus::Failed);
    assert_eq!(failed.attempt, 1);
    assert_eq!(failed.error, "boom 1");
}

#[tokio::test]
async fn delayed_jobs_are_not_started_or_delivered_before_they_are_due() {
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
    assert_eq!(job.run_at, Some(later));
    let err = svc.start_job(&job.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not due"), "{}", err.message());

    // A job due now, created after it, is delivered; the delayed one waits in the outbox.
    let now = svc.create_kind("now").await;
    testing::eventually(WAIT, "due job delivered", || async {
        svc.stream_ids().await == vec![now.id.clone()]
    })
    .await;
    // The published one is marked so shortly after.
    testing::eventually(WAIT, "only the delayed job left to deliver", || async {
        svc.undelivered_len().await == 1
    })
    .await;
    assert_eq!(svc.stream_ids().await, vec![now.id.clone()]);
}

#[tokio::test]
async fn expired_leases_are_reaped_back_to_queued_then_failed() {
    let svc = Svc::start_with(|c| {
        c.lease_ms = 200;
        c.reaper_interval_ms = 50;
    })
    .await;
    let job = svc
        .create(CreateJobRequest {
            kind: "crashy".into(),
            max_attempts: 2,
            ..Default::default()
        })
        .await;
    // Like a worker: start it once it is in the stream.
    testing::eventually(WAIT, "job delivered", || async {
        svc.stream_counts().await.get(&job.id) == Some(&1)
    })
    .await;
    svc.start_job(&job.id).await.unwrap();
    // The worker "dies": no heartbeat. The reaper re-queues the job.
    testing::eventually(WAIT, "lease reaped", || async {
        svc.get(&job.id).await.status() == JobStatus::Queued
    })
    .await;
    let requeued = svc.get(&job.id).await;
    assert_eq!(requeued.attempt, 1);
    assert!(
        requeued.error.contains("lease expired"),
        "{}",
        requeued.error
    );
    testing::eventually(WAIT, "re-delivered after reaping", || async {
        svc.stream_counts().await.get(&job.id) == Some(&2)
    })
    .await;

    // The dead worker's late calls for attempt 1 are refused.
    let second = svc.start_job(&job.id).await.unwrap().job.unwrap();
    assert_eq!(second.attempt, 2);
    assert_eq!(
        code(svc.complete_job(&job.id, 1, false).await),
        Code::FailedPrecondition
    );

    // Attempt 2 dies too: out of attempts, failed.
    testing::eventually(WAIT, "failed after the last lease", || async {
        svc.get(&job.id).await.status() == JobStatus::Failed
    })
    .await;
    let events: Vec<String> = svc.events(&job.id).await.into_iter().map(|e| e.0).collect();
    assert_eq!(
        events,
        [
            "created",
            "started",
            "lease_expired",
            "started",
            "lease_expired"
        ]
    );
}

#[tokio::test]
async fn unknown_and_malformed_ids() {
    let svc = Svc::start().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(code(svc.start_job(&unknown).await), Code::NotFound);
    assert_eq!(
        code(svc.complete_job(&unknown, 1, false).await),
        Code::NotFound
    );
    assert_eq!(code(svc.fail_job(&unknown, 1, true).await), Code::NotFound);
    let bad = svc.start_job("not-a-uuid").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("id"), "{}", bad.message());
    let job = svc.create_kind("echo").await;
    svc.start_job(&job.id).await.unwrap();
    assert_eq!(
        code(svc.complete_job(&job.id, 0, false).await),
        Code::InvalidArgument
    );
}
