//! gRPC handlers for `keel.admin.v1.AdminService`: decode, call the admin
//! service, encode. The admin gate (`Authenticator::admins_only`) has
//! already admitted the caller and put the [`Admin`] on the request.

use std::sync::Arc;

use keel_proto::admin::v1::admin_service_server::AdminService;
use keel_proto::admin::v1::*;
use keel_shared::auth::Admin;
use keel_shared::config::RedisConfig;
use keel_shared::json::json_to_struct;
use keel_shared::time::{from_timestamp, to_timestamp};
use keel_shared::{ApiError, dead_letters, paging};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::service::{AdminService as Service, KindStats as Stats};
use crate::convert::{event_to_proto, job_to_proto};
use crate::domain::{self, JobState};
use crate::error::JobsError;
use crate::schedules::schedule_to_proto;
use crate::store::JobFilter;

pub(crate) struct AdminApi {
    service: Arc<Service>,
    redis: keel_shared::redis::Pool,
    redis_config: RedisConfig,
}

impl AdminApi {
    pub(crate) fn new(
        service: Arc<Service>,
        redis: keel_shared::redis::Pool,
        redis_config: RedisConfig,
    ) -> Self {
        Self {
            service,
            redis,
            redis_config,
        }
    }

    async fn redis(&self) -> Result<keel_shared::redis::Connection, Status> {
        self.redis.get().await.map_err(|e| {
            tracing::warn!(error = %e, "admin: redis unavailable");
            Status::unavailable("cannot reach Redis right now, try again")
        })
    }
}

fn admin<T>(req: &Request<T>) -> Result<Admin, Status> {
    Ok(Admin::of(req)?.clone())
}

fn redis_error(e: redis::RedisError) -> Status {
    tracing::warn!(error = %e, "admin: dead-letter stream");
    Status::unavailable("cannot read the dead-letter stream right now, try again")
}

/// An optional UUID filter: empty means any.
fn optional_id(field: &'static str, raw: &str) -> Result<Option<Uuid>, JobsError> {
    if raw.is_empty() {
        return Ok(None);
    }
    Uuid::parse_str(raw)
        .map(Some)
        .map_err(|_| JobsError::invalid(field, "must be a UUID"))
}

