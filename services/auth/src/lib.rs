//! Keel auth service: users, sessions, access and refresh tokens.

pub mod config;
pub mod grpc;

use std::time::Duration;

use keel_proto::auth::v1::auth_service_server::AuthServiceServer;
use keel_shared::{StartupError, server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Connects, migrates, and serves on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    let pool = keel_shared::db::connect(&config.database).await?;
    keel_shared::migrate::run(&pool).await?;

    const SERVICES: &[&str] = &["keel.auth.v1.AuthService"];
    let (health, health_service) = server::health(SERVICES).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection(SERVICES);
    let readiness_pool = pool.clone();
    health.watch(Duration::from_secs(2), shutdown.clone(), move || {
        let pool = readiness_pool.clone();
        async move { server::postgres_ready(&pool).await }
    });

    let service = grpc::AuthApi::new(pool);
    let router = server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AuthServiceServer::new(service).max_decoding_message_size(server::MAX_MESSAGE_BYTES),
        );
    tracing::info!(addr = ?listener.local_addr().ok(), "keel-auth serving");
    server::serve(router, listener, shutdown, config.runtime.shutdown_grace())
        .await
        .map_err(|e| StartupError::Other(e.to_string()))
}
