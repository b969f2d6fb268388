//! gRPC handlers for `keel.memory.v1.MemoryService`: decode, validate, call
//! the service layer, encode.

use chrono::Utc;
use keel_proto::memory::v1::memory_service_server::MemoryService;
use keel_proto::memory::v1::*;
use keel_shared::auth::Caller;
use keel_shared::paging;
use tonic::{Request, Response, Status};

use crate::convert::{encode_hit, encode_memory, encode_workspace};
use crate::domain::{self, NewMemory};
use crate::error::MemoryError;
use crate::service::{ListRequest, Memories, SearchRequest};
use crate::store::Scope;

pub struct MemoryApi {
    memories: Memories,
}

impl MemoryApi {
    pub fn new(memories: Memories) -> Self {
        Self { memories }
    }
}

#[tonic::async_trait]
impl MemoryService for MemoryApi {
    async fn put_memory(
        &self,
        request: Request<PutMemoryRequest>,
    ) -> Result<Response<PutMemoryResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let memory = NewMemory::validate(request.into_inner(), self.memories.limits(), Utc::now())?;
        let (stored, created) = self.memories.put(user_id, &memory).await?;
        Ok(Response::new(PutMemoryResponse {
            memory: Some(encode_memory(stored)),
            created,
        }))
    }

    async fn get_memory(
        &self,
        request: Request<GetMemoryRequest>,
    ) -> Result<Response<GetMemoryResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        domain::validate_namespace(&req.namespace)?;
        domain::validate_key("key", &req.key, self.memories.limits())?;
        let version = domain::validate_version(req.version)?;
        let memory = self
            .memories
            .get(user_id, &req.namespace, &req.key, version)
            .await?;
        Ok(Response::new(GetMemoryResponse {
            memory: Some(encode_memory(memory)),
        }))
    }

    async fn list_memories(
        &self,
        request: Request<ListMemoriesRequest>,
    ) -> Result<Response<ListMemoriesResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        let limits = self.memories.limits();
        let page_size = paging::page_size(req.page_size)?;
        domain::validate_namespace(&req.namespace)?;
        domain::validate_key_prefix(&req.key_prefix, limits)?;
        let tag = (!req.tag.is_empty()).then_some(req.tag.as_str());
        if let Some(tag) = tag {
            domain::validate_tag("tag", tag, limits)?;
        }
        let (memories, next_page_token) = self
            .memories
            .list(
                user_id,
                &ListRequest {
                    namespace: &req.namespace,
                    key_prefix: &req.key_prefix,
                    tag,
                    page_size,
                    page_token: &req.page_token,
                },
            )
            .await?;
        Ok(Response::new(ListMemoriesResponse {
            memories: memories.into_iter().map(encode_memory).collect(),
            next_page_token,
        }))
    }

    async fn delete_memory(
        &self,
        request: Request<DeleteMemoryRequest>,
    ) -> Result<Response<DeleteMemoryResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        domain::validate_namespace(&req.namespace)?;
        domain::validate_key("key", &req.key, self.memories.limits())?;
        let expected = domain::validate_expected_version(req.expected_version)?;
        self.memories
            .delete(user_id, &req.namespace, &req.key, expected)
            .await?;
        Ok(Response::new(DeleteMemoryResponse {}))
    }

    async fn search_memories(
        &self,
        request: Request<SearchMemoriesRequest>,
    ) -> Result<Response<SearchMemoriesResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        let limits = self.memories.limits();
        domain::validate_namespace(&req.namespace)?;
        let query = domain::search_query(&req.query, limits)?;
        let limit = domain::search_limit(req.limit)?;
        let page_size = domain::search_page_size(req.page_size, limit)?;
        let tags = domain::search_tags(&req.tags, limits)?;
        let (hits, next_page_token) = self
            .memories
            .search(
                user_id,
                &SearchRequest {
                    namespace: &req.namespace,
                    query: &query,
                    tags: &tags,
                    page_size,
                    page_token: &req.page_token,
                },
            )
            .await?;
        Ok(Response::new(SearchMemoriesResponse {
            results: hits.into_iter().map(encode_hit).collect(),
            next_page_token,
        }))
    }

    async fn get_workspace(
        &self,
        request: Request<GetWorkspaceRequest>,
    ) -> Result<Response<GetWorkspaceResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        domain::validate_namespace(&req.namespace)?;
        let scope = match (req.all_namespaces, req.namespace.as_str()) {
            (false, ns) => Scope::Namespace(ns),
            (true, "") => Scope::AllNamespaces,
            (true, _) => {
                return Err(MemoryError::invalid(
                    "namespace",
                    "must be empty when all_namespaces is set",
                )
                .into());
            }
        };
        let ws = self.memories.workspace(user_id, scope).await?;
        Ok(Response::new(GetWorkspaceResponse {
            workspace: Some(encode_workspace(ws)),
        }))
    }

    async fn list_memory_versions(
        &self,
        request: Request<ListMemoryVersionsRequest>,
    ) -> Result<Response<ListMemoryVersionsResponse>, Status> {
        let user_id = Caller::of(&request)?.user_id()?;
        let req = request.into_inner();
        domain::validate_namespace(&req.namespace)?;
        domain::validate_key("key", &req.key, self.memories.limits())?;
        let versions = self
            .memories
            .versions(user_id, &req.namespace, &req.key)
            .await?;
        Ok(Response::new(ListMemoryVersionsResponse {
            versions: versions.into_iter().map(encode_memory).collect(),
        }))
    }
}
