//! SearchMemories additions: tag filters, pages, snippets.

use keel_proto::memory::v1::*;

use crate::support::{Env, assert_invalid, hit_keys};

fn search(query: &str) -> SearchMemoriesRequest {
    SearchMemoriesRequest {
        query: query.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_tags_filter_keeps_memories_carrying_every_tag() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    env.put_ok(&alice, "both", "deploy notes", &["ops", "prod"])
        .await;
    env.put_ok(&alice, "ops-only", "deploy notes", &["ops"])
        .await;
    env.put_ok(&alice, "prod-only", "deploy notes", &["prod"])
        .await;
    env.put_ok(&alice, "none", "deploy notes", &[]).await;
    let with = |tags: &[&str]| SearchMemoriesRequest {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..search("deploy")
    };
    let keys = |r: SearchMemoriesResponse| hit_keys(&r.results);
    assert_eq!(
        keys(
            env.search_req(&alice, with(&["ops", "prod"]))
                .await
                .unwrap()
        ),
        vec!["both"]
    );
    assert_eq!(
        keys(
            env.search_req(&alice, with(&["prod", "ops", "ops"]))
                .await
                .unwrap()
        ),
        vec!["both"]
    );
    assert_eq!(
        keys(env.search_req(&alice, with(&["ops"])).await.unwrap()),
        vec!["both", "ops-only"]
    );
    assert!(
        env.search_req(&alice, with(&["ops", "missing"]))
            .await
            .unwrap()
            .results
            .is_empty()
    );
    assert_eq!(
        env.search_req(&alice, with(&[]))
            .await
            .unwrap()
            .results
            .len(),
        4
    );

    // Bad filters: over the limit, empty or control characters, naming the field.
    let many: Vec<String> = (0..17).map(|i| format!("t{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_invalid(env.search_req(&alice, with(&many)).await, "tags");
    assert!(env.search_req(&alice, with(&many[..16])).await.is_ok());
    assert_invalid(env.search_req(&alice, with(&["ok", ""])).await, "tags[1]");
    assert_invalid(env.search_req(&alice, with(&["a\tb"])).await, "tags[0]");
}

#[tokio::test]
async fn pages_walk_the_whole_ranking_once() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    // Scores of every kind: ties (same content), key and tag hits, repeats.
    for i in 0..23 {
        let content = format!("harbour log {} {}", "harbour ".repeat(i % 4), i);
        let tags: &[&str] = if i % 5 == 0 { &["harbour"] } else { &["misc"] };
        env.put_ok(&alice, &format!("log/{i:02}"), &content, tags)
            .await;
    }
    let one_page = env
        .search_req(
            &alice,
            SearchMemoriesRequest {
                limit: 100,
                ..search("harbour")
            },
        )
        .await
        .unwrap();
    assert_eq!(one_page.results.len(), 23);
    assert!(one_page.next_page_token.is_empty());

    let mut paged = Vec::new();
    let mut req = SearchMemoriesRequest {
        page_size: 5,
        ..search("harbour")
    };
    let mut pages = 0;
    loop {
        let page = env.search_req(&alice, req.clone()).await.unwrap();
        pages += 1;
        assert!(page.results.len() <= 5);
        paged.extend(page.results);
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(pages, 5);
    assert_eq!(hit_keys(&paged), hit_keys(&one_page.results));
    assert_eq!(
        paged.iter().map(|r| r.score).collect::<Vec<_>>(),
        one_page.results.iter().map(|r| r.score).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn page_tokens_of_another_query_filter_or_namespace_are_refused() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    for i in 0..4 {
        env.put_ok(&alice, &format!("k{i}"), "orchard apples", &["fruit"])
            .await;
    }
    let first = env
        .search_req(
            &alice,
            SearchMemoriesRequest {
                page_size: 1,
                ..search("orchard")
            },
        )
        .await
        .unwrap();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let next = |req: SearchMemoriesRequest| SearchMemoriesRequest {
        page_token: token.clone(),
        page_size: 1,
        ..req
    };
    assert!(
        env.search_req(&alice, next(search("orchard")))
            .await
            .is_ok()
    );
    for other in [
        search("apples"),
        SearchMemoriesRequest {
            tags: vec!["fruit".into()],
            ..search("orchard")
        },
        SearchMemoriesRequest {
            namespace: "agent".into(),
            ..search("orchard")
        },
    ] {
        assert_invalid(env.search_req(&alice, next(other)).await, "page_token");
    }
    assert_invalid(
        env.search_req(&bob, next(search("orchard"))).await,
        "page_token",
    );
    for junk in ["x", "!!!", "eyJmIjoiMDAiLCJjIjpudWxsfQ"] {
        let req = SearchMemoriesRequest {
            page_token: junk.into(),
            ..search("orchard")
        };
        assert_invalid(env.search_req(&alice, req).await, "page_token");
    }
    for bad in [-1, 101] {
        let req = SearchMemoriesRequest {
            page_size: bad,
            ..search("orchard")
        };
        assert_invalid(env.search_req(&alice, req).await, "page_size");
    }
}

#[tokio::test]
async fn each_result_has_a_snippet_with_the_matched_words_marked() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let long = format!(
        "{} The kestrels nested under the bridge again this spring. {}",
        "Filler words about nothing in particular. ".repeat(20),
        "More filler after the interesting part. ".repeat(20)
    );
    env.put_ok(&alice, "birds", &long, &[]).await;
    env.put_ok(
        &alice,
        "tagged",
        "nothing about it in the text",
        &["kestrel"],
    )
    .await;
    let r = env
        .search_req(&alice, search("kestrel bridge"))
        .await
        .unwrap();
    assert_eq!(hit_keys(&r.results), vec!["birds"]);
    let snippet = &r.results[0].snippet;
    assert!(snippet.contains("«kestrels»"), "{snippet}");
    assert!(snippet.contains("«bridge»"), "{snippet}");
    assert!(
        snippet.len() < long.len() / 4,
        "a fragment, not the content: {snippet}"
    );

    // Matched on the tag only: the start of the content, nothing marked.
    let r = env.search_req(&alice, search("kestrel")).await.unwrap();
    let tagged = r
        .results
        .iter()
        .find(|h| h.memory.as_ref().unwrap().key == "tagged")
        .unwrap();
    assert_eq!(tagged.snippet, "nothing about it in the text");
}
