//! WatchJob: current state first, every transition, end after a terminal state.

use std::time::Duration;

use keel_proto::jobs::v1::*;
use keel_shared::config::RedisConfig;
use tonic::Code;

use crate::redis_proxy::{RedisProxy, numsub};
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

/// Statuses a stream sends until it ends.
async fn rest(mut stream: tonic::Streaming<WatchJobResponse>) -> Vec<JobStatus> {
    let mut seen = Vec::new();
    while let Some(job) = next(&mut stream).await {
        seen.push(job.status());
    }
    seen
}

/// Waits until `check` holds (Redis observations settle asynchronously).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The service behind `proxy`, with no periodic re-read: every update must
/// come through Redis.
async fn behind(proxy: &RedisProxy) -> Svc {
    let url = proxy.url.clone();
    Svc::start_with(move |c| {
        c.redis = RedisConfig::new(url, c.redis.redis_prefix.clone());
        c.watch_poll_ms = 600_000;
    })
    .await
}

#[tokio::test]
async fn many_watchers_share_one_pubsub_connection() {
    const JOBS: usize = 5;
    const WATCHERS: usize = 200;
    let proxy = RedisProxy::start().await;
    let svc = behind(&proxy).await;
    let mut jobs = Vec::new();
    for _ in 0..JOBS {
        jobs.push(svc.create_kind("echo").await);
    }
    let mut streams =
        futures::future::join_all((0..WATCHERS).map(|i| watch(&svc, &jobs[i % JOBS].id))).await;
    for (i, stream) in streams.iter_mut().enumerate() {
        assert_eq!(next(stream).await.as_ref(), Some(&jobs[i % JOBS]));
    }

    // What Redis sees of this service: one pub/sub connection, subscribed to
    // each watched job's channel once.
    let pubsub = proxy.pubsub_clients().await;
    assert_eq!(
        pubsub.len(),
        1,
        "{WATCHERS} watchers on {JOBS} jobs hold {} pub/sub connections",
        pubsub.len()
    );
    assert_eq!(pubsub[0]["sub"], JOBS.to_string());
    assert_eq!(pubsub[0]["psub"], "0");
    let channels: Vec<String> = jobs
        .iter()
        .map(|j| svc.redis_config.job_updates_channel(&j.id.parse().unwrap()))
        .collect();
    for channel in &channels {
        assert_eq!(numsub(channel).await, 1, "{channel}");
    }

    for job in &jobs {
        svc.start_job(&job.id).await.unwrap();
        svc.complete_job(&job.id, 1, false).await.unwrap();
    }
    let seen = futures::future::join_all(streams.into_iter().map(rest)).await;
    use JobStatus::*;
    for statuses in seen {
        assert_eq!(statuses, vec![Running, Succeeded]);
    }

    // The last watcher of a job gone, its channel is unsubscribed.
    for channel in &channels {
        eventually("the finished jobs' channels unsubscribed", || async {
            numsub(channel).await == 0
        })
        .await;
    }
    let pubsub = proxy.pubsub_clients().await;
    assert!(pubsub.len() <= 1 && pubsub.iter().all(|c| c["sub"] == "0"));
}

#[tokio::test]
async fn watchers_beyond_the_cap_are_refused_until_one_leaves() {
    let svc = Svc::start_with(|c| c.max_watchers = 3).await;
    let job = svc.create_kind("echo").await;
    let other = svc.create_kind("echo").await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = watch(&svc, &job.id).await;
        assert_eq!(next(&mut stream).await.unwrap().status(), JobStatus::Queued);
        streams.push(stream);
    }
    // The cap is per process: another job is refused too.
    for id in [&job.id, &other.id] {
        let err = svc
            .jobs
            .clone()
            .watch_job(svc.u(WatchJobRequest { id: id.clone() }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("KEEL_JOBS_MAX_WATCHERS"), "{err:?}");
    }

    // A watcher leaves (the client drops its stream): its slot frees.
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut stream = loop {
        match svc
            .jobs
            .clone()
            .watch_job(svc.u(WatchJobRequest {
                id: other.id.clone(),
            }))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot never freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("watch: {e:?}"),
        }
    };
    assert_eq!(next(&mut stream).await.unwrap().status(), JobStatus::Queued);

    // A watcher whose job ends frees its slot too.
    svc.start_job(&other.id).await.unwrap();
    svc.complete_job(&other.id, 1, false).await.unwrap();
    assert_eq!(
        rest(stream).await,
        vec![JobStatus::Running, JobStatus::Succeeded]
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(e) = svc
        .jobs
        .clone()
        .watch_job(svc.u(WatchJobRequest { id: job.id.clone() }))
        .await
    {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn watchers_survive_a_dropped_pubsub_connection() {
    const WATCHERS: usize = 20;
    let proxy = RedisProxy::start().await;
    let svc = behind(&proxy).await;
    let job = svc.create_kind("echo").await;
    let channel = svc
        .redis_config
        .job_updates_channel(&job.id.parse().unwrap());
    let mut streams = futures::future::join_all((0..WATCHERS).map(|_| watch(&svc, &job.id))).await;
    for stream in &mut streams {
        assert_eq!(next(stream).await.unwrap().status(), JobStatus::Queued);
    }

    // Redis drops the service's pub/sub connection and stays unreachable a
    // while; the job starts meanwhile (its announcement is lost).
    proxy.refuse(true);
    assert!(proxy.kill_pubsub_clients().await >= 1);
    eventually("the pub/sub connection gone", || async {
        numsub(&channel).await == 0
    })
    .await;
    svc.start_job(&job.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.refuse(false);

    // The service subscribes again, on one connection, and its watchers
    // catch up with what they missed (no periodic re-read here).
    for stream in &mut streams {
        assert_eq!(next(stream).await.unwrap().status(), JobStatus::Running);
    }
    eventually("subscribed again", || async { numsub(&channel).await == 1 }).await;
    let pubsub = proxy.pubsub_clients().await;
    assert_eq!(pubsub.len(), 1);
    assert_eq!(pubsub[0]["sub"], "1");

    svc.complete_job(&job.id, 1, false).await.unwrap();
    for statuses in futures::future::join_all(streams.into_iter().map(rest)).await {
        assert_eq!(statuses, vec![JobStatus::Succeeded]);
    }
}
