//! The auth service's one typed config, from flags or env.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keel_shared::auth::{DEFAULT_AUDIENCE, DEFAULT_ISSUER};
use keel_shared::config::{DatabaseConfig, RuntimeConfig};

pub const DEFAULT_ACCESS_TOKEN_TTL_SECS: u64 = 900;
pub const DEFAULT_REFRESH_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
pub const DEFAULT_LOGIN_MAX_FAILURES: u32 = 5;
pub const DEFAULT_LOGIN_FAILURE_WINDOW_SECS: u64 = 900;
/// OWASP Password Storage Cheat Sheet: argon2id, m=19 MiB, t=2, p=1.
pub const DEFAULT_ARGON2_MEMORY_KIB: u32 = 19_456;
pub const DEFAULT_ARGON2_ITERATIONS: u32 = 2;
pub const DEFAULT_ARGON2_PARALLELISM: u32 = 1;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "keel-auth", about = "Keel auth service", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "KEEL_AUTH_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub runtime: RuntimeConfig,
    #[command(flatten)]
    pub tokens: TokenConfig,
    #[command(flatten)]
    pub login: LoginConfig,
    /// Accounts with these emails (comma-separated) hold the admin role:
    /// granted at start-up to those that exist, and on their registration or
    /// next login. Other admins are made with UserAdminService.GrantAdmin.
    #[arg(long, env = "KEEL_ADMIN_EMAILS", value_delimiter = ',')]
    pub admin_emails: Vec<String>,
}

/// Signing key and token lifetimes.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenConfig {
    /// Ed25519 PKCS#8 PEM that signs access tokens (required). Its public half
    /// is what the other services are given (`<file>.pub` when generated).
    #[arg(long, env = "KEEL_JWT_PRIVATE_KEY_FILE")]
    pub jwt_private_key_file: Option<PathBuf>,
    /// Create the key (mode 0600) and `<file>.pub` when the file is missing,
    /// and (re)write `<file>.pub` when it is missing: for local runs.
    #[arg(
        long,
        env = "KEEL_JWT_GENERATE_KEY",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub jwt_generate_key: bool,
    /// `iss` claim of issued access tokens.
    #[arg(long, env = "KEEL_JWT_ISSUER", default_value = DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// `aud` claim of issued access tokens.
    #[arg(long, env = "KEEL_JWT_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub jwt_audience: String,
    /// Lifetime of an access token, in seconds.
    #[arg(long, env = "KEEL_ACCESS_TOKEN_TTL_SECS", default_value_t = DEFAULT_ACCESS_TOKEN_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token, in seconds (each rotation issues a fresh one).
    #[arg(long, env = "KEEL_REFRESH_TOKEN_TTL_SECS", default_value_t = DEFAULT_REFRESH_TOKEN_TTL_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub refresh_token_ttl_secs: u64,
    /// How long (seconds) whether a session has ended, or whom an API key
    /// acts for, is remembered before Postgres is asked again (as at jobs
    /// and memory).
    #[arg(long, env = "KEEL_CREDENTIAL_CACHE_SECS", default_value_t = keel_shared::identity::DEFAULT_CACHE_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub credential_cache_secs: u64,
}

/// Password hashing and login rate limiting.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginConfig {
    /// Failed logins per email allowed within the window; the next attempt
    /// gets RESOURCE_EXHAUSTED until the window (started by the first failure) ends.
    #[arg(long, env = "KEEL_LOGIN_MAX_FAILURES", default_value_t = DEFAULT_LOGIN_MAX_FAILURES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub login_max_failures: u32,
    /// Length of the login rate-limit window, in seconds.
    #[arg(long, env = "KEEL_LOGIN_FAILURE_WINDOW_SECS", default_value_t = DEFAULT_LOGIN_FAILURE_WINDOW_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub login_failure_window_secs: u64,
    /// argon2id memory cost in KiB for new password hashes.
    #[arg(long, env = "KEEL_ARGON2_MEMORY_KIB", default_value_t = DEFAULT_ARGON2_MEMORY_KIB)]
    pub argon2_memory_kib: u32,
    /// argon2id iterations (time cost) for new password hashes.
    #[arg(long, env = "KEEL_ARGON2_ITERATIONS", default_value_t = DEFAULT_ARGON2_ITERATIONS)]
    pub argon2_iterations: u32,
    /// argon2id lanes (parallelism) for new password hashes.
    #[arg(long, env = "KEEL_ARGON2_PARALLELISM", default_value_t = DEFAULT_ARGON2_PARALLELISM)]
    pub argon2_parallelism: u32,
    /// Most password hashes computed at once (each holds the memory cost);
    /// further Register/Login calls wait. 0 means the number of CPUs.
    #[arg(long, env = "KEEL_ARGON2_MAX_CONCURRENT", default_value_t = 0)]
    pub argon2_max_concurrent: usize,
}

impl Config {
    /// A config with every default, for tests and tools that build one in code.
    pub fn new(
        listen_addr: SocketAddr,
        database: DatabaseConfig,
        jwt_private_key_file: PathBuf,
    ) -> Self {
        Self {
            listen_addr,
            database,
            runtime: RuntimeConfig::default(),
            tokens: TokenConfig {
                jwt_private_key_file: Some(jwt_private_key_file),
                jwt_generate_key: false,
                jwt_issuer: DEFAULT_ISSUER.into(),
                jwt_audience: DEFAULT_AUDIENCE.into(),
                access_token_ttl_secs: DEFAULT_ACCESS_TOKEN_TTL_SECS,
                refresh_token_ttl_secs: DEFAULT_REFRESH_TOKEN_TTL_SECS,
                credential_cache_secs: keel_shared::identity::DEFAULT_CACHE_SECS,
            },
            login: LoginConfig {
                login_max_failures: DEFAULT_LOGIN_MAX_FAILURES,
                login_failure_window_secs: DEFAULT_LOGIN_FAILURE_WINDOW_SECS,
                argon2_memory_kib: DEFAULT_ARGON2_MEMORY_KIB,
                argon2_iterations: DEFAULT_ARGON2_ITERATIONS,
                argon2_parallelism: DEFAULT_ARGON2_PARALLELISM,
                argon2_max_concurrent: 0,
            },
            admin_emails: Vec::new(),
        }
    }
}

impl TokenConfig {
    pub fn access_token_ttl(&self) -> Duration {
        Duration::from_secs(self.access_token_ttl_secs)
    }

    pub fn refresh_token_ttl(&self) -> Duration {
        Duration::from_secs(self.refresh_token_ttl_secs)
    }

    pub fn credential_cache(&self) -> Duration {
        Duration::from_secs(self.credential_cache_secs.max(1))
    }
}

impl LoginConfig {
    pub fn failure_window(&self) -> Duration {
        Duration::from_secs(self.login_failure_window_secs)
    }

    pub fn max_concurrent_hashes(&self) -> usize {
        match self.argon2_max_concurrent {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
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
