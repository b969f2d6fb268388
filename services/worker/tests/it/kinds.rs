//! Built-in kinds, retries, and routing by kind (each worker runs only the
//! kinds it serves; a kind nobody serves waits for its schedule timeout), as
//! a user sees them through JobsService.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_proto::jobs::v1::{CreateJobRequest, JobStatus};
use keel_worker::Registry;
use serde_json::json;

use crate::support::{Env, WAIT};

fn output(job: &keel_proto::jobs::v1::Job) -> serde_json::Value {
    keel_shared::json::struct_to_json(job.output.as_ref().expect("output")).unwrap()
}

#[tokio::test]
async fn built_in_kinds_reach_their_terminal_state() {
    let env = Env::start().await;
    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;

    let payload = json!({"text": "hi", "n": 3, "nested": {"list": [true, null, "x"]}});
    let echo = env.create("echo", payload.clone(), 1).await;
    let sleep = env.create("sleep", json!({"ms": 50}), 1).await;
    let fail = env
        .create("fail", json!({"message": "nope", "retryable": false}), 3)
        .await;
    let too_long = env.create("sleep", json!({"ms": 600001}), 3).await;

    let echo = env.wait_for(&echo.id, JobStatus::Succeeded).await;
    assert_eq!(output(&echo), payload);
    assert_eq!(echo.attempt, 1);

    let sleep = env.wait_for(&sleep.id, JobStatus::Succeeded).await;
    assert_eq!(output(&sleep), json!({"slept_ms": 50}));

    // A permanent error fails the job at once, whatever max_attempts says.
    let fail = env.wait_for(&fail.id, JobStatus::Failed).await;
    assert_eq!(fail.error, "nope");
    assert_eq!(fail.attempt, 1);

    let too_long = env.wait_for(&too_long.id, JobStatus::Failed).await;
    assert!(too_long.error.contains("payload.ms"), "{}", too_long.error);
    assert_eq!(too_long.attempt, 1);

    env.wait_drained().await;
    worker.stop().await;
}

#[tokio::test]
async fn retryable_failures_are_retried_up_to_max_attempts() {
    let env = Env::start().await;
    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;

    let job = env
        .create("fail", json!({"message": "flaky", "retryable": true}), 3)
        .await;
    let job = env.wait_for(&job.id, JobStatus::Failed).await;
    assert_eq!(job.attempt, 3, "three attempts, then no more");
    assert_eq!(job.error, "flaky");

    env.wait_drained().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_retried_job_can_succeed_later() {
    let env = Env::start().await;
    let registry = Registry::new().register_fn("third-time", |ctx| async move {
        if ctx.attempt < 3 {
            Err(keel_worker::HandlerError::Retryable(format!(
                "attempt {} not yet",
                ctx.attempt
            )))
        } else {
            Ok(json!({"attempt": ctx.attempt}))
        }
    });
    let worker = env.start_worker(env.worker_config(), registry).await;

    let job = env.create("third-time", json!({}), 5).await;
    let job = env.wait_for(&job.id, JobStatus::Succeeded).await;
    assert_eq!(job.attempt, 3);
    assert_eq!(output(&job), json!({"attempt": 3}));
    worker.stop().await;
}

#[tokio::test]
async fn a_kind_no_worker_serves_waits_queued_then_fails_at_its_schedule_timeout() {
    let env = Env::start().await;
    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;
    let echo = env.create("echo", json!({}), 1).await;
    let request = CreateJobRequest {
        kind: "no-such-kind".into(),
        max_attempts: 5,
        schedule_timeout: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        ..Default::default()
    };
    let job = env
        .jobs
        .clone()
        .create_job(keel_shared::testing::authed(request, &env.token))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    env.wait_for(&echo.id, JobStatus::Succeeded).await;
    // The worker never sees it (it used to start it and fail it at once):
    // it waits untouched until its schedule timeout.
    let job = env.wait_for(&job.id, JobStatus::Failed).await;
    assert_eq!(job.attempt, 0, "never started");
    assert!(job.error.contains("schedule timeout"), "{}", job.error);
    assert!(job.error.contains("no-such-kind"), "{}", job.error);
    assert!(
        !env.streams()
            .await
            .iter()
            .any(|s| s.contains("no-such-kind")),
        "nothing was published for a kind no stream worker serves"
    );
    env.wait_drained().await;
    worker.stop().await;
}

#[tokio::test]
async fn each_worker_runs_only_its_own_kinds_in_a_mixed_fleet() {
    let env = Env::start().await;
    let ran_by_b = Arc::new(AtomicU32::new(0));
    let counter = ran_by_b.clone();
    let a = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;
    let b = env
        .start_worker(
            env.worker_config(),
            Registry::new().register_fn("agent.summarize", move |ctx| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(json!({"summary": ctx.payload["text"]}))
                }
            }),
        )
        .await;
    let echoes = env
        .create_many("echo", (0..20).map(|n| json!({"n": n})))
        .await;
    let summaries = env
        .create_many("agent.summarize", (0..20).map(|n| json!({"text": n})))
        .await;
    for job in echoes.iter().chain(&summaries) {
        let done = env.wait_for(&job.id, JobStatus::Succeeded).await;
        assert_eq!(
            done.attempt, 1,
            "{} failed once on a worker lacking its kind",
            done.kind
        );
    }
    assert_eq!(ran_by_b.load(Ordering::SeqCst), 20);
    env.wait_drained().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn jobs_created_before_any_worker_serves_their_kind_run_once_one_starts() {
    // Re-publication is ten minutes away: only the hand-over when the kind
    // becomes served can bring these jobs to the new worker in time.
    let env = Env::start_with(|c| c.redeliver_after_ms = 600_000).await;
    let jobs = env
        .create_many("late.kind", (0..5).map(|n| json!({"n": n})))
        .await;
    // Past the publication grace: the relay has put them off.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(env.get(&jobs[0].id).await.status(), JobStatus::Queued);

    let worker = env
        .start_worker(
            env.worker_config(),
            Registry::new().register_fn("late.kind", |ctx| async move { Ok(ctx.payload) }),
        )
        .await;
    for job in &jobs {
        env.wait_for(&job.id, JobStatus::Succeeded).await;
    }
    worker.stop().await;
}

