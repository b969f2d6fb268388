//! StartJobs and CompleteJobs: each item applied and answered as its own
//! StartJob / CompleteJob would be (as if the calls were concurrent), results
//! in request order; a malformed call (no items, too many) changes nothing.

use keel_proto::jobs::v1::*;
use keel_shared::json::json_to_struct;
use tonic::Code;

use crate::hostile::snapshot;
use crate::support::{Svc, code};

fn start_req(id: &str) -> StartJobRequest {
    StartJobRequest {
        id: id.into(),
        worker_id: "w-batch".into(),
        ..Default::default()
    }
}

fn complete_req(id: &str, attempt: i32, n: i64) -> CompleteJobRequest {
    CompleteJobRequest {
        id: id.into(),
        attempt,
        output: Some(json_to_struct(&serde_json::json!({ "n": n }))),
        cancelled: false,
        worker_id: "w-batch".into(),
    }
}

async fn start_jobs(svc: &Svc, requests: Vec<StartJobRequest>) -> Vec<Result<Job, (Code, String)>> {
    let results = svc
        .runner
        .clone()
        .start_jobs(svc.w(StartJobsRequest { requests }))
        .await
        .expect("StartJobs")
        .into_inner()
        .results;
    results
        .into_iter()
        .map(|r| match r.outcome.expect("an outcome") {
            start_job_result::Outcome::Started(s) => {
                assert!(s.lease_expires_at.is_some());
                Ok(s.job.expect("job"))
            }
            start_job_result::Outcome::Error(e) => Err((Code::from_i32(e.code), e.message)),
        })
        .collect()
}

async fn complete_jobs(
    svc: &Svc,
    requests: Vec<CompleteJobRequest>,
) -> Vec<Result<Job, (Code, String)>> {
    let results = svc
        .runner
        .clone()
        .complete_jobs(svc.w(CompleteJobsRequest { requests }))
        .await
        .expect("CompleteJobs")
        .into_inner()
        .results;
    results
        .into_iter()
        .map(|r| match r.outcome.expect("an outcome") {
            complete_job_result::Outcome::Completed(c) => Ok(c.job.expect("job")),
            complete_job_result::Outcome::Error(e) => Err((Code::from_i32(e.code), e.message)),
        })
        .collect()
}

#[track_caller]
fn refused(result: &Result<Job, (Code, String)>, code: Code, says: &str) {
    let (got, message) = result.as_ref().expect_err("expected a refusal");
    assert_eq!(*got, code, "{message}");
    assert!(message.contains(says), "{message:?} does not say {says:?}");
}

#[tokio::test]
async fn start_jobs_answers_each_item_as_its_own_start_job_would() {
    let svc = Svc::start().await;
    let a = svc.create_kind("echo").await;
    let b = svc.create_kind("echo").await;
    let running = svc.create_kind("echo").await;
    svc.start_job(&running.id).await.unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();

    let results = start_jobs(
        &svc,
        vec![
            start_req(&a.id),
            start_req("not-a-uuid"),
            start_req(&unknown),
            start_req(&a.id),
            start_req(&running.id),
            start_req(&b.id),
        ],
    )
    .await;
    assert_eq!(results.len(), 6);
    for (i, job) in [(0, &a), (5, &b)] {
        let started = results[i].as_ref().expect("started");
        assert_eq!(started.id, job.id);
        assert_eq!(started.status(), JobStatus::Running);
        assert_eq!(started.attempt, 1);
    }
    refused(&results[1], Code::InvalidArgument, "id");
    refused(&results[2], Code::NotFound, "not found");
    refused(&results[3], Code::FailedPrecondition, "already running");
    refused(&results[4], Code::FailedPrecondition, "already running");

    // Each started once, by the batch's worker; the running job untouched.
    for job in [&a, &b] {
        let events: Vec<String> = svc.events(&job.id).await.into_iter().map(|e| e.0).collect();
        assert_eq!(events, ["created", "started"]);
        assert_eq!(svc.get(&job.id).await.status(), JobStatus::Running);
    }
    assert_eq!(svc.get(&running.id).await.attempt, 1);
}

