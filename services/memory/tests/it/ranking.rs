//! Search ranks a bounded set of candidates (the newest matches): on a
//! realistic corpus its pages equal an exact ts_rank ranking of all matches
//! when they fit the bound, and of the newest ones when they do not.

use keel_proto::memory::v1::*;

use crate::support::{Env, hit_keys};

const WORDS: &[&str] = &[
    "agent",
    "plan",
    "memory",
    "vector",
    "search",
    "customer",
    "invoice",
    "meeting",
    "deploy",
    "database",
    "latency",
    "budget",
    "roadmap",
    "summary",
    "contract",
    "review",
    "incident",
    "kubernetes",
    "python",
    "rust",
    "report",
    "quarter",
    "design",
    "feedback",
    "schedule",
    "travel",
    "research",
    "paper",
    "model",
    "training",
    "evaluation",
    "pipeline",
    "metric",
    "dashboard",
    "alert",
    "backup",
    "migration",
    "release",
    "ticket",
    "support",
];

/// The bench's corpus generator, in small.
fn text(seed: usize, words: usize) -> String {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            WORDS[x % WORDS.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn seed(env: &Env, user: &crate::support::User, n: usize) {
    for i in 0..n {
        let tags = [WORDS[i % WORDS.len()], WORDS[(i / 7) % WORDS.len()]];
        env.put_ok(
            user,
            &format!("corpus/{i:05}"),
            &text(i + 1_000_003, 30),
            &tags,
        )
        .await;
    }
}

/// The exact ranking, straight from SQL: every match, ts_rank, ties by key;
/// `newest` bounds the matches to the most recently updated ones.
async fn exact(env: &Env, query: &str, newest: i64, limit: i64) -> Vec<String> {
    let client = env.db.pool.get().await.unwrap();
    client
        .query(
            "SELECT key FROM (SELECT key, ts_rank(search, q) AS score \
               FROM memories, websearch_to_tsquery('english', $1) AS q \
              WHERE search @@ q ORDER BY updated_at DESC LIMIT $2) AS m \
             ORDER BY score DESC, key LIMIT $3",
            &[&query, &newest, &limit],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

const QUERIES: &[&str] = &[
    "agent plan",
    "kubernetes",
    "invoice -budget",
    "\"release ticket\"",
    "rust OR python",
];

#[tokio::test]
async fn top_results_equal_an_exact_ranking_when_the_matches_fit_the_bound() {
    let env = Env::start().await;
    let alice = env.user("alice").await;
    seed(&env, &alice, 300).await;
    for query in QUERIES {
        let r = env
            .search_req(
                &alice,
                SearchMemoriesRequest {
                    query: query.to_string(),
                    limit: 20,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(!r.results.is_empty(), "{query}");
        assert_eq!(
            hit_keys(&r.results),
            exact(&env, query, i64::MAX, 20).await,
            "{query}"
        );
    }
}

#[tokio::test]
async fn over_the_bound_the_newest_matches_are_ranked_exactly() {
    let env = Env::start_with(|c| c.limits.search_candidates = 40).await;
    let alice = env.user("alice").await;
    seed(&env, &alice, 300).await;
    for query in QUERIES {
        let r = env
            .search_req(
                &alice,
                SearchMemoriesRequest {
                    query: query.to_string(),
                    limit: 20,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            hit_keys(&r.results),
            exact(&env, query, 40, 20).await,
            "{query}"
        );
    }
}
