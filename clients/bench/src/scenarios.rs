//! The scenarios: each drives one hot path through gRPC and, where the path is
//! one SQL statement or transaction, the same work straight against Postgres.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::{GetCurrentUserRequest, LoginRequest, RegisterRequest};
use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::jobs::v1::{
    BatchCreateJobsRequest, ClaimJobsRequest, CompleteJobRequest, CompleteJobsRequest,
    CreateJobRequest, GetJobRequest, JobStatus, ListJobsRequest, WatchJobRequest,
    complete_job_result,
};
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use keel_proto::memory::v1::{
    GetMemoryRequest, GetWorkspaceRequest, PutMemoryRequest, SearchMemoriesRequest,
};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use crate::Opts;
use crate::stats::{self, Stats};
use crate::system::System;

const PASSWORD: &str = "bench password 123";

/// Words for realistic memory text.
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

pub fn text(seed: usize, words: usize) -> String {
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

/// The tag of memory-put call `i`.
pub fn tag(i: usize) -> String {
    WORDS[i % WORDS.len()].to_string()
}

/// The search query of call `i` (two corpus words).
pub fn query(i: usize) -> String {
    format!(
        "{} {}",
        WORDS[i % WORDS.len()],
        WORDS[(i * 7 + 3) % WORDS.len()]
    )
}

enum Limit {
    Ops(usize),
    Time(Duration),
}

/// Runs `op(i)` from `concurrency` tasks until the limit, timing each call.
async fn drive<F, Fut>(name: &str, concurrency: usize, limit: Limit, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Errors::default());
    let started = Instant::now();
    let deadline = match limit {
        Limit::Time(d) => Some(started + d),
        Limit::Ops(_) => None,
    };
    let total = match limit {
        Limit::Ops(n) => n,
        Limit::Time(_) => usize::MAX,
    };
    let tasks = (0..concurrency).map(|_| {
        let (op, next, errors) = (op.clone(), next.clone(), errors.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                match op(i).await {
                    Ok(()) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(e) => errors.record(format!("{e:#}")),
                }
            }
            latencies
        })
    });
    let mut latencies_us = Vec::new();
    for t in futures::future::join_all(tasks).await {
        latencies_us.extend(t.expect("bench task"));
    }
    let elapsed = started.elapsed();
    Stats {
        name: name.to_string(),
        ops: latencies_us.len(),
        errors: errors.count(),
        elapsed,
        latencies_us,
        baseline_ops_per_sec: None,
        note: errors.first().unwrap_or_default(),
    }
}

/// Errors seen by concurrent tasks: how many, and the first one's text.
#[derive(Default)]
struct Errors {
    count: AtomicUsize,
    first: Mutex<Option<String>>,
}

impl Errors {
    fn record(&self, error: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first.lock().unwrap().get_or_insert(error);
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// "first error: ..." when there was one.
    fn first(&self) -> Option<String> {
        let first = self.first.lock().unwrap();
        first.as_ref().map(|e| format!("first error: {e}"))
    }
}

fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
}

async fn channel(addr: &str) -> Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// Several HTTP/2 connections, so one connection's stream limit is not the bottleneck.
async fn channels(addr: &str, n: usize) -> Result<Vec<Channel>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(channel(addr).await?);
    }
    Ok(out)
}

