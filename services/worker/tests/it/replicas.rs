//! Three jobs replicas (A, B, C) and three workers on one Postgres database
//! and one Redis prefix, under a mixed load: every relay publishes, no job is
//! published twice, no live job's lease is reaped, and WatchJob on replica A
//! sees transitions recorded through the other replicas. (Login rate limits
//! across auth replicas are tested in the auth crate.)

use std::collections::HashMap;
use std::net::SocketAddr;

use futures::future::join_all;
use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{
    CancelJobRequest, CompleteJobRequest, CreateJobRequest, GetJobRequest, Job, JobStatus,
    StartJobRequest, WatchJobRequest,
};
use keel_shared::queue::FIELD_JOB_ID;
use keel_shared::testing::{self, TestDb, TestRedis, eventually};
use keel_worker::Registry;
use redis::streams::StreamRangeReply;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::support::{WAIT, WORKER_TOKEN};

struct Cluster {
    db: TestDb,
    redis: TestRedis,
    token: String,
    addrs: Vec<SocketAddr>,
    jobs: Vec<JobsServiceClient<Channel>>,
    shutdown: CancellationToken,
}

impl Cluster {
    async fn start(replicas: usize) -> Self {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let email = "replicas@example.com";
        let token = testing::user_token(db.create_user(email).await, email);
        let shutdown = CancellationToken::new();
        let mut addrs = Vec::new();
        let mut jobs = Vec::new();
        for _ in 0..replicas {
            let (listener, addr) = testing::listener().await;
            let mut config = keel_jobs::Config::new(
                addr,
                db.config(),
                redis.config.clone(),
                testing::verifier_config(),
                WORKER_TOKEN,
            );
            // Postgres is shared with other suites running at the same time.
            config.database.db_pool_size = 4;
            config.retry_base_ms = 20;
            config.retry_max_ms = 100;
            // Relays of all replicas race for the same rows as often as they can.
            config.relay_interval_ms = 20;
            config.reaper_interval_ms = 100;
            config.lease_ms = 10_000;
            // Never re-publish on purpose: every extra stream entry is a bug.
            config.redeliver_after_ms = 600_000;
            // Watchers learn of transitions from announcements, not from polling.
            config.watch_poll_ms = 600_000;
            tokio::spawn(keel_jobs::run(config, listener, shutdown.clone()));
            jobs.push(JobsServiceClient::new(testing::channel(addr).await));
            addrs.push(addr);
        }
        Self {
            db,
            redis,
            token,
            addrs,
            jobs,
            shutdown,
        }
    }

    fn worker_config(&self, replica: usize) -> keel_worker::Config {
        let mut config = keel_worker::Config::new(
            "127.0.0.1:0".parse().unwrap(),
            format!("http://{}", self.addrs[replica]),
            WORKER_TOKEN,
            self.redis.config.clone(),
        );
        config.concurrency = Some(4);
        config.heartbeat_ms = 200;
        config.job_grace_ms = 5_000;
        config
    }

    async fn create(&self, replica: usize, kind: &str, payload: Value, max_attempts: i32) -> Job {
        self.create_with(
            replica,
            CreateJobRequest {
                kind: kind.into(),
                payload: Some(keel_shared::json::json_to_struct(&payload)),
                max_attempts,
                ..Default::default()
            },
        )
        .await
    }

    async fn create_with(&self, replica: usize, request: CreateJobRequest) -> Job {
        self.jobs[replica]
            .clone()
            .create_job(testing::authed(request, &self.token))
            .await
            .expect("CreateJob")
            .into_inner()
            .job
            .expect("job")
    }

    async fn get(&self, replica: usize, id: &str) -> Job {
        self.jobs[replica]
            .clone()
            .get_job(testing::authed(
                GetJobRequest { id: id.into() },
                &self.token,
            ))
            .await
            .expect("GetJob")
            .into_inner()
            .job
            .expect("job")
    }

    async fn wait_for(&self, id: &str, status: JobStatus) -> Job {
        eventually(WAIT, &format!("job {id} to be {status:?}"), || async {
            self.get(2, id).await.status() == status
        })
        .await;
        self.get(2, id).await
    }

