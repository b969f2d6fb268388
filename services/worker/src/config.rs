//! The worker's one typed config, from flags or env.

use std::net::SocketAddr;

use keel_shared::config::{RedisConfig, RuntimeConfig};

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "keel-worker", about = "Keel worker", version)]
pub struct Config {
    /// Address of the worker's own health (and reflection) server.
    #[arg(long, env = "KEEL_WORKER_HEALTH_ADDR", default_value = "0.0.0.0:50054")]
    pub health_addr: SocketAddr,
    /// URL of the jobs service.
    #[arg(long, env = "KEEL_JOBS_URL", default_value = "http://127.0.0.1:50052")]
    pub jobs_url: String,
    /// The worker credential (the jobs service's KEEL_WORKER_TOKEN).
    #[arg(long, env = "KEEL_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub runtime: RuntimeConfig,
}
