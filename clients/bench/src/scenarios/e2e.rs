//! The end-to-end scenarios: jobs created over gRPC and run to SUCCEEDED by
//! stream workers (e2e-jobs, e2e-half-load, batch-e2e) or by the bench's own
//! ClaimJobs workers (claim-e2e), timed by the jobs' own timestamps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{
    BatchCreateJobsRequest, ClaimJobsRequest, CompleteJobRequest, CompleteJobsRequest,
    CreateJobRequest, GetJobRequest, JobStatus, complete_job_result,
};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use super::Ctx;
use super::drive::{Errors, Limit, authed, channel, drive};
use crate::Opts;
use crate::stats::{self, Stats};
use crate::system::{MachineCpu, ServerWork, System};

pub(super) async fn e2e_jobs(cx: &mut Ctx) -> Result<Option<Stats>> {
    e2e(cx, E2e::OneEach).await.map(Some)
}

/// At `--e2e-rate`, or half of the e2e-jobs rate of this run; nothing to
/// run without either.
pub(super) async fn half_load(cx: &mut Ctx) -> Result<Option<Stats>> {
    let peak = cx
        .results
        .iter()
        .find(|s| s.name == "e2e-jobs")
        .map(Stats::ops_per_sec);
    match cx.opts.e2e_rate.or(peak.map(|p| p / 2.0)) {
        Some(rate) => e2e_paced(cx, rate).await.map(Some),
        None => Ok(None),
    }
}

pub(super) async fn batch_e2e(cx: &mut Ctx) -> Result<Option<Stats>> {
    e2e(cx, E2e::Batched).await.map(Some)
}

pub(super) async fn claim_e2e(cx: &mut Ctx) -> Result<Option<Stats>> {
    e2e(cx, E2e::Claimed).await.map(Some)
}

