//! Every limit at its edge and one past it; an invalid put changes nothing.

use keel_proto::memory::v1::*;
use keel_shared::json::json_to_struct;
use prost_types::value::Kind;
use prost_types::{Struct, Value};

use crate::support::{Env, assert_invalid, put_req};

fn with_metadata(json: serde_json::Value) -> PutMemoryRequest {
    PutMemoryRequest {
        metadata: Some(json_to_struct(&json)),
        ..put_req("meta", "", &[])
    }
}

#[tokio::test]
async fn keys() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let edge = "k".repeat(256);
    env.put_ok(&alice, &edge, "", &[]).await;
    env.get(&alice, &edge).await.unwrap();
    env.put_ok(&alice, "Az09._:/-", "", &[]).await;

    let over = "k".repeat(257);
    assert_invalid(env.put(&alice, put_req(&over, "", &[])).await, "key");
    assert_invalid(env.get(&alice, &over).await, "key");
    assert_invalid(env.delete(&alice, &over, 0).await, "key");
    for bad in ["", "a b", "a|b", "é", "a%", "a*", "a\0b", "a\nb"] {
        assert_invalid(env.put(&alice, put_req(bad, "", &[])).await, "key");
        assert_invalid(env.get(&alice, bad).await, "key");
    }
}

#[tokio::test]
async fn content() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    // 64 KiB in two-byte characters: the limit counts bytes.
    let edge = "é".repeat(32 * 1024);
    assert_eq!(edge.len(), 65536);
    env.put_ok(&alice, "k", &edge, &[]).await;
    assert_eq!(env.get(&alice, "k").await.unwrap().content, edge);

    let over = format!("{edge}x");
    assert_invalid(env.put(&alice, put_req("k", &over, &[])).await, "content");
    assert_invalid(
        env.put(&alice, put_req("k", "nul\0inside", &[])).await,
        "content",
    );
    assert_eq!(env.get(&alice, "k").await.unwrap().version, 1);
}

#[tokio::test]
async fn tags() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let thirty_two: Vec<String> = (0..32).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = thirty_two.iter().map(String::as_str).collect();
    assert_eq!(env.put_ok(&alice, "k", "", &refs).await.tags.len(), 32);

    let mut thirty_three = refs.clone();
    thirty_three.push("t32");
    assert_invalid(
        env.put(&alice, put_req("k", "", &thirty_three)).await,
        "tags",
    );

    let long_edge = "ß".repeat(64);
    env.put_ok(&alice, "k", "", &[&long_edge]).await;
    let long_over = "ß".repeat(65);
    assert_invalid(
        env.put(&alice, put_req("k", "", &["a", "b", "c", &long_over]))
            .await,
        "tags[3]",
    );
    assert_invalid(env.put(&alice, put_req("k", "", &[""])).await, "tags[0]");
    assert_invalid(
        env.put(&alice, put_req("k", "", &["ok", "x\0y"])).await,
        "tags[1]",
    );
    assert_eq!(env.get(&alice, "k").await.unwrap().tags, vec![long_edge]);
}

#[tokio::test]
async fn metadata() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    // {"s":"..."} adds 8 bytes of JSON around the string.
    let edge = serde_json::json!({"s": "x".repeat(16 * 1024 - 8)});
    env.put(&alice, with_metadata(edge)).await.unwrap();
    let over = serde_json::json!({"s": "x".repeat(16 * 1024 - 7)});
    assert_invalid(env.put(&alice, with_metadata(over)).await, "metadata");
    assert_invalid(
        env.put(&alice, with_metadata(serde_json::json!({"a": "nul\u{0}"})))
            .await,
        "metadata",
    );

    // The shared JSON depth bound (64 Struct/Value levels) allows 32 nested objects.
    let nested = |levels: usize| {
        let mut v = serde_json::json!(1);
        for _ in 0..levels {
            v = serde_json::json!({ "a": v });
        }
        v
    };
    env.put(&alice, with_metadata(nested(32))).await.unwrap();
    assert_invalid(env.put(&alice, with_metadata(nested(33))).await, "metadata");

    let nan = Struct {
        fields: [(
            "n".to_string(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        )]
        .into(),
    };
    let req = PutMemoryRequest {
        metadata: Some(nan),
        ..put_req("meta", "", &[])
    };
    assert_invalid(env.put(&alice, req).await, "metadata");
    assert_eq!(env.get(&alice, "meta").await.unwrap().version, 2);
}

#[tokio::test]
async fn limits_are_configurable() {
    let env = Env::start_with(|c| {
        c.limits.max_key_bytes = 4;
        c.limits.max_content_bytes = 3;
        c.limits.max_tags = 1;
        c.limits.max_tag_chars = 2;
        c.limits.max_metadata_bytes = 10;
        c.limits.max_query_bytes = 5;
    })
    .await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "abcd", "abc", &["ab", "ab"]).await;
    assert_invalid(env.put(&alice, put_req("abcde", "", &[])).await, "key");
    assert_invalid(env.put(&alice, put_req("k", "abcd", &[])).await, "content");
    assert_invalid(env.put(&alice, put_req("k", "", &["a", "b"])).await, "tags");
    assert_invalid(env.put(&alice, put_req("k", "", &["abc"])).await, "tags[0]");
    // {"a":"12"} is 10 bytes.
    env.put(&alice, with_metadata(serde_json::json!({"a": "12"})))
        .await
        .unwrap();
    assert_invalid(
        env.put(&alice, with_metadata(serde_json::json!({"a": "123"})))
            .await,
        "metadata",
    );
    assert!(env.search(&alice, "abcde", 0).await.is_ok());
    assert_invalid(env.search(&alice, "abcdef", 0).await, "query");
}
