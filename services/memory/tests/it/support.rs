//! The harness: one server per test on its own database, users with tokens,
//! and short request helpers.

use keel_proto::admin::v1::memory_admin_service_client::MemoryAdminServiceClient;
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::*;
use keel_shared::testing::{self, TestDb};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub(crate) struct Env {
    pub db: TestDb,
    pub client: MemoryServiceClient<Channel>,
    pub admin: MemoryAdminServiceClient<Channel>,
    shutdown: CancellationToken,
}

/// A user with a valid access token.
#[derive(Clone)]
pub(crate) struct User {
    pub token: String,
}

impl Env {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts the service after `adjust` has changed its config.
    pub(crate) async fn start_with(adjust: impl FnOnce(&mut keel_memory::Config)) -> Self {
        let db = TestDb::new().await;
        let (listener, addr) = testing::listener().await;
        let mut config = keel_memory::Config::new(addr, db.config(), testing::verifier_config());
        adjust(&mut config);
        let shutdown = CancellationToken::new();
        tokio::spawn(keel_memory::run(config, listener, shutdown.clone()));
        let channel = testing::channel(addr).await;
        let client = MemoryServiceClient::new(channel.clone());
        Self {
            db,
            client,
            admin: MemoryAdminServiceClient::new(channel),
            shutdown,
        }
    }

    pub(crate) async fn user(&self, name: &str) -> User {
        let email = format!("{name}@example.com");
        let id = self.db.create_user(&email).await;
        User {
            token: testing::user_token(id, &email),
        }
    }

    pub(crate) fn client(&self) -> MemoryServiceClient<Channel> {
        self.client.clone()
    }

    pub(crate) async fn put(
        &self,
        user: &User,
        req: PutMemoryRequest,
    ) -> Result<PutMemoryResponse, Status> {
        self.client()
            .put_memory(testing::authed(req, &user.token))
            .await
            .map(|r| r.into_inner())
    }

    /// An unconditional put of `key` with `content` and `tags`; panics on error.
    pub(crate) async fn put_ok(
        &self,
        user: &User,
        key: &str,
        content: &str,
        tags: &[&str],
    ) -> Memory {
        self.put(user, put_req(key, content, tags))
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e:?}"))
            .memory
            .expect("memory")
    }

    pub(crate) async fn get(&self, user: &User, key: &str) -> Result<Memory, Status> {
        self.client()
            .get_memory(testing::authed(
                GetMemoryRequest {
                    key: key.into(),
                    ..Default::default()
                },
                &user.token,
            ))
            .await
            .map(|r| r.into_inner().memory.expect("memory"))
    }

    pub(crate) async fn delete(
        &self,
        user: &User,
        key: &str,
        expected_version: i64,
    ) -> Result<(), Status> {
        self.client()
            .delete_memory(testing::authed(
                DeleteMemoryRequest {
                    key: key.into(),
                    expected_version,
                    ..Default::default()
                },
                &user.token,
            ))
            .await
            .map(|_| ())
    }

    pub(crate) async fn list(
        &self,
        user: &User,
        req: ListMemoriesRequest,
    ) -> Result<ListMemoriesResponse, Status> {
        self.client()
            .list_memories(testing::authed(req, &user.token))
            .await
            .map(|r| r.into_inner())
    }

    /// Every page of a listing, as keys in the order returned.
    pub(crate) async fn list_all(&self, user: &User, mut req: ListMemoriesRequest) -> Vec<String> {
        let mut keys = Vec::new();
        loop {
            let page = self.list(user, req.clone()).await.expect("list page");
            keys.extend(page.memories.into_iter().map(|m| m.key));
            if page.next_page_token.is_empty() {
                return keys;
            }
            req.page_token = page.next_page_token;
        }
    }

    pub(crate) async fn search(
        &self,
        user: &User,
        query: &str,
        limit: i32,
    ) -> Result<Vec<SearchResult>, Status> {
        self.client()
            .search_memories(testing::authed(
                SearchMemoriesRequest {
                    query: query.into(),
                    limit,
                    ..Default::default()
                },
                &user.token,
            ))
            .await
            .map(|r| r.into_inner().results)
    }

    pub(crate) async fn workspace(&self, user: &User) -> Result<Workspace, Status> {
        self.client()
            .get_workspace(testing::authed(GetWorkspaceRequest::default(), &user.token))
            .await
            .map(|r| r.into_inner().workspace.expect("workspace"))
    }
}

