//! ClaimJobs: workers in any language take due jobs of their kinds over
//! gRPC, highest priority first, each job to exactly one claimer; progress,
//! schedule timeouts, and starts repeated for the same delivery.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use keel_proto::jobs::v1::*;
use keel_shared::json::json_to_struct;
use serde_json::json;
use tonic::Code;

use crate::support::{Svc, WAIT, code};

fn claim_request(kinds: &[&str], max_jobs: i32, wait: Duration) -> ClaimJobsRequest {
    ClaimJobsRequest {
        worker_id: "py-1".into(),
        kinds: kinds.iter().map(|k| k.to_string()).collect(),
        max_jobs,
        wait: Some(prost_types::Duration {
            seconds: wait.as_secs() as i64,
            nanos: wait.subsec_nanos() as i32,
        }),
    }
}

async fn claim(svc: &Svc, req: ClaimJobsRequest) -> Result<Vec<ClaimedJob>, tonic::Status> {
    svc.runner
        .clone()
        .claim_jobs(svc.w(req))
        .await
        .map(|r| r.into_inner().jobs)
}

fn job_of(claimed: &ClaimedJob) -> &Job {
    claimed.job.as_ref().expect("a claimed job carries its job")
}

async fn create_with(svc: &Svc, kind: &str, priority: i32, n: usize) -> Vec<Job> {
    let requests = (0..n)
        .map(|_| CreateJobRequest {
            kind: kind.into(),
            priority,
            ..Default::default()
        })
        .collect();
    svc.jobs
        .clone()
        .batch_create_jobs(svc.u(BatchCreateJobsRequest { requests }))
        .await
        .expect("batch create")
        .into_inner()
        .jobs
}

#[tokio::test]
async fn claimed_jobs_are_running_for_the_worker_and_only_of_its_kinds() {
    let svc = Svc::start().await;
    let mine = svc.create_kind("agent.summarize").await;
    let other = svc.create_kind("report.render").await;

    let claimed = claim(&svc, claim_request(&["agent.summarize"], 10, WAIT))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let job = job_of(&claimed[0]);
    assert_eq!(job.id, mine.id);
    assert_eq!(job.status(), JobStatus::Running);
    assert_eq!(job.attempt, 1);
    assert!(claimed[0].lease_expires_at.is_some());
    assert_eq!(svc.get(&other.id).await.status(), JobStatus::Queued);

    // From there the worker goes on as after StartJob.
    let done = svc.complete_job(&mine.id, 1, false).await.unwrap();
    assert_eq!(done.status(), JobStatus::Succeeded);
    let history = svc.events(&mine.id).await;
    assert_eq!(
        history.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["created", "started", "succeeded"]
    );
}

#[tokio::test]
async fn higher_priority_is_claimed_first_even_behind_a_backlog() {
    let svc = Svc::start().await;
    let backlog = create_with(&svc, "echo", 0, 200).await;
    let urgent = create_with(&svc, "echo", 50, 3).await;
    let low = create_with(&svc, "echo", -10, 5).await;

    let claimed = claim(&svc, claim_request(&["echo"], 5, Duration::ZERO))
        .await
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|c| job_of(c).id.as_str()).collect();
    // The three urgent ones (oldest first), then the oldest of the backlog.
    let expected: Vec<&str> = urgent
        .iter()
        .chain(&backlog[..2])
        .map(|j| j.id.as_str())
        .collect();
    assert_eq!(ids, expected);

    // The lowest priority comes last, after the whole backlog.
    let mut rest = Vec::new();
    loop {
        let batch = claim(&svc, claim_request(&["echo"], 100, Duration::ZERO))
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        rest.extend(batch.iter().map(|c| job_of(c).id.clone()));
    }
    assert_eq!(rest.len(), 198 + 5);
    let tail: Vec<&str> = rest[198..].iter().map(String::as_str).collect();
    let low_ids: Vec<&str> = low.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(tail, low_ids);
}

