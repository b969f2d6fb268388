//! The worker's one typed config, from flags or env.

use std::net::SocketAddr;
use std::time::Duration;

use keel_shared::StartupError;
use keel_shared::config::{GrpcClientTlsConfig, RedisConfig, RuntimeConfig};

const DEFAULT_CLAIM_IDLE_MS: u64 = 30_000;
const DEFAULT_MAX_DELIVERIES: u32 = 5;
const DEFAULT_HEARTBEAT_MS: u64 = 10_000;
const DEFAULT_DEAD_LETTER_MAXLEN: usize = 10_000;
const DEFAULT_JOB_GRACE_MS: u64 = 30_000;
const DEFAULT_TRIM_INTERVAL_MS: u64 = 30_000;
const DEFAULT_CONSUMER_TTL_MS: u64 = 3_600_000;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "keel-worker", about = "Keel worker", version)]
pub struct Config {
    /// Address of the worker's own health (and reflection) server.
    #[arg(long, env = "KEEL_WORKER_HEALTH_ADDR", default_value = "0.0.0.0:50054")]
    pub health_addr: SocketAddr,
    /// URL of the jobs service, or the URLs of several of its replicas
    /// separated by commas: calls are spread over those SERVING.
    #[arg(long, env = "KEEL_JOBS_URL", default_value = "http://127.0.0.1:50052")]
    pub jobs_url: String,
    /// The worker credential (required): the jobs service's shared
    /// KEEL_WORKER_TOKEN, or `name:secret` for a line of its
    /// KEEL_WORKER_CREDENTIALS_FILE.
    #[arg(long, env = "KEEL_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// Most jobs this process runs at once (default: 4 per available core).
    #[arg(long, env = "KEEL_WORKER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// This worker's consumer name in the Redis consumer group, also its
    /// worker id for the jobs service (default: `<hostname>-<pid>-<random>`,
    /// after `<name>/` when KEEL_WORKER_TOKEN is a named credential
    /// `name:secret`; a name set here must then be `name` or `name/...`).
    #[arg(long, env = "KEEL_WORKER_CONSUMER_NAME")]
    pub consumer_name: Option<String>,
    /// A message pending this long (ms) without progress is taken over from its
    /// consumer (which is presumed dead) with XAUTOCLAIM.
    #[arg(long, env = "KEEL_WORKER_CLAIM_IDLE_MS", default_value_t = DEFAULT_CLAIM_IDLE_MS)]
    pub claim_idle_ms: u64,
    /// A message delivered more than this many times is moved to the
    /// dead-letter stream and its job failed.
    #[arg(long, env = "KEEL_WORKER_MAX_DELIVERIES", default_value_t = DEFAULT_MAX_DELIVERIES)]
    pub max_deliveries: u32,
    /// How often (ms) a running job's lease is extended and its cancellation checked.
    #[arg(long, env = "KEEL_WORKER_HEARTBEAT_MS", default_value_t = DEFAULT_HEARTBEAT_MS)]
    pub heartbeat_ms: u64,
    /// The dead-letter stream keeps about this many entries: each XADD to it
    /// trims the oldest (MAXLEN ~).
    #[arg(long, env = "KEEL_WORKER_DEAD_LETTER_MAXLEN", default_value_t = DEFAULT_DEAD_LETTER_MAXLEN)]
    pub dead_letter_maxlen: usize,
    /// How often (ms) the job streams are trimmed of entries every consumer
    /// group has read and acknowledged.
    #[arg(long, env = "KEEL_WORKER_TRIM_INTERVAL_MS", default_value_t = DEFAULT_TRIM_INTERVAL_MS)]
    pub trim_interval_ms: u64,
    /// A consumer (a stopped worker) with no pending message, unseen for this
    /// long (ms), is removed from the consumer group.
    #[arg(long, env = "KEEL_WORKER_CONSUMER_TTL_MS", default_value_t = DEFAULT_CONSUMER_TTL_MS)]
    pub consumer_ttl_ms: u64,
    /// On shutdown, how long (ms) running jobs get to finish before they are
    /// cancelled and handed back to the jobs service for a retry.
    #[arg(long, env = "KEEL_WORKER_JOB_GRACE_MS", default_value_t = DEFAULT_JOB_GRACE_MS)]
    pub job_grace_ms: u64,
    #[command(flatten)]
    pub redis: RedisConfig,
    /// TLS to the jobs service when KEEL_JOBS_URL is https://.
    #[command(flatten)]
    pub jobs_tls: GrpcClientTlsConfig,
    #[command(flatten)]
    pub runtime: RuntimeConfig,
}

