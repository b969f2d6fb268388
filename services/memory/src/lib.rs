//! Keel memory service: per-user keyed memories, search and a workspace aggregate.

pub mod admin;
pub mod config;
pub mod convert;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod service;
pub mod store;
pub mod sweeper;

use std::sync::Arc;
use std::time::Duration;

use keel_proto::admin::v1::memory_admin_service_server::MemoryAdminServiceServer;
use keel_proto::memory::v1::memory_service_server::MemoryServiceServer;
use keel_shared::auth::Authenticator;
use keel_shared::identity::Identity;
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
    let verifier = Arc::new(config.tokens.load()?);
    keel_shared::metrics::install(&config.runtime.metrics)?;
    let pool = keel_shared::db::connect(&config.database).await?;
    keel_shared::migrate::run(&pool).await?;
    let every = config.runtime.metrics.sample_every();
    keel_shared::metrics::sample_pools("memory", every, shutdown.clone(), Some(pool.clone()), None);

    const SERVICES: &[&str] = &[
        "keel.memory.v1.MemoryService",
        "keel.admin.v1.MemoryAdminService",
    ];
    let (health, health_service) = server::health(SERVICES).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection(SERVICES);
    let readiness_pool = pool.clone();
    health.watch(Duration::from_secs(2), shutdown.clone(), move || {
        let pool = readiness_pool.clone();
        async move { server::postgres_ready(&pool).await }
    });

    let identity = Arc::new(Identity::new(
        pool.clone(),
        config.tokens.credential_cache(),
    ));
    let store = store::Store::new(pool);
    tokio::spawn(sweeper::run(
        store.clone(),
        config.sweep.clone(),
        shutdown.clone(),
    ));

    let authenticator = Authenticator::new(verifier, None).with_identity(identity);
    let memory_admin = authenticator.admins_only(
        MemoryAdminServiceServer::new(admin::MemoryAdminApi::new(
            store.clone(),
            config.limits.clone(),
        ))
        .max_decoding_message_size(server::MAX_MESSAGE_BYTES),
    );
    let (memories, reads) = service::Memories::new(store.clone(), config.limits.clone());
    // Reads are answered until the server has drained (not from the shutdown
    // signal on), so calls still in flight during the grace period complete.
    let drained = CancellationToken::new();
    let _stop_reads = drained.clone().drop_guard();
    service::Memories::spawn_reads(store, reads, drained);
    let service = authenticator.users(
        MemoryServiceServer::new(grpc::MemoryApi::new(memories))
            .max_decoding_message_size(server::MAX_MESSAGE_BYTES),
    );
    let router = server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(memory_admin);
    tracing::info!(addr = ?listener.local_addr().ok(), "keel-memory serving");
    server::serve_runtime(router, listener, shutdown, &config.runtime).await
}
