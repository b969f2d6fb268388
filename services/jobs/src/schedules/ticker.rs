//! The schedule ticker: every jobs replica runs one. Each round fires the due
//! ticks (see [`Schedules::fire_due`]); replicas share the work through row
//! locks, so each tick creates exactly one job however many run.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::service::Schedules;

/// Most ticks fired in one transaction; a full batch is followed at once by
/// another.
pub(crate) const BATCH: i64 = 100;

/// Each round waits `every` first (so the first is one interval after
/// start-up), then fires what is due, batch after batch while batches are full.
pub(crate) async fn run(schedules: Arc<Schedules>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        loop {
            match schedules.fire_due(BATCH).await {
                Ok(n) if n as i64 >= BATCH && !shutdown.is_cancelled() => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "schedule ticker round failed; will retry");
                    break;
                }
            }
        }
    }
}
