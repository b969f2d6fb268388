//! The Redis pool. Redis is not needed to start: it may be down at start-up and
//! callers treat its errors as UNAVAILABLE, so building the pool never waits.

use deadpool_redis::{Config, Pool, Runtime};

use crate::StartupError;
use crate::config::RedisConfig;

pub fn pool(cfg: &RedisConfig) -> Result<Pool, StartupError> {
    let mut config = Config::from_url(cfg.redis_url.clone());
    config.pool = Some(deadpool_redis::PoolConfig {
        max_size: cfg.redis_pool_size.max(1),
        timeouts: deadpool_redis::Timeouts {
            wait: Some(std::time::Duration::from_secs(5)),
            create: Some(std::time::Duration::from_secs(2)),
            recycle: Some(std::time::Duration::from_secs(2)),
        },
        ..Default::default()
    });
    config
        .create_pool(Some(Runtime::Tokio1))
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
