//! GetWorkspace: aggregate figures against what was written.

use std::collections::HashMap;

use keel_shared::time::from_timestamp;

use crate::support::Env;

#[tokio::test]
async fn empty_workspace() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let ws = env.workspace(&alice).await.unwrap();
    assert_eq!(ws.memory_count, 0);
    assert_eq!(ws.total_content_bytes, 0);
    assert!(ws.tag_counts.is_empty());
    assert_eq!(ws.last_updated_at, None);
    assert!(ws.recent.is_empty());
}

#[tokio::test]
async fn figures_match_what_was_written() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    env.put_ok(&bob, "bob/only", "not alice's", &["work", "bob"])
        .await;

    let writes: [(&str, &str, &[&str]); 7] = [
        ("m1", "plain ascii", &["work"]),
        ("m2", "héllo wörld", &["work", "home"]),
        ("m3", "日本語のメモ", &[]),
        ("m4", "🦀🦀 crabs", &["home"]),
        ("m5", "", &["work", "empty"]),
        ("m6", "to be deleted", &["gone"]),
        ("m7", "Привет", &["work"]),
    ];
    for (key, content, tags) in writes {
        env.put_ok(&alice, key, content, tags).await;
    }
    let m2 = env.put_ok(&alice, "m2", "updated ✓", &["home"]).await;
    env.delete(&alice, "m6", 0).await.unwrap();

    let live: Vec<(&str, &str, &[&str])> = vec![
        ("m1", "plain ascii", &["work"]),
        ("m2", "updated ✓", &["home"]),
        ("m3", "日本語のメモ", &[]),
        ("m4", "🦀🦀 crabs", &["home"]),
        ("m5", "", &["work", "empty"]),
        ("m7", "Привет", &["work"]),
    ];
    let mut tag_counts: HashMap<String, i64> = HashMap::new();
    for tag in live.iter().flat_map(|(_, _, tags)| tags.iter()) {
        *tag_counts.entry(tag.to_string()).or_default() += 1;
    }
    let total_bytes: usize = live.iter().map(|(_, content, _)| content.len()).sum();

    let ws = env.workspace(&alice).await.unwrap();
    assert_eq!(ws.memory_count, 6);
    assert_eq!(ws.total_content_bytes, total_bytes as i64);
    assert!(
        total_bytes
            > live
                .iter()
                .map(|(_, c, _)| c.chars().count())
                .sum::<usize>()
    );
    assert_eq!(ws.tag_counts, tag_counts);

    // Newest update first: m2 was rewritten last, m6 is gone.
    let recent: Vec<&str> = ws.recent.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(recent, vec!["m2", "m7", "m5", "m4", "m3"]);
    for m in &ws.recent {
        assert_eq!(m, &env.get(&alice, &m.key).await.unwrap());
    }
    assert_eq!(ws.last_updated_at, m2.updated_at);
    let newest = from_timestamp(ws.last_updated_at.as_ref().unwrap()).unwrap();
    for m in &ws.recent {
        assert!(from_timestamp(m.updated_at.as_ref().unwrap()).unwrap() <= newest);
    }

    // Bob sees only his own.
    let bobs = env.workspace(&bob).await.unwrap();
    assert_eq!(bobs.memory_count, 1);
    assert_eq!(bobs.total_content_bytes, "not alice's".len() as i64);
    assert_eq!(
        bobs.tag_counts,
        HashMap::from([("work".to_string(), 1), ("bob".to_string(), 1)])
    );
    assert_eq!(bobs.recent.len(), 1);
}

/// Tag counts are kept by triggers on every write; after concurrent puts that
/// change tags, updates that keep them, and deletes, they equal a recount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_counts_stay_exact_under_concurrent_writes() {
    let env = std::sync::Arc::new(Env::start().await);
    let alice = env.user("alice").await;
    let tag_sets: [&[&str]; 4] = [&["a", "b"], &["b", "c"], &[], &["c", "a", "d"]];
    let writers = (0..4).map(|w| {
        let (env, alice) = (env.clone(), alice.clone());
        tokio::spawn(async move {
            for i in 0..30usize {
                let key = format!("k{}", (i * 7 + w) % 12);
                match (i + w) % 5 {
                    4 => {
                        let _ = env.delete(&alice, &key, 0).await;
                    }
                    n => {
                        env.put_ok(&alice, &key, "x", tag_sets[n % tag_sets.len()])
                            .await;
                    }
                }
            }
        })
    });
    for writer in futures::future::join_all(writers).await {
        writer.unwrap();
    }

    let mut expected: HashMap<String, i64> = HashMap::new();
    let mut count = 0;
    for key in env
        .list_all(
            &alice,
            keel_proto::memory::v1::ListMemoriesRequest::default(),
        )
        .await
    {
        count += 1;
        for tag in env.get(&alice, &key).await.unwrap().tags {
            *expected.entry(tag).or_default() += 1;
        }
    }
    let ws = env.workspace(&alice).await.unwrap();
    assert_eq!(ws.memory_count, count);
    assert_eq!(ws.tag_counts, expected);
}

#[tokio::test]
async fn deleting_a_user_removes_their_memories_counts_and_versions() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    env.put_ok(&alice, "k1", "x", &["shared", "mine"]).await;
    env.put_ok(&bob, "k1", "y", &["shared"]).await;
    let client = env.db.pool.get().await.unwrap();
    client
        .execute("DELETE FROM users WHERE email = 'alice@example.com'", &[])
        .await
        .unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM memory_tag_counts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
    let versions: i64 = client
        .query_one("SELECT count(*) FROM memory_versions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 1, "only bob's key's version is left");
    let ws = env.workspace(&bob).await.unwrap();
    assert_eq!(ws.tag_counts, HashMap::from([("shared".to_string(), 1)]));
}
