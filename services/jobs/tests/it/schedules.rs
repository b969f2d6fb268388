//! ScheduleService: a user's cron schedules (create, read, list, update,
//! pause/resume, delete), refused input, per-user limits, and ticks that
//! create jobs a worker runs: one per tick, one catch-up job at most after
//! downtime, none while paused.

use std::time::Duration;

use futures::future::join_all;
use keel_proto::jobs::v1::*;
use keel_shared::json::json_to_struct;
use keel_shared::testing;
use serde_json::json;
use tonic::Code;
use uuid::Uuid;

use crate::support::{Svc, WAIT, code};

/// A kind no stream worker serves: its jobs are taken through ClaimJobs.
const KIND: &str = "sched.tick";

/// A service whose ticks may come every second and are looked for often.
async fn fast_svc() -> Svc {
    Svc::start_with(|c| {
        c.schedule_min_interval_secs = 1;
        c.schedule_tick_ms = 50;
    })
    .await
}

fn request(name: &str, cron: &str) -> CreateScheduleRequest {
    CreateScheduleRequest {
        name: name.into(),
        cron: cron.into(),
        kind: KIND.into(),
        payload: Some(json_to_struct(&json!({"report": "daily"}))),
        ..Default::default()
    }
}

async fn create(svc: &Svc, req: CreateScheduleRequest) -> Result<Schedule, tonic::Status> {
    svc.schedules
        .clone()
        .create_schedule(svc.u(req))
        .await
        .map(|r| r.into_inner().schedule.unwrap())
}

async fn get(svc: &Svc, token: &str, id: &str) -> Result<Schedule, tonic::Status> {
    svc.schedules
        .clone()
        .get_schedule(testing::authed(GetScheduleRequest { id: id.into() }, token))
        .await
        .map(|r| r.into_inner().schedule.unwrap())
}

async fn update(
    svc: &Svc,
    token: &str,
    req: UpdateScheduleRequest,
) -> Result<Schedule, tonic::Status> {
    svc.schedules
        .clone()
        .update_schedule(testing::authed(req, token))
        .await
        .map(|r| r.into_inner().schedule.unwrap())
}

async fn delete(svc: &Svc, token: &str, id: &str) -> Result<(), tonic::Status> {
    svc.schedules
        .clone()
        .delete_schedule(testing::authed(
            DeleteScheduleRequest { id: id.into() },
            token,
        ))
        .await
        .map(|_| ())
}

async fn list(svc: &Svc, token: &str, req: ListSchedulesRequest) -> ListSchedulesResponse {
    svc.schedules
        .clone()
        .list_schedules(testing::authed(req, token))
        .await
        .expect("list schedules")
        .into_inner()
}

fn pause(id: &str, paused: bool) -> UpdateScheduleRequest {
    UpdateScheduleRequest {
        id: id.into(),
        paused: Some(paused),
        ..Default::default()
    }
}

/// The caller's jobs of [`KIND`].
async fn scheduled_jobs(svc: &Svc) -> Vec<Job> {
    svc.jobs
        .clone()
        .list_jobs(svc.u(ListJobsRequest {
            kind: KIND.into(),
            page_size: 1000,
            ..Default::default()
        }))
        .await
        .expect("list jobs")
        .into_inner()
        .jobs
}

