//! Liveness: `GET /healthz` answers 200 while the console serves, and
//! `keel-console healthcheck [ADDR]` asks it (compose's health check, a
//! Kubernetes exec probe). It says nothing of the services behind: a page
//! whose service is down says so itself.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where `keel-console healthcheck` looks without an ADDR.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
/// Longest the whole probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// `GET /healthz`.
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// Whether the console at `addr` (host:port) answers `GET /healthz` with 200.
pub async fn probe(addr: &str) -> bool {
    let ask = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, ask).await,
        Ok(Some(true))
    )
}
