//! Concurrent CreateJob, StartJob and CompleteJob calls share one statement (one commit)
//! per batch; each call still gets its own outcome.

use std::collections::HashMap;

use futures::future::join_all;
use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::*;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::support::{Svc, WORKER_TOKEN};

async fn create_many(svc: &Svc, n: usize) -> Vec<String> {
    let requests = (0..n)
        .map(|_| CreateJobRequest {
            kind: "echo".into(),
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
        .into_iter()
        .map(|j| j.id)
        .collect()
}

async fn start(
    runner: &JobRunnerServiceClient<Channel>,
    id: &str,
    worker_id: impl Into<String>,
) -> Result<Job, tonic::Status> {
    runner
        .clone()
        .start_job(keel_shared::testing::authed(
            StartJobRequest {
                id: id.into(),
                worker_id: worker_id.into(),
                ..Default::default()
            },
            WORKER_TOKEN,
        ))
        .await
        .map(|r| r.into_inner().job.unwrap())
}

fn output(n: usize) -> prost_types::Struct {
    keel_shared::json::json_to_struct(&serde_json::json!({ "n": n }))
}

async fn complete(
    svc: &Svc,
    id: &str,
    attempt: i32,
    n: usize,
    cancelled: bool,
) -> Result<Job, tonic::Status> {
    svc.runner
        .clone()
        .complete_job(svc.w(CompleteJobRequest {
            id: id.into(),
            attempt,
            output: Some(output(n)),
            cancelled,
            worker_id: format!("w-{n}"),
        }))
        .await
        .map(|r| r.into_inner().job.unwrap())
}

/// How many of these jobs' history rows record `event`, per job.
async fn event_counts(svc: &Svc, ids: &[String], event: &str) -> HashMap<String, i64> {
    let ids: Vec<Uuid> = ids.iter().map(|id| Uuid::parse_str(id).unwrap()).collect();
    let client = svc.db.pool.get().await.unwrap();
    client
        .query(
            "SELECT job_id, count(*) FROM job_events
             WHERE job_id = ANY($1) AND event = $2 GROUP BY job_id",
            &[&ids, &event],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, Uuid>(0).to_string(), r.get(1)))
        .collect()
}

/// Distinct transactions that last wrote these jobs.
async fn writers(svc: &Svc, ids: &[String]) -> i64 {
    let ids: Vec<Uuid> = ids.iter().map(|id| Uuid::parse_str(id).unwrap()).collect();
    let client = svc.db.pool.get().await.unwrap();
    client
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM jobs WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0)
}

fn refused(result: &Result<Job, tonic::Status>, code: Code, says: &str) {
    let status = result.as_ref().expect_err("expected a refusal");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
}

