//! The jobs service's one typed config, from flags or env.

use std::net::SocketAddr;
use std::time::Duration;

use keel_shared::auth::VerifierConfig;
use keel_shared::config::{DatabaseConfig, RedisConfig, RuntimeConfig};

pub const DEFAULT_LEASE_MS: u64 = 30_000;
pub const DEFAULT_RETRY_BASE_MS: u64 = 1_000;
pub const DEFAULT_RETRY_MAX_MS: u64 = 300_000;
pub const DEFAULT_RELAY_INTERVAL_MS: u64 = 200;
pub const DEFAULT_RELAY_BATCH: i64 = 500;
pub const DEFAULT_REAPER_INTERVAL_MS: u64 = 1_000;
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
pub const DEFAULT_WATCH_POLL_MS: u64 = 2_000;
pub const DEFAULT_MAX_WATCHERS: usize = 10_000;
pub const DEFAULT_REDELIVER_AFTER_MS: u64 = 300_000;
pub const DEFAULT_RETENTION_BATCH: i64 = 1_000;
pub const DEFAULT_RETENTION_INTERVAL_MS: u64 = 3_600_000;
pub const DEFAULT_SCHEDULE_TIMEOUT_SECS: u64 = 3_600;
pub const DEFAULT_CLAIM_POLL_MS: u64 = 250;
pub const DEFAULT_SCHEDULES_PER_USER: i64 = 100;
pub const DEFAULT_SCHEDULE_MIN_INTERVAL_SECS: u64 = 60;
pub const DEFAULT_SCHEDULE_TICK_MS: u64 = 1_000;
pub const DEFAULT_STREAM_BACKLOG: i64 = 1024;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "keel-jobs", about = "Keel jobs service", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "KEEL_JOBS_ADDR", default_value = "0.0.0.0:50052")]
    pub listen_addr: SocketAddr,
    /// One credential shared by every worker on JobRunnerService: the simple
    /// (development) mode, not bound to any worker id. Set this, or
    /// KEEL_WORKER_CREDENTIALS_FILE, or both.
    #[arg(long, env = "KEEL_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// File of named worker credentials, one `name:sha256-hex-of-secret` a
    /// line (`keel worker-credential new NAME` prints one). A worker presents
    /// `name:secret` and may record transitions only as worker id `name` or
    /// `name/...`. Re-read every second: removing a line revokes that worker.
    #[arg(long, env = "KEEL_WORKER_CREDENTIALS_FILE")]
    pub worker_credentials_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub tokens: VerifierConfig,
    #[command(flatten)]
    pub runtime: RuntimeConfig,
    /// Lease granted by StartJob and each Heartbeat; a running job whose lease
    /// runs out (its worker died) is reaped back to queued, or failed.
    #[arg(long, env = "KEEL_JOBS_LEASE_MS", default_value_t = DEFAULT_LEASE_MS)]
    pub lease_ms: u64,
    /// First retry delay after a retryable failure; doubles per attempt (with jitter).
    #[arg(long, env = "KEEL_JOBS_RETRY_BASE_MS", default_value_t = DEFAULT_RETRY_BASE_MS)]
    pub retry_base_ms: u64,
    /// Longest retry delay.
    #[arg(long, env = "KEEL_JOBS_RETRY_MAX_MS", default_value_t = DEFAULT_RETRY_MAX_MS)]
    pub retry_max_ms: u64,
    /// How often the outbox relay publishes due, undelivered jobs to the Redis stream.
    #[arg(long, env = "KEEL_JOBS_RELAY_INTERVAL_MS", default_value_t = DEFAULT_RELAY_INTERVAL_MS)]
    pub relay_interval_ms: u64,
    /// Most outbox rows the relay claims per round.
    #[arg(long, env = "KEEL_JOBS_RELAY_BATCH", default_value_t = DEFAULT_RELAY_BATCH)]
    pub relay_batch: i64,
    /// How often expired leases are looked for.
    #[arg(long, env = "KEEL_JOBS_REAPER_INTERVAL_MS", default_value_t = DEFAULT_REAPER_INTERVAL_MS)]
    pub reaper_interval_ms: u64,
    /// Largest accepted payload (and output), in bytes of encoded JSON.
    #[arg(long, env = "KEEL_JOBS_MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,
    /// WatchJob re-reads the job this often even without a Redis announcement
    /// (announcements can be lost), and polls at this pace when Redis is down.
    #[arg(long, env = "KEEL_JOBS_WATCH_POLL_MS", default_value_t = DEFAULT_WATCH_POLL_MS)]
    pub watch_poll_ms: u64,
    /// Most WatchJob streams this process serves at once; one more is
    /// answered RESOURCE_EXHAUSTED until a watcher leaves.
    #[arg(long, env = "KEEL_JOBS_MAX_WATCHERS", default_value_t = DEFAULT_MAX_WATCHERS)]
    pub max_watchers: usize,
    /// A job added to the stream but still not started this long after is
    /// added again (its entry may have been lost, e.g. Redis restarted
    /// empty); the wait doubles with each re-publication. Workers refuse
    /// duplicates through StartJob.
    #[arg(long, env = "KEEL_JOBS_REDELIVER_AFTER_MS", default_value_t = DEFAULT_REDELIVER_AFTER_MS)]
    pub redeliver_after_ms: u64,
    /// Finished jobs (succeeded, failed, cancelled) are deleted with their
    /// history this many days after they finished; 0 keeps them forever. An
    /// idempotency key is remembered only while its job is kept.
    #[arg(long, env = "KEEL_JOBS_RETENTION_DAYS", default_value_t = 0)]
    pub retention_days: u32,
    /// Most jobs one retention statement deletes (each batch is its own transaction).
    #[arg(long, env = "KEEL_JOBS_RETENTION_BATCH", default_value_t = DEFAULT_RETENTION_BATCH)]
    pub retention_batch: i64,
    /// How often the retention job runs (when KEEL_JOBS_RETENTION_DAYS is set).
    #[arg(long, env = "KEEL_JOBS_RETENTION_INTERVAL_MS", default_value_t = DEFAULT_RETENTION_INTERVAL_MS)]
    pub retention_interval_ms: u64,
    /// How long a queued job may wait past its run_at for a worker of its
    /// kind when CreateJob names no schedule_timeout; then it fails (not
    /// retried) with an error naming the kind.
    #[arg(long, env = "KEEL_JOBS_SCHEDULE_TIMEOUT_SECS", default_value_t = DEFAULT_SCHEDULE_TIMEOUT_SECS)]
    pub schedule_timeout_secs: u64,
    /// A ClaimJobs call waiting for work looks at Postgres again this often
    /// (jobs created or re-queued on the same replica wake it at once).
    #[arg(long, env = "KEEL_JOBS_CLAIM_POLL_MS", default_value_t = DEFAULT_CLAIM_POLL_MS)]
    pub claim_poll_ms: u64,
    /// Most schedules (ScheduleService) one user may have; one more is
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "KEEL_SCHEDULES_PER_USER", default_value_t = DEFAULT_SCHEDULES_PER_USER)]
    pub schedules_per_user: i64,
    /// Shortest interval between two ticks of a schedule; a cron expression
    /// firing more often is INVALID_ARGUMENT.
    #[arg(long, env = "KEEL_SCHEDULE_MIN_INTERVAL_SECS", default_value_t = DEFAULT_SCHEDULE_MIN_INTERVAL_SECS)]
    pub schedule_min_interval_secs: u64,
    /// How often each replica's schedule ticker looks for due ticks (a tick
    /// fires at most this late).
    #[arg(long, env = "KEEL_SCHEDULE_TICK_MS", default_value_t = DEFAULT_SCHEDULE_TICK_MS)]
    pub schedule_tick_ms: u64,
    /// Per-kind flow control limits (`max_running`, `rate_per_second`,
    /// `burst`), TOML, or JSON when the name ends in `.json`; re-read every
    /// second (a bad file keeps the last good limits). Unset: no limits.
    #[arg(long, env = "KEEL_FLOW_CONTROL_FILE")]
    pub flow_control_file: Option<std::path::PathBuf>,
    /// Most entries a kind's streams hold not yet delivered to a worker
    /// (fewer while the workers hold fewer messages: the bound follows
    /// their pending count, at least 32); the rest wait in Postgres and are
    /// published taking turns between users (fairness). 0: no bound (every
    /// job is published at once, as before).
    #[arg(long, env = "KEEL_JOBS_STREAM_BACKLOG", default_value_t = DEFAULT_STREAM_BACKLOG)]
    pub stream_backlog: i64,
}

