//! Keel's common crate: what every service binary needs (config, start-up,
//! Postgres and Redis connections, TLS, tokens, telemetry, metrics, errors),
//! plus the one thing two services share: the job queue's Redis layout and
//! metrics ([`queue`], [`metrics::job_transition`] and its siblings), written
//! by the jobs service and read by the worker.

#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod auth;
pub mod backoff;
#[cfg(feature = "server")]
pub mod batch;
pub mod config;
#[cfg(feature = "server")]
pub mod db;
pub mod dead_letters;
pub mod error;
pub mod grpc_client;
#[cfg(feature = "server")]
pub mod identity;
pub mod json;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod migrate;
#[cfg(feature = "server")]
pub mod paging;
pub mod queue;
pub mod redis;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod server_tls;
#[cfg(feature = "server")]
pub mod shutdown;
#[cfg(feature = "server")]
pub mod telemetry;
pub mod time;
pub mod tls;
#[cfg(feature = "server")]
pub mod worker_credentials;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::{ApiError, StartupError};
