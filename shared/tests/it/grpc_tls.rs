//! gRPC over TLS through a real server (`server::serve_tls`) with
//! certificates made here: a TLS client trusting the CA gets answers
//! (health and reflection), a plaintext client does not, mTLS refuses a
//! client without a certificate, and a rotated certificate is presented to
//! new connections while calls on an open one keep succeeding.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::pki::{TempDir, ca};
use keel_shared::config::GrpcClientTlsConfig;
use keel_shared::server_tls::TlsServer;
use keel_shared::testing;
use keel_shared::{grpc_client, server};
use rcgen::{CertificateParams, CertifiedIssuer, DnType, KeyPair, SerialNumber};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A leaf for `localhost` named `cn` with `serial`, signed by `issuer`:
/// (certificate PEM, key PEM).
fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, cn: &str, serial: u64) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.serial_number = Some(SerialNumber::from(serial));
    let cert = params.signed_by(&key, issuer).expect("leaf cert");
    (cert.pem(), key.serialize_pem())
}

/// CA, server cert/key files in `dir`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let ca = ca("Keel gRPC test CA");
        let pki = Self {
            ca_pem: ca.pem(),
            ca,
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        pki.write_server("server one", 1);
        pki
    }

    /// Replaces the server's files (key first, then certificate, as an
    /// operator copying files would).
    fn write_server(&self, cn: &str, serial: u64) {
        let (cert, key) = leaf(&self.ca, cn, serial);
        std::fs::write(&self.key, key).unwrap();
        std::fs::write(&self.cert, cert).unwrap();
    }
}

/// A TLS server with health (SERVING) and reflection on a free port.
async fn start(tls: TlsServer, shutdown: &CancellationToken) -> SocketAddr {
    let (health, health_service) = server::health(&["keel.test.v1.Thing"]).await;
    health.set(true).await;
    let (reflection_v1, reflection_v1alpha) = server::reflection(&[]);
    let router = server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let (listener, addr) = testing::listener().await;
    tokio::spawn(server::serve_tls(
        router,
        listener,
        tls,
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    addr
}

fn tls_endpoint(addr: SocketAddr, ca_pem: &str, identity: Option<Identity>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
}

async fn check(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status())
}

async fn list_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// The serial number of the certificate a fresh TLS connection is shown.
async fn presented_serial(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let (_, session) = tls.get_ref();
    let leaf = &session.peer_certificates().expect("peer certificates")[0];
    serial_of(leaf.as_ref())
}

/// The serial of a DER certificate (rcgen writes it as the first INTEGER of
/// the TBSCertificate after the version).
fn serial_of(der: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE (tbs) { [0] version, INTEGER serial, ... } }
    fn header(b: &[u8]) -> (usize, usize) {
        let len = b[1] as usize;
        if len < 0x80 {
            (2, len)
        } else {
            let n = len & 0x7f;
            let mut l = 0usize;
            for byte in &b[2..2 + n] {
                l = (l << 8) | *byte as usize;
            }
            (2 + n, l)
        }
    }
    let (h, _) = header(der);
    let tbs = &der[h..];
    let (h, _) = header(tbs);
    let mut rest = &tbs[h..];
    if rest[0] == 0xa0 {
        let (h, l) = header(rest);
        rest = &rest[h + l..];
    }
    assert_eq!(rest[0], 0x02, "serial INTEGER");
    let (h, l) = header(rest);
    rest[h..h + l].to_vec()
}

