//! gRPC handlers for `keel.jobs.v1.ScheduleService`: decode, authorize, call
//! the service, encode.

use std::sync::Arc;

use keel_proto::jobs::v1::schedule_service_server::ScheduleService;
use keel_proto::jobs::v1::*;
use keel_shared::auth::Caller;
use keel_shared::paging;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::schedule_to_proto;
use super::domain::parse_id;
use super::service::Schedules;

pub(crate) struct ScheduleApi {
    schedules: Arc<Schedules>,
}

impl ScheduleApi {
    pub(crate) fn new(schedules: Arc<Schedules>) -> Self {
        Self { schedules }
    }
}

fn user<T>(req: &Request<T>) -> Result<Uuid, Status> {
    Ok(Caller::of(req)?.user_id()?)
}

#[tonic::async_trait]
impl ScheduleService for ScheduleApi {
    async fn create_schedule(
        &self,
        req: Request<CreateScheduleRequest>,
    ) -> Result<Response<CreateScheduleResponse>, Status> {
        let user_id = user(&req)?;
        let schedule = self.schedules.create(user_id, req.get_ref()).await?;
        Ok(Response::new(CreateScheduleResponse {
            schedule: Some(schedule_to_proto(&schedule)),
        }))
    }

    async fn get_schedule(
        &self,
        req: Request<GetScheduleRequest>,
    ) -> Result<Response<GetScheduleResponse>, Status> {
        let user_id = user(&req)?;
        let id = parse_id(&req.get_ref().id)?;
        let schedule = self.schedules.get(user_id, id).await?;
        Ok(Response::new(GetScheduleResponse {
            schedule: Some(schedule_to_proto(&schedule)),
        }))
    }

    /// Newest first; keyset pagination on the (v7) id.
    async fn list_schedules(
        &self,
        req: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        let user_id = user(&req)?;
        let r = req.get_ref();
        let limit = paging::page_size(r.page_size)?;
        let filter = format!("schedules|{user_id}");
        let before = paging::decode_token::<String>(&r.page_token, &filter)?
            .map(|c| Uuid::parse_str(&c))
            .transpose()
            .map_err(|_| keel_shared::ApiError::invalid("page_token", "malformed page token"))?;
        let (rows, next) = self.schedules.list(user_id, before, limit).await?;
        Ok(Response::new(ListSchedulesResponse {
            schedules: rows.iter().map(schedule_to_proto).collect(),
            next_page_token: next
                .map(|id| paging::encode_token(&filter, &id.to_string()))
                .unwrap_or_default(),
        }))
    }

    async fn update_schedule(
        &self,
        req: Request<UpdateScheduleRequest>,
    ) -> Result<Response<UpdateScheduleResponse>, Status> {
        let user_id = user(&req)?;
        let id = parse_id(&req.get_ref().id)?;
        let schedule = self.schedules.update(user_id, id, req.get_ref()).await?;
        Ok(Response::new(UpdateScheduleResponse {
            schedule: Some(schedule_to_proto(&schedule)),
        }))
    }

    async fn delete_schedule(
        &self,
        req: Request<DeleteScheduleRequest>,
    ) -> Result<Response<DeleteScheduleResponse>, Status> {
        let user_id = user(&req)?;
        let id = parse_id(&req.get_ref().id)?;
        self.schedules.delete(user_id, id).await?;
        Ok(Response::new(DeleteScheduleResponse {}))
    }
}
