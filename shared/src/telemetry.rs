//! Logs and traces: log lines (human or JSON) on stderr with levels from
//! RUST_LOG, and, when an OTLP endpoint is configured, OpenTelemetry traces
//! with W3C trace context carried across gRPC calls and Redis messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;
use tower_http::classify::{GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::{MakeSpan, TraceLayer};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::StartupError;
use crate::config::{LogFormat, RuntimeConfig};

/// The W3C header (gRPC metadata key, Redis stream field) naming a span.
pub const TRACEPARENT: &str = "traceparent";

/// Set once an OTLP pipeline is installed; everything below is a no-op until then.
static TRACING: AtomicBool = AtomicBool::new(false);

fn tracing_on() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// What must outlive `main`'s work: the trace pipeline, flushed by [`Telemetry::shutdown`].
#[must_use = "call shutdown() at exit so the last spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (bounded by the exporter's timeout).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Logs only (tests and tools). Installs the global subscriber once; later
/// calls are no-ops.
pub fn init(format: LogFormat) {
    let _ = subscriber(format, None).try_init();
}

/// Logs, and traces when `runtime.otlp_endpoint` is set: each binary calls
/// this once at start, inside the Tokio runtime (the OTLP exporter needs it).
pub fn init_service(service: &str, runtime: &RuntimeConfig) -> Result<Telemetry, StartupError> {
    let Some(endpoint) = runtime.otlp_endpoint() else {
        init(runtime.log_format);
        return Ok(Telemetry { provider: None });
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| StartupError::InvalidVar {
            var: "OTEL_EXPORTER_OTLP_ENDPOINT",
            reason: e.to_string(),
        })?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME, when set, names the service instead.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("keel");
    subscriber(
        runtime.log_format,
        Some(tracing_opentelemetry::layer().with_tracer(tracer).boxed()),
    )
    .try_init()
    .map_err(|e| StartupError::Other(format!("telemetry: {e}")))?;
    TRACING.store(true, Ordering::Relaxed);
    Ok(Telemetry {
        provider: Some(provider),
    })
}

type Filtered = tracing_subscriber::layer::Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Filtered> + Send + Sync>;

fn subscriber(
    format: LogFormat,
    otel: Option<BoxedLayer>,
) -> tracing_subscriber::layer::Layered<Vec<BoxedLayer>, Filtered> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // tokio-postgres logs statement parameters (password and token hashes)
        // at debug level: never let RUST_LOG turn that on.
        .add_directive("tokio_postgres=info".parse().expect("static directive"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: BoxedLayer = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let mut layers = vec![fmt];
    layers.extend(otel);
    tracing_subscriber::registry().with(filter).with(layers)
}

/// The server layer giving every RPC a span (`rpc`, named after the method)
/// whose parent is the caller's `traceparent`, so log lines inside a call
/// carry its method and trace id. Only with tracing on.
pub type RpcTraceLayer =
    TraceLayer<SharedClassifier<GrpcErrorsAsFailures>, RpcSpan, (), (), (), (), ()>;

pub fn rpc_trace_layer() -> RpcTraceLayer {
    TraceLayer::new_for_grpc()
        .make_span_with(RpcSpan)
        .on_request(())
        .on_response(())
        .on_body_chunk(())
        .on_eos(())
        .on_failure(())
}

#[derive(Debug, Clone, Copy)]
pub struct RpcSpan;

impl<B> MakeSpan<B> for RpcSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> Span {
        let method = request.uri().path().trim_start_matches('/');
        // Without traces the span would only cost time on every call; probes
        // and reflection would only add noise to traces.
        if !tracing_on() || method.starts_with("grpc.") {
            return Span::none();
        }
        let span = tracing::info_span!(
            "rpc",
            otel.name = method,
            otel.kind = "server",
            rpc.system = "grpc",
            trace_id = tracing::field::Empty,
        );
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        adopt(&span, parent);
        span
    }
}

/// A span for work that continues a trace carried as a `traceparent` string
/// (a job read from the Redis stream): `span` becomes the child of that
/// trace's span. No-op when tracing is off or the string is not valid.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    if !tracing_on() {
        return;
    }
    let parent = match traceparent {
        Some(tp) => TraceContextPropagator::new()
            .extract(&HashMap::from([(TRACEPARENT.to_string(), tp.to_string())])),
        None => opentelemetry::Context::new(),
    };
    adopt(span, parent);
}

fn adopt(span: &Span, parent: opentelemetry::Context) {
    let _ = span.set_parent(parent);
    let cx = span.context();
    let trace_id = cx.span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Links `batch` (one call made for several jobs: a batched transition) to
/// each member's span, so that every job's trace leads to the call.
pub fn link_to<'a>(batch: &Span, members: impl IntoIterator<Item = &'a Span>) {
    if !tracing_on() {
        return;
    }
    for member in members {
        let span_context = member.context().span().span_context().clone();
        if span_context.is_valid() {
            batch.add_link(span_context);
        }
    }
}

/// The current span as a `traceparent` string, to store with work that
/// continues elsewhere (a job). None when tracing is off.
pub fn current_traceparent() -> Option<String> {
    if !tracing_on() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&Span::current().context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Adds the current span's trace context to an outgoing call's metadata.
pub fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    if !tracing_on() {
        return;
    }
    TraceContextPropagator::new()
        .inject_context(&Span::current().context(), &mut MetadataInjector(metadata));
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}
