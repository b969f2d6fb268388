//! Every SQL statement of the jobs service. Each transition is one statement:
//! a conditional UPDATE on (id, status, attempt) plus, in the same statement,
//! its history row and (when it re-queues) its outbox row. Starts and
//! completions take a batch of jobs per statement.
//!
//! # Plans that hold while statistics are stale
//!
//! A burst of jobs changes `jobs` and `job_outbox` faster than autovacuum
//! re-analyzes them (at most once a minute per database), and a pooled
//! connection keeps the generic plan it made for a statement until then.
//! Statistics taken while no job was queued make every partial index on
//! `status = 'queued'` look empty, so a statement that names a job's id *and*
//! its status was planned as a scan of that index filtered by id: one StartJob
//! batch read every queued job (30 ms a batch with 35,000 queued, measured in
//! BENCHMARKS.md). So the hot statements find rows by id alone, on the primary
//! key, and check the state on the row they locked; and they take their ids
//! as an array (`= ANY`), never as `IN (subquery)`, which was planned as a
//! scan of the whole table sized by stale statistics. The outbox's
//! bookkeeping (relay rounds, marks) goes further: its statements are
//! planned afresh each time ([`begin_outbox_bookkeeping`]), since a plan
//! made while the outbox was empty scans all of it once a burst arrives.
//! And the service analyzes `jobs` and the outbox as soon as either outgrows
//! its statistics (`statistics.rs`), which re-plans the statements on it: a
//! plan made while a table was nearly empty (a new database) scans it whole,
//! whatever the statement names.
//!
//! The reapers look for expired rows by a deadline alone, never by status:
//! each deadline is set only while the job is in the state it bounds
//! (`schedule_deadline` while queued; `lease_expires_at` and
//! `attempt_deadline` while running), and is indexed `WHERE ... IS NOT
//! NULL`, an index no other statement's status condition can stand in for.
//! Every transition out of a state clears its deadlines.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use keel_shared::ApiError;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::domain::{self, JobState, NewJob};
use crate::error::JobsError;

pub mod fairness;
pub mod flow;

macro_rules! job_cols {
    () => {
        "id, user_id, kind, payload, status, priority, attempt, max_attempts, output, error, \
         run_at, created_at, updated_at, started_at, finished_at, cancel_requested, \
         lease_expires_at, worker_id, version, progress, attempt_deadline, schedule_id, \
         extract(epoch FROM attempt_timeout)::float8 AS attempt_timeout_secs"
    };
}

/// A CTE `locked`: the jobs matching `$ids` (an id condition) locked by
/// their id alone, with the state a transition checks on the locked row
/// (see "Plans that hold while statistics are stale" above). Batches lock in
/// id order (`locked_by_id!("id = ANY($1) ORDER BY id")`), so concurrent
/// batches cannot deadlock.
macro_rules! locked_by_id {
    ($ids:literal) => {
        concat!(
            "locked AS MATERIALIZED (
            SELECT id AS locked_id, status AS locked_status, attempt AS locked_attempt,
                   run_at AS locked_run_at, attempt_deadline AS locked_deadline,
                   worker_id AS locked_worker, delivery_id AS locked_delivery
            FROM jobs WHERE ",
            $ids,
            "
            FOR NO KEY UPDATE
         )"
        )
    };
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub kind: String,
    pub payload: serde_json::Value,
    pub status: JobState,
    pub priority: i32,
    pub attempt: i32,
    pub max_attempts: i32,
    pub output: Option<serde_json::Value>,
    pub error: String,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub worker_id: Option<String>,
    /// Grows by one on every transition (and progress report).
    pub version: i64,
    /// The running attempt's latest reported progress.
    pub progress: Option<serde_json::Value>,
    /// When the running attempt times out (its job's timeout after it
    /// started); None: no timeout. Stale once the job is no longer running.
    pub attempt_deadline: Option<DateTime<Utc>>,
    /// How long one attempt may run; None: no limit.
    pub attempt_timeout: Option<Duration>,
    /// The schedule whose tick created the job, if one did.
    pub schedule_id: Option<Uuid>,
}

impl TryFrom<&Row> for JobRow {
    type Error = JobsError;

    fn try_from(row: &Row) -> Result<Self, JobsError> {
        let status: String = row.try_get("status")?;
        Ok(Self {
            id: row.try_get("id")?,
            user_id: row.try_get("user_id")?,
            kind: row.try_get("kind")?,
            payload: row.try_get("payload")?,
            status: JobState::parse(&status).ok_or_else(|| {
                JobsError::Api(ApiError::Internal(format!(
                    "unknown job status {status:?} in the database"
                )))
            })?,
            priority: row.try_get("priority")?,
            attempt: row.try_get("attempt")?,
            max_attempts: row.try_get("max_attempts")?,
            output: row.try_get("output")?,
            error: row.try_get("error")?,
            run_at: row.try_get("run_at")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            cancel_requested: row.try_get("cancel_requested")?,
            lease_expires_at: row.try_get("lease_expires_at")?,
            worker_id: row.try_get("worker_id")?,
            version: row.try_get("version")?,
            progress: row.try_get("progress")?,
            attempt_deadline: row.try_get("attempt_deadline")?,
            attempt_timeout: row
                .try_get::<_, Option<f64>>("attempt_timeout_secs")?
                .map(Duration::from_secs_f64),
            schedule_id: row.try_get("schedule_id")?,
        })
    }
}

fn rows(rows: &[Row]) -> Result<Vec<JobRow>, JobsError> {
    rows.iter().map(JobRow::try_from).collect()
}

fn opt_row(row: Option<Row>) -> Result<Option<JobRow>, JobsError> {
    row.as_ref().map(JobRow::try_from).transpose()
}

/// A job to insert: its id, owner, request, how long it may wait for a worker
/// and the trace context of the call that created it (handed on to workers).
#[derive(Debug, Clone, Copy)]
pub struct NewRow<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub job: &'a NewJob,
    pub schedule_timeout: Duration,
    pub traceparent: Option<&'a str>,
}

