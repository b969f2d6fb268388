//! The real `keel-*` binaries as child processes (SIGKILLed on drop), their
//! environment, their scratch directory and what their JSON logs say.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keel_shared::testing;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::calls::health;
use crate::{CLAIM_KIND, WAIT, WORKER_TOKEN};

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

    /// Its exit status, once it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
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

    /// Waits (up to [`WAIT`]) until the process exits on its own, as one
    /// refusing to start must: its exit status and its whole log.
    pub async fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let proc = self.proc.as_mut().expect("started");
        let status = loop {
            if let Some(status) = proc.exit_status() {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "keel-{} still running after {WAIT:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.proc = None;
        let log = self.logs().last().map(std::fs::read_to_string);
        (status, log.and_then(Result::ok).unwrap_or_default())
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
