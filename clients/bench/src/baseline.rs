//! The raw-SQL baseline: the services' own store functions (the same SQL
//! statements) called straight against Postgres with the same concurrency, no
//! gRPC, no auth, no Redis. `service / raw` is the figure that matters.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use deadpool_postgres::Pool;
use keel_jobs::domain::NewJob;
use keel_memory::config::{DEFAULT_SEARCH_CANDIDATES, DEFAULT_VERSIONS_KEPT};
use keel_memory::domain::NewMemory;
use keel_memory::store::{Scope, SearchQuery, Store as MemoryStore};
use uuid::Uuid;

pub(crate) struct Baseline {
    pool: Pool,
    user_id: Uuid,
}

/// Ops per second of `op` from `concurrency` tasks for `duration`.
async fn rate<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Result<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks = (0..concurrency).map(|_| {
        let (op, next, done) = (op.clone(), next.clone(), done.clone());
        tokio::spawn(async move {
            while started.elapsed() < duration {
                if op(next.fetch_add(1, Ordering::Relaxed)).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    });
    futures::future::join_all(tasks).await;
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Memories inserted per statement when seeding other users.
const SEED_BATCH: usize = 1000;

impl Baseline {
    /// Gives `users` new users each the memory-search corpus of `corpus`
    /// memories (the same keys, contents and tags as the gRPC seed), straight
    /// into Postgres; returns how many memories it inserted.
    pub(crate) async fn seed_other_users(&self, users: usize, corpus: usize) -> Result<u64> {
        if users == 0 {
            return Ok(0);
        }
        let client = self.pool.get().await?;
        let ids: Vec<Uuid> = (0..users).map(|_| Uuid::new_v4()).collect();
        for id in &ids {
            client
                .execute(
                    "INSERT INTO users (id, email, display_name, password_hash) \
                     VALUES ($1, $2, 'bench', 'not-a-hash')",
                    &[id, &format!("bench-other-{}@example.com", id.simple())],
                )
                .await?;
        }
        let stmt = client
            .prepare(
                "INSERT INTO memories (user_id, key, content, tags, created_at, updated_at) \
                 SELECT u, m.key, m.content, ARRAY[m.tag1, m.tag2], now(), now() \
                 FROM unnest($1::uuid[]) AS u, \
                      unnest($2::text[], $3::text[], $4::text[], $5::text[]) \
                          AS m(key, content, tag1, tag2)",
            )
            .await?;
        let mut inserted = 0;
        for start in (0..corpus).step_by(SEED_BATCH) {
            let range = start..(start + SEED_BATCH).min(corpus);
            let keys: Vec<String> = range.clone().map(|i| format!("corpus/{i:08}")).collect();
            let contents: Vec<String> = range
                .clone()
                .map(|i| crate::scenarios::text(i + 1_000_003, 60))
                .collect();
            let tag1: Vec<String> = range.clone().map(crate::scenarios::tag).collect();
            let tag2: Vec<String> = range.map(|i| crate::scenarios::tag(i / 7)).collect();
            inserted += client
                .execute(&stmt, &[&ids, &keys, &contents, &tag1, &tag2])
                .await?;
        }
        client.batch_execute("ANALYZE memories").await?;
        Ok(inserted)
    }

    pub(crate) async fn connect(db_url: &str, user_id: &str) -> Result<Self> {
        let mut cfg = keel_shared::config::DatabaseConfig::from_url(db_url);
        // Same pool size the services use by default.
        cfg.db_pool_size = 16;
        Ok(Self {
            pool: keel_shared::db::connect(&cfg).await?,
            user_id: user_id.parse().context("user id")?,
        })
    }

    pub(crate) async fn create_job(&self, c: usize, d: Duration) -> Result<f64> {
        let (pool, user) = (self.pool.clone(), self.user_id);
        rate(c, d, move |i| {
            let pool = pool.clone();
            async move {
                let client = pool.get().await?;
                let job = NewJob {
                    kind: "bench.raw".into(),
                    payload: serde_json::json!({"i": i}),
                    priority: 0,
                    max_attempts: 3,
                    run_at: None,
                    idempotency_key: None,
                    schedule_timeout: None,
                    timeout: None,
                };
                let row = keel_jobs::store::NewRow {
                    id: Uuid::now_v7(),
                    user_id: user,
                    job: &job,
                    schedule_timeout: std::time::Duration::from_secs(3600),
                    traceparent: None,
                };
                keel_jobs::store::insert_jobs(&client, &[row], keel_jobs::delivery::PUBLISH_GRACE)
                    .await?;
                Ok(())
            }
        })
        .await
    }

    pub(crate) async fn get_job(&self, c: usize, d: Duration, ids: &[String]) -> Result<f64> {
        let ids: Arc<Vec<Uuid>> = Arc::new(ids.iter().filter_map(|s| s.parse().ok()).collect());
        let (pool, user) = (self.pool.clone(), self.user_id);
        rate(c, d, move |i| {
            let (pool, id) = (pool.clone(), ids[i.wrapping_mul(7919) % ids.len()]);
            async move {
                let client = pool.get().await?;
                keel_jobs::store::user_job(&client, user, id).await?;
                Ok(())
            }
        })
        .await
    }

    pub(crate) async fn list_jobs(&self, c: usize, d: Duration) -> Result<f64> {
        let (pool, user) = (self.pool.clone(), self.user_id);
        rate(c, d, move |_| {
            let pool = pool.clone();
            async move {
                let client = pool.get().await?;
                keel_jobs::store::list_jobs(&client, user, None, None, None, 51).await?;
                Ok(())
            }
        })
        .await
    }

    pub(crate) async fn put_memory(&self, c: usize, d: Duration) -> Result<f64> {
        let (store, user) = (Arc::new(MemoryStore::new(self.pool.clone())), self.user_id);
        rate(c, d, move |i| {
            let store = store.clone();
            async move {
                let memory = NewMemory {
                    namespace: String::new(),
                    key: format!("raw/{i:08}"),
                    content: crate::scenarios::text(i, 40),
                    // The same tag spread as the gRPC scenario (tag counts are per row).
                    tags: vec![crate::scenarios::tag(i)],
                    metadata: serde_json::json!({}),
                    expected_version: 0,
                    expires_at: None,
                };
                store.put(user, &memory, DEFAULT_VERSIONS_KEPT).await?;
                Ok(())
            }
        })
        .await
    }

    pub(crate) async fn get_memory(&self, c: usize, d: Duration, keys: usize) -> Result<f64> {
        let (store, user) = (Arc::new(MemoryStore::new(self.pool.clone())), self.user_id);
        rate(c, d, move |i| {
            let store = store.clone();
            async move {
                let key = format!("put/{:08}", i.wrapping_mul(7919) % keys);
                // NOT_FOUND is a served read, as in the gRPC scenario.
                let _ = store.get(user, "", &key, 0, DEFAULT_VERSIONS_KEPT).await;
                Ok(())
            }
        })
        .await
    }

    pub(crate) async fn search(&self, c: usize, d: Duration) -> Result<f64> {
        let (store, user) = (Arc::new(MemoryStore::new(self.pool.clone())), self.user_id);
        rate(c, d, move |i| {
            let store = store.clone();
            async move {
                let query = crate::scenarios::query(i);
                let search = SearchQuery {
                    namespace: "",
                    query: &query,
                    tags: &[],
                    candidates: DEFAULT_SEARCH_CANDIDATES,
                    // A page of 10 and one more, as the service asks.
                    limit: 11,
                    snippets: 10,
                    after: None,
                };
                store.search(user, &search).await?;
                Ok(())
            }
        })
        .await
    }

    pub(crate) async fn workspace(&self, c: usize, d: Duration) -> Result<f64> {
        let (store, user) = (Arc::new(MemoryStore::new(self.pool.clone())), self.user_id);
        rate(c, d, move |_| {
            let store = store.clone();
            async move {
                store.workspace(user, Scope::Namespace("")).await?;
                Ok(())
            }
        })
        .await
    }
}
