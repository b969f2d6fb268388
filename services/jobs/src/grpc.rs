//! gRPC handlers for `keel.jobs.v1.JobsService` and `JobRunnerService`:
//! decode, authorize, call the service, encode.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::future::join_all;
use keel_proto::jobs::v1::job_runner_service_server::JobRunnerService;
use keel_proto::jobs::v1::jobs_service_server::JobsService;
use keel_proto::jobs::v1::*;
use keel_shared::auth::{Caller, Worker};
use keel_shared::paging;
use keel_shared::time::{opt_timestamp, to_timestamp};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::admin::workers::Sightings;
use crate::convert::{event_to_proto, job_to_proto};
use crate::domain::{self, JobState};
use crate::error::JobsError;
use crate::service::Jobs;
use crate::subscriptions::Subscriptions;

pub struct JobsApi {
    jobs: Arc<Jobs>,
    /// WatchJob's shared pub/sub connection and watcher cap.
    subscriptions: Arc<Subscriptions>,
    shutdown: CancellationToken,
    /// The workers seen, for the admin API's ListWorkers.
    sightings: Option<Arc<Sightings>>,
}

impl JobsApi {
    pub fn new(
        jobs: Arc<Jobs>,
        subscriptions: Arc<Subscriptions>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            jobs,
            subscriptions,
            shutdown,
            sightings: None,
        }
    }

    /// Notes the workers that call (see [`Sightings`]).
    pub(crate) fn with_sightings(mut self, sightings: Arc<Sightings>) -> Self {
        self.sightings = Some(sightings);
        self
    }

    fn saw(&self, worker_id: &str, kinds: &[String], all_kinds: bool, concurrency: Option<i32>) {
        if let Some(sightings) = &self.sightings {
            sightings.saw(worker_id, kinds, all_kinds, concurrency);
        }
    }
}

fn user<T>(req: &Request<T>) -> Result<uuid::Uuid, Status> {
    Ok(Caller::of(req)?.user_id()?)
}

/// The worker the runner interceptor admitted (it admits no one else).
fn worker<T>(req: &Request<T>) -> Result<&Worker, Status> {
    Ok(Worker::of(req)?)
}

/// The filter string a ListJobs page token is bound to.
fn list_filter(user_id: &uuid::Uuid, status: Option<JobState>, kind: &str) -> String {
    format!(
        "jobs|{user_id}|{}|{kind}",
        status.map(JobState::as_str).unwrap_or("")
    )
}