#[tokio::test]
async fn complete_jobs_answers_each_item_as_its_own_complete_job_would() {
    let svc = Svc::start_with(|c| c.max_payload_bytes = 1024).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let job = svc.create_kind("echo").await;
        svc.start_job(&job.id).await.unwrap();
        ids.push(job.id);
    }
    let queued = svc.create_kind("echo").await;
    let huge = "x".repeat(4096);
    let mut too_big = complete_req(&ids[2], 1, 0);
    too_big.output = Some(json_to_struct(&serde_json::json!({ "big": huge })));

    let results = complete_jobs(
        &svc,
        vec![
            complete_req(&ids[0], 1, 10),
            complete_req(&ids[0], 1, 11),
            complete_req(&ids[2], 2, 12),
            too_big,
            complete_req("nope", 1, 13),
            complete_req(&ids[1], 0, 14),
            complete_req(&queued.id, 1, 15),
            complete_req(&ids[1], 1, 16),
        ],
    )
    .await;
    assert_eq!(results.len(), 8);
    let done = results[0].as_ref().expect("completed");
    assert_eq!(done.status(), JobStatus::Succeeded);
    assert_eq!(done.output, complete_req(&ids[0], 1, 10).output);
    refused(&results[1], Code::FailedPrecondition, "already succeeded");
    refused(&results[2], Code::FailedPrecondition, "attempt 2");
    refused(&results[3], Code::InvalidArgument, "output");
    refused(&results[4], Code::InvalidArgument, "id");
    refused(&results[5], Code::InvalidArgument, "attempt");
    refused(&results[6], Code::FailedPrecondition, "queued");
    let last = results[7].as_ref().expect("completed");
    assert_eq!(last.output, complete_req(&ids[1], 1, 16).output);

    assert_eq!(
        svc.get(&ids[0]).await.output,
        complete_req(&ids[0], 1, 10).output
    );
    assert_eq!(svc.get(&ids[1]).await.status(), JobStatus::Succeeded);
    assert_eq!(svc.get(&ids[2]).await.status(), JobStatus::Running);
    assert_eq!(svc.get(&queued.id).await.status(), JobStatus::Queued);
}

#[tokio::test]
async fn hundreds_of_items_in_one_call_each_apply_once() {
    let svc = Svc::start().await;
    let requests = (0..300)
        .map(|_| CreateJobRequest {
            kind: "echo".into(),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    let mut ids = Vec::new();
    for chunk in requests.chunks(150) {
        let jobs = svc
            .jobs
            .clone()
            .batch_create_jobs(svc.u(BatchCreateJobsRequest {
                requests: chunk.to_vec(),
            }))
            .await
            .unwrap()
            .into_inner()
            .jobs;
        ids.extend(jobs.into_iter().map(|j| j.id));
    }
    let started = start_jobs(&svc, ids.iter().map(|id| start_req(id)).collect()).await;
    for (id, r) in ids.iter().zip(&started) {
        assert_eq!(&r.as_ref().expect("started").id, id);
    }
    let completed = complete_jobs(
        &svc,
        ids.iter()
            .enumerate()
            .map(|(n, id)| complete_req(id, 1, n as i64))
            .collect(),
    )
    .await;
    for (n, (id, r)) in ids.iter().zip(&completed).enumerate() {
        let job = r.as_ref().expect("completed");
        assert_eq!(&job.id, id);
        // Each job holds its own item's output.
        assert_eq!(job.output, complete_req(id, 1, n as i64).output);
    }
    for id in ids.iter().step_by(37) {
        let events: Vec<String> = svc.events(id).await.into_iter().map(|e| e.0).collect();
        assert_eq!(events, ["created", "started", "succeeded"]);
    }
}

#[tokio::test]
async fn no_items_or_too_many_is_invalid_and_changes_nothing() {
    let svc = Svc::start().await;
    let job = svc.create_kind("echo").await;
    let before = snapshot(&svc.db).await;
    let mut runner = svc.runner.clone();

    let none = runner
        .start_jobs(svc.w(StartJobsRequest { requests: vec![] }))
        .await;
    assert_eq!(code(none), Code::InvalidArgument);
    let none = runner
        .complete_jobs(svc.w(CompleteJobsRequest { requests: vec![] }))
        .await;
    assert_eq!(code(none), Code::InvalidArgument);

    // 1001 items, every one of them a start that would succeed on its own.
    let too_many = vec![start_req(&job.id); 1001];
    let err = runner
        .start_jobs(svc.w(StartJobsRequest { requests: too_many }))
        .await
        .expect_err("1001 items");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("requests"), "{err:?}");
    let too_many = vec![complete_req(&job.id, 1, 0); 1001];
    let err = runner
        .complete_jobs(svc.w(CompleteJobsRequest { requests: too_many }))
        .await
        .expect_err("1001 items");
    assert_eq!(err.code(), Code::InvalidArgument);

    assert_eq!(snapshot(&svc.db).await, before);
    assert_eq!(svc.get(&job.id).await.status(), JobStatus::Queued);
}
