//! The admin API's own SQL at the jobs server: jobs of every user, the queue
//! figures, workers and the audit trail. Listing and changing jobs reuse
//! the jobs store.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::workers::Sighting;
use crate::error::JobsError;

/// One kind's queue now.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct KindNow {
    pub queued: i64,
    pub due: i64,
    pub running: i64,
    /// Seconds the oldest due job has waited past its run_at.
    pub oldest_due_secs: Option<f64>,
}

/// Per kind, the queued (due or not) and running jobs, and when read.
pub(crate) async fn queue_now(
    client: &impl GenericClient,
) -> Result<(Vec<(String, KindNow)>, DateTime<Utc>), JobsError> {
    const SQL: &str = "SELECT kind,
              count(*) FILTER (WHERE status = 'queued') AS queued,
              count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS due,
              count(*) FILTER (WHERE status = 'running') AS running,
              extract(epoch FROM now() - min(run_at)
                  FILTER (WHERE status = 'queued' AND run_at <= now()))::float8 AS oldest_due,
              now() AS as_of
         FROM jobs WHERE status IN ('queued', 'running')
         GROUP BY kind";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client.query(&stmt, &[]).await?;
    let mut as_of = None;
    let kinds = rows
        .iter()
        .map(|r| {
            as_of = Some(r.get("as_of"));
            (
                r.get("kind"),
                KindNow {
                    queued: r.get("queued"),
                    due: r.get("due"),
                    running: r.get("running"),
                    oldest_due_secs: r.get("oldest_due"),
                },
            )
        })
        .collect();
    let as_of = match as_of {
        Some(at) => at,
        None => {
            let stmt = client.prepare_cached("SELECT now()").await?;
            client.query_one(&stmt, &[]).await?.get(0)
        }
    };
    Ok((kinds, as_of))
}

/// One kind's starts and finishes in one minute of the last hour.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MinuteCounts {
    pub kind: String,
    /// 0 is the oldest minute, 59 the current one.
    pub minute: usize,
    pub started: i64,
    pub finished: i64,
    pub failed: i64,
}

/// Attempts started and jobs finished per kind per minute over the 60
/// minutes ending with the current one, from the history (job_events'
/// BRIN index on `at`). A finish is an event leaving the job SUCCEEDED,
/// FAILED or CANCELLED.
pub(crate) async fn last_hour(client: &impl GenericClient) -> Result<Vec<MinuteCounts>, JobsError> {
    const SQL: &str = "WITH w AS (SELECT date_trunc('minute', now()) - interval '59 minutes' AS start)
         SELECT j.kind,
                floor(extract(epoch FROM e.at - w.start) / 60)::int AS minute,
                count(*) FILTER (WHERE e.event = 'started') AS started,
                count(*) FILTER (WHERE e.status IN ('succeeded', 'failed', 'cancelled')) AS finished,
                count(*) FILTER (WHERE e.status = 'failed') AS failed
           FROM w, job_events e JOIN jobs j ON j.id = e.job_id
          WHERE e.at >= w.start
            AND (e.event = 'started' OR e.status IN ('succeeded', 'failed', 'cancelled'))
          GROUP BY 1, 2";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client.query(&stmt, &[]).await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let minute: i32 = r.get("minute");
            // An event stamped a moment after `now()` (another transaction's clock) is
            // counted in the current minute.
            let minute = usize::try_from(minute).ok()?.min(59);
            Some(MinuteCounts {
                kind: r.get("kind"),
                minute,
                started: r.get("started"),
                finished: r.get("finished"),
                failed: r.get("failed"),
            })
        })
        .collect())
}

/// One admin action as recorded.
#[derive(Debug, Clone)]
pub(crate) struct AuditRow {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub admin_user_id: Uuid,
    pub admin_email: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

/// A page of the audit trail, newest first, strictly after the cursor `(at, id)`.
pub(crate) async fn audit_events(
    client: &impl GenericClient,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<AuditRow>, JobsError> {
    const SQL: &str = "SELECT id, at, admin_user_id, admin_email, action, target, detail
         FROM admin_audit
         WHERE $1::timestamptz IS NULL OR (at, id) < ($1, $2)
         ORDER BY at DESC, id DESC
         LIMIT $3";
    let stmt = client.prepare_cached(SQL).await?;
    let (at, id) = before.unzip();
    let rows = client.query(&stmt, &[&at, &id, &limit]).await?;
    Ok(rows
        .iter()
        .map(|r| AuditRow {
            id: r.get("id"),
            at: r.get("at"),
            admin_user_id: r.get("admin_user_id"),
            admin_email: r.get("admin_email"),
            action: r.get("action"),
            target: r.get("target"),
            detail: r.get("detail"),
        })
        .collect())
}

/// A worker as last seen.
#[derive(Debug, Clone)]
pub(crate) struct WorkerRow {
    pub worker_id: String,
    pub kinds: Vec<String>,
    pub concurrency: i32,
    pub last_seen_at: DateTime<Utc>,
    pub running_jobs: i64,
}

/// Workers seen since `since`, most recently seen first, each with the jobs
/// RUNNING under its id.
pub(crate) async fn workers(
    client: &impl GenericClient,
    since: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<WorkerRow>, JobsError> {
    const SQL: &str = "WITH w AS (
            SELECT worker_id, kinds, concurrency, last_seen_at FROM workers
             WHERE last_seen_at >= $1 ORDER BY last_seen_at DESC LIMIT $2
         ), r AS (
            SELECT worker_id, count(*) AS running FROM jobs
             WHERE status = 'running' AND worker_id IN (SELECT worker_id FROM w)
             GROUP BY worker_id
         )
         SELECT w.*, coalesce(r.running, 0) AS running
           FROM w LEFT JOIN r USING (worker_id)
          ORDER BY w.last_seen_at DESC, w.worker_id";
    let stmt = client.prepare_cached(SQL).await?;
    let rows = client.query(&stmt, &[&since, &limit]).await?;
    Ok(rows
        .iter()
        .map(|r| WorkerRow {
            worker_id: r.get("worker_id"),
            kinds: r.get("kinds"),
            concurrency: r.get("concurrency"),
            last_seen_at: r.get("last_seen_at"),
            running_jobs: r.get("running"),
        })
        .collect())
}

/// Records that workers were seen now, with what they said of themselves.
pub(crate) async fn saw_workers(
    client: &impl GenericClient,
    seen: &[Sighting],
) -> Result<(), JobsError> {
    const SQL: &str = "INSERT INTO workers (worker_id, kinds, concurrency, last_seen_at)
         VALUES ($1, $2, coalesce($4, 0), now())
         ON CONFLICT (worker_id) DO UPDATE
             SET kinds = CASE WHEN $3 THEN $2
                              ELSE ARRAY(SELECT DISTINCT k FROM unnest(workers.kinds || $2) AS k
                                         ORDER BY k) END,
                 concurrency = coalesce($4, workers.concurrency),
                 last_seen_at = now()";
    let stmt = client.prepare_cached(SQL).await?;
    for s in seen {
        client
            .execute(
                &stmt,
                &[&s.worker_id, &s.kinds, &s.all_kinds, &s.concurrency],
            )
            .await?;
    }
    Ok(())
}

/// Deletes workers not seen for `secs`.
pub(crate) async fn forget_workers(
    client: &impl GenericClient,
    secs: f64,
) -> Result<u64, JobsError> {
    let stmt = client
        .prepare_cached(
            "DELETE FROM workers WHERE last_seen_at < now() - make_interval(secs => $1)",
        )
        .await?;
    Ok(client.execute(&stmt, &[&secs]).await?)
}
