//! Test harness: the jobs service in-process on its own database and Redis
//! prefix, clients for a user and for the worker credential.

use std::collections::HashMap;
use std::time::Duration;

use keel_jobs::Config;
use keel_proto::admin::v1::admin_service_client::AdminServiceClient;
use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::schedule_service_client::ScheduleServiceClient;
use keel_proto::jobs::v1::*;
use keel_shared::config::RedisConfig;
use keel_shared::testing::{self, TestDb, TestRedis};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request};
use uuid::Uuid;

pub(crate) const WORKER_TOKEN: &str = "test-worker-token";
pub(crate) const WAIT: Duration = Duration::from_secs(15);
/// The kinds a stream worker serves in these tests.
pub(crate) const STREAM_KINDS: &[&str] =
    &["echo", "batch", "fail", "flaky", "later", "now", "crashy"];

pub(crate) struct Svc {
    pub db: TestDb,
    /// Deletes this test's Redis keys on drop.
    _redis: TestRedis,
    /// What the service was pointed at (may differ from `redis.config`).
    pub redis_config: RedisConfig,
    pub jobs: JobsServiceClient<Channel>,
    pub runner: JobRunnerServiceClient<Channel>,
    pub schedules: ScheduleServiceClient<Channel>,
    pub admin: AdminServiceClient<Channel>,
    pub user: Uuid,
    pub token: String,
    shutdown: CancellationToken,
}

