//! Conversions from the store's rows to the protobuf messages.

use keel_proto::memory::v1::{Memory, SearchResult, Workspace as WorkspaceMessage};
use keel_shared::json::json_to_struct;
use keel_shared::time::{opt_timestamp, to_timestamp};

use crate::store::{MemoryRow, SearchHit, Workspace};

pub fn encode_memory(m: MemoryRow) -> Memory {
    Memory {
        key: m.key,
        content: m.content,
        tags: m.tags,
        metadata: Some(json_to_struct(&m.metadata)),
        version: m.version,
        created_at: Some(to_timestamp(m.created_at)),
        updated_at: Some(to_timestamp(m.updated_at)),
        namespace: m.namespace,
        expires_at: opt_timestamp(m.expires_at),
    }
}

pub fn encode_hit(hit: SearchHit) -> SearchResult {
    SearchResult {
        memory: Some(encode_memory(hit.memory)),
        score: f64::from(hit.score),
        snippet: hit.snippet,
    }
}

pub fn encode_workspace(ws: Workspace) -> WorkspaceMessage {
    WorkspaceMessage {
        memory_count: ws.memory_count,
        total_content_bytes: ws.total_content_bytes,
        tag_counts: ws.tag_counts.into_iter().collect(),
        last_updated_at: opt_timestamp(ws.last_updated_at),
        recent: ws.recent.into_iter().map(encode_memory).collect(),
    }
}