/// Inserts `rows` in one statement: all or nothing. Returns the inserted jobs;
/// rows whose idempotency key already exists for their user (or earlier in
/// `rows`) are skipped (see [`jobs_by_keys`]). Each job gets an outbox row,
/// due at its `run_at`; a job due now is left to the caller to publish at
/// once, and to the relay only if it has not started after `publish_grace`.
pub async fn insert_jobs(
    client: &impl GenericClient,
    rows: &[NewRow<'_>],
    publish_grace: Duration,
) -> Result<Vec<JobRow>, JobsError> {
    // Keyed rows go in (user, key) order, so two statements inserting the
    // same keys wait for each other instead of deadlocking.
    const SQL: &str = concat!(
        "WITH input AS (
            SELECT *, make_interval(secs => timeout_secs) AS timeout,
                   greatest(coalesce(run_at, now()), now()) AS due_at
            FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::int4[],
                        $6::int4[], $7::timestamptz[], $8::text[], $9::text[], $11::float8[],
                        $12::float8[])
                   WITH ORDINALITY AS t(id, user_id, kind, payload, priority, max_attempts, run_at,
                                        idempotency_key, traceparent, timeout_secs,
                                        attempt_timeout_secs, ord)
         ), ins AS (
            INSERT INTO jobs (id, user_id, kind, payload, priority, max_attempts, run_at,
                              idempotency_key, traceparent, schedule_timeout, schedule_deadline,
                              attempt_timeout)
            SELECT id, user_id, kind, payload, priority, max_attempts, due_at,
                   idempotency_key, traceparent, timeout, due_at + timeout,
                   make_interval(secs => attempt_timeout_secs)
            FROM input ORDER BY user_id, idempotency_key, ord
            ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt)
            SELECT id, 'created', status, attempt FROM ins
         ), ob AS (
            INSERT INTO job_outbox (job_id, deliver_at, priority, kind, user_id)
            SELECT id, CASE WHEN run_at <= now() THEN now() + make_interval(secs => $10)
                            ELSE run_at END,
                   priority, kind, user_id
            FROM ins
         )
         SELECT * FROM ins"
    );
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let users: Vec<Uuid> = rows.iter().map(|r| r.user_id).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.job.kind.as_str()).collect();
    let payloads: Vec<&serde_json::Value> = rows.iter().map(|r| &r.job.payload).collect();
    let priorities: Vec<i32> = rows.iter().map(|r| r.job.priority).collect();
    let max_attempts: Vec<i32> = rows.iter().map(|r| r.job.max_attempts).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.job.run_at).collect();
    let keys: Vec<Option<&str>> = rows
        .iter()
        .map(|r| r.job.idempotency_key.as_deref())
        .collect();
    let traceparents: Vec<Option<&str>> = rows.iter().map(|r| r.traceparent).collect();
    let timeouts: Vec<f64> = rows
        .iter()
        .map(|r| r.schedule_timeout.as_secs_f64())
        .collect();
    let attempt_timeouts: Vec<Option<f64>> = rows
        .iter()
        .map(|r| r.job.timeout.map(|t| t.as_secs_f64()))
        .collect();
    let stmt = client.prepare_cached(SQL).await?;
    let found = client
        .query(
            &stmt,
            &[
                &ids,
                &users,
                &kinds,
                &payloads,
                &priorities,
                &max_attempts,
                &run_ats,
                &keys,
                &traceparents,
                &publish_grace.as_secs_f64(),
                &timeouts,
                &attempt_timeouts,
            ],
        )
        .await
        .map_err(|e| {
            // A valid token whose user has since been deleted.
            if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
                JobsError::Api(ApiError::Unauthenticated(
                    "the token's user does not exist".into(),
                ))
            } else {
                e.into()
            }
        })?;
    found.iter().map(JobRow::try_from).collect()
}

/// The caller's jobs with these idempotency keys.
pub async fn jobs_by_keys(
    client: &impl GenericClient,
    user_id: Uuid,
    keys: &[&str],
) -> Result<Vec<(String, JobRow)>, JobsError> {
    const SQL: &str = concat!(
        "SELECT idempotency_key, ",
        job_cols!(),
        " FROM jobs WHERE user_id = $1 AND idempotency_key = ANY($2)"
    );
    let stmt = client.prepare_cached(SQL).await?;
    let found = client.query(&stmt, &[&user_id, &keys]).await?;
    found
        .iter()
        .map(|row| Ok((row.try_get("idempotency_key")?, JobRow::try_from(row)?)))
        .collect()
}

/// One of the caller's jobs (None when absent or another user's).
pub async fn user_job(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<Option<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "SELECT ",
        job_cols!(),
        " FROM jobs WHERE id = $1 AND user_id = $2"
    );
    let stmt = client.prepare_cached(SQL).await?;
    opt_row(client.query_opt(&stmt, &[&id, &user_id]).await?)
}

/// The jobs of `ids` (any user's; absent ids have no row), by the primary key.
pub async fn jobs_by_id(
    client: &impl GenericClient,
    ids: &[Uuid],
) -> Result<Vec<JobRow>, JobsError> {
    const SQL: &str = concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = ANY($1)");
    let stmt = client.prepare_cached(SQL).await?;
    rows(&client.query(&stmt, &[&ids]).await?)
}

/// Any user's job (worker calls, announcements).
pub async fn job(client: &impl GenericClient, id: Uuid) -> Result<Option<JobRow>, JobsError> {
    const SQL: &str = concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1");
    let stmt = client.prepare_cached(SQL).await?;
    opt_row(client.query_opt(&stmt, &[&id]).await?)
}

