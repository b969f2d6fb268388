//! Claiming workers: jobs of a kind only gRPC-claiming workers serve
//! (`keel-faults-claim-worker`, a client of `JobRunnerService/ClaimJobs`),
//! under steady load, while a claiming worker or the jobs service is
//! SIGKILLed. Every job succeeds exactly once; an attempt whose worker was
//! killed, or whose claim answer a jobs-service kill lost, costs one lease
//! and is run again elsewhere; no live worker loses a lease.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_faults::{
    CLAIM_KIND, History, RedisTarget, Sandbox, Service, WAIT, channel, job_request, pg, report,
    tenant, wait_all_terminal,
};
use keel_proto::jobs::v1::BatchCreateJobsRequest;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_shared::testing::{self, TestRedis};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

const CLAIM_WORKER: &str = env!("CARGO_BIN_EXE_keel-faults-claim-worker");

/// Jobs per CreateJob batch, and the pause between batches: 16 jobs a
/// second, for three claiming workers with 4 slots each (about 8 of the 12
/// busy).
const BATCH: usize = 8;
const BATCH_EVERY: Duration = Duration::from_millis(500);

/// How long the n-th job runs: 200..500 ms, but every 16th 2.5 s, longer
/// than a 2 s lease (its worker must heartbeat to keep it).
fn job_ms(n: usize) -> usize {
    if n % 16 == 15 {
        2_500
    } else {
        200 + (n * 53) % 301
    }
}

/// Creates batches of `faults.claim` jobs until stopped, keeping the ids of
/// those acknowledged and counting the calls refused.
struct Producer {
    acked: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<usize>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Producer {
    fn start(jobs: std::net::SocketAddr, token: String) -> Self {
        let client = JobsServiceClient::new(channel(jobs));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, r, s) = (acked.clone(), refused.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let requests = (i..i + BATCH)
                    .map(|n| {
                        let ms = job_ms(n);
                        job_request(CLAIM_KIND, &serde_json::json!({ "ms": ms, "n": n }), 20)
                    })
                    .collect();
                i += BATCH;
                let reply = client
                    .clone()
                    .batch_create_jobs(testing::authed(BatchCreateJobsRequest { requests }, &token))
                    .await;
                match reply {
                    Ok(reply) => a
                        .lock()
                        .await
                        .extend(reply.into_inner().jobs.into_iter().map(|j| j.id)),
                    Err(_) => *r.lock().await += 1,
                }
                tokio::time::sleep(BATCH_EVERY).await;
            }
        });
        Self {
            acked,
            refused,
            stop,
            task,
        }
    }

    /// Stops; the acknowledged ids and the count of refused calls.
    async fn stop(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("producer");
        let acked = self.acked.lock().await.clone();
        let refused = *self.refused.lock().await;
        (acked, refused)
    }
}

/// What the claiming workers' logs (one JSON object a line) say.
#[derive(Default)]
struct WorkerLogs {
    /// Handler runs ("job started" after a claim answer arrived), by job.
    runs: HashMap<String, usize>,
    /// CompleteJob answered OK, by job.
    completed: HashMap<String, usize>,
    /// CompleteJob refused (FAILED_PRECONDITION / NOT_FOUND): (job, worker, attempt).
    complete_refused: Vec<(String, String, i32)>,
    /// Heartbeats refused: a live worker's lease expired under it.
    lease_lost: usize,
    /// Completions given up after retrying.
    abandoned: usize,
    /// ClaimJobs calls that failed (in transit).
    claims_failed: usize,
}

impl WorkerLogs {
    fn read(workers: &[&Service]) -> Self {
        let mut logs = Self::default();
        for path in workers.iter().flat_map(|w| w.logs()) {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let job = v["job_id"].as_str().unwrap_or_default().to_string();
                match v["message"].as_str().unwrap_or_default() {
                    "job started" => *logs.runs.entry(job).or_default() += 1,
                    "job completed" => *logs.completed.entry(job).or_default() += 1,
                    "complete refused" => logs.complete_refused.push((
                        job,
                        v["worker"].as_str().unwrap_or_default().to_string(),
                        v["attempt"].as_i64().unwrap_or_default() as i32,
                    )),
                    "lease lost" => logs.lease_lost += 1,
                    "complete abandoned" => logs.abandoned += 1,
                    "claim failed" => logs.claims_failed += 1,
                    _ => {}
                }
            }
        }
        logs
    }
}

