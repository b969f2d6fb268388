//! Keeps the planner statistics of `jobs` and `job_outbox` up with bursts.
//! A pooled connection keeps the generic plan it made for a statement until
//! the table is next analyzed, and a plan made while a table was nearly
//! empty scans all of it once a burst fills it: a StartJob batch read 20,000
//! outbox rows to start 10 (test `plans::a_start_batch_*`), and in a new
//! database every StartJob and CompleteJob batch scanned the whole `jobs`
//! table (BENCHMARKS.md, "half load is not half the CPU"). Autovacuum
//! analyzes at most once a minute, and never where it is off; this loop
//! analyzes a table as soon as it holds far more rows than its statistics
//! say, which also makes every connection plan its statements on it again.
//! Several replicas may each analyze once for the same burst.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::JobsError;
use crate::store::{self, Analyzed};

/// How often each table's size is compared with its statistics.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Least time between two ANALYZEs of one table from one replica: a burst
/// that keeps growing is analyzed again at this pace at most, and a
/// database user that may not analyze (Postgres skips it with a warning) is
/// not retried often.
const MIN_BETWEEN: Duration = Duration::from_secs(30);

/// Checks every `every` until `shutdown`.
pub(crate) async fn run(pool: Pool, every: Duration, shutdown: CancellationToken) {
    let mut last: [Option<Instant>; Analyzed::ALL.len()] = [None; Analyzed::ALL.len()];
    loop {
        for (table, last) in Analyzed::ALL.into_iter().zip(&mut last) {
            if last.is_some_and(|at| at.elapsed() < MIN_BETWEEN) {
                continue;
            }
            match analyze_if_outgrown(&pool, table).await {
                Ok(true) => {
                    *last = Some(Instant::now());
                    tracing::info!(
                        table = table.name(),
                        "analyzed: the table had outgrown its statistics"
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, table = table.name(),
                    "could not check the table's statistics"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn analyze_if_outgrown(pool: &Pool, table: Analyzed) -> Result<bool, JobsError> {
    let client = pool.get().await?;
    if !store::outgrew_statistics(&client, table).await? {
        return Ok(false);
    }
    store::analyze(&client, table).await?;
    Ok(true)
}
