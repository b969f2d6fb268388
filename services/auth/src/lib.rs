//! Keel auth service: users, sessions, access and refresh tokens, API keys.

pub mod admin;
pub mod config;
mod convert;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod keys;
pub mod passwords;
pub mod service;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use keel_proto::admin::v1::user_admin_service_server::UserAdminServiceServer;
use keel_proto::auth::v1::auth_service_server::AuthServiceServer;
use keel_shared::auth::{Authenticator, SigningKeyPem, TokenSigner, TokenVerifier};
use keel_shared::{StartupError, server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::passwords::Passwords;
use crate::service::{Auth, LoginLimits, Settings};
use crate::store::Store;
use keel_shared::identity::Identity;

/// How often expired refresh tokens and login counters are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// Loads the signing key, connects, migrates, and serves on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    // Cheap checks first, in the order an operator fixes them.
    config.database.url()?;
    let bootstrap =
        admin::Bootstrap::new(&config.admin_emails).map_err(|reason| StartupError::InvalidVar {
            var: "KEEL_ADMIN_EMAILS",
            reason,
        })?;
    let private_pem = keys::load_or_generate(&config.tokens)?;
    let tokens = &config.tokens;
    let key_error = |e: keel_shared::auth::KeyError| StartupError::InvalidVar {
        var: "KEEL_JWT_PRIVATE_KEY_FILE",
        reason: e.to_string(),
    };
    let signer = TokenSigner::from_private_pem(
        &private_pem,
        &tokens.jwt_issuer,
        &tokens.jwt_audience,
        tokens.access_token_ttl(),
    )
    .map_err(key_error)?;
    let public_pem = SigningKeyPem::public_from_private(&private_pem).map_err(key_error)?;
    let verifier = Arc::new(
        TokenVerifier::from_public_pems(&[public_pem], &tokens.jwt_issuer, &tokens.jwt_audience)
            .map_err(key_error)?,
    );
    let login = config.login.clone();
    let passwords = tokio::task::spawn_blocking(move || {
        Passwords::new(
            login.argon2_memory_kib,
            login.argon2_iterations,
            login.argon2_parallelism,
            login.max_concurrent_hashes(),
        )
    })
    .await
    .map_err(|e| StartupError::Other(e.to_string()))?
    .map_err(|reason| StartupError::InvalidVar {
        var: "KEEL_ARGON2_MEMORY_KIB / KEEL_ARGON2_ITERATIONS / KEEL_ARGON2_PARALLELISM",
        reason,
    })?;

    keel_shared::metrics::install(&config.runtime.metrics)?;
    let pool = keel_shared::db::connect(&config.database).await?;
    keel_shared::migrate::run(&pool).await?;
    let every = config.runtime.metrics.sample_every();
    keel_shared::metrics::sample_pools("auth", every, shutdown.clone(), Some(pool.clone()), None);

    const SERVICES: &[&str] = &["keel.auth.v1.AuthService", "keel.admin.v1.UserAdminService"];
    let (health, health_service) = server::health(SERVICES).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection(SERVICES);
    let readiness_pool = pool.clone();
    health.watch(Duration::from_secs(2), shutdown.clone(), move || {
        let pool = readiness_pool.clone();
        async move { server::postgres_ready(&pool).await }
    });

    tracing::info!(kid = signer.key_id(), "access tokens signed with key");
    let store = Store::new(pool.clone());
    bootstrap
        .grant_existing(&store)
        .await
        .map_err(|e| StartupError::Other(format!("KEEL_ADMIN_EMAILS: {e}")))?;
    spawn_sweeper(
        store.clone(),
        config.login.failure_window(),
        shutdown.clone(),
    );

    let identity = Arc::new(Identity::new(
        pool.clone(),
        config.tokens.credential_cache(),
    ));
    let auth = Auth::new(
        store.clone(),
        signer,
        passwords,
        identity.clone(),
        Settings {
            max_concurrent_hashes: config.login.max_concurrent_hashes(),
            refresh_token_ttl: config.tokens.refresh_token_ttl(),
            login: LoginLimits {
                max_failures: config.login.login_max_failures,
                failure_window: config.login.failure_window(),
            },
            bootstrap,
        },
    );
    let authenticator = Authenticator::new(verifier.clone(), None).with_identity(identity.clone());
    let user_admin = admin::UserAdminApi::new(store, identity);
    let service = grpc::AuthApi::new(auth, verifier, authenticator.clone());
    let router = server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AuthServiceServer::new(service).max_decoding_message_size(server::MAX_MESSAGE_BYTES),
        )
        .add_service(
            authenticator.admins_only(
                UserAdminServiceServer::new(user_admin)
                    .max_decoding_message_size(server::MAX_MESSAGE_BYTES),
            ),
        );
    tracing::info!(addr = ?listener.local_addr().ok(), "keel-auth serving");
    server::serve_runtime(router, listener, shutdown, &config.runtime).await
}

fn spawn_sweeper(store: Store, login_window: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            match store.sweep(login_window).await {
                Ok((failures, tokens)) => {
                    tracing::debug!(
                        failures,
                        tokens,
                        "swept expired login counters and refresh tokens"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "sweep failed"),
            }
        }
    });
}
