//! Keel worker: reads jobs of the kinds it has handlers for from their Redis
//! streams (one stream per kind; it announces its kinds so the jobs service
//! publishes them, and never sees other kinds), runs their handlers, and
//! records each transition with the jobs service.
//!
//! The `keel-worker` binary runs the built-in kinds (`echo`, `sleep`,
//! `fail`). A team with its own kinds builds its own binary on this crate:
//! register handlers in a [`Registry`] and call [`run_with`].
//!
//! ```no_run
//! use clap::Parser;
//! use keel_worker::{Config, HandlerError, JobContext, Registry};
//! use serde_json::json;
//!
//! #[tokio::main]
//! async fn main() {
//!     let config = Config::parse(); // the same flags and KEEL_* variables as keel-worker
//!     let registry = Registry::with_builtins().register_fn("greet", |ctx: JobContext| async move {
//!         let name = ctx.payload["name"]
//!             .as_str()
//!             .ok_or_else(|| HandlerError::Permanent("payload.name: required".into()))?;
//!         Ok(json!({ "greeting": format!("hello, {name}") }))
//!     });
//!     let listener = keel_shared::server::bind(config.health_addr).await.unwrap();
//!     let shutdown = keel_shared::shutdown::on_signal();
//!     keel_worker::run_with(config, registry, listener, shutdown).await.unwrap();
//! }
//! ```
//!
//! How a message is handled: StartJob (refused -> acknowledged and skipped),
//! the handler in a task of its own with heartbeats every heartbeat interval
//! (each carrying what the handler last reported with `ctx.progress.report`;
//! cancellation requested -> the handler's token is cancelled and the job
//! ends CANCELLED), then CompleteJob or FailJob (retryable or not, as the
//! handler says; a panic is a retryable failure), then XACK. Messages left
//! pending by a dead worker are taken over with XAUTOCLAIM after the claim
//! idle time; one delivered more than the maximum is dead-lettered and its job
//! failed. On shutdown the worker stops reading, gives running jobs the grace
//! period, then cancels them and fails them back as retryable.

pub mod client;
pub mod config;
mod consumer;
mod context;
mod dead_letter;
pub mod handler;
mod recording;
mod runner;
mod stream;
mod transitions;

use std::sync::Arc;
use std::time::Duration;

use keel_shared::{StartupError, server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use handler::{FnHandler, Handler, HandlerError, JobContext, Progress, Registry};

/// How long one XREADGROUP waits for new messages (and so, at most, how long
/// shutdown waits for the reader).
const READ_BLOCK: Duration = Duration::from_secs(1);

/// Serves health on `listener` and runs jobs of the built-in kinds until
/// `shutdown`, then drains.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    run_with(config, Registry::with_builtins(), listener, shutdown).await
}

/// Serves health on `listener` and runs jobs with the handlers of `registry`
/// until `shutdown`, then drains. Fails only on bad configuration: Redis and
/// the jobs service may come and go.
pub async fn run_with(
    config: Config,
    registry: Registry,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartupError> {
    config.validate()?;
    // A bad certificate stops the worker before it takes jobs (the health
    // server, which loads it again, starts alongside the consumer).
    keel_shared::server_tls::TlsServer::from_config(&config.runtime.tls)?;
    keel_shared::metrics::install(&config.runtime.metrics)?;
    let jobs_endpoints = client::endpoints(&config.jobs_url, &config.jobs_tls)?;
    let client = client::connect(jobs_endpoints.clone(), config.worker_token()?)?;
    let redis = keel_shared::redis::pool(&config.redis)?;
    let stream = stream::JobStream::new(
        redis.clone(),
        &config.redis,
        registry.kinds().map(str::to_string).collect(),
        config.consumer_name(),
        READ_BLOCK,
    )
    .map_err(|e| StartupError::InvalidVar {
        var: "REDIS_URL",
        reason: e.to_string(),
    })?
    .with_dead_letter_maxlen(config.dead_letter_maxlen);

    let every = config.runtime.metrics.sample_every();
    keel_shared::metrics::sample_pools(
        "worker",
        every,
        shutdown.clone(),
        None,
        Some(redis.clone()),
    );
    let sampled = stream.clone();
    keel_shared::metrics::sample_every(every, shutdown.clone(), move || {
        let stream = sampled.clone();
        async move {
            match stream.queue_stats().await {
                Ok(stats) => keel_shared::metrics::queue(stats),
                Err(e) => tracing::debug!(error = %e, "could not sample the queue"),
            }
        }
    });
    let (health, health_service) = server::health(&[]).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection(&[]);
    health.watch(Duration::from_secs(2), shutdown.clone(), move || {
        let redis = redis.clone();
        let jobs = jobs_endpoints.clone();
        async move {
            keel_shared::redis::ping(&redis).await
                && keel_shared::grpc_client::probe_any(&jobs).await
        }
    });
    let router = server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let (worker, ack_queue) = context::Worker::new(
        stream,
        client,
        registry,
        config.heartbeat_interval(),
        shutdown.clone(),
    );
    let settings = consumer::Settings {
        concurrency: config.concurrency(),
        claim_idle: config.claim_idle(),
        max_deliveries: u64::from(config.max_deliveries),
        trim_interval: config.trim_interval(),
        consumer_ttl: config.consumer_ttl(),
        job_grace: config.job_grace(),
    };
    tracing::info!(addr = ?listener.local_addr().ok(), "keel-worker health serving");
    let (served, ()) = tokio::join!(
        server::serve_runtime(router, listener, shutdown, &config.runtime),
        consumer::run(Arc::new(worker), ack_queue, settings),
    );
    served
}
