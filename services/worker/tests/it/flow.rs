//! Flow control seen from a stream worker: a start the jobs service holds
//! back is tried again later, never counted as a failed delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_proto::jobs::v1::JobStatus;
use keel_worker::Registry;
use serde_json::json;

use crate::support::Env;

#[tokio::test]
async fn held_back_starts_run_later_and_are_never_dead_lettered() {
    let dir = std::env::temp_dir().join(format!("keel-flow-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flow.toml");
    std::fs::write(&path, "[kinds.slow]\nmax_running = 1\n").unwrap();
    let env = Env::start_with(|c| c.flow_control_file = Some(path.clone())).await;

    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running.clone(), most.clone());
    let registry = Registry::new().register_fn("slow", move |ctx| {
        let (r, m) = (r.clone(), m.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(400)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(ctx.payload)
        }
    });
    let mut config = env.worker_config();
    // A message taken over even once would be dead-lettered, and one left
    // idle is taken over after 300 ms: held messages must stay fresh.
    config.max_deliveries = 1;
    config.claim_idle_ms = 300;
    let worker = env.start_worker(config, registry).await;

    let jobs = env
        .create_many("slow", (0..4).map(|i| json!({ "i": i })))
        .await;
    for job in &jobs {
        let done = env.wait_for(&job.id, JobStatus::Succeeded).await;
        assert_eq!(done.attempt, 1, "held back, not failed: {done:?}");
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "max_running = 1 held");
    let mut redis = env.redis().await;
    let dead: u64 = redis::cmd("XLEN")
        .arg(env.redis.config.dead_letter_stream())
        .query_async(&mut *redis)
        .await
        .unwrap();
    assert_eq!(dead, 0, "nothing dead-lettered");
    worker.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
