//! What each AdminService RPC does: the jobs service's and the schedules
//! service's own rules applied to any user's job or schedule, each change
//! committed together with its audit record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use keel_shared::ApiError;
use keel_shared::auth::Admin;
use serde_json::json;
use uuid::Uuid;

use super::store::{self, AuditRow, KindNow, WorkerRow};
use crate::error::JobsError;
use crate::schedules::Schedules;
use crate::service::{self as jobs_service, Jobs};
use crate::store::{self as jobs_store, EventRow, JobFilter, JobRow};

/// Minutes in GetQueueStats' window.
pub(crate) const MINUTES: usize = 60;
/// Workers not seen for this long are no longer listed.
const WORKER_LISTED_FOR: Duration = Duration::from_secs(600);
/// Most workers listed.
const MAX_WORKERS: i64 = 1000;

/// One kind's figures, as GetQueueStats reports them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KindStats {
    pub now: KindNow,
    pub started: [i64; MINUTES],
    pub finished: [i64; MINUTES],
    pub failed: [i64; MINUTES],
}

impl Default for KindStats {
    fn default() -> Self {
        Self {
            now: KindNow::default(),
            started: [0; MINUTES],
            finished: [0; MINUTES],
            failed: [0; MINUTES],
        }
    }
}

pub(crate) struct AdminService {
    pool: Pool,
    jobs: Arc<Jobs>,
    schedules: Arc<Schedules>,
}

impl AdminService {
    pub(crate) fn new(pool: Pool, jobs: Arc<Jobs>, schedules: Arc<Schedules>) -> Self {
        Self {
            pool,
            jobs,
            schedules,
        }
    }

    pub(crate) fn schedules(&self) -> &Schedules {
        &self.schedules
    }

    /// One page of every user's jobs and where the next starts.
    pub(crate) async fn list_jobs(
        &self,
        filter: &JobFilter,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<(Vec<JobRow>, Option<Uuid>), JobsError> {
        let client = self.pool.get().await?;
        let mut rows = jobs_store::list_any_jobs(&client, filter, before, limit + 1).await?;
        let next = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|j| j.id)
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Any user's job and its history, oldest event first.
    pub(crate) async fn get_job(&self, id: Uuid) -> Result<(JobRow, Vec<EventRow>), JobsError> {
        let client = self.pool.get().await?;
        let job = jobs_store::job(&client, id)
            .await?
            .ok_or(JobsError::NotFound)?;
        let events = jobs_store::job_history(&client, job.user_id, id)
            .await?
            .ok_or(JobsError::NotFound)?;
        Ok((job, events))
    }

    /// CancelJob's rules for any user's job; audited when it changed the job.
    pub(crate) async fn cancel_job(&self, admin: &Admin, id: Uuid) -> Result<JobRow, JobsError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let owner = owner(&tx, id).await?;
        let (job, changed) = jobs_service::cancel_on(&tx, owner, id).await?;
        if changed {
            audit_job(&tx, admin, "job.cancel", &job).await?;
        }
        tx.commit().await?;
        if changed {
            self.jobs.cancelled(&job);
        }
        Ok(job)
    }

    /// RetryJob's rules for any user's job; audited.
    pub(crate) async fn retry_job(&self, admin: &Admin, id: Uuid) -> Result<JobRow, JobsError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let owner = owner(&tx, id).await?;
        let job = jobs_service::retry_on(&tx, owner, id).await?;
        audit_job(&tx, admin, "job.retry", &job).await?;
        tx.commit().await?;
        self.jobs.retried(&job);
        Ok(job)
    }

    /// DeleteJob's rules for any user's job; audited.
    pub(crate) async fn delete_job(&self, admin: &Admin, id: Uuid) -> Result<(), JobsError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let job = jobs_store::job(&tx, id).await?.ok_or(JobsError::NotFound)?;
        jobs_service::delete_on(&tx, job.user_id, id).await?;
        audit_job(&tx, admin, "job.delete", &job).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Per-kind figures (sorted by kind) and when they were read.
    pub(crate) async fn queue_stats(
        &self,
    ) -> Result<(BTreeMap<String, KindStats>, DateTime<Utc>), JobsError> {
        let client = self.pool.get().await?;
        let (now, as_of) = store::queue_now(&client).await?;
        let minutes = store::last_hour(&client).await?;
        let mut kinds: BTreeMap<String, KindStats> = BTreeMap::new();
        for (kind, figures) in now {
            kinds.entry(kind).or_default().now = figures;
        }
        for m in minutes {
            let stats = kinds.entry(m.kind).or_default();
            stats.started[m.minute] += m.started;
            stats.finished[m.minute] += m.finished;
            stats.failed[m.minute] += m.failed;
        }
        Ok((kinds, as_of))
    }

    /// Workers seen in the last ten minutes, most recently seen first.
    pub(crate) async fn workers(&self) -> Result<Vec<WorkerRow>, JobsError> {
        let client = self.pool.get().await?;
        let since =
            Utc::now() - chrono::Duration::from_std(WORKER_LISTED_FOR).expect("ten minutes fit");
        store::workers(&client, since, MAX_WORKERS).await
    }

    /// One page of the audit trail and where the next starts.
    pub(crate) async fn audit_events(
        &self,
        before: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<(Vec<AuditRow>, Option<(DateTime<Utc>, Uuid)>), JobsError> {
        let client = self.pool.get().await?;
        let mut rows = store::audit_events(&client, before, limit + 1).await?;
        let next = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|e| (e.at, e.id))
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Retries (FAILED or CANCELLED) or delivers again (QUEUED) a dead
    /// letter's job, audited; the caller removes the entry after the commit.
    pub(crate) async fn replay_job(
        &self,
        admin: &Admin,
        id: Uuid,
        entry: &str,
    ) -> Result<JobRow, JobsError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let job = jobs_store::job(&tx, id).await?.ok_or_else(|| {
            JobsError::WrongState("the dead letter's job no longer exists".into())
        })?;
        let (job, retried) = match job.status {
            crate::domain::JobState::Failed | crate::domain::JobState::Cancelled => {
                (jobs_service::retry_on(&tx, job.user_id, id).await?, true)
            }
            crate::domain::JobState::Queued => (job, false),
            other => {
                return Err(JobsError::WrongState(format!(
                    "the dead letter's job is {}: nothing to replay",
                    other.as_str()
                )));
            }
        };
        keel_shared::audit::record(
            &tx,
            admin,
            "dead_letter.replay",
            &format!("job:{id}"),
            json!({ "entry": entry, "user_id": job.user_id.to_string(), "kind": job.kind, "retried": retried }),
        )
        .await?;
        tx.commit().await?;
        if retried {
            self.jobs.retried(&job);
        } else {
            self.jobs.redeliver(&job);
        }
        Ok(job)
    }
}

/// Whose job this is (NOT_FOUND when there is none).
async fn owner(
    client: &impl deadpool_postgres::GenericClient,
    id: Uuid,
) -> Result<Uuid, JobsError> {
    Ok(jobs_store::job(client, id)
        .await?
        .ok_or(JobsError::NotFound)?
        .user_id)
}

async fn audit_job(
    client: &impl deadpool_postgres::GenericClient,
    admin: &Admin,
    action: &str,
    job: &JobRow,
) -> Result<(), JobsError> {
    keel_shared::audit::record(
        client,
        admin,
        action,
        &format!("job:{}", job.id),
        json!({ "user_id": job.user_id.to_string(), "kind": job.kind, "status": job.status.as_str() }),
    )
    .await
    .map_err(ApiError::from)?;
    Ok(())
}