pub async fn run_all(opts: Opts) -> Result<()> {
    let mut system = System::start(&opts.bin_dir, &opts.database_url, &opts.redis_url).await?;
    let c = opts.concurrency;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "keel-bench: {} cores, concurrency {c}, {}s per scenario, binaries from {}{}",
        cores,
        opts.seconds,
        opts.bin_dir.display(),
        if opts.quick { " (--quick)" } else { "" }
    );

    let mut auth = AuthServiceClient::new(channel(&system.auth).await?);
    let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
    let registered = auth
        .register(RegisterRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            display_name: "bench".into(),
        })
        .await
        .context("Register")?
        .into_inner();
    let token = Arc::new(registered.tokens.context("tokens")?.access_token);
    let user_id = registered.user.context("user")?.id;

    let jobs_channels = channels(&system.jobs, 4).await?;
    let memory_channels = channels(&system.memory, 4).await?;
    let auth_channels = channels(&system.auth, 4).await?;
    let jobs_client = move |i: usize| JobsServiceClient::new(jobs_channels[i % 4].clone());
    let jobs_client = Arc::new(jobs_client);
    let memory_client = {
        let chans = memory_channels.clone();
        Arc::new(move |i: usize| MemoryServiceClient::new(chans[i % 4].clone()))
    };
    let auth_client =
        Arc::new(move |i: usize| AuthServiceClient::new(auth_channels[i % 4].clone()));
    let baseline = crate::baseline::Baseline::connect(&system.db_url, &user_id).await?;

    let mut results: Vec<Stats> = Vec::new();
    let mut worker_usage = None;

    if opts.wants("e2e-jobs") || opts.wants("batch-e2e") || opts.wants("e2e-half-load") {
        system
            .start_workers(opts.workers, opts.worker_concurrency)
            .await?;
        warm_up(jobs_client(0), &token).await?;
        if opts.wants("e2e-jobs") {
            results.push(e2e(&opts, &system, &jobs_client, &token, E2e::OneEach).await?);
        }
        let peak = results
            .iter()
            .find(|s| s.name == "e2e-jobs")
            .map(Stats::ops_per_sec);
        if let Some(rate) = opts.e2e_rate.or(peak.map(|p| p / 2.0))
            && opts.wants("e2e-half-load")
        {
            results
                .push(e2e_paced(&opts, &system, jobs_client.clone(), token.clone(), rate).await?);
        }
        // After half-load: the RSS that scenario reports must not include
        // what batch-e2e's 500-job calls leave in the allocator.
        if opts.wants("batch-e2e") {
            results.push(e2e(&opts, &system, &jobs_client, &token, E2e::Batched).await?);
        }
        worker_usage = system.usage().pop();
        system.stop_workers();
    }
    // No stream worker runs now: claim-e2e's jobs go to the bench's own
    // claiming workers only, and the figures hold no idle stream worker.
    if opts.wants("claim-e2e") {
        results.push(e2e(&opts, &system, &jobs_client, &token, E2e::Claimed).await?);
    }

    if opts.wants("watch") {
        results.push(watch(&opts, &mut system, token.clone()).await?);
        if worker_usage.is_none() {
            worker_usage = system.usage().pop();
        }
        system.stop_workers();
    }

    let created = Arc::new(Mutex::new(Vec::<String>::new()));
    if opts.wants("create-job") || opts.wants("get-job") || opts.wants("list-jobs") {
        let (jc, tk, ids) = (jobs_client.clone(), token.clone(), created.clone());
        let mut s = drive(
            "create-job",
            c,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, tk, ids) = (jc(i), tk.clone(), ids.clone());
                async move {
                    let job = client
                        .create_job(authed(
                            &tk,
                            CreateJobRequest {
                                kind: "bench.noop".into(),
                                payload: Some(keel_shared::json::json_to_struct(
                                    &serde_json::json!({"i": i}),
                                )),
                                ..Default::default()
                            },
                        ))
                        .await?
                        .into_inner()
                        .job
                        .context("job")?;
                    ids.lock().unwrap().push(job.id);
                    Ok(())
                }
            },
        )
        .await;
        s.baseline_ops_per_sec = Some(
            baseline
                .create_job(c, Duration::from_secs(opts.seconds))
                .await?,
        );
        results.push(s);
    }
    let ids = Arc::new(created.lock().unwrap().clone());
    if opts.wants("get-job") && !ids.is_empty() {
        let (jc, tk, ids2) = (jobs_client.clone(), token.clone(), ids.clone());
        let mut s = drive(
            "get-job",
            c,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, tk, id) = (
                    jc(i),
                    tk.clone(),
                    ids2[i.wrapping_mul(7919) % ids2.len()].clone(),
                );
                async move {
                    client.get_job(authed(&tk, GetJobRequest { id })).await?;
                    Ok(())
                }
            },
        )
        .await;
        s.baseline_ops_per_sec = Some(
            baseline
                .get_job(c, Duration::from_secs(opts.seconds), &ids)
                .await?,
        );
        results.push(s);
    }
    if opts.wants("list-jobs") {
        let (jc, tk) = (jobs_client.clone(), token.clone());
        let mut s = drive(
            "list-jobs",
            c,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, tk) = (jc(i), tk.clone());
                async move {
                    client
                        .list_jobs(authed(
                            &tk,
                            ListJobsRequest {
                                page_size: 50,
                                ..Default::default()
                            },
                        ))
                        .await?;
                    Ok(())
                }
            },
        )
        .await;
        s.baseline_ops_per_sec = Some(
            baseline
                .list_jobs(c, Duration::from_secs(opts.seconds))
                .await?,
        );
        results.push(s);
    }

    let put_count = Arc::new(AtomicUsize::new(0));
    if opts.wants("memory-put") || opts.wants("memory-get") {
        let (mc, tk, count) = (memory_client.clone(), token.clone(), put_count.clone());
        let mut s = drive(
            "memory-put",
            c,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, tk, count) = (mc(i), tk.clone(), count.clone());
                async move {
                    client
                        .put_memory(authed(
                            &tk,
                            PutMemoryRequest {
                                key: format!("put/{i:08}"),
                                content: text(i, 40),
                                tags: vec![WORDS[i % WORDS.len()].to_string()],
                                ..Default::default()
                            },
                        ))
                        .await?;
                    count.fetch_max(i + 1, Ordering::Relaxed);
                    Ok(())
                }
            },
        )
        .await;
        s.baseline_ops_per_sec = Some(
            baseline
                .put_memory(c, Duration::from_secs(opts.seconds))
                .await?,
        );
        results.push(s);
    }
    let puts = put_count.load(Ordering::Relaxed).max(1);
    if opts.wants("memory-get") {
        let (mc, tk) = (memory_client.clone(), token.clone());
        let mut s = drive(
            "memory-get",
            c,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, tk) = (mc(i), tk.clone());
                async move {
                    let key = format!("put/{:08}", i.wrapping_mul(7919) % puts);
                    match client
                        .get_memory(authed(
                            &tk,
                            GetMemoryRequest {
                                key,
                                ..Default::default()
                            },
                        ))
                        .await
                    {
                        // A put that errored leaves a gap; NOT_FOUND is still a served read.
                        Ok(_) => Ok(()),
                        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
                        Err(s) => Err(s.into()),
                    }
                }
            },
        )
        .await;
        s.baseline_ops_per_sec = Some(
            baseline
                .get_memory(c, Duration::from_secs(opts.seconds), puts)
                .await?,
        );
        results.push(s);
    }
    if opts.wants("memory-search") || opts.wants("workspace") {
        // Seed the corpus through the API (not measured).
        let (mc, tk) = (memory_client.clone(), token.clone());
        let seeded = drive("seed", c, Limit::Ops(opts.search_corpus), move |i| {
            let (mut client, tk) = (mc(i), tk.clone());
            async move {
                client
                    .put_memory(authed(
                        &tk,
                        PutMemoryRequest {
                            key: format!("corpus/{i:08}"),
                            content: text(i + 1_000_003, 60),
                            tags: vec![
                                WORDS[i % WORDS.len()].to_string(),
                                WORDS[(i / 7) % WORDS.len()].to_string(),
                            ],
                            ..Default::default()
                        },
                    ))
                    .await?;
                Ok(())
            }
        })
        .await;
        println!(
            "seeded {} memories in {:.1}s ({} errors)",
            seeded.ops,
            seeded.elapsed.as_secs_f64(),
            seeded.errors
        );
        // The same corpus for other users, so the indexes are shared as in a
        // real deployment (straight into Postgres: only the reads are measured).
        let started = Instant::now();
        let others = baseline
            .seed_other_users(opts.search_other_users, opts.search_corpus)
            .await?;
        println!(
            "seeded {others} memories for {} other users in {:.1}s",
            opts.search_other_users,
            started.elapsed().as_secs_f64()
        );
    }
    if opts.wants("memory-search") {
        let (mc, tk) = (memory_client.clone(), token.clone());
        let mut s = drive(
            "memory-search",
            c,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, tk) = (mc(i), tk.clone());
                async move {
                    let query = query(i);
                    client
                        .search_memories(authed(
                            &tk,
                            SearchMemoriesRequest {
                                query,
                                limit: 10,
                                ..Default::default()
                            },
                        ))
                        .await?;
                    Ok(())
                }
            },
        )
        .await;
        s.note = format!(
            "{} corpus (+{} other users' alike), limit 10 {}",
            opts.search_corpus, opts.search_other_users, s.note
        );
        s.baseline_ops_per_sec = Some(
            baseline
                .search(c, Duration::from_secs(opts.seconds))
                .await?,
        );
        results.push(s);
    }
    if opts.wants("workspace") {
        let (mc, tk) = (memory_client.clone(), token.clone());
        let mut s = drive(
            "workspace",
            c,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, tk) = (mc(i), tk.clone());
                async move {
                    client
                        .get_workspace(authed(&tk, GetWorkspaceRequest::default()))
                        .await?;
                    Ok(())
                }
            },
        )
        .await;
        s.baseline_ops_per_sec = Some(
            baseline
                .workspace(c, Duration::from_secs(opts.seconds))
                .await?,
        );
        results.push(s);
    }
    if opts.wants("auth-login") {
        let (ac, email) = (auth_client.clone(), Arc::new(email.clone()));
        // argon2 is the point of this path: bound concurrency to the cores.
        let mut s = drive(
            "auth-login",
            cores * 2,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, email) = (ac(i), email.clone());
                async move {
                    client
                        .login(LoginRequest {
                            email: email.to_string(),
                            password: PASSWORD.into(),
                        })
                        .await?;
                    Ok(())
                }
            },
        )
        .await;
        s.note = format!(
            "{:.1} logins/s per core {}",
            s.ops_per_sec() / cores as f64,
            s.note
        );
        results.push(s);
    }
    if opts.wants("auth-read") {
        let (ac, tk) = (auth_client.clone(), token.clone());
        let mut s = drive(
            "auth-read",
            c,
            Limit::Time(Duration::from_secs(opts.seconds)),
            move |i| {
                let (mut client, tk) = (ac(i), tk.clone());
                async move {
                    client
                        .get_current_user(authed(&tk, GetCurrentUserRequest {}))
                        .await?;
                    Ok(())
                }
            },
        )
        .await;
        s.note = format!("GetCurrentUser: JWT verify + one row {}", s.note);
        results.push(s);
    }

    println!();
    stats::print_header();
    for s in &results {
        stats::print_row(s);
    }
    println!();
    println!(
        "{:<16} {:>12} {:>14}",
        "process", "CPU seconds", "peak RSS MiB"
    );
    for (name, cpu, rss) in system.usage().into_iter().chain(worker_usage) {
        println!("{name:<16} {cpu:>12.1} {rss:>14.1}");
    }
    let errors: usize = results.iter().map(|s| s.errors).sum();
    println!("\n{} scenarios, {errors} errors", results.len());
    Ok(())
}

