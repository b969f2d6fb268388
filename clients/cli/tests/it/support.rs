//! The real services in-process (auth, jobs, memory and a worker, on their
//! own database and Redis prefix) and the real `keel` binary run against
//! them with a config dir of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keel_shared::testing::{self, TestDb, TestRedis};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub(crate) const WORKER_TOKEN: &str = "cli-test-worker-token";
pub(crate) const PASSWORD: &str = "correct horse battery";
/// Long enough for a loaded 2-core machine.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Which servers to start besides Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Servers {
    /// auth, jobs, memory and a worker.
    All,
    /// auth, jobs and memory; a worker when the test says (`start_worker`).
    NoWorker,
    /// None: the dead-letter commands need Redis only.
    RedisOnly,
}

pub(crate) struct Env {
    pub db: Option<TestDb>,
    pub redis: TestRedis,
    dir: PathBuf,
    pub auth_addr: Option<SocketAddr>,
    pub jobs_addr: Option<SocketAddr>,
    pub memory_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
}

impl Env {
    pub(crate) async fn start(servers: Servers) -> Self {
        let redis = TestRedis::new();
        let dir = std::env::temp_dir().join(format!("keel-cli-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = Self {
            db: None,
            redis,
            dir,
            auth_addr: None,
            jobs_addr: None,
            memory_addr: None,
            shutdown: CancellationToken::new(),
        };
        if servers != Servers::RedisOnly {
            env.start_servers().await;
        }
        if servers == Servers::All {
            env.start_worker(|_| {}).await;
        }
        env
    }

    async fn start_servers(&mut self) {
        let db = TestDb::new().await;
        // Three services share one Postgres with every other test: small pools.
        let mut database = db.config();
        database.db_pool_size = 3;

        let key_file = self.dir.join("signing.pem");
        std::fs::write(&key_file, &testing::keys().pem.private_pem).unwrap();
        let (listener, auth_addr) = testing::listener().await;
        let mut auth = keel_auth::Config::new(auth_addr, database.clone(), key_file);
        auth.login.argon2_memory_kib = 1024;
        auth.login.argon2_iterations = 1;
        tokio::spawn(keel_auth::run(auth, listener, self.shutdown.clone()));

        let (listener, jobs_addr) = testing::listener().await;
        let mut jobs = keel_jobs::Config::new(
            jobs_addr,
            database.clone(),
            self.redis.config.clone(),
            testing::verifier_config(),
            WORKER_TOKEN,
        );
        jobs.retry_base_ms = 20;
        jobs.retry_max_ms = 100;
        jobs.relay_interval_ms = 50;
        jobs.reaper_interval_ms = 100;
        tokio::spawn(keel_jobs::run(jobs, listener, self.shutdown.clone()));

        let (listener, memory_addr) = testing::listener().await;
        let memory = keel_memory::Config::new(memory_addr, database, testing::verifier_config());
        tokio::spawn(keel_memory::run(memory, listener, self.shutdown.clone()));

        for addr in [auth_addr, jobs_addr, memory_addr] {
            testing::channel(addr).await;
        }
        self.db = Some(db);
        self.auth_addr = Some(auth_addr);
        self.jobs_addr = Some(jobs_addr);
        self.memory_addr = Some(memory_addr);
    }

    /// Starts a worker with the built-in kinds; `tune` adjusts its config.
    pub(crate) async fn start_worker(&self, tune: impl FnOnce(&mut keel_worker::Config)) {
        let jobs_addr = self.jobs_addr.expect("the jobs service runs");
        let mut worker = keel_worker::Config::new(
            "127.0.0.1:0".parse().unwrap(),
            format!("http://{jobs_addr}"),
            WORKER_TOKEN,
            self.redis.config.clone(),
        );
        worker.concurrency = Some(4);
        worker.heartbeat_ms = 100;
        worker.claim_idle_ms = 1_000;
        tune(&mut worker);
        let (listener, _) = testing::listener().await;
        tokio::spawn(keel_worker::run(worker, listener, self.shutdown.clone()));
    }

    /// Runs `keel ARGS` with nothing of the caller's environment but this
    /// environment's addresses, Redis and config dir.
    pub(crate) async fn keel(&self, args: &[&str]) -> Run {
        let url = |addr: Option<SocketAddr>| {
            // An address nothing listens on when the server was not started.
            format!("http://{}", addr.unwrap_or(([127, 0, 0, 1], 9).into()))
        };
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KEEL_CONFIG_DIR", self.dir.join("cli"))
            .env("KEEL_PASSWORD", PASSWORD)
            .env("KEEL_AUTH_URL", url(self.auth_addr))
            .env("KEEL_JOBS_URL", url(self.jobs_addr))
            .env("KEEL_MEMORY_URL", url(self.memory_addr))
            .env("REDIS_URL", &self.redis.config.redis_url)
            .env("KEEL_REDIS_PREFIX", &self.redis.config.redis_prefix)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("keel {args:?} did not finish"))
            .expect("run keel");
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            success: out.status.success(),
            stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
            stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
        }
    }

    /// `keel ARGS`, which must succeed: its stdout.
    pub(crate) async fn ok(&self, args: &[&str]) -> String {
        self.keel(args).await.ok()
    }

    /// `keel -o json ARGS`, which must succeed: its stdout parsed.
    pub(crate) async fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.ok(&all).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("keel {all:?}: {e}: {out}"))
    }

    /// Registers a user through the CLI, which signs it in.
    pub(crate) async fn sign_in(&self, email: &str) {
        self.ok(&["register", email, "--name", "CLI"]).await;
    }

    pub(crate) async fn redis(&self) -> keel_shared::redis::Connection {
        self.redis.pool().get().await.expect("redis connection")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) struct Run {
    args: Vec<String>,
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub(crate) fn ok(self) -> String {
        assert!(
            self.success,
            "keel {:?} failed: {}{}",
            self.args, self.stderr, self.stdout
        );
        self.stdout
    }
}

/// The table in `text`: its header cells and rows, each row checked to
/// start every column where the header's does (the columns are aligned).
pub(crate) fn parse_table(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = text.lines();
    let header = lines.next().expect("a header line");
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header[..i].ends_with("   ")))
        .map(|(i, _)| i)
        .collect();
    let names: Vec<String> = header.split_whitespace().map(String::from).collect();
    assert_eq!(
        starts.len(),
        names.len(),
        "header cells are single words three spaces apart: {header:?}"
    );
    let mut rows = Vec::new();
    for line in lines {
        let chars: Vec<char> = line.chars().collect();
        let mut cells = Vec::new();
        for (n, &start) in starts.iter().enumerate() {
            let end = starts
                .get(n + 1)
                .copied()
                .unwrap_or(chars.len())
                .min(chars.len());
            assert!(
                start < chars.len(),
                "row {line:?} lacks column {}",
                names[n]
            );
            assert!(
                start == 0 || chars[start - 1] == ' ',
                "column {} of {line:?} does not start at {start}:\n{text}",
                names[n]
            );
            assert_ne!(
                chars[start], ' ',
                "column {} of {line:?} is misaligned:\n{text}",
                names[n]
            );
            cells.push(
                chars[start..end]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string(),
            );
        }
        rows.push(cells);
    }
    (names, rows)
}

/// The `NAME   value` lines of a single object's table.
pub(crate) fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .filter(|rest| rest.starts_with("   "))
                .map(|rest| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
}
