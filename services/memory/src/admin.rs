//! `keel.admin.v1.MemoryAdminService`: one user's memories, read-only, for
//! an admin (the admin gate has admitted the caller); every call is
//! recorded in the audit trail as "memory.read".

use chrono::{DateTime, Utc};
use keel_proto::admin::v1::memory_admin_service_server::MemoryAdminService;
use keel_proto::admin::v1::{ListUserMemoriesRequest, ListUserMemoriesResponse};
use keel_shared::auth::Admin;
use keel_shared::paging;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::convert::encode_memory;
use crate::domain;
use crate::error::MemoryError;
use crate::store::Store;

pub struct MemoryAdminApi {
    store: Store,
    limits: crate::config::Limits,
}

impl MemoryAdminApi {
    pub fn new(store: Store, limits: crate::config::Limits) -> Self {
        Self { store, limits }
    }
}

#[tonic::async_trait]
impl MemoryAdminService for MemoryAdminApi {
    async fn list_user_memories(
        &self,
        request: Request<ListUserMemoriesRequest>,
    ) -> Result<Response<ListUserMemoriesResponse>, Status> {
        let admin = Admin::of(&request)?.clone();
        let req = request.into_inner();
        if req.user_id.is_empty() {
            return Err(MemoryError::invalid("user_id", "is required").into());
        }
        let user_id = Uuid::parse_str(&req.user_id)
            .map_err(|_| MemoryError::invalid("user_id", "must be a UUID"))?;
        domain::validate_namespace(&req.namespace)?;
        let limit = paging::page_size(req.page_size)?;
        let filter = format!("admin-memories|{user_id}|{}", req.namespace);
        let after: Option<(i64, String)> = paging::decode_token(&req.page_token, &filter)?;
        let after = match after {
            Some((micros, key)) => {
                let at = DateTime::<Utc>::from_timestamp_micros(micros)
                    .ok_or_else(|| MemoryError::invalid("page_token", "malformed page token"))?;
                if domain::validate_key("page_token", &key, &self.limits).is_err() {
                    return Err(MemoryError::invalid("page_token", "malformed page token").into());
                }
                Some((at, key))
            }
            None => None,
        };
        let mut rows = self
            .store
            .list_for_admin(
                &admin,
                user_id,
                &req.namespace,
                after.as_ref().map(|(at, key)| (*at, key.as_str())),
                limit + 1,
            )
            .await?;
        let next_page_token = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last()
                .map(|m| {
                    paging::encode_token(&filter, &(m.updated_at.timestamp_micros(), m.key.clone()))
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListUserMemoriesResponse {
            memories: rows.into_iter().map(encode_memory).collect(),
            next_page_token,
        }))
    }
}
