//! A worker that takes its jobs through `JobRunnerService/ClaimJobs`, as a
//! worker in any language would: the fault suite runs it as a child process
//! and SIGKILLs it.
//!
//! It long-polls ClaimJobs for its kinds with as many jobs as it has free
//! slots, runs each claimed job by sleeping the payload's `ms` (default 100)
//! while it heartbeats, then completes it with the output
//! `{"worker": <worker id>, "attempt": <attempt>, "ms": <ms>}`. Calls that
//! fail in transit (the jobs service is down) are retried; a refusal
//! (FAILED_PRECONDITION / NOT_FOUND: the attempt is no longer running) ends
//! the job here. Every step is one JSON line on stdout (`message`, `job_id`,
//! `attempt`, `worker`), which the suite counts.
//!
//! Configuration (environment):
//! - `KEEL_JOBS_URL` (required): the jobs service, e.g. `http://127.0.0.1:50052`
//! - `KEEL_WORKER_TOKEN` (required): the worker credential
//! - `KEEL_CLAIM_WORKER_ID` (required): the worker id sent with every call
//! - `KEEL_CLAIM_KINDS`: comma-separated kinds, default `faults.claim`
//! - `KEEL_CLAIM_CONCURRENCY`: jobs run at once, default 4
//! - `KEEL_CLAIM_WAIT_MS`: how long one ClaimJobs may wait, default 3000
//! - `KEEL_CLAIM_HEARTBEAT_MS`: heartbeat interval, default 500 (keep it
//!   well below the jobs service's lease)

use std::sync::Arc;
use std::time::Duration;

use keel_proto::jobs::v1::job_runner_service_client::JobRunnerServiceClient;
use keel_proto::jobs::v1::{ClaimJobsRequest, ClaimedJob, CompleteJobRequest, HeartbeatRequest};
use keel_proto::prost_types;
use keel_shared::json::{json_to_struct, struct_to_json};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Deadline of every call but ClaimJobs (which gets its wait on top).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before a call that failed in transit is made again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long a completion is retried before the job is left to the reaper.
const COMPLETE_PATIENCE: Duration = Duration::from_secs(60);

struct Worker {
    client: JobRunnerServiceClient<Channel>,
    bearer: MetadataValue<Ascii>,
    id: String,
    kinds: Vec<String>,
    wait: Duration,
    heartbeat: Duration,
}

impl Worker {
    fn request<T>(&self, message: T, timeout: Duration) -> Request<T> {
        let mut req = Request::new(message);
        req.metadata_mut()
            .insert("authorization", self.bearer.clone());
        req.set_timeout(timeout);
        req
    }

    /// One JSON line on stdout (line-buffered: a SIGKILL loses no whole line).
    fn log(&self, message: &str, job_id: &str, attempt: i32, extra: Value) {
        let mut line = json!({
            "message": message,
            "worker": self.id,
            "job_id": job_id,
            "attempt": attempt,
        });
        if let (Some(line), Value::Object(extra)) = (line.as_object_mut(), extra) {
            line.extend(extra);
        }
        println!("{line}");
    }

    async fn claim(&self, max_jobs: usize) -> Result<Vec<ClaimedJob>, Status> {
        let wait = prost_types::Duration {
            seconds: self.wait.as_secs() as i64,
            nanos: self.wait.subsec_nanos() as i32,
        };
        let req = ClaimJobsRequest {
            worker_id: self.id.clone(),
            kinds: self.kinds.clone(),
            max_jobs: max_jobs as i32,
            wait: Some(wait),
        };
        self.client
            .clone()
            .claim_jobs(self.request(req, self.wait + CALL_TIMEOUT))
            .await
            .map(|r| r.into_inner().jobs)
    }

