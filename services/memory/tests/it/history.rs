//! Version history: earlier versions kept (bounded), ListMemoryVersions,
//! GetMemory by version.

use keel_proto::memory::v1::*;
use tonic::Code;

use crate::support::{Env, assert_code, assert_invalid, get_in, put_in, put_req};

#[tokio::test]
async fn earlier_versions_are_kept_up_to_the_bound_newest_first() {
    let env = Env::start_with(|c| c.limits.versions_kept = 3).await;
    let alice = env.user("alice").await;
    for v in 1..=6 {
        let tags = [format!("t{v}")];
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        env.put_ok(&alice, "plan", &format!("content {v}"), &tags)
            .await;
    }
    let versions = env.versions(&alice, "", "plan").await.unwrap();
    let seen: Vec<(i64, String, Vec<String>)> = versions
        .iter()
        .map(|m| (m.version, m.content.clone(), m.tags.clone()))
        .collect();
    assert_eq!(
        seen,
        (3..=6)
            .rev()
            .map(|v| (v, format!("content {v}"), vec![format!("t{v}")]))
            .collect::<Vec<_>>(),
        "the current version and the 3 before it"
    );
    // Each version as it was: its own updated_at, the memory's created_at.
    let at = |m: &Memory| m.updated_at.map(|t| (t.seconds, t.nanos));
    assert!(versions.windows(2).all(|w| at(&w[0]) > at(&w[1])));
    assert!(
        versions
            .iter()
            .all(|m| m.created_at == versions[0].created_at)
    );

    // GetMemory by version: 0 = current, kept ones as they were, others NOT_FOUND.
    assert_eq!(
        env.get_req(&alice, get_in("", "plan", 0))
            .await
            .unwrap()
            .version,
        6
    );
    assert_eq!(
        env.get_req(&alice, get_in("", "plan", 6))
            .await
            .unwrap()
            .content,
        "content 6"
    );
    assert_eq!(
        env.get_req(&alice, get_in("", "plan", 3)).await.unwrap(),
        versions[3]
    );
    for gone in [1, 2, 7, i64::MAX] {
        assert_code(
            env.get_req(&alice, get_in("", "plan", gone)).await,
            Code::NotFound,
        );
    }
    assert_invalid(env.get_req(&alice, get_in("", "plan", -1)).await, "version");
    assert_invalid(
        env.get_req(&alice, get_in("", "plan", i64::MIN)).await,
        "version",
    );
    // Storage holds no more than the bound.
    assert_eq!(
        env.sql_count("SELECT count(*) FROM memory_history").await,
        3
    );
    // Only the history itself counts in the workspace: one memory.
    assert_eq!(env.workspace(&alice).await.unwrap().memory_count, 1);
}

#[tokio::test]
async fn history_belongs_to_the_live_memory() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    env.put_ok(&alice, "k", "one", &[]).await;
    env.put_ok(&alice, "k", "two", &[]).await;
    assert_eq!(env.versions(&alice, "", "k").await.unwrap().len(), 2);
    // Not another user's, not another namespace's.
    assert_code(env.versions(&bob, "", "k").await, Code::NotFound);
    assert_code(env.versions(&alice, "elsewhere", "k").await, Code::NotFound);
    assert_code(env.get_req(&bob, get_in("", "k", 1)).await, Code::NotFound);

    // Deleted: no history; re-created: a new history, numbers continue.
    env.delete(&alice, "k", 0).await.unwrap();
    assert_code(env.versions(&alice, "", "k").await, Code::NotFound);
    assert_code(
        env.get_req(&alice, get_in("", "k", 1)).await,
        Code::NotFound,
    );
    assert_eq!(
        env.sql_count("SELECT count(*) FROM memory_history").await,
        0
    );
    env.put_ok(&alice, "k", "three", &[]).await;
    let versions = env.versions(&alice, "", "k").await.unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(
        (versions[0].version, versions[0].content.as_str()),
        (3, "three")
    );
    assert_code(
        env.get_req(&alice, get_in("", "k", 2)).await,
        Code::NotFound,
    );
}

#[tokio::test]
async fn conditional_and_concurrent_writes_each_leave_one_version() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "race", "v1", &[]).await;
    // Stale conditional writes leave no version behind.
    let stale = PutMemoryRequest {
        expected_version: 7,
        ..put_req("race", "stale", &[])
    };
    assert_code(env.put(&alice, stale).await, Code::Aborted);
    let ok = PutMemoryRequest {
        expected_version: 1,
        ..put_req("race", "v2", &[])
    };
    env.put(&alice, ok).await.unwrap();

    let writers = (0..16).map(|i| {
        let env = &env;
        let alice = alice.clone();
        async move {
            env.put(&alice, put_in("", "race", &format!("writer {i}"), &[]))
                .await
        }
    });
    for r in futures::future::join_all(writers).await {
        r.unwrap();
    }
    let versions = env.versions(&alice, "", "race").await.unwrap();
    let numbers: Vec<i64> = versions.iter().map(|m| m.version).collect();
    assert_eq!(numbers, (1..=18).rev().collect::<Vec<_>>());
    // Every writer's content is there exactly once: no write lost, none doubled.
    let mut contents: Vec<String> = versions.iter().map(|m| m.content.clone()).collect();
    contents.sort();
    contents.dedup();
    assert_eq!(contents.len(), 18);
}

#[tokio::test]
async fn versions_kept_zero_keeps_only_the_current_version() {
    let env = Env::start_with(|c| c.limits.versions_kept = 0).await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "k", "one", &[]).await;
    env.put_ok(&alice, "k", "two", &[]).await;
    let versions = env.versions(&alice, "", "k").await.unwrap();
    assert_eq!(versions.len(), 1);
    assert_code(
        env.get_req(&alice, get_in("", "k", 1)).await,
        Code::NotFound,
    );
    assert_eq!(
        env.sql_count("SELECT count(*) FROM memory_history").await,
        0
    );
}
