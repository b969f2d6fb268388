//! Job control: a user reads a job's history, retries a failed or cancelled
//! job with fresh attempts, deletes a finished one; an attempt that runs
//! past its job's timeout fails as retryable even while it heartbeats.

use std::time::{Duration, Instant};

use futures::future::join_all;
use keel_proto::jobs::v1::*;
use keel_shared::testing;
use tonic::Code;
use uuid::Uuid;

use crate::support::{Svc, WAIT, code};

/// A kind no stream worker serves: its jobs are only taken through StartJob
/// and ClaimJobs here.
const KIND: &str = "ctl";

fn secs(seconds: i64, nanos: i32) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos }
}

async fn history(svc: &Svc, id: &str) -> Result<Vec<JobEvent>, tonic::Status> {
    svc.jobs
        .clone()
        .get_job_history(svc.u(GetJobHistoryRequest { id: id.into() }))
        .await
        .map(|r| r.into_inner().events)
}

async fn retry(svc: &Svc, id: &str) -> Result<Job, tonic::Status> {
    svc.jobs
        .clone()
        .retry_job(svc.u(RetryJobRequest { id: id.into() }))
        .await
        .map(|r| r.into_inner().job.unwrap())
}

async fn delete(svc: &Svc, id: &str) -> Result<(), tonic::Status> {
    svc.jobs
        .clone()
        .delete_job(svc.u(DeleteJobRequest { id: id.into() }))
        .await
        .map(|_| ())
}

async fn start_as(svc: &Svc, id: &str, worker: &str) -> Job {
    svc.runner
        .clone()
        .start_job(svc.w(StartJobRequest {
            id: id.into(),
            worker_id: worker.into(),
            ..Default::default()
        }))
        .await
        .expect("start job")
        .into_inner()
        .job
        .unwrap()
}

async fn fail_as(svc: &Svc, id: &str, attempt: i32, worker: &str, error: &str, retryable: bool) {
    svc.runner
        .clone()
        .fail_job(svc.w(FailJobRequest {
            id: id.into(),
            attempt,
            error: error.into(),
            retryable,
            worker_id: worker.into(),
        }))
        .await
        .expect("fail job");
}

async fn claim_one(svc: &Svc, worker: &str) -> Vec<ClaimedJob> {
    svc.runner
        .clone()
        .claim_jobs(svc.w(ClaimJobsRequest {
            worker_id: worker.into(),
            kinds: vec![KIND.into()],
            max_jobs: 10,
            wait: Some(secs(WAIT.as_secs() as i64, 0)),
        }))
        .await
        .expect("claim jobs")
        .into_inner()
        .jobs
}

async fn heartbeat(svc: &Svc, id: &str, attempt: i32) -> Result<HeartbeatResponse, tonic::Status> {
    svc.runner
        .clone()
        .heartbeat(svc.w(HeartbeatRequest {
            id: id.into(),
            attempt,
            worker_id: "w-1".into(),
            progress: None,
        }))
        .await
        .map(|r| r.into_inner())
}

/// A job of [`KIND`] run once and failed for good.
async fn failed_job(svc: &Svc) -> Job {
    let job = svc
        .create(CreateJobRequest {
            kind: KIND.into(),
            max_attempts: 1,
            ..Default::default()
        })
        .await;
    start_as(svc, &job.id, "w-1").await;
    fail_as(svc, &job.id, 1, "w-1", "boom", false).await;
    let job = svc.get(&job.id).await;
    assert_eq!(job.status(), JobStatus::Failed);
    job
}