    /// Runs one claimed job, holding `_slot` until it is done.
    async fn run(self: Arc<Self>, claimed: ClaimedJob, _slot: OwnedSemaphorePermit) {
        let Some(job) = claimed.job else {
            self.log("claimed job without its job", "", 0, json!({}));
            return;
        };
        let (id, attempt) = (job.id.as_str(), job.attempt);
        let ms = job
            .payload
            .as_ref()
            .and_then(|p| struct_to_json(p).ok())
            .and_then(|p| p["ms"].as_u64())
            .unwrap_or(100);
        self.log("job started", id, attempt, json!({ "ms": ms }));

        let work = tokio::time::sleep(Duration::from_millis(ms));
        tokio::pin!(work);
        let mut beat = tokio::time::interval(self.heartbeat);
        beat.tick().await; // the first tick is immediate; the claim granted the lease
        let mut cancelled = false;
        loop {
            tokio::select! {
                _ = &mut work => break,
                _ = beat.tick() => {
                    let req = HeartbeatRequest {
                        id: id.to_string(),
                        attempt,
                        worker_id: self.id.clone(),
                        progress: None,
                    };
                    match self.client.clone().heartbeat(self.request(req, CALL_TIMEOUT)).await {
                        Ok(reply) if reply.get_ref().cancel_requested => {
                            cancelled = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(status) if refused(&status) => {
                            self.log("lease lost", id, attempt, json!({ "error": status.message() }));
                            return;
                        }
                        Err(_) => {} // in transit: the next beat tries again
                    }
                }
            }
        }

        let output = json_to_struct(&json!({ "worker": self.id, "attempt": attempt, "ms": ms }));
        let give_up = tokio::time::Instant::now() + COMPLETE_PATIENCE;
        loop {
            let req = CompleteJobRequest {
                id: id.to_string(),
                attempt,
                output: Some(output.clone()),
                cancelled,
                worker_id: self.id.clone(),
            };
            match self
                .client
                .clone()
                .complete_job(self.request(req, CALL_TIMEOUT))
                .await
            {
                Ok(_) => {
                    self.log(
                        "job completed",
                        id,
                        attempt,
                        json!({ "cancelled": cancelled }),
                    );
                    return;
                }
                Err(status) if refused(&status) => {
                    // Either the attempt was taken away, or an earlier try of
                    // this call committed and its answer was lost.
                    self.log(
                        "complete refused",
                        id,
                        attempt,
                        json!({ "error": status.message() }),
                    );
                    return;
                }
                Err(status) if tokio::time::Instant::now() >= give_up => {
                    self.log(
                        "complete abandoned",
                        id,
                        attempt,
                        json!({ "error": status.to_string() }),
                    );
                    return;
                }
                Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
            }
        }
    }
}

/// The jobs service answered that this attempt is not running (any more):
/// trying again cannot help.
fn refused(status: &Status) -> bool {
    matches!(status.code(), Code::FailedPrecondition | Code::NotFound)
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn required(key: &str) -> String {
    env(key).unwrap_or_else(|| panic!("{key} is required"))
}

fn number(key: &str, default: u64) -> u64 {
    env(key).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{key} must be a number"))
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = required("KEEL_JOBS_URL");
    let channel = Endpoint::from_shared(url.clone())
        .unwrap_or_else(|e| panic!("KEEL_JOBS_URL {url:?}: {e}"))
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let bearer = format!("Bearer {}", required("KEEL_WORKER_TOKEN"))
        .parse()
        .expect("KEEL_WORKER_TOKEN must be ASCII");
    let kinds = env("KEEL_CLAIM_KINDS").unwrap_or_else(|| "faults.claim".into());
    let concurrency = number("KEEL_CLAIM_CONCURRENCY", 4).max(1) as usize;
    let worker = Arc::new(Worker {
        client: JobRunnerServiceClient::new(channel),
        bearer,
        id: required("KEEL_CLAIM_WORKER_ID"),
        kinds: kinds.split(',').map(|k| k.trim().to_string()).collect(),
        wait: Duration::from_millis(number("KEEL_CLAIM_WAIT_MS", 3_000)),
        heartbeat: Duration::from_millis(number("KEEL_CLAIM_HEARTBEAT_MS", 500).max(10)),
    });
    worker.log("claim worker up", "", 0, json!({ "kinds": worker.kinds }));

    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        // Wait for one free slot, then ask for as many jobs as are free.
        let first = slots.clone().acquire_owned().await.expect("slots open");
        let mut free = vec![first];
        while let Ok(slot) = slots.clone().try_acquire_owned() {
            free.push(slot);
        }
        match worker.claim(free.len()).await {
            Ok(jobs) => {
                assert!(
                    jobs.len() <= free.len(),
                    "ClaimJobs returned {} jobs for max_jobs {}",
                    jobs.len(),
                    free.len()
                );
                for job in jobs {
                    let slot = free.pop().expect("a slot per job");
                    tokio::spawn(worker.clone().run(job, slot));
                }
            }
            Err(status) => {
                worker.log(
                    "claim failed",
                    "",
                    0,
                    json!({ "error": status.code().to_string() }),
                );
                drop(free);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}
