//! AdminService through real gRPC: who may call it, every user's jobs,
//! admin cancel/retry/delete (audited), queue figures, workers, dead
//! letters and schedules.

use std::time::Duration;

use keel_proto::admin::v1 as admin;
use keel_proto::jobs::v1::*;
use keel_shared::testing::{authed, eventually};
use tonic::{Code, Request};
use uuid::Uuid;

use crate::support::{Svc, WORKER_TOKEN, code};

const ADMIN_EMAIL: &str = "ops@example.com";

/// The service and an admin's access token.
async fn with_admin() -> (Svc, String) {
    let svc = Svc::start().await;
    let (_, token) = svc.db.create_admin(ADMIN_EMAIL).await;
    (svc, token)
}

fn a<T>(token: &str, msg: T) -> Request<T> {
    authed(msg, token)
}

async fn audit(svc: &Svc, token: &str) -> Vec<admin::AuditEvent> {
    svc.admin
        .clone()
        .list_audit_events(a(token, admin::ListAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .events
}

/// A job of the test user run to FAILED (no retries left).
async fn failed_job(svc: &Svc, kind: &str) -> Job {
    let job = svc
        .create(CreateJobRequest {
            kind: kind.into(),
            max_attempts: 1,
            ..Default::default()
        })
        .await;
    svc.start_when_due(&job.id).await;
    svc.fail_job(&job.id, 1, false).await.unwrap()
}

/// An API key of `user_id`, stored as auth stores one.
async fn api_key_of(svc: &Svc, user_id: Uuid) -> String {
    let key = format!("keel_{}", "A".repeat(43));
    let digest = keel_shared::identity::api_key_digest(&key);
    let client = svc.db.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO api_keys (id, user_id, name, prefix, key_hash) VALUES ($1, $2, 'k', 'keel_AAAAAAAA', $3)",
            &[&Uuid::now_v7(), &user_id, &digest.as_slice()],
        )
        .await
        .unwrap();
    key
}

#[tokio::test]
async fn only_signed_in_admins_get_in() {
    let svc = Svc::start().await;
    let (admin_id, admin_token) = svc.db.create_admin(ADMIN_EMAIL).await;
    let key = api_key_of(&svc, admin_id).await;
    let client = svc.admin.clone();
    let refused = [
        (None, Code::Unauthenticated),
        (Some("garbage"), Code::Unauthenticated),
        (Some(svc.token.as_str()), Code::PermissionDenied),
        (Some(WORKER_TOKEN), Code::PermissionDenied),
        (Some(key.as_str()), Code::PermissionDenied),
    ];
    for (token, want) in refused {
        let mut c = client.clone();
        assert_eq!(
            code(
                c.list_jobs(authed_or(token, admin::ListJobsRequest::default()))
                    .await
            ),
            want,
            "{token:?}"
        );
        let mut c = client.clone();
        assert_eq!(
            code(
                c.get_queue_stats(authed_or(token, admin::GetQueueStatsRequest {}))
                    .await
            ),
            want
        );
        let mut c = client.clone();
        assert_eq!(
            code(
                c.retry_job(authed_or(
                    token,
                    admin::RetryJobRequest {
                        id: Uuid::now_v7().to_string()
                    }
                ))
                .await
            ),
            want
        );
        let mut c = client.clone();
        assert_eq!(
            code(
                c.list_audit_events(authed_or(token, admin::ListAuditEventsRequest::default()))
                    .await
            ),
            want
        );
        let mut c = client.clone();
        assert_eq!(
            code(
                c.list_dead_letters(authed_or(token, admin::ListDeadLettersRequest::default()))
                    .await
            ),
            want
        );
    }
    client
        .clone()
        .list_jobs(a(&admin_token, admin::ListJobsRequest::default()))
        .await
        .expect("an admin gets in");

    // The role revoked: refused within the credential cache period (1 s here).
    let db = svc.db.pool.get().await.unwrap();
    db.execute("DELETE FROM admins WHERE user_id = $1", &[&admin_id])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the revoked admin is refused",
        || {
            let mut c = client.clone();
            let token = admin_token.clone();
            async move {
                c.list_jobs(a(&token, admin::ListJobsRequest::default()))
                    .await
                    .is_err_and(|e| e.code() == Code::PermissionDenied)
            }
        },
    )
    .await;
}