impl Config {
    /// A config with every default, for tests and custom worker binaries.
    pub fn new(
        health_addr: SocketAddr,
        jobs_url: impl Into<String>,
        worker_token: impl Into<String>,
        redis: RedisConfig,
    ) -> Self {
        Self {
            health_addr,
            jobs_url: jobs_url.into(),
            worker_token: Some(worker_token.into()),
            concurrency: None,
            consumer_name: None,
            claim_idle_ms: DEFAULT_CLAIM_IDLE_MS,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            dead_letter_maxlen: DEFAULT_DEAD_LETTER_MAXLEN,
            trim_interval_ms: DEFAULT_TRIM_INTERVAL_MS,
            consumer_ttl_ms: DEFAULT_CONSUMER_TTL_MS,
            job_grace_ms: DEFAULT_JOB_GRACE_MS,
            redis,
            jobs_tls: GrpcClientTlsConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }

    /// The worker token, or the start-up error naming the missing variable.
    pub fn worker_token(&self) -> Result<&str, StartupError> {
        match self.worker_token.as_deref().map(str::trim) {
            Some(token) if !token.is_empty() => Ok(token),
            _ => Err(StartupError::MissingVar("KEEL_WORKER_TOKEN")),
        }
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency.filter(|&n| n > 0).unwrap_or_else(|| {
            4 * std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    /// The configured name, else `<hostname>-<pid>-<random>`, prefixed with
    /// `<credential name>/` when the worker token is a named credential
    /// (`name:secret`): the jobs service only lets it record as `name/...`.
    pub fn consumer_name(&self) -> String {
        match self.consumer_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match self.credential_name() {
                Some(credential) => format!("{credential}/{}", default_consumer_name()),
                None => default_consumer_name(),
            },
        }
    }

    /// The name of a named worker credential (`name:secret`), if that is what
    /// the worker token is.
    fn credential_name(&self) -> Option<&str> {
        let (name, _) = self.worker_token.as_deref()?.trim().split_once(':')?;
        keel_shared::worker_credentials::validate_name(name)
            .ok()
            .map(|()| name)
    }

    pub fn claim_idle(&self) -> Duration {
        Duration::from_millis(self.claim_idle_ms.max(1))
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(1))
    }

    pub fn trim_interval(&self) -> Duration {
        Duration::from_millis(self.trim_interval_ms.max(1))
    }

    pub fn consumer_ttl(&self) -> Duration {
        Duration::from_millis(self.consumer_ttl_ms)
    }

    pub fn job_grace(&self) -> Duration {
        Duration::from_millis(self.job_grace_ms)
    }

    /// Checks what can be checked without a network: every bad value at once.
    pub fn validate(&self) -> Result<(), StartupError> {
        let mut problems = Vec::new();
        if let Err(e) = self.worker_token() {
            problems.push(e);
        }
        let at_least_one = |var| StartupError::InvalidVar {
            var,
            reason: "must be at least 1".into(),
        };
        if self.max_deliveries == 0 {
            problems.push(at_least_one("KEEL_WORKER_MAX_DELIVERIES"));
        }
        if self.dead_letter_maxlen == 0 {
            problems.push(at_least_one("KEEL_WORKER_DEAD_LETTER_MAXLEN"));
        }
        StartupError::check_all(problems)
    }
}

/// `<hostname>-<pid>-<8 hex digits>`: unique per process, readable in XINFO.
fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}

impl keel_shared::config::ServiceConfig for Config {
    fn listen_addr(&self) -> SocketAddr {
        self.health_addr
    }

    fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::new(
            "127.0.0.1:0".parse().unwrap(),
            "http://127.0.0.1:50052",
            "t",
            RedisConfig::new("redis://127.0.0.1:6379", "keel"),
        )
    }

    #[test]
    fn missing_or_blank_token_names_the_variable() {
        let mut c = config();
        c.worker_token = Some("  ".into());
        assert!(matches!(
            c.validate(),
            Err(StartupError::MissingVar("KEEL_WORKER_TOKEN"))
        ));
        c.worker_token = None;
        assert!(matches!(
            c.validate(),
            Err(StartupError::MissingVar("KEEL_WORKER_TOKEN"))
        ));
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let mut c = config();
        c.worker_token = None;
        c.max_deliveries = 0;
        c.dead_letter_maxlen = 0;
        let message = c.validate().unwrap_err().to_string();
        assert_eq!(
            message,
            "KEEL_WORKER_TOKEN is not set; \
             KEEL_WORKER_MAX_DELIVERIES is invalid: must be at least 1; \
             KEEL_WORKER_DEAD_LETTER_MAXLEN is invalid: must be at least 1"
        );
    }

    #[test]
    fn defaults_are_sensible() {
        let c = config();
        assert!(c.validate().is_ok());
        assert!(c.concurrency() >= 4);
        assert_eq!(c.claim_idle(), Duration::from_secs(30));
        let a = c.consumer_name();
        let b = c.consumer_name();
        assert_ne!(a, b, "each default consumer name is unique");
        assert!(a.contains(&format!("-{}-", std::process::id())));
    }
}