/// Per job: its `started` events, and the worker and attempt its output
/// names (the claiming worker writes them).
struct Outcomes {
    started: HashMap<String, i64>,
    /// (output worker, output attempt), by job.
    ran_by: HashMap<String, (String, i32)>,
    /// Succeeded jobs whose output does not name the worker and attempt that
    /// succeeded.
    wrong_output: i64,
}

impl Outcomes {
    async fn read(db: &tokio_postgres::Client) -> Self {
        let rows = db
            .query(
                "SELECT j.id::text, coalesce(j.output->>'worker', ''),
                        coalesce((j.output->>'attempt')::int4, 0),
                        (SELECT count(*) FROM job_events e
                         WHERE e.job_id = j.id AND e.event = 'started')
                 FROM jobs j",
                &[],
            )
            .await
            .expect("job outcomes");
        let wrong_output: i64 = db
            .query_one(
                "SELECT count(*) FROM jobs j JOIN job_events s
                   ON s.job_id = j.id AND s.event = 'succeeded'
                 WHERE j.output->>'worker' IS DISTINCT FROM s.worker_id
                    OR (j.output->>'attempt')::int4 IS DISTINCT FROM s.attempt
                    OR s.attempt <> j.attempt",
                &[],
            )
            .await
            .expect("outputs against history")
            .get(0);
        Self {
            started: rows.iter().map(|r| (r.get(0), r.get(3))).collect(),
            ran_by: rows
                .iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect(),
            wrong_output,
        }
    }
}

fn claim_worker(
    sandbox: &Sandbox,
    jobs: std::net::SocketAddr,
    label: &str,
    worker_id: &str,
) -> Service {
    Service::claim_worker(
        sandbox,
        Path::new(CLAIM_WORKER),
        jobs,
        label,
        worker_id,
        |env| env,
    )
}

