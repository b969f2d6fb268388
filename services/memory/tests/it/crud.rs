//! Put, get, delete round trips.

use keel_proto::memory::v1::*;
use keel_shared::json::{json_to_struct, struct_to_json};
use keel_shared::time::from_timestamp;
use tonic::Code;

use crate::support::{Env, assert_code, put_req};

#[tokio::test]
async fn put_get_update_delete_round_trip() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let metadata = serde_json::json!({
        "source": "chat", "score": 0.5, "nested": {"list": [1, "two", null, true]}
    });

    let first = env
        .put(
            &alice,
            PutMemoryRequest {
                metadata: Some(json_to_struct(&metadata)),
                ..put_req(
                    "prefs/editor",
                    "Prefers vim keybindings; 日本語 ok 🦀",
                    &["editor", "prefs"],
                )
            },
        )
        .await
        .unwrap();
    assert!(first.created);
    let created = first.memory.unwrap();
    assert_eq!(created.key, "prefs/editor");
    assert_eq!(created.version, 1);
    assert_eq!(created.created_at, created.updated_at);

    let got = env.get(&alice, "prefs/editor").await.unwrap();
    assert_eq!(got, created);
    assert_eq!(got.content, "Prefers vim keybindings; 日本語 ok 🦀");
    assert_eq!(got.tags, vec!["editor", "prefs"]);
    // Struct numbers are doubles: compare with what the Struct itself encodes.
    assert_eq!(
        struct_to_json(got.metadata.as_ref().unwrap()).unwrap(),
        struct_to_json(&json_to_struct(&metadata)).unwrap()
    );

    let second = env
        .put(
            &alice,
            put_req("prefs/editor", "Now prefers helix", &["editor"]),
        )
        .await
        .unwrap();
    assert!(!second.created);
    let updated = second.memory.unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.content, "Now prefers helix");
    assert_eq!(updated.tags, vec!["editor"]);
    // Metadata is replaced like every other field: absent means empty.
    assert_eq!(
        struct_to_json(updated.metadata.as_ref().unwrap()).unwrap(),
        serde_json::json!({})
    );
    assert_eq!(updated.created_at, created.created_at);
    let (t1, t2) = (
        from_timestamp(created.updated_at.as_ref().unwrap()).unwrap(),
        from_timestamp(updated.updated_at.as_ref().unwrap()).unwrap(),
    );
    assert!(t2 >= t1, "updated_at went backwards: {t1} -> {t2}");
    assert_eq!(env.get(&alice, "prefs/editor").await.unwrap(), updated);

    env.delete(&alice, "prefs/editor", 0).await.unwrap();
    assert_code(env.get(&alice, "prefs/editor").await, Code::NotFound);
    assert_code(env.delete(&alice, "prefs/editor", 0).await, Code::NotFound);

    // Re-created after a delete: a new memory again, numbered on after the
    // deleted one (versions are never given twice to one key).
    let again = env
        .put(&alice, put_req("prefs/editor", "fresh", &[]))
        .await
        .unwrap();
    assert!(again.created);
    assert_eq!(again.memory.unwrap().version, 3);
}

#[tokio::test]
async fn duplicate_tags_are_stored_once_in_first_seen_order() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let m = env
        .put_ok(&alice, "k", "c", &["b", "a", "b", "c", "a"])
        .await;
    assert_eq!(m.tags, vec!["b", "a", "c"]);
    assert_eq!(
        env.get(&alice, "k").await.unwrap().tags,
        vec!["b", "a", "c"]
    );
}

#[tokio::test]
async fn unknown_keys_are_not_found() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    assert_code(env.get(&alice, "nothing/here").await, Code::NotFound);
    assert_code(env.delete(&alice, "nothing/here", 0).await, Code::NotFound);
    assert_code(env.delete(&alice, "nothing/here", 3).await, Code::NotFound);
}
