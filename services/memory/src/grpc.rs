//! gRPC handlers for `keel.memory.v1.MemoryService`: decode, authorize, call the store, encode.

use keel_proto::memory::v1::memory_service_server::MemoryService;
use keel_proto::memory::v1::*;
use keel_shared::auth::Caller;
use keel_shared::json::json_to_struct;
use keel_shared::time::{opt_timestamp, to_timestamp};
use keel_shared::{ApiError, paging};
use tonic::{Request, Response, Status};

use crate::config::Limits;
use crate::domain::{self, NewMemory};
use crate::error::MemoryError;
use crate::store::{MemoryRow, Store};

pub struct MemoryApi {
    store: Store,
    limits: Limits,
}

impl MemoryApi {
    pub fn new(store: Store, limits: Limits) -> Self {
        Self { store, limits }
    }
}

fn encode(m: MemoryRow) -> Memory {
    Memory {
        key: m.key,
        content: m.content,
        tags: m.tags,
        metadata: Some(json_to_struct(&m.metadata)),
        version: m.version,
        created_at: Some(to_timestamp(m.created_at)),
        updated_at: Some(to_timestamp(m.updated_at)),
    }
}

fn status(e: impl Into<ApiError>) -> Status {
    e.into().into()
}

#[tonic::async_trait]
impl MemoryService for MemoryApi {
    async fn put_memory(
        &self,
        request: Request<PutMemoryRequest>,
    ) -> Result<Response<PutMemoryResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        let memory = NewMemory::validate(
            req.key,
            req.content,
            &req.tags,
            req.metadata.as_ref(),
            req.expected_version,
            &self.limits,
        )?;
        let (stored, created) = self.store.put(user_id, &memory).await?;
        Ok(Response::new(PutMemoryResponse {
            memory: Some(encode(stored)),
            created,
        }))
    }

    async fn get_memory(
        &self,
        request: Request<GetMemoryRequest>,
    ) -> Result<Response<GetMemoryResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        domain::validate_key("key", &req.key, &self.limits)?;
        let memory = self.store.get(user_id, &req.key).await?;
        Ok(Response::new(GetMemoryResponse {
            memory: Some(encode(memory)),
        }))
    }

    async fn list_memories(
        &self,
        request: Request<ListMemoriesRequest>,
    ) -> Result<Response<ListMemoriesResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        let page_size = paging::page_size(req.page_size)?;
        domain::validate_key_prefix(&req.key_prefix, &self.limits)?;
        let tag = (!req.tag.is_empty()).then_some(req.tag.as_str());
        if let Some(tag) = tag {
            domain::validate_tag("tag", tag, &self.limits)?;
        }
        let filter = domain::list_filter(user_id, &req.key_prefix, &req.tag);
        let after: String = paging::decode_token(&req.page_token, &filter)?.unwrap_or_default();
        if !after.is_empty() && domain::validate_key("page_token", &after, &self.limits).is_err() {
            return Err(status(MemoryError::invalid(
                "page_token",
                "malformed page token",
            )));
        }
        let (lower, upper) = domain::prefix_range(&req.key_prefix);
        let mut memories = self
            .store
            .list(user_id, &after, (&lower, &upper), tag, page_size + 1)
            .await?;
        let next_page_token = if memories.len() as i64 > page_size {
            memories.truncate(page_size as usize);
            let last = memories.last().map(|m| m.key.clone()).unwrap_or_default();
            paging::encode_token(&filter, &last)
        } else {
            String::new()
        };
        Ok(Response::new(ListMemoriesResponse {
            memories: memories.into_iter().map(encode).collect(),
            next_page_token,
        }))
    }

    async fn delete_memory(
        &self,
        request: Request<DeleteMemoryRequest>,
    ) -> Result<Response<DeleteMemoryResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        domain::validate_key("key", &req.key, &self.limits)?;
        let expected = domain::validate_expected_version(req.expected_version)?;
        self.store.delete(user_id, &req.key, expected).await?;
        Ok(Response::new(DeleteMemoryResponse {}))
    }

    async fn search_memories(
        &self,
        request: Request<SearchMemoriesRequest>,
    ) -> Result<Response<SearchMemoriesResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        let query = domain::search_query(&req.query, &self.limits)?;
        let limit = domain::search_limit(req.limit)?;
        let results = self
            .store
            .search(user_id, &query, limit)
            .await?
            .ok_or_else(|| {
                MemoryError::invalid(
                    "query",
                    "has no words to search for (only stop words, symbols or exclusions)",
                )
            })?;
        Ok(Response::new(SearchMemoriesResponse {
            results: results
                .into_iter()
                .map(|(memory, score)| SearchResult {
                    memory: Some(encode(memory)),
                    score: f64::from(score),
                })
                .collect(),
        }))
    }

    async fn get_workspace(
        &self,
        request: Request<GetWorkspaceRequest>,
    ) -> Result<Response<GetWorkspaceResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let ws = self.store.workspace(user_id).await?;
        Ok(Response::new(GetWorkspaceResponse {
            workspace: Some(Workspace {
                memory_count: ws.memory_count,
                total_content_bytes: ws.total_content_bytes,
                tag_counts: ws.tag_counts.into_iter().collect(),
                last_updated_at: opt_timestamp(ws.last_updated_at),
                recent: ws.recent.into_iter().map(encode).collect(),
            }),
        }))
    }
}
