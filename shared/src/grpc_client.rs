//! The client side of gRPC: endpoints in plaintext or TLS (the worker, the
//! CLI, health checks), client-side load balancing over several replicas of
//! a service, and health probes asking the standard health service whether a
//! server is SERVING.

use std::path::Path;
use std::time::Duration;

use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tower::util::MapErr;

use crate::config::GrpcClientTlsConfig;

/// How often a balanced channel asks each of its endpoints whether it is
/// SERVING.
pub const BALANCE_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// How long one of those health checks may take before the endpoint counts
/// as down.
const BALANCE_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// An endpoint for `url`: plaintext for `http://`, TLS trusting
/// `tls.tls_ca_file` (and presenting the client certificate, if any) for
/// `https://`. The name checked is the URL's host.
pub fn client_endpoint(
    url: &str,
    tls: &GrpcClientTlsConfig,
) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("invalid URL {url}: {e}"))?;
    if endpoint.uri().scheme_str() != Some("https") {
        return Ok(endpoint);
    }
    let ca_file = tls
        .tls_ca_file
        .as_deref()
        .ok_or_else(|| format!("{url} is https: set KEEL_TLS_CA_FILE to the CA to trust"))?;
    let ca = std::fs::read(ca_file)
        .map_err(|e| format!("cannot read CA file {}: {e}", ca_file.display()))?;
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    if let (Some(cert), Some(key)) = (&tls.tls_client_cert_file, &tls.tls_client_key_file) {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        config = config.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    endpoint
        .tls_config(config)
        .map_err(|e| format!("TLS for {url}: {e}"))
}

/// The endpoints of `urls`: one URL, or the URLs of several replicas of one
/// service separated by commas (`http://a:50052,http://b:50052`), each made
/// by [`client_endpoint`] (so each `https://` one checks its own host name).
pub fn client_endpoints(urls: &str, tls: &GrpcClientTlsConfig) -> Result<Vec<Endpoint>, String> {
    let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
    if urls.iter().any(|u| u.is_empty()) {
        return Err("an empty URL in the list (URLs are separated by single commas)".into());
    }
    urls.into_iter()
        .map(|url| client_endpoint(url, tls))
        .collect()
}

/// A channel to one service that connects on first use and reconnects by
/// itself. Over one endpoint it is that endpoint's own channel. Over several
/// (replicas of the service) it is tonic's balanced channel: each call goes
/// to a ready replica picked at random (tower's power of two choices, over
/// connections that all report the same load), and every
/// [`BALANCE_HEALTH_INTERVAL`] each replica's health service is asked
/// whether it is SERVING. One that is not (killed, restarting, lost its
/// database) leaves the balance while another one is SERVING, and comes
/// back once it answers SERVING again. When none is SERVING all stay in, so
/// calls fail fast with UNAVAILABLE rather than wait. A call sent to a
/// replica just before it died, or cut by its death, is UNAVAILABLE (see
/// [`BalancedChannel`]): retry it.
///
/// Must be called inside a Tokio runtime; the health checks stop when the
/// last clone of the channel is dropped.
///
/// # Panics
///
/// When `endpoints` is empty.
pub fn balanced_channel(endpoints: Vec<Endpoint>) -> BalancedChannel {
    assert!(!endpoints.is_empty(), "a channel needs an endpoint");
    let channel = if let [endpoint] = endpoints.as_slice() {
        endpoint.connect_lazy()
    } else {
        let (channel, changes) = Channel::balance_channel(endpoints.len());
        for (i, endpoint) in endpoints.iter().enumerate() {
            changes
                .try_send(Change::Insert(i, endpoint.clone()))
                .expect("the change queue holds one change per endpoint");
        }
        tokio::spawn(keep_balance_healthy(endpoints, changes));
        channel
    };
    MapErr::new(channel, transport_failure_status)
}

/// The channel [`balanced_channel`] makes: a tonic [`Channel`] whose
/// transport failures are statuses as the gRPC spec has them.
pub type BalancedChannel = MapErr<Channel, fn(tonic::transport::Error) -> tonic::Status>;

