//! Getting jobs to the workers and transitions to watchers: the outbox relay
//! (Postgres -> Redis stream, nothing lost, re-published while not started),
//! the lease reaper, and the per-job pub/sub announcements.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use keel_shared::ApiError;
use keel_shared::config::RedisConfig;
use keel_shared::queue::{Band, FIELD_JOB_ID, FIELD_TRACEPARENT};
use keel_shared::time::sleep_until;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::announcements;
use crate::domain::JobState;
use crate::error::JobsError;
use crate::fairness::{self, Backlog};
use crate::routing::ServedKinds;
use crate::store::{self, JobRow, Publication};

/// Longest a Redis round trip may hold an outbox transaction or a handler.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Most expired leases reaped per round.
const REAP_BATCH: i64 = 500;
/// Announcements waiting for Redis; beyond this they are dropped (watchers
/// re-read Postgres periodically, so a drop only delays an update).
const ANNOUNCE_QUEUE: usize = 4096;
/// Most announcements sent in one pipeline.
const ANNOUNCE_BATCH: usize = 128;
/// New jobs waiting for their immediate publication; beyond this they are
/// left to the relay (a drop only delays delivery by [`PUBLISH_GRACE`]).
const PUBLISH_QUEUE: usize = 16_384;
/// Most jobs published in one XADD pipeline.
const PUBLISH_BATCH: usize = 500;
/// How long the relay leaves a new job to the immediate publication of the
/// replica that created it. Only a crash of that replica in between, or a
/// dropped publication, makes it step in; a late one publishes twice, which
/// workers tolerate (StartJob refuses a job that is no longer queued).
pub const PUBLISH_GRACE: Duration = Duration::from_secs(2);
/// How long after its XADD a new job's outbox row is marked published. By
/// then most jobs have started and their rows are gone, so the mark writes
/// nothing for them; the rest are marked well before [`PUBLISH_GRACE`] ends.
const MARK_AFTER: Duration = Duration::from_millis(500);

/// A transition to publish: (channel, payload).
pub type Announcement = (String, Vec<u8>);

/// What a relay round did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayRound {
    /// Rows added to streams.
    pub published: usize,
    /// A kind filled its whole batch: another round should follow at once.
    pub more: bool,
}

pub struct Delivery {
    pool: Pool,
    redis: keel_shared::redis::Pool,
    redis_config: RedisConfig,
    /// Streams whose consumer group exists (we create it at id 0, so entries
    /// added before any worker read them are still delivered).
    groups_ready: Mutex<HashSet<String>>,
    /// The kinds stream workers serve: only those are added to streams.
    served: Arc<ServedKinds>,
    /// Keeps each kind's stream short; the rest waits for the relay's turns.
    backlog: Backlog,
    /// First wait before re-publishing a job that has not started.
    redeliver_after: Duration,
    announcements: mpsc::Sender<Announcement>,
    publications: mpsc::Sender<Publication>,
}

/// The queues the background tasks of a [`Delivery`] drain.
pub struct DeliveryQueues {
    pub announcements: mpsc::Receiver<Announcement>,
    pub publications: mpsc::Receiver<Publication>,
}

impl Delivery {
    pub fn new(
        pool: Pool,
        redis: keel_shared::redis::Pool,
        redis_config: RedisConfig,
        redeliver_after: Duration,
        served: Arc<ServedKinds>,
        stream_backlog: i64,
    ) -> (Self, DeliveryQueues) {
        let (announcements, announce_queue) = mpsc::channel(ANNOUNCE_QUEUE);
        let (publications, publish_queue) = mpsc::channel(PUBLISH_QUEUE);
        let backlog = Backlog::new(stream_backlog, redis.clone(), redis_config.clone());
        let delivery = Self {
            pool,
            redis,
            redis_config,
            groups_ready: Mutex::new(HashSet::new()),
            served,
            backlog,
            redeliver_after,
            announcements,
            publications,
        };
        let queues = DeliveryQueues {
            announcements: announce_queue,
            publications: publish_queue,
        };
        (delivery, queues)
    }