/// Waits until an echo job has gone through the stream workers just
/// started. keel-jobs reads the kinds stream workers serve once a second and
/// publishes a kind's jobs only once it knows the kind is served (the others
/// reach the stream through the relay, later): without this the first jobs
/// of e2e-jobs waited ~2 s, start-up rather than throughput.
pub(super) async fn warm_up(mut client: JobsServiceClient<Channel>, token: &str) -> Result<()> {
    let id = client
        .create_job(authed(token, run_job("echo", "warm-up", 0)))
        .await
        .context("CreateJob")?
        .into_inner()
        .job
        .context("job")?
        .id;
    let patience = Instant::now() + Duration::from_secs(60);
    while Instant::now() < patience {
        let job = client
            .get_job(authed(token, GetJobRequest { id: id.clone() }))
            .await
            .context("GetJob")?
            .into_inner()
            .job
            .context("job")?;
        if job.status() == JobStatus::Succeeded {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the warm-up echo job did not succeed within 60 s")
}

/// The end-to-end scenarios: how their jobs are created and what runs them.
#[derive(Clone, Copy, PartialEq)]
enum E2e {
    /// e2e-jobs: one CreateJob per echo job; the stream workers run them.
    OneEach,
    /// batch-e2e: the same through BatchCreateJobs, 500 jobs per call.
    Batched,
    /// claim-e2e: one CreateJob per job of CLAIM_KIND, which no stream
    /// worker serves; the bench's claiming workers take them over ClaimJobs.
    Claimed,
}

impl E2e {
    fn name(self) -> &'static str {
        match self {
            E2e::OneEach => "e2e-jobs",
            E2e::Batched => "batch-e2e",
            E2e::Claimed => "claim-e2e",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            E2e::OneEach | E2e::Batched => "echo",
            E2e::Claimed => CLAIM_KIND,
        }
    }
}

/// The kind of claim-e2e's jobs: the Rust stream workers have no handler
/// for it, so the jobs service leaves its jobs queued for ClaimJobs.
const CLAIM_KIND: &str = "bench.claim";

/// How long a claiming worker's ClaimJobs waits for a due job.
const CLAIM_WAIT: prost_types::Duration = prost_types::Duration {
    seconds: 5,
    nanos: 0,
};

/// CreateJob request `i` of the run `marker` (which `settle` finds it by).
fn run_job(kind: &str, marker: &str, i: usize) -> CreateJobRequest {
    CreateJobRequest {
        kind: kind.into(),
        payload: Some(keel_shared::json::json_to_struct(
            &serde_json::json!({"run": marker, "i": i}),
        )),
        ..Default::default()
    }
}

/// Creates N jobs from `opts.e2e_clients` clients (one CreateJob per job,
/// or batches of 500) and waits until all SUCCEEDED; latencies come from the
/// jobs' own times, CPU per job from the processes' CPU time meanwhile.
async fn e2e(cx: &Ctx, how: E2e) -> Result<Stats> {
    let (opts, system, jobs_client, token) = (&cx.opts, &cx.system, cx.jobs_client(), &cx.token);
    let n = opts.e2e_jobs;
    let marker = Arc::new(uuid::Uuid::new_v4().simple().to_string());
    let kind = how.kind();
    let claimers = match how {
        E2e::Claimed => Some(Claimers::start(opts, system).await?),
        _ => None,
    };
    let spent = Spent::start(system).await;
    let started = Instant::now();
    let created = if how == E2e::Batched {
        let per_call = 500;
        let calls = n.div_ceil(per_call);
        let (jc, tk, m) = (jobs_client.clone(), token.clone(), marker.clone());
        drive(
            "batch-create",
            opts.e2e_clients.min(calls),
            Limit::Ops(calls),
            move |i| {
                let (mut client, tk, m) = (jc(i), tk.clone(), m.clone());
                let count = per_call.min(n - i * per_call);
                async move {
                    let requests = (0..count)
                        .map(|j| run_job(kind, &m, i * per_call + j))
                        .collect();
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
        .await
    } else {
        let (jc, tk, m) = (jobs_client.clone(), token.clone(), marker.clone());
        drive("create", opts.e2e_clients, Limit::Ops(n), move |i| {
            let (mut client, tk, m) = (jc(i), tk.clone(), m.clone());
            async move {
                client.create_job(authed(&tk, run_job(kind, &m, i))).await?;
                Ok(())
            }
        })
        .await
    };
    let ran_by = match &claimers {
        Some(_) => format!(
            "{} claiming workers x{}",
            opts.claim_workers, opts.claim_batch
        ),
        None => stream_workers(opts),
    };
    let mut stats = settle(
        opts,
        system,
        how.name(),
        &ran_by,
        &marker,
        started,
        &created,
    )
    .await?;
    let cost = spent.charge(system, &mut stats).await;
    stats.note = format!(
        "{} clients, {}; {cost}",
        opts.e2e_clients,
        stats.note.trim_end()
    );
    if let Some(claimers) = claimers {
        let errors = claimers.stop();
        stats.errors += errors.count();
        if let Some(first) = errors.first() {
            stats.note = format!("{}; claiming workers' {first}", stats.note.trim_end());
        }
    }
    Ok(stats)
}

fn stream_workers(opts: &Opts) -> String {
    format!("{} workers x{}", opts.workers, opts.worker_concurrency)
}

/// What a scenario cost the machine: read when it starts, charged to its
/// jobs when it ends.
struct Spent {
    cpu: Vec<(String, f64)>,
    servers: ServerWork,
    machine: MachineCpu,
}

impl Spent {
    async fn start(system: &System) -> Self {
        Self {
            servers: ServerWork::read(&system.db_url).await,
            cpu: cpu_now(system),
            machine: MachineCpu::read(),
        }
    }

    /// Sets the CPU per job of each process and the servers' share per job
    /// in `stats`, and says so (with how busy the whole machine was) for its note.
    async fn charge(self, system: &System, stats: &mut Stats) -> String {
        let busy = MachineCpu::read().busy_since(&self.machine);
        stats.cpu_us_per_job = cpu_per_job(&self.cpu, &cpu_now(system), stats.ops);
        let servers = ServerWork::read(&system.db_url)
            .await
            .per_job(&self.servers, stats.ops);
        stats.servers_per_job = Some(servers);
        format!(
            "CPU us/job: {}; servers per job: {servers}; machine CPU {:.0}% busy",
            stats::cpu_list(&stats.cpu_us_per_job),
            busy * 100.0
        )
    }
}

/// CPU seconds so far of each process of the system, the bench's own included.
fn cpu_now(system: &System) -> Vec<(String, f64)> {
    let mut cpu: Vec<(String, f64)> = system
        .usage()
        .into_iter()
        .map(|(name, cpu, _)| (name, cpu))
        .collect();
    cpu.push(("bench".into(), crate::system::own_cpu()));
    cpu
}

/// The CPU microseconds per job of each process that used CPU between the
/// two readings (at least 1 us per job).
fn cpu_per_job(
    before: &[(String, f64)],
    after: &[(String, f64)],
    jobs: usize,
) -> Vec<(String, f64)> {
    after
        .iter()
        .filter_map(|(name, cpu)| {
            let was = before.iter().find(|(n, _)| n == name).map_or(0.0, |b| b.1);
            let us = (cpu - was) * 1e6 / jobs.max(1) as f64;
            (us >= 1.0).then(|| (name.clone(), us))
        })
        .collect()
}

/// claim-e2e's claiming workers: tasks of this process, each with its own
/// HTTP/2 connection to keel-jobs and the worker token. Stopped when dropped.
struct Claimers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    errors: Arc<Errors>,
}

impl Claimers {
    async fn start(opts: &Opts, system: &System) -> Result<Self> {
        let token = Arc::new(system.worker_token.clone());
        let errors = Arc::new(Errors::default());
        let mut tasks = Vec::new();
        for w in 0..opts.claim_workers {
            let client = JobRunnerServiceClient::new(channel(&system.jobs).await?);
            tasks.push(tokio::spawn(claiming_worker(
                client,
                token.clone(),
                format!("bench-claimer-{w}"),
                usize::from(opts.claim_batch),
                errors.clone(),
            )));
        }
        Ok(Self { tasks, errors })
    }

    /// Stops the workers (cutting their idle long polls) and returns their errors.
    fn stop(self) -> Arc<Errors> {
        self.errors.clone()
    }
}

impl Drop for Claimers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One claiming worker, holding at most `capacity` jobs: it claims up to its
/// free capacity (one ClaimJobs long poll) and completes each claimed batch
/// with one CompleteJobs call (no output), which frees that capacity when
/// answered, while it claims the next batch.
async fn claiming_worker(
    client: JobRunnerServiceClient<Channel>,
    token: Arc<String>,
    worker_id: String,
    capacity: usize,
    errors: Arc<Errors>,
) {
    let free = Arc::new(Semaphore::new(capacity));
    loop {
        // At least one free slot, then every slot free by now.
        let Ok(mut held) = free.clone().acquire_owned().await else {
            return;
        };
        if let Ok(more) = free
            .clone()
            .try_acquire_many_owned(free.available_permits() as u32)
        {
            held.merge(more);
        }
        let request = ClaimJobsRequest {
            worker_id: worker_id.clone(),
            kinds: vec![CLAIM_KIND.into()],
            max_jobs: held.num_permits() as i32,
            wait: Some(CLAIM_WAIT),
        };
        let claimed = match client.clone().claim_jobs(authed(&token, request)).await {
            Ok(response) => response.into_inner().jobs,
            Err(e) => {
                errors.record(format!("ClaimJobs: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The slots no claimed job took are free again.
        drop(held.split(held.num_permits().saturating_sub(claimed.len())));
        if claimed.is_empty() {
            continue;
        }
        let requests = claimed
            .into_iter()
            .filter_map(|c| c.job)
            .map(|job| CompleteJobRequest {
                id: job.id,
                attempt: job.attempt,
                worker_id: worker_id.clone(),
                ..Default::default()
            })
            .collect();
        let (mut client, token, errors) = (client.clone(), token.clone(), errors.clone());
        tokio::spawn(async move {
            match client
                .complete_jobs(authed(&token, CompleteJobsRequest { requests }))
                .await
            {
                Ok(response) => {
                    for result in response.into_inner().results {
                        if let Some(complete_job_result::Outcome::Error(e)) = result.outcome {
                            errors.record(format!("CompleteJobs item: {}", e.message));
                        }
                    }
                }
                Err(e) => errors.record(format!("CompleteJobs: {e}")),
            }
            drop(held);
        });
    }
}

/// Creates echo jobs one CreateJob each at a steady `rate` (open loop: a slow
/// reply does not slow the next call) for the scenario's seconds, then waits
/// until all finished. Run at half of e2e-jobs' peak, its create->start p99
/// is the latency target's figure.
async fn e2e_paced(cx: &Ctx, rate: f64) -> Result<Stats> {
    let (opts, system, jobs_client, token) = (&cx.opts, &cx.system, cx.jobs_client(), &cx.token);
    let n = ((rate * opts.seconds as f64) as usize).max(1);
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let spent = Spent::start(system).await;
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1e-3)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = tokio::task::JoinSet::new();
    // The largest resident memory of each process while the load is offered.
    let mut rss = system.rss_now();
    let sample_every = ((rate / 5.0) as usize).max(1);
    for i in 0..n {
        ticks.tick().await;
        if i % sample_every == 0 {
            for ((_, max), (_, now)) in rss.iter_mut().zip(system.rss_now()) {
                *max = f64::max(*max, now);
            }
        }
        let (mut client, tk) = (jobs_client(i), token.clone());
        let request = run_job(E2e::OneEach.kind(), &marker, i);
        calls.spawn(async move {
            let sent = Instant::now();
            client
                .create_job(authed(&tk, request))
                .await
                .map(|_| sent.elapsed().as_micros() as u64)
                .map_err(|s| format!("{s:?}"))
        });
    }
    let mut created = Stats {
        name: "paced-create".into(),
        ops: 0,
        errors: 0,
        elapsed: started.elapsed(),
        latencies_us: Vec::new(),
        baseline_ops_per_sec: None,
        cpu_us_per_job: Vec::new(),
        servers_per_job: None,
        note: String::new(),
    };
    while let Some(result) = calls.join_next().await {
        match result? {
            Ok(us) => {
                created.ops += 1;
                created.latencies_us.push(us);
            }
            Err(e) => {
                created.errors += 1;
                if created.note.is_empty() {
                    created.note = format!("first error: {e}");
                }
            }
        }
    }
    let ran_by = stream_workers(opts);
    let mut stats = settle(
        opts,
        system,
        "e2e-half-load",
        &ran_by,
        &marker,
        started,
        &created,
    )
    .await?;
    let cost = spent.charge(system, &mut stats).await;
    let rss: Vec<String> = rss
        .iter()
        .map(|(name, mib)| format!("{name} {mib:.1}"))
        .collect();
    stats.note = format!(
        "offered {rate:.0} jobs/s for {}s; CreateJob answered p50 {:.1} p99 {:.1} ms; {}; {cost}; RSS MiB while offered: {}",
        opts.seconds,
        created.percentile_ms(50.0),
        created.percentile_ms(99.0),
        stats.note.trim_end(),
        rss.join(", ")
    );
    Ok(stats)
}

/// Waits until the run's jobs all finished and turns their own timestamps
/// into the end-to-end figures.
async fn settle(
    opts: &Opts,
    system: &System,
    name: &str,
    ran_by: &str,
    marker: &str,
    started: Instant,
    created: &Stats,
) -> Result<Stats> {
    let (db, conn) = tokio_postgres::connect(&system.db_url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(if opts.quick { 60 } else { 300 });
    let (mut total, mut finished) = (0i64, 0i64);
    while Instant::now() < deadline {
        let row = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled'))
                 FROM jobs WHERE payload->>'run' = $1",
                &[&marker],
            )
            .await?;
        (total, finished) = (row.get(0), row.get(1));
        if finished >= total {
            break;
        }
        // The count scans the run's jobs: poll gently so it does not load Postgres.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();
    let rows = db
        .query(
            "SELECT (extract(epoch FROM started_at - created_at) * 1e6)::bigint,
                    (extract(epoch FROM finished_at - created_at) * 1e6)::bigint,
                    status = 'succeeded'
             FROM jobs WHERE payload->>'run' = $1 AND finished_at IS NOT NULL",
            &[&marker],
        )
        .await?;
    let to_start: Vec<u64> = rows
        .iter()
        .map(|r| r.get::<_, Option<i64>>(0).unwrap_or(0).max(0) as u64)
        .collect();
    let to_finish: Vec<u64> = rows
        .iter()
        .map(|r| r.get::<_, i64>(1).max(0) as u64)
        .collect();
    let succeeded = rows.iter().filter(|r| r.get::<_, bool>(2)).count();
    let ms = |v: &[u64], p| stats::percentile(v, p) as f64 / 1000.0;
    Ok(Stats {
        name: name.to_string(),
        ops: succeeded,
        errors: created.errors + (total as usize - succeeded.min(total as usize)),
        elapsed,
        latencies_us: to_finish.clone(),
        baseline_ops_per_sec: None,
        cpu_us_per_job: Vec::new(),
        servers_per_job: None,
        note: format!(
            "{ran_by}; create->start p50 {:.1} p99 {:.1} ms; create->finish p50 {:.1} p99 {:.1} ms (latency columns: create->finish); {finished}/{total} finished {}",
            ms(&to_start, 50.0),
            ms(&to_start, 99.0),
            ms(&to_finish, 50.0),
            ms(&to_finish, 99.0),
            created.note
        ),
    })
}
