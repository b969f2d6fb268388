//! Delivery: a duplicated message runs its job once; two workers share the load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_proto::jobs::v1::{JobStatus, ListJobsRequest};
use keel_shared::queue::FIELD_JOB_ID;
use keel_shared::testing::{self, eventually};
use keel_worker::Registry;
use serde_json::json;

use crate::support::{Env, WAIT};

#[tokio::test]
async fn a_duplicated_message_runs_the_handler_once() {
    let env = Env::start().await;
    // As if a worker serving `count` had come and gone: its jobs are published.
    env.announce_kinds(&["count"]).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let job = env.create("count", json!({}), 3).await;
    let stream = env.redis.config.jobs_stream("count");
    eventually(WAIT, "the job to reach the stream", || async {
        let mut conn = env.redis().await;
        redis::cmd("XLEN")
            .arg(&stream)
            .query_async::<u64>(&mut *conn)
            .await
            .unwrap()
            >= 1
    })
    .await;
    // The same job id delivered again, as a retried XADD would.
    let mut conn = env.redis().await;
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(FIELD_JOB_ID)
        .arg(&job.id)
        .query_async(&mut *conn)
        .await
        .unwrap();

    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let registry = Registry::new().register_fn("count", move |_ctx| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(json!({"ran": true}))
        }
    });
    let worker = env.start_worker(env.worker_config(), registry).await;

    let job = env.wait_for(&job.id, JobStatus::Succeeded).await;
    env.wait_drained().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "handler runs");
    assert_eq!(job.attempt, 1);
    worker.stop().await;
}

#[tokio::test]
async fn two_workers_share_the_load() {
    let env = Env::start().await;
    let seen: Arc<Mutex<Vec<(&'static str, String)>>> = Arc::default();
    let registry = |name: &'static str| {
        let seen = seen.clone();
        Registry::new().register_fn("echo", move |ctx| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push((name, ctx.id.to_string()));
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok(ctx.payload)
            }
        })
    };
    let mut config = env.worker_config();
    config.concurrency = Some(2);
    let a = env.start_worker(config.clone(), registry("a")).await;
    let b = env.start_worker(config, registry("b")).await;

    let created = env
        .create_many("echo", (0..40).map(|i| json!({"i": i})))
        .await;
    assert_eq!(created.len(), 40);

    let succeeded = || async {
        env.jobs
            .clone()
            .list_jobs(testing::authed(
                ListJobsRequest {
                    page_size: 100,
                    status: JobStatus::Succeeded as i32,
                    ..Default::default()
                },
                &env.token,
            ))
            .await
            .expect("ListJobs")
            .into_inner()
            .jobs
    };
    eventually(WAIT, "all 40 jobs to succeed", || async {
        succeeded().await.len() == 40
    })
    .await;
    env.wait_drained().await;

    let seen = seen.lock().unwrap().clone();
    let mut runs: HashMap<&str, u32> = HashMap::new();
    let mut per_job: HashMap<String, u32> = HashMap::new();
    for (worker, job) in &seen {
        *runs.entry(worker).or_default() += 1;
        *per_job.entry(job.clone()).or_default() += 1;
    }
    assert_eq!(per_job.len(), 40);
    assert!(
        per_job.values().all(|&n| n == 1),
        "each job ran once: {per_job:?}"
    );
    assert!(
        runs.get("a").copied().unwrap_or(0) > 0,
        "a ran some: {runs:?}"
    );
    assert!(
        runs.get("b").copied().unwrap_or(0) > 0,
        "b ran some: {runs:?}"
    );
    for job in succeeded().await {
        assert_eq!(job.attempt, 1);
    }
    a.stop().await;
    b.stop().await;
}
