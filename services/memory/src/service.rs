//! The memory service's orchestration between the validated requests of the
//! gRPC layer and the store: page tokens, search pages, history bounds.

use keel_shared::batch::{self, Batcher};
use keel_shared::paging;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Limits;
use crate::domain::{self, NewMemory};
use crate::error::MemoryError;
use crate::store::{
    Lookup, MemoryRow, Scope, SearchCursor, SearchHit, SearchQuery, Store, Workspace,
};

pub struct Memories {
    store: Store,
    limits: Limits,
    /// GetMemory of current versions, read together while one read is under
    /// way (see [`Memories::spawn_reads`]).
    reads: Batcher<Lookup, Option<MemoryRow>, MemoryError>,
}

/// The GetMemory calls waiting for their read.
pub type ReadQueue = batch::Queue<Lookup, Option<MemoryRow>, MemoryError>;

/// Most GetMemory calls answered by one statement.
const READ_BATCH: usize = 128;
/// Reads under way at once: a call arriving while one runs starts the next.
const READS_IN_FLIGHT: usize = 2;
/// GetMemory calls waiting for their read; beyond this callers wait for room.
const READ_QUEUE: usize = 4096;

/// A validated ListMemories.
pub struct ListRequest<'a> {
    pub namespace: &'a str,
    pub key_prefix: &'a str,
    pub tag: Option<&'a str>,
    pub page_size: i64,
    pub page_token: &'a str,
}

/// A validated SearchMemories.
pub struct SearchRequest<'a> {
    pub namespace: &'a str,
    pub query: &'a str,
    pub tags: &'a [String],
    pub page_size: i64,
    pub page_token: &'a str,
}

/// Where the next search page starts, as carried in its page token.
#[derive(Serialize, Deserialize)]
struct SearchToken {
    score: f32,
    key: String,
}

impl Memories {
    pub fn new(store: Store, limits: Limits) -> (Self, ReadQueue) {
        let (reads, queue) = Batcher::new(READ_QUEUE);
        let memories = Self {
            store,
            limits,
            reads,
        };
        (memories, queue)
    }

    /// Spawns the reader: until `shutdown`, the GetMemory calls (current
    /// versions) that queued up while a read was under way are answered by
    /// one statement, as the jobs service commits transitions in groups.
    /// Under load this saves a Postgres round trip per call; a lone call
    /// does not wait.
    pub fn spawn_reads(store: Store, queue: ReadQueue, shutdown: CancellationToken) {
        tokio::spawn(batch::run(
            queue,
            READ_BATCH,
            READS_IN_FLIGHT,
            shutdown,
            move |lookups| {
                let store = store.clone();
                async move {
                    match store.get_current_many(&lookups).await {
                        Ok(found) => found.into_iter().map(Ok).collect(),
                        Err(e) => lookups.iter().map(|_| Err(e.clone())).collect(),
                    }
                }
            },
        ));
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub async fn put(
        &self,
        user_id: Uuid,
        memory: &NewMemory,
    ) -> Result<(MemoryRow, bool), MemoryError> {
        self.store
            .put(user_id, memory, self.limits.versions_kept)
            .await
    }

    pub async fn get(
        &self,
        user_id: Uuid,
        namespace: &str,
        key: &str,
        version: i64,
    ) -> Result<MemoryRow, MemoryError> {
        if version != 0 {
            return self
                .store
                .get(user_id, namespace, key, version, self.limits.versions_kept)
                .await;
        }
        let lookup = Lookup {
            user_id,
            namespace: namespace.to_string(),
            key: key.to_string(),
        };
        self.reads.call(lookup).await?.ok_or(MemoryError::NotFound)
    }

    pub async fn versions(
        &self,
        user_id: Uuid,
        namespace: &str,
        key: &str,
    ) -> Result<Vec<MemoryRow>, MemoryError> {
        let versions = self
            .store
            .versions(user_id, namespace, key, self.limits.versions_kept)
            .await?;
        if versions.is_empty() {
            return Err(MemoryError::NotFound);
        }
        Ok(versions)
    }

    pub async fn delete(
        &self,
        user_id: Uuid,
        namespace: &str,
        key: &str,
        expected_version: i64,
    ) -> Result<(), MemoryError> {
        self.store
            .delete(user_id, namespace, key, expected_version)
            .await
    }

    /// One page of memories and the next page's token (empty on the last).
    pub async fn list(
        &self,
        user_id: Uuid,
        req: &ListRequest<'_>,
    ) -> Result<(Vec<MemoryRow>, String), MemoryError> {
        let filter = domain::list_filter(
            user_id,
            req.namespace,
            req.key_prefix,
            req.tag.unwrap_or_default(),
        );
        let after: String = paging::decode_token(req.page_token, &filter)?.unwrap_or_default();
        if !after.is_empty() && domain::validate_key("page_token", &after, &self.limits).is_err() {
            return Err(MemoryError::invalid("page_token", "malformed page token"));
        }
        let (lower, upper) = domain::prefix_range(req.key_prefix);
        let mut memories = self
            .store
            .list(
                user_id,
                req.namespace,
                &after,
                (&lower, &upper),
                req.tag,
                req.page_size + 1,
            )
            .await?;
        let next = if memories.len() as i64 > req.page_size {
            memories.truncate(req.page_size as usize);
            let last = memories.last().map(|m| m.key.clone()).unwrap_or_default();
            paging::encode_token(&filter, &last)
        } else {
            String::new()
        };
        Ok((memories, next))
    }

    /// One page of matches, best first, and the next page's token (empty on
    /// the last).
    pub async fn search(
        &self,
        user_id: Uuid,
        req: &SearchRequest<'_>,
    ) -> Result<(Vec<SearchHit>, String), MemoryError> {
        let filter = domain::search_filter(user_id, req.namespace, req.query, req.tags);
        let cursor: Option<SearchToken> = paging::decode_token(req.page_token, &filter)?;
        if let Some(c) = &cursor
            && (!c.score.is_finite()
                || domain::validate_key("page_token", &c.key, &self.limits).is_err())
        {
            return Err(MemoryError::invalid("page_token", "malformed page token"));
        }
        let query = SearchQuery {
            namespace: req.namespace,
            query: req.query,
            tags: req.tags,
            candidates: self.limits.search_candidates,
            limit: req.page_size + 1,
            snippets: req.page_size,
            after: cursor.as_ref().map(|c| SearchCursor {
                score: c.score,
                key: &c.key,
            }),
        };
        let mut hits = self.store.search(user_id, &query).await?.ok_or_else(|| {
            MemoryError::invalid(
                "query",
                "has no words to search for (only stop words, symbols or exclusions)",
            )
        })?;
        let next = if hits.len() as i64 > req.page_size {
            hits.truncate(req.page_size as usize);
            let last = hits.last().map(|h| SearchToken {
                score: h.score,
                key: h.memory.key.clone(),
            });
            paging::encode_token(&filter, &last)
        } else {
            String::new()
        };
        Ok((hits, next))
    }

    pub async fn workspace(
        &self,
        user_id: Uuid,
        scope: Scope<'_>,
    ) -> Result<Workspace, MemoryError> {
        self.store.workspace(user_id, scope).await
    }
}
