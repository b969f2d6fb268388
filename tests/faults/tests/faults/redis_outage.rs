//! Redis outage: Redis is killed (losing everything it held) while jobs are
//! created and run. CreateJob keeps succeeding, WatchJob streams end cleanly
//! or keep going, and once Redis is back every job runs.

use std::time::Duration;

use keel_faults::{
    History, PrivateRedis, RedisTarget, Sandbox, Service, WAIT, channel, create_job, job_request,
    mixed_job, pg, report, stream_channel, wait_all_terminal, wait_health,
};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{JobStatus, WatchJobRequest};
use keel_shared::testing::{self, TestDb};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;

const BEFORE: usize = 20;
const DURING: usize = 60;

/// How a WatchJob stream ended.
#[derive(Debug, PartialEq)]
enum Watched {
    /// It reported the job terminal (and `n` updates in all).
    Terminal(JobStatus, usize),
    /// It ended with this error code.
    Error(tonic::Code),
    /// It ended without reaching a terminal state and without an error.
    EndedEarly,
}

async fn watch(
    client: JobsServiceClient<tonic::transport::Channel>,
    token: String,
    id: String,
) -> Watched {
    let mut client = client;
    let mut stream = match client
        .watch_job(testing::authed(WatchJobRequest { id }, &token))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(status) => return Watched::Error(status.code()),
    };
    let mut updates = 0;
    loop {
        match stream.message().await {
            Ok(Some(reply)) => {
                updates += 1;
                let job = reply.job.expect("WatchJob sends the job");
                let status = job.status();
                if matches!(
                    status,
                    JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
                ) {
                    return Watched::Terminal(status, updates);
                }
            }
            Ok(None) => return Watched::EndedEarly,
            Err(status) => return Watched::Error(status.code()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_created_while_redis_is_down_run_when_it_returns() {
    let sandbox = Sandbox::new("redis-outage");
    let Some(mut redis) = PrivateRedis::start(&sandbox).await else {
        return;
    };
    let db = TestDb::new().await;
    let user = db.create_user("redis-outage@example.com").await;
    let token = testing::user_token(user, "redis-outage@example.com");
    let target = RedisTarget {
        url: redis.url(),
        prefix: "faults".into(),
    };

    // Entries lost with Redis's memory are published again after this.
    let mut jobs = Service::jobs(&sandbox, &db.url, &target, |env| {
        env.set("KEEL_JOBS_REDELIVER_AFTER_MS", 2_000)
    })
    .await;
    let jobs_addr = jobs.addr;
    let mut worker = Service::worker(&sandbox, jobs_addr, &target, "w", |env| env);
    let worker_addr = worker.addr;
    worker.wait_serving().await;

    let client = JobsServiceClient::new(channel(jobs_addr));
    let watch_client = JobsServiceClient::new(stream_channel(jobs_addr));
    let history = pg(&db.url).await;
    for i in 0..BEFORE {
        create_job(&client, &token, mixed_job(i))
            .await
            .expect("CreateJob before the outage");
    }
    wait_all_terminal(&history, BEFORE as i64).await;

    // A watcher whose job is running when Redis dies.
    let long = create_job(
        &client,
        &token,
        job_request("sleep", &json!({"ms": 3000}), 5),
    )
    .await
    .expect("CreateJob");
    testing::eventually(WAIT, "the long job to start", || async {
        let row = history
            .query_one(
                "SELECT status FROM jobs WHERE id = $1::text::uuid",
                &[&long.id],
            )
            .await
            .expect("job status");
        row.get::<_, String>(0) == "running"
    })
    .await;
    let watcher_before = tokio::spawn(tokio::time::timeout(
        WAIT,
        watch(watch_client.clone(), token.clone(), long.id.clone()),
    ));

    redis.kill();
    report!("redis outage: Redis killed");
    let mut during = Vec::new();
    let mut during_watcher = None;
    for i in 0..DURING {
        let job = create_job(&client, &token, mixed_job(BEFORE + i))
            .await
            .unwrap_or_else(|s| panic!("CreateJob {i} while Redis is down: {s:?}"));
        during.push(job.id);
        if i == 0 {
            // A watcher that starts while Redis is down.
            let watcher = watch(watch_client.clone(), token.clone(), during[0].clone());
            during_watcher = Some(tokio::spawn(tokio::time::timeout(WAIT, watcher)));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_health(
        worker_addr,
        ServingStatus::NotServing,
        "worker without Redis",
    )
    .await;
    let jobs_health = keel_faults::health(jobs_addr).await;
    jobs.assert_alive();
    worker.assert_alive();

    redis.restart().await;
    report!("redis outage: Redis back (empty)");
    worker.wait_serving().await;
    let all = (BEFORE + 1 + DURING) as i64;
    wait_all_terminal(&history, all).await;
    let h = History::read(&history).await;
    let mut watched = Vec::new();
    for watcher in [Some(watcher_before), during_watcher] {
        let outcome = watcher
            .expect("watcher started")
            .await
            .expect("watcher task")
            .expect("WatchJob resolved within the bound (it never hangs)");
        watched.push(outcome);
    }
    report!(
        "redis outage: 1 outage survived; {DURING} jobs created while Redis was down, all \
         acknowledged; {} jobs in all, by status {:?}; jobs health during the outage {:?}; \
         watchers: {:?}",
        h.jobs,
        h.by_status,
        jobs_health,
        watched
    );

    assert_eq!(h.jobs, all);
    assert_eq!(h.count("succeeded"), all, "every job ran to SUCCEEDED");
    for id in &during {
        let row = history
            .query_one("SELECT status FROM jobs WHERE id = $1::text::uuid", &[id])
            .await
            .expect("job");
        assert_eq!(
            row.get::<_, String>(0),
            "succeeded",
            "job {id} created during the outage"
        );
    }
    assert_eq!(h.succeeded_twice, 0);
    for outcome in watched {
        assert!(
            matches!(
                outcome,
                Watched::Terminal(JobStatus::Succeeded, _)
                    | Watched::Error(tonic::Code::Unavailable)
            ),
            "WatchJob ends with the job's SUCCEEDED state or UNAVAILABLE, not {outcome:?}"
        );
    }
}
