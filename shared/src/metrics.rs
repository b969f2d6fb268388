//! Prometheus metrics: one recorder per process served over HTTP (off unless
//! `KEEL_METRICS_ADDR` is set), the per-RPC tower layer, sampled gauges, and
//! the names of every Keel metric (docs/operations.md lists them).

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;

use crate::StartupError;
use crate::config::MetricsConfig;

/// Buckets of every `*_seconds` histogram: 1 ms to 5 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Most distinct job kinds used as label values; further kinds are counted
/// as `other` (kinds are chosen by users, labels must stay bounded).
pub const MAX_KIND_LABELS: usize = 200;

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
    redis: Option<deadpool_redis::Pool>,
) {
    sample_every(every, shutdown, move || {
        if let Some(pool) = &postgres {
            pool_gauges(service, "postgres", pool.status());
        }
        if let Some(pool) = &redis {
            pool_gauges(service, "redis", pool.status());
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

/// The label value for a job kind: the kind itself for the first
/// [`MAX_KIND_LABELS`] kinds seen, `other` after that.
pub fn kind_label(kind: &str) -> String {
    static KINDS: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut kinds = KINDS.lock().unwrap_or_else(|e| e.into_inner());
    let kinds = kinds.get_or_insert_with(HashSet::new);
    if kinds.contains(kind) {
        return kind.to_string();
    }
    if kinds.len() < MAX_KIND_LABELS {
        kinds.insert(kind.to_string());
        return kind.to_string();
    }
    "other".into()
}

/// Jobs service: a job of `kind` made `transition` (created, started,
/// succeeded, failed, retried, cancelled).
pub fn job_transition(transition: &'static str, kind: &str) {
    if enabled() {
        metrics::counter!("keel_jobs_transitions_total", "transition" => transition, "kind" => kind_label(kind))
            .increment(1);
    }
}

/// Jobs service: a running job whose lease expired was reaped; `outcome` is
/// what became of it (queued, failed, cancelled).
pub fn lease_reaped(outcome: &'static str) {
    metrics::counter!("keel_jobs_leases_reaped_total", "outcome" => outcome).increment(1);
}

/// Jobs service: finished jobs deleted by the retention job.
pub fn retention_deleted(count: u64) {
    if count > 0 {
        metrics::counter!("keel_jobs_retention_deleted_total").increment(count);
    }
}

/// Jobs service: the outbox as last sampled.
pub fn outbox(rows: i64, due: i64, oldest_due_seconds: f64) {
    metrics::gauge!("keel_jobs_outbox_rows").set(rows as f64);
    metrics::gauge!("keel_jobs_outbox_due").set(due as f64);
    metrics::gauge!("keel_jobs_outbox_oldest_due_seconds").set(oldest_due_seconds);
}

/// Worker: one attempt of a job of `kind` ran for `elapsed` and ended with
/// `outcome` (succeeded, failed, retryable, cancelled, lease_lost).
pub fn worker_job(kind: &str, outcome: &'static str, elapsed: Duration) {
    if enabled() {
        let kind = kind_label(kind);
        metrics::counter!("keel_worker_jobs_total", "kind" => kind.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("keel_worker_job_duration_seconds", "kind" => kind)
            .record(elapsed.as_secs_f64());
    }
}

/// Worker: a message was moved to the dead-letter stream.
pub fn dead_lettered(reason: &'static str) {
    metrics::counter!("keel_worker_dead_lettered_total", "reason" => reason).increment(1);
}

/// Worker: the job stream and its consumer group as last sampled.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueStats {
    pub stream_length: u64,
    pub pending: u64,
    /// Entries not yet delivered to the group (`None`: Redis cannot tell).
    pub lag: Option<u64>,
    pub consumers: u64,
    pub dead_letter_length: u64,
}

pub fn queue(stats: QueueStats) {
    metrics::gauge!("keel_queue_stream_length").set(stats.stream_length as f64);
    metrics::gauge!("keel_queue_pending").set(stats.pending as f64);
    if let Some(lag) = stats.lag {
        metrics::gauge!("keel_queue_lag").set(lag as f64);
    }
    metrics::gauge!("keel_queue_consumers").set(stats.consumers as f64);
    metrics::gauge!("keel_queue_dead_letter_length").set(stats.dead_letter_length as f64);
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
    describe_counter!(
        "keel_jobs_transitions_total",
        "job transitions recorded by the jobs service, by kind"
    );
    describe_counter!(
        "keel_jobs_leases_reaped_total",
        "running jobs whose lease expired, by what became of them"
    );
    describe_counter!(
        "keel_jobs_retention_deleted_total",
        "finished jobs deleted by the retention job"
    );
    describe_gauge!(
        "keel_jobs_outbox_rows",
        "outbox rows (jobs not yet started)"
    );
    describe_gauge!(
        "keel_jobs_outbox_due",
        "outbox rows due for (re)publication"
    );
    describe_gauge!(
        "keel_jobs_outbox_oldest_due_seconds",
        Unit::Seconds,
        "how long the oldest due outbox row has waited for the relay"
    );
    describe_counter!(
        "keel_worker_jobs_total",
        "job attempts run by this worker, by kind and outcome"
    );
    describe_histogram!(
        "keel_worker_job_duration_seconds",
        Unit::Seconds,
        "handler run time, by kind"
    );
    describe_counter!(
        "keel_worker_dead_lettered_total",
        "messages moved to the dead-letter stream"
    );
    describe_gauge!("keel_queue_stream_length", "entries in the job stream");
    describe_gauge!(
        "keel_queue_pending",
        "entries delivered to a worker and not yet acknowledged"
    );
    describe_gauge!(
        "keel_queue_lag",
        "entries not yet delivered to the consumer group"
    );
    describe_gauge!("keel_queue_consumers", "consumers in the group");
    describe_gauge!(
        "keel_queue_dead_letter_length",
        "entries in the dead-letter stream"
    );
}

/// gRPC status code names, by number.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn code_name(value: Option<&http::HeaderValue>) -> Option<&'static str> {
    let value = value?;
    let n: usize = value.to_str().ok()?.trim().parse().ok()?;
    Some(CODES.get(n).copied().unwrap_or("UNKNOWN"))
}

/// Tower layer recording, for every gRPC call, `keel_grpc_server_requests_total
/// {method,code}` and `keel_grpc_server_handling_seconds{method}`. The code
/// comes from the `grpc-status` response header (trailers-only responses:
/// errors refused before or by a unary handler) or else from the trailers; a
/// call whose body is dropped before its trailers counts as CANCELLED.
/// Paths that are not a served method are labelled `unknown`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<RecordedBody<ResBody>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        RpcFuture {
            // Read only when metrics are on: no allocation per call otherwise.
            method: enabled().then(|| req.uri().path().to_string()),
            inner: Box::pin(self.inner.call(req)),
            start: Instant::now(),
        }
    }
}

