//! The retention job: finished jobs older than KEEL_JOBS_RETENTION_DAYS are
//! deleted with their history, in batches, by every replica in turn.

use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::error::JobsError;
use crate::store;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// 0: keep finished jobs forever (the loop does not run).
    pub days: u32,
    pub batch: i64,
    pub every: Duration,
}

/// Runs a round at start and then every `policy.every` until `shutdown`.
pub(crate) async fn run(pool: Pool, policy: Policy, shutdown: CancellationToken) {
    if policy.days == 0 {
        return;
    }
    loop {
        match round(&pool, policy, &shutdown).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, days = policy.days, "deleted finished jobs"),
            Err(e) => tracing::warn!(error = %e, "retention round failed; will retry"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(policy.every) => {}
        }
    }
}

/// Deletes batch after batch until one comes back short; returns the total.
async fn round(
    pool: &Pool,
    policy: Policy,
    shutdown: &CancellationToken,
) -> Result<u64, JobsError> {
    let cutoff = Utc::now() - chrono::Duration::days(i64::from(policy.days));
    let mut total = 0;
    loop {
        let client = pool.get().await?;
        let deleted = store::delete_finished_before(&client, cutoff, policy.batch).await?;
        drop(client);
        keel_shared::metrics::retention_deleted(deleted);
        total += deleted;
        if deleted < policy.batch as u64 || shutdown.is_cancelled() {
            return Ok(total);
        }
    }
}
