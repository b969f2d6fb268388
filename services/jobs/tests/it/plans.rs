//! The hot statements keep to the primary key while table statistics are
//! stale: a burst of jobs outpaces autovacuum's ANALYZE (at most once a
//! minute), and a pooled connection keeps the generic plan it made until then.

use std::time::Duration;

use deadpool_postgres::{Object, Transaction};
use keel_jobs::store::{self, Start};
use uuid::Uuid;

use crate::support::Svc;

/// Queued jobs behind the statement: what a burst leaves waiting.
const QUEUED: i64 = 20_000;
/// Jobs the statement moves.
const BATCH: usize = 10;
/// Job rows a statement moving `BATCH` jobs may read: a few per job
/// (locked, updated). A scan of the queued jobs reads all 20,000.
const READ_AT_MOST: i64 = 20 * BATCH as i64;
const LEASE: Duration = Duration::from_secs(30);

/// A service whose `jobs` statistics were taken when every job had
/// finished (as autovacuum leaves them between two bursts), and which then
/// got a burst of `QUEUED` due echo jobs in `status` ('queued', or 'running'
/// in their first attempt). Returns `BATCH` of their ids.
async fn burst_behind_stale_statistics(svc: &Svc, status: &str) -> (Object, Vec<Uuid>) {
    let client = svc.db.pool.get().await.unwrap();
    insert_jobs(svc, &client, "succeeded", 2_000).await;
    client.batch_execute("ANALYZE jobs").await.unwrap();
    let ids = insert_jobs(svc, &client, status, QUEUED).await;
    (client, ids)
}

/// Inserts `n` due echo jobs in `status` ('queued', or 'running' in their
/// first attempt, or finished); returns `BATCH` of their ids.
async fn insert_jobs(svc: &Svc, client: &Object, status: &str, n: i64) -> Vec<Uuid> {
    let insert = "INSERT INTO jobs (id, user_id, kind, payload, max_attempts, run_at, status,
                                    attempt, started_at, lease_expires_at, finished_at,
                                    schedule_deadline)
                  SELECT gen_random_uuid(), $1, 'echo', '{}', 1, now() - interval '1 second',
                         $2, CASE WHEN $2 = 'queued' THEN 0 ELSE 1 END,
                         CASE WHEN $2 = 'queued' THEN NULL ELSE now() END,
                         CASE WHEN $2 = 'running' THEN now() + interval '1 hour' END,
                         CASE WHEN $2 IN ('queued', 'running') THEN NULL ELSE now() END,
                         CASE WHEN $2 = 'queued' THEN now() + interval '1 hour' END
                  FROM generate_series(1, $3::int8)
                  RETURNING id";
    let ids = client
        .query(insert, &[&svc.user, &status, &n])
        .await
        .unwrap();
    ids.iter().take(BATCH).map(|r| r.get(0)).collect()
}

/// How often Postgres has analyzed `table` (by anyone).
async fn analyze_count(svc: &Svc, table: &str) -> i64 {
    svc.count(&format!(
        "SELECT analyze_count FROM pg_stat_user_tables WHERE relname = '{table}'"
    ))
    .await
}

