//! Security matrix for MemoryService: another user's token
//! finds nothing and changes nothing on every RPC; forged, expired,
//! wrong-key, `alg: none`, misaddressed and garbage tokens are
//! UNAUTHENTICATED everywhere; SQL metacharacters are data. Login brute force
//! is rate limited: see `services/auth/tests/it/login.rs`
//! (`repeated_failures_are_rate_limited_until_the_window_passes`).

use keel_proto::memory::v1::*;
use keel_shared::json::json_to_struct;
use keel_shared::testing;
use keel_shared::testing::fuzz::{assert_tables_exist, report};
use keel_shared::testing::tokens::{self, claims};
use tonic::{Code, Status};
use uuid::Uuid;

use crate::hostile::{Mem, put};

/// Authorization header values that must not pass, each named, all
/// claiming to be `user` (None: no header at all).
fn bad_headers(user: Uuid) -> Vec<(&'static str, Option<String>)> {
    let signer = &testing::keys().signer;
    let good = signer.sign_claims(&claims(user));
    let bearer = |t: String| Some(format!("Bearer {t}"));
    let flipped = tokens::forged_signature(&good);
    let expired = tokens::expired(signer, claims(user));
    let wrong_key = tokens::wrong_key(&claims(user));
    let unsigned = |alg: &str, signature: &str| {
        tokens::unsigned(alg, signer.key_id(), &claims(user), signature)
    };
    vec![
        ("forged signature", bearer(flipped)),
        ("expired", bearer(expired)),
        ("wrong key", bearer(wrong_key)),
        ("alg none", bearer(unsigned("none", ""))),
        (
            "HS256 with our kid",
            bearer(unsigned("HS256", "c2lnbmF0dXJl")),
        ),
        (
            "wrong audience",
            bearer(tokens::wrong_audience(signer, claims(user))),
        ),
        (
            "wrong issuer",
            bearer(tokens::wrong_issuer(signer, claims(user))),
        ),
        (
            "subject not a UUID",
            bearer(tokens::with_subject(
                signer,
                claims(user),
                "'; DROP TABLE memories; --",
            )),
        ),
        ("garbage", bearer("not-a-jwt".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("basic scheme", Some(format!("Basic {good}"))),
        ("no scheme", Some(good)),
        ("missing", None),
    ]
}

fn with<T>(message: T, header: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(h) = header {
        req.metadata_mut()
            .insert("authorization", h.parse().unwrap());
    }
    req
}

/// Every MemoryService RPC on `key` with the given authorization header.
async fn every_rpc(mem: &Mem, header: Option<&str>, key: &str) -> Vec<(&'static str, Code)> {
    let mut c = mem.client();
    let code = |r: Result<(), Status>| r.err().map(|s| s.code()).unwrap_or(Code::Ok);
    vec![
        (
            "PutMemory",
            code(
                c.put_memory(with(put(key, "intruder"), header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "GetMemory",
            code(
                c.get_memory(with(
                    GetMemoryRequest {
                        key: key.into(),
                        ..Default::default()
                    },
                    header,
                ))
                .await
                .map(|_| ()),
            ),
        ),
        (
            "ListMemories",
            code(
                c.list_memories(with(ListMemoriesRequest::default(), header))
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "DeleteMemory",
            code(
                c.delete_memory(with(
                    DeleteMemoryRequest {
                        key: key.into(),
                        expected_version: 0,
                        ..Default::default()
                    },
                    header,
                ))
                .await
                .map(|_| ()),
            ),
        ),
        (
            "SearchMemories",
            code(
                c.search_memories(with(
                    SearchMemoriesRequest {
                        query: "secret".into(),
                        limit: 0,
                        ..Default::default()
                    },
                    header,
                ))
                .await
                .map(|_| ()),
            ),
        ),
        (
            "GetWorkspace",
            code(
                c.get_workspace(with(GetWorkspaceRequest::default(), header))
                    .await
                    .map(|_| ()),
            ),
        ),
    ]
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_on_every_rpc_and_change_nothing() {
    let mem = Mem::start().await;
    let original = mem.put(put("k", "the secret")).await.unwrap();
    let before = mem.snapshot().await;
    let mut calls = 0;
    for (what, header) in bad_headers(mem.user_id) {
        for (rpc, code) in every_rpc(&mem, header.as_deref(), "k").await {
            calls += 1;
            assert_eq!(code, Code::Unauthenticated, "{what} on {rpc}");
        }
    }
    assert_eq!(mem.snapshot().await, before);
    assert_eq!(mem.get("k").await.unwrap(), original);
    report(&format!(
        "memory bad tokens: {calls} calls, all UNAUTHENTICATED"
    ));
}

#[tokio::test]
async fn another_users_token_finds_nothing_and_changes_nothing_on_any_rpc() {
    let mem = Mem::start().await;
    let mut secret = put("shared/key", "alice's secret walrus");
    secret.tags = vec!["private".into()];
    secret.metadata = Some(json_to_struct(&serde_json::json!({"secret": true})));
    let original = mem.put(secret).await.unwrap();
    let second = mem
        .put(put("shared/other", "another walrus"))
        .await
        .unwrap();
    let alice_page = mem
        .client()
        .list_memories(mem.u(ListMemoriesRequest {
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let alice_workspace = mem
        .client()
        .get_workspace(mem.u(GetWorkspaceRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let before = mem.snapshot().await;

    let bob_id = mem.db.create_user("bob@example.com").await;
    let bob = testing::user_token(bob_id, "bob@example.com");
    let header = format!("Bearer {bob}");
    let header = Some(header.as_str());
    let mut c = mem.client();

    // Reads see nothing of alice's.
    let status = c
        .get_memory(with(
            GetMemoryRequest {
                key: "shared/key".into(),
                ..Default::default()
            },
            header,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    for req in [
        ListMemoriesRequest::default(),
        ListMemoriesRequest {
            key_prefix: "shared/".into(),
            ..Default::default()
        },
        ListMemoriesRequest {
            tag: "private".into(),
            ..Default::default()
        },
    ] {
        let page = c
            .list_memories(with(req, header))
            .await
            .unwrap()
            .into_inner();
        assert!(page.memories.is_empty());
    }
    let found = c
        .search_memories(with(
            SearchMemoriesRequest {
                query: "walrus".into(),
                limit: 100,
                ..Default::default()
            },
            header,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(found.results.is_empty());
    let ws = c
        .get_workspace(with(GetWorkspaceRequest::default(), header))
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!((ws.memory_count, ws.recent.len()), (0, 0));
    assert!(ws.tag_counts.is_empty());
    // Alice's page token is bound to alice.
    let status = c
        .list_memories(with(
            ListMemoriesRequest {
                page_size: 1,
                page_token: alice_page.next_page_token.clone(),
                ..Default::default()
            },
            header,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Writes cannot reach alice's memories.
    for expected_version in [0, 1, 2] {
        let status = c
            .delete_memory(with(
                DeleteMemoryRequest {
                    key: "shared/key".into(),
                    expected_version,
                    ..Default::default()
                },
                header,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::NotFound,
            "delete at {expected_version}"
        );
    }
    for expected_version in [1, 2] {
        let status = c
            .put_memory(with(
                PutMemoryRequest {
                    expected_version,
                    ..put("shared/key", "bob was here")
                },
                header,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Aborted,
            "conditional put at {expected_version}"
        );
    }
    assert_eq!(
        mem.snapshot().await,
        before,
        "bob's refused calls changed state"
    );
    // An unconditional put of the same key is bob's own memory.
    let bobs = c
        .put_memory(with(put("shared/key", "bob's"), header))
        .await
        .unwrap()
        .into_inner();
    assert!(bobs.created);
    assert_eq!(bobs.memory.unwrap().version, 1);
    let deleted = c
        .delete_memory(with(
            DeleteMemoryRequest {
                key: "shared/key".into(),
                expected_version: 1,
                ..Default::default()
            },
            header,
        ))
        .await;
    assert!(deleted.is_ok(), "bob deletes his own: {deleted:?}");

    // Alice's data reads back exactly as before (bob's key keeps its last
    // version in memory_versions: his own row).
    let after = mem.snapshot().await;
    assert_eq!((after.0, after.1, after.2), (before.0, before.1, before.2));
    assert_eq!(mem.get("shared/key").await.unwrap(), original);
    assert_eq!(mem.get("shared/other").await.unwrap(), second);
    let page = mem
        .client()
        .list_memories(mem.u(ListMemoriesRequest {
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page, alice_page);
    let ws = mem
        .client()
        .get_workspace(mem.u(GetWorkspaceRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ws, alice_workspace);
}

/// Strings are parameters, never SQL: metacharacters are stored and returned
/// verbatim (or refused where the key charset forbids them), `%` and `_`
/// match only themselves in prefixes and tag filters, search treats
/// operators as text, and every table is still there.
#[tokio::test]
async fn sql_metacharacters_are_data() {
    let mem = Mem::start().await;
    const NASTY: &[&str] = &[
        "'; DROP TABLE memories; --",
        "' OR '1'='1",
        "%",
        "_",
        "\\",
        "$1",
        "\"quoted\"",
        "$$ $tag$ E'\\x41'",
        "/* -- */ & | ! <-> :*",
        "日本語 🦀 \u{202e}",
    ];
    for (i, s) in NASTY.iter().enumerate() {
        let req = PutMemoryRequest {
            key: format!("m/{i}"),
            content: format!("{s} walrus{i}"),
            tags: vec![s.to_string()],
            metadata: Some(json_to_struct(&serde_json::json!({ *s: [s, {"k": s}] }))),
            expected_version: 0,
            ..Default::default()
        };
        let stored = mem.put(req.clone()).await.unwrap();
        assert_eq!(stored.content, req.content);
        assert_eq!(stored.tags, req.tags);
        assert_eq!(stored.metadata, req.metadata);
        assert_eq!(mem.get(&req.key).await.unwrap(), stored);
        // Each tag filter finds exactly its own memory.
        let page = mem
            .client()
            .list_memories(mem.u(ListMemoriesRequest {
                tag: s.to_string(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let keys: Vec<String> = page.memories.into_iter().map(|m| m.key).collect();
        assert_eq!(keys, vec![req.key.clone()], "tag {s:?}");
        // Search takes the text as words, never as SQL or tsquery syntax.
        let search = mem
            .client()
            .search_memories(mem.u(SearchMemoriesRequest {
                query: s.to_string(),
                limit: 100,
                ..Default::default()
            }))
            .await;
        match search {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "search {s:?}");
                assert!(status.message().starts_with("query: "), "{status:?}");
            }
        }
        let found = mem
            .client()
            .search_memories(mem.u(SearchMemoriesRequest {
                query: format!("{s} walrus{i}"),
                limit: 100,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .results;
        assert!(
            found
                .iter()
                .any(|r| r.memory.as_ref().unwrap().key == req.key),
            "search for {s:?} walrus{i}"
        );
    }

    // Keys: `.`, `_`, `:`, `/` and `-` are allowed and literal; the rest is refused.
    for key in ["a_b", "axb", "a.b", "a:b/c-d"] {
        mem.put(put(key, "k")).await.unwrap();
    }
    for key in [
        "a%b",
        "a'b",
        "a;b",
        "a b",
        "a\\b",
        "$1",
        "'; DROP TABLE memories; --",
    ] {
        let status = mem.put(put(key, "k")).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{key:?}");
        assert!(status.message().starts_with("key: "), "{status:?}");
    }
    let page = mem
        .client()
        .list_memories(mem.u(ListMemoriesRequest {
            key_prefix: "a_".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<String> = page.memories.into_iter().map(|m| m.key).collect();
    assert_eq!(keys, vec!["a_b"], "the prefix a_ matches only itself");

    assert_tables_exist(
        &mem.db,
        &["users", "memories", "memory_tag_counts", "memory_versions"],
    )
    .await;
}