fn authed_or<T>(token: Option<&str>, msg: T) -> Request<T> {
    match token {
        Some(t) => authed(msg, t),
        None => Request::new(msg),
    }
}

#[tokio::test]
async fn jobs_of_every_user_are_listed_filtered_and_paged() {
    let (svc, token) = with_admin().await;
    let (other, other_token) = svc.other_user().await;
    let mine = svc.create_kind("echo").await;
    let failed = failed_job(&svc, "flaky").await;
    let theirs = svc
        .jobs
        .clone()
        .create_job(authed(
            CreateJobRequest {
                kind: "echo".into(),
                ..Default::default()
            },
            &other_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let list = |req: admin::ListJobsRequest| {
        let mut c = svc.admin.clone();
        let token = token.clone();
        async move { c.list_jobs(a(&token, req)).await.map(|r| r.into_inner()) }
    };
    let ids = |r: &admin::ListJobsResponse| r.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>();

    let all = list(Default::default()).await.unwrap();
    assert_eq!(
        ids(&all),
        [theirs.id.clone(), failed.id.clone(), mine.id.clone()]
    );
    let by_user = list(admin::ListJobsRequest {
        user_id: other.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&by_user), [theirs.id.as_str()]);
    let by_status = list(admin::ListJobsRequest {
        status: JobStatus::Failed as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&by_status), [failed.id.as_str()]);
    let by_kind = list(admin::ListJobsRequest {
        kind: "echo".into(),
        page_size: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&by_kind), [theirs.id.as_str()]);
    let next = list(admin::ListJobsRequest {
        kind: "echo".into(),
        page_size: 1,
        page_token: by_kind.next_page_token.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&next), [mine.id.as_str()]);
    assert!(next.next_page_token.is_empty());
    let future = testing_time(chrono::Utc::now() + chrono::Duration::hours(1));
    let none = list(admin::ListJobsRequest {
        created_after: Some(future),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(none.jobs.is_empty());
    let before_future = list(admin::ListJobsRequest {
        created_before: Some(future),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(before_future.jobs.len(), 3);

    // GetJob: any user's job, with its history oldest first.
    let got = svc
        .admin
        .clone()
        .get_job(a(
            &token,
            admin::GetJobRequest {
                id: failed.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.job.unwrap().status, JobStatus::Failed as i32);
    let events: Vec<_> = got.events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["created", "started", "failed"]);

    // Bad input names the field.
    let bad = [
        (
            admin::ListJobsRequest {
                user_id: "nope".into(),
                ..Default::default()
            },
            "user_id",
        ),
        (
            admin::ListJobsRequest {
                page_token: "garbage!".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            admin::ListJobsRequest {
                kind: "Bad Kind".into(),
                ..Default::default()
            },
            "kind",
        ),
        (
            admin::ListJobsRequest {
                status: 99,
                ..Default::default()
            },
            "status",
        ),
        (
            admin::ListJobsRequest {
                created_after: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..Default::default()
            },
            "created_after",
        ),
        (
            admin::ListJobsRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
        (
            // A token of another filter.
            admin::ListJobsRequest {
                kind: "flaky".into(),
                page_token: by_kind.next_page_token.clone(),
                ..Default::default()
            },
            "page_token",
        ),
    ];
    for (req, field) in bad {
        let got = list(req).await.unwrap_err();
        assert_invalid(&got, field);
    }
    for id in ["", "nope"] {
        let got = svc
            .admin
            .clone()
            .get_job(a(&token, admin::GetJobRequest { id: id.into() }))
            .await
            .unwrap_err();
        assert_invalid(&got, "id");
    }
    let got = svc
        .admin
        .clone()
        .get_job(a(
            &token,
            admin::GetJobRequest {
                id: Uuid::now_v7().to_string(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::NotFound);
}

fn testing_time(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    keel_shared::time::to_timestamp(t)
}

#[tokio::test]
async fn admins_cancel_retry_and_delete_any_users_job_and_each_is_audited() {
    let (svc, token) = with_admin().await;
    let failed = failed_job(&svc, "flaky").await;
    let retried = svc
        .admin
        .clone()
        .retry_job(a(
            &token,
            admin::RetryJobRequest {
                id: failed.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(retried.status, JobStatus::Queued as i32);
    assert_eq!(retried.attempt, 0);
    // The owner sees it queued again, as after their own RetryJob.
    assert_eq!(svc.get(&failed.id).await.status, JobStatus::Queued as i32);
    // Retrying it again is refused with RetryJob's code, and records nothing.
    let got = svc
        .admin
        .clone()
        .retry_job(a(
            &token,
            admin::RetryJobRequest {
                id: failed.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::FailedPrecondition, "{got:?}");
    let got = svc
        .admin
        .clone()
        .delete_job(a(
            &token,
            admin::DeleteJobRequest {
                id: failed.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        got.code(),
        Code::FailedPrecondition,
        "a queued job is not deleted"
    );

    let cancelled = svc
        .admin
        .clone()
        .cancel_job(a(
            &token,
            admin::CancelJobRequest {
                id: failed.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled as i32);
    let got = svc
        .admin
        .clone()
        .cancel_job(a(
            &token,
            admin::CancelJobRequest {
                id: failed.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::FailedPrecondition);

    svc.admin
        .clone()
        .delete_job(a(
            &token,
            admin::DeleteJobRequest {
                id: failed.id.clone(),
            },
        ))
        .await
        .unwrap();
    let got = svc
        .jobs
        .clone()
        .get_job(svc.u(GetJobRequest {
            id: failed.id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::NotFound, "deleted for its owner too");
    for id in ["", "x"] {
        let got = svc
            .admin
            .clone()
            .cancel_job(a(&token, admin::CancelJobRequest { id: id.into() }))
            .await
            .unwrap_err();
        assert_invalid(&got, "id");
    }
    let got = svc
        .admin
        .clone()
        .retry_job(a(
            &token,
            admin::RetryJobRequest {
                id: Uuid::now_v7().to_string(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::NotFound);

    let events = audit(&svc, &token).await;
    let actions: Vec<_> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["job.delete", "job.cancel", "job.retry"],
        "newest first, refusals not recorded"
    );
    for e in &events {
        assert_eq!(e.admin_email, ADMIN_EMAIL);
        assert_eq!(e.target, format!("job:{}", failed.id));
        let detail = e.detail.as_ref().unwrap();
        assert!(detail.fields.contains_key("user_id"), "{detail:?}");
    }
    // Paging through the audit trail.
    let first = svc
        .admin
        .clone()
        .list_audit_events(a(
            &token,
            admin::ListAuditEventsRequest {
                page_size: 2,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.events.len(), 2);
    let rest = svc
        .admin
        .clone()
        .list_audit_events(a(
            &token,
            admin::ListAuditEventsRequest {
                page_size: 2,
                page_token: first.next_page_token,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.events.len(), 1);
    assert_eq!(rest.events[0].action, "job.retry");
    assert!(rest.next_page_token.is_empty());
    let got = svc
        .admin
        .clone()
        .list_audit_events(a(
            &token,
            admin::ListAuditEventsRequest {
                page_size: 0,
                page_token: "bad".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_invalid(&got, "page_token");
}

#[tokio::test]
async fn queue_stats_count_queued_due_running_and_the_last_hour() {
    let (svc, token) = with_admin().await;
    // Kinds no stream worker serves: nothing but these calls moves them.
    for _ in 0..3 {
        svc.create_kind("stats.a").await;
    }
    let _later = svc
        .create(CreateJobRequest {
            kind: "stats.a".into(),
            run_at: Some(testing_time(
                chrono::Utc::now() + chrono::Duration::hours(1),
            )),
            ..Default::default()
        })
        .await;
    let claimed = svc
        .runner
        .clone()
        .claim_jobs(svc.w(ClaimJobsRequest {
            worker_id: "claimer".into(),
            kinds: vec!["stats.a".into()],
            max_jobs: 1,
            wait: None,
        }))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(claimed.len(), 1);
    failed_job(&svc, "stats.b").await;

    let stats = svc
        .admin
        .clone()
        .get_queue_stats(a(&token, admin::GetQueueStatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(stats.as_of.is_some());
    let kinds: Vec<_> = stats.kinds.iter().map(|k| k.kind.as_str()).collect();
    assert_eq!(kinds, ["stats.a", "stats.b"], "sorted by kind");
    let a_ = &stats.kinds[0];
    assert_eq!((a_.queued, a_.due, a_.running), (3, 2, 1), "{a_:?}");
    assert!(a_.oldest_due_age.is_some());
    assert_eq!(a_.started_per_minute.len(), 60);
    assert_eq!(a_.started_per_minute.iter().sum::<i64>(), 1);
    assert_eq!(a_.finished_per_minute.iter().sum::<i64>(), 0);
    let b = &stats.kinds[1];
    assert_eq!((b.queued, b.due, b.running), (0, 0, 0));
    assert!(b.oldest_due_age.is_none());
    assert_eq!(b.started_per_minute.iter().sum::<i64>(), 1);
    assert_eq!(b.finished_per_minute.iter().sum::<i64>(), 1);
    assert_eq!(b.failed_per_minute.iter().sum::<i64>(), 1);
    assert_eq!(b.finished_per_minute.len(), 60);
    assert_eq!(b.failed_per_minute.len(), 60);
}

#[tokio::test]
async fn workers_are_listed_from_their_calls() {
    let (svc, token) = with_admin().await;
    svc.runner
        .clone()
        .claim_jobs(svc.w(ClaimJobsRequest {
            worker_id: "claimer/1".into(),
            kinds: vec!["resize".into(), "ocr".into()],
            max_jobs: 4,
            wait: None,
        }))
        .await
        .unwrap();
    let job = svc.create_kind("echo").await;
    svc.start_when_due(&job.id).await; // as worker "w-1"
    let client = svc.admin.clone();
    eventually(Duration::from_secs(10), "both workers listed", || {
        let mut c = client.clone();
        let token = token.clone();
        async move {
            let workers = c
                .list_workers(a(&token, admin::ListWorkersRequest {}))
                .await
                .unwrap()
                .into_inner()
                .workers;
            let claimer = workers.iter().find(|w| w.worker_id == "claimer/1");
            let streamer = workers.iter().find(|w| w.worker_id == "w-1");
            matches!((claimer, streamer), (Some(c), Some(s))
                if c.kinds == ["resize", "ocr"] && c.concurrency == 4 && c.running_jobs == 0
                    && s.kinds == ["echo"] && s.running_jobs == 1 && s.last_seen_at.is_some())
        }
    })
    .await;
}

/// Adds a dead-letter entry as the worker writes one; returns its id.
async fn dead_letter(svc: &Svc, job_id: Option<&str>, reason: &str) -> String {
    let pool = keel_shared::redis::pool(&svc.redis_config).unwrap();
    let mut conn = pool.get().await.unwrap();
    let mut cmd = redis::cmd("XADD");
    cmd.arg(svc.redis_config.dead_letter_stream()).arg("*");
    if let Some(job_id) = job_id {
        cmd.arg(keel_shared::queue::FIELD_JOB_ID).arg(job_id);
    }
    use keel_shared::queue::dead_letter as f;
    cmd.arg(f::FIELD_STREAM)
        .arg(format!("{}:jobs:echo", svc.redis_config.redis_prefix))
        .arg(f::FIELD_REASON)
        .arg(reason)
        .arg(f::FIELD_DELIVERIES)
        .arg(5)
        .arg(f::FIELD_CONSUMER)
        .arg("w-9");
    cmd.query_async(&mut *conn).await.unwrap()
}

#[tokio::test]
async fn dead_letters_are_listed_newest_first_and_replayed() {
    let (svc, token) = with_admin().await;
    let failed = failed_job(&svc, "flaky").await;
    let running = svc.create_kind("echo").await;
    svc.start_when_due(&running.id).await;
    let e_failed = dead_letter(&svc, Some(&failed.id), "max deliveries").await;
    let e_nojob = dead_letter(&svc, None, "malformed").await;
    let e_running = dead_letter(&svc, Some(&running.id), "max deliveries").await;

    let mut c = svc.admin.clone();
    let page = c
        .list_dead_letters(a(
            &token,
            admin::ListDeadLettersRequest {
                page_size: 2,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = page.dead_letters.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids, [e_running.clone(), e_nojob.clone()]);
    assert_eq!(page.dead_letters[1].job_id, "");
    assert_eq!(page.dead_letters[0].deliveries, 5);
    assert_eq!(page.dead_letters[0].consumer, "w-9");
    assert!(page.dead_letters[0].dead_lettered_at.is_some());
    let rest = c
        .list_dead_letters(a(
            &token,
            admin::ListDeadLettersRequest {
                page_size: 2,
                page_token: page.next_page_token,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.dead_letters.len(), 1);
    assert_eq!(rest.dead_letters[0].job_id, failed.id);
    assert!(rest.next_page_token.is_empty());

    let replay = |id: &str| {
        let mut c = svc.admin.clone();
        let req = a(&token, admin::ReplayDeadLetterRequest { id: id.into() });
        async move { c.replay_dead_letter(req).await.map(|r| r.into_inner()) }
    };
    assert_eq!(
        replay(&e_nojob).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        replay(&e_running).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(replay("1-0").await.unwrap_err().code(), Code::NotFound);
    for bad in ["", "nope", "+", "(1-0"] {
        let got = replay(bad).await.unwrap_err();
        assert_invalid(&got, "id");
    }
    let job = replay(&e_failed).await.unwrap().job.unwrap();
    assert_eq!(job.id, failed.id);
    assert_eq!(job.status, JobStatus::Queued as i32);
    assert_eq!(
        replay(&e_failed).await.unwrap_err().code(),
        Code::NotFound,
        "the entry is gone"
    );
    let left: Vec<_> = c
        .list_dead_letters(a(&token, admin::ListDeadLettersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, [e_running, e_nojob]);
    let events = audit(&svc, &token).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, "dead_letter.replay");
    assert_eq!(events[0].target, format!("job:{}", failed.id));
    let got = c
        .list_dead_letters(a(
            &token,
            admin::ListDeadLettersRequest {
                page_size: 0,
                page_token: "junk".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn schedules_of_every_user_are_listed_paused_and_resumed() {
    let (svc, token) = with_admin().await;
    let (other, other_token) = svc.other_user().await;
    let create = |tok: &str, name: &str| {
        let mut c = svc.schedules.clone();
        let req = authed(
            CreateScheduleRequest {
                name: name.into(),
                cron: "@hourly".into(),
                timezone: "UTC".into(),
                kind: "echo".into(),
                ..Default::default()
            },
            tok,
        );
        async move {
            c.create_schedule(req)
                .await
                .unwrap()
                .into_inner()
                .schedule
                .unwrap()
        }
    };
    let mine = create(&svc.token, "mine").await;
    let theirs = create(&other_token, "theirs").await;
    let mut c = svc.admin.clone();
    let all = c
        .list_schedules(a(&token, admin::ListSchedulesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = all.schedules.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, [theirs.id.clone(), mine.id.clone()]);
    let one = c
        .list_schedules(a(
            &token,
            admin::ListSchedulesRequest {
                user_id: other.to_string(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.schedules.len(), 1);
    assert_eq!(one.schedules[0].id, theirs.id);

    let paused = c
        .pause_schedule(a(
            &token,
            admin::PauseScheduleRequest {
                id: theirs.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(paused.paused);
    let seen = svc
        .schedules
        .clone()
        .get_schedule(authed(
            GetScheduleRequest {
                id: theirs.id.clone(),
            },
            &other_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(seen.paused, "paused for its owner");
    let resumed = c
        .resume_schedule(a(
            &token,
            admin::ResumeScheduleRequest {
                id: theirs.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(!resumed.paused);

    for id in ["", "nope"] {
        let got = c
            .pause_schedule(a(&token, admin::PauseScheduleRequest { id: id.into() }))
            .await
            .unwrap_err();
        assert_invalid(&got, "id");
    }
    let got = c
        .resume_schedule(a(
            &token,
            admin::ResumeScheduleRequest {
                id: Uuid::now_v7().to_string(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::NotFound);
    let got = c
        .list_schedules(a(
            &token,
            admin::ListSchedulesRequest {
                user_id: "x".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_invalid(&got, "user_id");
    let got = c
        .pause_schedule(a(
            &svc.token,
            admin::PauseScheduleRequest {
                id: mine.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(got.code(), Code::PermissionDenied, "its owner is no admin");

    let actions: Vec<_> = audit(&svc, &token)
        .await
        .into_iter()
        .map(|e| (e.action, e.target))
        .collect();
    assert_eq!(
        actions,
        [
            (
                "schedule.resume".to_string(),
                format!("schedule:{}", theirs.id)
            ),
            (
                "schedule.pause".to_string(),
                format!("schedule:{}", theirs.id)
            ),
        ]
    );
}

/// `got` is INVALID_ARGUMENT and its message starts with the field it names.
fn assert_invalid(got: &tonic::Status, field: &str) {
    assert_eq!(got.code(), Code::InvalidArgument, "{field}: {got:?}");
    assert!(got.message().starts_with(field), "{field}: {got:?}");
}