    /// WatchJob on `replica`: the first state it sends, and a task collecting
    /// every later one until the stream ends.
    async fn watch(&self, replica: usize, id: &str) -> (Job, tokio::task::JoinHandle<Vec<Job>>) {
        let request = testing::authed(WatchJobRequest { id: id.into() }, &self.token);
        let mut stream = self.jobs[replica]
            .clone()
            .watch_job(request)
            .await
            .expect("WatchJob")
            .into_inner();
        let first = stream
            .message()
            .await
            .expect("watch stream")
            .and_then(|m| m.job)
            .expect("the current state first");
        let rest = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(message) = stream.message().await.expect("watch stream") {
                seen.push(message.job.expect("job"));
            }
            seen
        });
        (first, rest)
    }

    /// Stream entries per job id, over the built-in kinds' streams.
    async fn stream_entries(&self) -> HashMap<String, usize> {
        let mut conn = self.redis.pool().get().await.unwrap();
        let mut counts = HashMap::new();
        for kind in ["echo", "sleep", "fail"] {
            let entries: StreamRangeReply = redis::cmd("XRANGE")
                .arg(self.redis.config.jobs_stream(kind))
                .arg("-")
                .arg("+")
                .query_async(&mut *conn)
                .await
                .unwrap();
            for entry in entries.ids {
                let id: String = entry.get(FIELD_JOB_ID).expect("job_id field");
                *counts.entry(id).or_default() += 1;
            }
        }
        counts
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn statuses(seen: &[Job]) -> Vec<JobStatus> {
    let mut out: Vec<JobStatus> = seen.iter().map(Job::status).collect();
    out.dedup();
    out
}

#[tokio::test]
async fn three_jobs_replicas_and_three_workers_share_a_mixed_load() {
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    let cluster = Cluster::start(3).await;

    // Before any worker runs (but with echo served, as if a worker had
    // announced it): created through C, watched on A, started and completed
    // through B by hand.
    let mut conn = cluster.redis.pool().get().await.unwrap();
    keel_shared::redis::announce_kinds(&mut *conn, &cluster.redis.config, &["echo"])
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let manual = cluster.create(C, "echo", json!({"manual": true}), 1).await;
    eventually(WAIT, "the job published to the stream", || async {
        cluster.stream_entries().await.contains_key(&manual.id)
    })
    .await;
    let (first, watched) = cluster.watch(A, &manual.id).await;
    assert_eq!(first.status(), JobStatus::Queued);
    let mut runner = JobRunnerServiceClient::new(testing::channel(cluster.addrs[B]).await);
    let started = runner
        .start_job(testing::authed(
            StartJobRequest {
                id: manual.id.clone(),
                worker_id: "manual-through-b".into(),
                ..Default::default()
            },
            WORKER_TOKEN,
        ))
        .await
        .expect("StartJob through B")
        .into_inner()
        .job
        .expect("job");
    assert_eq!(started.attempt, 1);
    runner
        .complete_job(testing::authed(
            CompleteJobRequest {
                id: manual.id.clone(),
                attempt: 1,
                output: Some(keel_shared::json::json_to_struct(&json!({"by": "b"}))),
                worker_id: "manual-through-b".into(),
                ..Default::default()
            },
            WORKER_TOKEN,
        ))
        .await
        .expect("CompleteJob through B");
    let seen = tokio::time::timeout(WAIT, watched)
        .await
        .expect("the watch on A ends after the terminal state")
        .unwrap();
    assert_eq!(
        statuses(&seen),
        [JobStatus::Running, JobStatus::Succeeded],
        "WatchJob on A sees both transitions recorded through B"
    );
    assert_eq!(output(seen.last().unwrap()), json!({"by": "b"}));

    // Workers talk to B and C only, so whatever A's watchers see was recorded
    // through another replica.
    let mut workers = Vec::new();
    for replica in [B, C, B] {
        let (listener, _) = testing::listener().await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(keel_worker::run_with(
            cluster.worker_config(replica),
            Registry::with_builtins(),
            listener,
            shutdown.clone(),
        ));
        workers.push((shutdown, task));
    }

    // The mixed load, created through all three replicas at once.
    let mut specs: Vec<(&str, Value, i32)> = Vec::new();
    for n in 0..15 {
        specs.push(("echo", json!({"n": n}), 1));
    }
    for n in 0..10 {
        specs.push(("sleep", json!({"ms": 30 + 10 * n}), 1));
    }
    for _ in 0..4 {
        specs.push(("fail", json!({"message": "flaky", "retryable": true}), 2));
    }
    for _ in 0..4 {
        specs.push(("fail", json!({"message": "broken", "retryable": false}), 3));
    }
    let created: Vec<Job> = join_all(
        specs
            .iter()
            .enumerate()
            .map(|(i, (kind, payload, max))| cluster.create(i % 3, kind, payload.clone(), *max)),
    )
    .await;
    // Not due for an hour, then cancelled: never published.
    let mut later = Vec::new();
    for replica in [A, B, C] {
        let job = cluster
            .create_with(
                replica,
                CreateJobRequest {
                    kind: "echo".into(),
                    run_at: Some(prost_types::Timestamp {
                        seconds: chrono_now_secs() + 3600,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
            )
            .await;
        later.push(job);
    }
    // Running when cancelled (through C).
    let long = cluster.create(A, "sleep", json!({"ms": 60_000}), 1).await;
    // Created through B, watched on A while still unfinished.
    let mut watched = Vec::new();
    for _ in 0..3 {
        let job = cluster.create(B, "sleep", json!({"ms": 2_000}), 1).await;
        let (first, rest) = cluster.watch(A, &job.id).await;
        assert_ne!(first.status(), JobStatus::Succeeded, "watched too late");
        watched.push((job, rest));
    }

    for job in &later {
        let cancelled = cluster.jobs[C]
            .clone()
            .cancel_job(testing::authed(
                CancelJobRequest { id: job.id.clone() },
                &cluster.token,
            ))
            .await
            .expect("CancelJob")
            .into_inner()
            .job
            .unwrap();
        assert_eq!(cancelled.status(), JobStatus::Cancelled);
    }
    cluster.wait_for(&long.id, JobStatus::Running).await;
    cluster.jobs[C]
        .clone()
        .cancel_job(testing::authed(
            CancelJobRequest {
                id: long.id.clone(),
            },
            &cluster.token,
        ))
        .await
        .expect("CancelJob of a running job");

    // Everything reaches the state its kind implies, in as many attempts.
    for (job, (kind, payload, _)) in created.iter().zip(&specs) {
        let (status, attempts) = match (*kind, payload["retryable"].as_bool()) {
            ("fail", Some(true)) => (JobStatus::Failed, 2),
            ("fail", _) => (JobStatus::Failed, 1),
            _ => (JobStatus::Succeeded, 1),
        };
        let done = cluster.wait_for(&job.id, status).await;
        assert_eq!(done.attempt, attempts, "{kind} {payload}");
    }
    let long = cluster.wait_for(&long.id, JobStatus::Cancelled).await;
    assert_eq!(long.attempt, 1);
    for (job, rest) in &mut watched {
        let seen = tokio::time::timeout(WAIT, rest)
            .await
            .expect("watch on A ends")
            .unwrap();
        assert_eq!(
            statuses(&seen).last(),
            Some(&JobStatus::Succeeded),
            "watch of {} on A",
            job.id
        );
        assert_eq!(output(seen.last().unwrap()), json!({"slept_ms": 2000}));
    }

    // No job published twice by competing relays: one stream entry per
    // delivery, i.e. per attempt (a retry is queued, and published, again).
    let entries = cluster.stream_entries().await;
    let mut expected: HashMap<String, usize> = HashMap::new();
    let watched_jobs = watched.iter().map(|(job, _)| job);
    for job in created.iter().chain(watched_jobs).chain([&long, &manual]) {
        let attempts = cluster.get(A, &job.id).await.attempt as usize;
        expected.insert(job.id.clone(), attempts);
    }
    for job in &later {
        assert_eq!(entries.get(&job.id), None, "a job never due was published");
    }
    let mut ids: Vec<&String> = entries.keys().chain(expected.keys()).collect();
    ids.sort();
    ids.dedup();
    let wrong: Vec<(&String, usize, usize)> = ids
        .into_iter()
        .map(|id| {
            let got = entries.get(id).copied().unwrap_or(0);
            (id, got, expected.get(id).copied().unwrap_or(0))
        })
        .filter(|(_, got, want)| got != want)
        .collect();
    assert!(
        wrong.is_empty(),
        "(job, stream entries, attempts) that differ: {wrong:?}"
    );

    // None reaped while alive.
    let client = cluster.db.pool.get().await.unwrap();
    let reaped: i64 = client
        .query_one(
            "SELECT count(*) FROM job_events WHERE event = 'lease_expired'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reaped, 0, "a live worker's job was reaped");

    for (shutdown, task) in workers {
        shutdown.cancel();
        task.await.unwrap().expect("worker clean shutdown");
    }
}

fn output(job: &Job) -> Value {
    keel_shared::json::struct_to_json(job.output.as_ref().expect("output")).unwrap()
}

fn chrono_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
