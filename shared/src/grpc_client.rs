//! The client side of gRPC: endpoints in plaintext or TLS (the worker, the
//! CLI, health checks), and health probes asking the standard health
//! service whether a server is SERVING.

use std::path::Path;
use std::time::Duration;

use crate::config::GrpcClientTlsConfig;

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

/// Asks the health service at `addr` whether "" is SERVING.
pub async fn probe(addr: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    probe_endpoint(endpoint).await
}

/// Asks the health service at `endpoint` (plaintext or TLS, see
/// [`client_endpoint`]) whether "" is SERVING.
pub async fn probe_endpoint(endpoint: tonic::transport::Endpoint) -> bool {
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