/// A page of the caller's jobs, newest first (ids are v7), strictly before `before`.
pub async fn list_jobs(
    client: &impl GenericClient,
    user_id: Uuid,
    status: Option<JobState>,
    kind: Option<&str>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "SELECT ",
        job_cols!(),
        " FROM jobs
          WHERE user_id = $1
            AND ($2::text IS NULL OR status = $2)
            AND ($3::text IS NULL OR kind = $3)
            AND ($4::uuid IS NULL OR id < $4)
          ORDER BY id DESC
          LIMIT $5"
    );
    let stmt = client.prepare_cached(SQL).await?;
    let status = status.map(JobState::as_str);
    rows(
        &client
            .query(&stmt, &[&user_id, &status, &kind, &before, &limit])
            .await?,
    )
}

/// What the admin ListJobs filters on (None: any).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub user_id: Option<Uuid>,
    pub status: Option<JobState>,
    pub kind: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

/// A page of every user's jobs, newest first (ids are v7), strictly before `before`.
pub async fn list_any_jobs(
    client: &impl GenericClient,
    filter: &JobFilter,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "SELECT ",
        job_cols!(),
        " FROM jobs
          WHERE ($1::uuid IS NULL OR user_id = $1)
            AND ($2::text IS NULL OR status = $2)
            AND ($3::text IS NULL OR kind = $3)
            AND ($4::timestamptz IS NULL OR created_at >= $4)
            AND ($5::timestamptz IS NULL OR created_at < $5)
            AND ($6::uuid IS NULL OR id < $6)
          ORDER BY id DESC
          LIMIT $7"
    );
    let stmt = client.prepare_cached(SQL).await?;
    let status = filter.status.map(JobState::as_str);
    let found = client
        .query(
            &stmt,
            &[
                &filter.user_id,
                &status,
                &filter.kind,
                &filter.created_after,
                &filter.created_before,
                &before,
                &limit,
            ],
        )
        .await?;
    found.iter().map(JobRow::try_from).collect()
}

/// Queued -> cancelled, dropping its pending delivery. None when the job is
/// not (any longer) the caller's queued job.
pub async fn cancel_queued(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<Option<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH j AS (
            UPDATE jobs SET status = 'cancelled', cancel_requested = true, finished_at = now(),
                            schedule_deadline = NULL, updated_at = now(), version = version + 1
            WHERE id = $1 AND user_id = $2 AND status = 'queued'
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt)
            SELECT id, 'cancelled', status, attempt FROM j
         ), ob AS (
            DELETE FROM job_outbox WHERE job_id IN (SELECT id FROM j)
         )
         SELECT * FROM j"
    );
    let stmt = client.prepare_cached(SQL).await?;
    opt_row(client.query_opt(&stmt, &[&id, &user_id]).await?)
}

/// Running -> running with cancellation requested. None when the job is not
/// (any longer) the caller's running job, or cancellation was already requested.
pub async fn request_cancel(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<Option<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH j AS (
            UPDATE jobs SET cancel_requested = true, updated_at = now(), version = version + 1
            WHERE id = $1 AND user_id = $2 AND status = 'running' AND NOT cancel_requested
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt, worker_id)
            SELECT id, 'cancel_requested', status, attempt, worker_id FROM j
         )
         SELECT * FROM j"
    );
    let stmt = client.prepare_cached(SQL).await?;
    opt_row(client.query_opt(&stmt, &[&id, &user_id]).await?)
}

/// A StartJob to apply: the job, the worker, and the delivery that brought
/// the job to it (empty: none named).
#[derive(Debug, Clone, Copy)]
pub struct Start<'a> {
    pub id: Uuid,
    pub worker_id: &'a str,
    pub delivery_id: &'a str,
}

/// Queued and due -> running, attempt + 1, with a lease, for each start in
/// one statement; their deliveries are done. Returns the jobs that started;
/// the others are not queued or not due. Ids must be distinct. Rows are
/// locked in id order, so concurrent batches cannot deadlock.
///
/// The rows are found by id alone, their state checked on the locked row
/// (see "Plans that hold while statistics are stale" above).
pub async fn start_jobs(
    client: &impl GenericClient,
    starts: &[Start<'_>],
    lease: Duration,
) -> Result<Vec<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $4::text[])
                   AS t(start_id, start_worker, start_delivery)
         ), ",
        locked_by_id!("id = ANY($1) ORDER BY id"),
        ", j AS (
            UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = now(),
                            updated_at = now(), lease_expires_at = now() + make_interval(secs => $3),
                            worker_id = start_worker, delivery_id = nullif(start_delivery, ''),
                            attempt_deadline = now() + attempt_timeout, schedule_deadline = NULL,
                            progress = NULL, version = version + 1
            FROM locked, input
            WHERE id = locked_id AND id = start_id
              AND locked_status = 'queued' AND locked_run_at <= now()
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt, worker_id)
            SELECT id, 'started', status, attempt, worker_id FROM j
         ), ob AS (
            DELETE FROM job_outbox WHERE job_id IN (SELECT id FROM j)
         )
         SELECT * FROM j"
    );
    let ids: Vec<Uuid> = starts.iter().map(|s| s.id).collect();
    let workers: Vec<&str> = starts.iter().map(|s| s.worker_id).collect();
    let deliveries: Vec<&str> = starts.iter().map(|s| s.delivery_id).collect();
    let stmt = client.prepare_cached(SQL).await?;
    rows(
        &client
            .query(&stmt, &[&ids, &workers, &lease.as_secs_f64(), &deliveries])
            .await?,
    )
}

/// The running attempt that `start` itself started (same worker, same
/// delivery), with its lease renewed: a repeated StartJob whose first answer
/// was lost. None when the job is not running for that delivery.
pub async fn resume_start(
    client: &impl GenericClient,
    start: Start<'_>,
    lease: Duration,
) -> Result<Option<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH ",
        locked_by_id!("id = $1"),
        "
         UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4)
         FROM locked
         WHERE id = locked_id AND locked_status = 'running' AND locked_worker = $2
           AND locked_delivery = $3
         RETURNING ",
        job_cols!()
    );
    if start.delivery_id.is_empty() {
        return Ok(None);
    }
    let stmt = client.prepare_cached(SQL).await?;
    opt_row(
        client
            .query_opt(
                &stmt,
                &[
                    &start.id,
                    &start.worker_id,
                    &start.delivery_id,
                    &lease.as_secs_f64(),
                ],
            )
            .await?,
    )
}

