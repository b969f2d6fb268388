//! SearchMemories: ranking, web-search syntax, hostile and empty queries.

use crate::support::{Env, assert_invalid};

fn keys(results: &[keel_proto::memory::v1::SearchResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| r.memory.as_ref().unwrap().key.clone())
        .collect()
}

#[tokio::test]
async fn key_and_tag_matches_outrank_content_only_matches() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let noisy = "Compilers are fun. ".to_string() + &"kestrel ".repeat(40);
    env.put_ok(&alice, "a/content-only", &noisy, &["birds"])
        .await;
    env.put_ok(&alice, "b/notes", "something about falcons", &["kestrel"])
        .await;
    env.put_ok(&alice, "c/kestrel.sightings", "seen twice this week", &[])
        .await;
    env.put_ok(&alice, "d/unrelated", "nothing to see", &["misc"])
        .await;

    let results = env.search(&alice, "kestrel", 0).await.unwrap();
    assert_eq!(keys(&results)[2], "a/content-only", "{:?}", keys(&results));
    let mut top: Vec<String> = keys(&results)[..2].to_vec();
    top.sort();
    assert_eq!(top, vec!["b/notes", "c/kestrel.sightings"]);
    assert_eq!(results.len(), 3);
    assert!(results.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(results[1].score > results[2].score);

    // English stemming applies to query and document alike.
    assert_eq!(
        keys(&env.search(&alice, "falcon", 0).await.unwrap()),
        vec!["b/notes"]
    );
}

#[tokio::test]
async fn web_search_syntax_and_ties_in_key_order() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "m3", "the quick brown fox", &[]).await;
    env.put_ok(&alice, "m1", "the quick brown fox", &[]).await;
    env.put_ok(&alice, "m2", "a brown quick dog", &[]).await;
    env.put_ok(&alice, "m4", "Привет мир, 日本語, café", &[])
        .await;

    // Equal scores come back in key order.
    assert_eq!(
        keys(&env.search(&alice, "fox", 0).await.unwrap()),
        vec!["m1", "m3"]
    );
    assert_eq!(
        keys(&env.search(&alice, "\"quick brown\"", 0).await.unwrap()),
        vec!["m1", "m3"]
    );
    assert_eq!(
        keys(&env.search(&alice, "brown -fox", 0).await.unwrap()),
        vec!["m2"]
    );
    assert_eq!(
        keys(&env.search(&alice, "dog or fox", 0).await.unwrap()).len(),
        3
    );
    assert_eq!(
        keys(&env.search(&alice, "привет", 0).await.unwrap()),
        vec!["m4"]
    );
    assert_eq!(
        keys(&env.search(&alice, "日本語", 0).await.unwrap()),
        vec!["m4"]
    );
    assert_eq!(
        keys(&env.search(&alice, "café", 0).await.unwrap()),
        vec!["m4"]
    );
    assert!(env.search(&alice, "zebra", 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn hostile_queries_never_fail_and_change_nothing() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "fox", "the fox and the dog", &[]).await;

    let with_words = [
        "fox \"unterminated",
        "fox' OR 1=1 --",
        "' OR 1=1 --",
        "fox & | ! ( ) : *",
        "fox:*",
        "(fox",
        "fox)",
        "'; DROP TABLE memories; --fox",
        "fox <-> dog",
        "fox\"dog",
        "\\ fox $1 %s {}",
        "fox 🦀",
        "Привет fox",
        "fox\0dog",
    ];
    for query in with_words {
        assert!(
            env.search(&alice, query, 0).await.is_ok(),
            "query {query:?} failed"
        );
    }
    assert_eq!(
        keys(&env.search(&alice, "fox 🦀 (", 0).await.unwrap()),
        vec!["fox"]
    );
    // Nothing searchable: only symbols, emoji, quotes or stop words.
    for query in ["&|!():*", "🦀🦀", "\"\"", "\"", "-", "the and of", "or"] {
        assert_invalid(env.search(&alice, query, 0).await, "query");
    }
    assert_eq!(
        env.get(&alice, "fox").await.unwrap().content,
        "the fox and the dog"
    );
}

#[tokio::test]
async fn empty_and_unselective_queries_are_invalid() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "k", "the fox", &[]).await;
    for query in ["", "   ", "\t\n", "-fox", "fox OR -dog", "the"] {
        assert_invalid(env.search(&alice, query, 0).await, "query");
    }
    // Exclusions are fine next to a word that must match.
    assert_eq!(
        keys(&env.search(&alice, "fox -dog", 0).await.unwrap()),
        vec!["k"]
    );
}

#[tokio::test]
async fn limits_on_results_and_query_length() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    for i in 0..12 {
        env.put_ok(&alice, &format!("k{i:02}"), "shared word", &[])
            .await;
    }
    assert_eq!(env.search(&alice, "shared", 0).await.unwrap().len(), 10);
    assert_eq!(env.search(&alice, "shared", 1).await.unwrap().len(), 1);
    assert_eq!(env.search(&alice, "shared", 100).await.unwrap().len(), 12);
    assert_invalid(env.search(&alice, "shared", 101).await, "limit");
    assert_invalid(env.search(&alice, "shared", -1).await, "limit");

    let long = format!("shared {}", "x".repeat(1024 - 7));
    assert_eq!(long.len(), 1024);
    assert!(env.search(&alice, &long, 0).await.is_ok());
    assert_invalid(env.search(&alice, &format!("{long}x"), 0).await, "query");
}
