//! Which kinds stream workers serve, as they announce them in Redis (see
//! `keel_shared::queue`): the publisher and the relay add a job to its
//! kind's stream only while its kind is served, so streams hold no entries
//! nobody will read (jobs of other kinds wait in Postgres for ClaimJobs, or
//! fail at their schedule timeout). When a kind starts being served, its
//! jobs that were never published are handed to the relay at once.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use keel_shared::ApiError;
use keel_shared::config::RedisConfig;
use keel_shared::queue::SERVED_KIND_TTL;
use tokio_util::sync::CancellationToken;

use crate::error::JobsError;
use crate::store;

/// How often the served kinds are read again.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Longest one refresh may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// The kinds served by stream workers, as last read.
#[derive(Default)]
pub struct ServedKinds {
    kinds: RwLock<HashSet<String>>,
}

impl ServedKinds {
    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.read().expect("served kinds").contains(kind)
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.kinds
            .read()
            .expect("served kinds")
            .iter()
            .cloned()
            .collect()
    }

    /// Reads the kinds announced within [`SERVED_KIND_TTL`]; returns those
    /// that were not served before. On failure the last known set stays.
    pub async fn refresh(
        &self,
        redis: &keel_shared::redis::Pool,
        config: &RedisConfig,
    ) -> Result<Vec<String>, ApiError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let since = now_ms.saturating_sub(SERVED_KIND_TTL.as_millis() as u64);
        let read = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut conn = redis.get().await?;
            redis::cmd("ZRANGE")
                .arg(config.served_kinds())
                .arg(since)
                .arg("+inf")
                .arg("BYSCORE")
                .query_async::<Vec<String>>(&mut *conn)
                .await
                .map_err(ApiError::from)
        })
        .await
        .unwrap_or_else(|_| Err(ApiError::Unavailable("redis timed out".into())))?;
        let fresh: HashSet<String> = read.into_iter().collect();
        let mut kinds = self.kinds.write().expect("served kinds");
        let added = fresh.difference(&kinds).cloned().collect();
        *kinds = fresh;
        Ok(added)
    }
}

/// Keeps `kinds` fresh every [`REFRESH_EVERY`] until `shutdown`; a kind that
/// starts being served (or is served when this replica starts: the kind may
/// have appeared while no replica ran) has its unpublished jobs handed to
/// the relay.
pub(crate) async fn run_refresher(
    kinds: Arc<ServedKinds>,
    pool: Pool,
    redis: keel_shared::redis::Pool,
    config: RedisConfig,
    shutdown: CancellationToken,
) {
    let mut healthy = true;
    let mut added = kinds.snapshot();
    loop {
        for kind in added.drain(..) {
            if let Err(e) = hand_kind_to_relay(&pool, &kind).await {
                tracing::warn!(error = %e, %kind, "could not hand a newly served kind's jobs to the relay");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REFRESH_EVERY) => {}
        }
        match kinds.refresh(&redis, &config).await {
            Ok(new) => {
                healthy = true;
                added = new;
            }
            Err(e) => {
                if healthy {
                    tracing::warn!(error = %e, "cannot read the served kinds; keeping the last known");
                    healthy = false;
                }
            }
        }
    }
}

async fn hand_kind_to_relay(pool: &Pool, kind: &str) -> Result<(), JobsError> {
    let client = pool.get().await?;
    let handed = store::hand_kind_to_relay(&client, kind).await?;
    if handed > 0 {
        tracing::info!(%kind, jobs = handed, "a stream worker serves this kind now: publishing its waiting jobs");
    }
    Ok(())
}