/// Up to `limit` due queued jobs of `kinds` (at most `caps[i]` of
/// `kinds[i]`: flow control), started for `worker_id` in one statement
/// (rows other claims hold are skipped), taking turns between users as the
/// relay does (`store::fairness::claim_fair`): each user's jobs highest
/// priority first, then oldest; then higher priority first, the first job
/// of every user before the second of any, and within a turn the job that
/// became due last first. Each user with due jobs offers an equal share of
/// `limit` (rounded up), so a claim locks about `limit` rows however many
/// users wait; with one user alone the share is the whole `limit`. Returns
/// them highest priority first, then oldest.
pub async fn claim_jobs(
    client: &impl GenericClient,
    kinds: &[&str],
    caps: &[i64],
    worker_id: &str,
    limit: i64,
    lease: Duration,
) -> Result<Vec<JobRow>, JobsError> {
    // The users are found by a loose scan of (kind, user_id, ...): one
    // probe per user with due jobs, however long their backlogs are. The
    // update finds the picked rows by id alone: they are locked, and were
    // queued when locked (see the module doc on stale statistics).
    const SQL: &str = concat!(
        "WITH RECURSIVE input AS (
            SELECT * FROM unnest($1::text[], $5::int8[]) AS k(claim_kind, claim_cap)
         ), users AS (
            SELECT i.claim_kind, i.claim_cap,
                   (SELECT q.user_id FROM jobs q
                    WHERE q.kind = i.claim_kind AND q.status = 'queued' AND q.run_at <= now()
                    ORDER BY q.user_id LIMIT 1) AS uid
            FROM input i
            UNION ALL
            SELECT u.claim_kind, u.claim_cap,
                   (SELECT q.user_id FROM jobs q
                    WHERE q.kind = u.claim_kind AND q.status = 'queued' AND q.user_id > u.uid
                      AND q.run_at <= now()
                    ORDER BY q.user_id LIMIT 1)
            FROM users u WHERE u.uid IS NOT NULL
         ), shares AS (
            SELECT claim_kind, claim_cap, uid,
                   ceil(least($3, claim_cap)::float8
                        / count(*) OVER (PARTITION BY claim_kind))::int8 AS share
            FROM users WHERE uid IS NOT NULL
         ), candidates AS MATERIALIZED (
            SELECT s.claim_kind, s.claim_cap, c.*,
                   row_number() OVER (PARTITION BY s.claim_kind, s.uid
                                      ORDER BY c.claim_priority DESC, c.claim_run_at, c.claim_id) AS turn
            FROM shares s,
            LATERAL (SELECT id AS claim_id, priority AS claim_priority, run_at AS claim_run_at
                     FROM jobs
                     WHERE kind = s.claim_kind AND user_id = s.uid AND status = 'queued'
                       AND run_at <= now()
                     ORDER BY priority DESC, run_at, id
                     LIMIT s.share
                     FOR NO KEY UPDATE SKIP LOCKED) c
         ), placed AS (
            SELECT claim_id, claim_priority, turn, claim_run_at, claim_cap,
                   row_number() OVER (PARTITION BY claim_kind
                                      ORDER BY claim_priority DESC, turn, claim_run_at DESC, claim_id) AS place
            FROM candidates
         ), picked AS (
            SELECT claim_id FROM placed
            WHERE place <= claim_cap
            ORDER BY claim_priority DESC, turn, claim_run_at DESC, claim_id
            LIMIT $3
         ), j AS (
            UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = now(),
                            updated_at = now(), lease_expires_at = now() + make_interval(secs => $4),
                            worker_id = $2, delivery_id = NULL, progress = NULL,
                            attempt_deadline = now() + attempt_timeout, schedule_deadline = NULL,
                            version = version + 1
            FROM picked
            WHERE id = claim_id
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt, worker_id)
            SELECT id, 'started', status, attempt, worker_id FROM j
         ), ob AS (
            DELETE FROM job_outbox WHERE job_id IN (SELECT id FROM j)
         )
         SELECT * FROM j ORDER BY priority DESC, run_at, id"
    );
    let stmt = client.prepare_cached(SQL).await?;
    rows(
        &client
            .query(
                &stmt,
                &[&kinds, &worker_id, &limit, &lease.as_secs_f64(), &caps],
            )
            .await?,
    )
}

/// Extends the lease of running attempt `attempt` and records its
/// `progress` when given. Not a transition, so no history row; a progress
/// report is a new version (watchers see it), a bare heartbeat is not. An
/// attempt past its deadline is not extended (None), even before the
/// reaper fails it: the worker learns at once that the attempt is over.
pub async fn heartbeat(
    client: &impl GenericClient,
    id: Uuid,
    attempt: i32,
    lease: Duration,
    progress: Option<&serde_json::Value>,
) -> Result<Option<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH ",
        locked_by_id!("id = $1"),
        "
         UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3),
                         progress = coalesce($4, progress),
                         version = version + CASE WHEN $4 IS NULL THEN 0 ELSE 1 END,
                         updated_at = CASE WHEN $4 IS NULL THEN updated_at ELSE now() END
         FROM locked
         WHERE id = locked_id AND locked_status = 'running' AND locked_attempt = $2
           AND (locked_deadline IS NULL OR locked_deadline > now())
         RETURNING ",
        job_cols!()
    );
    let stmt = client.prepare_cached(SQL).await?;
    opt_row(
        client
            .query_opt(&stmt, &[&id, &attempt, &lease.as_secs_f64(), &progress])
            .await?,
    )
}

/// A CompleteJob to apply: running attempt `attempt` -> succeeded with
/// `output`, or cancelled.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    pub id: Uuid,
    pub attempt: i32,
    pub output: Option<&'a serde_json::Value>,
    pub cancelled: bool,
    /// Recorded in the history row; empty: the job's own.
    pub worker_id: &'a str,
}

