//! The Redis pool. Redis is not needed to start: it may be down at start-up and
//! callers treat its errors as UNAVAILABLE, so building the pool never waits.
//! `rediss://` URLs connect over TLS (rustls), trusting the CA(s) in
//! `KEEL_REDIS_CA_FILE` when set, the system's roots otherwise.

use deadpool_redis::{Manager, Pool, Runtime};

use crate::StartupError;
use crate::config::RedisConfig;

/// A client for `cfg`'s URL, with its CA file when one is set. Every Redis
/// connection (pool, pub/sub, stream readers) is made from one of these.
pub fn client(cfg: &RedisConfig) -> Result<redis::Client, StartupError> {
    let url = cfg.redis_url.as_str();
    // redis-rs builds its rustls config from the process's default crypto
    // provider; name ours (ring) so that another crate enabling a second
    // provider in rustls cannot leave it without one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let invalid = |var: &'static str, reason: String| StartupError::InvalidVar { var, reason };
    let Some(ca_file) = cfg.redis_ca_file.as_deref() else {
        return redis::Client::open(url).map_err(|e| invalid("REDIS_URL", e.to_string()));
    };
    if !(url.starts_with("rediss://") || url.starts_with("valkeys://")) {
        return Err(invalid(
            "KEEL_REDIS_CA_FILE",
            "set, but REDIS_URL is not a rediss:// URL".into(),
        ));
    }
    let pem = std::fs::read(ca_file).map_err(|e| {
        invalid(
            "KEEL_REDIS_CA_FILE",
            format!("cannot read {}: {e}", ca_file.display()),
        )
    })?;
    // Fails early on a file holding no certificate, which redis-rs would
    // only notice when connecting.
    crate::tls::roots(Some(ca_file)).map_err(|reason| invalid("KEEL_REDIS_CA_FILE", reason))?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(|e| invalid("REDIS_URL", e.to_string()))
}

pub fn pool(cfg: &RedisConfig) -> Result<Pool, StartupError> {
    let info = client(cfg)?.get_connection_info().clone();
    let manager = Manager::new(info).map_err(|e| StartupError::InvalidVar {
        var: "REDIS_URL",
        reason: e.to_string(),
    })?;
    Pool::builder(manager)
        .max_size(cfg.redis_pool_size.max(1))
        .wait_timeout(Some(std::time::Duration::from_secs(5)))
        .create_timeout(Some(std::time::Duration::from_secs(2)))
        .recycle_timeout(Some(std::time::Duration::from_secs(2)))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StartupError::InvalidVar {
            var: "REDIS_URL",
            reason: e.to_string(),
        })
}

/// True when Redis answers PING.
pub async fn ping(pool: &Pool) -> bool {
    let Ok(mut conn) = pool.get().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut *conn)
        .await
        .is_ok()
}

/// `XGROUP CREATE <stream> workers 0 MKSTREAM`: the job stream's consumer
/// group, reading from the stream's start (entries added before any worker
/// read them are delivered too); an existing group is fine.
pub async fn ensure_group(
    conn: &mut impl redis::aio::ConnectionLike,
    stream: &str,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(crate::queue::CONSUMER_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Records `kinds` as served by a stream worker as of now: `ZADD
/// <prefix>:jobs:kinds <now ms> <kind>...` (see [`crate::queue`]).
pub async fn announce_kinds(
    conn: &mut impl redis::aio::ConnectionLike,
    config: &crate::config::RedisConfig,
    kinds: &[impl AsRef<str>],
) -> redis::RedisResult<()> {
    if kinds.is_empty() {
        return Ok(());
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut cmd = redis::cmd("ZADD");
    cmd.arg(config.served_kinds());
    for kind in kinds {
        cmd.arg(now_ms).arg(kind.as_ref());
    }
    cmd.query_async::<u64>(conn).await.map(drop)
}
