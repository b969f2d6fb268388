//! The hot statements keep to the primary key while table statistics are
//! stale: a burst of jobs outpaces autovacuum's ANALYZE (at most once a
//! minute), and a pooled connection keeps the generic plan it made until then.

use std::time::Duration;

use keel_jobs::store::{self, Start};
use uuid::Uuid;

use crate::support::Svc;

/// Queued jobs behind the batch: what a burst leaves waiting.
const QUEUED: i64 = 20_000;
/// Jobs the batch starts.
const BATCH: usize = 10;

#[tokio::test]
async fn a_start_batch_reads_only_its_jobs_while_statistics_say_none_are_queued() {
    let svc = Svc::start().await;
    let mut client = svc.db.pool.get().await.unwrap();
    // Statistics taken when every job had finished, as autovacuum leaves
    // them between two bursts; then a burst queues 20,000 jobs.
    let insert = "INSERT INTO jobs (id, user_id, kind, payload, max_attempts, run_at, status,
                                    attempt, finished_at)
                  SELECT gen_random_uuid(), $1, 'echo', '{}', 1, now() - interval '1 second',
                         $2, 0, CASE WHEN $2 = 'queued' THEN NULL ELSE now() END
                  FROM generate_series(1, $3::int8)";
    client
        .execute(insert, &[&svc.user, &"succeeded", &2_000i64])
        .await
        .unwrap();
    client.batch_execute("ANALYZE jobs").await.unwrap();
    client
        .execute(insert, &[&svc.user, &"queued", &QUEUED])
        .await
        .unwrap();
    let ids: Vec<Uuid> = client
        .query(
            "SELECT id FROM jobs WHERE status = 'queued' LIMIT $1",
            &[&(BATCH as i64)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let starts: Vec<Start<'_>> = ids
        .iter()
        .map(|&id| Start {
            id,
            worker_id: "w1",
            delivery_id: "",
        })
        .collect();

    // The generic plan, as a pooled connection uses after five executions.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    let started = store::start_jobs(&tx, &starts, Duration::from_secs(30))
        .await
        .unwrap();
    let read: i64 = tx
        .query_one(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
             FROM pg_stat_xact_user_tables WHERE relname = 'jobs'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();

    assert_eq!(started.len(), BATCH, "every job of the batch starts");
    // Each job is read a few times (locked, updated); a scan of the queued
    // jobs reads all 20,000, for every batch.
    assert!(
        read < 20 * BATCH as i64,
        "starting {BATCH} jobs read {read} job rows of {QUEUED} queued"
    );
    assert_eq!(
        svc.count("SELECT count(*) FROM jobs WHERE status = 'running'")
            .await,
        BATCH as i64
    );
}