/// Rows left in a table for one job.
async fn rows_of(svc: &Svc, table: &str, id: &str) -> i64 {
    let client = svc.db.pool.get().await.unwrap();
    let id = Uuid::parse_str(id).unwrap();
    client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE job_id = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

/// The outbox row's attempt column, if the job has a row.
async fn outbox_attempt(svc: &Svc, id: &str) -> Option<i32> {
    let client = svc.db.pool.get().await.unwrap();
    let id = Uuid::parse_str(id).unwrap();
    client
        .query_opt("SELECT attempt FROM job_outbox WHERE job_id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test]
async fn history_of_a_retried_then_succeeded_job_is_in_order_with_workers_and_errors() {
    let svc = Svc::start_with(|c| c.retry_base_ms = 10).await;
    let job = svc
        .create(CreateJobRequest {
            kind: KIND.into(),
            max_attempts: 2,
            ..Default::default()
        })
        .await;
    start_as(&svc, &job.id, "w-a").await;
    fail_as(&svc, &job.id, 1, "w-a", "first try", true).await;
    // The backoff is at most 10 ms: past it, the job is due (a start just at
    // the edge may be refused as "changed concurrently", not as "not due").
    tokio::time::sleep(Duration::from_millis(100)).await;
    start_as(&svc, &job.id, "w-1").await;
    fail_as(&svc, &job.id, 2, "w-1", "second try", false).await;
    retry(&svc, &job.id).await.expect("retry");
    let claimed = claim_one(&svc, "w-b").await;
    assert_eq!(claimed.len(), 1);
    svc.runner
        .clone()
        .complete_job(svc.w(CompleteJobRequest {
            id: job.id.clone(),
            attempt: 1,
            worker_id: "w-b".into(),
            ..Default::default()
        }))
        .await
        .expect("complete");

    let events = history(&svc, &job.id).await.unwrap();
    let seen: Vec<(&str, JobStatus, i32, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e.event.as_str(),
                e.status(),
                e.attempt,
                e.worker_id.as_str(),
                e.error.as_str(),
            )
        })
        .collect();
    use JobStatus::*;
    assert_eq!(
        seen,
        [
            ("created", Queued, 0, "", ""),
            ("started", Running, 1, "w-a", ""),
            ("retry_scheduled", Queued, 1, "w-a", "first try"),
            ("started", Running, 2, "w-1", ""),
            ("failed", Failed, 2, "w-1", "second try"),
            ("retried", Queued, 0, "", ""),
            ("started", Running, 1, "w-b", ""),
            ("succeeded", Succeeded, 1, "w-b", ""),
        ]
    );
    let times: Vec<_> = events.iter().map(|e| e.at.unwrap()).collect();
    assert!(
        times
            .windows(2)
            .all(|w| (w[0].seconds, w[0].nanos) <= (w[1].seconds, w[1].nanos)),
        "oldest first: {times:?}"
    );
}

#[tokio::test]
async fn a_failed_job_retries_with_fresh_attempts_and_is_claimable_again() {
    let svc = Svc::start().await;
    let failed = failed_job(&svc).await;
    assert_eq!(failed.error, "boom");

    let retried = retry(&svc, &failed.id).await.expect("retry a failed job");
    assert_eq!(retried.status(), JobStatus::Queued);
    assert_eq!(retried.attempt, 0);
    assert_eq!(retried.error, "");
    assert_eq!(retried.output, None);
    assert_eq!(retried.finished_at, None);
    assert!(!retried.cancel_requested);
    assert!(retried.run_at.unwrap().seconds >= failed.run_at.unwrap().seconds);
    assert_eq!(svc.get(&failed.id).await, retried);
    // Delivered as a new job: one outbox row, attempt 0.
    assert_eq!(outbox_attempt(&svc, &failed.id).await, Some(0));

    let claimed = claim_one(&svc, "py-1").await;
    assert_eq!(claimed.len(), 1);
    let job = claimed[0].job.as_ref().unwrap();
    assert_eq!((job.id.as_str(), job.attempt), (failed.id.as_str(), 1));
    assert_eq!(job.status(), JobStatus::Running);
    assert_eq!(outbox_attempt(&svc, &failed.id).await, None);
    let done = svc.complete_job(&failed.id, 1, false).await.unwrap();
    assert_eq!(done.status(), JobStatus::Succeeded);
}

#[tokio::test]
async fn a_cancelled_job_retries_and_is_published_to_its_stream_at_once() {
    let svc = Svc::start().await;
    // "echo" is served by stream workers: new jobs go to its stream at once.
    let job = svc.create_kind("echo").await;
    testing::eventually(WAIT, "the new job is published", || async {
        svc.stream_counts().await.get(&job.id) == Some(&1)
    })
    .await;
    let cancelled = svc
        .jobs
        .clone()
        .cancel_job(svc.u(CancelJobRequest { id: job.id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.status(), JobStatus::Cancelled);
    assert!(cancelled.cancel_requested);

    let asked = Instant::now();
    let retried = retry(&svc, &job.id).await.expect("retry a cancelled job");
    assert_eq!(retried.status(), JobStatus::Queued);
    assert!(!retried.cancel_requested);
    testing::eventually(WAIT, "the retried job is published again", || async {
        svc.stream_counts().await.get(&job.id) == Some(&2)
    })
    .await;
    // Well inside the relay's grace: the immediate publication did it.
    assert!(
        asked.elapsed() < keel_jobs::delivery::PUBLISH_GRACE,
        "published after {:?}",
        asked.elapsed()
    );

    let started = svc.start_job(&job.id).await.expect("start the retried job");
    assert_eq!(started.job.unwrap().attempt, 1);
    let done = svc.complete_job(&job.id, 1, false).await.unwrap();
    assert_eq!(done.status(), JobStatus::Succeeded);
}

#[tokio::test]
async fn a_retried_job_wakes_a_waiting_claim_at_once() {
    // Claims look again only when woken (or a minute later).
    let svc = Svc::start_with(|c| c.claim_poll_ms = 60_000).await;
    let failed = failed_job(&svc).await;
    let waiting = {
        let mut runner = svc.runner.clone();
        let req = svc.w(ClaimJobsRequest {
            worker_id: "py-1".into(),
            kinds: vec![KIND.into()],
            max_jobs: 1,
            wait: Some(secs(30, 0)),
        });
        tokio::spawn(async move { runner.claim_jobs(req).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    retry(&svc, &failed.id).await.unwrap();
    let claimed = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting claim was woken by the retry")
        .unwrap()
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(claimed.len(), 1);
    let job = claimed[0].job.as_ref().unwrap();
    assert_eq!((job.id.as_str(), job.attempt), (failed.id.as_str(), 1));
}

#[tokio::test]
async fn only_failed_or_cancelled_jobs_retry() {
    let svc = Svc::start().await;
    let queued = svc.create_kind(KIND).await;
    let running = svc.create_kind(KIND).await;
    svc.start_job(&running.id).await.unwrap();
    let succeeded = svc.create_kind(KIND).await;
    svc.start_job(&succeeded.id).await.unwrap();
    svc.complete_job(&succeeded.id, 1, false).await.unwrap();

    for (job, status) in [
        (&queued, "queued"),
        (&running, "running"),
        (&succeeded, "succeeded"),
    ] {
        let before = svc.get(&job.id).await;
        let refused = retry(&svc, &job.id).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{status}");
        assert!(refused.message().contains(status), "{refused:?}");
        assert_eq!(svc.get(&job.id).await, before, "nothing changed");
    }
    assert_eq!(
        code(retry(&svc, &Uuid::now_v7().to_string()).await),
        Code::NotFound
    );
    assert_eq!(code(retry(&svc, "nope").await), Code::InvalidArgument);
}

#[tokio::test]
async fn of_concurrent_retries_exactly_one_applies() {
    let svc = Svc::start().await;
    for _ in 0..3 {
        let failed = failed_job(&svc).await;
        let outcomes = join_all((0..8).map(|_| retry(&svc, &failed.id))).await;
        let ok = outcomes.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "{outcomes:?}");
        for refused in outcomes.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        }
        let retried: Vec<_> = history(&svc, &failed.id)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event == "retried")
            .collect();
        assert_eq!(retried.len(), 1);
        assert_eq!(rows_of(&svc, "job_outbox", &failed.id).await, 1);
    }
}

#[tokio::test]
async fn only_finished_jobs_are_deleted_and_their_history_goes_with_them() {
    let svc = Svc::start().await;
    let running = svc.create_kind(KIND).await;
    svc.start_job(&running.id).await.unwrap();
    let queued = svc.create_kind(KIND).await;
    for (job, status) in [(&running, "running"), (&queued, "queued")] {
        let refused = delete(&svc, &job.id).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{status}");
        assert!(refused.message().contains(status), "{refused:?}");
        assert!(!history(&svc, &job.id).await.unwrap().is_empty());
    }

    let keyed = svc
        .create(CreateJobRequest {
            kind: KIND.into(),
            idempotency_key: "nightly".into(),
            ..Default::default()
        })
        .await;
    svc.start_job(&keyed.id).await.unwrap();
    svc.complete_job(&keyed.id, 1, false).await.unwrap();
    let failed = failed_job(&svc).await;
    // A retried (queued) job has an outbox row again; cancelled, none.
    retry(&svc, &failed.id).await.unwrap();
    svc.jobs
        .clone()
        .cancel_job(svc.u(CancelJobRequest {
            id: failed.id.clone(),
        }))
        .await
        .unwrap();
    for job in [&keyed, &failed] {
        delete(&svc, &job.id).await.expect("delete a finished job");
        let gone = svc
            .jobs
            .clone()
            .get_job(svc.u(GetJobRequest { id: job.id.clone() }))
            .await;
        assert_eq!(code(gone), Code::NotFound);
        assert_eq!(code(history(&svc, &job.id).await), Code::NotFound);
        assert_eq!(code(retry(&svc, &job.id).await), Code::NotFound);
        assert_eq!(code(delete(&svc, &job.id).await), Code::NotFound);
        assert_eq!(rows_of(&svc, "job_events", &job.id).await, 0);
        assert_eq!(rows_of(&svc, "job_outbox", &job.id).await, 0);
    }
    // The idempotency key is free again: a new job, not the deleted one.
    let again = svc
        .create(CreateJobRequest {
            kind: KIND.into(),
            idempotency_key: "nightly".into(),
            ..Default::default()
        })
        .await;
    assert_ne!(again.id, keyed.id);
    assert_eq!(again.status(), JobStatus::Queued);
}

#[tokio::test]
async fn another_users_job_is_not_found_for_history_retry_and_delete() {
    let svc = Svc::start().await;
    let failed = failed_job(&svc).await;
    let (_, bob) = svc.other_user().await;
    let as_bob = |id: &str| GetJobHistoryRequest { id: id.into() };
    let mut jobs = svc.jobs.clone();
    let answers = [
        code(
            jobs.get_job_history(testing::authed(as_bob(&failed.id), &bob))
                .await,
        ),
        code(
            jobs.retry_job(testing::authed(
                RetryJobRequest {
                    id: failed.id.clone(),
                },
                &bob,
            ))
            .await,
        ),
        code(
            jobs.delete_job(testing::authed(
                DeleteJobRequest {
                    id: failed.id.clone(),
                },
                &bob,
            ))
            .await,
        ),
    ];
    assert_eq!(answers, [Code::NotFound; 3]);
    assert_eq!(svc.get(&failed.id).await, failed, "unchanged");
    assert_eq!(history(&svc, &failed.id).await.unwrap().len(), 3);
}

#[tokio::test]
async fn an_attempt_past_its_timeout_fails_as_retryable_even_while_it_heartbeats() {
    let svc = Svc::start_with(|c| c.retry_base_ms = 10).await;
    let job = svc
        .create(CreateJobRequest {
            kind: KIND.into(),
            timeout: Some(secs(1, 0)),
            ..Default::default()
        })
        .await;
    assert_eq!(job.timeout, Some(secs(1, 0)));
    let started_at = Instant::now();
    let lease = svc.start_job(&job.id).await.unwrap();
    assert_eq!(lease.job.unwrap().attempt, 1);

    // The worker keeps heartbeating (its lease never runs out) until told
    // the attempt is over.
    let refused = loop {
        match heartbeat(&svc, &job.id, 1).await {
            Ok(_) => {
                assert!(started_at.elapsed() < WAIT, "the attempt never timed out");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => break status,
        }
    };
    let ran = started_at.elapsed();
    assert!(ran >= Duration::from_millis(900), "stopped after {ran:?}");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    testing::eventually(WAIT, "the reaper records the timeout", || async {
        svc.get(&job.id).await.status() != JobStatus::Running
    })
    .await;
    let requeued = svc.get(&job.id).await;
    assert_eq!(
        requeued.status(),
        JobStatus::Queued,
        "retryable: {requeued:?}"
    );
    assert_eq!(requeued.attempt, 1);
    assert!(requeued.error.contains("timeout"), "{}", requeued.error);
    assert!(requeued.error.contains("1 s"), "{}", requeued.error);
    let refused = heartbeat(&svc, &job.id, 1).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let events: Vec<String> = history(&svc, &job.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(events, ["created", "started", "timed_out"]);
    assert_eq!(outbox_attempt(&svc, &job.id).await, Some(1));

    // The next attempt gets a fresh deadline and can finish in time.
    tokio::time::sleep(Duration::from_millis(100)).await; // past the <= 10 ms backoff
    let next = svc
        .start_job(&job.id)
        .await
        .expect("start the next attempt");
    assert_eq!(next.job.unwrap().attempt, 2);
    heartbeat(&svc, &job.id, 2).await.expect("a fresh attempt");
    let done = svc.complete_job(&job.id, 2, false).await.unwrap();
    assert_eq!(done.status(), JobStatus::Succeeded);
}

#[tokio::test]
async fn past_its_deadline_an_attempt_is_over_even_before_the_reaper_records_it() {
    // The reaper's first round runs at start-up, its next a minute later.
    let svc = Svc::start_with(|c| c.reaper_interval_ms = 60_000).await;
    let job = svc
        .create(CreateJobRequest {
            kind: KIND.into(),
            timeout: Some(secs(1, 0)),
            ..Default::default()
        })
        .await;
    svc.start_job(&job.id).await.unwrap();
    heartbeat(&svc, &job.id, 1)
        .await
        .expect("within the timeout");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let refused = heartbeat(&svc, &job.id, 1).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("timeout"), "{refused:?}");
    let late = svc.complete_job(&job.id, 1, false).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("timeout"), "{late:?}");
    // Not recorded yet: the reaper does that at its next round.
    assert_eq!(svc.get(&job.id).await.status(), JobStatus::Running);
}

#[tokio::test]
async fn the_last_attempt_past_its_timeout_fails_the_job() {
    let svc = Svc::start().await;
    let job = svc
        .create(CreateJobRequest {
            kind: KIND.into(),
            max_attempts: 1,
            timeout: Some(secs(1, 0)),
            ..Default::default()
        })
        .await;
    let claimed = claim_one(&svc, "py-1").await;
    assert_eq!(claimed.len(), 1);
    testing::eventually(WAIT, "the attempt times out", || async {
        svc.get(&job.id).await.status() == JobStatus::Failed
    })
    .await;
    let failed = svc.get(&job.id).await;
    assert!(failed.error.contains("timeout"), "{}", failed.error);
    assert_eq!(outbox_attempt(&svc, &job.id).await, None);
}

#[tokio::test]
async fn bad_timeouts_are_invalid_arguments_naming_the_field() {
    let svc = Svc::start().await;
    for bad in [
        secs(0, 999_999_999),
        secs(86_400, 1),
        secs(-1, 0),
        secs(0, 0),
    ] {
        let refused = svc
            .jobs
            .clone()
            .create_job(svc.u(CreateJobRequest {
                kind: KIND.into(),
                timeout: Some(bad),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad:?}");
        assert!(refused.message().contains("timeout"), "{refused:?}");

        let refused = svc
            .jobs
            .clone()
            .batch_create_jobs(svc.u(BatchCreateJobsRequest {
                requests: vec![
                    CreateJobRequest {
                        kind: KIND.into(),
                        ..Default::default()
                    },
                    CreateJobRequest {
                        kind: KIND.into(),
                        timeout: Some(bad),
                        ..Default::default()
                    },
                ],
            }))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            refused.message().contains("requests[1].timeout"),
            "{refused:?}"
        );
    }
    // The bounds themselves are accepted.
    for good in [secs(1, 0), secs(86_400, 0)] {
        svc.create(CreateJobRequest {
            kind: KIND.into(),
            timeout: Some(good),
            ..Default::default()
        })
        .await;
    }
    assert_eq!(
        svc.count("SELECT count(*) FROM jobs").await,
        2,
        "nothing of the refused calls was created"
    );
}
