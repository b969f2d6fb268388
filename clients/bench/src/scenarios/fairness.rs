//! The fairness scenario: user A enqueues a large backlog of echo jobs
//! through BatchCreateJobs, then user B creates one echo job every 100 ms
//! while A's backlog drains. Reports B's create->start (the latency
//! columns) and A's throughput, against A's throughput for the same backlog
//! without B, measured first in the same run (after a smaller backlog that
//! warms the system up).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keel_proto::auth::v1::RegisterRequest;
use keel_proto::jobs::v1::{BatchCreateJobsRequest, CreateJobRequest};

use super::drive::{Limit, authed, drive};
use super::{Ctx, PASSWORD};
use crate::stats::{self, Stats};

/// Jobs per BatchCreateJobs call of user A.
const PER_CALL: usize = 500;
/// Most jobs of the unmeasured warm-up backlog.
const WARM_UP_MAX: usize = 5_000;
/// How often user B creates a job.
const B_EVERY: Duration = Duration::from_millis(100);

/// Echo job `i` of the run `marker`.
fn job(marker: &str, i: usize) -> CreateJobRequest {
    CreateJobRequest {
        kind: "echo".into(),
        payload: Some(keel_shared::json::json_to_struct(
            &serde_json::json!({"run": marker, "i": i}),
        )),
        ..Default::default()
    }
}

pub(super) async fn fairness(cx: &mut Ctx) -> Result<Option<Stats>> {
    let n = cx.opts.fairness_jobs.max(1);
    let (db, conn) = tokio_postgres::connect(&cx.system.db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);

    let a_user = user_id(&db, &cx.email).await?;

    // A warm-up backlog (not measured): the first run would otherwise pay
    // for cold caches and connection pools.
    let warm_up = uuid::Uuid::new_v4().simple().to_string();
    let since = uuid::Uuid::now_v7();
    enqueue(cx, &warm_up, (n / 10).clamp(1, WARM_UP_MAX)).await?;
    wait_finished(&db, a_user, since, cx.opts.quick).await?;

    // A alone, for comparison: once before and once after the run with B,
    // so that a drift between runs (tables growing, a neighbour's load)
    // does not pass for B's cost.
    let mut alone = Vec::new();
    let mut errors = 0;
    let mut alone_run = async |cx: &mut Ctx| -> Result<()> {
        settle(&db).await?;
        let run = uuid::Uuid::new_v4().simple().to_string();
        let since = uuid::Uuid::now_v7();
        errors += enqueue(cx, &run, n).await?;
        wait_finished(&db, a_user, since, cx.opts.quick).await?;
        let (done, rate) = throughput(&db, &run).await?;
        errors += n - done.min(n);
        alone.push(rate);
        Ok(())
    };
    alone_run(cx).await?;

    // A again, with B creating a job every 100 ms while A's backlog drains.
    let mut auth = cx.auth_client()(0);
    let b_email = format!("bench-b-{}@example.com", uuid::Uuid::new_v4().simple());
    let b_token = auth
        .register(RegisterRequest {
            email: b_email.clone(),
            password: PASSWORD.into(),
            display_name: "bench user B".into(),
            ..Default::default()
        })
        .await
        .context("Register user B")?
        .into_inner()
        .tokens
        .context("tokens")?
        .access_token;
    let b_user = user_id(&db, &b_email).await?;
    settle(&db).await?;
    let a_run = uuid::Uuid::new_v4().simple().to_string();
    let b_run = uuid::Uuid::new_v4().simple().to_string();
    let since = uuid::Uuid::now_v7();
    let errors_a = enqueue(cx, &a_run, n).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let b = tokio::spawn({
        let (stop, mut client, run) = (stop.clone(), cx.jobs_client()(1), b_run.clone());
        async move {
            let mut ticks = tokio::time::interval(B_EVERY);
            let (mut created, mut errors) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                ticks.tick().await;
                match client
                    .create_job(authed(&b_token, job(&run, created)))
                    .await
                {
                    Ok(_) => created += 1,
                    Err(_) => errors += 1,
                }
            }
            (created, errors)
        }
    });
    wait_finished(&db, a_user, since, cx.opts.quick).await?;
    stop.store(true, Ordering::Relaxed);
    let (b_created, b_errors) = b.await?;
    wait_finished(&db, b_user, since, cx.opts.quick).await?;
    let (a_done, a_rate) = throughput(&db, &a_run).await?;
    alone_run(cx).await?;
    let alone_rate = alone.iter().sum::<f64>() / alone.len() as f64;
    // Where B's wait went: creation to the stream (the stream entry's id is
    // the time Redis added it, kept as the job's delivery id) and from the
    // stream to its start (the backlog ahead of it and the worker).
    let rows = db
        .query(
            "SELECT (extract(epoch FROM started_at - created_at) * 1e6)::bigint,
                    split_part(delivery_id, '-', 1)::bigint * 1000
                      - (extract(epoch FROM created_at) * 1e6)::bigint
             FROM jobs WHERE payload->>'run' = $1 AND started_at IS NOT NULL
               AND delivery_id IS NOT NULL",
            &[&b_run],
        )
        .await?;
    let b_to_start: Vec<u64> = rows
        .iter()
        .map(|r| r.get::<_, i64>(0).max(0) as u64)
        .collect();
    let b_to_stream: Vec<u64> = rows
        .iter()
        .map(|r| r.get::<_, i64>(1).max(0) as u64)
        .collect();
    let b_in_stream: Vec<u64> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0) - r.get::<_, i64>(1)).max(0) as u64)
        .collect();
    let ms = |p| stats::percentile(&b_to_start, p) as f64 / 1000.0;
    let part = |us: &[u64]| {
        format!(
            "p50 {:.1} / p99 {:.1} ms",
            stats::percentile(us, 50.0) as f64 / 1000.0,
            stats::percentile(us, 99.0) as f64 / 1000.0
        )
    };
    let elapsed = Duration::from_secs_f64(a_done as f64 / a_rate.max(1e-9));
    Ok(Some(Stats {
        name: "fairness".into(),
        ops: a_done,
        errors: errors + errors_a + b_errors + (n - a_done.min(n)),
        elapsed,
        latencies_us: b_to_start.clone(),
        baseline_ops_per_sec: None,
        cpu_us_per_job: Vec::new(),
        servers_per_job: None,
        note: format!(
            "A: {n} echo jobs via BatchCreateJobs ({PER_CALL}/call), {a_rate:.0} jobs/s while B ran vs \
             {alone_rate:.0} jobs/s alone ({:+.0}%; alone before and after: {:.0}, {:.0}); \
             B: {b_created} jobs, one per 100 ms, \
             create->start p50 {:.1} / p99 {:.1} / max {:.1} ms (latency columns: B's create->start), \
             of which create->stream {} and stream->start {}",
            (a_rate / alone_rate.max(1e-9) - 1.0) * 100.0,
            alone[0],
            alone[1],
            ms(50.0),
            ms(99.0),
            b_to_start.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
            part(&b_to_stream),
            part(&b_in_stream),
        ),
    }))
}