#[tokio::test]
async fn a_waiting_claim_answers_when_a_job_arrives_and_empty_when_the_wait_ends() {
    let svc = Svc::start().await;
    let empty = claim(
        &svc,
        claim_request(&["echo"], 1, Duration::from_millis(300)),
    )
    .await
    .unwrap();
    assert!(empty.is_empty());

    let waiting = {
        let svc_runner = svc.runner.clone();
        let req = svc.w(claim_request(&["echo"], 4, Duration::from_secs(20)));
        tokio::spawn(async move { svc_runner.clone().claim_jobs(req).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job = svc.create_kind("echo").await;
    let claimed = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting claim answered once a job arrived")
        .unwrap()
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(claimed.len(), 1);
    assert_eq!(job_of(&claimed[0]).id, job.id);
}

#[tokio::test]
async fn concurrent_claimers_never_get_the_same_job() {
    let svc = Svc::start().await;
    let replica = svc.replica(|_| {}).await;
    let created = create_with(&svc, "echo", 0, 300).await;

    let claimers = (0..6).map(|i| {
        let mut runner = if i % 2 == 0 {
            svc.runner.clone()
        } else {
            replica.runner.clone()
        };
        let token = crate::support::WORKER_TOKEN;
        async move {
            let mut got = Vec::new();
            loop {
                let mut req = claim_request(&["echo"], 7, Duration::ZERO);
                req.worker_id = format!("claimer-{i}");
                let batch = runner
                    .claim_jobs(keel_shared::testing::authed(req, token))
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs;
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.iter().map(|c| job_of(c).id.clone()));
            }
        }
    });
    let all: Vec<String> = join_all(claimers).await.into_iter().flatten().collect();
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), distinct.len(), "a job was claimed twice");
    assert_eq!(distinct.len(), created.len(), "every job was claimed once");
}

#[tokio::test]
async fn bad_claims_are_invalid_argument_naming_the_field_and_claim_nothing() {
    let svc = Svc::start().await;
    let job = svc.create_kind("echo").await;
    let second = Duration::from_secs(1);
    let cases: Vec<(&str, ClaimJobsRequest)> = vec![
        ("kinds", claim_request(&[], 1, second)),
        ("kinds[0]", claim_request(&["Echo!"], 1, second)),
        ("kinds[1]", claim_request(&["echo", ""], 1, second)),
        ("kinds", {
            let many: Vec<String> = (0..65).map(|i| format!("k{i}")).collect();
            let refs: Vec<&str> = many.iter().map(String::as_str).collect();
            claim_request(&refs, 1, second)
        }),
        ("max_jobs", claim_request(&["echo"], 0, second)),
        ("max_jobs", claim_request(&["echo"], 1001, second)),
        ("wait", claim_request(&["echo"], 1, Duration::from_secs(31))),
        ("wait", {
            let mut r = claim_request(&["echo"], 1, second);
            r.wait = Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            });
            r
        }),
        ("worker_id", {
            let mut r = claim_request(&["echo"], 1, second);
            r.worker_id = String::new();
            r
        }),
    ];
    for (field, req) in cases {
        let status = claim(&svc, req).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field} not named in {:?}",
            status.message()
        );
    }
    // A user's token is not a worker's.
    let as_user = svc
        .runner
        .clone()
        .claim_jobs(svc.u(claim_request(&["echo"], 1, second)))
        .await;
    assert_eq!(code(as_user), Code::PermissionDenied);
    assert_eq!(svc.get(&job.id).await.status(), JobStatus::Queued);
}

#[tokio::test]
async fn progress_reported_by_heartbeat_shows_on_the_job_and_reaches_watchers() {
    let svc = Svc::start_with(|c| c.watch_poll_ms = 600_000).await;
    let job = svc.create_kind("agent.summarize").await;
    let claimed = claim(&svc, claim_request(&["agent.summarize"], 1, WAIT))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let mut watch = svc
        .jobs
        .clone()
        .watch_job(svc.u(WatchJobRequest { id: job.id.clone() }))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().job.unwrap();
    assert_eq!(first.status(), JobStatus::Running);
    assert_eq!(first.progress, None);

    let progress = json_to_struct(&json!({"pages": 3, "of": 10}));
    svc.runner
        .clone()
        .heartbeat(svc.w(HeartbeatRequest {
            id: job.id.clone(),
            attempt: 1,
            worker_id: "py-1".into(),
            progress: Some(progress.clone()),
        }))
        .await
        .unwrap();
    assert_eq!(svc.get(&job.id).await.progress, Some(progress.clone()));
    let update = tokio::time::timeout(WAIT, watch.message())
        .await
        .expect("the watcher got the progress")
        .unwrap()
        .unwrap()
        .job
        .unwrap();
    assert_eq!(update.progress, Some(progress.clone()));

    // A bare heartbeat keeps the last progress.
    svc.runner
        .clone()
        .heartbeat(svc.w(HeartbeatRequest {
            id: job.id.clone(),
            attempt: 1,
            worker_id: "py-1".into(),
            progress: None,
        }))
        .await
        .unwrap();
    assert_eq!(svc.get(&job.id).await.progress, Some(progress));
}

