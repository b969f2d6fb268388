//! Every SQL statement of ScheduleService and its ticker.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use keel_shared::ApiError;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::domain::Fields;

const COLS: &str = "id, user_id, name, cron, timezone, kind, payload, priority, max_attempts, \
                    paused, next_run_at, last_run_at, last_job_id, created_at, updated_at";

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ScheduleRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub priority: i32,
    pub max_attempts: i32,
    pub paused: bool,
    pub next_run_at: DateTime<Utc>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ScheduleRow {
    /// The fields of a stored schedule (to apply an update to).
    pub(crate) fn fields(&self) -> Fields {
        Fields {
            name: self.name.clone(),
            cron: self.cron.clone(),
            timezone: self.timezone.clone(),
            kind: self.kind.clone(),
            payload: self.payload.clone(),
            priority: self.priority,
            max_attempts: self.max_attempts,
            paused: self.paused,
        }
    }
}

impl TryFrom<&Row> for ScheduleRow {
    type Error = tokio_postgres::Error;

    fn try_from(row: &Row) -> Result<Self, Self::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            user_id: row.try_get("user_id")?,
            name: row.try_get("name")?,
            cron: row.try_get("cron")?,
            timezone: row.try_get("timezone")?,
            kind: row.try_get("kind")?,
            payload: row.try_get("payload")?,
            priority: row.try_get("priority")?,
            max_attempts: row.try_get("max_attempts")?,
            paused: row.try_get("paused")?,
            next_run_at: row.try_get("next_run_at")?,
            last_run_at: row.try_get("last_run_at")?,
            last_job_id: row.try_get("last_job_id")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

fn one(row: Option<Row>) -> Result<Option<ScheduleRow>, ApiError> {
    Ok(row.as_ref().map(ScheduleRow::try_from).transpose()?)
}

/// A name the user already uses is ALREADY_EXISTS; a deleted user's token
/// is UNAUTHENTICATED.
fn write_error(e: tokio_postgres::Error) -> ApiError {
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
            ApiError::AlreadyExists("a schedule with this name already exists".into())
        }
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            ApiError::Unauthenticated("the token's user does not exist".into())
        }
        _ => e.into(),
    }
}

/// Serializes schedule creation per user until the transaction ends, so the
/// per-user limit holds under concurrent creates.
pub(super) async fn lock_user(client: &impl GenericClient, user_id: Uuid) -> Result<(), ApiError> {
    const SQL: &str =
        "SELECT pg_advisory_xact_lock(hashtextextended('keel.schedules:' || $1::uuid::text, 0))";
    client.execute(SQL, &[&user_id]).await?;
    Ok(())
}

pub(super) async fn count_user(
    client: &impl GenericClient,
    user_id: Uuid,
) -> Result<i64, ApiError> {
    const SQL: &str = "SELECT count(*) FROM schedules WHERE user_id = $1";
    let stmt = client.prepare_cached(SQL).await?;
    Ok(client.query_one(&stmt, &[&user_id]).await?.get(0))
}

pub(super) async fn insert(
    client: &impl GenericClient,
    id: Uuid,
    user_id: Uuid,
    fields: &Fields,
    next_run_at: DateTime<Utc>,
) -> Result<ScheduleRow, ApiError> {
    let sql = format!(
        "INSERT INTO schedules (id, user_id, name, cron, timezone, kind, payload, priority,
                                max_attempts, paused, next_run_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         RETURNING {COLS}"
    );
    let row = client
        .query_one(
            &sql,
            &[
                &id,
                &user_id,
                &fields.name,
                &fields.cron,
                &fields.timezone,
                &fields.kind,
                &fields.payload,
                &fields.priority,
                &fields.max_attempts,
                &fields.paused,
                &next_run_at,
            ],
        )
        .await
        .map_err(write_error)?;
    Ok(ScheduleRow::try_from(&row)?)
}