#[tokio::test]
async fn concurrent_starts_and_completions_of_distinct_jobs_each_apply_once() {
    let svc = Svc::start().await;
    let ids = create_many(&svc, 64).await;

    let started = join_all(
        ids.iter()
            .enumerate()
            .map(|(i, id)| start(&svc.runner, id, format!("w-{i}"))),
    )
    .await;
    for (id, r) in ids.iter().zip(&started) {
        let job = r.as_ref().expect("start");
        assert_eq!((&job.id, job.attempt), (id, 1));
        assert_eq!(job.status(), JobStatus::Running);
    }
    assert!(
        writers(&svc, &ids).await < ids.len() as i64,
        "the starts were not coalesced"
    );
    // Each job recorded its own caller's worker id.
    let client = svc.db.pool.get().await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        let worker: String = client
            .query_one(
                "SELECT worker_id FROM jobs WHERE id = $1",
                &[&Uuid::parse_str(id).unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(worker, format!("w-{i}"));
    }
    let counts = event_counts(&svc, &ids, "started").await;
    assert!(
        ids.iter().all(|id| counts.get(id) == Some(&1)),
        "{counts:?}"
    );
    assert_eq!(
        svc.outbox_len().await,
        0,
        "a started job's delivery is done"
    );

    let completed = join_all(
        ids.iter()
            .enumerate()
            .map(|(i, id)| complete(&svc, id, 1, i, false)),
    )
    .await;
    for (i, r) in completed.iter().enumerate() {
        let job = r.as_ref().expect("complete");
        assert_eq!(job.status(), JobStatus::Succeeded);
        // Each job holds its own caller's output.
        assert_eq!(job.output, Some(output(i)));
    }
    assert!(
        writers(&svc, &ids).await < ids.len() as i64,
        "the completions were not coalesced"
    );
    let counts = event_counts(&svc, &ids, "succeeded").await;
    assert!(
        ids.iter().all(|id| counts.get(id) == Some(&1)),
        "{counts:?}"
    );
}

#[tokio::test]
async fn concurrent_duplicate_starts_start_the_job_once() {
    let svc = Svc::start().await;
    let job = svc.create_kind("echo").await;
    let others = create_many(&svc, 10).await;
    // Duplicates interleaved with other jobs' starts, so batches hold both.
    let calls = (0..20)
        .map(|_| job.id.as_str())
        .chain(others.iter().map(String::as_str));
    let results = join_all(calls.map(|id| start(&svc.runner, id, "w-1"))).await;
    let (dups, rest) = results.split_at(20);
    assert_eq!(dups.iter().filter(|r| r.is_ok()).count(), 1, "{dups:?}");
    for r in dups.iter().filter(|r| r.is_err()) {
        refused(r, Code::FailedPrecondition, "already running");
    }
    assert!(rest.iter().all(|r| r.is_ok()), "{rest:?}");
    assert_eq!(svc.get(&job.id).await.attempt, 1);
    let events: Vec<String> = svc.events(&job.id).await.into_iter().map(|e| e.0).collect();
    assert_eq!(events, ["created", "started"]);
}

#[tokio::test]
async fn concurrent_starts_each_get_their_own_refusal() {
    let svc = Svc::start().await;
    let due = create_many(&svc, 8).await;
    let later = svc
        .create(CreateJobRequest {
            kind: "later".into(),
            run_at: Some(prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() + 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
    let running = svc.create_kind("echo").await;
    svc.start_job(&running.id).await.unwrap();
    let done = svc.create_kind("echo").await;
    svc.start_job(&done.id).await.unwrap();
    svc.complete_job(&done.id, 1, false).await.unwrap();
    let cancelled = svc.create_kind("echo").await;
    svc.jobs
        .clone()
        .cancel_job(svc.u(CancelJobRequest {
            id: cancelled.id.clone(),
        }))
        .await
        .unwrap();
    let unknown = Uuid::now_v7().to_string();

    let refused_ids = [&later.id, &running.id, &done.id, &cancelled.id, &unknown];
    let calls = due
        .iter()
        .chain(refused_ids)
        .map(|id| start(&svc.runner, id, "w-1"));
    let results = join_all(calls).await;
    let (ok, rest) = results.split_at(due.len());
    assert!(ok.iter().all(|r| r.is_ok()), "{ok:?}");
    refused(&rest[0], Code::FailedPrecondition, "not due until");
    refused(&rest[1], Code::FailedPrecondition, "already running");
    refused(&rest[2], Code::FailedPrecondition, "already succeeded");
    refused(&rest[3], Code::FailedPrecondition, "already cancelled");
    assert_eq!(rest[4].as_ref().unwrap_err().code(), Code::NotFound);
    assert_eq!(svc.get(&later.id).await.status(), JobStatus::Queued);
    assert_eq!(svc.get(&running.id).await.attempt, 1);
}

#[tokio::test]
async fn concurrent_completions_each_get_their_own_outcome() {
    let svc = Svc::start_with(|c| {
        c.retry_base_ms = 1;
        c.retry_max_ms = 2;
    })
    .await;
    let ids = create_many(&svc, 7).await;
    let [ok, cancel, stale, queued, finished, dup, attempts] =
        <[String; 7]>::try_from(ids).unwrap();
    for id in [&ok, &cancel, &stale, &finished, &dup, &attempts] {
        svc.start_job(id).await.unwrap();
    }
    svc.complete_job(&finished, 1, false).await.unwrap();
    // `stale` and `attempts` run their second attempt.
    for id in [&stale, &attempts] {
        svc.fail_job(id, 1, true).await.unwrap();
        assert_eq!(svc.start_when_due(id).await.job.unwrap().attempt, 2);
    }
    let unknown = Uuid::now_v7().to_string();

    let mut calls = vec![
        (ok.clone(), 1, false),
        (cancel.clone(), 1, true),
        (stale.clone(), 1, false),
        (queued.clone(), 1, false),
        (finished.clone(), 1, false),
        (unknown, 1, false),
        // A stale attempt queued before the running one must not shadow it.
        (attempts.clone(), 1, false),
        (attempts.clone(), 2, false),
        (attempts.clone(), 3, false),
    ];
    calls.extend((0..10).map(|_| (dup.clone(), 1, false)));
    let results = join_all(
        calls
            .iter()
            .enumerate()
            .map(|(n, (id, attempt, cancelled))| complete(&svc, id, *attempt, n, *cancelled)),
    )
    .await;

    let done = results[0].as_ref().unwrap();
    assert_eq!(done.status(), JobStatus::Succeeded);
    assert_eq!(done.output, Some(output(0)));
    assert_eq!(results[1].as_ref().unwrap().status(), JobStatus::Cancelled);
    refused(
        &results[2],
        Code::FailedPrecondition,
        "attempt 1 is stale: the job is running attempt 2",
    );
    refused(
        &results[3],
        Code::FailedPrecondition,
        "attempt 1 is over: the job is queued again",
    );
    refused(&results[4], Code::FailedPrecondition, "already succeeded");
    assert_eq!(results[5].as_ref().unwrap_err().code(), Code::NotFound);
    assert_eq!(
        results[7]
            .as_ref()
            .expect("the running attempt completes")
            .output,
        Some(output(7))
    );
    for r in [&results[6], &results[8]] {
        assert_eq!(r.as_ref().unwrap_err().code(), Code::FailedPrecondition);
    }
    let dups = &results[9..];
    assert_eq!(dups.iter().filter(|r| r.is_ok()).count(), 1, "{dups:?}");
    for r in dups.iter().filter(|r| r.is_err()) {
        refused(r, Code::FailedPrecondition, "already succeeded");
    }

    assert_eq!(svc.get(&stale).await.status(), JobStatus::Running);
    assert_eq!(svc.get(&queued).await.status(), JobStatus::Queued);
    let all = [ok, cancel, finished, dup, attempts];
    let succeeded = event_counts(&svc, &all, "succeeded").await;
    let cancelled = event_counts(&svc, &all, "cancelled").await;
    let ended: HashMap<&String, i64> = all
        .iter()
        .map(|id| {
            let n = succeeded.get(id).unwrap_or(&0) + cancelled.get(id).unwrap_or(&0);
            (id, n)
        })
        .collect();
    assert!(ended.values().all(|&n| n == 1), "{ended:?}");
}

/// A statement that fails as a whole fails every call in its batch; the
/// next batch runs normally.
#[tokio::test]
async fn a_failed_batch_fails_each_of_its_calls_and_the_next_one_works() {
    let svc = Svc::start().await;
    let ids = create_many(&svc, 16).await;
    let client = svc.db.pool.get().await.unwrap();
    client
        .batch_execute(
            "ALTER TABLE job_events ADD CONSTRAINT no_starts CHECK (event <> 'started') NOT VALID",
        )
        .await
        .unwrap();
    let results = join_all(ids.iter().map(|id| start(&svc.runner, id, "w-1"))).await;
    for r in &results {
        assert_eq!(r.as_ref().unwrap_err().code(), Code::Internal, "{r:?}");
    }
    for id in &ids {
        assert_eq!(svc.get(id).await.status(), JobStatus::Queued);
    }
    client
        .batch_execute("ALTER TABLE job_events DROP CONSTRAINT no_starts")
        .await
        .unwrap();
    let results = join_all(ids.iter().map(|id| start(&svc.runner, id, "w-1"))).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
}

/// Two replicas starting the same jobs in opposite orders: every job starts
/// once, every other call is refused, none deadlocks (rows are locked in id order).
#[tokio::test]
async fn replicas_starting_the_same_jobs_never_deadlock() {
    let svc = Svc::start().await;
    let replica = svc.replica(|_| {}).await;
    for _ in 0..5 {
        let ids = create_many(&svc, 100).await;
        let forward = ids.iter().map(|id| start(&svc.runner, id, "w-a"));
        let backward = ids.iter().rev().map(|id| start(&replica.runner, id, "w-b"));
        let (a, b) = futures::join!(join_all(forward), join_all(backward));
        let mut started = 0;
        for r in a.iter().chain(&b) {
            match r {
                Ok(_) => started += 1,
                Err(s) => {
                    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                    assert!(s.message().contains("already running"), "{s:?}");
                }
            }
        }
        assert_eq!(started, ids.len());
        let counts = event_counts(&svc, &ids, "started").await;
        assert!(
            ids.iter().all(|id| counts.get(id) == Some(&1)),
            "{counts:?}"
        );
    }
}

async fn create_one(svc: &Svc, token: &str, n: usize, key: &str) -> Result<Job, tonic::Status> {
    svc.jobs
        .clone()
        .create_job(keel_shared::testing::authed(
            CreateJobRequest {
                kind: "echo".into(),
                payload: Some(output(n)),
                idempotency_key: key.into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(|r| r.into_inner().job.unwrap())
}

#[tokio::test]
async fn concurrent_creates_of_two_users_share_statements_and_each_gets_its_own_job() {
    // No worker reads the stream here: with the fairness bound (at least 32
    // entries undelivered) only a race let all 64 in at once. Unbounded,
    // every job is published as soon as it is committed.
    let svc = Svc::start_with(|c| c.stream_backlog = 0).await;
    let (bob, bob_token) = svc.other_user().await;
    let calls = (0..64).map(|n| {
        let svc = &svc;
        let token = if n % 2 == 0 {
            svc.token.clone()
        } else {
            bob_token.clone()
        };
        async move { (n, create_one(svc, &token, n, "").await) }
    });
    let mut ids = Vec::new();
    for (n, created) in join_all(calls).await {
        let job = created.expect("CreateJob");
        let owner = if n % 2 == 0 { svc.user } else { bob };
        assert_eq!(
            job.user_id,
            owner.to_string(),
            "job {n} belongs to its caller"
        );
        assert_eq!(job.payload, Some(output(n)), "job {n} has its own payload");
        assert_eq!(job.status, JobStatus::Queued as i32);
        ids.push(job.id);
    }
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 64);
    assert!(
        writers(&svc, &ids).await < 64,
        "64 concurrent CreateJob calls were not coalesced"
    );
    let created = event_counts(&svc, &ids, "created").await;
    assert!(
        ids.iter().all(|id| created.get(id) == Some(&1)),
        "{created:?}"
    );
    // Each is delivered once it is committed.
    svc.wait_delivered().await;
    let delivered = svc.stream_counts().await;
    assert!(
        ids.iter().all(|id| delivered.get(id) == Some(&1)),
        "{delivered:?}"
    );
}

#[tokio::test]
async fn concurrent_creates_with_one_idempotency_key_make_one_job() {
    let svc = Svc::start().await;
    let calls = (0..20).map(|n| create_one(&svc, &svc.token, n, "same-key"));
    let ids: Vec<String> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("CreateJob with a key").id)
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let client = svc.db.pool.get().await.unwrap();
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM jobs WHERE idempotency_key = 'same-key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_deleted_users_create_fails_alone() {
    let svc = Svc::start().await;
    let (gone, gone_token) = svc.other_user().await;
    let client = svc.db.pool.get().await.unwrap();
    client
        .execute("DELETE FROM users WHERE id = $1", &[&gone])
        .await
        .unwrap();
    let calls = (0..40).map(|n| {
        let svc = &svc;
        let token = if n % 4 == 0 {
            gone_token.clone()
        } else {
            svc.token.clone()
        };
        async move { (n, create_one(svc, &token, n, "").await) }
    });
    for (n, created) in join_all(calls).await {
        if n % 4 == 0 {
            let status = created.expect_err("a deleted user's token creates nothing");
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        } else {
            created.expect("the other callers in its batch are not affected");
        }
    }
    assert_eq!(svc.count("SELECT count(*) FROM jobs").await, 30);
}

/// Job inserts of this test's service waiting for a lock (the statement
/// inserts into `job_events` after `jobs`; Postgres shows only the start of
/// a long statement's text).
async fn inserts_waiting_for_a_lock(svc: &Svc) -> i64 {
    svc.count(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE '%INSERT INTO jobs (id, user_id, kind%'",
    )
    .await
}

#[tokio::test]
async fn a_flood_of_batch_creates_leaves_pooled_connections_to_other_calls() {
    // Four pooled connections. Before BatchCreateJobs inserts took turns,
    // eight of them in flight held all four, and every other call (reads,
    // the workers' transitions, the relay) queued behind them for the pool.
    let svc = Svc::start_with(|c| c.database.db_pool_size = 4).await;
    let earlier = svc.create_kind("echo").await;
    // Every insert stalls behind this lock until it is released.
    let mut holder = svc.db.pool.get().await.unwrap();
    let lock = holder.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE job_events IN SHARE MODE")
        .await
        .unwrap();

    let flood = join_all((0..8).map(|_| create_many(&svc, 100)));
    let meanwhile = async {
        keel_shared::testing::eventually(
            crate::support::WAIT,
            "two bulk inserts waiting for the lock",
            || async { inserts_waiting_for_a_lock(&svc).await == 2 },
        )
        .await;
        // Another call still gets a connection while the flood waits.
        let read = svc.get(&earlier.id).await;
        assert_eq!(read.id, earlier.id);
        assert_eq!(
            inserts_waiting_for_a_lock(&svc).await,
            2,
            "the other six calls wait for their turn, not holding connections"
        );
        lock.commit().await.unwrap();
    };
    let (created, ()) = tokio::join!(flood, meanwhile);

    // Then every call of the flood went through.
    assert!(created.iter().all(|ids| ids.len() == 100), "{created:?}");
    assert_eq!(svc.count("SELECT count(*) FROM jobs").await, 801);
}