/// User A's `n` jobs of run `marker`, through BatchCreateJobs from up to
/// --e2e-clients clients; returns the failed calls.
async fn enqueue(cx: &Ctx, marker: &str, n: usize) -> Result<usize> {
    let calls = n.div_ceil(PER_CALL);
    let (jc, tk, m) = (
        cx.jobs_client(),
        cx.token.clone(),
        Arc::new(marker.to_string()),
    );
    let created = drive(
        "fairness-create",
        cx.opts.e2e_clients.min(calls),
        Limit::Ops(calls),
        move |i| {
            let (mut client, tk, m) = (jc(i), tk.clone(), m.clone());
            let count = PER_CALL.min(n - i * PER_CALL);
            async move {
                let requests = (0..count).map(|j| job(&m, i * PER_CALL + j)).collect();
                client
                    .batch_create_jobs(authed(
                        &tk,
                        BatchCreateJobsRequest {
                            requests,
                            ..Default::default()
                        },
                    ))
                    .await?;
                Ok(())
            }
        },
    )
    .await;
    Ok(created.errors)
}

/// Vacuums the tables a run leaves dead rows in, so that each measured run
/// starts from tables as autovacuum would leave them between two bursts
/// (the bench's server may run without it), and not the second run behind
/// the first one's dead rows.
async fn settle(db: &tokio_postgres::Client) -> Result<()> {
    db.batch_execute("VACUUM (ANALYZE) jobs, job_outbox, job_events")
        .await
        .context("VACUUM between the fairness runs")
}

/// The id of the user registered with `email`.
async fn user_id(db: &tokio_postgres::Client, email: &str) -> Result<uuid::Uuid> {
    let row = db
        .query_one(
            "SELECT id FROM users WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await
        .with_context(|| format!("the bench user {email}"))?;
    Ok(row.get(0))
}

/// Waits until every job of `user` created since `since` (a UUIDv7 taken
/// before the run's first job: job ids are UUIDv7 too) finished, or the
/// patience ran out. Asked through the (user, status, id) index every 250
/// ms while the runs are measured: a scan of every job's payload for the
/// run's marker cost a measurable share of the CPU, more in each run as
/// `jobs` grew.
async fn wait_finished(
    db: &tokio_postgres::Client,
    user: uuid::Uuid,
    since: uuid::Uuid,
    quick: bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(if quick { 60 } else { 600 });
    while Instant::now() < deadline {
        let row = db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM jobs
                                WHERE user_id = $1 AND status IN ('queued', 'running')
                                  AND id >= $2)",
                &[&user, &since],
            )
            .await?;
        if !row.get::<_, bool>(0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Run `marker`'s succeeded jobs, and how many per second from its first
/// creation to its last finish.
async fn throughput(db: &tokio_postgres::Client, marker: &str) -> Result<(usize, f64)> {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),
                    coalesce(extract(epoch FROM max(finished_at) - min(created_at))::float8, 0)
             FROM jobs WHERE payload->>'run' = $1",
            &[&marker],
        )
        .await?;
    let done = row.get::<_, i64>(0) as usize;
    let secs: f64 = row.get(1);
    Ok((done, done as f64 / secs.max(1e-9)))
}
