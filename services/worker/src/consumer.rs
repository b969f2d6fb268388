//! The consumer: reads new messages, takes over those of dead consumers,
//! keeps its own pending messages fresh, trims the stream, runs each message
//! in a task of its own under the concurrency limit, and drains on shutdown.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_shared::queue::ANNOUNCE_KINDS_EVERY;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::JobsClient;
use crate::handler::Registry;
use crate::runner::backoff;
use crate::stream::{JobStream, Message, MessageKey, StreamError};
use crate::transitions::Transitions;

/// Most messages asked for in one read or claim.
const BATCH: usize = 32;
/// Most messages acknowledged in one XACK.
const ACK_BATCH: usize = 512;
/// Once the grace period is over and handlers are cancelled, how long the
/// worker keeps trying to record their outcome before it leaves them to the
/// jobs service's lease expiry.
const REPORT_WINDOW: Duration = Duration::from_secs(10);

/// What every task of the worker shares.
pub(crate) struct Shared {
    pub stream: JobStream,
    pub client: JobsClient,
    /// StartJob and CompleteJob, batched.
    pub transitions: Transitions,
    pub registry: Registry,
    /// Our consumer name, also our worker id for the jobs service.
    pub worker_id: String,
    pub heartbeat_interval: Duration,
    /// Stop reading; no retries of StartJob.
    pub shutdown: CancellationToken,
    /// The grace period is over: cancel running handlers.
    pub hard_stop: CancellationToken,
    /// Stop retrying to record outcomes.
    pub abandon: CancellationToken,
    /// The messages this worker is working on.
    in_flight: Mutex<HashSet<MessageKey>>,
    /// Messages to acknowledge (their outcome is recorded): one XACK for
    /// all that queue up while the previous one is out (see [`ack_loop`]).
    pub acks: mpsc::UnboundedSender<MessageKey>,
    ack_queue: Mutex<Option<mpsc::UnboundedReceiver<MessageKey>>>,
}

/// Tunables of the consumer loops.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub concurrency: usize,
    pub claim_idle: Duration,
    pub max_deliveries: u64,
    pub trim_interval: Duration,
    pub consumer_ttl: Duration,
    pub job_grace: Duration,
}

impl Shared {
    pub fn new(
        stream: JobStream,
        client: JobsClient,
        registry: Registry,
        heartbeat_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let (acks, ack_queue) = mpsc::unbounded_channel();
        Self {
            worker_id: stream.consumer().to_string(),
            stream,
            transitions: Transitions::spawn(client.clone()),
            client,
            registry,
            heartbeat_interval,
            shutdown,
            hard_stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            in_flight: Mutex::new(HashSet::new()),
            acks,
            ack_queue: Mutex::new(Some(ack_queue)),
        }
    }

    fn in_flight_ids(&self) -> Vec<MessageKey> {
        self.in_flight
            .lock()
            .expect("in-flight set")
            .iter()
            .cloned()
            .collect()
    }
}

/// Runs the consumer until `shared.shutdown`, then drains.
pub(crate) async fn run(shared: Arc<Shared>, settings: Settings) {
    tracing::info!(
        consumer = %shared.worker_id,
        concurrency = settings.concurrency,
        "worker consuming"
    );
    let shutdown = shared.shutdown.clone();
    let mut failures = 0;
    while let Err(e) = shared.stream.ensure_group().await {
        tracing::warn!(error = %e, "cannot create the consumer group yet; retrying");
        if !pause(&shutdown, backoff(failures)).await {
            return;
        }
        failures += 1;
    }

    let jobs = Jobs {
        shared: shared.clone(),
        tracker: TaskTracker::new(),
        permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
    };
    let done = CancellationToken::new();
    let keepalive = tokio::spawn(keepalive_loop(
        shared.clone(),
        touch_interval(settings.claim_idle, shared.heartbeat_interval),
        done.clone(),
    ));
    let trim = tokio::spawn(trim_loop(shared.clone(), settings.clone(), done.clone()));
    let ack_queue = shared.ack_queue.lock().expect("ack queue").take();
    let acker = ack_queue.map(|queue| tokio::spawn(ack_loop(shared.clone(), queue, done.clone())));
    tokio::join!(read_loop(&jobs), claim_loop(&jobs, &settings));

    jobs.tracker.close();
    let running = jobs.tracker.len();
    if running > 0 {
        tracing::info!(
            running,
            grace = ?settings.job_grace,
            "shutting down: letting running jobs finish"
        );
    }
    if tokio::time::timeout(settings.job_grace, jobs.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = jobs.tracker.len(),
            "grace period over: cancelling running jobs and handing them back"
        );
        shared.hard_stop.cancel();
        if tokio::time::timeout(REPORT_WINDOW, jobs.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("could not record every outcome; lease expiry will recover those jobs");
            shared.abandon.cancel();
            // A handler stuck in blocking code cannot be aborted: do not wait for it forever.
            if tokio::time::timeout(REPORT_WINDOW, jobs.tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    running = jobs.tracker.len(),
                    "handlers still running after cancellation; exiting without them"
                );
            }
        }
    }
    done.cancel();
    let _ = tokio::join!(keepalive, trim);
    if let Some(acker) = acker {
        let _ = acker.await;
    }
    tracing::info!("worker stopped");
}

