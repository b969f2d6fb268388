//! gRPC handlers for `keel.jobs.v1.JobsService` and `JobRunnerService`.

use std::pin::Pin;

use deadpool_postgres::Pool;
use futures::Stream;
use keel_proto::jobs::v1::job_runner_service_server::JobRunnerService;
use keel_proto::jobs::v1::jobs_service_server::JobsService;
use keel_proto::jobs::v1::*;
use keel_shared::config::RedisConfig;
use tonic::{Request, Response, Status};

#[allow(dead_code)]
pub struct JobsApi {
    pool: Pool,
    redis: deadpool_redis::Pool,
    redis_config: RedisConfig,
}

impl JobsApi {
    pub fn new(pool: Pool, redis: deadpool_redis::Pool, redis_config: RedisConfig) -> Self {
        Self {
            pool,
            redis,
            redis_config,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl JobsService for JobsApi {
    async fn create_job(
        &self,
        _: Request<CreateJobRequest>,
    ) -> Result<Response<CreateJobResponse>, Status> {
        Err(Status::unimplemented("CreateJob is not implemented yet"))
    }
    async fn batch_create_jobs(
        &self,
        _: Request<BatchCreateJobsRequest>,
    ) -> Result<Response<BatchCreateJobsResponse>, Status> {
        Err(Status::unimplemented(
            "BatchCreateJobs is not implemented yet",
        ))
    }
    async fn get_job(&self, _: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        Err(Status::unimplemented("GetJob is not implemented yet"))
    }
    async fn list_jobs(
        &self,
        _: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Err(Status::unimplemented("ListJobs is not implemented yet"))
    }
    async fn cancel_job(
        &self,
        _: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        Err(Status::unimplemented("CancelJob is not implemented yet"))
    }
    type WatchJobStream = WatchStream;
    async fn watch_job(
        &self,
        _: Request<WatchJobRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        Err(Status::unimplemented("WatchJob is not implemented yet"))
    }
}

#[tonic::async_trait]
impl JobRunnerService for JobsApi {
    async fn start_job(
        &self,
        _: Request<StartJobRequest>,
    ) -> Result<Response<StartJobResponse>, Status> {
        Err(Status::unimplemented("StartJob is not implemented yet"))
    }
    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Err(Status::unimplemented("Heartbeat is not implemented yet"))
    }
    async fn complete_job(
        &self,
        _: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        Err(Status::unimplemented("CompleteJob is not implemented yet"))
    }
    async fn fail_job(
        &self,
        _: Request<FailJobRequest>,
    ) -> Result<Response<FailJobResponse>, Status> {
        Err(Status::unimplemented("FailJob is not implemented yet"))
    }
}