#[tokio::test]
async fn a_handler_panic_fails_the_attempt_and_the_worker_keeps_serving() {
    let env = Env::start().await;
    let registry = Registry::with_builtins().register_fn("panic", |ctx| async move {
        if ctx.payload.get("fine").is_none() {
            panic!("handler bug");
        }
        Ok(json!({}))
    });
    let worker = env.start_worker(env.worker_config(), registry).await;

    let job = env.create("panic", json!({}), 2).await;
    let job = env.wait_for(&job.id, JobStatus::Failed).await;
    assert_eq!(job.attempt, 2, "a panic is a retryable failure");
    assert!(job.error.contains("handler bug"), "{}", job.error);

    let echo = env.create("echo", json!({"after": "panic"}), 1).await;
    let echo = env.wait_for(&echo.id, JobStatus::Succeeded).await;
    assert_eq!(output(&echo), json!({"after": "panic"}));
    worker.stop().await;
}

#[tokio::test]
async fn cancelling_a_running_sleep_job_ends_it_cancelled() {
    let env = Env::start().await;
    let worker = env
        .start_worker(env.worker_config(), Registry::with_builtins())
        .await;

    let job = env.create("sleep", json!({"ms": 600000}), 3).await;
    env.wait_for(&job.id, JobStatus::Running).await;
    let requested = env.cancel(&job.id).await;
    assert!(requested.cancel_requested || requested.status() == JobStatus::Cancelled);
    let job = env.wait_for(&job.id, JobStatus::Cancelled).await;
    assert_eq!(job.attempt, 1);

    env.wait_drained().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_higher_priority_starts_before_a_backlog_of_its_kind() {
    let env = Env::start().await;
    let mut config = env.worker_config();
    config.concurrency = Some(1);
    let worker = env.start_worker(config, Registry::with_builtins()).await;
    // Once the jobs service knows the worker serves `sleep`, the backlog goes
    // straight into the stream (not through the relay, which would publish
    // the urgent job first anyway).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let backlog = env
        .create_many("sleep", (0..60).map(|_| json!({"ms": 20})))
        .await;
    let urgent = env
        .jobs
        .clone()
        .create_job(keel_shared::testing::authed(
            CreateJobRequest {
                kind: "sleep".into(),
                priority: 10,
                payload: Some(keel_shared::json::json_to_struct(&json!({"ms": 1}))),
                ..Default::default()
            },
            &env.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let urgent = env.wait_for(&urgent.id, JobStatus::Succeeded).await;
    let mut after = 0;
    for job in &backlog {
        let job = env.wait_for(&job.id, JobStatus::Succeeded).await;
        let started = |j: &keel_proto::jobs::v1::Job| {
            let t = j.started_at.unwrap();
            (t.seconds, t.nanos)
        };
        if started(&job) > started(&urgent) {
            after += 1;
        }
    }
    // One slot, 60 jobs of 20 ms queued first: without priority the urgent
    // one would start last. It waits only for what the worker had read.
    assert!(
        after >= 50,
        "only {after} of the 60 queued jobs started after the urgent one"
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_handler_reports_progress_that_shows_on_the_running_job() {
    let env = Env::start().await;
    let registry =
        Registry::new().register_fn("pages", |ctx: keel_worker::JobContext| async move {
            ctx.progress.report(json!({"pages": 3, "of": 10}));
            // Until cancelled: the test reads the progress meanwhile.
            ctx.cancel.cancelled().await;
            Ok(json!({}))
        });
    let worker = env.start_worker(env.worker_config(), registry).await;
    let job = env.create("pages", json!({}), 1).await;
    keel_shared::testing::eventually(WAIT, "the progress on the running job", || async {
        let job = env.get(&job.id).await;
        job.status() == JobStatus::Running
            && job.progress.as_ref().map(keel_shared::json::struct_to_json)
                == Some(Ok(json!({"pages": 3, "of": 10})))
    })
    .await;
    env.cancel(&job.id).await;
    env.wait_for(&job.id, JobStatus::Cancelled).await;
    worker.stop().await;
}
