//! Worker crash: 500 mixed jobs across two keel-worker processes while one of
//! them is SIGKILLed again and again. Nothing is lost, nothing succeeds
//! twice, and every retry is an attempt a killed worker left behind.

use std::collections::HashSet;
use std::time::Duration;

use keel_faults::{
    History, RedisTarget, Sandbox, Service, WAIT, channel, mixed_job, pg, report, tenant,
    wait_all_terminal,
};
use keel_proto::jobs::v1::BatchCreateJobsRequest;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_shared::testing::{self, TestRedis};

const WAVES: usize = 5;
const JOBS_PER_WAVE: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_workers_lose_no_job_and_run_none_twice() {
    let sandbox = Sandbox::new("worker-crash");
    let (db, token) = tenant("crash@example.com").await;
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    let jobs = Service::jobs(&sandbox, &db.url, &target, |env| {
        env.set("KEEL_JOBS_LEASE_MS", 2_000)
    })
    .await;
    let jobs_addr = jobs.addr;
    let mut steady = Service::worker(&sandbox, jobs_addr, &target, "steady", |env| env);
    let mut victim = Service::worker(&sandbox, jobs_addr, &target, "victim-0", |env| env);

    let client = JobsServiceClient::new(channel(jobs_addr));
    let history = pg(&db.url).await;
    let mut created = HashSet::new();
    let mut killed = HashSet::new();
    for wave in 0..WAVES {
        let requests = (0..JOBS_PER_WAVE)
            .map(|i| mixed_job(wave * JOBS_PER_WAVE + i))
            .collect();
        let reply = client
            .clone()
            .batch_create_jobs(testing::authed(BatchCreateJobsRequest { requests }, &token))
            .await
            .expect("BatchCreateJobs")
            .into_inner();
        created.extend(reply.jobs.into_iter().map(|j| j.id));

        // Kill the victim while it runs a `sleep` it just started (so, most
        // likely, one that the kill interrupts).
        let name = format!("victim-{wave}");
        testing::eventually(WAIT, &format!("{name} to run a job"), || async {
            let running: i64 = history
                .query_one(
                    "SELECT count(*) FROM jobs WHERE status = 'running' AND worker_id = $1
                     AND kind = 'sleep' AND started_at > now() - interval '30 milliseconds'",
                    &[&name],
                )
                .await
                .expect("running jobs of the victim")
                .get(0);
            if running == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            running > 0
        })
        .await;
        victim.sigkill();
        killed.insert(name);
        steady.assert_alive();
        tokio::time::sleep(Duration::from_millis(200)).await;
        victim.set_env("KEEL_WORKER_CONSUMER_NAME", format!("victim-{}", wave + 1));
        victim.start();
    }
    assert_eq!(created.len(), WAVES * JOBS_PER_WAVE);

    wait_all_terminal(&history, created.len() as i64).await;
    let h = History::read(&history).await;
    let ids: HashSet<String> = history
        .query("SELECT id::text FROM jobs", &[])
        .await
        .expect("job ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let interrupted_by_kills = h.interrupted_on(&killed);
    report!(
        "worker crash: {} jobs created, {} in the database, by status {:?}; {} SIGKILLs survived; \
         {} attempts interrupted by them; {} retries; {} lease expiries; {} succeeded twice",
        created.len(),
        h.jobs,
        h.by_status,
        killed.len(),
        interrupted_by_kills,
        h.retries,
        h.lease_expired.len(),
        h.succeeded_twice
    );

    assert_eq!(ids, created, "every created job is there, and no other");
    assert_eq!(
        h.count("succeeded"),
        created.len() as i64,
        "every job succeeded"
    );
    assert_eq!(h.succeeded_twice, 0, "no job succeeded twice");
    h.assert_only_killed_workers_lost_attempts(&killed);
    assert!(
        interrupted_by_kills >= WAVES,
        "each kill interrupted a running job"
    );
    steady.assert_alive();
    victim.assert_alive();
}