impl Svc {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts the service after `tweak` adjusted its config.
    pub(crate) async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let (listener, addr) = testing::listener().await;
        let mut config = Config::new(
            addr,
            db.config(),
            redis.config.clone(),
            testing::verifier_config(),
            WORKER_TOKEN,
        );
        config.relay_interval_ms = 50;
        config.reaper_interval_ms = 50;
        // As stream workers serving these kinds would: the service publishes
        // their jobs to their streams (other kinds' only to ClaimJobs).
        announce_kinds(&redis.config, STREAM_KINDS).await;
        tweak(&mut config);
        let redis_config = config.redis.clone();
        let shutdown = CancellationToken::new();
        tokio::spawn(keel_jobs::run(config, listener, shutdown.clone()));
        let channel = testing::channel(addr).await;
        let user = db
            .create_user(&format!("{}@example.com", Uuid::new_v4().simple()))
            .await;
        let token = testing::user_token(user, "user@example.com");
        Self {
            db,
            _redis: redis,
            redis_config,
            jobs: JobsServiceClient::new(channel.clone()),
            runner: JobRunnerServiceClient::new(channel.clone()),
            schedules: ScheduleServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel),
            user,
            token,
            shutdown,
        }
    }

    /// A second user with their own token.
    pub(crate) async fn other_user(&self) -> (Uuid, String) {
        let id = self
            .db
            .create_user(&format!("{}@example.com", Uuid::new_v4().simple()))
            .await;
        (id, testing::user_token(id, "other@example.com"))
    }

    pub(crate) fn u<T>(&self, msg: T) -> Request<T> {
        testing::authed(msg, &self.token)
    }

    pub(crate) fn w<T>(&self, msg: T) -> Request<T> {
        testing::authed(msg, WORKER_TOKEN)
    }

    pub(crate) async fn create(&self, req: CreateJobRequest) -> Job {
        self.jobs
            .clone()
            .create_job(self.u(req))
            .await
            .expect("create job")
            .into_inner()
            .job
            .unwrap()
    }

    pub(crate) async fn create_kind(&self, kind: &str) -> Job {
        self.create(CreateJobRequest {
            kind: kind.into(),
            ..Default::default()
        })
        .await
    }

    /// A job of `kind` created by the user of `token` (see [`Svc::other_user`]).
    pub(crate) async fn create_kind_as(&self, kind: &str, token: &str) -> Job {
        let req = CreateJobRequest {
            kind: kind.into(),
            ..Default::default()
        };
        self.jobs
            .clone()
            .create_job(testing::authed(req, token))
            .await
            .expect("create job")
            .into_inner()
            .job
            .unwrap()
    }

    pub(crate) async fn get(&self, id: &str) -> Job {
        self.jobs
            .clone()
            .get_job(self.u(GetJobRequest { id: id.into() }))
            .await
            .expect("get job")
            .into_inner()
            .job
            .unwrap()
    }

    pub(crate) async fn start_job(&self, id: &str) -> Result<StartJobResponse, tonic::Status> {
        self.runner
            .clone()
            .start_job(self.w(StartJobRequest {
                id: id.into(),
                worker_id: "w-1".into(),
                ..Default::default()
            }))
            .await
            .map(|r| r.into_inner())
    }

    /// StartJob, retried until the job is due (retries and re-queues run later).
    pub(crate) async fn start_when_due(&self, id: &str) -> StartJobResponse {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.start_job(id).await {
                Ok(r) => return r,
                Err(s)
                    if s.code() == Code::FailedPrecondition && s.message().contains("not due") =>
                {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "job never became due"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(s) => panic!("start job: {s:?}"),
            }
        }
    }

    pub(crate) async fn fail_job(
        &self,
        id: &str,
        attempt: i32,
        retryable: bool,
    ) -> Result<Job, tonic::Status> {
        self.runner
            .clone()
            .fail_job(self.w(FailJobRequest {
                id: id.into(),
                attempt,
                error: format!("boom {attempt}"),
                retryable,
                worker_id: "w-1".into(),
            }))
            .await
            .map(|r| r.into_inner().job.unwrap())
    }

    pub(crate) async fn complete_job(
        &self,
        id: &str,
        attempt: i32,
        cancelled: bool,
    ) -> Result<Job, tonic::Status> {
        self.runner
            .clone()
            .complete_job(self.w(CompleteJobRequest {
                id: id.into(),
                attempt,
                output: Some(keel_shared::json::json_to_struct(
                    &serde_json::json!({"ok": true}),
                )),
                cancelled,
                worker_id: "w-1".into(),
            }))
            .await
            .map(|r| r.into_inner().job.unwrap())
    }

    /// Job ids in the jobs stream, in order (XRANGE under this test's prefix).
    pub(crate) async fn stream_ids(&self) -> Vec<String> {
        stream_ids(&self.redis_config).await
    }

    /// How many times each job id was XADDed.
    pub(crate) async fn stream_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for id in self.stream_ids().await {
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    /// Outbox rows: every queued job has one until it starts.
    pub(crate) async fn outbox_len(&self) -> i64 {
        self.count("SELECT count(*) FROM job_outbox").await
    }

    /// Outbox rows never published to the stream yet.
    pub(crate) async fn undelivered_len(&self) -> i64 {
        self.count("SELECT count(*) FROM job_outbox WHERE published_at IS NULL")
            .await
    }

    /// The count a `SELECT count(*) ...` without parameters returns.
    pub(crate) async fn count(&self, sql: &str) -> i64 {
        let client = self.db.pool.get().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// The job's history: (event, status, attempt).
    pub(crate) async fn events(&self, id: &str) -> Vec<(String, String, i32)> {
        let client = self.db.pool.get().await.unwrap();
        let id = Uuid::parse_str(id).unwrap();
        client
            .query(
                "SELECT event, status, attempt FROM job_events WHERE job_id = $1 ORDER BY id",
                &[&id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    pub(crate) async fn wait_delivered(&self) {
        testing::eventually(WAIT, "every job published", || async {
            self.undelivered_len().await == 0
        })
        .await;
    }

    /// Another replica of the service on the same database and Redis prefix.
    pub(crate) async fn replica(&self, tweak: impl FnOnce(&mut Config)) -> Replica {
        let (listener, addr) = testing::listener().await;
        let mut config = Config::new(
            addr,
            self.db.config(),
            self.redis_config.clone(),
            testing::verifier_config(),
            WORKER_TOKEN,
        );
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        tokio::spawn(keel_jobs::run(config, listener, shutdown.clone()));
        let channel = testing::channel(addr).await;
        Replica {
            jobs: JobsServiceClient::new(channel.clone()),
            runner: JobRunnerServiceClient::new(channel),
            shutdown,
        }
    }
}

pub(crate) struct Replica {
    pub jobs: JobsServiceClient<Channel>,
    pub runner: JobRunnerServiceClient<Channel>,
    shutdown: CancellationToken,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Records `kinds` as served by stream workers now (see `keel_shared::queue`).
pub(crate) async fn announce_kinds(config: &RedisConfig, kinds: &[&str]) {
    let client = redis::Client::open(config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    keel_shared::redis::announce_kinds(&mut conn, config, kinds)
        .await
        .expect("announce kinds");
}

/// Job ids in the streams of [`STREAM_KINDS`] (every priority band), in the
/// order they were added (XRANGE under this test's prefix).
pub(crate) async fn stream_ids(config: &RedisConfig) -> Vec<String> {
    let client = redis::Client::open(config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut entries: Vec<((u64, u64), String)> = Vec::new();
    let streams = STREAM_KINDS.iter().flat_map(|kind| {
        keel_shared::queue::Band::ALL.map(|band| config.jobs_band_stream(kind, band))
    });
    for stream in streams {
        let range: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        for e in range.ids {
            let (ms, seq) = e.id.split_once('-').unwrap();
            let job = e.get::<String>(keel_shared::queue::FIELD_JOB_ID).unwrap();
            entries.push(((ms.parse().unwrap(), seq.parse().unwrap()), job));
        }
    }
    entries.sort();
    entries.into_iter().map(|(_, job)| job).collect()
}

pub(crate) fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    result.expect_err("expected an error").code()
}