fn attempt(value: i32) -> Result<i32, JobsError> {
    if value < 1 {
        return Err(JobsError::invalid("attempt", "must be 1 or more"));
    }
    Ok(value)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl JobsService for JobsApi {
    async fn create_job(
        &self,
        req: Request<CreateJobRequest>,
    ) -> Result<Response<CreateJobResponse>, Status> {
        let user_id = user(&req)?;
        let new = domain::validate_create(req.get_ref(), "", self.jobs.max_payload_bytes())?;
        let job = self.jobs.create(user_id, vec![new]).await?.remove(0);
        Ok(Response::new(CreateJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn batch_create_jobs(
        &self,
        req: Request<BatchCreateJobsRequest>,
    ) -> Result<Response<BatchCreateJobsResponse>, Status> {
        let user_id = user(&req)?;
        let items = domain::validate_batch(&req.get_ref().requests, self.jobs.max_payload_bytes())?;
        let jobs = self.jobs.create(user_id, items).await?;
        Ok(Response::new(BatchCreateJobsResponse {
            jobs: jobs.iter().map(job_to_proto).collect(),
        }))
    }

    async fn get_job(
        &self,
        req: Request<GetJobRequest>,
    ) -> Result<Response<GetJobResponse>, Status> {
        let user_id = user(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        let job = self.jobs.get(user_id, id).await?;
        Ok(Response::new(GetJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    /// Newest first; keyset pagination on the (v7, time-ordered) id, so jobs
    /// created while paging never shift later pages (no duplicates, no gaps).
    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let user_id = user(&req)?;
        let r = req.get_ref();
        let limit = paging::page_size(r.page_size)?;
        let status = JobState::filter_from_proto(r.status)?;
        if !r.kind.is_empty() {
            domain::validate_kind(&r.kind).map_err(|why| JobsError::invalid("kind", why))?;
        }
        let filter = list_filter(&user_id, status, &r.kind);
        let before = paging::decode_token::<String>(&r.page_token, &filter)?
            .map(|c| uuid::Uuid::parse_str(&c))
            .transpose()
            .map_err(|_| JobsError::invalid("page_token", "malformed page token"))?;
        let kind = (!r.kind.is_empty()).then_some(r.kind.as_str());
        let (jobs, next) = self.jobs.list(user_id, status, kind, before, limit).await?;
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.iter().map(job_to_proto).collect(),
            next_page_token: next
                .map(|id| paging::encode_token(&filter, &id.to_string()))
                .unwrap_or_default(),
        }))
    }

    /// Queued -> CANCELLED at once; running -> `cancel_requested` (the job
    /// ends CANCELLED when the worker stops it); a repeat while running
    /// returns the job unchanged; a finished job, cancelled included, is
    /// FAILED_PRECONDITION.
    async fn cancel_job(
        &self,
        req: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let user_id = user(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        let job = self.jobs.cancel(user_id, id).await?;
        Ok(Response::new(CancelJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    type WatchJobStream = WatchStream;

    /// The current state first, then each newer state, ending after a
    /// terminal one. Beyond KEEL_JOBS_MAX_WATCHERS streams at once in this
    /// process: RESOURCE_EXHAUSTED.
    async fn watch_job(
        &self,
        req: Request<WatchJobRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let user_id = user(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        let updates = crate::watch::watch(
            self.jobs.clone(),
            self.subscriptions.clone(),
            user_id,
            id,
            self.shutdown.clone(),
        )
        .await?;
        Ok(Response::new(Box::pin(updates)))
    }

    /// Every transition of the caller's job, oldest first.
    async fn get_job_history(
        &self,
        req: Request<GetJobHistoryRequest>,
    ) -> Result<Response<GetJobHistoryResponse>, Status> {
        let user_id = user(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        let events = self.jobs.history(user_id, id).await?;
        Ok(Response::new(GetJobHistoryResponse {
            events: events.iter().map(event_to_proto).collect(),
        }))
    }

    /// FAILED or CANCELLED -> QUEUED with attempt 0, delivered as a new job;
    /// any other status -> FAILED_PRECONDITION naming it.
    async fn retry_job(
        &self,
        req: Request<RetryJobRequest>,
    ) -> Result<Response<RetryJobResponse>, Status> {
        let user_id = user(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        let job = self.jobs.retry(user_id, id).await?;
        Ok(Response::new(RetryJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    /// Deletes a finished job and its history; QUEUED or RUNNING ->
    /// FAILED_PRECONDITION.
    async fn delete_job(
        &self,
        req: Request<DeleteJobRequest>,
    ) -> Result<Response<DeleteJobResponse>, Status> {
        let user_id = user(&req)?;
        let id = domain::parse_id(&req.get_ref().id)?;
        self.jobs.delete(user_id, id).await?;
        Ok(Response::new(DeleteJobResponse {}))
    }
}

/// The worker's side. Every call needs a worker credential, checked by the
/// service's gate (`Authenticator::workers_only`: a user token is
/// PERMISSION_DENIED); a named credential may only record as its own name
/// (`Worker::may_record_as`, PERMISSION_DENIED naming `worker_id`); an unknown id is NOT_FOUND, a malformed one
/// INVALID_ARGUMENT. Each transition is one conditional UPDATE on
/// (id, status, attempt), so a duplicate or late call changes nothing and is
/// FAILED_PRECONDITION with a message saying what the job's state is.
#[tonic::async_trait]
impl JobRunnerService for JobsApi {
    /// QUEUED and due (run_at <= now) -> RUNNING, attempt + 1, lease for the
    /// configured lease length (default 30 s). Returns the job (with payload)
    /// and `lease_expires_at`. Already running, finished, cancelled or not
    /// due yet -> FAILED_PRECONDITION naming which.
    async fn start_job(
        &self,
        req: Request<StartJobRequest>,
    ) -> Result<Response<StartJobResponse>, Status> {
        let worker = worker(&req)?;
        Ok(Response::new(self.start_one(worker, req.get_ref()).await?))
    }

    /// Extends the lease of running attempt `attempt` by the lease length
    /// and reports `cancel_requested` (stop, then CompleteJob with
    /// `cancelled`). Any other state or attempt -> FAILED_PRECONDITION (the
    /// worker must stop: the attempt is no longer its own). A heartbeat
    /// after the lease ran out but before the reaper acted still extends it;
    /// one past the attempt's deadline (the job's timeout) never does.
    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = req.get_ref();
        worker(&req)?.may_record_as(&r.worker_id)?;
        let id = domain::parse_id(&r.id)?;
        let progress = r
            .progress
            .as_ref()
            .map(|s| domain::json_within(s, self.jobs.max_payload_bytes()))
            .transpose()
            .map_err(|why| JobsError::invalid("progress", why))?;
        let (lease_expires_at, cancel_requested) = self
            .jobs
            .heartbeat(id, attempt(r.attempt)?, progress)
            .await?;
        self.saw(&r.worker_id, &[], false, None);
        Ok(Response::new(HeartbeatResponse {
            lease_expires_at: Some(to_timestamp(lease_expires_at)),
            cancel_requested,
        }))
    }

    /// RUNNING attempt `attempt` -> SUCCEEDED with `output`, or with
    /// `cancelled` -> CANCELLED. `output` is bounded like payloads
    /// (INVALID_ARGUMENT `output`).
    async fn complete_job(
        &self,
        req: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        let worker = worker(&req)?;
        Ok(Response::new(
            self.complete_one(worker, req.get_ref()).await?,
        ))
    }

    /// RUNNING attempt `attempt` failed with `error`: while `retryable` and
    /// attempt < max_attempts -> QUEUED with run_at = now + backoff
    /// (exponential from the configured base, default 1 s, capped, with
    /// jitter) and re-delivered to the stream when due; otherwise FAILED.
    /// If cancellation was requested the job ends CANCELLED instead.
    async fn fail_job(
        &self,
        req: Request<FailJobRequest>,
    ) -> Result<Response<FailJobResponse>, Status> {
        let r = req.get_ref();
        worker(&req)?.may_record_as(&r.worker_id)?;
        let id = domain::parse_id(&r.id)?;
        let job = self
            .jobs
            .fail(id, attempt(r.attempt)?, &r.error, r.retryable, &r.worker_id)
            .await?;
        Ok(Response::new(FailJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    /// StartJob for each item, applied and answered one by one (they share
    /// the statements of their batch with every other start under way).
    /// 0 or more than 1000 items -> INVALID_ARGUMENT `requests`, nothing applied.
    async fn start_jobs(
        &self,
        req: Request<StartJobsRequest>,
    ) -> Result<Response<StartJobsResponse>, Status> {
        let worker = worker(&req)?;
        let items = &req.get_ref().requests;
        domain::validate_batch_len(items.len())?;
        let outcomes = join_all(items.iter().map(|r| self.start_one(worker, r))).await;
        let results = outcomes
            .into_iter()
            .map(|outcome| StartJobResult {
                outcome: Some(match outcome {
                    Ok(started) => start_job_result::Outcome::Started(started),
                    Err(status) => start_job_result::Outcome::Error(item_error(status)),
                }),
            })
            .collect();
        Ok(Response::new(StartJobsResponse { results }))
    }

    /// CompleteJob for each item, applied and answered one by one.
    /// 0 or more than 1000 items -> INVALID_ARGUMENT `requests`, nothing applied.
    async fn complete_jobs(
        &self,
        req: Request<CompleteJobsRequest>,
    ) -> Result<Response<CompleteJobsResponse>, Status> {
        let worker = worker(&req)?;
        let items = &req.get_ref().requests;
        domain::validate_batch_len(items.len())?;
        let outcomes = join_all(items.iter().map(|r| self.complete_one(worker, r))).await;
        let results = outcomes
            .into_iter()
            .map(|outcome| CompleteJobResult {
                outcome: Some(match outcome {
                    Ok(completed) => complete_job_result::Outcome::Completed(completed),
                    Err(status) => complete_job_result::Outcome::Error(item_error(status)),
                }),
            })
            .collect();
        Ok(Response::new(CompleteJobsResponse { results }))
    }

    /// Starts up to `max_jobs` due jobs of `kinds` for the caller, waiting
    /// up to `wait` for one. Bad kinds, max_jobs or wait -> INVALID_ARGUMENT
    /// naming the field, nothing claimed.
    async fn claim_jobs(
        &self,
        req: Request<ClaimJobsRequest>,
    ) -> Result<Response<ClaimJobsResponse>, Status> {
        let worker = worker(&req)?;
        let claim = domain::validate_claim(req.get_ref())?;
        worker.may_record_as(&claim.worker_id)?;
        self.saw(&claim.worker_id, &claim.kinds, true, Some(claim.max_jobs));
        let jobs = self
            .jobs
            .claim(
                &claim.worker_id,
                &claim.kinds,
                i64::from(claim.max_jobs),
                claim.wait,
                &self.shutdown,
            )
            .await?;
        Ok(Response::new(ClaimJobsResponse {
            jobs: jobs
                .iter()
                .map(|job| ClaimedJob {
                    lease_expires_at: opt_timestamp(job.lease_expires_at),
                    job: Some(job_to_proto(job)),
                })
                .collect(),
        }))
    }
}

/// The worker's transitions that have a batched form, one request each.
impl JobsApi {
    async fn start_one(
        &self,
        worker: &Worker,
        r: &StartJobRequest,
    ) -> Result<StartJobResponse, Status> {
        worker.may_record_as(&r.worker_id)?;
        let id = domain::parse_id(&r.id)?;
        if r.delivery_id.len() > domain::MAX_DELIVERY_ID_BYTES {
            return Err(JobsError::invalid("delivery_id", "at most 128 bytes").into());
        }
        let job = self.jobs.start(id, &r.worker_id, &r.delivery_id).await?;
        self.saw(&r.worker_id, std::slice::from_ref(&job.kind), false, None);
        Ok(StartJobResponse {
            lease_expires_at: opt_timestamp(job.lease_expires_at),
            job: Some(job_to_proto(&job)),
        })
    }

    async fn complete_one(
        &self,
        worker: &Worker,
        r: &CompleteJobRequest,
    ) -> Result<CompleteJobResponse, Status> {
        worker.may_record_as(&r.worker_id)?;
        let id = domain::parse_id(&r.id)?;
        let attempt = attempt(r.attempt)?;
        let output = r
            .output
            .as_ref()
            .map(|s| domain::json_within(s, self.jobs.max_payload_bytes()))
            .transpose()
            .map_err(|why| JobsError::invalid("output", why))?;
        let job = self
            .jobs
            .complete(id, attempt, output, r.cancelled, &r.worker_id)
            .await?;
        Ok(CompleteJobResponse {
            job: Some(job_to_proto(&job)),
        })
    }
}

/// One item's refusal in a batched answer: the code and message its own call would get.
fn item_error(status: Status) -> ItemError {
    ItemError {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}
