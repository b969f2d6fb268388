//! Prometheus metrics: one recorder per process served over HTTP (off unless
//! `KEEL_METRICS_ADDR` is set) and the names of every Keel metric
//! (docs/operations.md lists them). The per-RPC tower layer is in [`rpc`],
//! sampled gauges in [`samplers`], and the job queue's metrics, which the jobs
//! service and the worker both record, in [`queues`].

mod queues;
mod rpc;
mod samplers;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::StartupError;
use crate::config::MetricsConfig;

pub use queues::{
    MAX_KIND_LABELS, QueueStats, dead_lettered, job_transition, kind_label, lease_reaped, outbox,
    queue, retention_deleted, worker_job,
};
pub use rpc::{RecordedBody, RpcFuture, RpcMetrics, RpcMetricsLayer};
pub use samplers::{pool_gauges, sample_every, sample_pools};

/// Buckets of every `*_seconds` histogram: 1 ms to 5 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

static SERVING: Mutex<Option<SocketAddr>> = Mutex::new(None);
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Installs the process-wide recorder and its HTTP listener when the config
/// names an address; does nothing otherwise (every metric is then a no-op).
/// Idempotent: a later call keeps the first listener (several services in
/// one process share it). The listener runs on a thread of its own, so it
/// outlives the runtime of whichever caller installed it.
pub fn install(cfg: &MetricsConfig) -> Result<(), StartupError> {
    let Some(addr) = cfg.metrics_addr else {
        return Ok(());
    };
    let mut serving = SERVING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = *serving {
        if existing != addr {
            tracing::warn!(%existing, requested = %addr,
                "metrics are already served by this process; keeping the first listener");
        }
        return Ok(());
    }
    let invalid = |reason: String| StartupError::InvalidVar {
        var: "KEEL_METRICS_ADDR",
        reason,
    };
    let builder = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| invalid(e.to_string()))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("keel-metrics".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                let exporter = match builder.build() {
                    Ok((recorder, exporter)) => match metrics::set_global_recorder(recorder) {
                        Ok(()) => exporter,
                        Err(_) => {
                            let _ = ready_tx
                                .send(Err("another metrics recorder is already installed".into()));
                            return;
                        }
                    },
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                if let Err(e) = exporter.await {
                    tracing::error!(error = ?e, "metrics listener stopped");
                }
            });
        })
        .map_err(|e| invalid(e.to_string()))?;
    ready_rx
        .recv()
        .map_err(|_| invalid("the metrics thread stopped".into()))?
        .map_err(invalid)?;
    describe();
    *serving = Some(addr);
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(%addr, "serving Prometheus metrics");
    Ok(())
}

/// True once a recorder is installed (samplers do no work before that).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "keel_grpc_server_requests_total",
        "gRPC calls handled, by method and status code (counted when the call ends)"
    );
    describe_histogram!(
        "keel_grpc_server_handling_seconds",
        Unit::Seconds,
        "time from request to response headers, by method (for streams: until the stream is set up)"
    );
    describe_gauge!(
        "keel_pool_connections",
        "pool connections by state (in_use, idle, waiting for one)"
    );
    describe_gauge!("keel_pool_max_connections", "pool size limit");
    queues::describe();
}
