//! Jobs-service SIGKILL mid-load: jobs are created continuously while
//! keel-jobs is killed and restarted. Every committed job is run by the
//! worker exactly once (a re-published stream entry is refused by StartJob)
//! and succeeds once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_faults::{
    History, RedisTarget, Sandbox, Service, channel, create_job, logged_job_ids, mixed_job, pg,
    report, tenant, wait_all_terminal,
};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_shared::testing::TestRedis;
use tokio::sync::Mutex;

const KILLS: usize = 3;
const PRODUCERS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_job_runs_once_across_jobs_service_sigkills() {
    let sandbox = Sandbox::new("jobs-kill");
    let (db, token) = tenant("jobs-kill@example.com").await;
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    // Default (30 s) leases: a restart within them must not cause a second run.
    let mut jobs = Service::jobs(&sandbox, &db.url, &target, |env| env).await;
    let jobs_addr = jobs.addr;
    let mut worker = Service::worker(&sandbox, jobs_addr, &target, "w", |env| {
        env.set("KEEL_WORKER_CONCURRENCY", 8)
            .set("KEEL_LOG_FORMAT", "json")
            // No trimming during the test: the stream's length is the count
            // of publications reported below.
            .set("KEEL_WORKER_TRIM_INTERVAL_MS", 3_600_000)
    });

    let acked = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let client = JobsServiceClient::new(channel(jobs_addr));
        let (token, acked, refused, stop) =
            (token.clone(), acked.clone(), refused.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            let mut i = p;
            while !stop.load(Ordering::Relaxed) {
                match create_job(&client, &token, mixed_job(i)).await {
                    Ok(job) => {
                        acked.lock().await.push(job.id);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => {
                        *refused.lock().await += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                i += PRODUCERS;
            }
        }));
    }

    for kill in 1..=KILLS {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        jobs.sigkill();
        report!(
            "jobs kill: SIGKILL {kill} of keel-jobs with {} jobs acknowledged",
            acked.lock().await.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        jobs.start();
        jobs.wait_serving().await;
        worker.assert_alive();
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.expect("producer");
    }

    let acked = acked.lock().await.clone();
    let history = pg(&db.url).await;
    wait_all_terminal(&history, acked.len() as i64).await;
    let h = History::read(&history).await;
    let mut conn = redis.pool().get().await.expect("redis");
    let entries: i64 = redis::cmd("XLEN")
        .arg(redis.config.jobs_stream("echo"))
        .query_async(&mut *conn)
        .await
        .expect("XLEN");
    // Handler runs, from the worker's own log: "job started" follows a granted StartJob.
    let runs = logged_job_ids(&worker.logs(), "job started");
    let all: Vec<String> = history
        .query("SELECT id::text FROM jobs", &[])
        .await
        .expect("job ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ran_once = all.iter().filter(|id| runs.get(*id) == Some(&1)).count();
    report!(
        "jobs kill: {KILLS} SIGKILLs of keel-jobs survived; {} CreateJob acknowledged, {} refused \
         while it was down; {} jobs committed, by status {:?}; {} stream entries ({} duplicates, \
         refused by StartJob); {ran_once} jobs run exactly once by the worker; {} succeeded \
         twice; {} StartJobs committed whose reply the kill lost (recovered when the lease \
         expired: {} lease expiries)",
        acked.len(),
        *refused.lock().await,
        h.jobs,
        h.by_status,
        entries,
        entries - h.jobs,
        h.succeeded_twice,
        h.started_not_once,
        h.lease_expired.len()
    );

    for id in &acked {
        let row = history
            .query_one("SELECT status FROM jobs WHERE id = $1::text::uuid", &[id])
            .await
            .unwrap_or_else(|e| panic!("acknowledged job {id} is missing: {e}"));
        assert_eq!(row.get::<_, String>(0), "succeeded", "job {id}");
    }
    // Jobs committed by a call whose answer was lost in a kill count too.
    assert!(h.jobs >= acked.len() as i64);
    assert_eq!(
        h.count("succeeded"),
        h.jobs,
        "every committed job succeeded"
    );
    assert_eq!(h.succeeded_twice, 0, "no job succeeded twice");
    assert_eq!(ran_once, all.len(), "the worker ran every job exactly once");
    // A second `started` only ever follows a lost StartJob reply, undone by the reaper.
    assert_eq!(h.retries, h.lease_expired.len() as i64);
    assert_eq!(h.interrupted.len(), h.lease_expired.len());
    worker.assert_alive();
}
