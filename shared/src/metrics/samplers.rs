//! Gauges sampled on a timer: connection pools, and whatever a service
//! samples itself (the outbox, the stream).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::enabled;

/// Runs `sample` every `every` until `shutdown`, when metrics are enabled.
pub fn sample_every<F, Fut>(every: Duration, shutdown: CancellationToken, mut sample: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    if !enabled() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = sample() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// Samples the pools' gauges every `every` until `shutdown` (when enabled).
pub fn sample_pools(
    service: &'static str,
    every: Duration,
    shutdown: CancellationToken,
    postgres: Option<deadpool_postgres::Pool>,
    redis: Option<crate::redis::Pool>,
) {
    sample_every(every, shutdown, move || {
        if let Some(pool) = &postgres {
            pool_gauges(service, "postgres", pool.status());
        }
        // A cluster has one multiplexed connection: no pool to report.
        if let Some(status) = redis.as_ref().and_then(|pool| pool.status()) {
            pool_gauges(service, "redis", status);
        }
        std::future::ready(())
    });
}

/// `keel_pool_connections{service,pool,state}` (in_use / idle / waiting)
/// and `keel_pool_max_connections{service,pool}`.
pub fn pool_gauges(service: &'static str, pool: &'static str, status: deadpool_postgres::Status) {
    let in_use = status.size.saturating_sub(status.available);
    for (state, value) in [
        ("in_use", in_use),
        ("idle", status.available),
        ("waiting", status.waiting),
    ] {
        metrics::gauge!("keel_pool_connections", "service" => service, "pool" => pool, "state" => state)
            .set(value as f64);
    }
    metrics::gauge!("keel_pool_max_connections", "service" => service, "pool" => pool)
        .set(status.max_size as f64);
}