/// Waits until `table` has been analyzed more than `before` times: the
/// service noticed it outgrew its statistics (once the burst's row counts
/// reach the statistics system: up to ~10 s).
async fn until_analyzed(svc: &Svc, table: &str, before: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while analyze_count(svc, table).await == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service never analyzed {table} after a burst"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `statement` in a transaction on the generic plans a pooled
/// connection uses after five executions of a statement, and commits;
/// returns its result and the job rows it read, by scans and through indexes.
async fn on_generic_plans<T>(
    client: &mut Object,
    statement: impl AsyncFnOnce(&Transaction<'_>) -> T,
) -> (T, i64) {
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    let result = statement(&tx).await;
    let read = rows_read(&tx, "jobs").await;
    tx.commit().await.unwrap();
    (result, read)
}

/// Rows of `table` the current transaction has read, by scans and through
/// indexes.
async fn rows_read(tx: &Transaction<'_>, table: &str) -> i64 {
    tx.query_one(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
         FROM pg_stat_xact_user_tables WHERE relname = $1",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

/// StartJob calls of worker `w1` for `ids`.
fn starts(ids: &[Uuid]) -> Vec<Start<'static>> {
    ids.iter()
        .map(|&id| Start {
            id,
            worker_id: "w1",
            delivery_id: "",
        })
        .collect()
}

/// Sets `deadline` of `ids` to a second ago inside the statement's own
/// transaction, so the service's reapers cannot take the jobs first.
async fn expire(tx: &Transaction<'_>, deadline: &str, ids: &[Uuid]) {
    let sql =
        format!("UPDATE jobs SET {deadline} = now() - interval '1 second' WHERE id = ANY($1)");
    tx.execute(&sql, &[&ids]).await.unwrap();
}

#[tokio::test]
async fn a_start_batch_reads_only_its_jobs_while_statistics_say_none_are_queued() {
    let svc = Svc::start().await;
    let (mut client, ids) = burst_behind_stale_statistics(&svc, "queued").await;
    let starts = starts(&ids);

    let (started, read) = on_generic_plans(&mut client, async |tx| {
        store::start_jobs(tx, &starts, LEASE).await.unwrap()
    })
    .await;

    assert_eq!(started.len(), BATCH, "every job of the batch starts");
    assert!(
        read < READ_AT_MOST,
        "starting {BATCH} jobs read {read} job rows of {QUEUED} queued"
    );
    assert_eq!(
        svc.count("SELECT count(*) FROM jobs WHERE status = 'running'")
            .await,
        BATCH as i64
    );
}

#[tokio::test]
async fn a_claim_reads_only_the_jobs_it_takes_while_statistics_say_none_are_queued() {
    let svc = Svc::start().await;
    let (mut client, _) = burst_behind_stale_statistics(&svc, "queued").await;

    let (claimed, read) = on_generic_plans(&mut client, async |tx| {
        store::claim_jobs(tx, &["echo"], &[i64::MAX], "w1", BATCH as i64, LEASE)
            .await
            .unwrap()
    })
    .await;

    assert_eq!(claimed.len(), BATCH, "the claim takes as many as asked");
    assert!(
        read < READ_AT_MOST,
        "claiming {BATCH} jobs read {read} job rows of {QUEUED} queued"
    );
}

#[tokio::test]
async fn a_cancel_reads_only_its_job_while_statistics_say_none_are_queued() {
    let svc = Svc::start().await;
    let (mut client, ids) = burst_behind_stale_statistics(&svc, "queued").await;

    let (cancelled, read) = on_generic_plans(&mut client, async |tx| {
        store::cancel_queued(tx, svc.user, ids[0]).await.unwrap()
    })
    .await;

    assert_eq!(cancelled.map(|j| j.id), Some(ids[0]));
    assert!(
        read < READ_AT_MOST,
        "cancelling a job read {read} job rows of {QUEUED} queued"
    );
}

#[tokio::test]
async fn a_heartbeat_reads_only_its_job_while_statistics_say_none_are_running() {
    let svc = Svc::start().await;
    let (mut client, ids) = burst_behind_stale_statistics(&svc, "running").await;

    let (renewed, read) = on_generic_plans(&mut client, async |tx| {
        store::heartbeat(tx, ids[0], 1, LEASE, None).await.unwrap()
    })
    .await;

    assert_eq!(renewed.map(|j| j.id), Some(ids[0]));
    assert!(
        read < READ_AT_MOST,
        "a heartbeat read {read} job rows of {QUEUED} running"
    );
}

#[tokio::test]
async fn a_completion_batch_reads_only_its_jobs_while_statistics_say_none_are_running() {
    let svc = Svc::start().await;
    let (mut client, ids) = burst_behind_stale_statistics(&svc, "running").await;
    let completions: Vec<store::Completion<'_>> = ids
        .iter()
        .map(|&id| store::Completion {
            id,
            attempt: 1,
            output: None,
            cancelled: false,
            worker_id: "",
        })
        .collect();

    let (completed, read) = on_generic_plans(&mut client, async |tx| {
        store::complete_jobs(tx, &completions).await.unwrap()
    })
    .await;

    assert_eq!(completed.len(), BATCH);
    assert!(
        read < READ_AT_MOST,
        "completing {BATCH} jobs read {read} job rows of {QUEUED} running"
    );
}

#[tokio::test]
async fn the_schedule_deadline_reaper_reads_only_expired_jobs_while_statistics_say_none_are_queued()
{
    let svc = Svc::start().await;
    let (mut client, ids) = burst_behind_stale_statistics(&svc, "queued").await;

    let (failed, read) = on_generic_plans(&mut client, async |tx| {
        expire(tx, "schedule_deadline", &ids).await;
        store::fail_unscheduled(tx, 100).await.unwrap()
    })
    .await;

    assert_eq!(failed.len(), BATCH, "every expired job fails");
    assert!(
        read < READ_AT_MOST,
        "failing {BATCH} expired jobs read {read} job rows of {QUEUED} queued"
    );
}

#[tokio::test]
async fn the_lease_reaper_reads_only_expired_jobs_while_statistics_say_none_are_running() {
    let svc = Svc::start().await;
    let (mut client, ids) = burst_behind_stale_statistics(&svc, "running").await;

    let (reaped, read) = on_generic_plans(&mut client, async |tx| {
        expire(tx, "lease_expires_at", &ids).await;
        store::reap_expired_leases(tx, 100).await.unwrap()
    })
    .await;

    assert_eq!(reaped.len(), BATCH, "every expired lease is reaped");
    assert!(
        read < READ_AT_MOST,
        "reaping {BATCH} expired leases read {read} job rows of {QUEUED} running"
    );
}

#[tokio::test]
async fn the_timeout_reaper_reads_only_expired_jobs_while_statistics_say_none_are_running() {
    let svc = Svc::start().await;
    let (mut client, ids) = burst_behind_stale_statistics(&svc, "running").await;

    let (timed_out, read) = on_generic_plans(&mut client, async |tx| {
        expire(tx, "attempt_deadline", &ids).await;
        store::fail_timed_out(tx, 100, Duration::from_secs(1), Duration::from_secs(60))
            .await
            .unwrap()
    })
    .await;

    assert_eq!(
        timed_out.len(),
        BATCH,
        "every attempt past its deadline fails"
    );
    assert!(
        read < READ_AT_MOST,
        "failing {BATCH} timed-out attempts read {read} job rows of {QUEUED} running"
    );
}

/// Outbox rows behind a relay round: a burst of due jobs.
const OUTBOX_BURST: i64 = 20_000;

/// One relay round's statements (fair claim, then mark) for at most `BATCH`
/// rows, in an outbox bookkeeping transaction, after `burst` due echo jobs
/// were added to the outbox inside it (invisible to the service's own
/// relay, and rolled back). Returns how many it published and the outbox
/// rows it read.
async fn relay_round(svc: &Svc, client: &mut Object, burst: i64) -> (usize, i64) {
    let tx = store::begin_outbox_bookkeeping(client).await.unwrap();
    outbox_burst(svc, &tx, burst).await;
    let claimed = store::fairness::claim_fair(&tx, &["echo"], &[BATCH as i64])
        .await
        .unwrap();
    // While the outbox is empty, mark rows that are not there: the
    // statement runs (and is planned) all the same.
    let marked = if claimed.is_empty() {
        (0..BATCH)
            .map(|_| store::Publication {
                job_id: Uuid::now_v7(),
                kind: "echo".into(),
                priority: 0,
                attempt: 0,
                traceparent: None,
            })
            .collect()
    } else {
        claimed.clone()
    };
    store::mark_published(&tx, &marked, LEASE).await.unwrap();
    let read = rows_read(&tx, "job_outbox").await;
    tx.rollback().await.unwrap();
    (claimed.len(), read)
}

#[tokio::test]
async fn a_relay_round_reads_only_the_rows_it_publishes_after_a_burst_into_an_empty_outbox() {
    let svc = Svc::start().await;
    let mut client = svc.db.pool.get().await.unwrap();
    client.batch_execute("ANALYZE job_outbox").await.unwrap();
    // Rounds while the outbox is empty, as a relay's pooled connection runs
    // them between two bursts: after five, Postgres would keep a generic
    // plan made for an empty outbox.
    for _ in 0..6 {
        assert_eq!(relay_round(&svc, &mut client, 0).await.0, 0);
    }

    let (published, read) = relay_round(&svc, &mut client, OUTBOX_BURST).await;

    assert_eq!(
        published, BATCH,
        "the round takes as many rows as it has room for"
    );
    assert!(
        read < READ_AT_MOST,
        "publishing {BATCH} rows read {read} outbox rows of {OUTBOX_BURST} due"
    );
}

/// Adds `burst` due echo jobs with their outbox rows, as BatchCreateJobs
/// leaves them; returns `BATCH` of their ids.
async fn outbox_burst(svc: &Svc, tx: &Transaction<'_>, burst: i64) -> Vec<Uuid> {
    tx.query(
        "WITH j AS (
            INSERT INTO jobs (id, user_id, kind, payload, max_attempts, run_at, schedule_deadline)
            SELECT gen_random_uuid(), $1, 'echo', '{}', 1, now(), now() + interval '1 hour'
            FROM generate_series(1, $2::int8)
            RETURNING id, user_id, kind, priority
         ), o AS (
            INSERT INTO job_outbox (job_id, deliver_at, priority, kind, user_id)
            SELECT id, now() - interval '1 second', priority, kind, user_id FROM j
         )
         SELECT id FROM j LIMIT $3",
        &[&svc.user, &burst, &(BATCH as i64)],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Start batches of jobs that are not there, six of them, rolled back: after
/// five, the connection keeps a generic plan made for the tables as they are.
async fn start_absent_jobs_six_times(client: &mut Object) {
    let absent: Vec<Uuid> = (0..BATCH).map(|_| Uuid::now_v7()).collect();
    for _ in 0..6 {
        let tx = client.transaction().await.unwrap();
        let started = store::start_jobs(&tx, &starts(&absent), LEASE).await;
        assert!(started.unwrap().is_empty());
        tx.rollback().await.unwrap();
    }
}

/// Starts `ids` in a transaction that is rolled back; returns the jobs
/// started and the rows of `table` read meanwhile.
async fn start_and_count_reads(
    client: &mut Object,
    ids: &[Uuid],
    table: &str,
) -> (Vec<store::JobRow>, i64) {
    let tx = client.transaction().await.unwrap();
    let started = store::start_jobs(&tx, &starts(ids), LEASE).await.unwrap();
    let read = rows_read(&tx, table).await;
    tx.rollback().await.unwrap();
    (started, read)
}

#[tokio::test]
async fn a_start_batch_reads_only_its_outbox_rows_once_a_burst_has_filled_an_empty_outbox() {
    let svc = Svc::start().await;
    let mut client = svc.db.pool.get().await.unwrap();
    client.batch_execute("ANALYZE job_outbox").await.unwrap();
    let before = analyze_count(&svc, "job_outbox").await;
    // Start batches while the outbox is empty.
    start_absent_jobs_six_times(&mut client).await;

    let tx = client.transaction().await.unwrap();
    let ids = outbox_burst(&svc, &tx, OUTBOX_BURST).await;
    tx.commit().await.unwrap();
    until_analyzed(&svc, "job_outbox", before).await;
    let (started, read) = start_and_count_reads(&mut client, &ids, "job_outbox").await;

    assert_eq!(started.len(), BATCH, "every job of the batch starts");
    assert!(
        read < READ_AT_MOST,
        "starting {BATCH} jobs read {read} outbox rows of {OUTBOX_BURST}"
    );
}

#[tokio::test]
async fn a_start_batch_reads_only_its_jobs_once_a_burst_has_filled_a_new_jobs_table() {
    let svc = Svc::start().await;
    let mut client = svc.db.pool.get().await.unwrap();
    let before = analyze_count(&svc, "jobs").await;
    // Start batches while `jobs` is empty and was never analyzed, as in a
    // new database.
    start_absent_jobs_six_times(&mut client).await;

    let ids = insert_jobs(&svc, &client, "queued", QUEUED).await;
    until_analyzed(&svc, "jobs", before).await;
    let (started, read) = start_and_count_reads(&mut client, &ids, "jobs").await;

    assert_eq!(started.len(), BATCH, "every job of the batch starts");
    assert!(
        read < READ_AT_MOST,
        "starting {BATCH} jobs read {read} job rows of {QUEUED} queued"
    );
}
