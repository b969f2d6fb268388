//! The memory service's one typed config, from flags or env.

use std::net::SocketAddr;
use std::time::Duration;

use keel_shared::auth::VerifierConfig;
use keel_shared::config::{DatabaseConfig, RuntimeConfig};

pub const DEFAULT_MAX_KEY_BYTES: usize = 256;
pub const DEFAULT_MAX_CONTENT_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_TAGS: usize = 32;
pub const DEFAULT_MAX_TAG_CHARS: usize = 64;
pub const DEFAULT_MAX_METADATA_BYTES: usize = 16 * 1024;
pub const DEFAULT_MAX_QUERY_BYTES: usize = 1024;
pub const DEFAULT_MAX_SEARCH_TAGS: usize = 16;
pub const DEFAULT_VERSIONS_KEPT: i64 = 20;
pub const DEFAULT_SEARCH_CANDIDATES: i64 = 500;
pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 30_000;
pub const DEFAULT_SWEEP_BATCH: i64 = 1000;

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
    #[command(flatten)]
    pub sweep: SweepConfig,
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
            sweep: SweepConfig::default(),
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
    /// Most tags a search may filter on.
    #[arg(long, env = "KEEL_MEMORY_MAX_SEARCH_TAGS", default_value_t = DEFAULT_MAX_SEARCH_TAGS)]
    pub max_search_tags: usize,
    /// Earlier versions kept per memory (0..=1000); older ones are dropped.
    #[arg(long, env = "KEEL_MEMORY_VERSIONS_KEPT", default_value_t = DEFAULT_VERSIONS_KEPT,
          value_parser = clap::value_parser!(i64).range(0..=1000))]
    pub versions_kept: i64,
    /// Most matches a search ranks: when more match, only the most recently
    /// updated ones up to this bound are ranked (1..=100000).
    #[arg(long, env = "KEEL_MEMORY_SEARCH_CANDIDATES", default_value_t = DEFAULT_SEARCH_CANDIDATES,
          value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub search_candidates: i64,
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
            max_search_tags: DEFAULT_MAX_SEARCH_TAGS,
            versions_kept: DEFAULT_VERSIONS_KEPT,
            search_candidates: DEFAULT_SEARCH_CANDIDATES,
        }
    }
}

/// The background sweep that deletes expired memories from storage (readers
/// stop seeing them at expiry, whatever the sweep's pace).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SweepConfig {
    /// Pause between sweeps, in milliseconds, once nothing expired is left.
    #[arg(long, env = "KEEL_MEMORY_SWEEP_INTERVAL_MS", default_value_t = DEFAULT_SWEEP_INTERVAL_MS)]
    pub sweep_interval_ms: u64,
    /// Most expired memories deleted per statement (1..=100000).
    #[arg(long, env = "KEEL_MEMORY_SWEEP_BATCH", default_value_t = DEFAULT_SWEEP_BATCH,
          value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub sweep_batch: i64,
}

impl SweepConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms.max(10))
    }
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            sweep_interval_ms: DEFAULT_SWEEP_INTERVAL_MS,
            sweep_batch: DEFAULT_SWEEP_BATCH,
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