const WORKER_KILLS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_claim_workers_lose_no_job_and_run_none_twice() {
    let sandbox = Sandbox::new("claim-worker-kill");
    let (db, token) = tenant("claim-kill@example.com").await;
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    // Short leases: a killed worker's jobs are re-queued 2 s after its last heartbeat.
    let jobs = Service::jobs(&sandbox, &db.url, &target, |env| {
        env.set("KEEL_JOBS_LEASE_MS", 2_000)
    })
    .await;
    let steady = [
        claim_worker(&sandbox, jobs.addr, "steady-1", "steady-1"),
        claim_worker(&sandbox, jobs.addr, "steady-2", "steady-2"),
    ];
    let mut victim = claim_worker(&sandbox, jobs.addr, "victim", "victim-0");

    let producer = Producer::start(jobs.addr, token);
    let history = pg(&db.url).await;
    let mut killed = HashSet::new();
    for kill in 0..WORKER_KILLS {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        // Kill the victim while it runs a job it started just now (at least
        // 100 ms of the job's 200 or more are left, so the kill interrupts it).
        let name = format!("victim-{kill}");
        testing::eventually(WAIT, &format!("{name} to run a job"), || async {
            let running: i64 = history
                .query_one(
                    "SELECT count(*) FROM jobs WHERE status = 'running' AND worker_id = $1
                     AND started_at > now() - interval '100 milliseconds'",
                    &[&name],
                )
                .await
                .expect("running jobs of the victim")
                .get(0);
            if running == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            running > 0
        })
        .await;
        victim.sigkill();
        report!("claim worker kill: SIGKILL {} of {name}", kill + 1);
        killed.insert(name);
        tokio::time::sleep(Duration::from_millis(200)).await;
        victim.set_env("KEEL_CLAIM_WORKER_ID", format!("victim-{}", kill + 1));
        victim.start();
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (created, refused) = producer.stop().await;
    assert_eq!(
        refused, 0,
        "CreateJob refused with no fault on the jobs service"
    );

    wait_all_terminal(&history, created.len() as i64).await;
    let h = History::read(&history).await;
    let outcomes = Outcomes::read(&history).await;
    let logs = WorkerLogs::read(&[&steady[0], &steady[1], &victim]);
    let ids: HashSet<String> = outcomes.started.keys().cloned().collect();
    let interrupted_by_kills = h.interrupted_on(&killed);
    let finished_elsewhere = h
        .interrupted
        .iter()
        .filter(|(job, w)| {
            killed.contains(w) && outcomes.ran_by.get(job).is_some_and(|r| &r.0 != w)
        })
        .count();
    // A job's attempts are its handler runs, plus claims whose answer the
    // kill lost (started for the victim, never run: they are interrupted
    // attempts of killed workers too).
    let runs = |id: &String| logs.runs.get(id).copied().unwrap_or(0) as i64;
    let claims_lost: i64 = outcomes.started.iter().map(|(id, n)| n - runs(id)).sum();
    let runs_not_within_attempts = outcomes
        .started
        .iter()
        .filter(|(id, n)| runs(id) < 1 || runs(id) > **n)
        .count();
    // Each job's completion is logged once, unless the kill came between
    // its commit and the log line.
    let completed_not_once = outcomes
        .ran_by
        .iter()
        .filter(|(id, (worker, _))| match logs.completed.get(*id) {
            Some(n) => *n != 1,
            None => !killed.contains(worker),
        })
        .count();
    let mut per_worker: HashMap<&str, usize> = HashMap::new();
    for (worker, _) in outcomes.ran_by.values() {
        *per_worker.entry(worker.as_str()).or_default() += 1;
    }
    let mut per_worker: Vec<_> = per_worker.into_iter().collect();
    per_worker.sort();
    report!(
        "claim worker kill: {} jobs created, {} in the database, by status {:?}; {} SIGKILLs of \
         claiming workers survived; {} attempts interrupted by them, {} of those jobs completed \
         by another worker; {} retries; {} lease expiries; {} succeeded twice; completed by \
         {per_worker:?}; {} outputs not naming the worker and attempt that succeeded; {claims_lost} \
         interrupted attempts were claims whose answer the kill lost (never run); \
         {runs_not_within_attempts} jobs run never or more often than started; \
         {completed_not_once} jobs not completed exactly once by the workers' account; refused: \
         {} completions, {} heartbeats",
        created.len(),
        h.jobs,
        h.by_status,
        killed.len(),
        interrupted_by_kills,
        finished_elsewhere,
        h.retries,
        h.lease_expired.len(),
        h.succeeded_twice,
        outcomes.wrong_output,
        logs.complete_refused.len(),
        logs.lease_lost
    );

    let created: HashSet<String> = created.into_iter().collect();
    assert_eq!(ids, created, "every created job is there, and no other");
    assert_eq!(
        h.count("succeeded"),
        created.len() as i64,
        "every job succeeded"
    );
    assert_eq!(h.succeeded_twice, 0, "no job succeeded twice");
    assert_eq!(
        outcomes.wrong_output, 0,
        "each job's output is that of the attempt that succeeded"
    );
    h.assert_only_killed_workers_lost_attempts(&killed);
    assert!(
        interrupted_by_kills >= WORKER_KILLS,
        "each kill interrupted a running job"
    );
    assert_eq!(
        finished_elsewhere, interrupted_by_kills,
        "every job a kill interrupted completed on another worker"
    );
    assert_eq!(
        runs_not_within_attempts, 0,
        "every job ran, and no more often than it was started"
    );
    assert_eq!(
        completed_not_once, 0,
        "the workers completed each job exactly once"
    );
    assert!(
        logs.complete_refused.is_empty() && logs.lease_lost == 0 && logs.abandoned == 0,
        "a live claiming worker had a heartbeat or completion refused"
    );
    for mut worker in steady {
        worker.assert_alive();
    }
    victim.assert_alive();
}

const JOBS_KILLS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_workers_lose_no_job_and_run_none_twice_across_jobs_service_sigkills() {
    let sandbox = Sandbox::new("claim-jobs-kill");
    let (db, token) = tenant("claim-jobs-kill@example.com").await;
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    // A lease that outlives a restart (heartbeats resume in time), short
    // enough that a lost claim answer costs little waiting.
    let mut jobs = Service::jobs(&sandbox, &db.url, &target, |env| {
        env.set("KEEL_JOBS_LEASE_MS", 4_000)
    })
    .await;
    let mut workers: Vec<Service> = (1..=3)
        .map(|n| {
            let name = format!("w-{n}");
            claim_worker(&sandbox, jobs.addr, &name, &name)
        })
        .collect();

    let producer = Producer::start(jobs.addr, token);
    let history = pg(&db.url).await;
    for kill in 1..=JOBS_KILLS {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let running: i64 = history
            .query_one("SELECT count(*) FROM jobs WHERE status = 'running'", &[])
            .await
            .expect("running jobs")
            .get(0);
        jobs.sigkill();
        report!(
            "claim jobs kill: SIGKILL {kill} of keel-jobs with {} jobs acknowledged, {running} \
             running on claiming workers",
            producer.acked.lock().await.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        jobs.start();
        jobs.wait_serving().await;
        for worker in &mut workers {
            worker.assert_alive();
        }
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (acked, refused) = producer.stop().await;

    wait_all_terminal(&history, acked.len() as i64).await;
    let h = History::read(&history).await;
    let outcomes = Outcomes::read(&history).await;
    let logs = WorkerLogs::read(&workers.iter().collect::<Vec<_>>());
    let ran_once = outcomes
        .started
        .keys()
        .filter(|id| logs.runs.get(*id) == Some(&1))
        .count();
    // Attempts started for a worker that never heard of them: claim answers lost.
    let claims_lost: i64 = outcomes
        .started
        .iter()
        .map(|(id, n)| n - logs.runs.get(id).copied().unwrap_or(0) as i64)
        .sum();
    // A refused completion is fine only when an earlier try of it committed
    // (its answer lost in a kill): the job's output is this very attempt's.
    // A refused completion is fine only when an earlier try of it committed
    // and its answer was lost in a kill: the job's output is that attempt's.
    let refused_not_ours = logs
        .complete_refused
        .iter()
        .filter(|(job, worker, attempt)| {
            outcomes.ran_by.get(job) != Some(&(worker.clone(), *attempt))
        })
        .count();
    // Each job's one run ended once: completed, or refused after a lost answer.
    let ended_not_once = outcomes
        .started
        .keys()
        .filter(|id| {
            let refused = logs
                .complete_refused
                .iter()
                .filter(|(job, _, _)| job == *id)
                .count();
            logs.completed.get(*id).copied().unwrap_or(0) + refused != 1
        })
        .count();
    report!(
        "claim jobs kill: {JOBS_KILLS} SIGKILLs of keel-jobs survived with 3 claiming workers; {} \
         CreateJob batches acknowledged ({} jobs), {} refused while it was down; {} jobs \
         committed, by status {:?}; {} succeeded twice; {ran_once} run exactly once by a claiming \
         worker; {} ClaimJobs calls cut or refused by the kills; {claims_lost} claims whose answer \
         the kill lost, recovered by {} lease expiries; {} completions retried after a lost \
         answer; {} outputs not naming the worker and attempt that succeeded",
        acked.len() / BATCH,
        acked.len(),
        refused,
        h.jobs,
        h.by_status,
        h.succeeded_twice,
        logs.claims_failed,
        h.lease_expired.len(),
        logs.complete_refused.len(),
        outcomes.wrong_output
    );

    for id in &acked {
        assert!(
            outcomes.started.contains_key(id),
            "acknowledged job {id} is missing"
        );
    }
    // Jobs committed by a call whose answer was lost in a kill count too.
    assert_eq!(
        h.count("succeeded"),
        h.jobs,
        "every committed job succeeded"
    );
    assert_eq!(h.succeeded_twice, 0, "no job succeeded twice");
    assert_eq!(
        outcomes.wrong_output, 0,
        "each job's output is that of the attempt that succeeded"
    );
    assert_eq!(
        ran_once,
        outcomes.started.len(),
        "a claiming worker ran every job exactly once"
    );
    // Only lost claim answers cost a lease: no live worker's lease expired.
    assert_eq!(claims_lost, h.lease_expired.len() as i64);
    assert_eq!(h.retries, h.lease_expired.len() as i64);
    assert_eq!(h.interrupted.len(), h.lease_expired.len());
    assert_eq!(ended_not_once, 0, "each job's run was completed once");
    assert_eq!(
        refused_not_ours, 0,
        "a completion was refused that had not committed before"
    );
    assert!(
        logs.lease_lost == 0 && logs.abandoned == 0,
        "a claiming worker lost a lease or gave up a completion"
    );
    for worker in &mut workers {
        worker.assert_alive();
    }
}