/// Sleeps for `d` unless `token` is cancelled first; false when it was.
async fn pause(token: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Touch our messages often enough that they never look idle to others.
fn touch_interval(claim_idle: Duration, heartbeat: Duration) -> Duration {
    (claim_idle / 3)
        .min(heartbeat)
        .clamp(Duration::from_millis(10), Duration::from_secs(10))
}

/// How often to look for messages of dead consumers.
fn claim_interval(claim_idle: Duration) -> Duration {
    (claim_idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

struct Jobs {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
}

enum Work {
    Run,
    DeadLetter { deliveries: u64 },
}

impl Jobs {
    /// Waits until a slot is free; then how many are (up to BATCH). None on shutdown.
    async fn free_slots(&self) -> Option<usize> {
        tokio::select! {
            biased;
            _ = self.shared.shutdown.cancelled() => return None,
            p = self.permits.acquire() => drop(p.ok()?),
        };
        Some(self.permits.available_permits().clamp(1, BATCH))
    }

    /// Runs `message` in a task of its own once a slot is free (the reader
    /// and the claimer both fetch only as many as are free, so the wait is
    /// short). False when this worker is already working on that message.
    fn spawn(&self, message: Message, work: Work) -> bool {
        if !self
            .shared
            .in_flight
            .lock()
            .expect("in-flight set")
            .insert(message.key())
        {
            return false;
        }
        let shared = self.shared.clone();
        let permits = self.permits.clone();
        // Taken now when free, so that the next read asks for no more than fit.
        let permit = self.permits.clone().try_acquire_owned().ok();
        self.tracker.spawn(async move {
            let key = message.key();
            let permit = match permit {
                Some(p) => Ok(p),
                None => permits.acquire_owned().await,
            };
            if let Ok(_permit) = permit {
                match work {
                    Work::Run => shared.process(message).await,
                    Work::DeadLetter { deliveries } => {
                        shared.dead_letter(message, deliveries).await
                    }
                }
            }
            shared.in_flight.lock().expect("in-flight set").remove(&key);
        });
        true
    }
}

/// XREADGROUP new messages whenever a slot is free, until shutdown.
async fn read_loop(jobs: &Jobs) {
    let shared = &jobs.shared;
    let mut reader = None;
    let mut failures = 0;
    while let Some(slots) = jobs.free_slots().await {
        if reader.is_none() {
            match shared.stream.reader().await {
                Ok(conn) => reader = Some(conn),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to Redis; retrying");
                    failures += 1;
                    if !pause(&shared.shutdown, backoff(failures)).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let conn = reader.as_mut().expect("connected above");
        match shared.stream.read(conn, slots).await {
            Ok(messages) => {
                failures = 0;
                for message in messages {
                    jobs.spawn(message, Work::Run);
                }
            }
            Err(StreamError::NoGroup) => {
                tracing::warn!("the consumer group is gone (Redis restarted?): creating it again");
                if let Err(e) = shared.stream.ensure_group().await {
                    tracing::warn!(error = %e, "cannot create the consumer group");
                }
                failures += 1;
                if !pause(&shared.shutdown, backoff(failures)).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the job stream failed; retrying");
                reader = None;
                failures += 1;
                if !pause(&shared.shutdown, backoff(failures)).await {
                    return;
                }
            }
        }
    }
}

/// Takes over messages idle longer than the claim idle time (their consumer
/// died, or could not reach the jobs service), dead-lettering those delivered
/// too often.
async fn claim_loop(jobs: &Jobs, settings: &Settings) {
    let shared = &jobs.shared;
    let every = claim_interval(settings.claim_idle);
    while pause(&shared.shutdown, every).await {
        for stream in shared.stream.streams() {
            claim_stream(jobs, settings, stream).await;
        }
    }
}

/// One XAUTOCLAIM scan of `stream`, as far as free slots allow.
async fn claim_stream(jobs: &Jobs, settings: &Settings, stream: &str) {
    let shared = &jobs.shared;
    let mut cursor = "0-0".to_string();
    loop {
        let slots = jobs.permits.available_permits().min(BATCH);
        if slots == 0 {
            break;
        }
        match shared
            .stream
            .autoclaim(stream, settings.claim_idle, &cursor, slots)
            .await
        {
            Ok((claimed, next)) => {
                for (message, deliveries) in claimed {
                    tracing::info!(message_id = %message.id, job_id = ?message.job_id, deliveries, "took over an idle message");
                    let work = if deliveries > settings.max_deliveries {
                        Work::DeadLetter { deliveries }
                    } else {
                        Work::Run
                    };
                    jobs.spawn(message, work);
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
            Err(StreamError::NoGroup) => {
                if let Err(e) = shared.stream.ensure_group().await {
                    tracing::warn!(error = %e, "cannot create the consumer group");
                }
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "XAUTOCLAIM failed; trying again later");
                break;
            }
        }
    }
}

/// Until `done`: resets the idle time of the messages we are working on,
/// and announces our kinds (so the jobs service keeps publishing them).
async fn keepalive_loop(shared: Arc<Shared>, every: Duration, done: CancellationToken) {
    let mut announced = tokio::time::Instant::now();
    while pause(&done, every).await {
        let ids = shared.in_flight_ids();
        if !ids.is_empty()
            && let Err(e) = shared.stream.touch(&ids).await
        {
            tracing::warn!(error = %e, "cannot refresh our pending messages");
        }
        if announced.elapsed() >= ANNOUNCE_KINDS_EVERY.min(every * 2) {
            announced = tokio::time::Instant::now();
            if let Err(e) = shared.stream.announce_kinds().await {
                tracing::warn!(error = %e, "cannot announce the kinds we serve");
            }
        }
    }
}

/// Acknowledges queued messages in batches until `done`, then the rest.
/// A message whose XACK is lost stays pending: another delivery brings it
/// back and StartJob refuses it, so it is acknowledged then.
async fn ack_loop(
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<MessageKey>,
    done: CancellationToken,
) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    loop {
        batch.clear();
        tokio::select! {
            biased;
            n = queue.recv_many(&mut batch, ACK_BATCH) => if n == 0 { return },
            _ = done.cancelled() => {
                while let Ok(id) = queue.try_recv() {
                    batch.push(id);
                }
                for chunk in batch.chunks(ACK_BATCH) {
                    shared.redis_retry("XACK", || shared.stream.ack(chunk)).await;
                }
                return;
            }
        }
        shared
            .redis_retry("XACK", || shared.stream.ack(&batch))
            .await;
    }
}

/// Housekeeping every trim interval until `done`: trimming what every
/// group has read and acknowledged, and removal of long-gone consumers.
async fn trim_loop(shared: Arc<Shared>, settings: Settings, done: CancellationToken) {
    while pause(&done, settings.trim_interval).await {
        match shared.stream.trim().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(trimmed = n, "trimmed the job stream"),
            Err(e) => tracing::warn!(error = %e, "cannot trim the job stream"),
        }
        match shared.stream.prune_consumers(settings.consumer_ttl).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed consumers of stopped workers")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot prune consumers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_follow_the_claim_idle_time() {
        let s = Duration::from_secs;
        assert_eq!(touch_interval(s(30), s(10)), s(10));
        assert_eq!(touch_interval(s(3), s(10)), s(1));
        assert_eq!(
            touch_interval(Duration::from_millis(3), s(10)),
            Duration::from_millis(10)
        );
        assert_eq!(claim_interval(s(30)), s(5));
        assert_eq!(claim_interval(s(1)), Duration::from_millis(500));
    }
}