pub struct RpcFuture<F> {
    inner: Pin<Box<F>>,
    method: Option<String>,
    start: Instant,
}

impl<F, B, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<RecordedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let result = ready!(this.inner.as_mut().poll(cx));
        let mut method = this.method.take().unwrap_or_default();
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                count(method, "INTERNAL");
                return Poll::Ready(Err(e));
            }
        };
        let header_code = code_name(response.headers().get("grpc-status"));
        if header_code == Some("UNIMPLEMENTED") {
            method = "unknown".into();
        }
        if enabled() {
            metrics::histogram!("keel_grpc_server_handling_seconds", "method" => method.clone())
                .record(this.start.elapsed().as_secs_f64());
        }
        let pending = match header_code {
            Some(code) => {
                count(method, code);
                None
            }
            None => Some(method),
        };
        Poll::Ready(Ok(response.map(|inner| RecordedBody { inner, pending })))
    }
}

fn count(method: String, code: &'static str) {
    if enabled() {
        metrics::counter!("keel_grpc_server_requests_total", "method" => method, "code" => code)
            .increment(1);
    }
}

/// A response body that counts its call once the trailers (or the end, or
/// a drop) show how it ended.
pub struct RecordedBody<B> {
    inner: B,
    /// The method, until the call is counted.
    pending: Option<String>,
}

impl<B> RecordedBody<B> {
    fn finish(&mut self, code: &'static str) {
        if let Some(method) = self.pending.take() {
            count(method, code);
        }
    }
}

impl<B> Drop for RecordedBody<B> {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

impl<B: Body + Unpin> Body for RecordedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    this.finish(code_name(trailers.get("grpc-status")).unwrap_or("UNKNOWN"));
                }
            }
            Some(Err(_)) => this.finish("INTERNAL"),
            None => this.finish("UNKNOWN"),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_named() {
        let v = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(code_name(Some(&v("0"))), Some("OK"));
        assert_eq!(code_name(Some(&v("3"))), Some("INVALID_ARGUMENT"));
        assert_eq!(code_name(Some(&v("16"))), Some("UNAUTHENTICATED"));
        assert_eq!(code_name(Some(&v("99"))), Some("UNKNOWN"));
        assert_eq!(code_name(Some(&v("x"))), None);
        assert_eq!(code_name(None), None);
    }

    #[test]
    fn kind_labels_are_bounded() {
        let first = kind_label("kind-label-test-a");
        assert_eq!(first, "kind-label-test-a");
        for i in 0..MAX_KIND_LABELS {
            kind_label(&format!("kind-label-fill-{i}"));
        }
        assert_eq!(kind_label("kind-label-test-a"), "kind-label-test-a");
        assert_eq!(kind_label("kind-label-test-new"), "other");
    }
}
