//! The SQL of flow control (see `crate::flow`): per-kind advisory locks,
//! running counts and token buckets, all inside the start's transaction.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::error::JobsError;

/// Advisory lock class of a kind's starts (the key is the kind's hash).
const START_LOCK_CLASS: i32 = 21;

/// The kinds of those of `ids` that are queued and due (a start could apply).
/// Found by id alone, their state checked after (see the store's module doc
/// on stale statistics).
pub async fn startable_kinds(
    client: &impl GenericClient,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, String>, JobsError> {
    const SQL: &str = "WITH found AS MATERIALIZED (
                           SELECT id, kind, status, run_at FROM jobs WHERE id = ANY($1)
                       )
                       SELECT id, kind FROM found WHERE status = 'queued' AND run_at <= now()";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .query(&stmt, &[&ids])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Takes each kind's start lock until the transaction ends, in sorted
/// order (so two transactions locking several kinds cannot deadlock).
/// Every start of a limited kind takes it before counting, so the count
/// and the start are one step across all replicas.
pub async fn lock_kinds(client: &impl GenericClient, kinds: &[&str]) -> Result<(), JobsError> {
    const SQL: &str = "SELECT count(pg_advisory_xact_lock($1, hashtext(k)))
                       FROM unnest($2::text[]) AS k";
    let mut sorted = kinds.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let stmt = client.prepare_cached(SQL).await?;
    client
        .query_one(&stmt, &[&START_LOCK_CLASS, &sorted])
        .await?;
    Ok(())
}

/// How many jobs of each of `kinds` are running (kinds with none are absent).
pub async fn running_counts(
    client: &impl GenericClient,
    kinds: &[&str],
) -> Result<HashMap<String, i64>, JobsError> {
    const SQL: &str = "SELECT kind, count(*) FROM jobs
                       WHERE status = 'running' AND kind = ANY($1)
                       GROUP BY kind";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .query(&stmt, &[&kinds])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// A kind's token bucket parameters.
#[derive(Debug, Clone, Copy)]
pub struct Bucket<'a> {
    pub kind: &'a str,
    pub per_second: f64,
    pub burst: f64,
}

/// Refills the buckets of these kinds (rate x time since the last refill,
/// capped at the burst; a new bucket starts full) and returns each one's
/// tokens. Call with the kinds' start locks held.
pub async fn refill_buckets(
    client: &impl GenericClient,
    buckets: &[Bucket<'_>],
) -> Result<HashMap<String, f64>, JobsError> {
    const SQL: &str = "WITH input AS (
            SELECT * FROM unnest($1::text[], $2::float8[], $3::float8[]) AS t(k, rate, burst)
         ), up AS (
            UPDATE kind_rate_buckets b
            SET tokens = least(i.burst, b.tokens + i.rate * greatest(0,
                             extract(epoch FROM clock_timestamp() - b.refilled_at)::float8)),
                refilled_at = clock_timestamp()
            FROM input i WHERE b.kind = i.k
            RETURNING b.kind, b.tokens
         ), ins AS (
            INSERT INTO kind_rate_buckets (kind, tokens, refilled_at)
            SELECT k, burst, clock_timestamp() FROM input
            WHERE k NOT IN (SELECT kind FROM kind_rate_buckets)
            ON CONFLICT (kind) DO NOTHING
            RETURNING kind, tokens
         )
         SELECT kind, tokens FROM up UNION ALL SELECT kind, tokens FROM ins";
    let kinds: Vec<&str> = buckets.iter().map(|b| b.kind).collect();
    let rates: Vec<f64> = buckets.iter().map(|b| b.per_second).collect();
    let bursts: Vec<f64> = buckets.iter().map(|b| b.burst).collect();
    let stmt = client.prepare_cached(SQL).await?;
    client
        .query(&stmt, &[&kinds, &rates, &bursts])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// Takes `taken` tokens from each kind's bucket (the starts that happened).
pub async fn take_tokens(
    client: &impl GenericClient,
    taken: &[(&str, f64)],
) -> Result<(), JobsError> {
    const SQL: &str = "UPDATE kind_rate_buckets b SET tokens = b.tokens - t.n
                       FROM unnest($1::text[], $2::float8[]) AS t(k, n)
                       WHERE b.kind = t.k";
    if taken.is_empty() {
        return Ok(());
    }
    let (kinds, counts): (Vec<&str>, Vec<f64>) = taken.iter().copied().unzip();
    let stmt = client.prepare_cached(SQL).await?;
    client.execute(&stmt, &[&kinds, &counts]).await?;
    Ok(())
}
