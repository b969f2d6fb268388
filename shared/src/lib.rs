//! Keel's common crate: what every service binary needs (config, start-up,
//! Postgres and Redis connections, TLS, tokens, telemetry, metrics, errors),
//! plus the one thing two services share: the job queue's Redis layout and
//! metrics ([`queue`], [`metrics::job_transition`] and its siblings), written
//! by the jobs service and read by the worker.

pub mod auth;
pub mod backoff;
pub mod batch;
pub mod config;
pub mod db;
pub mod error;
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

#[cfg(feature = "testing")]
pub mod testing;

pub use error::{ApiError, StartupError};
