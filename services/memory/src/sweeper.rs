//! The background loop that deletes expired memories from storage in bounded
//! batches. Readers never depend on it: every read filters expired memories
//! out at once; this only reclaims their rows (and their history).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::SweepConfig;
use crate::store::Store;

/// Sweeps until `shutdown`: batch after batch while full batches come back,
/// then a pause of the configured interval.
pub async fn run(store: Store, config: SweepConfig, shutdown: CancellationToken) {
    loop {
        let pause = match store.sweep_expired(config.sweep_batch).await {
            Ok(deleted) if deleted as i64 >= config.sweep_batch => {
                tracing::debug!(deleted, "swept expired memories; more left");
                Duration::ZERO
            }
            Ok(deleted) => {
                if deleted > 0 {
                    tracing::debug!(deleted, "swept expired memories");
                }
                config.interval()
            }
            Err(e) => {
                tracing::warn!(error = %e, "expired-memory sweep failed; retrying later");
                config.interval()
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
