//! What each RPC does, between the gRPC handlers (decode, authorize, encode)
//! and the store (SQL): idempotent creation, state-checked transitions with
//! precise refusals, announcements.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use keel_shared::ApiError;
use keel_shared::batch::{self, Batcher};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::delivery::{Delivery, PUBLISH_GRACE};
use crate::domain::{self, JobState, NewJob};
use crate::error::JobsError;
use crate::flow::{self, FlowControl};
use crate::store::{self, JobRow};

/// Tunables the RPCs need (from `Config`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub lease: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub max_payload_bytes: usize,
    pub watch_poll: Duration,
    /// How long a job may wait for a worker when its request names no limit.
    pub schedule_timeout: Duration,
    /// How often a waiting ClaimJobs looks again without being woken.
    pub claim_poll: Duration,
    /// The per-kind limits starts and claims obey.
    pub flow: Arc<FlowControl>,
}

pub struct Jobs {
    pool: Pool,
    delivery: Arc<Delivery>,
    settings: Settings,
    creates: Batcher<CreateCall, Vec<JobRow>, JobsError>,
    starts: Batcher<StartCall, Option<JobRow>, JobsError>,
    completions: Batcher<CompleteCall, Option<JobRow>, JobsError>,
    /// GetJob (and WatchJob's) reads, answered together while one is under way.
    reads: Batcher<ReadCall, Option<JobRow>, JobsError>,
    /// Wakes waiting ClaimJobs calls when jobs become due here.
    jobs_due: Notify,
    /// Permits for BatchCreateJobs inserts (see [`BULK_INSERTS`]).
    bulk_inserts: Semaphore,
}

/// A CreateJob waiting for its batch.
pub struct CreateCall {
    user_id: Uuid,
    jobs: Vec<(Uuid, NewJob)>,
    traceparent: Option<String>,
}

/// A StartJob waiting for its batch.
pub struct StartCall {
    id: Uuid,
    worker_id: String,
    delivery_id: String,
}

/// A CompleteJob waiting for its batch.
pub struct CompleteCall {
    id: Uuid,
    attempt: i32,
    output: Option<serde_json::Value>,
    cancelled: bool,
    worker_id: String,
}

/// A GetJob waiting for its read.
pub struct ReadCall {
    user_id: Uuid,
    id: Uuid,
}

/// Applied or not (then the caller reads why).
type Applied = Result<Option<JobRow>, JobsError>;

/// The queues that the batchers of a [`Jobs`] drain: the transitions
/// (creates, starts, completions) and GetJob's reads.
pub struct BatchQueues {
    pub creates: batch::Queue<CreateCall, Vec<JobRow>, JobsError>,
    pub starts: batch::Queue<StartCall, Option<JobRow>, JobsError>,
    pub completions: batch::Queue<CompleteCall, Option<JobRow>, JobsError>,
    pub reads: batch::Queue<ReadCall, Option<JobRow>, JobsError>,
}

/// How often CancelJob re-reads a job that changed under it before giving up.
const CANCEL_TRIES: usize = 5;
/// Most calls of one kind (a transition, or GetJob) in one statement.
const TRANSITION_BATCH: usize = 256;
/// Batches of one kind under way at once: a call arriving while one commits
/// starts the next instead of waiting for it (measured: the same throughput
/// as one at a time, half the queueing under saturation).
const TRANSITION_BATCHES: usize = 2;
/// Calls of one kind waiting for their batch; beyond this callers wait for room.
const TRANSITION_QUEUE: usize = 4096;
/// A BatchCreateJobs of more jobs than this leaves them to the relay (when
/// streams are bounded: see `crate::fairness`), not the immediate publication.
const IMMEDIATE_MAX: usize = 64;
/// BatchCreateJobs inserts under way at once; further calls wait for one to
/// commit. A flood of bulk enqueues would otherwise hold every pooled
/// connection, and the relay, the workers' transitions and other users'
/// calls would queue behind it for the pool (measured: relay rounds waiting
/// 0.5-0.8 s for a connection while 64 clients enqueued 500-job batches).
/// With the transition batchers' 3 x [`TRANSITION_BATCHES`], 8 of the
/// default 16 connections stay free for everything else.
const BULK_INSERTS: usize = 2;