/// The tick each of the schedule's jobs was created for, oldest first.
async fn ticks(svc: &Svc, schedule_id: &str) -> Vec<chrono::DateTime<chrono::Utc>> {
    let client = svc.db.pool.get().await.unwrap();
    let id = Uuid::parse_str(schedule_id).unwrap();
    client
        .query(
            "SELECT scheduled_for FROM jobs WHERE schedule_id = $1 ORDER BY scheduled_for",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn ts(t: &Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    keel_shared::time::from_timestamp(t.as_ref().expect("timestamp set")).unwrap()
}

#[tokio::test]
async fn a_user_creates_reads_lists_updates_and_deletes_schedules() {
    let svc = Svc::start().await;
    let before = chrono::Utc::now();
    let created = create(&svc, request("nightly", "30 2 * * *"))
        .await
        .unwrap();
    assert!(Uuid::parse_str(&created.id).is_ok());
    assert_eq!(created.user_id, svc.user.to_string());
    assert_eq!(created.name, "nightly");
    assert_eq!(created.cron, "30 2 * * *");
    assert_eq!(created.timezone, "UTC", "empty time zone means UTC");
    assert_eq!(created.kind, KIND);
    assert_eq!(created.max_attempts, 3, "0 means CreateJob's default");
    assert!(!created.paused);
    assert!(created.last_run_at.is_none());
    assert!(created.last_job_id.is_empty());
    let next = ts(&created.next_run_at);
    assert!(next > before && next <= before + chrono::TimeDelta::days(1));
    assert_eq!(
        next.format("%H:%M:%S").to_string(),
        "02:30:00",
        "the next 02:30 UTC"
    );
    assert_eq!(get(&svc, &svc.token, &created.id).await.unwrap(), created);

    // The same name again is ALREADY_EXISTS.
    let dup = create(&svc, request("nightly", "@hourly")).await;
    assert_eq!(code(dup), Code::AlreadyExists);

    // Listing: newest first, paged.
    let second = create(&svc, request("hourly", "@hourly")).await.unwrap();
    let third = create(&svc, request("berlin", "0 9 * * MON-FRI"))
        .await
        .unwrap();
    let page = list(
        &svc,
        &svc.token,
        ListSchedulesRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<_> = page.schedules.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, [third.id.clone(), second.id.clone()]);
    assert!(!page.next_page_token.is_empty());
    let rest = list(
        &svc,
        &svc.token,
        ListSchedulesRequest {
            page_size: 2,
            page_token: page.next_page_token,
        },
    )
    .await;
    assert_eq!(rest.schedules.len(), 1);
    assert_eq!(rest.schedules[0].id, created.id);
    assert!(rest.next_page_token.is_empty());

    // Update: set fields change, unset ones stay; a new rule and time zone
    // move the next tick.
    let updated = update(
        &svc,
        &svc.token,
        UpdateScheduleRequest {
            id: third.id.clone(),
            timezone: Some("Europe/Berlin".into()),
            cron: Some("0 9 * * *".into()),
            priority: Some(7),
            payload: Some(json_to_struct(&json!({"n": 2}))),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(updated.name, "berlin");
    assert_eq!(updated.timezone, "Europe/Berlin");
    assert_eq!(updated.cron, "0 9 * * *");
    assert_eq!(updated.priority, 7);
    assert_eq!(updated.kind, KIND);
    assert_eq!(
        keel_shared::json::struct_to_json(updated.payload.as_ref().unwrap()).unwrap(),
        json!({"n": 2})
    );
    let berlin = ts(&updated.next_run_at).with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(berlin.format("%H:%M").to_string(), "09:00");

    // Pause: no next tick; resume: one again.
    let paused = update(&svc, &svc.token, pause(&second.id, true))
        .await
        .unwrap();
    assert!(paused.paused);
    assert!(paused.next_run_at.is_none());
    let resumed = update(&svc, &svc.token, pause(&second.id, false))
        .await
        .unwrap();
    assert!(!resumed.paused);
    assert!(ts(&resumed.next_run_at) > chrono::Utc::now());
    // Renaming onto another schedule's name is ALREADY_EXISTS.
    let clash = update(
        &svc,
        &svc.token,
        UpdateScheduleRequest {
            id: second.id.clone(),
            name: Some("nightly".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code(clash), Code::AlreadyExists);

    delete(&svc, &svc.token, &second.id).await.unwrap();
    assert_eq!(
        code(get(&svc, &svc.token, &second.id).await),
        Code::NotFound
    );
    assert_eq!(
        code(delete(&svc, &svc.token, &second.id).await),
        Code::NotFound
    );
    let left = list(&svc, &svc.token, ListSchedulesRequest::default()).await;
    assert_eq!(left.schedules.len(), 2);
}

#[tokio::test]
async fn another_users_schedule_is_not_found_and_untouched() {
    let svc = Svc::start().await;
    let mine = create(&svc, request("mine", "@daily")).await.unwrap();
    let (_, other) = svc.other_user().await;

    assert_eq!(code(get(&svc, &other, &mine.id).await), Code::NotFound);
    assert_eq!(
        code(update(&svc, &other, pause(&mine.id, true)).await),
        Code::NotFound
    );
    assert_eq!(code(delete(&svc, &other, &mine.id).await), Code::NotFound);
    assert!(
        list(&svc, &other, ListSchedulesRequest::default())
            .await
            .schedules
            .is_empty()
    );
    // The same name is free for another user.
    let theirs = svc
        .schedules
        .clone()
        .create_schedule(testing::authed(request("mine", "@daily"), &other))
        .await;
    assert!(theirs.is_ok());
    assert_eq!(get(&svc, &svc.token, &mine.id).await.unwrap(), mine);

    // No token at all.
    let anonymous = svc
        .schedules
        .clone()
        .list_schedules(ListSchedulesRequest::default())
        .await;
    assert_eq!(code(anonymous), Code::Unauthenticated);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field_and_changes_nothing() {
    let svc = Svc::start().await;
    let big = "x".repeat(2 * 1024 * 1024);
    let cases: Vec<(&str, CreateScheduleRequest)> = vec![
        ("cron", request("a", "not a cron")),
        ("cron", request("a", "61 * * * *")),
        ("cron", request("a", "* * * *")),
        ("cron", request("a", "")),
        ("cron", request("a", "0 0 30 2 *")),
        // Every 10 s is below the default minimum interval (60 s).
        ("cron", request("a", "*/10 * * * * *")),
        (
            "timezone",
            CreateScheduleRequest {
                timezone: "Mars/Olympus_Mons".into(),
                ..request("a", "@hourly")
            },
        ),
        ("name", request("", "@hourly")),
        ("name", request(&"n".repeat(129), "@hourly")),
        (
            "kind",
            CreateScheduleRequest {
                kind: "Not A Kind!".into(),
                ..request("a", "@hourly")
            },
        ),
        (
            "kind",
            CreateScheduleRequest {
                kind: String::new(),
                ..request("a", "@hourly")
            },
        ),
        (
            "priority",
            CreateScheduleRequest {
                priority: 101,
                ..request("a", "@hourly")
            },
        ),
        (
            "max_attempts",
            CreateScheduleRequest {
                max_attempts: -1,
                ..request("a", "@hourly")
            },
        ),
        (
            "payload",
            CreateScheduleRequest {
                payload: Some(json_to_struct(&json!({ "blob": big }))),
                ..request("a", "@hourly")
            },
        ),
    ];
    for (field, req) in cases {
        let status = create(&svc, req.clone())
            .await
            .expect_err(&format!("{req:?} must be refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "the message names {field}: {:?}",
            status.message()
        );
    }
    assert!(
        list(&svc, &svc.token, ListSchedulesRequest::default())
            .await
            .schedules
            .is_empty(),
        "nothing was created"
    );

    // Updates are validated the same way and leave the schedule as it was.
    let schedule = create(&svc, request("ok", "@hourly")).await.unwrap();
    let bad_updates = [
        (
            "cron",
            UpdateScheduleRequest {
                cron: Some("*/5 * * * * *".into()),
                ..pause(&schedule.id, true)
            },
        ),
        (
            "timezone",
            UpdateScheduleRequest {
                timezone: Some("Nowhere/Atlantis".into()),
                ..Default::default()
            },
        ),
        (
            "max_attempts",
            UpdateScheduleRequest {
                max_attempts: Some(1000),
                ..Default::default()
            },
        ),
        (
            "name",
            UpdateScheduleRequest {
                name: Some(String::new()),
                ..Default::default()
            },
        ),
    ];
    for (field, mut req) in bad_updates {
        req.id = schedule.id.clone();
        let status = update(&svc, &svc.token, req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
    assert_eq!(get(&svc, &svc.token, &schedule.id).await.unwrap(), schedule);

    // Ids and page tokens.
    let status = get(&svc, &svc.token, "not-a-uuid").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("id"));
    let forged = svc
        .schedules
        .clone()
        .list_schedules(svc.u(ListSchedulesRequest {
            page_token: "Zm9yZ2Vk".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(forged), Code::InvalidArgument);
}

#[tokio::test]
async fn the_per_user_limit_holds_under_concurrent_creates() {
    let svc = Svc::start_with(|c| c.schedules_per_user = 3).await;
    let results = join_all((0..8).map(|i| create(&svc, request(&format!("s{i}"), "@daily")))).await;
    let created: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(created.len(), 3, "{results:?}");
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    // Another user has their own allowance; a delete frees a place.
    let (_, other) = svc.other_user().await;
    let theirs = svc
        .schedules
        .clone()
        .create_schedule(testing::authed(request("s0", "@daily"), &other))
        .await;
    assert!(theirs.is_ok());
    let first = created[0].as_ref().unwrap();
    delete(&svc, &svc.token, &first.id).await.unwrap();
    assert!(create(&svc, request("again", "@daily")).await.is_ok());
    assert_eq!(
        code(create(&svc, request("one-more", "@daily")).await),
        Code::ResourceExhausted
    );
}

#[tokio::test]
async fn a_tick_creates_a_job_that_a_worker_runs() {
    let svc = fast_svc().await;
    let schedule = create(
        &svc,
        CreateScheduleRequest {
            priority: 5,
            max_attempts: 2,
            ..request("every-second", "* * * * * *")
        },
    )
    .await
    .unwrap();

    // A worker of the kind claims the tick's job and runs it.
    let claimed = svc
        .runner
        .clone()
        .claim_jobs(svc.w(ClaimJobsRequest {
            worker_id: "cron-worker".into(),
            kinds: vec![KIND.into()],
            max_jobs: 1,
            wait: Some(prost_types::Duration {
                seconds: WAIT.as_secs() as i64,
                nanos: 0,
            }),
        }))
        .await
        .expect("claim")
        .into_inner()
        .jobs;
    assert_eq!(claimed.len(), 1, "a tick's job reached the worker");
    let job = claimed[0].job.clone().unwrap();
    assert_eq!(job.kind, KIND);
    assert_eq!(job.user_id, svc.user.to_string());
    assert_eq!(job.priority, 5);
    assert_eq!(job.max_attempts, 2);
    assert_eq!(job.schedule_id, schedule.id, "the job names its schedule");
    assert_eq!(
        keel_shared::json::struct_to_json(job.payload.as_ref().unwrap()).unwrap(),
        json!({"report": "daily"})
    );
    let done = svc.complete_job(&job.id, 1, false).await.unwrap();
    assert_eq!(done.status(), JobStatus::Succeeded);

    // The schedule records its ticks.
    testing::eventually(WAIT, "the schedule shows a tick", || async {
        let s = get(&svc, &svc.token, &schedule.id).await.unwrap();
        s.last_run_at.is_some() && !s.last_job_id.is_empty()
    })
    .await;
    let s = get(&svc, &svc.token, &schedule.id).await.unwrap();
    assert!(ts(&s.next_run_at) > ts(&s.last_run_at) - chrono::TimeDelta::seconds(1));

    // Deleting the schedule keeps the jobs it made.
    delete(&svc, &svc.token, &schedule.id).await.unwrap();
    assert_eq!(svc.get(&job.id).await.status(), JobStatus::Succeeded);
}

#[tokio::test]
async fn pause_stops_ticks_and_resume_restarts_them() {
    let svc = fast_svc().await;
    let schedule = create(&svc, request("pausable", "* * * * * *"))
        .await
        .unwrap();
    testing::eventually(WAIT, "a first tick", || async {
        !scheduled_jobs(&svc).await.is_empty()
    })
    .await;

    let paused = update(&svc, &svc.token, pause(&schedule.id, true))
        .await
        .unwrap();
    assert!(paused.paused);
    // The pause commits under the schedule's row lock: any tick still
    // firing finished before it, none starts after it.
    let at_pause = scheduled_jobs(&svc).await.len();
    // Several would-be ticks go by.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        scheduled_jobs(&svc).await.len(),
        at_pause,
        "no tick while paused"
    );
    let resumed_at = chrono::Utc::now();
    update(&svc, &svc.token, pause(&schedule.id, false))
        .await
        .unwrap();
    testing::eventually(WAIT, "ticks again after resume", || async {
        scheduled_jobs(&svc).await.len() > at_pause
    })
    .await;
    // Ticks missed while paused were skipped, not made up for.
    let fired = ticks(&svc, &schedule.id).await;
    assert_eq!(
        fired
            .iter()
            .filter(|t| **t < resumed_at - chrono::TimeDelta::seconds(1))
            .count(),
        at_pause
    );
}

#[tokio::test]
async fn after_downtime_a_schedule_fires_one_catch_up_job_at_most() {
    // This replica's ticker first looks an hour after start-up: no ticker
    // runs while several ticks come due.
    let svc = Svc::start_with(|c| {
        c.schedule_min_interval_secs = 1;
        c.schedule_tick_ms = 3_600_000;
    })
    .await;
    let schedule = create(&svc, request("catch-up", "* * * * * *"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(scheduled_jobs(&svc).await.is_empty(), "no ticker ran");

    // A replica with a running ticker comes up.
    let restarted_at = chrono::Utc::now();
    let _replica = svc
        .replica(|c| {
            c.schedule_min_interval_secs = 1;
            c.schedule_tick_ms = 50;
        })
        .await;
    testing::eventually(WAIT, "ticks after the restart", || async {
        ticks(&svc, &schedule.id).await.len() >= 3
    })
    .await;
    let fired = ticks(&svc, &schedule.id).await;
    let missed = fired.iter().filter(|t| **t < restarted_at).count();
    assert_eq!(
        missed, 1,
        "the 3+ missed ticks collapse into one catch-up job: {fired:?}"
    );
    let mut distinct = fired.clone();
    distinct.dedup();
    assert_eq!(distinct, fired, "one job per tick");
}

#[tokio::test]
async fn three_replicas_fire_each_tick_once() {
    let svc = fast_svc().await;
    let fast = |c: &mut keel_jobs::Config| {
        c.schedule_min_interval_secs = 1;
        c.schedule_tick_ms = 20;
    };
    let _replicas = [svc.replica(fast).await, svc.replica(fast).await];
    let schedule = create(&svc, request("contended", "* * * * * *"))
        .await
        .unwrap();
    testing::eventually(WAIT, "several ticks", || async {
        ticks(&svc, &schedule.id).await.len() >= 4
    })
    .await;
    let fired = ticks(&svc, &schedule.id).await;
    let mut distinct = fired.clone();
    distinct.dedup();
    assert_eq!(distinct, fired, "one job per tick");
    assert_eq!(
        scheduled_jobs(&svc).await.len(),
        fired.len(),
        "every job of the kind belongs to one tick"
    );
    // Every tick time is a whole second of the cron, one apart or more.
    for pair in fired.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::TimeDelta::seconds(1),
            "{fired:?}"
        );
        assert_eq!(pair[1].timestamp_subsec_nanos(), 0);
    }
}