/// The status of a call that failed in the transport, before the server
/// answered. tonic calls a connection broken mid-call (a replica SIGKILLed
/// while answering) UNKNOWN "transport error"; the gRPC spec says a client
/// reports a broken connection as UNAVAILABLE, the retryable code, which is
/// what callers of a replicated service must see. So is a call the dying
/// connection dropped before sending it (hyper's "operation was canceled",
/// which tonic calls CANCELLED: the caller cancelled nothing). Other mapped
/// codes (UNAVAILABLE for a refused connection, CANCELLED for a client-side
/// timeout) stay as tonic has them.
fn transport_failure_status(error: tonic::transport::Error) -> tonic::Status {
    let dropped = dropped_unsent(&error);
    let status = tonic::Status::from_error(Box::new(error));
    if status.code() == tonic::Code::Unknown || dropped {
        tonic::Status::unavailable(format!(
            "connection to the server lost: {}",
            status.message()
        ))
    } else {
        status
    }
}

/// Whether hyper dropped the call unsent because its connection went away.
fn dropped_unsent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// A channel connected to one of `endpoints` (replicas of one service): the
/// first, in random order, that accepts a connection; the last error when
/// none does. For short-lived clients (the CLI) making a call or two, where
/// a [`balanced_channel`] would send the first call before knowing which
/// replicas are up.
///
/// # Panics
///
/// When `endpoints` is empty.
pub async fn connect_any(mut endpoints: Vec<Endpoint>) -> Result<Channel, tonic::transport::Error> {
    use rand::seq::SliceRandom;

    endpoints.shuffle(&mut rand::thread_rng());
    let mut last = None;
    for endpoint in endpoints {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one endpoint"))
}

/// Takes the endpoints that do not answer SERVING out of the balance behind
/// `changes` (all of them in at first), and puts them back when they do.
async fn keep_balance_healthy(
    endpoints: Vec<Endpoint>,
    changes: tokio::sync::mpsc::Sender<Change<usize, Endpoint>>,
) {
    use tonic_health::pb::health_client::HealthClient;

    let probes: Vec<HealthClient<Channel>> = endpoints
        .iter()
        .map(|e| {
            let e = e.clone().connect_timeout(BALANCE_HEALTH_TIMEOUT);
            HealthClient::new(e.connect_lazy())
        })
        .collect();
    let mut in_balance = vec![true; endpoints.len()];
    let mut ticks = tokio::time::interval(BALANCE_HEALTH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if changes.is_closed() {
            return;
        }
        let serving = futures::future::join_all(probes.iter().map(|p| is_serving(p.clone()))).await;
        let want = if serving.iter().any(|s| *s) {
            serving
        } else {
            vec![true; endpoints.len()]
        };
        for (i, endpoint) in endpoints.iter().enumerate() {
            if want[i] == in_balance[i] {
                continue;
            }
            let change = if want[i] {
                tracing::info!(endpoint = %endpoint.uri(), "replica back in the balance");
                Change::Insert(i, endpoint.clone())
            } else {
                tracing::warn!(endpoint = %endpoint.uri(), "replica not SERVING: out of the balance");
                Change::Remove(i)
            };
            if changes.send(change).await.is_err() {
                return;
            }
            in_balance[i] = want[i];
        }
    }
}

/// True when the health service behind `client` answers "" SERVING within
/// [`BALANCE_HEALTH_TIMEOUT`].
async fn is_serving(mut client: tonic_health::pb::health_client::HealthClient<Channel>) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;

    let check = client.check(HealthCheckRequest::default());
    matches!(
        tokio::time::timeout(BALANCE_HEALTH_TIMEOUT, check)
            .await
            .map(|r| r.map(|r| r.into_inner().status())),
        Ok(Ok(ServingStatus::Serving))
    )
}

/// Asks the health service at `addr` whether "" is SERVING.
pub async fn probe(addr: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    probe_endpoint(endpoint).await
}

/// Asks the health service at `endpoint` (plaintext or TLS, see
/// [`client_endpoint`]) whether "" is SERVING.
pub async fn probe_endpoint(endpoint: Endpoint) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    matches!(
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status()),
        Ok(ServingStatus::Serving)
    )
}

/// True when at least one of `endpoints` (replicas of one service) answers
/// SERVING: the service is usable through a [`balanced_channel`].
pub async fn probe_any(endpoints: &[Endpoint]) -> bool {
    futures::future::join_all(endpoints.iter().cloned().map(probe_endpoint))
        .await
        .into_iter()
        .any(|serving| serving)
}
