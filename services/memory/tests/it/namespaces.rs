//! Namespaces: (user, namespace, key) is unique, every RPC sees only the
//! namespace it names, bad namespaces are refused and change nothing.

use std::collections::HashMap;

use keel_proto::memory::v1::*;
use tonic::Code;

use crate::support::{Env, assert_code, assert_invalid, get_in, hit_keys, put_in};

#[tokio::test]
async fn namespaces_isolate_keys_on_every_rpc() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let a = env
        .put(
            &alice,
            put_in("agent-a", "k", "apples from agent a", &["fruit"]),
        )
        .await
        .unwrap();
    let b = env
        .put(
            &alice,
            put_in("agent-b", "k", "bananas from agent b", &["fruit", "b"]),
        )
        .await
        .unwrap();
    let d = env
        .put(
            &alice,
            put_in("", "k", "dates in the default namespace", &["d"]),
        )
        .await
        .unwrap();
    // Same key, three memories, each created, each starting at version 1.
    for r in [&a, &b, &d] {
        assert!(r.created);
        assert_eq!(r.memory.as_ref().unwrap().version, 1);
    }
    assert_eq!(a.memory.as_ref().unwrap().namespace, "agent-a");

    assert_eq!(
        env.get_req(&alice, get_in("agent-a", "k", 0))
            .await
            .unwrap()
            .content,
        "apples from agent a"
    );
    assert_eq!(
        env.get_req(&alice, get_in("agent-b", "k", 0))
            .await
            .unwrap()
            .content,
        "bananas from agent b"
    );
    assert_eq!(
        env.get(&alice, "k").await.unwrap().content,
        "dates in the default namespace"
    );
    assert_code(
        env.get_req(&alice, get_in("agent-c", "k", 0)).await,
        Code::NotFound,
    );

    let listed = env
        .list_all(
            &alice,
            ListMemoriesRequest {
                namespace: "agent-b".into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(listed, vec!["k"]);

    let search = |ns: &str, q: &str| SearchMemoriesRequest {
        namespace: ns.into(),
        query: q.into(),
        ..Default::default()
    };
    assert_eq!(
        hit_keys(
            &env.search_req(&alice, search("agent-a", "apples"))
                .await
                .unwrap()
                .results
        ),
        vec!["k"]
    );
    assert!(
        env.search_req(&alice, search("agent-b", "apples"))
            .await
            .unwrap()
            .results
            .is_empty()
    );
    assert!(
        env.search_req(&alice, search("", "apples"))
            .await
            .unwrap()
            .results
            .is_empty()
    );

    // Workspace per namespace, and across them all.
    let ws = |ns: &str, all: bool| GetWorkspaceRequest {
        namespace: ns.into(),
        all_namespaces: all,
    };
    let wa = env
        .workspace_req(&alice, ws("agent-a", false))
        .await
        .unwrap();
    assert_eq!(wa.memory_count, 1);
    assert_eq!(wa.tag_counts, HashMap::from([("fruit".to_string(), 1)]));
    let all = env.workspace_req(&alice, ws("", true)).await.unwrap();
    assert_eq!(all.memory_count, 3);
    assert_eq!(
        all.tag_counts,
        HashMap::from([
            ("fruit".to_string(), 2),
            ("b".to_string(), 1),
            ("d".to_string(), 1)
        ])
    );
    let bytes: i64 = [
        "apples from agent a",
        "bananas from agent b",
        "dates in the default namespace",
    ]
    .iter()
    .map(|c| c.len() as i64)
    .sum();
    assert_eq!(all.total_content_bytes, bytes);
    assert_eq!(all.recent.len(), 3);
    assert_eq!(
        all.recent[0].namespace, "",
        "newest first across namespaces"
    );
    assert_eq!(all.last_updated_at, all.recent[0].updated_at);

    // Delete in one namespace leaves the others.
    env.delete_req(
        &alice,
        DeleteMemoryRequest {
            namespace: "agent-a".into(),
            key: "k".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_code(
        env.get_req(&alice, get_in("agent-a", "k", 0)).await,
        Code::NotFound,
    );
    assert!(env.get_req(&alice, get_in("agent-b", "k", 0)).await.is_ok());
    assert_eq!(
        env.workspace_req(&alice, ws("", true))
            .await
            .unwrap()
            .memory_count,
        2
    );

    // Another user sees none of it, in any namespace.
    let bob = env.user("bob").await;
    assert_code(
        env.get_req(&bob, get_in("agent-b", "k", 0)).await,
        Code::NotFound,
    );
    assert_eq!(
        env.workspace_req(&bob, ws("", true))
            .await
            .unwrap()
            .memory_count,
        0
    );
}

#[tokio::test]
async fn invalid_namespaces_are_refused_on_every_rpc_and_change_nothing() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "k", "v", &["t"]).await;
    let long = "n".repeat(65);
    for bad in ["has space", "pipe|", "é", long.as_str(), "nul\0"] {
        assert_invalid(
            env.put(&alice, put_in(bad, "k", "x", &[])).await,
            "namespace",
        );
        assert_invalid(env.get_req(&alice, get_in(bad, "k", 0)).await, "namespace");
        assert_invalid(
            env.list(
                &alice,
                ListMemoriesRequest {
                    namespace: bad.into(),
                    ..Default::default()
                },
            )
            .await,
            "namespace",
        );
        assert_invalid(
            env.delete_req(
                &alice,
                DeleteMemoryRequest {
                    namespace: bad.into(),
                    key: "k".into(),
                    ..Default::default()
                },
            )
            .await,
            "namespace",
        );
        assert_invalid(
            env.search_req(
                &alice,
                SearchMemoriesRequest {
                    namespace: bad.into(),
                    query: "v".into(),
                    ..Default::default()
                },
            )
            .await,
            "namespace",
        );
        assert_invalid(
            env.workspace_req(
                &alice,
                GetWorkspaceRequest {
                    namespace: bad.into(),
                    ..Default::default()
                },
            )
            .await,
            "namespace",
        );
        assert_invalid(env.versions(&alice, bad, "k").await, "namespace");
    }
    // all_namespaces with a namespace is contradictory.
    assert_invalid(
        env.workspace_req(
            &alice,
            GetWorkspaceRequest {
                namespace: "a".into(),
                all_namespaces: true,
            },
        )
        .await,
        "namespace",
    );
    assert_eq!(env.sql_count("SELECT count(*) FROM memories").await, 1);
    assert_eq!(env.get(&alice, "k").await.unwrap().version, 1);
    // The longest valid namespace works.
    let ok = "n".repeat(64);
    assert!(
        env.put(&alice, put_in(&ok, "k", "x", &[]))
            .await
            .unwrap()
            .created
    );
}

#[tokio::test]
async fn page_tokens_do_not_cross_namespaces() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    for i in 0..3 {
        env.put(&alice, put_in("a", &format!("k{i}"), "x", &[]))
            .await
            .unwrap();
        env.put(&alice, put_in("b", &format!("k{i}"), "x", &[]))
            .await
            .unwrap();
    }
    let page = env
        .list(
            &alice,
            ListMemoriesRequest {
                namespace: "a".into(),
                page_size: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(!page.next_page_token.is_empty());
    assert_invalid(
        env.list(
            &alice,
            ListMemoriesRequest {
                namespace: "b".into(),
                page_size: 1,
                page_token: page.next_page_token.clone(),
                ..Default::default()
            },
        )
        .await,
        "page_token",
    );
    assert_invalid(
        env.list(
            &alice,
            ListMemoriesRequest {
                page_size: 1,
                page_token: page.next_page_token,
                ..Default::default()
            },
        )
        .await,
        "page_token",
    );
}

/// The sequence of the issue, inside a namespace: put v1, delete, put again,
/// then a put holding the stale expected_version = 1 is refused.
#[tokio::test]
async fn a_stale_expected_version_never_succeeds_across_delete_and_recreate_in_a_namespace() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let first = env
        .put(&alice, put_in("agent", "plan", "v1", &[]))
        .await
        .unwrap();
    assert_eq!(first.memory.unwrap().version, 1);
    env.delete_req(
        &alice,
        DeleteMemoryRequest {
            namespace: "agent".into(),
            key: "plan".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let again = env
        .put(&alice, put_in("agent", "plan", "re-created", &[]))
        .await
        .unwrap();
    assert!(again.created);
    assert_eq!(again.memory.unwrap().version, 2);
    let stale = PutMemoryRequest {
        expected_version: 1,
        ..put_in("agent", "plan", "stale writer", &[])
    };
    assert_code(env.put(&alice, stale).await, Code::Aborted);
    let stored = env
        .get_req(&alice, get_in("agent", "plan", 0))
        .await
        .unwrap();
    assert_eq!((stored.content.as_str(), stored.version), ("re-created", 2));
    // The same key in another namespace numbers on its own.
    let other = env
        .put(&alice, put_in("other", "plan", "x", &[]))
        .await
        .unwrap();
    assert_eq!(other.memory.unwrap().version, 1);
}

/// Totals are sharded rows kept by triggers: concurrent writers of one
/// user and namespace (inserts, updates, deletes) leave them exact.
#[tokio::test]
async fn concurrent_writers_leave_exact_workspace_totals() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let writes = (0..48).map(|i| {
        let env = &env;
        let alice = alice.clone();
        async move {
            let key = format!("k{}", i % 24);
            let content = "x".repeat(i + 1);
            env.put(&alice, put_in("ns", &key, &content, &["t"]))
                .await
                .unwrap();
            if i % 6 == 0 {
                let _ = env
                    .delete_req(
                        &alice,
                        DeleteMemoryRequest {
                            namespace: "ns".into(),
                            key,
                            ..Default::default()
                        },
                    )
                    .await;
            }
        }
    });
    futures::future::join_all(writes).await;
    let listed = env
        .list_all(
            &alice,
            ListMemoriesRequest {
                namespace: "ns".into(),
                ..Default::default()
            },
        )
        .await;
    let mut bytes = 0;
    for key in &listed {
        bytes += env
            .get_req(&alice, get_in("ns", key, 0))
            .await
            .unwrap()
            .content
            .len() as i64;
    }
    let ws = env
        .workspace_req(
            &alice,
            GetWorkspaceRequest {
                namespace: "ns".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(ws.memory_count, listed.len() as i64);
    assert_eq!(ws.total_content_bytes, bytes);
    assert_eq!(
        ws.tag_counts,
        HashMap::from([("t".to_string(), listed.len() as i64)])
    );
}
