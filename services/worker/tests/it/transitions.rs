//! The worker's StartJob / CompleteJob calls travel together as StartJobs /
//! CompleteJobs when several are due at once, each job still getting its own
//! outcome; against a jobs service without those RPCs (an older version) the
//! worker falls back to single calls. A forwarding proxy in front of the real
//! jobs service counts the calls (and, as the older version, refuses the
//! batched ones).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::job_runner_service_server::{JobRunnerService, JobRunnerServiceServer};
use keel_proto::jobs::v1::*;
use keel_shared::testing;
use keel_worker::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::support::Env;

#[derive(Default)]
struct Counts {
    start_job: AtomicUsize,
    start_jobs: AtomicUsize,
    start_items: AtomicUsize,
    complete_job: AtomicUsize,
    complete_jobs: AtomicUsize,
    complete_items: AtomicUsize,
}

struct Proxy {
    upstream: JobRunnerServiceClient<Channel>,
    /// False: answer StartJobs / CompleteJobs UNIMPLEMENTED, like a jobs
    /// service from before they existed.
    batched: bool,
    counts: Arc<Counts>,
}

/// The same message with the caller's authorization header.
fn forward<T>(req: Request<T>) -> Request<T> {
    let auth = req.metadata().get("authorization").cloned();
    let mut out = Request::new(req.into_inner());
    if let Some(auth) = auth {
        out.metadata_mut().insert("authorization", auth);
    }
    out
}

#[tonic::async_trait]
impl JobRunnerService for Proxy {
    async fn start_job(
        &self,
        req: Request<StartJobRequest>,
    ) -> Result<Response<StartJobResponse>, Status> {
        self.counts.start_job.fetch_add(1, Ordering::SeqCst);
        self.upstream.clone().start_job(forward(req)).await
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.upstream.clone().heartbeat(forward(req)).await
    }

    async fn complete_job(
        &self,
        req: Request<CompleteJobRequest>,
    ) -> Result<Response<CompleteJobResponse>, Status> {
        self.counts.complete_job.fetch_add(1, Ordering::SeqCst);
        self.upstream.clone().complete_job(forward(req)).await
    }

    async fn fail_job(
        &self,
        req: Request<FailJobRequest>,
    ) -> Result<Response<FailJobResponse>, Status> {
        self.upstream.clone().fail_job(forward(req)).await
    }

    async fn start_jobs(
        &self,
        req: Request<StartJobsRequest>,
    ) -> Result<Response<StartJobsResponse>, Status> {
        self.counts.start_jobs.fetch_add(1, Ordering::SeqCst);
        if !self.batched {
            return Err(Status::unimplemented("StartJobs"));
        }
        let items = req.get_ref().requests.len();
        self.counts.start_items.fetch_add(items, Ordering::SeqCst);
        self.upstream.clone().start_jobs(forward(req)).await
    }

    async fn complete_jobs(
        &self,
        req: Request<CompleteJobsRequest>,
    ) -> Result<Response<CompleteJobsResponse>, Status> {
        self.counts.complete_jobs.fetch_add(1, Ordering::SeqCst);
        if !self.batched {
            return Err(Status::unimplemented("CompleteJobs"));
        }
        let items = req.get_ref().requests.len();
        self.counts
            .complete_items
            .fetch_add(items, Ordering::SeqCst);
        self.upstream.clone().complete_jobs(forward(req)).await
    }

    async fn claim_jobs(
        &self,
        req: Request<ClaimJobsRequest>,
    ) -> Result<Response<ClaimJobsResponse>, Status> {
        self.upstream.clone().claim_jobs(forward(req)).await
    }
}

/// A proxy to `env`'s jobs service; returns its URL and its call counts.
async fn proxy(env: &Env, batched: bool, stop: CancellationToken) -> (String, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let proxy = Proxy {
        upstream: JobRunnerServiceClient::new(testing::channel(env.jobs_addr).await),
        batched,
        counts: counts.clone(),
    };
    let (listener, addr) = testing::listener().await;
    let router = keel_shared::server::builder().add_service(JobRunnerServiceServer::new(proxy));
    tokio::spawn(keel_shared::server::serve(
        router,
        listener,
        stop,
        Duration::from_secs(1),
    ));
    (format!("http://{addr}"), counts)
}

/// `n` echo jobs, each with its own payload; waits until all have
/// succeeded, and checks each holds its own payload as output, first attempt.
async fn run_echo_jobs(env: &Env, jobs_url: String, n: usize) {
    let mut config = env.worker_config();
    config.jobs_url = jobs_url;
    config.concurrency = Some(32);
    // A short sleep so that many jobs start and finish at the same moments.
    let registry = Registry::new().register_fn("echo", |ctx| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(ctx.payload)
    });
    let worker = env.start_worker(config, registry).await;
    let created = env
        .create_many("echo", (0..n).map(|i| json!({"i": i})))
        .await;
    for job in &created {
        let done = env.wait_for(&job.id, JobStatus::Succeeded).await;
        assert_eq!(done.output, job.payload, "job {} output", job.id);
        assert_eq!(done.attempt, 1);
    }
    env.wait_drained().await;
    worker.stop().await;
}

#[tokio::test]
async fn concurrent_transitions_travel_together_and_each_job_gets_its_own_outcome() {
    let env = Env::start().await;
    let stop = CancellationToken::new();
    let (url, counts) = proxy(&env, true, stop.clone()).await;
    run_echo_jobs(&env, url, 200).await;

    let c = |n: &AtomicUsize| n.load(Ordering::SeqCst);
    // Every job started and completed exactly once, singly or in a batch.
    assert_eq!(c(&counts.start_job) + c(&counts.start_items), 200);
    assert_eq!(c(&counts.complete_job) + c(&counts.complete_items), 200);
    assert!(
        c(&counts.start_jobs) > 0 && c(&counts.complete_jobs) > 0,
        "no batched calls: {} StartJobs, {} CompleteJobs",
        c(&counts.start_jobs),
        c(&counts.complete_jobs)
    );
    assert!(
        c(&counts.start_jobs) + c(&counts.start_job) < 200,
        "the starts were not batched"
    );
    stop.cancel();
}

#[tokio::test]
async fn an_older_jobs_service_without_batched_calls_gets_single_calls() {
    let env = Env::start().await;
    let stop = CancellationToken::new();
    let (url, counts) = proxy(&env, false, stop.clone()).await;
    run_echo_jobs(&env, url, 200).await;

    let c = |n: &AtomicUsize| n.load(Ordering::SeqCst);
    assert_eq!(c(&counts.start_items) + c(&counts.complete_items), 0);
    // Each job went through one StartJob and one CompleteJob that was applied
    // (a job refused once as UNIMPLEMENTED is retried as a single call).
    assert!(c(&counts.start_job) >= 200, "{}", c(&counts.start_job));
    assert!(
        c(&counts.complete_job) >= 200,
        "{}",
        c(&counts.complete_job)
    );
    // After the first refusal the worker stops asking.
    assert!(
        c(&counts.start_jobs) <= 2 && c(&counts.complete_jobs) <= 2,
        "{} StartJobs, {} CompleteJobs after UNIMPLEMENTED",
        c(&counts.start_jobs),
        c(&counts.complete_jobs)
    );
    stop.cancel();
}