/// Applies `completions` in one statement; returns the jobs that completed
/// (the others are not running that attempt, or it ran past its deadline:
/// it timed out, whether or not the reaper has recorded that yet). (id, attempt) pairs must be
/// distinct. Rows are locked in id order, so concurrent batches cannot deadlock.
/// Found by id alone, like [`start_jobs`].
pub async fn complete_jobs(
    client: &impl GenericClient,
    completions: &[Completion<'_>],
) -> Result<Vec<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::int4[], $3::jsonb[], $4::bool[], $5::text[])
                   AS t(done_id, done_attempt, done_output, done_cancelled, done_worker)
         ), ",
        locked_by_id!("id = ANY($1) ORDER BY id"),
        ", j AS (
            UPDATE jobs SET status = CASE WHEN done_cancelled THEN 'cancelled' ELSE 'succeeded' END,
                            output = done_output, finished_at = now(), updated_at = now(),
                            lease_expires_at = NULL, attempt_deadline = NULL,
                            version = version + 1
            FROM locked, input
            WHERE id = locked_id AND id = done_id
              AND locked_attempt = done_attempt AND locked_status = 'running'
              AND (locked_deadline IS NULL OR locked_deadline > now())
            RETURNING ",
        job_cols!(),
        ", done_worker
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt, worker_id)
            SELECT id, status, status, attempt, coalesce(nullif(done_worker, ''), worker_id) FROM j
         )
         SELECT * FROM j"
    );
    let ids: Vec<Uuid> = completions.iter().map(|c| c.id).collect();
    let attempts: Vec<i32> = completions.iter().map(|c| c.attempt).collect();
    let outputs: Vec<Option<&serde_json::Value>> = completions.iter().map(|c| c.output).collect();
    let cancelled: Vec<bool> = completions.iter().map(|c| c.cancelled).collect();
    let workers: Vec<&str> = completions.iter().map(|c| c.worker_id).collect();
    let stmt = client.prepare_cached(SQL).await?;
    rows(
        &client
            .query(&stmt, &[&ids, &attempts, &outputs, &cancelled, &workers])
            .await?,
    )
}

/// Running attempt `attempt` failed: queued again after `retry_delay` while it
/// is retryable and attempts remain, cancelled when cancellation was
/// requested, else failed.
pub async fn fail_job(
    client: &impl GenericClient,
    id: Uuid,
    attempt: i32,
    error: &str,
    retryable: bool,
    retry_delay: Duration,
    worker_id: &str,
) -> Result<Option<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH ",
        locked_by_id!("id = $1"),
        ", j AS (
            UPDATE jobs SET
                status = CASE WHEN cancel_requested THEN 'cancelled'
                              WHEN $4 AND attempt < max_attempts THEN 'queued'
                              ELSE 'failed' END,
                run_at = CASE WHEN NOT cancel_requested AND $4 AND attempt < max_attempts
                              THEN now() + make_interval(secs => $5) ELSE run_at END,
                schedule_deadline = CASE WHEN NOT cancel_requested AND $4 AND attempt < max_attempts
                                         THEN now() + make_interval(secs => $5) + schedule_timeout
                                    END,
                finished_at = CASE WHEN NOT cancel_requested AND $4 AND attempt < max_attempts
                                   THEN NULL ELSE now() END,
                error = $3, updated_at = now(), lease_expires_at = NULL, attempt_deadline = NULL,
                version = version + 1
            FROM locked
            WHERE id = locked_id AND locked_status = 'running' AND locked_attempt = $2
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt, worker_id, error)
            SELECT id, CASE status WHEN 'queued' THEN 'retry_scheduled' ELSE status END,
                   status, attempt, coalesce(nullif($6, ''), worker_id), error FROM j
         ), ob AS (
            INSERT INTO job_outbox (job_id, deliver_at, priority, attempt, kind, user_id)
            SELECT id, run_at, priority, attempt, kind, user_id FROM j WHERE status = 'queued'
         )
         SELECT * FROM j"
    );
    let stmt = client.prepare_cached(SQL).await?;
    opt_row(
        client
            .query_opt(
                &stmt,
                &[
                    &id,
                    &attempt,
                    &error,
                    &retryable,
                    &retry_delay.as_secs_f64(),
                    &worker_id,
                ],
            )
            .await?,
    )
}

/// Running jobs whose lease ran out (their worker died) go back to queued,
/// or to failed when out of attempts (cancelled when cancellation was
/// requested). Rows another replica is reaping are skipped.
pub async fn reap_expired_leases(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH expired AS MATERIALIZED (
            SELECT id AS expired_id, status AS expired_status FROM jobs
            WHERE lease_expires_at < now()
            ORDER BY lease_expires_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         ), j AS (
            UPDATE jobs SET
                status = CASE WHEN cancel_requested THEN 'cancelled'
                              WHEN attempt < max_attempts THEN 'queued'
                              ELSE 'failed' END,
                run_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts
                              THEN now() ELSE run_at END,
                schedule_deadline = CASE WHEN NOT cancel_requested AND attempt < max_attempts
                                         THEN now() + schedule_timeout END,
                finished_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts
                                   THEN NULL ELSE now() END,
                error = 'lease expired: the worker stopped heartbeating',
                updated_at = now(), lease_expires_at = NULL, attempt_deadline = NULL,
                version = version + 1
            FROM expired
            WHERE id = expired_id AND expired_status = 'running'
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt, worker_id, error)
            SELECT id, 'lease_expired', status, attempt, worker_id, error FROM j
         ), ob AS (
            INSERT INTO job_outbox (job_id, deliver_at, priority, attempt, kind, user_id)
            SELECT id, run_at, priority, attempt, kind, user_id FROM j WHERE status = 'queued'
         )
         SELECT * FROM j"
    );
    let stmt = client.prepare_cached(SQL).await?;
    rows(&client.query(&stmt, &[&limit]).await?)
}

