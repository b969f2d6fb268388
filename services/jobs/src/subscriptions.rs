//! The jobs process's one Redis pub/sub connection, shared by every WatchJob
//! stream it serves, and the cap on those streams (`KEEL_JOBS_MAX_WATCHERS`).
//!
//! One connection, SUBSCRIBE/UNSUBSCRIBE per watched job, rather than one
//! PSUBSCRIBE to `<prefix>:jobs:updates:*`: every transition of every job is
//! announced, watched or not, so with the pattern each replica would receive
//! the whole system's transitions (times the number of replicas) to throw
//! most away, and Redis would match every PUBLISH against the pattern. With
//! channels a replica receives only the jobs watched on it, and
//! `PUBSUB NUMSUB <channel>` shows who listens to a job. The price is one
//! SUBSCRIBE round trip when a job gets its first watcher here (batched with
//! the others queued meanwhile), an UNSUBSCRIBE when its last one leaves, and
//! subscribing the whole set again after a reconnect; one task owns the
//! connection and applies these in order.
//!
//! Fan-out: a map job id -> [`Entry`] (a broadcast sender, the watcher count,
//! whether the channel is subscribed). Each message is decoded once and
//! broadcast to that job's watchers; the entry goes, and its channel is
//! unsubscribed, when the last watcher leaves.
//!
//! Nothing is missed: a watcher joins, then waits until its job's channel is
//! subscribed, and only then reads Postgres (see watch.rs), so no transition
//! slips between the read and the first announcement. While Redis is down
//! nobody waits: watchers re-read Postgres every `KEEL_JOBS_WATCH_POLL_MS`.
//! When the connection comes back (retried with backoff), every channel is
//! subscribed again and each of those watchers re-reads Postgres once
//! ([`Update::Resync`]), so what was announced meanwhile is not lost.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use keel_proto::jobs::v1::Job;
use keel_shared::ApiError;
use keel_shared::backoff::Backoff;
use keel_shared::config::RedisConfig;
use redis::aio::{PubSub, PubSubSink};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::announcements;
use crate::error::JobsError;

/// Longest a watcher waits for its job's channel to be subscribed before it
/// reads anyway (a later subscription then makes it re-read once).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a connection attempt or a (un)subscription may take before the
/// connection is considered lost.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an idle connection is pinged (a silently dead one is replaced).
const PING_EVERY: Duration = Duration::from_secs(15);
/// Reconnection back-off.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// Announcements buffered per job; a watcher further behind re-reads Postgres.
const UPDATES_PER_JOB: usize = 64;
/// Most channels per SUBSCRIBE / UNSUBSCRIBE.
const CHANNELS_PER_COMMAND: usize = 1024;

/// What a watcher receives.
#[derive(Clone, Debug)]
pub enum Update {
    /// An announced state and its version.
    Job(Arc<(i64, Job)>),
    /// Announcements may have been missed: read the job again.
    Resync,
}

/// The connection's state, as watchers joining see it.
const CONNECTING: u8 = 0;
const UP: u8 = 1;
/// Not connected and not trying right now: nobody waits for a subscription.
const DOWN: u8 = 2;

pub struct Subscriptions {
    redis: RedisConfig,
    /// What precedes the job id in a job's channel name.
    channel_prefix: String,
    jobs: Mutex<HashMap<Uuid, Entry>>,
    /// Jobs whose entry appeared or went: the connection task (un)subscribes them.
    changes: mpsc::UnboundedSender<Uuid>,
    slots: Arc<Semaphore>,
    max_watchers: usize,
    state: AtomicU8,
}

struct Entry {
    updates: broadcast::Sender<Update>,
    watchers: usize,
    /// True once the channel is subscribed, or once its watchers stopped
    /// waiting for that (Redis down, or too slow): a subscription made after
    /// that point sends them a [`Update::Resync`].
    ready: watch::Sender<bool>,
}

/// One watcher's place: holds a slot of the cap and keeps its job's channel
/// subscribed; leaving (drop) frees both.
pub struct Membership {
    subscriptions: Arc<Subscriptions>,
    job: Uuid,
    pub updates: broadcast::Receiver<Update>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.subscriptions.leave(self.job);
    }
}

