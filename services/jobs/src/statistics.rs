//! Keeps the outbox's planner statistics up with bursts. A pooled
//! connection keeps the generic plan it made for a statement until the
//! table is next analyzed, and a plan made while the outbox was nearly empty
//! scans all of it once a burst fills it: a StartJob batch read 20,000
//! outbox rows to start 10 (test `plans::a_start_batch_*`). Autovacuum
//! analyzes at most once a minute, and never where it is off; this loop
//! analyzes the outbox as soon as it holds far more rows than its
//! statistics say, which also makes every connection plan its statements
//! again. Several replicas may each analyze once for the same burst.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::JobsError;
use crate::store;

/// How often the outbox's size is compared with its statistics.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Least time between two ANALYZEs from one replica: a burst that keeps
/// growing is analyzed again at this pace at most, and a database user that
/// may not analyze (Postgres skips it with a warning) is not retried often.
const MIN_BETWEEN: Duration = Duration::from_secs(30);

/// Checks every `every` until `shutdown`.
pub(crate) async fn run(pool: Pool, every: Duration, shutdown: CancellationToken) {
    let mut last: Option<Instant> = None;
    loop {
        if last.is_none_or(|at| at.elapsed() >= MIN_BETWEEN) {
            match analyze_if_outgrown(&pool).await {
                Ok(true) => {
                    last = Some(Instant::now());
                    tracing::info!("analyzed job_outbox: it had outgrown its statistics");
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "could not check the outbox's statistics"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn analyze_if_outgrown(pool: &Pool) -> Result<bool, JobsError> {
    let client = pool.get().await?;
    if !store::outbox_outgrew_statistics(&client).await? {
        return Ok(false);
    }
    store::analyze_outbox(&client).await?;
    Ok(true)
}