/// Running attempts past their deadline (the job's timeout) fail as a
/// retryable FailJob would: queued again after the backoff of
/// `retry_delay` (same base, cap and equal jitter, computed here per row)
/// while attempts remain, else failed (cancelled when cancellation was
/// requested). Their heartbeats stop extending them from the deadline on
/// ([`heartbeat`]), so the worker learns the attempt is over. Rows another
/// replica is reaping are skipped.
pub async fn fail_timed_out(
    client: &impl GenericClient,
    limit: i64,
    retry_base: Duration,
    retry_max: Duration,
) -> Result<Vec<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH expired AS MATERIALIZED (
            SELECT id AS expired_id, status AS expired_status,
                   make_interval(secs => least($2 * power(2, least(greatest(attempt - 1, 0), 30)), $3)
                                         * (0.5 + random() / 2)) AS delay
            FROM jobs
            WHERE attempt_deadline < now()
            ORDER BY attempt_deadline
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         ), j AS (
            UPDATE jobs SET
                status = CASE WHEN cancel_requested THEN 'cancelled'
                              WHEN attempt < max_attempts THEN 'queued'
                              ELSE 'failed' END,
                run_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts
                              THEN now() + delay ELSE run_at END,
                schedule_deadline = CASE WHEN NOT cancel_requested AND attempt < max_attempts
                                         THEN now() + delay + schedule_timeout END,
                finished_at = CASE WHEN NOT cancel_requested AND attempt < max_attempts
                                   THEN NULL ELSE now() END,
                error = format('attempt %s timed out: it ran longer than the job''s timeout (%s s)',
                               attempt, extract(epoch FROM attempt_timeout)::float8),
                updated_at = now(), lease_expires_at = NULL, attempt_deadline = NULL,
                version = version + 1
            FROM expired
            WHERE id = expired_id AND expired_status = 'running'
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt, worker_id, error)
            SELECT id, 'timed_out', status, attempt, worker_id, error FROM j
         ), ob AS (
            INSERT INTO job_outbox (job_id, deliver_at, priority, attempt, kind, user_id)
            SELECT id, run_at, priority, attempt, kind, user_id FROM j WHERE status = 'queued'
         )
         SELECT * FROM j"
    );
    let stmt = client.prepare_cached(SQL).await?;
    rows(
        &client
            .query(
                &stmt,
                &[&limit, &retry_base.as_secs_f64(), &retry_max.as_secs_f64()],
            )
            .await?,
    )
}

/// Failed or cancelled -> queued with a fresh set of attempts (attempt 0,
/// error, output, progress and cancellation cleared), due now, with a new
/// schedule deadline as at creation, an outbox row as a new job's (due after
/// `publish_grace`, left meanwhile to the caller's immediate publication)
/// and a `retried` history row. None when the job is not the caller's
/// failed or cancelled job: one conditional UPDATE, so of two concurrent
/// retries only one applies.
///
/// The outbox row's `attempt` is 0, as for a new job, so the immediate
/// publication marks it like one. A finished job has no outbox row (it was
/// deleted when its last attempt started, or when it was cancelled or
/// failed while queued), so no row of its first life is left to be confused
/// with this one. The one overlap is in memory: the publisher marks a new
/// job's (id, 0) row [`crate::delivery`]'s MARK_AFTER after its XADD; if the
/// job started, ended and was retried within that half second, that stale
/// mark lands on this row. It is harmless: this row's own immediate
/// publication is already queued and happens regardless, and if that XADD
/// fails the relay publishes the row once the mark's redelivery wait ends
/// (a delay, never a loss; ClaimJobs workers never depend on the outbox).
pub async fn retry_job(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
    publish_grace: Duration,
) -> Result<Option<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH j AS (
            UPDATE jobs SET status = 'queued', attempt = 0, error = '', output = NULL,
                            progress = NULL, cancel_requested = false, run_at = now(),
                            schedule_deadline = now() + schedule_timeout,
                            started_at = NULL, finished_at = NULL, lease_expires_at = NULL,
                            worker_id = NULL, delivery_id = NULL, attempt_deadline = NULL,
                            updated_at = now(), version = version + 1
            WHERE id = $1 AND user_id = $2 AND status IN ('failed', 'cancelled')
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt)
            SELECT id, 'retried', status, attempt FROM j
         ), ob AS (
            INSERT INTO job_outbox (job_id, deliver_at, priority, attempt, kind, user_id)
            SELECT id, now() + make_interval(secs => $3), priority, 0, kind, user_id FROM j
            ON CONFLICT (job_id) DO UPDATE
                SET deliver_at = excluded.deliver_at, priority = excluded.priority,
                    attempt = 0, published_at = NULL, publications = 0
         )
         SELECT * FROM j"
    );
    let stmt = client.prepare_cached(SQL).await?;
    opt_row(
        client
            .query_opt(&stmt, &[&id, &user_id, &publish_grace.as_secs_f64()])
            .await?,
    )
}

