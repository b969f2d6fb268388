//! The Postgres pool: built once at start-up, with a bounded wait for the server.

use std::str::FromStr;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::StartupError;
use crate::config::DatabaseConfig;

/// Builds the pool and waits (up to the configured timeout) until one
/// connection succeeds, so a wrong URL or a down server fails start-up with a
/// message naming host and port.
pub async fn connect(cfg: &DatabaseConfig) -> Result<Pool, StartupError> {
    let url = cfg.url()?;
    let pg = tokio_postgres::Config::from_str(url).map_err(|e| StartupError::InvalidVar {
        var: "DATABASE_URL",
        reason: e.to_string(),
    })?;
    let target = describe_target(&pg);
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(cfg.db_pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StartupError::InvalidVar {
            var: "DATABASE_URL",
            reason: e.to_string(),
        })?;

    let deadline = Instant::now() + cfg.connect_timeout();
    let mut backoff = Duration::from_millis(100);
    loop {
        match pool.get().await {
            Ok(_) => return Ok(pool),
            Err(e) if Instant::now() + backoff < deadline => {
                tracing::warn!(target = %target, error = %e, "Postgres not reachable yet, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(StartupError::PostgresUnreachable {
                    target,
                    waited: cfg.connect_timeout(),
                    cause: crate::error::source_chain(&e),
                });
            }
        }
    }
}

/// `host:port/dbname` (or the socket path) for messages; never the password.
fn describe_target(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

/// `url` with its database name replaced (for tools that create databases).
pub fn with_dbname(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}
