//! The memory service's one typed config, from flags or env.

use std::net::SocketAddr;

use keel_shared::auth::VerifierConfig;
use keel_shared::config::{DatabaseConfig, RuntimeConfig};

pub const DEFAULT_MAX_KEY_BYTES: usize = 256;
pub const DEFAULT_MAX_CONTENT_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_TAGS: usize = 32;
pub const DEFAULT_MAX_TAG_CHARS: usize = 64;
pub const DEFAULT_MAX_METADATA_BYTES: usize = 16 * 1024;
pub const DEFAULT_MAX_QUERY_BYTES: usize = 1024;

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
    #[command(flatten)]
    pub limits: Limits,
}

impl Config {
    /// A config with the default limits (for tests and tools that build one in code).
    pub fn new(listen_addr: SocketAddr, database: DatabaseConfig, tokens: VerifierConfig) -> Self {
        Self {
            listen_addr,
            database,
            tokens,
            runtime: RuntimeConfig::default(),
            limits: Limits::default(),
        }
    }
}

/// Size limits on what a memory and a search may hold.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// Longest key, in bytes (keys are 1.. bytes of [A-Za-z0-9._:/-]).
    #[arg(long, env = "KEEL_MEMORY_MAX_KEY_BYTES", default_value_t = DEFAULT_MAX_KEY_BYTES)]
    pub max_key_bytes: usize,
    /// Largest content, in bytes of UTF-8.
    #[arg(long, env = "KEEL_MEMORY_MAX_CONTENT_BYTES", default_value_t = DEFAULT_MAX_CONTENT_BYTES)]
    pub max_content_bytes: usize,
    /// Most distinct tags on one memory.
    #[arg(long, env = "KEEL_MEMORY_MAX_TAGS", default_value_t = DEFAULT_MAX_TAGS)]
    pub max_tags: usize,
    /// Longest tag, in characters (Unicode scalar values).
    #[arg(long, env = "KEEL_MEMORY_MAX_TAG_CHARS", default_value_t = DEFAULT_MAX_TAG_CHARS)]
    pub max_tag_chars: usize,
    /// Largest metadata, in bytes of its compact JSON encoding.
    #[arg(long, env = "KEEL_MEMORY_MAX_METADATA_BYTES", default_value_t = DEFAULT_MAX_METADATA_BYTES)]
    pub max_metadata_bytes: usize,
    /// Longest search query, in bytes.
    #[arg(long, env = "KEEL_MEMORY_MAX_QUERY_BYTES", default_value_t = DEFAULT_MAX_QUERY_BYTES)]
    pub max_query_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_content_bytes: DEFAULT_MAX_CONTENT_BYTES,
            max_tags: DEFAULT_MAX_TAGS,
            max_tag_chars: DEFAULT_MAX_TAG_CHARS,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            max_query_bytes: DEFAULT_MAX_QUERY_BYTES,
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
