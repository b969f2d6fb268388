//! Keel jobs service: durable jobs, delivered to workers through a Redis stream.

pub mod config;
pub mod grpc;

use std::sync::Arc;
use std::time::Duration;

use keel_proto::jobs::v1::job_runner_service_server::JobRunnerServiceServer;
use keel_proto::jobs::v1::jobs_service_server::JobsServiceServer;
use keel_shared::auth::Authenticator;
use keel_shared::{StartupError, server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

pub use config::Config;

/// Connects, migrates, and serves on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    let verifier = Arc::new(config.tokens.load()?);
    let worker_token = config
        .worker_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or(StartupError::MissingVar("KEEL_WORKER_TOKEN"))?;
    let pool = keel_shared::db::connect(&config.database).await?;
    keel_shared::migrate::run(&pool).await?;
    let redis = keel_shared::redis::pool(&config.redis)?;

    const SERVICES: &[&str] = &["keel.jobs.v1.JobsService", "keel.jobs.v1.JobRunnerService"];
    let (health, health_service) = server::health(SERVICES).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection(SERVICES);
    let readiness_pool = pool.clone();
    health.watch(Duration::from_secs(2), shutdown.clone(), move || {
        let pool = readiness_pool.clone();
        async move { server::postgres_ready(&pool).await }
    });

    let authenticator = Authenticator::new(verifier, Some(worker_token));
    let api = Arc::new(grpc::JobsApi::new(pool, redis, config.redis.clone()));
    let router = server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            JobsServiceServer::from_arc(api.clone())
                .max_decoding_message_size(server::MAX_MESSAGE_BYTES),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            JobRunnerServiceServer::from_arc(api)
                .max_decoding_message_size(server::MAX_MESSAGE_BYTES),
            authenticator,
        ));
    tracing::info!(addr = ?listener.local_addr().ok(), "keel-jobs serving");
    server::serve(router, listener, shutdown, config.runtime.shutdown_grace())
        .await
        .map_err(|e| StartupError::Other(e.to_string()))
}
