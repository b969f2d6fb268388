//! The retention job: finished jobs older than KEEL_JOBS_RETENTION_DAYS are
//! deleted with their history, in batches, by every replica in turn.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::JobsError;
use crate::store;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// 0: keep finished jobs forever (the loop does not run).
    pub days: u32,
    pub batch: i64,
    pub every: Duration,
}

/// Runs a round at start and then every `policy.every` until `shutdown`.
pub async fn run(pool: Pool, policy: Policy, shutdown: CancellationToken) {
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

/// The smallest v7 id of the millisecond `at`: every id created earlier
/// sorts below it (Postgres compares uuids bytewise).
pub fn v7_floor(at: DateTime<Utc>) -> Uuid {
    let ms = at.timestamp_millis().max(0) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6] = 0x70; // version 7
    bytes[8] = 0x80; // RFC 4122 variant
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_floor_separates_ids_by_creation_time() {
        let before = Utc::now();
        let id = Uuid::now_v7();
        let after = Utc::now();
        assert!(v7_floor(before - chrono::Duration::milliseconds(1)) < id);
        assert!(id < v7_floor(after + chrono::Duration::milliseconds(2)));
        let floor = v7_floor(before);
        assert_eq!(floor.get_version_num(), 7);
        assert_eq!(floor.get_variant(), uuid::Variant::RFC4122);
        // Byte order is time order, as Postgres compares them.
        assert!(floor.as_bytes() < v7_floor(after + chrono::Duration::days(1)).as_bytes());
    }
}
