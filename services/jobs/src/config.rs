//! The jobs service's one typed config, from flags or env.

use std::net::SocketAddr;

use keel_shared::auth::VerifierConfig;
use keel_shared::config::{DatabaseConfig, RedisConfig, RuntimeConfig};

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "keel-jobs", about = "Keel jobs service", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "KEEL_JOBS_ADDR", default_value = "0.0.0.0:50052")]
    pub listen_addr: SocketAddr,
    /// The credential workers present on JobRunnerService (required).
    #[arg(long, env = "KEEL_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub tokens: VerifierConfig,
    #[command(flatten)]
    pub runtime: RuntimeConfig,
}