/// Deletes the caller's finished job; its history and outbox rows go with
/// it (the `jobs_delete_dependents` trigger), and its idempotency key is
/// free again. False when the job is not the caller's finished job.
pub async fn delete_finished(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<bool, JobsError> {
    const SQL: &str = "DELETE FROM jobs
                       WHERE id = $1 AND user_id = $2
                         AND status IN ('succeeded', 'failed', 'cancelled')";
    let stmt = client.prepare_cached(SQL).await?;
    Ok(client.execute(&stmt, &[&id, &user_id]).await? == 1)
}

/// One transition of a job, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub event: String,
    pub status: JobState,
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

/// The caller's job's history, oldest first; None when the job is absent
/// or another user's. One statement, so a job deleted meanwhile is None,
/// never an empty history.
pub async fn job_history(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<Option<Vec<EventRow>>, JobsError> {
    const SQL: &str = "SELECT e.event, e.status, e.attempt, e.worker_id, e.error, e.at
                       FROM jobs j LEFT JOIN job_events e ON e.job_id = j.id
                       WHERE j.id = $1 AND j.user_id = $2
                       ORDER BY e.id";
    let stmt = client.prepare_cached(SQL).await?;
    let found = client.query(&stmt, &[&id, &user_id]).await?;
    if found.is_empty() {
        return Ok(None);
    }
    let mut events = Vec::with_capacity(found.len());
    for row in &found {
        let Some(event) = row.try_get::<_, Option<String>>(0)? else {
            continue; // the job has no history rows
        };
        let status: String = row.try_get(1)?;
        events.push(EventRow {
            event,
            status: JobState::parse(&status).ok_or_else(|| {
                JobsError::Api(ApiError::Internal(format!(
                    "unknown job status {status:?} in the history"
                )))
            })?,
            attempt: row.try_get(2)?,
            worker_id: row.try_get(3)?,
            error: row.try_get(4)?,
            at: row.try_get(5)?,
        });
    }
    Ok(Some(events))
}

/// Queued jobs that no worker took before their schedule deadline fail
/// (not retried), up to `limit` per call; rows others hold are skipped.
pub async fn fail_unscheduled(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<JobRow>, JobsError> {
    const SQL: &str = concat!(
        "WITH expired AS MATERIALIZED (
            SELECT id AS expired_id, status AS expired_status FROM jobs
            WHERE schedule_deadline < now()
            ORDER BY schedule_deadline
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         ), j AS (
            UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(),
                            error = format('no worker took the job within its schedule timeout '
                                           '(%s): is a worker for kind \"%s\" running?',
                                           schedule_timeout, kind),
                            schedule_deadline = NULL, version = version + 1
            FROM expired
            WHERE id = expired_id AND expired_status = 'queued'
            RETURNING ",
        job_cols!(),
        "
         ), ev AS (
            INSERT INTO job_events (job_id, event, status, attempt, error)
            SELECT id, 'schedule_timeout', status, attempt, error FROM j
         ), ob AS (
            DELETE FROM job_outbox WHERE job_id IN (SELECT id FROM j)
         )
         SELECT * FROM j"
    );
    let stmt = client.prepare_cached(SQL).await?;
    rows(&client.query(&stmt, &[&limit]).await?)
}

/// A job to add to its kind's stream: which of its outbox rows (the job's
/// attempt count when the row was written) and the trace context it was
/// created in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub job_id: Uuid,
    pub kind: String,
    /// Picks the kind's stream (its priority band).
    pub priority: i32,
    pub attempt: i32,
    pub traceparent: Option<String>,
}

impl Publication {
    /// From a row of `job_id, kind, attempt, traceparent, priority`.
    pub(crate) fn from_row(row: &Row) -> Result<Self, JobsError> {
        Ok(Self {
            job_id: row.try_get(0)?,
            kind: row.try_get(1)?,
            attempt: row.try_get(2)?,
            traceparent: row.try_get(3)?,
            priority: row.try_get(4)?,
        })
    }
}

/// Locks up to `limit` due outbox rows of `kinds` no one else holds,
/// highest priority first. Call inside a transaction; the locks last until
/// it ends.
pub async fn claim_outbox(
    client: &impl GenericClient,
    kinds: &[&str],
    limit: i64,
) -> Result<Vec<Publication>, JobsError> {
    const SQL: &str = "SELECT o.job_id, j.kind, o.attempt, j.traceparent, j.priority
                       FROM job_outbox o JOIN jobs j ON j.id = o.job_id
                       WHERE o.deliver_at <= now() AND o.kind = ANY($2)
                       ORDER BY o.priority DESC, o.deliver_at, o.job_id
                       LIMIT $1
                       FOR UPDATE OF o SKIP LOCKED";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .query(&stmt, &[&limit, &kinds])
        .await?
        .iter()
        .map(Publication::from_row)
        .collect()
}

/// Begins a transaction of outbox bookkeeping (a relay round, marking
/// immediate publications, handing rows to the relay):
/// - its commit returns before its WAL is flushed: losing it in a crash
///   only publishes rows again, which workers tolerate;
/// - each of its statements is planned for the outbox as it is now. The
///   outbox goes from empty to a whole burst within seconds, and a pooled
///   connection keeps the generic plan it made while the outbox was small:
///   whatever the statement's shape, that plan scans the whole outbox (a
///   relay round read 18,000 rows to publish 222, 100-500 ms a round,
///   measured in BENCHMARKS.md). Planning each time costs well under a
///   millisecond per statement, and these run a few times per batch of
///   jobs, not per job.
pub async fn begin_outbox_bookkeeping(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, JobsError> {
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SET LOCAL synchronous_commit = off; SET LOCAL plan_cache_mode = force_custom_plan",
    )
    .await?;
    Ok(tx)
}

/// Marks these publications' outbox rows published. Each stays until its
/// job starts; if that has not happened after `redeliver_after *
/// 2^(publications - 1)` (at most 1024 times `redeliver_after`), it is
/// published again. A row is only the publication's own when its attempt
/// matches: a job that started and was re-queued meanwhile (a retry) has a
/// new row, not yet published, which must stay due.
///
/// Rows another transaction holds are skipped, not waited for: a StartJob
/// batch deleting them (the job started: nothing left to mark), or the
/// relay (it marks them itself). Waiting could deadlock with a StartJob
/// batch that locks the same jobs in another order.
pub async fn mark_published(
    client: &impl GenericClient,
    published: &[Publication],
    redeliver_after: Duration,
) -> Result<(), JobsError> {
    const SQL: &str = "UPDATE job_outbox
                       SET published_at = now(), publications = publications + 1,
                           deliver_at = now() + make_interval(secs => $3 * power(2, least(publications, 10)))
                       WHERE job_id = ANY (ARRAY(
                           SELECT job_id FROM job_outbox
                           WHERE job_id = ANY($1)
                             AND (job_id, attempt) IN (SELECT * FROM unnest($1::uuid[], $2::int4[]))
                           FOR UPDATE SKIP LOCKED))";
    let (ids, attempts) = ids_and_attempts(published);
    let stmt = client.prepare_cached(SQL).await?;
    client
        .execute(&stmt, &[&ids, &attempts, &redeliver_after.as_secs_f64()])
        .await?;
    Ok(())
}

/// Makes these publications' outbox rows due now if they were never
/// published: an immediate publication failed, so the relay takes over at
/// its next round.
pub async fn hand_to_relay(
    client: &impl GenericClient,
    unpublished: &[Publication],
) -> Result<(), JobsError> {
    const SQL: &str = "UPDATE job_outbox SET deliver_at = now()
                       WHERE job_id = ANY($1)
                         AND (job_id, attempt) IN (SELECT * FROM unnest($1::uuid[], $2::int4[]))
                         AND published_at IS NULL";
    let (ids, attempts) = ids_and_attempts(unpublished);
    let stmt = client.prepare_cached(SQL).await?;
    client.execute(&stmt, &[&ids, &attempts]).await?;
    Ok(())
}

/// Puts off these never-published rows (no stream worker serves their kind)
/// for `redeliver_after * 2^n` like a publication, still unpublished, so a
/// kind that becomes served gets them at once ([`hand_kind_to_relay`]).
pub async fn defer_unpublished(
    client: &impl GenericClient,
    unserved: &[Publication],
    redeliver_after: Duration,
) -> Result<(), JobsError> {
    const SQL: &str = "UPDATE job_outbox
                       SET publications = publications + 1,
                           deliver_at = now() + make_interval(secs => $3 * power(2, least(publications, 10)))
                       WHERE job_id = ANY($1)
                         AND (job_id, attempt) IN (SELECT * FROM unnest($1::uuid[], $2::int4[]))";
    let (ids, attempts) = ids_and_attempts(unserved);
    let stmt = client.prepare_cached(SQL).await?;
    client
        .execute(&stmt, &[&ids, &attempts, &redeliver_after.as_secs_f64()])
        .await?;
    Ok(())
}

/// Makes the outbox rows of `kind` that were put off, never published
/// ([`defer_unpublished`]), due now: a stream worker serves the kind from
/// now on. New rows still in their publication grace are left alone.
/// Returns how many.
pub async fn hand_kind_to_relay(client: &impl GenericClient, kind: &str) -> Result<u64, JobsError> {
    const SQL: &str = "UPDATE job_outbox o SET deliver_at = now()
                       FROM jobs j
                       WHERE j.id = o.job_id AND j.kind = $1
                         AND o.published_at IS NULL AND o.publications > 0
                         AND o.deliver_at > now()";
    let stmt = client.prepare_cached(SQL).await?;
    Ok(client.execute(&stmt, &[&kind]).await?)
}

fn ids_and_attempts(publications: &[Publication]) -> (Vec<Uuid>, Vec<i32>) {
    publications.iter().map(|p| (p.job_id, p.attempt)).unzip()
}

/// A table whose statistics the service keeps up with bursts
/// (`statistics.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Analyzed {
    Jobs,
    Outbox,
}

