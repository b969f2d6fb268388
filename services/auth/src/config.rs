//! The auth service's one typed config, from flags or env.

use std::net::SocketAddr;

use keel_shared::config::{DatabaseConfig, RuntimeConfig};

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
}
