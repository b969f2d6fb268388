//! The memory service's one typed config, from flags or env.

use std::net::SocketAddr;

use keel_shared::auth::VerifierConfig;
use keel_shared::config::{DatabaseConfig, RuntimeConfig};

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "keel-memory", about = "Keel memory service", version)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "KEEL_MEMORY_ADDR", default_value = "0.0.0.0:50053")]
    pub listen_addr: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub tokens: VerifierConfig,
    #[command(flatten)]
    pub runtime: RuntimeConfig,
}
