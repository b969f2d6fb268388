//! TLS for the gRPC listener: a rustls server config whose certificate is
//! re-read on SIGHUP and when the files change (new handshakes get the new
//! certificate, open connections keep theirs), optionally requiring client
//! certificates (mTLS). Handshakes run off the accept loop.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::StartupError;
use crate::config::GrpcTlsConfig;

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the certificate files' modification times are checked.
pub const DEFAULT_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The server side of gRPC TLS: what [`crate::server::serve_tls`] accepts with.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    certs: Arc<ReloadingCert>,
}

impl TlsServer {
    /// The TLS server `config` asks for, or `None` (plaintext) when unset.
    pub fn from_config(config: &GrpcTlsConfig) -> Result<Option<Self>, StartupError> {
        match (&config.tls_cert_file, &config.tls_key_file) {
            (None, None) if config.tls_client_ca_file.is_none() => Ok(None),
            (Some(cert), Some(key)) => Self::new(cert, key, config.tls_client_ca_file.as_deref())
                .map(Some)
                .map_err(|reason| StartupError::InvalidVar {
                    var: "KEEL_TLS_CERT_FILE",
                    reason,
                }),
            (None, _) => Err(StartupError::MissingVar("KEEL_TLS_CERT_FILE")),
            (Some(_), None) => Err(StartupError::MissingVar("KEEL_TLS_KEY_FILE")),
        }
    }

    /// Serves `cert`/`key`; with `client_ca`, requires client certificates
    /// signed by it.
    pub fn new(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = Arc::new(ReloadingCert::load(cert, key)?);
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match client_ca {
            Some(ca) => {
                let roots = crate::tls::roots(Some(ca))?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("client CA file {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            certs,
        })
    }

    /// Re-reads the certificate and key now; on failure the current ones stay.
    pub fn reload(&self) -> Result<(), String> {
        self.certs.reload()
    }

    /// Re-reads the certificate on SIGHUP and whenever the files' modification
    /// times change (checked every `every`), until `shutdown`.
    pub fn watch(&self, every: Duration, shutdown: CancellationToken) {
        let certs = self.certs.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                let forced = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => false,
                    _ = hangup => true,
                };
                if forced || certs.changed() {
                    match certs.reload() {
                        Ok(()) => tracing::info!(
                            cert = %certs.cert.display(),
                            "gRPC TLS certificate reloaded"
                        ),
                        Err(e) => tracing::warn!(
                            error = %e,
                            "gRPC TLS certificate not reloaded; keeping the current one"
                        ),
                    }
                }
            }
        });
    }

    /// TLS connections from `listener` until `shutdown`: each handshake runs
    /// on its own task, so a slow client does not hold up the others.
    pub(crate) fn incoming(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = TlsAcceptor::from(self.config.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Usually out of file descriptors: back off a little.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// The current certificate and key, swapped in place when re-read.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamps: Mutex<Option<(SystemTime, SystemTime)>>,
}

impl ReloadingCert {
    fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let stamps = stamps(cert, key);
        let current = load_certified_key(cert, key)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(current)),
            stamps: Mutex::new(stamps),
        })
    }

    fn changed(&self) -> bool {
        let now = stamps(&self.cert, &self.key);
        now.is_some() && *self.stamps.lock().expect("stamps lock") != now
    }

    fn reload(&self) -> Result<(), String> {
        let stamps = stamps(&self.cert, &self.key);
        // Remember the stamps even on failure, so a broken pair is reported
        // once, not every check (a later write changes them again).
        *self.stamps.lock().expect("stamps lock") = stamps;
        let fresh = load_certified_key(&self.cert, &self.key)?;
        *self.current.write().expect("cert lock") = Arc::new(fresh);
        Ok(())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("cert lock").clone())
    }
}

fn stamps(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate file {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file {} is not PEM: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate file {} holds no certificate",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, private, &provider).map_err(|e| {
        format!(
            "certificate {} and key {} do not go together: {e}",
            cert.display(),
            key.display()
        )
    })
}