/// Requests with every field a test sets (the new namespace, version, page
/// and filter fields included).
impl Env {
    pub(crate) async fn get_req(
        &self,
        user: &User,
        req: GetMemoryRequest,
    ) -> Result<Memory, Status> {
        self.client()
            .get_memory(testing::authed(req, &user.token))
            .await
            .map(|r| r.into_inner().memory.expect("memory"))
    }

    pub(crate) async fn delete_req(
        &self,
        user: &User,
        req: DeleteMemoryRequest,
    ) -> Result<(), Status> {
        self.client()
            .delete_memory(testing::authed(req, &user.token))
            .await
            .map(|_| ())
    }

    pub(crate) async fn search_req(
        &self,
        user: &User,
        req: SearchMemoriesRequest,
    ) -> Result<SearchMemoriesResponse, Status> {
        self.client()
            .search_memories(testing::authed(req, &user.token))
            .await
            .map(|r| r.into_inner())
    }

    pub(crate) async fn workspace_req(
        &self,
        user: &User,
        req: GetWorkspaceRequest,
    ) -> Result<Workspace, Status> {
        self.client()
            .get_workspace(testing::authed(req, &user.token))
            .await
            .map(|r| r.into_inner().workspace.expect("workspace"))
    }

    pub(crate) async fn versions(
        &self,
        user: &User,
        namespace: &str,
        key: &str,
    ) -> Result<Vec<Memory>, Status> {
        self.client()
            .list_memory_versions(testing::authed(
                ListMemoryVersionsRequest {
                    namespace: namespace.into(),
                    key: key.into(),
                },
                &user.token,
            ))
            .await
            .map(|r| r.into_inner().versions)
    }

    /// One SQL value, for checks of what is stored.
    pub(crate) async fn sql_count(&self, sql: &str) -> i64 {
        let client = self.db.pool.get().await.expect("pool");
        client.query_one(sql, &[]).await.expect(sql).get(0)
    }
}

/// A put into `namespace`.
pub(crate) fn put_in(namespace: &str, key: &str, content: &str, tags: &[&str]) -> PutMemoryRequest {
    PutMemoryRequest {
        namespace: namespace.into(),
        ..put_req(key, content, tags)
    }
}

pub(crate) fn get_in(namespace: &str, key: &str, version: i64) -> GetMemoryRequest {
    GetMemoryRequest {
        namespace: namespace.into(),
        key: key.into(),
        version,
    }
}

/// The keys of search results, in order.
pub(crate) fn hit_keys(results: &[SearchResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| r.memory.as_ref().expect("memory").key.clone())
        .collect()
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) fn put_req(key: &str, content: &str, tags: &[&str]) -> PutMemoryRequest {
    PutMemoryRequest {
        key: key.into(),
        content: content.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        metadata: None,
        expected_version: 0,
        ..Default::default()
    }
}

/// Asserts `result` failed with `code`; returns the message.
#[track_caller]
pub(crate) fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> String {
    match result {
        Err(s) if s.code() == code => s.message().to_string(),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// Asserts INVALID_ARGUMENT whose message names `field` first.
#[track_caller]
pub(crate) fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Status>, field: &str) {
    let message = assert_code(result, Code::InvalidArgument);
    assert!(
        message.starts_with(&format!("{field}: ")),
        "expected the message to name {field:?}: {message:?}"
    );
}
