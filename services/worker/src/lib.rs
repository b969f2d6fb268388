//! Keel worker: reads jobs from the Redis stream, runs their handlers, and
//! records each transition with the jobs service.

pub mod config;

use std::time::Duration;

use keel_shared::{StartupError, server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Serves health on `listener` and runs jobs until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    let redis = keel_shared::redis::pool(&config.redis)?;
    let (health, health_service) = server::health(&[]).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection(&[]);
    health.watch(Duration::from_secs(2), shutdown.clone(), move || {
        let redis = redis.clone();
        async move { keel_shared::redis::ping(&redis).await }
    });
    let router = server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    tracing::info!(addr = ?listener.local_addr().ok(), "keel-worker health serving");
    server::serve(router, listener, shutdown, config.runtime.shutdown_grace())
        .await
        .map_err(|e| StartupError::Other(e.to_string()))
}