impl Jobs {
    pub fn new(pool: Pool, delivery: Arc<Delivery>, settings: Settings) -> (Self, BatchQueues) {
        let (creates, create_queue) = Batcher::new(TRANSITION_QUEUE);
        let (starts, start_queue) = Batcher::new(TRANSITION_QUEUE);
        let (completions, complete_queue) = Batcher::new(TRANSITION_QUEUE);
        let (reads, read_queue) = Batcher::new(TRANSITION_QUEUE);
        let jobs = Self {
            pool,
            delivery,
            settings,
            creates,
            starts,
            completions,
            reads,
            jobs_due: Notify::new(),
            bulk_inserts: Semaphore::new(BULK_INSERTS),
        };
        let queues = BatchQueues {
            creates: create_queue,
            starts: start_queue,
            completions: complete_queue,
            reads: read_queue,
        };
        (jobs, queues)
    }

    /// Spawns the batchers: until `shutdown`, the CreateJob, StartJob and
    /// CompleteJob calls that queued up meanwhile are applied as one
    /// statement (one commit) per kind, and the GetJob calls are read by one
    /// statement.
    pub fn spawn_batchers(self: &Arc<Self>, queues: BatchQueues, shutdown: CancellationToken) {
        self.spawn_batcher(queues.creates, &shutdown, |jobs, calls| async move {
            jobs.create_batch(calls).await
        });
        self.spawn_batcher(queues.starts, &shutdown, |jobs, calls| async move {
            jobs.start_batch(calls).await
        });
        self.spawn_batcher(queues.completions, &shutdown, |jobs, calls| async move {
            jobs.complete_batch(calls).await
        });
        self.spawn_batcher(queues.reads, &shutdown, |jobs, calls| async move {
            jobs.read_batch(calls).await
        });
    }

