//! Config pieces shared by the binaries, parsed by clap from flags or env vars.
//! Each binary flattens the pieces it needs into its own one typed `Config`
//! and reads it with [`parse_config`].

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::StartupError;

/// What every service binary's config has: where it listens (its gRPC port,
/// or the worker's health port) and its runtime settings.
pub trait ServiceConfig: clap::Parser {
    fn listen_addr(&self) -> SocketAddr;
    fn runtime(&self) -> &RuntimeConfig;
}

/// Parses a binary's config from its flags and environment, or exits with
/// clap's message, as `T::parse()` does, except that an environment variable
/// set to an empty (or all-whitespace) value counts as unset: compose files
/// and manifests pass `${VAR:-}` for options they leave alone, and
/// `KEEL_METRICS_ADDR=` must mean "no metrics listener", not "invalid
/// address ''". Every binary reads its config through here.
pub fn parse_config<T: clap::Parser>() -> T {
    try_parse_config_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse_config`] over the given command line (the first item is the
/// binary's name), returning clap's error instead of exiting.
pub fn try_parse_config_from<T, I, S>(args: I) -> Result<T, clap::Error>
where
    T: clap::Parser,
    I: IntoIterator<Item = S>,
    S: Into<OsString> + Clone,
{
    let mut command = without_blank_env(T::command());
    let mut matches = command.try_get_matches_from_mut(args)?;
    T::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut command))
}

/// Unbinds every argument (in subcommands too) whose environment variable
/// is set but blank, so clap falls back to the argument's default (or
/// reports it missing when required) as if the variable were absent.
fn without_blank_env(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| {
            let blank = arg
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|value| value.to_str().is_some_and(|v| v.trim().is_empty()));
            if blank { arg.env(None) } else { arg }
        })
        .mut_subcommands(without_blank_env)
}

/// Postgres settings.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseConfig {
    /// Postgres URL, e.g. postgres://postgres@127.0.0.1:5432/keel (required).
    /// `?sslmode=disable|prefer|require|verify-ca|verify-full` (default
    /// disable) and `&sslrootcert=/path/ca.pem` work as in libpq.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PEM file of the CA(s) that sign the Postgres server's certificate,
    /// used when the URL names no `sslrootcert` (without either,
    /// verify-ca/verify-full trust the system's roots).
    #[arg(long, env = "KEEL_DB_CA_FILE")]
    pub db_ca_file: Option<PathBuf>,
    /// Most Postgres connections this process holds.
    #[arg(long, env = "KEEL_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// How long start-up keeps retrying an unreachable Postgres before giving up.
    #[arg(long, env = "KEEL_DB_CONNECT_TIMEOUT_SECS", default_value_t = 10)]
    pub db_connect_timeout_secs: u64,
}

impl DatabaseConfig {
    /// The URL, or the start-up error that names the missing variable.
    pub fn url(&self) -> Result<&str, StartupError> {
        match self.database_url.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => Ok(url),
            _ => Err(StartupError::MissingVar("DATABASE_URL")),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.db_connect_timeout_secs)
    }

    /// For tests and tools that build a config in code: a small pool, since
    /// many test servers share one Postgres (and its connection limit).
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            database_url: Some(url.into()),
            db_ca_file: None,
            db_pool_size: 6,
            db_connect_timeout_secs: 10,
        }
    }
}

/// Redis settings.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisConfig {
    /// Redis URL: `redis://[user:password@]host:port` (`rediss://` for TLS)
    /// for one server, or `redis+cluster://[user:password@]host1:port1,host2:port2`
    /// (`rediss+cluster://` for TLS) for a Redis Cluster: some of its nodes,
    /// the rest are discovered.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// Prefix of every Redis key this deployment uses (lets deployments and
    /// tests share one Redis).
    #[arg(long, env = "KEEL_REDIS_PREFIX", default_value = "keel")]
    pub redis_prefix: String,
    /// Most Redis connections this process holds.
    #[arg(long, env = "KEEL_REDIS_POOL_SIZE", default_value_t = 16)]
    pub redis_pool_size: usize,
    /// PEM file of the CA(s) that sign the Redis server's certificate, for
    /// `rediss://` URLs (without it, the system's roots are trusted).
    #[arg(long, env = "KEEL_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
}

