//! ListMemories: key order, prefix and tag filters, pagination.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use keel_proto::memory::v1::*;

use crate::support::{Env, User, assert_invalid};

fn item(i: usize) -> String {
    format!("item/{i:03}")
}

fn item_tags(i: usize) -> Vec<&'static str> {
    let mut tags = Vec::new();
    if i.is_multiple_of(2) {
        tags.push("even");
    }
    if i.is_multiple_of(3) {
        tags.push("three");
    }
    tags
}

async fn seed(env: &Env, user: &User) {
    for i in 0..150 {
        env.put_ok(user, &item(i), &format!("content {i}"), &item_tags(i))
            .await;
    }
}

fn list_req(page_size: i32, key_prefix: &str, tag: &str) -> ListMemoriesRequest {
    ListMemoriesRequest {
        page_size,
        page_token: String::new(),
        key_prefix: key_prefix.into(),
        tag: tag.into(),
        ..Default::default()
    }
}

fn items(range: impl Iterator<Item = usize>) -> Vec<String> {
    range.map(item).collect()
}

#[tokio::test]
async fn filters_by_prefix_and_tag_in_key_order() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    seed(&env, &alice).await;
    for key in ["a_b", "aXb", "a-b", "item", "itemz"] {
        env.put_ok(&alice, key, "", &["odd one"]).await;
    }

    let all = env.list_all(&alice, list_req(0, "", "")).await;
    let mut expected: Vec<String> = items(0..150);
    expected.extend(["a_b", "aXb", "a-b", "item", "itemz"].map(String::from));
    expected.sort(); // byte order
    assert_eq!(all, expected);

    assert_eq!(
        env.list_all(&alice, list_req(7, "item/", "")).await,
        items(0..150)
    );
    assert_eq!(
        env.list_all(&alice, list_req(7, "item/1", "")).await,
        items(100..150)
    );
    assert_eq!(
        env.list_all(&alice, list_req(7, "item/149", "")).await,
        vec![item(149)]
    );
    assert!(
        env.list_all(&alice, list_req(7, "item/2", ""))
            .await
            .is_empty()
    );
    // `_` is an ordinary character in a prefix, not a wildcard.
    assert_eq!(
        env.list_all(&alice, list_req(0, "a_", "")).await,
        vec!["a_b"]
    );

    assert_eq!(
        env.list_all(&alice, list_req(9, "", "even")).await,
        items((0..150).filter(|i: &usize| i.is_multiple_of(2)))
    );
    assert_eq!(
        env.list_all(&alice, list_req(9, "item/0", "three")).await,
        items((0..100).filter(|i: &usize| i.is_multiple_of(3)))
    );
    assert_eq!(
        env.list_all(&alice, list_req(0, "", "odd one")).await,
        vec!["a-b", "aXb", "a_b", "item", "itemz"]
    );
    assert!(
        env.list_all(&alice, list_req(0, "", "nope"))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn page_sizes_default_clamp_and_reject_negative() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    seed(&env, &alice).await;

    let first = env.list(&alice, list_req(0, "", "")).await.unwrap();
    assert_eq!(first.memories.len(), 50);
    assert!(!first.next_page_token.is_empty());

    let clamped = env.list(&alice, list_req(5000, "", "")).await.unwrap();
    assert_eq!(clamped.memories.len(), 150);
    assert!(clamped.next_page_token.is_empty());

    // Exactly a page's worth: no token pointing at an empty page.
    let exact = env.list(&alice, list_req(50, "item/1", "")).await.unwrap();
    assert_eq!(exact.memories.len(), 50);
    assert!(exact.next_page_token.is_empty());

    assert_invalid(env.list(&alice, list_req(-1, "", "")).await, "page_size");
}

#[tokio::test]
async fn page_tokens_are_bound_to_their_filter_and_user() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    let bob = env.user("bob").await;
    seed(&env, &alice).await;
    let token = env
        .list(&alice, list_req(10, "item/", ""))
        .await
        .unwrap()
        .next_page_token;
    assert!(!token.is_empty());

    let with = |key_prefix: &str, tag: &str, page_token: &str| ListMemoriesRequest {
        page_token: page_token.into(),
        ..list_req(10, key_prefix, tag)
    };
    assert!(env.list(&alice, with("item/", "", &token)).await.is_ok());
    assert_invalid(
        env.list(&alice, with("item/1", "", &token)).await,
        "page_token",
    );
    assert_invalid(
        env.list(&alice, with("item/", "even", &token)).await,
        "page_token",
    );
    assert_invalid(
        env.list(&bob, with("item/", "", &token)).await,
        "page_token",
    );
    assert_invalid(
        env.list(&alice, with("item/", "", "garbage!")).await,
        "page_token",
    );
    assert_invalid(
        env.list(&alice, with("item/", "", "e30")).await,
        "page_token",
    );
    assert_invalid(
        env.list(&alice, with("bad prefix", "", "")).await,
        "key_prefix",
    );
    assert_invalid(env.list(&alice, with("", "x\ny", "")).await, "tag");
}

/// Paging while another writer inserts, updates and deletes keys in and
/// around the listed range: every seeded key is listed exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_neither_skips_nor_repeats_under_concurrent_writes() {
    let env = Arc::new(Env::start().await);
    let alice = env.user("alice").await;
    seed(&env, &alice).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (env, alice, stop) = (env.clone(), alice.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = BTreeSet::new();
            let mut round = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let i = (round * 37) % 150;
                // Between seeded keys, before and after the cursor.
                let extra = format!("{}-extra", item(i));
                env.put_ok(&alice, &extra, "x", &["even"]).await;
                written.insert(extra.clone());
                // Rewrite a seeded key (its version and updated_at change, its key does not).
                env.put_ok(
                    &alice,
                    &item((i + 75) % 150),
                    "rewritten",
                    &item_tags((i + 75) % 150),
                )
                .await;
                if round % 2 == 1 {
                    env.delete(&alice, &extra, 0).await.unwrap();
                }
                round += 1;
            }
            (written, round)
        })
    };

    let mut pages = 0;
    let mut listed = Vec::new();
    let mut req = list_req(7, "item/", "");
    loop {
        let page = env.list(&alice, req.clone()).await.unwrap();
        listed.extend(page.memories.into_iter().map(|m| m.key));
        pages += 1;
        // Give the writer room between pages.
        tokio::task::yield_now().await;
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    stop.store(true, Ordering::Relaxed);
    let (written, rounds) = writer.await.unwrap();
    assert!(rounds > 0 && pages > 20, "rounds {rounds}, pages {pages}");

    assert!(
        listed.windows(2).all(|w| w[0] < w[1]),
        "not strictly increasing (a repeat or disorder): {listed:?}"
    );
    let seeded: BTreeSet<String> = items(0..150).into_iter().collect();
    let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
    assert!(
        seeded.is_subset(&listed_set),
        "skipped: {:?}",
        seeded.difference(&listed_set)
    );
    for key in listed_set.difference(&seeded) {
        assert!(written.contains(key), "listed a key nobody wrote: {key}");
    }
}
