//! Optimistic concurrency: versions and expected_version.

use keel_proto::memory::v1::*;
use tonic::Code;

use crate::support::{Env, assert_code, assert_invalid, put_req};

fn conditional(key: &str, content: &str, expected_version: i64) -> PutMemoryRequest {
    PutMemoryRequest {
        expected_version,
        ..put_req(key, content, &[])
    }
}

#[tokio::test]
async fn versions_grow_by_one_and_stale_writes_change_nothing() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    for expected in 1..=4 {
        let m = env.put_ok(&alice, "k", &format!("v{expected}"), &[]).await;
        assert_eq!(m.version, expected);
    }

    // Conditional on the current version: applied.
    let r = env.put(&alice, conditional("k", "v5", 4)).await.unwrap();
    assert!(!r.created);
    assert_eq!(r.memory.unwrap().version, 5);

    // Stale: ABORTED, names the current version, nothing changed.
    let before = env.get(&alice, "k").await.unwrap();
    let message = assert_code(
        env.put(&alice, conditional("k", "stale", 4)).await,
        Code::Aborted,
    );
    assert!(message.contains("version 5"), "{message}");
    assert_code(
        env.put(&alice, conditional("k", "ahead", 9)).await,
        Code::Aborted,
    );
    assert_code(env.delete(&alice, "k", 4).await, Code::Aborted);
    assert_eq!(env.get(&alice, "k").await.unwrap(), before);

    // Conditional delete on the current version.
    env.delete(&alice, "k", 5).await.unwrap();
    assert_code(env.get(&alice, "k").await, Code::NotFound);
}

#[tokio::test]
async fn conditional_put_of_an_absent_key_is_aborted_and_creates_nothing() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let message = assert_code(
        env.put(&alice, conditional("new", "x", 1)).await,
        Code::Aborted,
    );
    assert!(message.contains("does not exist"), "{message}");
    assert_code(env.get(&alice, "new").await, Code::NotFound);
    assert_invalid(
        env.put(&alice, conditional("new", "x", -1)).await,
        "expected_version",
    );
    assert_invalid(env.delete(&alice, "new", -1).await, "expected_version");
}

#[tokio::test]
async fn concurrent_conditional_puts_with_the_same_expected_version_have_one_winner() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "race", "v1", &[]).await;

    let attempts = (0..8).map(|i| {
        let env = &env;
        let alice = alice.clone();
        async move {
            env.put(&alice, conditional("race", &format!("writer {i}"), 1))
                .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in results.iter().filter(|r| r.is_err()) {
        assert_eq!(r.as_ref().unwrap_err().code(), Code::Aborted, "{r:?}");
    }
    let stored = env.get(&alice, "race").await.unwrap();
    assert_eq!(stored.version, 2);
    assert_eq!(Some(&stored), winners[0].memory.as_ref());
}

#[tokio::test]
async fn concurrent_unconditional_puts_all_apply_in_some_order() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let attempts = (0..8).map(|i| {
        let env = &env;
        let alice = alice.clone();
        async move {
            env.put(&alice, put_req("shared", &format!("writer {i}"), &[]))
                .await
        }
    });
    let results: Vec<_> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.expect("unconditional put"))
        .collect();
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
    let mut versions: Vec<i64> = results
        .iter()
        .map(|r| r.memory.as_ref().unwrap().version)
        .collect();
    versions.sort();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    assert_eq!(env.get(&alice, "shared").await.unwrap().version, 8);
}

/// A writer that read version 1 before the memory was deleted and re-created
/// must not overwrite (or delete) the new memory: versions continue across a
/// delete instead of starting again at 1.
#[tokio::test]
async fn a_stale_expected_version_fails_across_delete_and_re_create() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let first = env.put(&alice, put_req("k", "first", &[])).await.unwrap();
    assert!(first.created);
    let stale = first.memory.unwrap().version;
    assert_eq!(stale, 1);

    env.delete(&alice, "k", 0).await.unwrap();
    let again = env.put(&alice, put_req("k", "second", &[])).await.unwrap();
    assert!(again.created, "re-created after the delete");
    let second = again.memory.unwrap();
    assert!(second.version > stale, "{second:?}");

    let message = assert_code(
        env.put(&alice, conditional("k", "stale writer", stale))
            .await,
        Code::Aborted,
    );
    assert!(
        message.contains(&format!("version {}", second.version)),
        "{message}"
    );
    assert_code(env.delete(&alice, "k", stale).await, Code::Aborted);
    assert_eq!(env.get(&alice, "k").await.unwrap(), second);

    // Updates, deletes and re-creates keep numbering on; the current version
    // still works for a conditional write.
    let updated = env.put_ok(&alice, "k", "third", &[]).await;
    assert_eq!(updated.version, second.version + 1);
    assert!(
        !env.put(&alice, put_req("k", "fourth", &[]))
            .await
            .unwrap()
            .created
    );
    env.delete(&alice, "k", updated.version + 1).await.unwrap();
    let after = env.put(&alice, put_req("k", "fifth", &[])).await.unwrap();
    assert!(after.created);
    let after = after.memory.unwrap();
    assert_eq!(after.version, updated.version + 2);
    for stale in 1..after.version {
        assert_code(
            env.put(&alice, conditional("k", "stale", stale)).await,
            Code::Aborted,
        );
    }
    let current = env
        .put(&alice, conditional("k", "sixth", after.version))
        .await
        .unwrap();
    assert_eq!(current.memory.unwrap().version, after.version + 1);

    // Another user's key of the same name numbers on its own.
    let bob = env.user("bob").await;
    assert_eq!(env.put_ok(&bob, "k", "bob's", &[]).await.version, 1);
}

/// Puts and deletes of one key racing each other never hand out a version
/// twice (and never deadlock).
#[tokio::test]
async fn racing_puts_and_deletes_never_give_a_version_twice() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let writers = (0..6).map(|i| {
        let env = &env;
        let alice = alice.clone();
        async move {
            let mut versions = Vec::new();
            for round in 0..10 {
                let put = env
                    .put(&alice, put_req("churn", &format!("{i}/{round}"), &[]))
                    .await
                    .expect("unconditional put");
                versions.push(put.memory.unwrap().version);
                match env.delete(&alice, "churn", 0).await {
                    Ok(_) => {}
                    Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
                }
            }
            versions
        }
    });
    let mut versions: Vec<i64> = futures::future::join_all(writers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let puts = versions.len();
    versions.sort();
    versions.dedup();
    assert_eq!(
        versions.len(),
        puts,
        "a version was given twice: {versions:?}"
    );
}
