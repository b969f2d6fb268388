//! Expiry: an expired memory is gone for every reader at once, and the
//! sweeper removes it from storage in bounded batches.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use keel_proto::memory::v1::*;
use prost_types::Timestamp;
use tonic::Code;

use crate::support::{Env, assert_code, assert_invalid, get_in, hit_keys, put_req};

fn at(offset: chrono::Duration) -> Timestamp {
    let t = Utc::now() + offset;
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn expiring(key: &str, content: &str, tags: &[&str], expires_at: Timestamp) -> PutMemoryRequest {
    PutMemoryRequest {
        expires_at: Some(expires_at),
        ..put_req(key, content, tags)
    }
}

/// Polls until `key` reads NOT_FOUND (generous deadline).
async fn wait_until_gone(env: &Env, user: &crate::support::User, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.get(user, key).await.is_ok() {
        assert!(Instant::now() < deadline, "{key} never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn expires_at_in_the_past_is_refused_and_creates_nothing() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    for past in [
        at(chrono::Duration::seconds(-1)),
        Timestamp {
            seconds: 0,
            nanos: 0,
        },
    ] {
        assert_invalid(
            env.put(&alice, expiring("k", "x", &[], past)).await,
            "expires_at",
        );
    }
    let broken = Timestamp {
        seconds: Utc::now().timestamp() + 60,
        nanos: 2_000_000_000,
    };
    assert_invalid(
        env.put(&alice, expiring("k", "x", &[], broken)).await,
        "expires_at",
    );
    assert_code(env.get(&alice, "k").await, Code::NotFound);
    assert_eq!(env.sql_count("SELECT count(*) FROM memories").await, 0);
    // A future expiry is stored and returned; a later put without one clears it.
    let later = at(chrono::Duration::hours(1));
    let m = env
        .put(&alice, expiring("k", "x", &[], later))
        .await
        .unwrap()
        .memory
        .unwrap();
    assert_eq!(m.expires_at.unwrap().seconds, later.seconds);
    let m = env.put_ok(&alice, "k", "y", &[]).await;
    assert_eq!(m.expires_at, None);
}

#[tokio::test]
async fn an_expired_memory_is_gone_for_every_reader_before_any_sweep() {
    // The sweeper waits an hour: only the readers' own filter can hide it.
    let env = Env::start_with(|c| c.sweep.sweep_interval_ms = 3_600_000).await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "stays", "kestrel notes that stay", &["birds"])
        .await;
    env.put(
        &alice,
        expiring(
            "goes",
            "kestrel notes that go",
            &["birds", "temp"],
            at(chrono::Duration::hours(1)),
        ),
    )
    .await
    .unwrap();
    env.put_ok(
        &alice,
        "goes",
        "kestrel notes that go, v2",
        &["birds", "temp"],
    )
    .await;
    env.put(
        &alice,
        expiring(
            "goes",
            "kestrel notes that go, v3",
            &["birds", "temp"],
            at(chrono::Duration::seconds(2)),
        ),
    )
    .await
    .unwrap();
    let before = env.workspace(&alice).await.unwrap();
    assert_eq!(before.memory_count, 2);
    assert_eq!(before.tag_counts.get("temp"), Some(&1));
    assert_eq!(env.versions(&alice, "", "goes").await.unwrap().len(), 3);

    wait_until_gone(&env, &alice, "goes").await;
    // Still stored (no sweep yet) ...
    assert_eq!(env.sql_count("SELECT count(*) FROM memories").await, 2);
    // ... yet gone for every reader.
    assert_code(
        env.get_req(&alice, get_in("", "goes", 1)).await,
        Code::NotFound,
    );
    assert_code(env.versions(&alice, "", "goes").await, Code::NotFound);
    assert_eq!(
        env.list_all(&alice, ListMemoriesRequest::default()).await,
        vec!["stays"]
    );
    assert_eq!(
        hit_keys(&env.search(&alice, "kestrel", 0).await.unwrap()),
        vec!["stays"]
    );
    let ws = env.workspace(&alice).await.unwrap();
    assert_eq!(ws.memory_count, 1);
    assert_eq!(
        ws.total_content_bytes,
        "kestrel notes that stay".len() as i64
    );
    assert_eq!(ws.tag_counts, HashMap::from([("birds".to_string(), 1)]));
    assert_eq!(ws.recent.len(), 1);
    let all = env
        .workspace_req(
            &alice,
            GetWorkspaceRequest {
                all_namespaces: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all.memory_count, 1);
    assert_code(env.delete(&alice, "goes", 0).await, Code::NotFound);
    let conditional = PutMemoryRequest {
        expected_version: 3,
        ..put_req("goes", "stale", &[])
    };
    assert_code(env.put(&alice, conditional).await, Code::Aborted);

    // A put on the expired key creates a new memory; versions continue.
    let again = env
        .put(&alice, put_req("goes", "back", &["temp"]))
        .await
        .unwrap();
    assert!(again.created);
    let m = again.memory.unwrap();
    assert_eq!(m.version, 4, "numbers continue after the expired memory");
    assert_eq!(m.created_at, m.updated_at);
    assert_eq!(
        env.versions(&alice, "", "goes").await.unwrap().len(),
        1,
        "a new history"
    );
    let ws = env.workspace(&alice).await.unwrap();
    assert_eq!(ws.memory_count, 2);
    assert_eq!(ws.tag_counts.get("temp"), Some(&1));
}

#[tokio::test]
async fn the_sweeper_deletes_expired_memories_in_bounded_batches() {
    let env = Env::start_with(|c| c.sweep.sweep_interval_ms = 3_600_000).await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "keep", "x", &["t"]).await;
    for i in 0..25 {
        let key = format!("old/{i:02}");
        env.put(
            &alice,
            expiring(&key, "x", &["t"], at(chrono::Duration::milliseconds(300))),
        )
        .await
        .unwrap();
        // A second version, so the history has to go too.
        env.put(
            &alice,
            expiring(&key, "xx", &["t"], at(chrono::Duration::milliseconds(300))),
        )
        .await
        .unwrap();
    }
    wait_until_gone(&env, &alice, "old/24").await;
    let store = keel_memory::store::Store::new(env.db.pool.clone());
    let mut batches = Vec::new();
    loop {
        let n = store.sweep_expired(10).await.unwrap();
        batches.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(batches, vec![10, 10, 5, 0]);
    assert_eq!(env.sql_count("SELECT count(*) FROM memories").await, 1);
    assert_eq!(
        env.sql_count("SELECT count(*) FROM memory_history").await,
        0
    );
    assert_eq!(
        env.sql_count("SELECT sum(memories)::bigint FROM memory_totals")
            .await,
        1
    );
    assert_eq!(
        env.sql_count("SELECT sum(memories)::bigint FROM memory_tag_counts")
            .await,
        1
    );
    assert_eq!(env.workspace(&alice).await.unwrap().memory_count, 1);
}

#[tokio::test]
async fn the_background_sweeper_reclaims_expired_rows() {
    let env = Env::start_with(|c| {
        c.sweep.sweep_interval_ms = 50;
        c.sweep.sweep_batch = 3;
    })
    .await;
    let alice = env.user("alice").await;
    for i in 0..10 {
        env.put(
            &alice,
            expiring(
                &format!("k{i}"),
                "x",
                &[],
                at(chrono::Duration::milliseconds(200)),
            ),
        )
        .await
        .unwrap();
    }
    env.put_ok(&alice, "keep", "x", &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.sql_count("SELECT count(*) FROM memories").await > 1 {
        assert!(Instant::now() < deadline, "expired rows never swept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.get(&alice, "keep").await.unwrap().content, "x");
}

#[tokio::test]
async fn concurrent_sweepers_of_several_replicas_share_the_work() {
    let env = Env::start_with(|c| c.sweep.sweep_interval_ms = 3_600_000).await;
    let alice = env.user("alice").await;
    for i in 0..60 {
        env.put(
            &alice,
            expiring(
                &format!("k{i:02}"),
                "x",
                &["t"],
                at(chrono::Duration::milliseconds(300)),
            ),
        )
        .await
        .unwrap();
    }
    wait_until_gone(&env, &alice, "k59").await;
    let sweepers = (0..3).map(|_| {
        let store = keel_memory::store::Store::new(env.db.pool.clone());
        async move {
            let mut total = 0;
            loop {
                match store.sweep_expired(7).await.unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        }
    });
    let totals = futures::future::join_all(sweepers).await;
    assert_eq!(totals.iter().sum::<u64>(), 60, "{totals:?}");
    assert_eq!(env.sql_count("SELECT count(*) FROM memories").await, 0);
    assert_eq!(env.sql_count("SELECT count(*) FROM memory_totals").await, 0);
    assert_eq!(
        env.sql_count("SELECT count(*) FROM memory_tag_counts")
            .await,
        0
    );
}