#[tokio::test]
async fn a_job_no_worker_takes_fails_at_its_schedule_timeout_naming_its_kind() {
    let svc = Svc::start().await;
    let job = svc
        .create(CreateJobRequest {
            kind: "nobody.serves.this".into(),
            schedule_timeout: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
    let served = svc.create_kind("echo").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.get(&job.id).await.status(), JobStatus::Queued);

    keel_shared::testing::eventually(WAIT, "the job fails at its schedule timeout", || async {
        svc.get(&job.id).await.status() == JobStatus::Failed
    })
    .await;
    let failed = svc.get(&job.id).await;
    assert!(
        failed.error.contains("nobody.serves.this"),
        "error does not name the kind: {}",
        failed.error
    );
    assert_eq!(failed.attempt, 0);
    let events: Vec<String> = svc.events(&job.id).await.into_iter().map(|e| e.0).collect();
    assert_eq!(events, ["created", "schedule_timeout"]);
    // A job with the default timeout (an hour) is still waiting.
    assert_eq!(svc.get(&served.id).await.status(), JobStatus::Queued);

    // Out-of-range timeouts are refused.
    for seconds in [0, -5, 31 * 24 * 3600] {
        let refused = svc
            .jobs
            .clone()
            .create_job(svc.u(CreateJobRequest {
                kind: "echo".into(),
                schedule_timeout: Some(prost_types::Duration { seconds, nanos: 0 }),
                ..Default::default()
            }))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains("schedule_timeout"));
    }
}

#[tokio::test]
async fn a_repeated_start_of_the_same_delivery_gets_the_same_attempt_back() {
    let svc = Svc::start().await;
    let job = svc.create_kind("echo").await;
    let start = |worker: &str, delivery: &str| {
        let mut runner = svc.runner.clone();
        let req = svc.w(StartJobRequest {
            id: job.id.clone(),
            worker_id: worker.into(),
            delivery_id: delivery.into(),
        });
        async move { runner.start_job(req).await }
    };
    let first = start("w-1", "1700000000000-0").await.unwrap().into_inner();
    // Its answer was lost; the worker asks again for the same delivery.
    let again = start("w-1", "1700000000000-0").await.unwrap().into_inner();
    let (a, b) = (first.job.clone().unwrap(), again.job.clone().unwrap());
    assert_eq!((a.attempt, b.attempt), (1, 1));
    assert_eq!(b.status(), JobStatus::Running);
    let lease = |r: &StartJobResponse| {
        let t = r.lease_expires_at.unwrap();
        (t.seconds, t.nanos)
    };
    assert!(lease(&again) >= lease(&first), "the lease was renewed");

    // Anyone else, another delivery, or no delivery id: refused as before.
    for (worker, delivery) in [
        ("w-2", "1700000000000-0"),
        ("w-1", "1700000000001-0"),
        ("w-1", ""),
    ] {
        assert_eq!(
            code(start(worker, delivery).await),
            Code::FailedPrecondition
        );
    }
    let history = svc.events(&job.id).await;
    assert_eq!(
        history.iter().filter(|e| e.0 == "started").count(),
        1,
        "one attempt started"
    );
    let long = "x".repeat(129);
    assert_eq!(code(start("w-1", &long).await), Code::InvalidArgument);
}

#[tokio::test]
async fn a_claim_takes_turns_between_users_with_queued_jobs() {
    let svc = Svc::start().await;
    // User A's backlog first, then user B's two jobs.
    let backlog = create_with(&svc, "echo", 0, 50).await;
    let (_, b_token) = svc.other_user().await;
    let mut b_ids = Vec::new();
    for _ in 0..2 {
        b_ids.push(svc.create_kind_as("echo", &b_token).await.id);
    }

    // A claim of four takes two of each, each user's oldest first; without
    // turns it took A's four oldest.
    let claimed = claim(&svc, claim_request(&["echo"], 4, Duration::ZERO))
        .await
        .unwrap();
    let ids: HashSet<&str> = claimed.iter().map(|c| job_of(c).id.as_str()).collect();
    let expected: HashSet<&str> = backlog[..2]
        .iter()
        .map(|j| j.id.as_str())
        .chain(b_ids.iter().map(String::as_str))
        .collect();
    assert_eq!(ids, expected);

    // Then A's backlog goes on in order, nothing skipped or taken twice.
    let mut rest = Vec::new();
    loop {
        let batch = claim(&svc, claim_request(&["echo"], 16, Duration::ZERO))
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        rest.extend(batch.iter().map(|c| job_of(c).id.clone()));
    }
    let backlog_rest: Vec<String> = backlog[2..].iter().map(|j| j.id.clone()).collect();
    assert_eq!(rest, backlog_rest);
}