impl Config {
    /// A config built in code (tests, embedding): every other field at its default.
    pub fn new(
        listen_addr: SocketAddr,
        database: DatabaseConfig,
        redis: RedisConfig,
        tokens: VerifierConfig,
        worker_token: impl Into<String>,
    ) -> Self {
        Self {
            listen_addr,
            worker_token: Some(worker_token.into()),
            worker_credentials_file: None,
            database,
            redis,
            tokens,
            runtime: RuntimeConfig::default(),
            lease_ms: DEFAULT_LEASE_MS,
            retry_base_ms: DEFAULT_RETRY_BASE_MS,
            retry_max_ms: DEFAULT_RETRY_MAX_MS,
            relay_interval_ms: DEFAULT_RELAY_INTERVAL_MS,
            relay_batch: DEFAULT_RELAY_BATCH,
            reaper_interval_ms: DEFAULT_REAPER_INTERVAL_MS,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            watch_poll_ms: DEFAULT_WATCH_POLL_MS,
            max_watchers: DEFAULT_MAX_WATCHERS,
            redeliver_after_ms: DEFAULT_REDELIVER_AFTER_MS,
            retention_days: 0,
            retention_batch: DEFAULT_RETENTION_BATCH,
            retention_interval_ms: DEFAULT_RETENTION_INTERVAL_MS,
            schedule_timeout_secs: DEFAULT_SCHEDULE_TIMEOUT_SECS,
            claim_poll_ms: DEFAULT_CLAIM_POLL_MS,
            schedules_per_user: DEFAULT_SCHEDULES_PER_USER,
            schedule_min_interval_secs: DEFAULT_SCHEDULE_MIN_INTERVAL_SECS,
            schedule_tick_ms: DEFAULT_SCHEDULE_TICK_MS,
            flow_control_file: None,
            stream_backlog: DEFAULT_STREAM_BACKLOG,
        }
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.max(1))
    }

    pub fn relay_interval(&self) -> Duration {
        Duration::from_millis(self.relay_interval_ms.max(1))
    }

    pub fn reaper_interval(&self) -> Duration {
        Duration::from_millis(self.reaper_interval_ms.max(1))
    }

    pub fn redeliver_after(&self) -> Duration {
        Duration::from_millis(self.redeliver_after_ms.max(10))
    }

    pub fn retention_interval(&self) -> Duration {
        Duration::from_millis(self.retention_interval_ms.max(10))
    }

    pub fn schedule_timeout(&self) -> Duration {
        Duration::from_secs(self.schedule_timeout_secs.max(1))
    }

    pub fn claim_poll(&self) -> Duration {
        Duration::from_millis(self.claim_poll_ms.max(10))
    }

    pub fn schedule_tick(&self) -> Duration {
        Duration::from_millis(self.schedule_tick_ms.max(10))
    }

    pub fn watch_poll(&self) -> Duration {
        Duration::from_millis(self.watch_poll_ms.max(10))
    }
}

impl keel_shared::config::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }
}
