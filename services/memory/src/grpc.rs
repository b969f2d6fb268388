//! gRPC handlers for `keel.memory.v1.MemoryService`.

use deadpool_postgres::Pool;
use keel_proto::memory::v1::memory_service_server::MemoryService;
use keel_proto::memory::v1::*;
use tonic::{Request, Response, Status};

pub struct MemoryApi {
    #[allow(dead_code)]
    pool: Pool,
}

impl MemoryApi {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

#[tonic::async_trait]
impl MemoryService for MemoryApi {
    async fn put_memory(
        &self,
        _: Request<PutMemoryRequest>,
    ) -> Result<Response<PutMemoryResponse>, Status> {
        Err(Status::unimplemented("PutMemory is not implemented yet"))
    }
    async fn get_memory(
        &self,
        _: Request<GetMemoryRequest>,
    ) -> Result<Response<GetMemoryResponse>, Status> {
        Err(Status::unimplemented("GetMemory is not implemented yet"))
    }
    async fn list_memories(
        &self,
        _: Request<ListMemoriesRequest>,
    ) -> Result<Response<ListMemoriesResponse>, Status> {
        Err(Status::unimplemented("ListMemories is not implemented yet"))
    }
    async fn delete_memory(
        &self,
        _: Request<DeleteMemoryRequest>,
    ) -> Result<Response<DeleteMemoryResponse>, Status> {
        Err(Status::unimplemented("DeleteMemory is not implemented yet"))
    }
    async fn search_memories(
        &self,
        _: Request<SearchMemoriesRequest>,
    ) -> Result<Response<SearchMemoriesResponse>, Status> {
        Err(Status::unimplemented(
            "SearchMemories is not implemented yet",
        ))
    }
    async fn get_workspace(
        &self,
        _: Request<GetWorkspaceRequest>,
    ) -> Result<Response<GetWorkspaceResponse>, Status> {
        Err(Status::unimplemented("GetWorkspace is not implemented yet"))
    }
}
