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
use keel_memory::domain::NewMemory;
use keel_memory::store::Store as MemoryStore;
use uuid::Uuid;

pub struct Baseline {
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

impl Baseline {
    pub async fn connect(db_url: &str, user_id: &str) -> Result<Self> {
        let mut cfg = keel_shared::config::DatabaseConfig::from_url(db_url);
        // Same pool size the services use by default.
        cfg.db_pool_size = 16;
        Ok(Self {
            pool: keel_shared::db::connect(&cfg).await?,
            user_id: user_id.parse().context("user id")?,
        })
    }

    pub async fn create_job(&self, c: usize, d: Duration) -> Result<f64> {
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

    pub async fn get_job(&self, c: usize, d: Duration, ids: &[String]) -> Result<f64> {
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

    pub async fn list_jobs(&self, c: usize, d: Duration) -> Result<f64> {
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

    pub async fn put_memory(&self, c: usize, d: Duration) -> Result<f64> {
        let (store, user) = (Arc::new(MemoryStore::new(self.pool.clone())), self.user_id);
        rate(c, d, move |i| {
            let store = store.clone();
            async move {
                let memory = NewMemory {
                    key: format!("raw/{i:08}"),
                    content: crate::scenarios::text(i, 40),
                    // The same tag spread as the gRPC scenario (tag counts are per row).
                    tags: vec![crate::scenarios::tag(i)],
                    metadata: serde_json::json!({}),
                    expected_version: 0,
                };
                store.put(user, &memory).await?;
                Ok(())
            }
        })
        .await
    }

    pub async fn get_memory(&self, c: usize, d: Duration, keys: usize) -> Result<f64> {
        let (store, user) = (Arc::new(MemoryStore::new(self.pool.clone())), self.user_id);
        rate(c, d, move |i| {
            let store = store.clone();
            async move {
                let key = format!("put/{:08}", i.wrapping_mul(7919) % keys);
                // NOT_FOUND is a served read, as in the gRPC scenario.
                let _ = store.get(user, &key).await;
                Ok(())
            }
        })
        .await
    }

    pub async fn search(&self, c: usize, d: Duration) -> Result<f64> {
        let (store, user) = (Arc::new(MemoryStore::new(self.pool.clone())), self.user_id);
        rate(c, d, move |i| {
            let store = store.clone();
            async move {
                let query = crate::scenarios::query(i);
                store.search(user, &query, 10).await?;
                Ok(())
            }
        })
        .await
    }

    pub async fn workspace(&self, c: usize, d: Duration) -> Result<f64> {
        let (store, user) = (Arc::new(MemoryStore::new(self.pool.clone())), self.user_id);
        rate(c, d, move |_| {
            let store = store.clone();
            async move {
                store.workspace(user).await?;
                Ok(())
            }
        })
        .await
    }
}
