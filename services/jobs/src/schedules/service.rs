//! What each ScheduleService RPC does, and firing due ticks: between the
//! gRPC handlers and the store.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use keel_proto::jobs::v1::{CreateScheduleRequest, UpdateScheduleRequest};
use keel_shared::ApiError;
use keel_shared::auth::Admin;
use uuid::Uuid;

use super::cron::Rule;
use super::domain::{self, Limits};
use super::store::{self, ScheduleRow};
use crate::delivery::{Delivery, PUBLISH_GRACE};
use crate::domain::NewJob;
use crate::store::{NewRow, Publication, insert_jobs};

/// Tunables (from `Config`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub limits: Limits,
    /// How long a scheduled job may wait for a worker (as CreateJob's default).
    pub schedule_timeout: Duration,
}

pub(crate) struct Schedules {
    pool: Pool,
    /// A tick's job is published as soon as its transaction commits, like a
    /// created job (the relay covers a publication that does not happen).
    delivery: Arc<Delivery>,
    settings: Settings,
}

fn not_found() -> ApiError {
    ApiError::NotFound("schedule".into())
}

/// The next tick after `now`; a rule that never fires again gives None.
fn next_tick(rule: &Rule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    rule.next_after(now)
}

impl Schedules {
    pub(crate) fn new(pool: Pool, delivery: Arc<Delivery>, settings: Settings) -> Self {
        Self {
            pool,
            delivery,
            settings,
        }
    }

    /// Validates and stores a schedule; the per-user limit is checked under a
    /// per-user lock, so concurrent creates cannot overshoot it.
    pub(crate) async fn create(
        &self,
        user_id: Uuid,
        req: &CreateScheduleRequest,
    ) -> Result<ScheduleRow, ApiError> {
        let now = Utc::now();
        let (fields, rule) = domain::validate_create(req, &self.settings.limits, now)?;
        let next = next_tick(&rule, now).ok_or_else(|| ApiError::invalid("cron", "never fires"))?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::lock_user(&tx, user_id).await?;
        let limit = self.settings.limits.per_user;
        if store::count_user(&tx, user_id).await? >= limit {
            return Err(ApiError::ResourceExhausted(format!(
                "at most {limit} schedules per user; delete one first"
            )));
        }
        let row = store::insert(&tx, Uuid::now_v7(), user_id, &fields, next).await?;
        tx.commit().await?;
        Ok(row)
    }

    pub(crate) async fn get(&self, user_id: Uuid, id: Uuid) -> Result<ScheduleRow, ApiError> {
        let client = self.pool.get().await?;
        store::user_schedule(&client, user_id, id, false)
            .await?
            .ok_or_else(not_found)
    }