fn optional_time(
    field: &'static str,
    ts: Option<&prost_types::Timestamp>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, JobsError> {
    ts.map(|ts| {
        from_timestamp(ts).ok_or_else(|| JobsError::invalid(field, "is not a valid timestamp"))
    })
    .transpose()
}

/// A page token holding a UUID cursor.
fn uuid_cursor(token: &str, filter: &str) -> Result<Option<Uuid>, JobsError> {
    paging::decode_token::<String>(token, filter)?
        .map(|c| Uuid::parse_str(&c))
        .transpose()
        .map_err(|_| JobsError::invalid("page_token", "malformed page token"))
}

fn stats_proto(kind: String, s: Stats) -> KindStats {
    KindStats {
        kind,
        queued: s.now.queued,
        due: s.now.due,
        running: s.now.running,
        oldest_due_age: s.now.oldest_due_secs.map(|secs| {
            let secs = secs.max(0.0);
            prost_types::Duration {
                seconds: secs.trunc() as i64,
                nanos: (secs.fract() * 1e9) as i32,
            }
        }),
        started_per_minute: s.started.to_vec(),
        finished_per_minute: s.finished.to_vec(),
        failed_per_minute: s.failed.to_vec(),
    }
}

fn dead_letter_proto(e: &dead_letters::Entry) -> DeadLetter {
    DeadLetter {
        id: e.id.clone(),
        job_id: e
            .job_id
            .as_deref()
            .filter(|id| Uuid::parse_str(id).is_ok())
            .unwrap_or_default()
            .to_string(),
        stream: e.stream.clone().unwrap_or_default(),
        reason: e.reason.clone().unwrap_or_default(),
        deliveries: e.deliveries.map_or(0, |d| d.min(i64::MAX as u64) as i64),
        consumer: e.consumer.clone().unwrap_or_default(),
        dead_lettered_at: e.dead_lettered_at().map(to_timestamp),
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let r = req.get_ref();
        let limit = paging::page_size(r.page_size)?;
        let status = JobState::filter_from_proto(r.status)?;
        if !r.kind.is_empty() {
            domain::validate_kind(&r.kind).map_err(|why| JobsError::invalid("kind", why))?;
        }
        let filter = JobFilter {
            user_id: optional_id("user_id", &r.user_id)?,
            status,
            kind: (!r.kind.is_empty()).then(|| r.kind.clone()),
            created_after: optional_time("created_after", r.created_after.as_ref())?,
            created_before: optional_time("created_before", r.created_before.as_ref())?,
        };
        let fingerprint = format!(
            "admin-jobs|{}|{}|{}|{:?}|{:?}",
            filter.user_id.map(|u| u.to_string()).unwrap_or_default(),
            status.map(JobState::as_str).unwrap_or(""),
            r.kind,
            filter.created_after.map(|t| t.timestamp_micros()),
            filter.created_before.map(|t| t.timestamp_micros()),
        );
        let before = uuid_cursor(&r.page_token, &fingerprint)?;
        let (jobs, next) = self.service.list_jobs(&filter, before, limit).await?;
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.iter().map(job_to_proto).collect(),
            next_page_token: next
                .map(|id| paging::encode_token(&fingerprint, &id.to_string()))
                .unwrap_or_default(),
        }))
    }

    async fn get_job(
        &self,
        req: Request<GetJobRequest>,
    ) -> Result<Response<GetJobResponse>, Status> {
        let id = domain::parse_id(&req.get_ref().id)?;
        let (job, events) = self.service.get_job(id).await?;
        Ok(Response::new(GetJobResponse {
            job: Some(job_to_proto(&job)),
            events: events.iter().map(event_to_proto).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let admin = admin(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        let job = self.service.cancel_job(&admin, id).await?;
        Ok(Response::new(CancelJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn retry_job(
        &self,
        req: Request<RetryJobRequest>,
    ) -> Result<Response<RetryJobResponse>, Status> {
        let admin = admin(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        let job = self.service.retry_job(&admin, id).await?;
        Ok(Response::new(RetryJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn delete_job(
        &self,
        req: Request<DeleteJobRequest>,
    ) -> Result<Response<DeleteJobResponse>, Status> {
        let admin = admin(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        self.service.delete_job(&admin, id).await?;
        Ok(Response::new(DeleteJobResponse {}))
    }

    async fn get_queue_stats(
        &self,
        _req: Request<GetQueueStatsRequest>,
    ) -> Result<Response<GetQueueStatsResponse>, Status> {
        let (kinds, as_of) = self.service.queue_stats().await?;
        Ok(Response::new(GetQueueStatsResponse {
            kinds: kinds
                .into_iter()
                .map(|(kind, stats)| stats_proto(kind, stats))
                .collect(),
            as_of: Some(to_timestamp(as_of)),
        }))
    }

    async fn list_workers(
        &self,
        _req: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self.service.workers().await?;
        Ok(Response::new(ListWorkersResponse {
            workers: workers
                .into_iter()
                .map(|w| Worker {
                    worker_id: w.worker_id,
                    kinds: w.kinds,
                    concurrency: w.concurrency,
                    last_seen_at: Some(to_timestamp(w.last_seen_at)),
                    running_jobs: w.running_jobs.min(i64::from(i32::MAX)) as i32,
                })
                .collect(),
        }))
    }

    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let r = req.get_ref();
        let limit = paging::page_size(r.page_size)?;
        let fingerprint = "admin-dead-letters";
        let before = paging::decode_token::<String>(&r.page_token, fingerprint)?;
        if before
            .as_deref()
            .is_some_and(|id| !dead_letters::is_entry_id(id))
        {
            return Err(ApiError::invalid("page_token", "malformed page token").into());
        }
        let mut conn = self.redis().await?;
        let mut entries = dead_letters::newest(
            &mut *conn,
            &self.redis_config,
            before.as_deref(),
            limit as usize + 1,
        )
        .await
        .map_err(redis_error)?;
        let next = if entries.len() as i64 > limit {
            entries.truncate(limit as usize);
            entries.last().map(|e| e.id.clone())
        } else {
            None
        };
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: entries.iter().map(dead_letter_proto).collect(),
            next_page_token: next
                .map(|id| paging::encode_token(fingerprint, &id))
                .unwrap_or_default(),
        }))
    }

    async fn replay_dead_letter(
        &self,
        req: Request<ReplayDeadLetterRequest>,
    ) -> Result<Response<ReplayDeadLetterResponse>, Status> {
        let admin = admin(&req)?;
        let id = req.get_ref().id.trim();
        if id.is_empty() {
            return Err(ApiError::invalid("id", "is required").into());
        }
        if !dead_letters::is_entry_id(id) {
            return Err(ApiError::invalid(
                "id",
                "must be a dead-letter entry id like 1700000000000-0",
            )
            .into());
        }
        let mut conn = self.redis().await?;
        let entry = dead_letters::get(&mut *conn, &self.redis_config, id)
            .await
            .map_err(redis_error)?
            .ok_or_else(|| ApiError::NotFound("dead letter".into()))?;
        let job_id = entry
            .job_id
            .as_deref()
            .and_then(|j| Uuid::parse_str(j).ok())
            .ok_or_else(|| {
                ApiError::FailedPrecondition("the dead letter carries no valid job id".into())
            })?;
        let job = self.service.replay_job(&admin, job_id, id).await?;
        // After the commit: a failure here leaves the entry, and replaying it
        // again retries nothing twice (the job is queued by then).
        if let Err(e) = dead_letters::remove(&mut *conn, &self.redis_config, id).await {
            tracing::warn!(error = %e, entry = id, "admin: replayed dead letter not removed");
        }
        Ok(Response::new(ReplayDeadLetterResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn list_schedules(
        &self,
        req: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        let r = req.get_ref();
        let limit = paging::page_size(r.page_size)?;
        let user_id = optional_id("user_id", &r.user_id)?;
        let fingerprint = format!(
            "admin-schedules|{}",
            user_id.map(|u| u.to_string()).unwrap_or_default()
        );
        let before = uuid_cursor(&r.page_token, &fingerprint)?;
        let (rows, next) = self
            .service
            .schedules()
            .list_any(user_id, before, limit)
            .await?;
        Ok(Response::new(ListSchedulesResponse {
            schedules: rows.iter().map(schedule_to_proto).collect(),
            next_page_token: next
                .map(|id| paging::encode_token(&fingerprint, &id.to_string()))
                .unwrap_or_default(),
        }))
    }

    async fn pause_schedule(
        &self,
        req: Request<PauseScheduleRequest>,
    ) -> Result<Response<PauseScheduleResponse>, Status> {
        let admin = admin(&req)?;
        let id = crate::schedules::domain::parse_id(&req.get_ref().id)?;
        let row = self
            .service
            .schedules()
            .set_paused_by_admin(&admin, id, true)
            .await?;
        Ok(Response::new(PauseScheduleResponse {
            schedule: Some(schedule_to_proto(&row)),
        }))
    }

    async fn resume_schedule(
        &self,
        req: Request<ResumeScheduleRequest>,
    ) -> Result<Response<ResumeScheduleResponse>, Status> {
        let admin = admin(&req)?;
        let id = crate::schedules::domain::parse_id(&req.get_ref().id)?;
        let row = self
            .service
            .schedules()
            .set_paused_by_admin(&admin, id, false)
            .await?;
        Ok(Response::new(ResumeScheduleResponse {
            schedule: Some(schedule_to_proto(&row)),
        }))
    }

    async fn list_audit_events(
        &self,
        req: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        let r = req.get_ref();
        let limit = paging::page_size(r.page_size)?;
        let fingerprint = "admin-audit";
        let before = paging::decode_token::<(i64, String)>(&r.page_token, fingerprint)?
            .map(|(micros, id)| {
                let at = chrono::DateTime::from_timestamp_micros(micros);
                let id = Uuid::parse_str(&id).ok();
                at.zip(id)
            })
            .map(|c| c.ok_or_else(|| JobsError::invalid("page_token", "malformed page token")))
            .transpose()?;
        let (rows, next) = self.service.audit_events(before, limit).await?;
        Ok(Response::new(ListAuditEventsResponse {
            events: rows
                .iter()
                .map(|e| AuditEvent {
                    id: e.id.to_string(),
                    at: Some(to_timestamp(e.at)),
                    admin_user_id: e.admin_user_id.to_string(),
                    admin_email: e.admin_email.clone(),
                    action: e.action.clone(),
                    target: e.target.clone(),
                    detail: Some(json_to_struct(&e.detail)),
                })
                .collect(),
            next_page_token: next
                .map(|(at, id)| {
                    paging::encode_token(fingerprint, &(at.timestamp_micros(), id.to_string()))
                })
                .unwrap_or_default(),
        }))
    }
}
