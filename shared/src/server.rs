//! gRPC server plumbing every service shares: transport limits, health
//! (NOT_SERVING until ready, and again while a backend is down), reflection
//! v1 and v1alpha, per-RPC metrics and spans, and serving with a bounded drain
//! on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::StartupError;
use crate::metrics::RpcMetricsLayer;
use crate::server_tls::{DEFAULT_RELOAD_EVERY, TlsServer};
use crate::telemetry::RpcTraceLayer;

/// Keel's layers, outermost first: per-RPC metrics, the RPC's span (trace
/// context from the caller), then the status fix-up.
type KeelLayers =
    Stack<OversizeStatusLayer, Stack<RpcTraceLayer, Stack<RpcMetricsLayer, Identity>>>;

/// What [`builder`] makes once services are added: the server with Keel's layers.
pub type KeelRouter = Router<KeelLayers>;

/// Largest request message a server decodes (bigger ones are refused with
/// RESOURCE_EXHAUSTED before any handler runs).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The transport with Keel's limits: bounded streams per connection,
/// HTTP/2 keepalive so dead peers are noticed, per-RPC metrics and spans.
pub fn builder() -> Server<KeelLayers> {
    Server::builder()
        .max_concurrent_streams(Some(256))
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_pending_accept_reset_streams(Some(64))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .tcp_nodelay(true)
        .layer(RpcMetricsLayer)
        .layer(crate::telemetry::rpc_trace_layer())
        .layer(OversizeStatusLayer)
}

/// tonic refuses a request over the decode limit with OUT_OF_RANGE; the gRPC
/// status-code document prescribes RESOURCE_EXHAUSTED for an over-size
/// message, which is what the contract promises. The refusal is a
/// trailers-only response, so its status is in the response headers.
#[derive(Debug, Clone, Copy)]
pub struct OversizeStatusLayer;

impl<S> tower::Layer<S> for OversizeStatusLayer {
    type Service = OversizeStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeStatus { inner }
    }
}

#[derive(Debug, Clone)]
pub struct OversizeStatus<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for OversizeStatus<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::MapOk<S::Future, fn(http::Response<ResBody>) -> http::Response<ResBody>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        use futures::TryFutureExt;
        self.inner
            .call(req)
            .map_ok(oversize_to_resource_exhausted as fn(_) -> _)
    }
}

fn oversize_to_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    // The message is percent-encoded: "decoded message length too large".
    let oversize = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.contains("message%20length%20too%20large"));
    if out_of_range && oversize {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// Binds the listener, naming the address when it cannot.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartupError::Listen {
            addr: addr.to_string(),
            cause: e.to_string(),
        })
}

/// Health entry that is SERVING while the process serves, whatever its
/// backends: what a liveness probe asks (readiness asks "").
pub const LIVENESS: &str = "keel.liveness";

/// Health service with every listed service name (and "") NOT_SERVING, and
/// [`LIVENESS`] SERVING.
pub async fn health(
    names: &[&str],
) -> (
    Health,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let health = Health {
        reporter,
        names: std::iter::once("")
            .chain(names.iter().copied())
            .map(String::from)
            .collect(),
    };
    health.set(false).await;
    health
        .reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    (health, service)
}

/// The health entries of one server, switched together.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    names: Vec<String>,
}