    /// One page, and where the next starts (None on the last page).
    pub(crate) async fn list(
        &self,
        user_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<(Vec<ScheduleRow>, Option<Uuid>), ApiError> {
        let client = self.pool.get().await?;
        let mut rows = store::list(&client, user_id, before, limit + 1).await?;
        let next = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|s| s.id)
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Applies the request's set fields under the schedule's row lock (the
    /// ticker skips it meanwhile); fire times are computed again from now
    /// when the rule changed or the schedule was resumed.
    pub(crate) async fn update(
        &self,
        user_id: Uuid,
        id: Uuid,
        req: &UpdateScheduleRequest,
    ) -> Result<ScheduleRow, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = self.update_in(&tx, user_id, id, req).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// [`Schedules::update`] inside the caller's transaction.
    async fn update_in(
        &self,
        tx: &Transaction<'_>,
        user_id: Uuid,
        id: Uuid,
        req: &UpdateScheduleRequest,
    ) -> Result<ScheduleRow, ApiError> {
        let current = store::user_schedule(tx, user_id, id, true)
            .await?
            .ok_or_else(not_found)?;
        let now = Utc::now();
        let (fields, rule, recompute) =
            domain::validate_update(req, &current.fields(), &self.settings.limits, now)?;
        let next = if recompute {
            next_tick(&rule, now).ok_or_else(|| ApiError::invalid("cron", "never fires"))?
        } else {
            current.next_run_at
        };
        store::update(tx, id, &fields, next).await
    }

    /// Every user's schedules (or one user's): one page, and where the next
    /// starts (None on the last page).
    pub(crate) async fn list_any(
        &self,
        user_id: Option<Uuid>,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<(Vec<ScheduleRow>, Option<Uuid>), ApiError> {
        let client = self.pool.get().await?;
        let mut rows = store::list_any(&client, user_id, before, limit + 1).await?;
        let next = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|s| s.id)
        } else {
            None
        };
        Ok((rows, next))
    }

    /// An admin pauses or resumes any user's schedule (UpdateSchedule's
    /// rules); the audit record commits with the change.
    pub(crate) async fn set_paused_by_admin(
        &self,
        admin: &Admin,
        id: Uuid,
        paused: bool,
    ) -> Result<ScheduleRow, ApiError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let owner = store::owner(&tx, id).await?.ok_or_else(not_found)?;
        let req = UpdateScheduleRequest {
            id: id.to_string(),
            paused: Some(paused),
            ..Default::default()
        };
        let row = self.update_in(&tx, owner, id, &req).await?;
        let action = if paused {
            "schedule.pause"
        } else {
            "schedule.resume"
        };
        keel_shared::audit::record(
            &tx,
            admin,
            action,
            &format!("schedule:{id}"),
            serde_json::json!({ "user_id": owner.to_string(), "name": row.name }),
        )
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    pub(crate) async fn delete(&self, user_id: Uuid, id: Uuid) -> Result<(), ApiError> {
        let client = self.pool.get().await?;
        if store::delete(&client, user_id, id).await? {
            Ok(())
        } else {
            Err(not_found())
        }
    }

    /// Fires up to `limit` due ticks in one transaction: for each due
    /// schedule (locked; rows another replica holds are skipped), one job
    /// through the jobs store's create path (its outbox row included), the
    /// tick recorded on it, and next_run_at moved to the first fire time
    /// after now, so ticks missed meanwhile collapse into this one. A crash
    /// before the commit leaves nothing behind: the next round fires it.
    /// Returns how many due schedules it moved on (a full batch means more
    /// may be due).
    pub(crate) async fn fire_due(&self, limit: i64) -> Result<usize, ApiError> {
        let mut client = self.pool.get().await?;
        let mut tx = client.transaction().await?;
        let (now, due) = store::lock_due(&tx, limit).await?;
        let mut created = Vec::new();
        let mut handled = 0;
        for schedule in &due {
            // Each schedule in its own savepoint: one that fails (e.g. its
            // user was just deleted) does not hold back the others.
            let sp = tx.savepoint("tick").await?;
            match self.fire(&sp, schedule, now).await {
                Ok(fired) => {
                    sp.commit().await?;
                    handled += 1;
                    if let Some(job_id) = fired {
                        created.push(Publication {
                            job_id,
                            kind: schedule.kind.clone(),
                            priority: schedule.priority,
                            attempt: 0,
                            traceparent: None,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(schedule_id = %schedule.id, error = %e, "cannot fire schedule tick");
                    sp.rollback().await?;
                }
            }
        }
        tx.commit().await?;
        for job in &created {
            keel_shared::metrics::job_transition("created", &job.kind);
        }
        self.delivery.publish_soon(created);
        Ok(handled)
    }

    /// One schedule's due tick; the job it created, if it did.
    async fn fire(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        schedule: &ScheduleRow,
        now: DateTime<Utc>,
    ) -> Result<Option<Uuid>, ApiError> {
        let tick = schedule.next_run_at;
        let next = Rule::parse(&schedule.cron, &schedule.timezone)
            .ok()
            .and_then(|rule| next_tick(&rule, now.max(tick)));
        let job_id = if store::tick_fired(tx, schedule.id, tick).await? {
            None
        } else {
            let job = NewJob {
                kind: schedule.kind.clone(),
                payload: schedule.payload.clone(),
                priority: schedule.priority,
                max_attempts: schedule.max_attempts,
                run_at: None,
                idempotency_key: None,
                schedule_timeout: None,
                timeout: None,
            };
            let id = Uuid::now_v7();
            let row = NewRow {
                id,
                user_id: schedule.user_id,
                job: &job,
                schedule_timeout: self.settings.schedule_timeout,
                traceparent: None,
            };
            // Published after the commit (fire_due); the relay leaves it
            // alone for the grace, then delivers it if that did not happen.
            insert_jobs(tx, &[row], PUBLISH_GRACE).await?;
            store::mark_tick(tx, id, schedule.id, tick).await?;
            Some(id)
        };
        match next {
            Some(next) => store::advance(tx, schedule.id, next, job_id).await?,
            None => {
                tracing::warn!(schedule_id = %schedule.id, "schedule fires no more; pausing it");
                store::advance(tx, schedule.id, tick, job_id).await?;
                store::pause(tx, schedule.id).await?;
            }
        }
        Ok(job_id)
    }
}