impl Analyzed {
    pub const ALL: [Analyzed; 2] = [Analyzed::Jobs, Analyzed::Outbox];

    pub fn name(self) -> &'static str {
        match self {
            Analyzed::Jobs => "jobs",
            Analyzed::Outbox => "job_outbox",
        }
    }
}

/// Whether `table` holds far more rows than its statistics say: over 1,000
/// live rows and over four times the count its last ANALYZE found (none
/// when never analyzed), from the table's running counts, no scan.
pub async fn outgrew_statistics(
    client: &impl GenericClient,
    table: Analyzed,
) -> Result<bool, JobsError> {
    const SQL: &str = "SELECT coalesce(s.n_live_tup::float8
                                       > greatest(1000, 4 * greatest(c.reltuples, 0)::float8), false)
                       FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
                       WHERE c.oid = $1::text::regclass";
    let stmt = client.prepare_cached(SQL).await?;
    Ok(client
        .query_one(&stmt, &[&table.name()])
        .await?
        .try_get(0)?)
}

/// Re-takes `table`'s statistics; every connection plans its statements on
/// it again.
pub async fn analyze(client: &impl GenericClient, table: Analyzed) -> Result<(), JobsError> {
    client
        .batch_execute(&format!("ANALYZE {}", table.name()))
        .await?;
    Ok(())
}

/// Outbox size for metrics: all rows, rows due for (re)publication, and how
/// long (seconds) the oldest due row has waited.
pub async fn outbox_stats(client: &impl GenericClient) -> Result<(i64, i64, f64), JobsError> {
    const SQL: &str = "SELECT count(*),
                              count(*) FILTER (WHERE deliver_at <= now()),
                              COALESCE(EXTRACT(EPOCH FROM now() - min(deliver_at)
                                       FILTER (WHERE deliver_at <= now()))::float8, 0)
                       FROM job_outbox";
    let stmt = client.prepare_cached(SQL).await?;
    let row = client.query_one(&stmt, &[]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

/// Deletes up to `limit` jobs that finished before `cutoff`, with their
/// events and outbox rows (the `jobs_delete_dependents` trigger); returns
/// how many. Only jobs created before the cutoff can qualify, so the scan is
/// bounded to the oldest ids (v7 ids sort by creation time). Replicas skip each other's rows.
pub async fn delete_finished_before(
    client: &impl GenericClient,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, JobsError> {
    const SQL: &str = "DELETE FROM jobs WHERE id IN (
                           SELECT id FROM jobs
                           WHERE id < $1 AND finished_at < $2
                             AND status IN ('succeeded', 'failed', 'cancelled')
                           ORDER BY id
                           LIMIT $3
                           FOR UPDATE SKIP LOCKED)";
    let stmt = client.prepare_cached(SQL).await?;
    Ok(client
        .execute(&stmt, &[&domain::v7_floor(cutoff), &cutoff, &limit])
        .await?)
}