impl Health {
    pub async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in &self.names {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Re-checks readiness every `every` until shutdown, flipping health when
    /// a backend (Postgres, Redis, ...) goes away or comes back.
    pub fn watch<F, Fut>(self, every: Duration, shutdown: CancellationToken, check: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send,
    {
        tokio::spawn(async move {
            let mut was = true;
            loop {
                let ok = check().await;
                if ok != was {
                    if ok {
                        tracing::info!("backends reachable again: SERVING");
                    } else {
                        tracing::warn!("a backend is unreachable: NOT_SERVING");
                    }
                    was = ok;
                }
                self.set(ok).await;
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.set(false).await;
                        return;
                    }
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
    }
}

/// True when the pool can hand out a connection that answers `SELECT 1`.
pub async fn postgres_ready(pool: &deadpool_postgres::Pool) -> bool {
    match tokio::time::timeout(Duration::from_secs(2), pool.get()).await {
        Ok(Ok(client)) => client.simple_query("SELECT 1").await.is_ok(),
        _ => false,
    }
}

/// Reflection v1 and v1alpha listing `services` (plus health and reflection
/// themselves), described from Keel's descriptors and grpc.health.v1.
pub fn reflection(
    services: &[&str],
) -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let configure = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(keel_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for name in services {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    (
        configure()
            .build_v1()
            .expect("embedded descriptor sets are valid"),
        configure()
            .build_v1alpha()
            .expect("embedded descriptor sets are valid"),
    )
}

/// Serves as `runtime` says: over TLS when `KEEL_TLS_CERT_FILE` is set
/// (certificates re-read on SIGHUP and when the files change), plaintext
/// otherwise; see [`serve`].
pub async fn serve_runtime(
    router: KeelRouter,
    listener: TcpListener,
    shutdown: CancellationToken,
    runtime: &crate::config::RuntimeConfig,
) -> Result<(), StartupError> {
    let served = match TlsServer::from_config(&runtime.tls)? {
        Some(tls) => {
            tls.watch(DEFAULT_RELOAD_EVERY, shutdown.clone());
            tracing::info!("gRPC over TLS");
            serve_tls(router, listener, tls, shutdown, runtime.shutdown_grace()).await
        }
        None => serve(router, listener, shutdown, runtime.shutdown_grace()).await,
    };
    served.map_err(|e| StartupError::Other(e.to_string()))
}

/// Serves until `shutdown`, then stops accepting and gives in-flight calls
/// (including streams) `grace` to finish before returning anyway.
pub async fn serve(
    router: KeelRouter,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    serve_incoming(router, incoming, shutdown, grace).await
}

/// [`serve`] over TLS (see [`TlsServer`]; rotation needs [`TlsServer::watch`]).
pub async fn serve_tls(
    router: KeelRouter,
    listener: TcpListener,
    tls: TlsServer,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let incoming = tls.incoming(listener, shutdown.clone());
    serve_incoming(router, incoming, shutdown, grace).await
}

async fn serve_incoming<I, IO, IE>(
    router: KeelRouter,
    incoming: I,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error>
where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let signal = shutdown.clone();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        signal.cancelled().await;
    });
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => return res,
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(grace, server).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(
                ?grace,
                "in-flight calls still running after the grace period; stopping"
            );
            Ok(())
        }
    }
}

/// A service binary's whole `main`: answers `BINARY healthcheck [ADDR]`,
/// parses the config, starts telemetry, binds the listen address, runs
/// `run` until SIGINT/SIGTERM, flushes telemetry, and on a start-up error
/// prints one line and exits non-zero.
pub async fn main<C, F, Fut>(binary: &'static str, default_health_addr: &str, run: F)
where
    C: crate::config::ServiceConfig,
    F: FnOnce(C, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), StartupError>>,
{
    healthcheck_command(default_health_addr).await;
    let config = crate::config::parse_config::<C>();
    let result = async {
        let telemetry = crate::telemetry::init_service(binary, config.runtime())?;
        let listener = bind(config.listen_addr()).await?;
        let result = run(config, listener, crate::shutdown::on_signal()).await;
        telemetry.shutdown().await;
        result
    }
    .await;
    crate::error::exit_on_error(binary, result);
}

/// `BINARY healthcheck [ADDR]`: exits 0 when the server at ADDR (default
/// `default_addr`, the binary's own port on loopback) is SERVING, 1 otherwise.
/// Over TLS when the binary serves TLS (see `healthcheck_probe`).
/// Lets container health checks use the binary itself. Returns when the
/// arguments are not a health check.
pub async fn healthcheck_command(default_addr: &str) {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("healthcheck") {
        return;
    }
    let addr = args.next().unwrap_or_else(|| default_addr.to_string());
    if healthcheck_probe(&addr).await {
        println!("SERVING");
        std::process::exit(0);
    }
    println!("NOT SERVING");
    std::process::exit(1);
}

/// The `healthcheck` probe: ADDR may be a URL; a bare address is probed in
/// plaintext, or, when this process serves TLS (`KEEL_TLS_CERT_FILE` set),
/// as `https://localhost:PORT`. TLS trusts `KEEL_TLS_CA_FILE` and presents
/// `KEEL_TLS_CLIENT_CERT_FILE`/`KEEL_TLS_CLIENT_KEY_FILE` when set.
async fn healthcheck_probe(addr: &str) -> bool {
    let path = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(Into::into)
    };
    let url = if addr.contains("://") {
        addr.to_string()
    } else if path("KEEL_TLS_CERT_FILE").is_some() {
        let port = addr.rsplit(':').next().unwrap_or_default();
        format!("https://localhost:{port}")
    } else {
        return crate::grpc_client::probe(addr).await;
    };
    let tls = crate::config::GrpcClientTlsConfig {
        tls_ca_file: path("KEEL_TLS_CA_FILE"),
        tls_client_cert_file: path("KEEL_TLS_CLIENT_CERT_FILE"),
        tls_client_key_file: path("KEEL_TLS_CLIENT_KEY_FILE"),
    };
    match crate::grpc_client::client_endpoint(&url, &tls) {
        Ok(endpoint) => crate::grpc_client::probe_endpoint(endpoint).await,
        Err(e) => {
            eprintln!("{e}");
            false
        }
    }
}
