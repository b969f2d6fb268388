//! Test environment: the jobs service in-process (own database and Redis
//! prefix), a user with a token, and workers started in-process.

use std::net::SocketAddr;
use std::time::Duration;

use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{
    BatchCreateJobsRequest, CancelJobRequest, CreateJobRequest, GetJobRequest, Job, JobStatus,
};
use keel_shared::StartupError;
use keel_shared::testing::{self, TestDb, TestRedis};
use keel_worker::{Config, Registry};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub(crate) const WORKER_TOKEN: &str = "test-worker-token";
/// Long enough for a loaded 2-core CI machine.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) struct Env {
    _db: TestDb,
    pub redis: TestRedis,
    pub jobs_addr: SocketAddr,
    jobs_config: keel_jobs::Config,
    jobs_shutdown: CancellationToken,
    jobs_task: Option<JoinHandle<Result<(), StartupError>>>,
    pub token: String,
    pub jobs: JobsServiceClient<Channel>,
}

impl Env {
    /// Jobs service with quick retries and relay; leases of `lease_ms`.
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(tune: impl FnOnce(&mut keel_jobs::Config)) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            keel_shared::telemetry::init(Default::default());
        }
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let (listener, jobs_addr) = testing::listener().await;
        let mut config = keel_jobs::Config::new(
            jobs_addr,
            db.config(),
            redis.config.clone(),
            testing::verifier_config(),
            WORKER_TOKEN,
        );
        config.retry_base_ms = 20;
        config.retry_max_ms = 100;
        config.relay_interval_ms = 50;
        config.reaper_interval_ms = 100;
        tune(&mut config);
        let jobs_shutdown = CancellationToken::new();
        let jobs_task = tokio::spawn(keel_jobs::run(
            config.clone(),
            listener,
            jobs_shutdown.clone(),
        ));
        let email = "worker-test@example.com";
        let user = db.create_user(email).await;
        let token = testing::user_token(user, email);
        let jobs = JobsServiceClient::new(testing::channel(jobs_addr).await);
        Self {
            _db: db,
            redis,
            jobs_addr,
            jobs_config: config,
            jobs_shutdown,
            jobs_task: Some(jobs_task),
            token,
            jobs,
        }
    }

    /// Stops the jobs service (the worker sees an outage).
    pub(crate) async fn stop_jobs(&mut self) {
        self.jobs_shutdown.cancel();
        if let Some(task) = self.jobs_task.take() {
            task.await.expect("jobs task").expect("jobs clean shutdown");
        }
    }

    /// Starts the jobs service again on the same address.
    pub(crate) async fn restart_jobs(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.jobs_addr)
            .await
            .expect("rebind the jobs address");
        self.jobs_shutdown = CancellationToken::new();
        self.jobs_task = Some(tokio::spawn(keel_jobs::run(
            self.jobs_config.clone(),
            listener,
            self.jobs_shutdown.clone(),
        )));
    }

    /// A worker config against this environment, tuned for tests.
    pub(crate) fn worker_config(&self) -> Config {
        let mut config = Config::new(
            "127.0.0.1:0".parse().unwrap(),
            format!("http://{}", self.jobs_addr),
            WORKER_TOKEN,
            self.redis.config.clone(),
        );
        config.concurrency = Some(4);
        config.heartbeat_ms = 100;
        config.claim_idle_ms = 1_000;
        config.job_grace_ms = 5_000;
        config.trim_interval_ms = 1_000;
        config
    }

    pub(crate) async fn start_worker(&self, config: Config, registry: Registry) -> Worker {
        let (listener, health_addr) = testing::listener().await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(keel_worker::run_with(
            config,
            registry,
            listener,
            shutdown.clone(),
        ));
        Worker {
            shutdown,
            task: Some(task),
            health_addr,
        }
    }

    pub(crate) async fn create(&self, kind: &str, payload: Value, max_attempts: i32) -> Job {
        let request = CreateJobRequest {
            kind: kind.into(),
            payload: Some(keel_shared::json::json_to_struct(&payload)),
            max_attempts,
            ..Default::default()
        };
        self.jobs
            .clone()
            .create_job(testing::authed(request, &self.token))
            .await
            .expect("CreateJob")
            .into_inner()
            .job
            .expect("job")
    }

    /// Creates one `kind` job per payload in one BatchCreateJobs call.
    pub(crate) async fn create_many(
        &self,
        kind: &str,
        payloads: impl IntoIterator<Item = Value>,
    ) -> Vec<Job> {
        let requests = payloads
            .into_iter()
            .map(|payload| CreateJobRequest {
                kind: kind.into(),
                payload: Some(keel_shared::json::json_to_struct(&payload)),
                ..Default::default()
            })
            .collect();
        self.jobs
            .clone()
            .batch_create_jobs(testing::authed(
                BatchCreateJobsRequest { requests },
                &self.token,
            ))
            .await
            .expect("BatchCreateJobs")
            .into_inner()
            .jobs
    }

    pub(crate) async fn get(&self, id: &str) -> Job {
        self.jobs
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

    pub(crate) async fn cancel(&self, id: &str) -> Job {
        self.jobs
            .clone()
            .cancel_job(testing::authed(
                CancelJobRequest { id: id.into() },
                &self.token,
            ))
            .await
            .expect("CancelJob")
            .into_inner()
            .job
            .expect("job")
    }

    /// Waits until the job has `status`, and returns it.
    pub(crate) async fn wait_for(&self, id: &str, status: JobStatus) -> Job {
        testing::eventually(WAIT, &format!("job {id} to be {status:?}"), || async {
            self.get(id).await.status() == status
        })
        .await;
        self.get(id).await
    }

    pub(crate) async fn redis(&self) -> keel_shared::redis::Connection {
        self.redis.pool().get().await.expect("redis connection")
    }

    /// The job streams that exist under this test's prefix (one per kind).
    pub(crate) async fn streams(&self) -> Vec<String> {
        let mut conn = self.redis().await;
        let pattern = self.redis.config.jobs_stream("*").replace("{*}", "*");
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut *conn)
            .await
            .expect("KEYS");
        keys.sort();
        keys
    }

    /// Messages of the consumer group not yet acknowledged, over every stream.
    pub(crate) async fn pending(&self) -> u64 {
        let mut total = 0;
        for stream in self.streams().await {
            let mut conn = self.redis().await;
            let reply: redis::Value = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(keel_shared::queue::CONSUMER_GROUP)
                .query_async(&mut *conn)
                .await
                .expect("XPENDING");
            if let redis::Value::Array(items) = reply
                && let Some(redis::Value::Int(n)) = items.first()
            {
                total += *n as u64;
            }
        }
        total
    }

    /// Waits until every stream is fully read and acknowledged by the group.
    pub(crate) async fn wait_drained(&self) {
        testing::eventually(WAIT, "every stream entry read and acknowledged", || async {
            for stream in self.streams().await {
                if !self.drained(&stream).await {
                    return false;
                }
            }
            true
        })
        .await;
    }

    async fn drained(&self, stream: &str) -> bool {
        let mut conn = self.redis().await;
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut *conn)
            .await
            .expect("XINFO GROUPS");
        let Some(group) = groups.groups.first() else {
            return false;
        };
        let top: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut *conn)
            .await
            .expect("XREVRANGE");
        let newest = top.ids.first().map(|e| e.id.clone()).unwrap_or_default();
        // An empty stream (a kind with nothing published yet) is drained.
        group.pending == 0 && (newest.is_empty() || group.last_delivered_id == newest)
    }

    /// Records `kinds` as served by a stream worker now, as a worker does
    /// when it starts: the jobs service then publishes their jobs.
    pub(crate) async fn announce_kinds(&self, kinds: &[&str]) {
        let mut conn = self.redis().await;
        keel_shared::redis::announce_kinds(&mut *conn, &self.redis.config, kinds)
            .await
            .expect("announce kinds");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.jobs_shutdown.cancel();
    }
}

pub(crate) struct Worker {
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), StartupError>>>,
    pub health_addr: SocketAddr,
}

impl Worker {
    pub(crate) fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Signals shutdown and waits for the worker to drain and return.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await
                .expect("worker task")
                .expect("worker clean shutdown");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Env {
    /// The real `keel-worker` binary against this environment.
    pub(crate) fn spawn_binary(&self) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_keel-worker"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("KEEL_JOBS_URL", format!("http://{}", self.jobs_addr))
            .env("KEEL_WORKER_TOKEN", WORKER_TOKEN)
            .env("REDIS_URL", &self.redis.config.redis_url)
            .env("KEEL_REDIS_PREFIX", &self.redis.config.redis_prefix)
            .env("KEEL_WORKER_HEALTH_ADDR", "127.0.0.1:0")
            .env("KEEL_WORKER_HEARTBEAT_MS", "100")
            .env("KEEL_WORKER_CLAIM_IDLE_MS", "1000")
            .env("KEEL_WORKER_CONCURRENCY", "2")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn keel-worker")
    }
}