#[tokio::test]
async fn tls_server_answers_tls_clients_and_refuses_plaintext() {
    let dir = TempDir::new("basic");
    let pki = Pki::new(&dir.0);
    let shutdown = CancellationToken::new();
    let tls = TlsServer::new(&pki.cert, &pki.key, None).unwrap();
    let addr = start(tls, &shutdown).await;

    let channel = tls_endpoint(addr, &pki.ca_pem, None)
        .connect()
        .await
        .expect("TLS connect");
    assert_eq!(
        check(channel.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    let services = list_services(channel).await;
    assert!(
        services.iter().any(|s| s == "grpc.health.v1.Health"),
        "{services:?}"
    );

    // A plaintext client gets no answer.
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let refused = match plain.connect().await {
        Ok(channel) => check(channel).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plaintext client must not be answered");

    // What the worker and the CLI use: https:// with KEEL_TLS_CA_FILE.
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}", addr.port());
    let mut client_tls = GrpcClientTlsConfig::default();
    let missing = keel_shared::grpc_client::client_endpoint(&url, &client_tls).unwrap_err();
    assert!(missing.contains("KEEL_TLS_CA_FILE"), "{missing}");
    client_tls.tls_ca_file = Some(ca_file);
    let endpoint = keel_shared::grpc_client::client_endpoint(&url, &client_tls).unwrap();
    assert!(
        grpc_client::probe_endpoint(endpoint).await,
        "probe over TLS"
    );
    assert!(
        !grpc_client::probe(&addr.to_string()).await,
        "plaintext probe"
    );

    // A client trusting another CA refuses the server.
    let other = ca("Some other CA").pem();
    assert!(tls_endpoint(addr, &other, None).connect().await.is_err());
    shutdown.cancel();
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_client_ca() {
    let dir = TempDir::new("mtls");
    let pki = Pki::new(&dir.0);
    let client_ca = ca("Keel client CA");
    let client_ca_file = dir.0.join("client-ca.pem");
    std::fs::write(&client_ca_file, client_ca.pem()).unwrap();
    let shutdown = CancellationToken::new();
    let tls = TlsServer::new(&pki.cert, &pki.key, Some(&client_ca_file)).unwrap();
    let addr = start(tls, &shutdown).await;

    // Without a certificate: refused.
    let refused = match tls_endpoint(addr, &pki.ca_pem, None).connect().await {
        Ok(channel) => check(channel).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate must be refused");

    // With one signed by another CA (the server CA): refused.
    let (cert, key) = leaf(&pki.ca, "intruder", 7);
    let refused = match tls_endpoint(addr, &pki.ca_pem, Some(Identity::from_pem(cert, key)))
        .connect()
        .await
    {
        Ok(channel) => check(channel).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a certificate from another CA must be refused");

    // With one signed by the client CA: answered.
    let (cert, key) = leaf(&client_ca, "keel-worker", 8);
    let channel = tls_endpoint(addr, &pki.ca_pem, Some(Identity::from_pem(cert, key)))
        .connect()
        .await
        .expect("mTLS connect");
    assert_eq!(check(channel).await.unwrap(), ServingStatus::Serving);

    // The same through the clients' settings (KEEL_TLS_CLIENT_CERT_FILE/KEY).
    let (cert, key) = leaf(&client_ca, "keel-cli", 9);
    let write = |name: &str, body: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, body).unwrap();
        Some(path)
    };
    let url = format!("https://localhost:{}", addr.port());
    let mut client_tls = GrpcClientTlsConfig {
        tls_ca_file: write("ca.pem", &pki.ca_pem),
        ..Default::default()
    };
    let endpoint = keel_shared::grpc_client::client_endpoint(&url, &client_tls).unwrap();
    assert!(
        !grpc_client::probe_endpoint(endpoint).await,
        "no client certificate"
    );
    client_tls.tls_client_cert_file = write("client.pem", &cert);
    client_tls.tls_client_key_file = write("client.key", &key);
    let endpoint = keel_shared::grpc_client::client_endpoint(&url, &client_tls).unwrap();
    assert!(
        grpc_client::probe_endpoint(endpoint).await,
        "with a client certificate"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn rotated_certificate_reaches_new_connections_without_failing_open_ones() {
    let dir = TempDir::new("rotate");
    let pki = Pki::new(&dir.0);
    let shutdown = CancellationToken::new();
    let tls = TlsServer::new(&pki.cert, &pki.key, None).unwrap();
    tls.watch(Duration::from_millis(50), shutdown.clone());
    let addr = start(tls.clone(), &shutdown).await;
    assert_eq!(presented_serial(addr, &pki.ca_pem).await, vec![1]);

    // A loop of calls on one open connection.
    let channel = tls_endpoint(addr, &pki.ca_pem, None)
        .connect()
        .await
        .expect("TLS connect");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let calls = tokio::spawn({
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                match check(channel.clone()).await {
                    Ok(ServingStatus::Serving) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Rotate by replacing the files: the watcher notices the new mtimes.
    pki.write_server("server two", 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if presented_serial(addr, &pki.ca_pem).await == vec![2] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New connections work with the new certificate.
    let fresh = tls_endpoint(addr, &pki.ca_pem, None)
        .connect()
        .await
        .unwrap();
    assert_eq!(check(fresh).await.unwrap(), ServingStatus::Serving);

    // SIGHUP-style forced reload (same path as the signal) with a third one.
    pki.write_server("server three", 3);
    tls.reload().unwrap();
    assert_eq!(presented_serial(addr, &pki.ca_pem).await, vec![3]);

    // A broken pair is refused and the current certificate stays.
    std::fs::write(&pki.cert, "not a certificate").unwrap();
    assert!(tls.reload().is_err());
    assert_eq!(presented_serial(addr, &pki.ca_pem).await, vec![3]);

    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    calls.await.unwrap();
    assert!(ok.load(Ordering::Relaxed) > 10, "the loop ran");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call on the open connection failed"
    );
    shutdown.cancel();
}