/// One of the user's schedules (None when absent or another user's);
/// `lock` holds it until the transaction ends.
pub(super) async fn user_schedule(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
    lock: bool,
) -> Result<Option<ScheduleRow>, ApiError> {
    let sql = format!(
        "SELECT {COLS} FROM schedules WHERE id = $1 AND user_id = $2{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let stmt = client.prepare_cached(&sql).await?;
    one(client.query_opt(&stmt, &[&id, &user_id]).await?)
}

/// A page of the user's schedules, newest first, strictly before `before`.
pub(super) async fn list(
    client: &impl GenericClient,
    user_id: Uuid,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ScheduleRow>, ApiError> {
    let sql = format!(
        "SELECT {COLS} FROM schedules
          WHERE user_id = $1 AND ($2::uuid IS NULL OR id < $2)
          ORDER BY id DESC LIMIT $3"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client.query(&stmt, &[&user_id, &before, &limit]).await?;
    Ok(rows
        .iter()
        .map(ScheduleRow::try_from)
        .collect::<Result<_, _>>()?)
}

/// A page of every user's schedules (or one user's), newest first,
/// strictly before `before`: the admin listing.
pub(super) async fn list_any(
    client: &impl GenericClient,
    user_id: Option<Uuid>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ScheduleRow>, ApiError> {
    let sql = format!(
        "SELECT {COLS} FROM schedules
          WHERE ($1::uuid IS NULL OR user_id = $1) AND ($2::uuid IS NULL OR id < $2)
          ORDER BY id DESC LIMIT $3"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client.query(&stmt, &[&user_id, &before, &limit]).await?;
    Ok(rows
        .iter()
        .map(ScheduleRow::try_from)
        .collect::<Result<_, _>>()?)
}

/// Whose schedule this is (None: no such schedule).
pub(super) async fn owner(client: &impl GenericClient, id: Uuid) -> Result<Option<Uuid>, ApiError> {
    let stmt = client
        .prepare_cached("SELECT user_id FROM schedules WHERE id = $1")
        .await?;
    Ok(client.query_opt(&stmt, &[&id]).await?.map(|r| r.get(0)))
}

pub(super) async fn update(
    client: &impl GenericClient,
    id: Uuid,
    fields: &Fields,
    next_run_at: DateTime<Utc>,
) -> Result<ScheduleRow, ApiError> {
    let sql = format!(
        "UPDATE schedules SET name = $2, cron = $3, timezone = $4, kind = $5, payload = $6,
                priority = $7, max_attempts = $8, paused = $9, next_run_at = $10,
                updated_at = now()
          WHERE id = $1
          RETURNING {COLS}"
    );
    let row = client
        .query_one(
            &sql,
            &[
                &id,
                &fields.name,
                &fields.cron,
                &fields.timezone,
                &fields.kind,
                &fields.payload,
                &fields.priority,
                &fields.max_attempts,
                &fields.paused,
                &next_run_at,
            ],
        )
        .await
        .map_err(write_error)?;
    Ok(ScheduleRow::try_from(&row)?)
}

/// Deletes one of the user's schedules; false when there was none.
pub(super) async fn delete(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<bool, ApiError> {
    const SQL: &str = "DELETE FROM schedules WHERE id = $1 AND user_id = $2";
    let stmt = client.prepare_cached(SQL).await?;
    Ok(client.execute(&stmt, &[&id, &user_id]).await? == 1)
}

/// Up to `limit` active schedules due now, locked until the transaction
/// ends (rows another replica holds are skipped), oldest tick first; with
/// the database's clock (the one time every replica agrees on).
pub(super) async fn lock_due(
    client: &impl GenericClient,
    limit: i64,
) -> Result<(DateTime<Utc>, Vec<ScheduleRow>), ApiError> {
    let sql = format!(
        "SELECT now() AS db_now, {COLS} FROM schedules
          WHERE NOT paused AND next_run_at <= now()
          ORDER BY next_run_at
          LIMIT $1
          FOR UPDATE SKIP LOCKED"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client.query(&stmt, &[&limit]).await?;
    let now = match rows.first() {
        Some(r) => r.try_get("db_now")?,
        None => Utc::now(),
    };
    let due = rows
        .iter()
        .map(ScheduleRow::try_from)
        .collect::<Result<_, _>>()?;
    Ok((now, due))
}

/// Whether a job for this tick exists already.
pub(super) async fn tick_fired(
    client: &impl GenericClient,
    schedule_id: Uuid,
    scheduled_for: DateTime<Utc>,
) -> Result<bool, ApiError> {
    const SQL: &str =
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE schedule_id = $1 AND scheduled_for = $2)";
    let stmt = client.prepare_cached(SQL).await?;
    Ok(client
        .query_one(&stmt, &[&schedule_id, &scheduled_for])
        .await?
        .get(0))
}

/// Marks `job_id` as the job of this tick (the unique index refuses a second).
pub(super) async fn mark_tick(
    client: &impl GenericClient,
    job_id: Uuid,
    schedule_id: Uuid,
    scheduled_for: DateTime<Utc>,
) -> Result<(), ApiError> {
    const SQL: &str = "UPDATE jobs SET schedule_id = $2, scheduled_for = $3 WHERE id = $1";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .execute(&stmt, &[&job_id, &schedule_id, &scheduled_for])
        .await?;
    Ok(())
}

/// Moves a schedule on to its next tick, recording the job just created.
pub(super) async fn advance(
    client: &impl GenericClient,
    id: Uuid,
    next_run_at: DateTime<Utc>,
    job_id: Option<Uuid>,
) -> Result<(), ApiError> {
    const SQL: &str = "UPDATE schedules
                          SET next_run_at = $2,
                              last_run_at = CASE WHEN $3::uuid IS NULL THEN last_run_at ELSE now() END,
                              last_job_id = coalesce($3, last_job_id)
                        WHERE id = $1";
    let stmt = client.prepare_cached(SQL).await?;
    client.execute(&stmt, &[&id, &next_run_at, &job_id]).await?;
    Ok(())
}

/// Pauses a schedule whose rule no longer fires.
pub(super) async fn pause(client: &impl GenericClient, id: Uuid) -> Result<(), ApiError> {
    const SQL: &str = "UPDATE schedules SET paused = true, updated_at = now() WHERE id = $1";
    let stmt = client.prepare_cached(SQL).await?;
    client.execute(&stmt, &[&id]).await?;
    Ok(())
}
