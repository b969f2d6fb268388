//! Harness of the fault-injection suite: the real `keel-*` binaries as child
//! processes (SIGKILLed on drop), private Redis and Postgres servers that a
//! test may stop and start, and the few queries the assertions need.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{CreateJobRequest, Job};
use keel_shared::testing;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;

/// The worker credential of every stack the suite starts.
pub const WORKER_TOKEN: &str = "faults-worker-token";
/// The kind only the suite's claiming worker serves: no stream worker
/// reads it, so its jobs are reachable through ClaimJobs alone.
pub const CLAIM_KIND: &str = "faults.claim";
/// Bound on every wait for recovery: generous, this is a 2-core CI machine.
pub const WAIT: Duration = Duration::from_secs(120);
/// The deadline a client gives each call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes a line to the real stderr, past the test harness's capture, so the
/// counts show in `cargo test` output.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "faults: {}", format!($($arg)*));
    }};
}

/// A scratch directory for logs and data, removed on drop unless the test
/// failed (then its path is printed, logs included).
pub struct Sandbox {
    pub dir: PathBuf,
}

impl Sandbox {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "keel-faults-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create sandbox");
        Self { dir }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            report!(
                "kept logs and data of the failed test in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A free loopback port (bound and released; a race is possible but harmless here).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// `keel-<name>` in `KEEL_FAULTS_BIN_DIR` if set, else in
/// `target/<profile>/`, next to this test binary's `deps/` folder.
/// `cargo test --workspace` builds every binary before running any test.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("KEEL_FAULTS_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .and_then(|deps| deps.parent())
                .expect("test binary in target/<profile>/deps")
                .to_path_buf()
        }
    };
    let path = dir.join(format!("keel-{name}"));
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build -p keel-auth -p keel-jobs \
         -p keel-memory -p keel-worker` (`cargo test --workspace` does)",
        path.display()
    );
    path
}

/// A child process, SIGKILLed and reaped on drop.
pub struct Proc {
    child: Child,
}

impl Proc {
    pub fn spawn(mut command: Command, log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `keel-<name>` binary with its environment, restartable: each start is
/// a new process logging to `<name>-<n>.log` in the sandbox.
pub struct Service {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// The executable when it is not `keel-<name>` (see [`binary`]).
    program: Option<PathBuf>,
    /// Its logs are `<log_name>-<n>.log`.
    log_name: String,
    env: Vec<(String, String)>,
    log_dir: PathBuf,
    starts: u32,
    proc: Option<Proc>,
}

impl Service {
    /// `addr` is where it serves gRPC (or health, for the worker); `env` is
    /// passed on top of a clean environment.
    pub fn new(sandbox: &Sandbox, name: &'static str, addr: SocketAddr, env: Env) -> Self {
        Self {
            name,
            addr,
            program: None,
            log_name: name.into(),
            env: env.0,
            log_dir: sandbox.dir.clone(),
            starts: 0,
            proc: None,
        }
    }

    /// keel-jobs on a free port with [`Env::jobs`] as `tweak` adjusts it,
    /// started and SERVING.
    pub async fn jobs(
        sandbox: &Sandbox,
        database_url: &str,
        redis: &RedisTarget,
        tweak: impl FnOnce(Env) -> Env,
    ) -> Self {
        let addr = free_addr();
        let mut jobs = Self::new(
            sandbox,
            "jobs",
            addr,
            tweak(Env::jobs(addr, database_url, redis)),
        );
        jobs.start();
        jobs.wait_serving().await;
        jobs
    }

    /// keel-worker `name` (health on a free port) for the jobs service at
    /// `jobs`, with [`Env::worker`] as `tweak` adjusts it; started.
    pub fn worker(
        sandbox: &Sandbox,
        jobs: SocketAddr,
        redis: &RedisTarget,
        name: &str,
        tweak: impl FnOnce(Env) -> Env,
    ) -> Self {
        let addr = free_addr();
        let mut worker = Self::new(
            sandbox,
            "worker",
            addr,
            tweak(Env::worker(addr, jobs, redis, name)),
        );
        worker.start();
        worker
    }

    /// The claiming worker `program` (the suite's `keel-faults-claim-worker`)
    /// as worker `worker_id` of the jobs service at `jobs`, with
    /// [`Env::claim_worker`] as `tweak` adjusts it; started. It serves
    /// nothing (its `addr` is unspecified) and logs to
    /// `claim-<label>-<n>.log`.
    pub fn claim_worker(
        sandbox: &Sandbox,
        program: &Path,
        jobs: SocketAddr,
        label: &str,
        worker_id: &str,
        tweak: impl FnOnce(Env) -> Env,
    ) -> Self {
        let mut worker = Self::new(
            sandbox,
            "claim-worker",
            SocketAddr::from(([0, 0, 0, 0], 0)),
            tweak(Env::claim_worker(jobs, worker_id)),
        );
        worker.program = Some(program.to_path_buf());
        worker.log_name = format!("claim-{label}");
        worker.start();
        worker
    }

    pub fn set_env(&mut self, key: &str, value: impl Into<String>) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "{} already running", self.name);
        self.starts += 1;
        let program = self.program.clone().unwrap_or_else(|| binary(self.name));
        let mut command = Command::new(program);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("KEEL_SHUTDOWN_GRACE_SECS", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let log = self
            .log_dir
            .join(format!("{}-{}.log", self.log_name, self.starts));
        self.proc = Some(Proc::spawn(command, &log));
    }

    /// SIGKILL (no drain, no goodbye).
    pub fn sigkill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Panics when the process exited on its own (it must ride out outages).
    pub fn assert_alive(&mut self) {
        let running = self.proc.as_mut().is_some_and(Proc::is_running);
        assert!(
            running,
            "keel-{} exited on its own; its log ends:\n{}",
            self.name,
            self.log_tail()
        );
    }

    /// Resident memory of the running process, in KiB (from /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.proc.as_ref()?.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The log files of every start so far.
    pub fn logs(&self) -> Vec<PathBuf> {
        (1..=self.starts)
            .map(|n| self.log_dir.join(format!("{}-{n}.log", self.log_name)))
            .collect()
    }

    fn log_tail(&self) -> String {
        let text = self
            .logs()
            .last()
            .and_then(|log| std::fs::read_to_string(log).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until it reports SERVING; panics early, with its log, if it exits.
    pub async fn wait_serving(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if health(self.addr).await == Some(ServingStatus::Serving) {
                return;
            }
            self.assert_alive();
            assert!(
                tokio::time::Instant::now() < deadline,
                "keel-{} at {} not SERVING after {WAIT:?}; its log ends:\n{}",
                self.name,
                self.addr,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Environment variables for a service.
#[derive(Default, Clone)]
pub struct Env(pub Vec<(String, String)>);

impl Env {
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.into(), value.to_string()));
        self
    }

    /// keel-jobs on `addr` against `database_url` and the Redis `redis`,
    /// trusting the test signing key, with quick relay, reaper and retries.
    pub fn jobs(addr: SocketAddr, database_url: &str, redis: &RedisTarget) -> Self {
        Self::default()
            .set("KEEL_JOBS_ADDR", addr)
            .set("DATABASE_URL", database_url)
            .set("REDIS_URL", &redis.url)
            .set("KEEL_REDIS_PREFIX", &redis.prefix)
            .set("KEEL_WORKER_TOKEN", WORKER_TOKEN)
            .set("KEEL_JWT_PUBLIC_KEY_FILES", public_key_file())
            .set("KEEL_DB_POOL_SIZE", 8)
            .set("KEEL_REDIS_POOL_SIZE", 8)
            .set("KEEL_JOBS_RELAY_INTERVAL_MS", 50)
            .set("KEEL_JOBS_REAPER_INTERVAL_MS", 200)
            .set("KEEL_JOBS_RETRY_BASE_MS", 20)
            .set("KEEL_JOBS_RETRY_MAX_MS", 200)
            .set("KEEL_JOBS_WATCH_POLL_MS", 500)
    }

    /// keel-worker with its health server on `health`, named `name`.
    pub fn worker(health: SocketAddr, jobs: SocketAddr, redis: &RedisTarget, name: &str) -> Self {
        Self::default()
            .set("KEEL_WORKER_HEALTH_ADDR", health)
            .set("KEEL_JOBS_URL", format!("http://{jobs}"))
            .set("KEEL_WORKER_TOKEN", WORKER_TOKEN)
            .set("REDIS_URL", &redis.url)
            .set("KEEL_REDIS_PREFIX", &redis.prefix)
            .set("KEEL_REDIS_POOL_SIZE", 8)
            .set("KEEL_WORKER_CONSUMER_NAME", name)
            .set("KEEL_WORKER_CONCURRENCY", 4)
            .set("KEEL_WORKER_HEARTBEAT_MS", 200)
            .set("KEEL_WORKER_CLAIM_IDLE_MS", 1_000)
            .set("KEEL_WORKER_MAX_DELIVERIES", 50)
            .set("KEEL_WORKER_TRIM_INTERVAL_MS", 1_000)
    }

    /// The suite's claiming worker, as `worker_id` of the jobs service at
    /// `jobs`, taking `faults.claim` jobs four at a time.
    pub fn claim_worker(jobs: SocketAddr, worker_id: &str) -> Self {
        Self::default()
            .set("KEEL_JOBS_URL", format!("http://{jobs}"))
            .set("KEEL_WORKER_TOKEN", WORKER_TOKEN)
            .set("KEEL_CLAIM_WORKER_ID", worker_id)
            .set("KEEL_CLAIM_KINDS", CLAIM_KIND)
            .set("KEEL_CLAIM_CONCURRENCY", 4)
            .set("KEEL_CLAIM_WAIT_MS", 2_000)
            .set("KEEL_CLAIM_HEARTBEAT_MS", 300)
    }

    /// keel-memory on `addr`.
    pub fn memory(addr: SocketAddr, database_url: &str) -> Self {
        Self::default()
            .set("KEEL_MEMORY_ADDR", addr)
            .set("DATABASE_URL", database_url)
            .set("KEEL_JWT_PUBLIC_KEY_FILES", public_key_file())
            .set("KEEL_DB_POOL_SIZE", 4)
    }

    /// keel-auth on `addr`, signing with the test key (written to `sandbox`),
    /// with cheap password hashing.
    pub fn auth(addr: SocketAddr, database_url: &str, sandbox: &Sandbox) -> Self {
        let key = sandbox.dir.join("auth-signing-key.pem");
        std::fs::write(&key, &testing::keys().pem.private_pem).expect("write signing key");
        Self::default()
            .set("KEEL_AUTH_ADDR", addr)
            .set("DATABASE_URL", database_url)
            .set("KEEL_JWT_PRIVATE_KEY_FILE", key.display())
            .set("KEEL_DB_POOL_SIZE", 4)
            .set("KEEL_ARGON2_MEMORY_KIB", 8_192)
            .set("KEEL_ARGON2_ITERATIONS", 1)
    }
}

fn public_key_file() -> String {
    testing::keys().public_key_file.display().to_string()
}

/// Where a stack's Redis keys live.
#[derive(Clone, Debug)]
pub struct RedisTarget {
    pub url: String,
    pub prefix: String,
}

impl RedisTarget {
    pub fn shared(redis: &testing::TestRedis) -> Self {
        Self {
            url: redis.config.redis_url.clone(),
            prefix: redis.config.redis_prefix.clone(),
        }
    }
}

/// A channel that connects lazily and reconnects by itself after restarts;
/// every call on it has the [`CALL_TIMEOUT`] deadline.
pub fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL_TIMEOUT)
        .connect_lazy()
}

/// A lazily connecting channel without a per-call deadline (for streams).
pub fn stream_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// The health of "" at `addr`, or None when it does not answer.
pub async fn health(addr: SocketAddr) -> Option<ServingStatus> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await.ok()?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(reply.into_inner().status())
}

/// Waits (up to [`WAIT`]) until `addr` reports `want`.
pub async fn wait_health(addr: SocketAddr, want: ServingStatus, what: &str) {
    testing::eventually(
        WAIT,
        &format!("{what} at {addr} to be {want:?}"),
        || async {
            let status = health(addr).await;
            if status != Some(want) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            status == Some(want)
        },
    )
    .await;
}

/// A CreateJob request of `kind` with `payload`.
pub fn job_request(kind: &str, payload: &Value, max_attempts: i32) -> CreateJobRequest {
    CreateJobRequest {
        kind: kind.into(),
        payload: Some(keel_shared::json::json_to_struct(payload)),
        max_attempts,
        ..Default::default()
    }
}

/// The i-th job of a mixed load: even ones `echo`, odd ones `sleep` of 50..300 ms.
pub fn mixed_job(i: usize) -> CreateJobRequest {
    if i.is_multiple_of(2) {
        job_request("echo", &serde_json::json!({ "i": i }), 20)
    } else {
        let ms = 50 + (i * 37) % 251;
        job_request("sleep", &serde_json::json!({ "ms": ms }), 20)
    }
}

pub async fn create_job(
    client: &JobsServiceClient<Channel>,
    token: &str,
    request: CreateJobRequest,
) -> Result<Job, tonic::Status> {
    client
        .clone()
        .create_job(testing::authed(request, token))
        .await
        .map(|r| r.into_inner().job.expect("CreateJob returns the job"))
}

/// A fresh database with one user, and that user's access token.
pub async fn tenant(email: &str) -> (testing::TestDb, String) {
    let db = testing::TestDb::new().await;
    let user = db.create_user(email).await;
    (db, testing::user_token(user, email))
}

/// A plain connection to a database (for the assertions' queries).
pub async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Counts of what the job history shows, for the assertions and the report.
#[derive(Debug, Default)]
pub struct History {
    pub jobs: i64,
    pub by_status: Vec<(String, i64)>,
    /// Jobs with more than one `succeeded` event.
    pub succeeded_twice: i64,
    /// Jobs not SUCCEEDED that are not terminal either.
    pub not_terminal: i64,
    /// Sum over jobs of (attempt - 1).
    pub retries: i64,
    /// Jobs whose `started` events are not exactly one.
    pub started_not_once: i64,
    /// Attempts that started and never finished (their worker vanished).
    pub interrupted: Vec<(String, String)>,
    /// (worker_id) of every `lease_expired` event.
    pub lease_expired: Vec<String>,
}

impl History {
    /// Attempts that never finished because their worker was one of `killed`.
    pub fn interrupted_on(&self, killed: &HashSet<String>) -> usize {
        self.interrupted
            .iter()
            .filter(|(_, w)| killed.contains(w))
            .count()
    }

    /// Only the `killed` workers lost attempts or leases, and each retry
    /// re-ran exactly one attempt a kill interrupted.
    pub fn assert_only_killed_workers_lost_attempts(&self, killed: &HashSet<String>) {
        for (job, worker) in &self.interrupted {
            assert!(
                killed.contains(worker),
                "attempt of {job} on {worker:?} never finished, but that worker was not killed"
            );
        }
        for worker in &self.lease_expired {
            assert!(
                killed.contains(worker),
                "a lease of live worker {worker:?} expired"
            );
        }
        assert_eq!(
            self.retries,
            self.interrupted_on(killed) as i64,
            "each retry re-runs exactly one attempt a SIGKILL interrupted"
        );
    }

    pub async fn read(db: &tokio_postgres::Client) -> Self {
        let mut h = History::default();
        for row in db
            .query(
                "SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status",
                &[],
            )
            .await
            .expect("jobs by status")
        {
            let (status, n): (String, i64) = (row.get(0), row.get(1));
            h.jobs += n;
            if !matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
                h.not_terminal += n;
            }
            h.by_status.push((status, n));
        }
        h.succeeded_twice = scalar(
            db,
            "SELECT count(*) FROM (SELECT job_id FROM job_events WHERE event = 'succeeded'
             GROUP BY job_id HAVING count(*) > 1) t",
        )
        .await;
        h.retries = scalar(
            db,
            "SELECT coalesce(sum(attempt - 1), 0)::int8 FROM jobs WHERE attempt > 1",
        )
        .await;
        h.started_not_once = scalar(
            db,
            "SELECT count(*) FROM jobs j WHERE (SELECT count(*) FROM job_events e
             WHERE e.job_id = j.id AND e.event = 'started') <> 1",
        )
        .await;
        h.interrupted = db
            .query(
                "SELECT s.job_id::text, coalesce(s.worker_id, '') FROM job_events s
                 WHERE s.event = 'started' AND NOT EXISTS (
                     SELECT 1 FROM job_events e WHERE e.job_id = s.job_id
                     AND e.attempt = s.attempt AND e.event IN ('succeeded', 'failed', 'cancelled'))
                 ORDER BY s.id",
                &[],
            )
            .await
            .expect("interrupted attempts")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        h.lease_expired = db
            .query(
                "SELECT coalesce(worker_id, '') FROM job_events WHERE event = 'lease_expired'",
                &[],
            )
            .await
            .expect("lease_expired events")
            .iter()
            .map(|r| r.get(0))
            .collect();
        h
    }

    pub fn count(&self, status: &str) -> i64 {
        self.by_status
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n)
    }
}

async fn scalar(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Waits until every job in the database is terminal.
pub async fn wait_all_terminal(db: &tokio_postgres::Client, expected_at_least: i64) {
    testing::eventually(WAIT, "every job to reach a terminal state", || async {
        let row = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE status IN ('queued', 'running')) FROM jobs",
                &[],
            )
            .await;
        let done = matches!(&row, Ok(r) if r.get::<_, i64>(0) >= expected_at_least
            && r.get::<_, i64>(1) == 0);
        if !done {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        done
    })
    .await;
}

/// A private `redis-server` (no persistence) on a port of its own, which a
/// test may kill and start again on the same port.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    starts: u32,
    proc: Option<Proc>,
}

impl PrivateRedis {
    /// None (with the reason printed) when `redis-server` is not installed.
    pub async fn start(sandbox: &Sandbox) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            report!("SKIPPED: redis-server is not installed");
            return None;
        }
        let mut redis = Self {
            port: free_port(),
            dir: sandbox.dir.clone(),
            starts: 0,
            proc: None,
        };
        redis.restart().await;
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: everything in memory is gone.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts (again) on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        self.starts += 1;
        let mut command = Command::new("redis-server");
        command.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.display().to_string(),
        ]);
        let log = self.dir.join(format!("redis-{}.log", self.starts));
        self.proc = Some(Proc::spawn(command, &log));
        let url = self.url();
        testing::eventually(WAIT, "private redis-server to answer", || async {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                return false;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return false;
            };
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
        })
        .await;
    }
}

/// A private Postgres cluster from the local binaries (`initdb`, `pg_ctl`),
/// run as the `postgres` user when we are root, stopped on drop.
pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    as_postgres: bool,
    running: bool,
}

impl PrivatePostgres {
    /// Initialises and starts a cluster; Err(reason) when no binaries exist.
    pub fn start(sandbox: &Sandbox) -> Result<Self, String> {
        let bin = pg_bindir().ok_or("no PostgreSQL initdb under /usr/lib/postgresql/*/bin")?;
        let dir = sandbox.dir.join("pg");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let as_postgres = is_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&sandbox.dir)
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err("chown to the postgres user failed (no such user?)".into());
            }
        }
        let pg = Self {
            port: free_port(),
            bin,
            dir,
            as_postgres,
            running: false,
        };
        let data = pg.dir.join("data");
        let log = std::fs::File::create(pg.dir.join("initdb.log")).map_err(|e| e.to_string())?;
        let status = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("initdb failed, see {}", pg.dir.display()));
        }
        let mut pg = pg;
        pg.start_server();
        Ok(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_server(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start failed, see {}",
            self.dir.display()
        );
        self.running = true;
    }

    /// `pg_ctl stop -m immediate`: a crash, as far as clients can tell;
    /// committed transactions survive through the WAL.
    pub fn crash(&mut self) {
        assert!(
            self.stop(),
            "pg_ctl stop failed, see {}",
            self.dir.display()
        );
    }

    fn stop(&mut self) -> bool {
        self.running = false;
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            self.stop();
        }
    }
}

fn pg_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").exists())
        .collect();
    // Highest major version first.
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// How often each job id appears in JSON log lines (`KEEL_LOG_FORMAT=json`)
/// whose message is `message`.
pub fn logged_job_ids(logs: &[PathBuf], message: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v["message"].as_str() != Some(message) {
                continue;
            }
            if let Some(id) = v["job_id"].as_str() {
                *seen.entry(id.to_string()).or_insert(0) += 1;
            }
        }
    }
    seen
}