/// Waits until an echo job has gone through the stream workers just
/// started. keel-jobs reads the kinds stream workers serve once a second and
/// publishes a kind's jobs only once it knows the kind is served (the others
/// reach the stream through the relay, later): without this the first jobs
/// of e2e-jobs waited ~2 s, start-up rather than throughput.
async fn warm_up(mut client: JobsServiceClient<Channel>, token: &str) -> Result<()> {
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
async fn e2e(
    opts: &Opts,
    system: &System,
    jobs_client: &Arc<impl Fn(usize) -> JobsServiceClient<Channel> + Send + Sync + 'static>,
    token: &Arc<String>,
    how: E2e,
) -> Result<Stats> {
    let n = opts.e2e_jobs;
    let marker = Arc::new(uuid::Uuid::new_v4().simple().to_string());
    let kind = how.kind();
    let claimers = match how {
        E2e::Claimed => Some(Claimers::start(opts, system).await?),
        _ => None,
    };
    let cpu_before = cpu_now(system);
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
                        .batch_create_jobs(authed(&tk, BatchCreateJobsRequest { requests }))
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
    let cpu = cpu_per_job(&cpu_before, &cpu_now(system), stats.ops);
    stats.note = format!(
        "{} clients, {}; {cpu}",
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

/// "CPU us/job: jobs 75, worker x2 52, bench 30": the processes that used CPU
/// between the two readings, per job.
fn cpu_per_job(before: &[(String, f64)], after: &[(String, f64)], jobs: usize) -> String {
    let per_job: Vec<String> = after
        .iter()
        .filter_map(|(name, cpu)| {
            let was = before.iter().find(|(n, _)| n == name).map_or(0.0, |b| b.1);
            let us = (cpu - was) * 1e6 / jobs.max(1) as f64;
            (us >= 1.0).then(|| format!("{name} {us:.0}"))
        })
        .collect();
    format!("CPU us/job: {}", per_job.join(", "))
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

/// WatchJob streams per HTTP/2 connection (the server allows 256): 10,000
/// watchers need 50 sockets, not 10,000 file descriptors.
const STREAMS_PER_CONNECTION: usize = 200;

/// `opts.watchers` concurrent WatchJob streams, 10 per job, on echo jobs
/// created while no worker runs; then workers start, and the scenario lasts
/// until every stream has sent its job's terminal state and ended. Reports
/// the watchers open at once, the Redis connections keel-jobs held then, and
/// per watcher the delay from the job's finished_at to its terminal message.
async fn watch(opts: &Opts, system: &mut System, token: Arc<String>) -> Result<Stats> {
    let watchers = opts.watchers.max(1);
    let job_count = watchers.div_ceil(10);
    let connections = channels(&system.jobs, watchers.div_ceil(STREAMS_PER_CONNECTION)).await?;
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
        let created = JobsServiceClient::new(connections[0].clone())
            .batch_create_jobs(authed(&token, BatchCreateJobsRequest { requests }))
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
        let mut client = JobsServiceClient::new(connections[i % connections.len()].clone());
        let (id, tk) = (ids[i % ids.len()].clone(), token.clone());
        let (open, failed) = (open.clone(), failed.clone());
        tasks.spawn(async move {
            let mut opened = false;
            let watched = async {
                let mut stream = client
                    .watch_job(authed(&tk, WatchJobRequest { id }))
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
    Ok(Stats {
        name: "watch".into(),
        ops: latencies_us.len(),
        errors,
        elapsed,
        latencies_us,
        baseline_ops_per_sec: None,
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
    })
}

/// Creates echo jobs one CreateJob each at a steady `rate` (open loop: a slow
/// reply does not slow the next call) for the scenario's seconds, then waits
/// until all finished. Run at half of e2e-jobs' peak, its create->start p99
/// is the latency target's figure.
async fn e2e_paced(
    opts: &Opts,
    system: &System,
    jobs_client: Arc<impl Fn(usize) -> JobsServiceClient<Channel> + Send + Sync + 'static>,
    token: Arc<String>,
    rate: f64,
) -> Result<Stats> {
    let n = ((rate * opts.seconds as f64) as usize).max(1);
    let marker = uuid::Uuid::new_v4().simple().to_string();
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
            client
                .create_job(authed(&tk, request))
                .await
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
        note: String::new(),
    };
    while let Some(result) = calls.join_next().await {
        match result? {
            Ok(_) => created.ops += 1,
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
    let rss: Vec<String> = rss
        .iter()
        .map(|(name, mib)| format!("{name} {mib:.1}"))
        .collect();
    stats.note = format!(
        "offered {rate:.0} jobs/s for {}s; {}; RSS MiB while offered: {}",
        opts.seconds,
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