    /// Runs `queue`'s calls through `run_batch` in batches of up to
    /// [`TRANSITION_BATCH`], [`TRANSITION_BATCHES`] at a time, until `shutdown`.
    fn spawn_batcher<I, O, F, Fut>(
        self: &Arc<Self>,
        queue: batch::Queue<I, O, JobsError>,
        shutdown: &CancellationToken,
        run_batch: F,
    ) where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(Arc<Self>, Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Result<O, JobsError>>> + Send + 'static,
    {
        let jobs = self.clone();
        tokio::spawn(batch::run(
            queue,
            TRANSITION_BATCH,
            TRANSITION_BATCHES,
            shutdown.clone(),
            move |calls| run_batch(jobs.clone(), calls),
        ));
    }

    /// Creates jobs in one statement (all or nothing), resolving idempotency
    /// keys that already exist to their original job. Returns the jobs in
    /// request order. Delivery to Redis starts after the commit and never
    /// fails the call. A single job (CreateJob) shares its statement with the
    /// CreateJob calls that arrive meanwhile; a batch has one of its own.
    pub async fn create(
        &self,
        user_id: Uuid,
        items: Vec<NewJob>,
    ) -> Result<Vec<JobRow>, JobsError> {
        let with_ids: Vec<(Uuid, NewJob)> =
            items.into_iter().map(|j| (Uuid::now_v7(), j)).collect();
        let wanted: Vec<(Uuid, Option<String>)> = with_ids
            .iter()
            .map(|(id, j)| (*id, j.idempotency_key.clone()))
            .collect();
        let traceparent = keel_shared::telemetry::current_traceparent();
        let call = CreateCall {
            user_id,
            jobs: with_ids,
            traceparent: traceparent.clone(),
        };
        // A large batch goes to the relay at once, which takes turns between
        // users, rather than through the immediate publication.
        let to_relay = call.jobs.len() > IMMEDIATE_MAX && self.delivery.streams_bounded();
        let inserted = if call.jobs.len() == 1 {
            self.creates.call(call).await?
        } else {
            let _permit = self.bulk_inserts.acquire().await.expect("never closed");
            let grace = if to_relay {
                Duration::ZERO
            } else {
                PUBLISH_GRACE
            };
            self.insert_call(&call, grace).await?
        };
        for job in &inserted {
            keel_shared::metrics::job_transition("created", &job.kind);
        }
        // The insert's now() is the jobs' created_at: a job due then is published now.
        let due = inserted.iter().filter(|j| j.run_at <= j.created_at);
        if to_relay {
            let mut kinds: Vec<&str> = due.map(|j| j.kind.as_str()).collect();
            kinds.sort_unstable();
            kinds.dedup();
            self.delivery.hand_over(kinds);
        } else {
            self.delivery.publish_soon(due.map(|j| store::Publication {
                job_id: j.id,
                kind: j.kind.clone(),
                priority: j.priority,
                attempt: 0,
                traceparent: traceparent.clone(),
            }));
        }
        if !inserted.is_empty() {
            self.jobs_due.notify_waiters();
        }
        let mut by_id: HashMap<Uuid, JobRow> = inserted.into_iter().map(|j| (j.id, j)).collect();

        // Only an existing idempotency key makes the insert skip an item.
        let existing_keys: Vec<&str> = wanted
            .iter()
            .filter(|(id, _)| !by_id.contains_key(id))
            .filter_map(|(_, key)| key.as_deref())
            .collect();
        let by_key: HashMap<String, JobRow> = if existing_keys.is_empty() {
            HashMap::new()
        } else {
            let client = self.pool.get().await?;
            store::jobs_by_keys(&client, user_id, &existing_keys)
                .await?
                .into_iter()
                .collect()
        };

        wanted
            .iter()
            .map(|(id, key)| {
                by_id
                    .remove(id)
                    .or_else(|| key.as_deref().and_then(|k| by_key.get(k).cloned()))
                    .ok_or_else(|| {
                        JobsError::Api(ApiError::Aborted(
                            "the job with this idempotency key changed concurrently, retry".into(),
                        ))
                    })
            })
            .collect()
    }

    /// One create call in a statement of its own; its jobs due now are left
    /// to the relay after `publish_grace`.
    async fn insert_call(
        &self,
        call: &CreateCall,
        publish_grace: Duration,
    ) -> Result<Vec<JobRow>, JobsError> {
        let client = self.pool.get().await?;
        store::insert_jobs(
            &client,
            &new_rows(std::slice::from_ref(call), self.settings.schedule_timeout),
            publish_grace,
        )
        .await
    }

    /// One statement for a batch of CreateJob calls. If it fails, each call
    /// runs again on its own, so a call that cannot succeed (its user was
    /// deleted) fails alone.
    async fn create_batch(&self, calls: Vec<CreateCall>) -> Vec<Result<Vec<JobRow>, JobsError>> {
        if calls.len() > 1 {
            let together = async {
                let client = self.pool.get().await?;
                let rows = new_rows(&calls, self.settings.schedule_timeout);
                store::insert_jobs(&client, &rows, PUBLISH_GRACE).await
            }
            .await;
            if let Ok(inserted) = together {
                let mut by_id: HashMap<Uuid, JobRow> =
                    inserted.into_iter().map(|j| (j.id, j)).collect();
                return calls
                    .iter()
                    .map(|c| {
                        Ok(c.jobs
                            .iter()
                            .filter_map(|(id, _)| by_id.remove(id))
                            .collect())
                    })
                    .collect();
            }
        }
        let mut outcomes = Vec::with_capacity(calls.len());
        for call in &calls {
            outcomes.push(self.insert_call(call, PUBLISH_GRACE).await);
        }
        outcomes
    }

    /// The most payload, output or progress JSON a job may carry, in bytes.
    pub fn max_payload_bytes(&self) -> usize {
        self.settings.max_payload_bytes
    }

    /// How often a watcher re-reads the job even without announcements.
    pub fn watch_poll(&self) -> std::time::Duration {
        self.settings.watch_poll
    }

    pub async fn get(&self, user_id: Uuid, id: Uuid) -> Result<JobRow, JobsError> {
        self.reads
            .call(ReadCall { user_id, id })
            .await?
            .ok_or(JobsError::NotFound)
    }

    /// Reads the jobs of `calls` in one statement; each call gets its job
    /// only when it is the caller's.
    async fn read_batch(&self, calls: Vec<ReadCall>) -> Vec<Result<Option<JobRow>, JobsError>> {
        let ids: Vec<Uuid> = calls.iter().map(|c| c.id).collect();
        let found = async {
            let client = self.pool.get().await?;
            store::jobs_by_id(&client, &ids).await
        }
        .await;
        match found {
            Ok(jobs) => {
                let by_id: HashMap<Uuid, JobRow> = jobs.into_iter().map(|j| (j.id, j)).collect();
                calls
                    .iter()
                    .map(|c| {
                        let job = by_id.get(&c.id).filter(|j| j.user_id == c.user_id);
                        Ok(job.cloned())
                    })
                    .collect()
            }
            Err(e) => calls.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// One page (`limit` + 1 rows are read to know whether another follows).
    pub async fn list(
        &self,
        user_id: Uuid,
        status: Option<JobState>,
        kind: Option<&str>,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<(Vec<JobRow>, Option<Uuid>), JobsError> {
        let client = self.pool.get().await?;
        let mut rows = store::list_jobs(&client, user_id, status, kind, before, limit + 1).await?;
        let next = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|j| j.id)
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Queued -> cancelled; running -> cancellation requested (the worker's
    /// next heartbeat learns it). Repeating a cancel of a running job whose
    /// cancellation is already requested returns it unchanged; a finished job
    /// (cancelled included) is FAILED_PRECONDITION.
    pub async fn cancel(&self, user_id: Uuid, id: Uuid) -> Result<JobRow, JobsError> {
        let client = self.pool.get().await?;
        let (job, changed) = cancel_on(&client, user_id, id).await?;
        if changed {
            self.cancelled(&job);
        }
        Ok(job)
    }

    /// What follows a committed cancellation ([`cancel_on`] said it changed the job).
    pub(crate) fn cancelled(&self, job: &JobRow) {
        if job.status == JobState::Cancelled {
            count_transition(job);
        }
        self.delivery.announce(job);
    }

    /// The caller's job's history, oldest first.
    pub async fn history(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Vec<store::EventRow>, JobsError> {
        let client = self.pool.get().await?;
        store::job_history(&client, user_id, id)
            .await?
            .ok_or(JobsError::NotFound)
    }

    /// Failed or cancelled -> queued with a fresh set of attempts, then
    /// delivered exactly as a new job: published to its stream at once (the
    /// relay after the grace if that fails) and waiting claims woken.
    pub async fn retry(&self, user_id: Uuid, id: Uuid) -> Result<JobRow, JobsError> {
        let client = self.pool.get().await?;
        let job = retry_on(&client, user_id, id).await?;
        self.retried(&job);
        Ok(job)
    }

    /// What follows a committed retry ([`retry_on`]): the job is delivered
    /// like a new one.
    pub(crate) fn retried(&self, job: &JobRow) {
        count_transition(job);
        self.delivery.announce(job);
        self.delivery.publish_soon([store::Publication {
            job_id: job.id,
            kind: job.kind.clone(),
            priority: job.priority,
            // The retried job's outbox row is a new job's (see store::retry_job).
            attempt: 0,
            traceparent: keel_shared::telemetry::current_traceparent(),
        }]);
        self.jobs_due.notify_waiters();
    }

    /// Publishes a queued job to its stream again (a dead letter replayed):
    /// a duplicate delivery is harmless, StartJob takes each attempt once.
    pub(crate) fn redeliver(&self, job: &JobRow) {
        self.delivery.publish_soon([store::Publication {
            job_id: job.id,
            kind: job.kind.clone(),
            priority: job.priority,
            attempt: job.attempt,
            traceparent: keel_shared::telemetry::current_traceparent(),
        }]);
        self.jobs_due.notify_waiters();
    }

    /// Deletes the caller's finished job with its history; anything else
    /// (queued, running) is FAILED_PRECONDITION.
    pub async fn delete(&self, user_id: Uuid, id: Uuid) -> Result<(), JobsError> {
        let client = self.pool.get().await?;
        delete_on(&client, user_id, id).await
    }

    /// Queued and due -> running with a new attempt and a lease. The same
    /// worker repeating its start of the same delivery gets that attempt
    /// back (its first answer was lost).
    pub async fn start(
        &self,
        id: Uuid,
        worker_id: &str,
        delivery_id: &str,
    ) -> Result<JobRow, JobsError> {
        let worker_id = domain::clip(worker_id, domain::MAX_WORKER_ID_BYTES);
        let call = StartCall {
            id,
            worker_id: worker_id.clone(),
            delivery_id: delivery_id.to_string(),
        };
        match self.starts.call(call).await? {
            Some(job) => {
                count_transition(&job);
                self.delivery.announce(&job);
                Ok(job)
            }
            None => {
                let client = self.pool.get().await?;
                let start = store::Start {
                    id,
                    worker_id: &worker_id,
                    delivery_id,
                };
                if let Some(job) = store::resume_start(&client, start, self.settings.lease).await? {
                    return Ok(job);
                }
                let job = store::job(&client, id).await?.ok_or(JobsError::NotFound)?;
                Err(JobsError::WrongState(domain::start_refusal(
                    job.status,
                    job.run_at,
                    Utc::now(),
                )))
            }
        }
    }

    /// One statement for a batch of StartJob calls. Only the first call for
    /// a job takes part: a duplicate in the same batch is refused as it
    /// would be right after it.
    async fn start_batch(&self, calls: Vec<StartCall>) -> Vec<Applied> {
        let mut seen = HashSet::new();
        let distinct: Vec<store::Start<'_>> = calls
            .iter()
            .filter(|c| seen.insert(c.id))
            .map(|c| store::Start {
                id: c.id,
                worker_id: &c.worker_id,
                delivery_id: &c.delivery_id,
            })
            .collect();
        let limits = self.settings.flow.current();
        let started = async {
            let mut client = self.pool.get().await?;
            if limits.is_empty() {
                let jobs = store::start_jobs(&client, &distinct, self.settings.lease).await?;
                return Ok((jobs, HashMap::new()));
            }
            // Flow control: the limited kinds' starts are counted and made
            // under their start locks, in one transaction.
            let tx = client.transaction().await?;
            let ids: Vec<Uuid> = distinct.iter().map(|s| s.id).collect();
            let held = flow::gate_starts(&tx, &limits, &ids).await?;
            let admitted: Vec<store::Start<'_>> = distinct
                .iter()
                .filter(|s| !held.contains_key(&s.id))
                .copied()
                .collect();
            let jobs = if admitted.is_empty() {
                Vec::new()
            } else {
                store::start_jobs(&tx, &admitted, self.settings.lease).await?
            };
            flow::pay(&tx, &limits, jobs.iter().map(|j| j.kind.as_str())).await?;
            tx.commit().await?;
            Ok::<_, JobsError>((jobs, held))
        }
        .await;
        match started {
            Ok((jobs, held)) => {
                let mut by_id: HashMap<Uuid, JobRow> =
                    jobs.into_iter().map(|j| (j.id, j)).collect();
                calls
                    .iter()
                    .map(|c| match held.get(&c.id) {
                        Some(why) => Err(JobsError::Held(why.message.clone())),
                        None => Ok(by_id.remove(&c.id)),
                    })
                    .collect()
            }
            Err(e) => calls.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Extends the lease of running attempt `attempt` and records its
    /// progress (announced to watchers); says whether cancellation was
    /// requested.
    pub async fn heartbeat(
        &self,
        id: Uuid,
        attempt: i32,
        progress: Option<serde_json::Value>,
    ) -> Result<(DateTime<Utc>, bool), JobsError> {
        let client = self.pool.get().await?;
        let lease = self.settings.lease;
        match store::heartbeat(&client, id, attempt, lease, progress.as_ref()).await? {
            Some(job) => {
                if progress.is_some() {
                    self.delivery.announce(&job);
                }
                let lease_expires_at = job.lease_expires_at.unwrap_or_else(Utc::now);
                Ok((lease_expires_at, job.cancel_requested))
            }
            None => Err(self.deadline_refusal(&client, id, attempt).await),
        }
    }

    /// Why a Heartbeat or CompleteJob of `attempt` did not apply. Both refuse
    /// a running attempt past its deadline, so a job still running that
    /// attempt with a deadline timed out (the reaper records it soon).
    async fn deadline_refusal(
        &self,
        client: &deadpool_postgres::Client,
        id: Uuid,
        attempt: i32,
    ) -> JobsError {
        match store::job(client, id).await {
            Ok(Some(job))
                if job.status == JobState::Running
                    && job.attempt == attempt
                    && job.attempt_deadline.is_some() =>
            {
                JobsError::WrongState(domain::timed_out_refusal(attempt))
            }
            Ok(_) => self.attempt_refusal(client, id, attempt).await,
            Err(e) => e,
        }
    }

    /// Starts up to `max_jobs` due jobs of `kinds` for `worker_id`, highest
    /// priority first, then oldest. When none is due, waits up to `wait` for
    /// one (woken when jobs are created or re-queued here, and looking again
    /// every claim poll for those of other replicas and delayed ones).
    pub async fn claim(
        &self,
        worker_id: &str,
        kinds: &[String],
        max_jobs: i64,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Vec<JobRow>, JobsError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let woken = self.jobs_due.notified();
            tokio::pin!(woken);
            // Registered before looking, so a wake-up during the query counts.
            woken.as_mut().enable();
            let claimed = self.claim_once(worker_id, kinds, max_jobs).await?;
            let now = tokio::time::Instant::now();
            if !claimed.is_empty() || now >= deadline {
                for job in &claimed {
                    count_transition(job);
                    self.delivery.announce(job);
                }
                return Ok(claimed);
            }
            let next_look = deadline.min(now + self.settings.claim_poll);
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(next_look) => {}
                _ = shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// One claim: up to `max_jobs` due jobs of `kinds`, fewer (or none) of
    /// the kinds flow control limits.
    async fn claim_once(
        &self,
        worker_id: &str,
        kinds: &[String],
        max_jobs: i64,
    ) -> Result<Vec<JobRow>, JobsError> {
        let lease = self.settings.lease;
        let limits = self.settings.flow.current();
        let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
        let mut client = self.pool.get().await?;
        if !kinds.iter().any(|k| limits.of(k).is_some()) {
            let caps = vec![max_jobs; kinds.len()];
            return store::claim_jobs(&client, &kinds, &caps, worker_id, max_jobs, lease).await;
        }
        let tx = client.transaction().await?;
        let allowances = flow::allowances(&tx, &limits, &kinds).await?;
        let caps: Vec<i64> = kinds
            .iter()
            .map(|k| {
                allowances
                    .get(*k)
                    .map_or(max_jobs, |(n, _)| (*n).min(max_jobs))
            })
            .collect();
        if caps.iter().all(|&n| n == 0) {
            return Ok(Vec::new());
        }
        let jobs = store::claim_jobs(&tx, &kinds, &caps, worker_id, max_jobs, lease).await?;
        flow::pay(&tx, &limits, jobs.iter().map(|j| j.kind.as_str())).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    /// Running attempt `attempt` -> succeeded (or cancelled).
    pub async fn complete(
        &self,
        id: Uuid,
        attempt: i32,
        output: Option<serde_json::Value>,
        cancelled: bool,
        worker_id: &str,
    ) -> Result<JobRow, JobsError> {
        let worker_id = domain::clip(worker_id, domain::MAX_WORKER_ID_BYTES);
        let call = CompleteCall {
            id,
            attempt,
            output,
            cancelled,
            worker_id,
        };
        match self.completions.call(call).await? {
            Some(job) => {
                count_transition(&job);
                self.delivery.announce(&job);
                Ok(job)
            }
            None => {
                let client = self.pool.get().await?;
                Err(self.deadline_refusal(&client, id, attempt).await)
            }
        }
    }

    /// One statement for a batch of CompleteJob calls. Only the first call
    /// for a job's attempt takes part: a duplicate in the same batch is
    /// refused as it would be right after it. Calls for other attempts of
    /// the same job take part too: at most one of them is the running attempt.
    async fn complete_batch(&self, calls: Vec<CompleteCall>) -> Vec<Applied> {
        let mut seen = HashSet::new();
        let distinct: Vec<store::Completion<'_>> = calls
            .iter()
            .filter(|c| seen.insert((c.id, c.attempt)))
            .map(|c| store::Completion {
                id: c.id,
                attempt: c.attempt,
                output: c.output.as_ref(),
                cancelled: c.cancelled,
                worker_id: &c.worker_id,
            })
            .collect();
        let completed = async {
            let client = self.pool.get().await?;
            store::complete_jobs(&client, &distinct).await
        }
        .await;
        match completed {
            Ok(jobs) => {
                let mut by_id: HashMap<Uuid, JobRow> =
                    jobs.into_iter().map(|j| (j.id, j)).collect();
                calls
                    .iter()
                    .map(|c| match by_id.get(&c.id) {
                        Some(job) if job.attempt == c.attempt => Ok(by_id.remove(&c.id)),
                        _ => Ok(None),
                    })
                    .collect()
            }
            Err(e) => calls.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Running attempt `attempt` failed: retried after a backoff, or failed
    /// (cancelled when cancellation was requested).
    pub async fn fail(
        &self,
        id: Uuid,
        attempt: i32,
        error: &str,
        retryable: bool,
        worker_id: &str,
    ) -> Result<JobRow, JobsError> {
        let worker_id = domain::clip(worker_id, domain::MAX_WORKER_ID_BYTES);
        let error = domain::clip(error, domain::MAX_ERROR_BYTES);
        let delay = domain::retry_delay(attempt, self.settings.retry_base, self.settings.retry_max);
        let client = self.pool.get().await?;
        match store::fail_job(&client, id, attempt, &error, retryable, delay, &worker_id).await? {
            Some(job) => {
                count_transition(&job);
                self.delivery.announce(&job);
                if job.status == JobState::Queued && delay.is_zero() {
                    self.jobs_due.notify_waiters();
                }
                Ok(job)
            }
            None => Err(self.attempt_refusal(&client, id, attempt).await),
        }
    }

    async fn attempt_refusal(
        &self,
        client: &deadpool_postgres::Client,
        id: Uuid,
        attempt: i32,
    ) -> JobsError {
        match store::job(client, id).await {
            Ok(Some(job)) => {
                JobsError::WrongState(domain::attempt_refusal(job.status, job.attempt, attempt))
            }
            Ok(None) => JobsError::NotFound,
            Err(e) => e,
        }
    }
}

/// The rows of `calls`, for one insert statement.
fn new_rows(calls: &[CreateCall], default_schedule_timeout: Duration) -> Vec<store::NewRow<'_>> {
    calls
        .iter()
        .flat_map(|c| {
            c.jobs.iter().map(|(id, job)| store::NewRow {
                id: *id,
                user_id: c.user_id,
                job,
                schedule_timeout: job.schedule_timeout.unwrap_or(default_schedule_timeout),
                traceparent: c.traceparent.as_deref(),
            })
        })
        .collect()
}

/// Counts the transition that left `job` in its status (metrics).
fn count_transition(job: &JobRow) {
    let transition = match job.status {
        JobState::Queued => "retried",
        JobState::Running => "started",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    };
    keel_shared::metrics::job_transition(transition, &job.kind);
}

/// CancelJob's transition on `client` (a transaction when the caller records
/// more with it), without what follows it ([`Jobs::cancelled`]). Returns the
/// job and whether it changed.
pub(crate) async fn cancel_on(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<(JobRow, bool), JobsError> {
    for _ in 0..CANCEL_TRIES {
        let job = store::user_job(client, user_id, id)
            .await?
            .ok_or(JobsError::NotFound)?;
        let changed = match job.status {
            JobState::Queued => store::cancel_queued(client, user_id, id).await?,
            JobState::Running if job.cancel_requested => return Ok((job, false)),
            JobState::Running => store::request_cancel(client, user_id, id).await?,
            finished => {
                return Err(JobsError::WrongState(format!(
                    "job already {}",
                    finished.as_str()
                )));
            }
        };
        if let Some(job) = changed {
            return Ok((job, true));
        }
        // It moved between our read and our update: look again.
    }
    Err(JobsError::Api(ApiError::Aborted(
        "the job kept changing, retry".into(),
    )))
}

/// RetryJob's transition on `client`, without what follows it ([`Jobs::retried`]).
pub(crate) async fn retry_on(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<JobRow, JobsError> {
    if let Some(job) = store::retry_job(client, user_id, id, PUBLISH_GRACE).await? {
        return Ok(job);
    }
    let job = store::user_job(client, user_id, id)
        .await?
        .ok_or(JobsError::NotFound)?;
    Err(JobsError::WrongState(domain::retry_refusal(job.status)))
}

/// DeleteJob on `client`: the finished job goes with its history.
pub(crate) async fn delete_on(
    client: &impl GenericClient,
    user_id: Uuid,
    id: Uuid,
) -> Result<(), JobsError> {
    if store::delete_finished(client, user_id, id).await? {
        return Ok(());
    }
    let job = store::user_job(client, user_id, id)
        .await?
        .ok_or(JobsError::NotFound)?;
    Err(JobsError::WrongState(domain::delete_refusal(job.status)))
}
