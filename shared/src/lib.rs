//! Keel's common crate: what every service binary needs and nothing service-specific.

pub mod auth;
pub mod batch;
pub mod config;
pub mod db;
pub mod error;
pub mod identity;
pub mod json;
pub mod metrics;
pub mod migrate;
pub mod paging;
pub mod queue;
pub mod redis;
pub mod server;
pub mod server_tls;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod worker_credentials;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::{ApiError, StartupError};
