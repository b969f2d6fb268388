//! The watch scenario: many WatchJob streams at once, multiplexed over few
//! HTTP/2 connections, until every one saw its job finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{BatchCreateJobsRequest, CreateJobRequest, JobStatus, WatchJobRequest};

use super::Ctx;
use super::drive::{Channels, authed};
use crate::stats::Stats;

/// WatchJob streams per HTTP/2 connection (the server allows 256): 10,000
/// watchers need 50 sockets, not 10,000 file descriptors.
const STREAMS_PER_CONNECTION: usize = 200;

/// `opts.watchers` concurrent WatchJob streams, 10 per job, on echo jobs
/// created while no worker runs; then workers start, and the scenario lasts
/// until every stream has sent its job's terminal state and ended. Reports
/// the watchers open at once, the Redis connections keel-jobs held then, and
/// per watcher the delay from the job's finished_at to its terminal message.
pub(super) async fn watch(cx: &mut Ctx) -> Result<Option<Stats>> {
    let (opts, system, token) = (&cx.opts, &mut cx.system, cx.token.clone());
    let watchers = opts.watchers.max(1);
    let job_count = watchers.div_ceil(10);
    let connections =
        Channels::connect(&system.jobs, watchers.div_ceil(STREAMS_PER_CONNECTION)).await?;
    let mut ids = Vec::with_capacity(job_count);
    while ids.len() < job_count {
        let requests = (ids.len()..job_count.min(ids.len() + 500))
            .map(|i| CreateJobRequest {
                kind: "echo".into(),
                payload: Some(keel_shared::json::json_to_struct(
                    &serde_json::json!({"watch": i}),
                )),
                ..Default::default()
            })
            .collect();
        let created = JobsServiceClient::new(connections.get(0))
            .batch_create_jobs(authed(
                &token,
                BatchCreateJobsRequest {
                    requests,
                    ..Default::default()
                },
            ))
            .await
            .context("BatchCreateJobs")?
            .into_inner()
            .jobs;
        ids.extend(created.into_iter().map(|j| j.id));
    }
    // Each task: open the stream, count it open at its first message, read
    // until the end; (when it saw the terminal state, finished_at -> seen in µs).
    let (open, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let opening = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..watchers {
        let mut client = JobsServiceClient::new(connections.get(i));
        let (id, tk) = (ids[i % ids.len()].clone(), token.clone());
        let (open, failed) = (open.clone(), failed.clone());
        tasks.spawn(async move {
            let mut opened = false;
            let watched = async {
                let mut stream = client
                    .watch_job(authed(
                        &tk,
                        WatchJobRequest {
                            id,
                            ..Default::default()
                        },
                    ))
                    .await?
                    .into_inner();
                let mut last = None;
                while let Some(message) = stream.message().await? {
                    if !opened {
                        opened = true;
                        open.fetch_add(1, Ordering::Relaxed);
                    }
                    last = message.job;
                }
                let (seen, seen_at) = (Instant::now(), SystemTime::now());
                let job = last.context("the stream sent nothing")?;
                anyhow::ensure!(
                    matches!(
                        job.status(),
                        JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
                    ),
                    "the stream ended at {:?}",
                    job.status()
                );
                let finished = job.finished_at.context("finished_at")?;
                let finished =
                    UNIX_EPOCH + Duration::new(finished.seconds as u64, finished.nanos as u32);
                let delay = seen_at.duration_since(finished).unwrap_or_default();
                Ok::<_, anyhow::Error>((seen, delay.as_micros() as u64))
            }
            .await;
            if watched.is_err() && !opened {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            watched
        });
    }
    let patience = Instant::now() + Duration::from_secs(120);
    while open.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < watchers
        && Instant::now() < patience
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (reached, opened_in) = (open.load(Ordering::Relaxed), opening.elapsed());
    let (redis_all, redis_pubsub) = system.redis_connections("jobs").await?;
    let running = Instant::now();
    system
        .start_workers(opts.workers, opts.worker_concurrency)
        .await?;
    let (mut latencies_us, mut errors, mut first_error, mut last_seen) =
        (Vec::new(), 0, None, running);
    while let Some(result) = tasks.join_next().await {
        match result? {
            Ok((seen, delay_us)) => {
                latencies_us.push(delay_us);
                last_seen = last_seen.max(seen);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let elapsed = last_seen - running;
    Ok(Some(Stats {
        name: "watch".into(),
        ops: latencies_us.len(),
        errors,
        elapsed,
        latencies_us,
        baseline_ops_per_sec: None,
        cpu_us_per_job: Vec::new(),
        servers_per_job: None,
        note: format!(
            "{reached}/{watchers} watchers open at once on {job_count} jobs over {} HTTP/2 \
             connections (opened in {:.1}s); keel-jobs then held {redis_all} Redis connections, \
             {redis_pubsub} of them pub/sub; every watcher saw its terminal state {:.1}s after \
             the workers started (latency columns: job finished_at -> watcher got it){}",
            connections.len(),
            opened_in.as_secs_f64(),
            elapsed.as_secs_f64(),
            first_error
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        ),
    }))
}