    pub fn redis_config(&self) -> &RedisConfig {
        &self.redis_config
    }

    /// Whether streams are kept short (`KEEL_JOBS_STREAM_BACKLOG` > 0): then
    /// a large batch of new jobs is left to the relay's turns at once.
    pub fn streams_bounded(&self) -> bool {
        self.backlog.bounded()
    }

    /// New jobs of `kinds` were committed due now for the relay (not for
    /// the immediate publication): it takes them at its next turn.
    pub fn hand_over<'a>(&self, kinds: impl IntoIterator<Item = &'a str>) {
        self.backlog.hand_over(kinds);
    }

    /// Queues newly committed jobs (due now) for publication as soon as
    /// possible (see [`Delivery::run_publisher`]). Never waits: when the
    /// queue is full the relay publishes them after [`PUBLISH_GRACE`].
    pub fn publish_soon(&self, jobs: impl IntoIterator<Item = Publication>) {
        for job in jobs {
            if self.publications.try_send(job).is_err() {
                tracing::debug!("publication queue full; the relay will deliver");
                return;
            }
        }
    }

    /// Publishes queued new jobs in batches until `shutdown`: one XADD
    /// pipeline for all the jobs that queued up while the previous batch was
    /// out. Their outbox rows are marked published [`MARK_AFTER`] later, in
    /// one (relaxed) statement per round, and at shutdown. Nothing is claimed
    /// first: the relay leaves new rows alone for [`PUBLISH_GRACE`].
    pub async fn run_publisher(
        self: Arc<Self>,
        mut queue: mpsc::Receiver<Publication>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        // Published jobs waiting for their mark, oldest first.
        let mut unmarked: VecDeque<(Instant, Vec<Publication>)> = VecDeque::new();
        loop {
            batch.clear();
            let mark_at = unmarked.front().map(|(at, _)| *at);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = sleep_until(mark_at) => {
                    let now = Instant::now();
                    let mut due = Vec::new();
                    while unmarked.front().is_some_and(|(at, _)| *at <= now) {
                        due.extend(unmarked.pop_front().into_iter().flat_map(|(_, p)| p));
                    }
                    self.mark_published(&due).await;
                    continue;
                }
                n = queue.recv_many(&mut batch, PUBLISH_BATCH) => if n == 0 { break },
            }
            // A kind no stream worker serves is left to the relay (it defers
            // it after the grace) and to ClaimJobs.
            batch.retain(|p| self.served.contains(&p.kind));
            if batch.is_empty() {
                continue;
            }
            // Only as many as fit under the kind's backlog bound; the rest
            // waits in the outbox for the relay, which takes turns between users.
            let (fit, wait) = self.backlog.admit(std::mem::take(&mut batch)).await;
            batch = fit;
            if !wait.is_empty() {
                if let Err(e) = self.hand_to_relay(&wait).await {
                    // They are published by the relay after the grace.
                    tracing::debug!(error = %e, "could not hand the jobs to the relay");
                }
                self.backlog.hand_over(wait.iter().map(|p| p.kind.as_str()));
            }
            if batch.is_empty() {
                continue;
            }
            match self.xadd(&batch).await {
                Ok(()) => {
                    unmarked.push_back((Instant::now() + MARK_AFTER, std::mem::take(&mut batch)))
                }
                Err(e) => {
                    tracing::debug!(error = %e, count = batch.len(),
                        "immediate delivery failed; handing the jobs to the relay");
                    if let Err(e) = self.hand_to_relay(&batch).await {
                        // They are published by the relay after the grace.
                        tracing::debug!(error = %e, "could not hand the jobs to the relay");
                    }
                }
            }
        }
        // Unmarked rows would be published again by the relay.
        let published: Vec<Publication> = unmarked.into_iter().flat_map(|(_, p)| p).collect();
        if !published.is_empty() {
            self.mark_published(&published).await;
        }
    }

    /// Marks published jobs' outbox rows; a failure leaves them to the relay
    /// (published again after the grace, which workers tolerate).
    async fn mark_published(&self, published: &[Publication]) {
        let marked = async {
            let mut client = self.pool.get().await?;
            let tx = store::begin_outbox_bookkeeping(&mut client).await?;
            store::mark_published(&tx, published, self.redeliver_after).await?;
            tx.commit().await?;
            Ok::<_, JobsError>(())
        }
        .await;
        if let Err(e) = marked {
            tracing::debug!(error = %e, count = published.len(), "could not record immediate deliveries");
        }
    }

    async fn hand_to_relay(&self, unpublished: &[Publication]) -> Result<(), JobsError> {
        let mut client = self.pool.get().await?;
        let tx = store::begin_outbox_bookkeeping(&mut client).await?;
        store::hand_to_relay(&tx, unpublished).await?;
        tx.commit().await?;
        Ok(())
    }

    /// One relay round: publishes due outbox rows of served kinds, as many
    /// as each kind's stream has room for (at most `limit` per kind), taking
    /// turns between users; in a `full` round it looks at every served kind
    /// and puts off the rows of kinds no stream worker serves, otherwise
    /// only at the kinds with rows waiting for room.
    ///
    /// Claims rows with FOR UPDATE SKIP LOCKED, XADDs them and marks them
    /// published, all inside one transaction: a crash or a Redis error before
    /// the commit leaves the rows for the next round, and two replicas never
    /// both publish the same row (nor fill the same kind's stream at once).
    /// The commit does not wait for its flush: losing it in a crash only
    /// publishes those rows again, and workers refuse duplicates through
    /// StartJob. Rows of kinds no stream worker serves are put off instead
    /// (still unpublished).
    pub async fn relay_once(&self, limit: i64, full: bool) -> Result<RelayRound, JobsError> {
        let limit = limit.max(1);
        let kinds: Vec<String> = if full {
            self.served.snapshot()
        } else {
            let mut waiting = self.backlog.waiting();
            waiting.retain(|k| self.served.contains(k));
            waiting
        };
        let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
        let rooms = self.backlog.rooms(&kinds, limit).await?;
        let with_room: Vec<(&str, i64)> = kinds
            .iter()
            .filter_map(|k| Some((*k, *rooms.get(*k).filter(|free| **free > 0)?)))
            .collect();
        let mut round = RelayRound::default();
        if with_room.is_empty() && !full {
            return Ok(round);
        }
        let mut client = self.pool.get().await?;
        let tx = store::begin_outbox_bookkeeping(&mut client).await?;
        if !with_room.is_empty() {
            let names: Vec<&str> = with_room.iter().map(|(k, _)| *k).collect();
            let ours = store::fairness::lock_relay_kinds(&tx, &names).await?;
            let (names, rooms): (Vec<&str>, Vec<i64>) = with_room
                .iter()
                .filter(|(k, _)| ours.iter().any(|o| o == k))
                .copied()
                .unzip();
            if !names.is_empty() {
                let claimed = store::fairness::claim_fair(&tx, &names, &rooms).await?;
                if !claimed.is_empty() {
                    self.xadd(&claimed).await?;
                    store::mark_published(&tx, &claimed, self.redeliver_after).await?;
                }
                for (kind, room) in names.iter().zip(&rooms) {
                    let taken = claimed.iter().filter(|p| p.kind == *kind).count() as i64;
                    // A full room: more rows may wait for the next.
                    self.backlog.set_waiting(kind, taken >= *room);
                    round.more |= taken >= limit;
                }
                round.published = claimed.len();
            }
        }
        if full {
            let outboxed = store::fairness::outbox_kinds(&tx).await?;
            let unserved: Vec<&str> = outboxed
                .iter()
                .map(String::as_str)
                .filter(|k| !self.served.contains(k))
                .collect();
            if !unserved.is_empty() {
                let claimed = store::claim_outbox(&tx, &unserved, limit).await?;
                if !claimed.is_empty() {
                    store::defer_unpublished(&tx, &claimed, self.redeliver_after).await?;
                }
                round.more |= claimed.len() as i64 >= limit;
            }
        }
        tx.commit().await?;
        Ok(round)
    }

    /// The stream of the job's kind and priority band.
    fn stream_of(&self, job: &Publication) -> String {
        self.redis_config
            .jobs_band_stream(&job.kind, Band::of(job.priority))
    }

    /// Adds each job to its kind's stream, in one pipeline.
    async fn xadd(&self, jobs: &[Publication]) -> Result<(), ApiError> {
        let result = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut conn = self.redis.get().await?;
            let streams: HashSet<String> = jobs.iter().map(|j| self.stream_of(j)).collect();
            for stream in streams {
                if self.groups_ready.lock().expect("groups").contains(&stream) {
                    continue;
                }
                keel_shared::redis::ensure_group(&mut *conn, &stream).await?;
                self.groups_ready.lock().expect("groups").insert(stream);
            }
            let mut pipe = redis::pipe();
            for job in jobs {
                let cmd = pipe
                    .cmd("XADD")
                    .arg(self.stream_of(job))
                    .arg("*")
                    .arg(FIELD_JOB_ID)
                    .arg(job.job_id.to_string());
                if let Some(tp) = &job.traceparent {
                    cmd.arg(FIELD_TRACEPARENT).arg(tp);
                }
                cmd.ignore();
            }
            pipe.query_async::<()>(&mut *conn).await?;
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(ApiError::Unavailable("redis timed out".into())));
        if result.is_err() {
            // Redis may have restarted empty: make sure the groups exist again.
            self.groups_ready.lock().expect("groups").clear();
        }
        result
    }

    /// Queues a transition for its job's channel. Never waits on Redis: one
    /// task publishes the queue in order (see [`Delivery::run_announcer`]).
    pub fn announce(&self, job: &JobRow) {
        let channel = self.redis_config.job_updates_channel(&job.id);
        if self
            .announcements
            .try_send((channel, announcements::encode(job)))
            .is_err()
        {
            tracing::debug!(job_id = %job.id, "announcement queue full; dropped one");
        }
    }

    /// Publishes queued announcements, in order, until `shutdown`.
    pub async fn run_announcer(
        self: Arc<Self>,
        mut queue: mpsc::Receiver<Announcement>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(ANNOUNCE_BATCH);
        loop {
            batch.clear();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = queue.recv_many(&mut batch, ANNOUNCE_BATCH) => if n == 0 { return },
            }
            let sent = tokio::time::timeout(REDIS_TIMEOUT, async {
                let mut conn = self.redis.get().await.map_err(ApiError::from)?;
                let mut pipe = redis::pipe();
                for (channel, payload) in &batch {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                pipe.query_async::<()>(&mut *conn)
                    .await
                    .map_err(ApiError::from)
            })
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!(count = batch.len(), "could not announce job transitions");
            }
        }
    }

    /// Publishes due outbox rows every `interval` until `shutdown`, and
    /// every [`fairness::WAITING_POLL`] for kinds with rows waiting for
    /// room in their streams (woken at once when rows are handed over).
    pub async fn run_relay(
        self: Arc<Self>,
        interval: Duration,
        batch: i64,
        shutdown: CancellationToken,
    ) {
        let batch = batch.max(1);
        let mut healthy = true;
        let mut last_full: Option<Instant> = None;
        loop {
            let full = last_full.is_none_or(|at| at.elapsed() >= interval);
            if full {
                last_full = Some(Instant::now());
            }
            match self.relay_once(batch, full).await {
                Ok(round) => {
                    if !healthy {
                        tracing::info!("outbox relay delivering again");
                        healthy = true;
                    }
                    if round.more && !shutdown.is_cancelled() {
                        continue; // a backlog: keep draining
                    }
                }
                Err(e) => {
                    if healthy {
                        tracing::warn!(error = %e, "outbox relay cannot deliver; will retry");
                        healthy = false;
                    }
                }
            }
            let next_full = last_full.map_or(Instant::now(), |at| at + interval);
            let next = if healthy && !self.backlog.waiting().is_empty() {
                next_full.min(Instant::now() + fairness::WAITING_POLL)
            } else {
                next_full
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
                _ = self.backlog.woken(), if healthy => {}
            }
        }
    }

    /// Every `interval` until `shutdown`: returns jobs with expired leases
    /// to the queue, fails attempts past their job's timeout as a retryable
    /// FailJob would (`retry` is the backoff's base and cap), and fails
    /// queued jobs past their schedule deadline.
    pub async fn run_reaper(
        self: Arc<Self>,
        interval: Duration,
        retry: (Duration, Duration),
        shutdown: CancellationToken,
    ) {
        loop {
            match self.reap_once(retry).await {
                Ok((reaped, timed_out, unscheduled)) => {
                    for job in &reaped {
                        tracing::info!(job_id = %job.id, attempt = job.attempt,
                            status = job.status.as_str(), "lease expired");
                        count_reaped(job);
                        self.announce(job);
                    }
                    for job in &timed_out {
                        tracing::info!(job_id = %job.id, attempt = job.attempt,
                            status = job.status.as_str(), "attempt timed out");
                        count_timed_out(job);
                        self.announce(job);
                    }
                    for job in &unscheduled {
                        tracing::info!(job_id = %job.id, kind = %job.kind,
                            "no worker took the job within its schedule timeout");
                        keel_shared::metrics::job_transition("failed", &job.kind);
                        self.announce(job);
                    }
                    let most = reaped.len().max(timed_out.len()).max(unscheduled.len());
                    let full = most as i64 == REAP_BATCH;
                    if full && !shutdown.is_cancelled() {
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "lease reaper failed; will retry"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    async fn reap_once(
        &self,
        (retry_base, retry_max): (Duration, Duration),
    ) -> Result<(Vec<JobRow>, Vec<JobRow>, Vec<JobRow>), JobsError> {
        let client = self.pool.get().await?;
        let reaped = store::reap_expired_leases(&client, REAP_BATCH).await?;
        let timed_out = store::fail_timed_out(&client, REAP_BATCH, retry_base, retry_max).await?;
        let unscheduled = store::fail_unscheduled(&client, REAP_BATCH).await?;
        Ok((reaped, timed_out, unscheduled))
    }
}

/// Samples the outbox gauges (metrics); a failure only skips one sample.
pub async fn sample_outbox(pool: &Pool) {
    let stats = match pool.get().await {
        Ok(client) => store::outbox_stats(&client).await,
        Err(e) => Err(e.into()),
    };
    match stats {
        Ok((rows, due, oldest)) => keel_shared::metrics::outbox(rows, due, oldest),
        Err(e) => tracing::debug!(error = %e, "could not sample the outbox"),
    }
}

fn count_reaped(job: &JobRow) {
    let (outcome, transition) = match job.status {
        JobState::Queued => ("queued", "retried"),
        JobState::Cancelled => ("cancelled", "cancelled"),
        _ => ("failed", "failed"),
    };
    keel_shared::metrics::lease_reaped(outcome);
    keel_shared::metrics::job_transition(transition, &job.kind);
}

fn count_timed_out(job: &JobRow) {
    let transition = match job.status {
        JobState::Queued => "retried",
        JobState::Cancelled => "cancelled",
        _ => "failed",
    };
    keel_shared::metrics::job_transition(transition, &job.kind);
}
