//! Each user sees only their own memories; every RPC needs a valid token.

use keel_proto::memory::v1::*;
use keel_shared::testing;
use tonic::Code;
use uuid::Uuid;

use crate::support::{Env, User, assert_code, put_req};

#[tokio::test]
async fn another_users_memory_is_invisible_and_untouchable() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    let original = env
        .put_ok(&alice, "shared/key", "alice's secret walrus", &["private"])
        .await;

    assert_code(env.get(&bob, "shared/key").await, Code::NotFound);
    assert_code(env.delete(&bob, "shared/key", 0).await, Code::NotFound);
    assert_code(env.delete(&bob, "shared/key", 1).await, Code::NotFound);
    let list = env
        .list(&bob, ListMemoriesRequest::default())
        .await
        .unwrap();
    assert!(list.memories.is_empty());
    let tagged = ListMemoriesRequest {
        tag: "private".into(),
        key_prefix: "shared/".into(),
        ..Default::default()
    };
    assert!(env.list(&bob, tagged).await.unwrap().memories.is_empty());
    assert!(env.search(&bob, "walrus", 0).await.unwrap().is_empty());
    assert_eq!(env.workspace(&bob).await.unwrap().memory_count, 0);
    // A conditional put on the key alice has: bob has no such memory.
    let conditional = PutMemoryRequest {
        expected_version: 1,
        ..put_req("shared/key", "bob's", &[])
    };
    assert_code(env.put(&bob, conditional.clone()).await, Code::Aborted);

    // Bob's put of the same key creates bob's own memory.
    let bobs = env
        .put(&bob, put_req("shared/key", "bob's walrus", &[]))
        .await
        .unwrap();
    assert!(bobs.created);
    assert_eq!(bobs.memory.unwrap().version, 1);
    env.put(&bob, conditional).await.unwrap();
    env.delete(&bob, "shared/key", 0).await.unwrap();

    assert_eq!(env.get(&alice, "shared/key").await.unwrap(), original);
    let found = env.search(&alice, "walrus", 0).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].memory.as_ref(), Some(&original));
    assert_eq!(env.workspace(&alice).await.unwrap().memory_count, 1);
}

fn req<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    match token {
        Some(t) => testing::authed(message, t),
        None => tonic::Request::new(message),
    }
}

#[tokio::test]
async fn every_rpc_needs_a_valid_token() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "k", "v", &[]).await;

    let forged = {
        let mut parts: Vec<String> = alice.token.split('.').map(String::from).collect();
        parts[2] = parts[2].chars().rev().collect();
        parts.join(".")
    };
    for token in [None, Some("not-a-jwt".to_string()), Some(forged)] {
        let mut client = env.client();
        let token = token.as_deref();
        assert_code(
            client.put_memory(req(put_req("k", "x", &[]), token)).await,
            Code::Unauthenticated,
        );
        assert_code(
            client
                .get_memory(req(
                    GetMemoryRequest {
                        key: "k".into(),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            Code::Unauthenticated,
        );
        assert_code(
            client
                .list_memories(req(ListMemoriesRequest::default(), token))
                .await,
            Code::Unauthenticated,
        );
        assert_code(
            client
                .delete_memory(req(
                    DeleteMemoryRequest {
                        key: "k".into(),
                        expected_version: 0,
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            Code::Unauthenticated,
        );
        assert_code(
            client
                .search_memories(req(
                    SearchMemoriesRequest {
                        query: "v".into(),
                        limit: 0,
                        ..Default::default()
                    },
                    token,
                ))
                .await,
            Code::Unauthenticated,
        );
        assert_code(
            client
                .get_workspace(req(GetWorkspaceRequest::default(), token))
                .await,
            Code::Unauthenticated,
        );
    }
    assert_eq!(env.get(&alice, "k").await.unwrap().content, "v");
}

#[tokio::test]
async fn a_token_for_a_user_that_no_longer_exists_cannot_write() {
    let env = Env::start().await;
    let id = Uuid::now_v7();
    let ghost = User {
        token: testing::user_token(id, "ghost@example.com"),
    };
    assert_code(
        env.put(&ghost, put_req("k", "v", &[])).await,
        Code::Unauthenticated,
    );
    assert_code(env.get(&ghost, "k").await, Code::NotFound);
    assert_eq!(env.workspace(&ghost).await.unwrap().memory_count, 0);
}

/// GetMemory calls that arrive together are read together (one statement
/// for many lookups): each caller still gets exactly its own memory, by
/// user, namespace and key, and NOT_FOUND for what it does not have.
#[tokio::test]
async fn concurrent_reads_of_many_users_each_get_their_own_memory() {
    let env = Env::start().await;
    let users = [
        env.user("ann").await,
        env.user("ben").await,
        env.user("cho").await,
    ];
    const NAMESPACES: [&str; 2] = ["", "agent-7"];
    const KEYS: usize = 8;
    let content = |u: usize, ns: &str, k: usize| format!("user {u} namespace {ns:?} key {k}");
    for (u, user) in users.iter().enumerate() {
        for ns in NAMESPACES {
            // Only the even keys exist, and key 0 is at version 2: the
            // batch must read the current version.
            for k in (0..KEYS).step_by(2) {
                if k == 0 {
                    let first = PutMemoryRequest {
                        namespace: ns.into(),
                        ..put_req("k0", "an older version", &[])
                    };
                    env.put(user, first).await.unwrap();
                }
                let put = PutMemoryRequest {
                    namespace: ns.into(),
                    ..put_req(&format!("k{k}"), &content(u, ns, k), &[])
                };
                env.put(user, put).await.unwrap();
            }
        }
    }

    let env = &env;
    let reads = (0..4).flat_map(|_round| {
        users.iter().enumerate().flat_map(|(u, user)| {
            NAMESPACES.iter().flat_map(move |&ns| {
                (0..KEYS).map(move |k| {
                    let mut client = env.client();
                    let token = user.token.clone();
                    async move {
                        let request = GetMemoryRequest {
                            namespace: ns.into(),
                            key: format!("k{k}"),
                            ..Default::default()
                        };
                        let got = client
                            .get_memory(testing::authed(request, &token))
                            .await
                            .map(|r| r.into_inner().memory.expect("memory"));
                        (u, ns, k, got)
                    }
                })
            })
        })
    });
    let results = futures::future::join_all(reads).await;

    assert_eq!(results.len(), 4 * users.len() * NAMESPACES.len() * KEYS);
    for (u, ns, k, got) in results {
        if k % 2 == 1 {
            assert_code(got, Code::NotFound);
            continue;
        }
        let memory = got.unwrap_or_else(|e| panic!("user {u} {ns:?} k{k}: {e}"));
        assert_eq!(memory.content, content(u, ns, k), "user {u} {ns:?} k{k}");
        assert_eq!(memory.namespace, ns);
        assert_eq!(memory.version, if k == 0 { 2 } else { 1 });
    }
}