impl Subscriptions {
    /// The shared state, and the queue [`Subscriptions::run`] drains.
    pub fn new(
        redis: RedisConfig,
        max_watchers: usize,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Uuid>) {
        let max_watchers = max_watchers.clamp(1, Semaphore::MAX_PERMITS);
        let nil = Uuid::nil();
        let channel = redis.job_updates_channel(&nil);
        let channel_prefix = channel
            .strip_suffix(&nil.to_string())
            .expect("a job's channel ends with its id")
            .to_string();
        let (changes, queue) = mpsc::unbounded_channel();
        let subscriptions = Self {
            redis,
            channel_prefix,
            jobs: Mutex::new(HashMap::new()),
            changes,
            slots: Arc::new(Semaphore::new(max_watchers)),
            max_watchers,
            state: AtomicU8::new(CONNECTING),
        };
        (Arc::new(subscriptions), queue)
    }

    /// Becomes a watcher of `job`: takes a slot (RESOURCE_EXHAUSTED when none
    /// is left), then waits until the job's channel is subscribed, unless
    /// Redis is down.
    pub async fn join(self: &Arc<Self>, job: Uuid) -> Result<Membership, JobsError> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::ResourceExhausted(format!(
                "this server already streams its maximum of {} WatchJob calls \
                 (KEEL_JOBS_MAX_WATCHERS); retry later, or poll GetJob",
                self.max_watchers
            ))
        })?;
        let (updates, mut ready, first) = {
            let mut jobs = self.lock();
            let first = !jobs.contains_key(&job);
            let entry = jobs.entry(job).or_insert_with(|| Entry {
                updates: broadcast::channel(UPDATES_PER_JOB).0,
                watchers: 0,
                ready: watch::channel(false).0,
            });
            entry.watchers += 1;
            (entry.updates.subscribe(), entry.ready.subscribe(), first)
        };
        let membership = Membership {
            subscriptions: self.clone(),
            job,
            updates,
            _slot: slot,
        };
        if first {
            let _ = self.changes.send(job);
        }
        // The entry exists before the state is read: if the connection goes
        // down after this, `went_down` marks it ready.
        if self.state.load(Ordering::SeqCst) != DOWN {
            let subscribed = tokio::time::timeout(SUBSCRIBE_TIMEOUT, ready.wait_for(|r| *r)).await;
            if subscribed.is_err() {
                tracing::debug!(job_id = %job, "job updates not subscribed in time; reading anyway");
                if let Some(entry) = self.lock().get(&job) {
                    entry.ready.send_replace(true);
                }
            }
        }
        Ok(membership)
    }

    fn leave(&self, job: Uuid) {
        let mut jobs = self.lock();
        let Some(entry) = jobs.get_mut(&job) else {
            return;
        };
        entry.watchers -= 1;
        if entry.watchers == 0 {
            jobs.remove(&job);
            drop(jobs);
            let _ = self.changes.send(job);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Entry>> {
        // The map stays consistent even if a holder panicked (no await inside).
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No connection: nobody waits for a subscription, and every watcher
    /// re-reads once the connection is back.
    pub fn went_down(&self) {
        self.state.store(DOWN, Ordering::SeqCst);
        for entry in self.lock().values() {
            entry.ready.send_replace(true);
        }
    }

    /// Keeps the one pub/sub connection (reconnecting with backoff) and the
    /// watched jobs' channels subscribed on it, and fans its messages out,
    /// until `shutdown`. `clients` are Redis Cluster nodes (or the one
    /// server): a cluster broadcasts PUBLISH to every node, so any node
    /// will do, and each reconnection tries the next one.
    pub async fn run(
        self: Arc<Self>,
        clients: Vec<redis::Client>,
        mut changes: mpsc::UnboundedReceiver<Uuid>,
        shutdown: CancellationToken,
    ) {
        let mut failures = 0;
        let mut healthy = true;
        let mut attempt = 0usize;
        loop {
            self.state.store(CONNECTING, Ordering::SeqCst);
            let Some(client) = clients.get(attempt % clients.len().max(1)) else {
                return;
            };
            attempt += 1;
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub()) => c,
            };
            let lost = match connected {
                Ok(Ok(pubsub)) => {
                    failures = 0;
                    if !healthy {
                        tracing::info!("WatchJob announcements connected again");
                        healthy = true;
                    }
                    match self.serve(pubsub, &mut changes, &shutdown).await {
                        Some(lost) => lost,
                        None => return,
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connecting to Redis timed out".to_string(),
            };
            if healthy {
                tracing::warn!(error = %lost,
                    "no pub/sub connection for WatchJob; watchers poll Postgres until it is back");
                healthy = false;
            }
            self.went_down();
            // Changes meanwhile need nothing: reconnecting subscribes the whole map.
            let pause = tokio::time::sleep(RECONNECT.delay(failures));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut pause => break,
                    Some(_) = changes.recv() => {}
                }
            }
            failures += 1;
        }
    }

    /// Serves one connection: None at shutdown, else why it was lost.
    async fn serve(
        &self,
        pubsub: PubSub,
        changes: &mut mpsc::UnboundedReceiver<Uuid>,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let (mut sink, mut messages) = pubsub.split();
        let mut subscribed = HashSet::new();
        while changes.try_recv().is_ok() {}
        let all: Vec<Uuid> = self.lock().keys().copied().collect();
        if let Err(e) = self.sync(&mut sink, &mut subscribed, all).await {
            return Some(e);
        }
        self.state.store(UP, Ordering::SeqCst);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await; // the first tick is immediate
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                message = messages.next() => match message {
                    Some(message) => self.dispatch(&message),
                    None => return Some("the connection closed".into()),
                },
                n = changes.recv_many(&mut batch, CHANNELS_PER_COMMAND) => {
                    if n == 0 {
                        return None;
                    }
                    if let Err(e) = self.sync(&mut sink, &mut subscribed, batch.drain(..)).await {
                        return Some(e);
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(REDIS_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(e.to_string()),
                        Err(_) => return Some("PING timed out".into()),
                    }
                }
            }
        }
    }

    /// Brings the subscription of `jobs` in line with the map: subscribes
    /// the watched ones not yet subscribed, unsubscribes the unwatched ones.
    async fn sync(
        &self,
        sink: &mut PubSubSink,
        subscribed: &mut HashSet<Uuid>,
        jobs: impl IntoIterator<Item = Uuid>,
    ) -> Result<(), String> {
        let jobs: HashSet<Uuid> = jobs.into_iter().collect();
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        {
            let map = self.lock();
            for job in jobs {
                match (map.get(&job), subscribed.contains(&job)) {
                    (Some(_), false) => add.push(job),
                    // Left and joined again while subscribed: nothing missed.
                    (Some(entry), true) => {
                        entry.ready.send_replace(true);
                    }
                    (None, true) => remove.push(job),
                    (None, false) => {}
                }
            }
        }
        for chunk in remove.chunks(CHANNELS_PER_COMMAND) {
            let channels = self.channels(chunk);
            timed(sink.unsubscribe(channels)).await?;
            for job in chunk {
                subscribed.remove(job);
            }
        }
        for chunk in add.chunks(CHANNELS_PER_COMMAND) {
            let channels = self.channels(chunk);
            timed(sink.subscribe(channels)).await?;
            subscribed.extend(chunk.iter().copied());
            let map = self.lock();
            for job in chunk {
                // Watchers that stopped waiting may have missed announcements.
                if let Some(entry) = map.get(job)
                    && entry.ready.send_replace(true)
                {
                    let _ = entry.updates.send(Update::Resync);
                }
            }
        }
        Ok(())
    }

    fn channels(&self, jobs: &[Uuid]) -> Vec<String> {
        jobs.iter()
            .map(|job| self.redis.job_updates_channel(job))
            .collect()
    }

    /// Hands a message to its job's watchers (decoded once for all of them).
    fn dispatch(&self, message: &redis::Msg) {
        let Some(job) = message
            .get_channel_name()
            .strip_prefix(&self.channel_prefix)
            .and_then(|id| Uuid::parse_str(id).ok())
        else {
            return;
        };
        let update = match announcements::decode(message.get_payload_bytes()) {
            Some(announced) => Update::Job(Arc::new(announced)),
            None => Update::Resync,
        };
        if let Some(entry) = self.lock().get(&job) {
            let _ = entry.updates.send(update);
        }
    }
}

async fn timed(
    command: impl std::future::Future<Output = redis::RedisResult<()>>,
) -> Result<(), String> {
    match tokio::time::timeout(REDIS_TIMEOUT, command).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("a (un)subscription timed out".into()),
    }
}
