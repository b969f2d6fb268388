//! Keel jobs service: durable jobs, delivered to workers through a Redis stream.

mod admin;
mod announcements;
pub mod config;
mod convert;
pub mod delivery;
pub mod domain;
pub mod error;
mod fairness;
pub mod flow;
pub mod grpc;
mod retention;
mod routing;
mod schedules;
pub mod service;
mod statistics;
pub mod store;
mod subscriptions;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use keel_proto::admin::v1::admin_service_server::AdminServiceServer;
use keel_proto::jobs::v1::job_runner_service_server::JobRunnerServiceServer;
use keel_proto::jobs::v1::jobs_service_server::JobsServiceServer;
use keel_proto::jobs::v1::schedule_service_server::ScheduleServiceServer;
use keel_shared::auth::Authenticator;
use keel_shared::identity::Identity;
use keel_shared::worker_credentials::{self, WorkerCredentials};
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
    let worker_token = config.worker_token.as_deref().filter(|t| !t.is_empty());
    let worker_credentials = config
        .worker_credentials_file
        .as_deref()
        .map(WorkerCredentials::load)
        .transpose()
        .map_err(|reason| StartupError::InvalidVar {
            var: "KEEL_WORKER_CREDENTIALS_FILE",
            reason,
        })?;
    let flow = match &config.flow_control_file {
        Some(path) => flow::FlowControl::load(path).map_err(|reason| StartupError::InvalidVar {
            var: "KEEL_FLOW_CONTROL_FILE",
            reason,
        })?,
        None => flow::FlowControl::unlimited(),
    };
    let flow = Arc::new(flow);
    if worker_token.is_none() && worker_credentials.is_none() {
        return Err(StartupError::MissingVar(
            "KEEL_WORKER_TOKEN (or KEEL_WORKER_CREDENTIALS_FILE)",
        ));
    }
    keel_shared::metrics::install(&config.runtime.metrics)?;
    let pool = keel_shared::db::connect(&config.database).await?;
    keel_shared::migrate::run(&pool).await?;
    let redis = keel_shared::redis::pool(&config.redis)?;
    let every = config.runtime.metrics.sample_every();
    keel_shared::metrics::sample_pools(
        "jobs",
        every,
        shutdown.clone(),
        Some(pool.clone()),
        Some(redis.clone()),
    );
    let outbox_pool = pool.clone();
    keel_shared::metrics::sample_every(every, shutdown.clone(), move || {
        let pool = outbox_pool.clone();
        async move { delivery::sample_outbox(&pool).await }
    });

    const SERVICES: &[&str] = &[
        "keel.jobs.v1.JobsService",
        "keel.jobs.v1.JobRunnerService",
        "keel.jobs.v1.ScheduleService",
        "keel.admin.v1.AdminService",
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
    let mut authenticator = Authenticator::new(verifier, worker_token).with_identity(identity);
    if let Some(credentials) = worker_credentials {
        tracing::info!(
            credentials = credentials.len(),
            "named worker credentials loaded"
        );
        credentials
            .clone()
            .spawn_reloader(worker_credentials::RELOAD_EVERY, shutdown.clone());
        authenticator = authenticator.with_worker_credentials(credentials);
    }
    // Read the served kinds once before serving (a short wait at most), so
    // the first jobs go straight to the streams of kinds already served.
    let served = Arc::new(routing::ServedKinds::default());
    if let Err(e) = served.refresh(&redis, &config.redis).await {
        tracing::warn!(error = %e, "cannot read the kinds stream workers serve yet; will retry");
    }
    tokio::spawn(routing::run_refresher(
        served.clone(),
        pool.clone(),
        redis.clone(),
        config.redis.clone(),
        shutdown.clone(),
    ));
    let admin_redis = redis.clone();
    let (delivery, queues) = delivery::Delivery::new(
        pool.clone(),
        redis,
        config.redis.clone(),
        config.redeliver_after(),
        served,
        config.stream_backlog,
    );
    let delivery = Arc::new(delivery);
    let retention_pool = pool.clone();
    let statistics_pool = pool.clone();
    let schedules = Arc::new(schedules::Schedules::new(
        pool.clone(),
        delivery.clone(),
        schedules::Settings {
            limits: schedules::domain::Limits {
                per_user: config.schedules_per_user.max(0),
                min_interval: Duration::from_secs(config.schedule_min_interval_secs),
                max_payload_bytes: config.max_payload_bytes,
            },
            schedule_timeout: config.schedule_timeout(),
        },
    ));
    let admin_pool = pool.clone();
    let (jobs, batch_queues) = service::Jobs::new(
        pool,
        delivery.clone(),
        service::Settings {
            lease: config.lease(),
            retry_base: Duration::from_millis(config.retry_base_ms),
            retry_max: Duration::from_millis(config.retry_max_ms.max(config.retry_base_ms)),
            max_payload_bytes: config.max_payload_bytes,
            watch_poll: config.watch_poll(),
            schedule_timeout: config.schedule_timeout(),
            claim_poll: config.claim_poll(),
            flow: flow.clone(),
        },
    );
    let jobs = Arc::new(jobs);
    // Transitions are applied until the server has drained (not from the
    // shutdown signal on), so calls still in flight during the grace period commit.
    let drained = CancellationToken::new();
    let _stop_transitions = drained.clone().drop_guard();
    jobs.spawn_batchers(batch_queues, drained);
    // Background loops stop with the server (the child token is cancelled on return too).
    let background = shutdown.child_token();
    let _stop_background = background.clone().drop_guard();
    tokio::spawn(delivery.clone().run_relay(
        config.relay_interval(),
        config.relay_batch,
        background.clone(),
    ));
    tokio::spawn(delivery.clone().run_reaper(
        config.reaper_interval(),
        (
            Duration::from_millis(config.retry_base_ms),
            Duration::from_millis(config.retry_max_ms.max(config.retry_base_ms)),
        ),
        background.clone(),
    ));
    tokio::spawn(
        delivery
            .clone()
            .run_announcer(queues.announcements, background.clone()),
    );
    tokio::spawn(
        delivery
            .clone()
            .run_publisher(queues.publications, background.clone()),
    );
    tokio::spawn(
        flow.clone()
            .run_reloader(flow::RELOAD_EVERY, background.clone()),
    );
    tokio::spawn(statistics::run(
        statistics_pool,
        statistics::CHECK_EVERY,
        background.clone(),
    ));
    tokio::spawn(retention::run(
        retention_pool,
        retention::Policy {
            days: config.retention_days,
            batch: config.retention_batch.max(1),
            every: config.retention_interval(),
        },
        background.clone(),
    ));
    tokio::spawn(schedules::ticker::run(
        schedules.clone(),
        config.schedule_tick(),
        background.clone(),
    ));
    // WatchJob's one pub/sub connection (without it watchers poll Postgres).
    let (subscriptions, changes) =
        subscriptions::Subscriptions::new(config.redis.clone(), config.max_watchers);
    match keel_shared::redis::Client::open(&config.redis) {
        Ok(client) => {
            tokio::spawn(subscriptions.clone().run(
                client.node_clients(),
                changes,
                background.clone(),
            ));
        }
        Err(_) => subscriptions.went_down(),
    }
    let admin = admin::AdminApi::new(
        Arc::new(admin::AdminService::new(
            admin_pool.clone(),
            jobs.clone(),
            schedules.clone(),
        )),
        admin_redis,
        config.redis.clone(),
    );
    let (sightings, seen) = admin::workers::Sightings::new();
    tokio::spawn(admin::workers::run(
        admin_pool.clone(),
        seen,
        background.clone(),
    ));
    let api = Arc::new(
        grpc::JobsApi::new(jobs, subscriptions, background).with_sightings(Arc::new(sightings)),
    );
    let router = server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            authenticator.users(
                JobsServiceServer::from_arc(api.clone())
                    .max_decoding_message_size(server::MAX_MESSAGE_BYTES),
            ),
        )
        .add_service(
            authenticator.users(
                ScheduleServiceServer::new(schedules::ScheduleApi::new(schedules))
                    .max_decoding_message_size(server::MAX_MESSAGE_BYTES),
            ),
        )
        .add_service(authenticator.admins_only(
            AdminServiceServer::new(admin).max_decoding_message_size(server::MAX_MESSAGE_BYTES),
        ))
        .add_service(
            authenticator.workers_only(
                JobRunnerServiceServer::from_arc(api)
                    .max_decoding_message_size(server::MAX_MESSAGE_BYTES),
            ),
        );
    tracing::info!(addr = ?listener.local_addr().ok(), "keel-jobs serving");
    server::serve_runtime(router, listener, shutdown, &config.runtime).await
}