impl RedisConfig {
    /// For tests and tools that build a config in code.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            redis_url: url.into(),
            redis_prefix: prefix.into(),
            redis_pool_size: 16,
            redis_ca_file: None,
        }
    }

    /// `"{prefix}:{name}"`: every Redis key goes through here.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.redis_prefix)
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Logging and shutdown settings every binary has.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeConfig {
    /// Log format: human or json. Levels come from RUST_LOG (default info).
    #[arg(long, env = "KEEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// On SIGINT/SIGTERM, how long in-flight calls get to finish.
    #[arg(long, env = "KEEL_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    #[command(flatten)]
    pub metrics: MetricsConfig,
    /// OTLP/gRPC collector for OpenTelemetry traces, e.g.
    /// http://otel-collector:4317 (traces are off when unset). The standard
    /// OTEL_* variables (OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER,
    /// OTEL_BSP_SCHEDULE_DELAY, ...) apply.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub tls: GrpcTlsConfig,
}

/// TLS for the gRPC listener (see `crate::server::TlsServer`): plaintext
/// when unset. The certificate and key are re-read on SIGHUP and when the
/// files change, so rotation needs no restart.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GrpcTlsConfig {
    /// PEM certificate chain the gRPC server presents (with KEEL_TLS_KEY_FILE).
    #[arg(long, env = "KEEL_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of KEEL_TLS_CERT_FILE.
    #[arg(long, env = "KEEL_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: when set, clients must present a certificate
    /// signed by one of them (mTLS).
    #[arg(long, env = "KEEL_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
}

/// How a client reaches Keel's gRPC services over TLS (`https://` URLs):
/// the CA to trust and, for servers that require one (mTLS), a client
/// certificate.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GrpcClientTlsConfig {
    /// PEM CA certificates trusted for https:// service URLs (required for them).
    #[arg(long, env = "KEEL_TLS_CA_FILE", global = true)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate presented to servers requiring one (mTLS).
    #[arg(
        long,
        env = "KEEL_TLS_CLIENT_CERT_FILE",
        global = true,
        requires = "tls_client_key_file"
    )]
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM private key of KEEL_TLS_CLIENT_CERT_FILE.
    #[arg(
        long,
        env = "KEEL_TLS_CLIENT_KEY_FILE",
        global = true,
        requires = "tls_client_cert_file"
    )]
    pub tls_client_key_file: Option<PathBuf>,
}

impl RuntimeConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The OTLP endpoint, when traces are on.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            shutdown_grace_secs: 10,
            metrics: MetricsConfig::default(),
            otlp_endpoint: None,
            tls: GrpcTlsConfig::default(),
        }
    }
}

/// The Prometheus `/metrics` listener (see `crate::metrics`).
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsConfig {
    /// Address of the HTTP listener serving Prometheus metrics on any path,
    /// e.g. 0.0.0.0:9102 (off when unset). One per process: when several
    /// services share a process (tests), the first address wins.
    #[arg(long, env = "KEEL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// How often gauges read from Postgres and Redis (pools, outbox, queue)
    /// are sampled, in milliseconds.
    #[arg(long, env = "KEEL_METRICS_SAMPLE_MS", default_value_t = DEFAULT_METRICS_SAMPLE_MS,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub metrics_sample_ms: u64,
}

pub const DEFAULT_METRICS_SAMPLE_MS: u64 = 5_000;

impl MetricsConfig {
    pub fn sample_every(&self) -> Duration {
        Duration::from_millis(self.metrics_sample_ms.max(100))
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            metrics_addr: None,
            metrics_sample_ms: DEFAULT_METRICS_SAMPLE_MS,
        }
    }
}
