//! The consumer: reads new messages, takes over those of dead consumers,
//! keeps its own pending messages fresh, trims the stream, runs each message
//! in a task of its own under the concurrency limit, and drains on shutdown.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_shared::queue::ANNOUNCE_KINDS_EVERY;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::{AckQueue, RETRY, Worker};
use crate::stream::{Message, MessageKey, StreamError};
use crate::{dead_letter, runner};

/// Most messages asked for in one read or claim.
const BATCH: usize = 32;
/// Most messages acknowledged in one XACK.
const ACK_BATCH: usize = 512;
/// Once the grace period is over and handlers are cancelled, how long the
/// worker keeps trying to record their outcome before it leaves them to the
/// jobs service's lease expiry.
const REPORT_WINDOW: Duration = Duration::from_secs(10);

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

/// Runs the consumer until `worker.shutdown`, then drains.
pub(crate) async fn run(worker: Arc<Worker>, ack_queue: AckQueue, settings: Settings) {
    tracing::info!(
        consumer = %worker.worker_id,
        concurrency = settings.concurrency,
        "worker consuming"
    );
    let shutdown = worker.shutdown.clone();
    let mut failures = 0;
    while let Err(e) = worker.stream.ensure_group().await {
        tracing::warn!(error = %e, "cannot create the consumer group yet; retrying");
        if !pause(&shutdown, RETRY.delay(failures)).await {
            return;
        }
        failures += 1;
    }

    let slots = Arc::new(Slots {
        worker: worker.clone(),
        tracker: TaskTracker::new(),
        permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
        in_flight: Mutex::new(HashSet::new()),
    });
    let done = CancellationToken::new();
    let keepalive = tokio::spawn(keepalive_loop(
        slots.clone(),
        touch_interval(settings.claim_idle, worker.heartbeat_interval),
        done.clone(),
    ));
    let trim = tokio::spawn(trim_loop(worker.clone(), settings.clone(), done.clone()));
    let acker = tokio::spawn(ack_loop(worker.clone(), ack_queue, done.clone()));
    tokio::join!(read_loop(&slots), claim_loop(&slots, &settings));

    slots.tracker.close();
    let running = slots.tracker.len();
    if running > 0 {
        tracing::info!(
            running,
            grace = ?settings.job_grace,
            "shutting down: letting running jobs finish"
        );
    }
    if tokio::time::timeout(settings.job_grace, slots.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = slots.tracker.len(),
            "grace period over: cancelling running jobs and handing them back"
        );
        worker.hard_stop.cancel();
        if tokio::time::timeout(REPORT_WINDOW, slots.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("could not record every outcome; lease expiry will recover those jobs");
            worker.abandon.cancel();
            // A handler stuck in blocking code cannot be aborted: do not wait for it forever.
            if tokio::time::timeout(REPORT_WINDOW, slots.tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    running = slots.tracker.len(),
                    "handlers still running after cancellation; exiting without them"
                );
            }
        }
    }
    done.cancel();
    let _ = tokio::join!(keepalive, trim);
    let _ = acker.await;
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

/// The worker's job slots: at most `concurrency` messages run at once, each
/// in a task of its own.
struct Slots {
    worker: Arc<Worker>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    /// The messages this worker is working on.
    in_flight: Mutex<HashSet<MessageKey>>,
}

enum Work {
    Run,
    DeadLetter { deliveries: u64 },
}

impl Slots {
    /// Waits until a slot is free; then how many are (up to BATCH). None on shutdown.
    async fn free_slots(&self) -> Option<usize> {
        tokio::select! {
            biased;
            _ = self.worker.shutdown.cancelled() => return None,
            p = self.permits.acquire() => drop(p.ok()?),
        };
        Some(self.permits.available_permits().clamp(1, BATCH))
    }

    /// Runs `message` in a task of its own once a slot is free (the reader
    /// and the claimer both fetch only as many as are free, so the wait is
    /// short). False when this worker is already working on that message.
    fn spawn(self: &Arc<Self>, message: Message, work: Work) -> bool {
        if !self
            .in_flight
            .lock()
            .expect("in-flight set")
            .insert(message.key())
        {
            return false;
        }
        let slots = self.clone();
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
                    Work::Run => runner::process(&slots.worker, message).await,
                    Work::DeadLetter { deliveries } => {
                        dead_letter::too_many_deliveries(&slots.worker, message, deliveries).await
                    }
                }
            }
            slots.in_flight.lock().expect("in-flight set").remove(&key);
        });
        true
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

/// XREADGROUP new messages whenever a slot is free, until shutdown.
async fn read_loop(slots: &Arc<Slots>) {
    let worker = &slots.worker;
    let mut reader = None;
    let mut failures = 0;
    while let Some(free) = slots.free_slots().await {
        if reader.is_none() {
            match worker.stream.reader().await {
                Ok(conn) => reader = Some(conn),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to Redis; retrying");
                    failures += 1;
                    if !pause(&worker.shutdown, RETRY.delay(failures)).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let conn = reader.as_mut().expect("connected above");
        match worker.stream.read(conn, free).await {
            Ok(messages) => {
                failures = 0;
                for message in messages {
                    slots.spawn(message, Work::Run);
                }
            }
            Err(StreamError::NoGroup) => {
                tracing::warn!("the consumer group is gone (Redis restarted?): creating it again");
                if let Err(e) = worker.stream.ensure_group().await {
                    tracing::warn!(error = %e, "cannot create the consumer group");
                }
                failures += 1;
                if !pause(&worker.shutdown, RETRY.delay(failures)).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the job stream failed; retrying");
                reader = None;
                failures += 1;
                if !pause(&worker.shutdown, RETRY.delay(failures)).await {
                    return;
                }
            }
        }
    }
}

/// Takes over messages idle longer than the claim idle time (their consumer
/// died, or could not reach the jobs service), dead-lettering those delivered
/// too often.
async fn claim_loop(slots: &Arc<Slots>, settings: &Settings) {
    let worker = &slots.worker;
    let every = claim_interval(settings.claim_idle);
    while pause(&worker.shutdown, every).await {
        for stream in worker.stream.streams() {
            claim_stream(slots, settings, stream).await;
        }
    }
}

/// One XAUTOCLAIM scan of `stream`, as far as free slots allow.
async fn claim_stream(slots: &Arc<Slots>, settings: &Settings, stream: &str) {
    let worker = &slots.worker;
    let mut cursor = "0-0".to_string();
    loop {
        let free = slots.permits.available_permits().min(BATCH);
        if free == 0 {
            break;
        }
        match worker
            .stream
            .autoclaim(stream, settings.claim_idle, &cursor, free)
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
                    slots.spawn(message, work);
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
            Err(StreamError::NoGroup) => {
                if let Err(e) = worker.stream.ensure_group().await {
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
async fn keepalive_loop(slots: Arc<Slots>, every: Duration, done: CancellationToken) {
    let worker = &slots.worker;
    let mut announced = tokio::time::Instant::now();
    while pause(&done, every).await {
        let ids = slots.in_flight_ids();
        if !ids.is_empty()
            && let Err(e) = worker.stream.touch(&ids).await
        {
            tracing::warn!(error = %e, "cannot refresh our pending messages");
        }
        if announced.elapsed() >= ANNOUNCE_KINDS_EVERY.min(every * 2) {
            announced = tokio::time::Instant::now();
            if let Err(e) = worker.stream.announce_kinds().await {
                tracing::warn!(error = %e, "cannot announce the kinds we serve");
            }
        }
    }
}

/// Acknowledges queued messages in batches until `done`, then the rest.
/// A message whose XACK is lost stays pending: another delivery brings it
/// back and StartJob refuses it, so it is acknowledged then.
async fn ack_loop(worker: Arc<Worker>, mut queue: AckQueue, done: CancellationToken) {
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
                    worker.redis_retry("XACK", || worker.stream.ack(chunk)).await;
                }
                return;
            }
        }
        worker
            .redis_retry("XACK", || worker.stream.ack(&batch))
            .await;
    }
}

/// Housekeeping every trim interval until `done`: trimming what every
/// group has read and acknowledged, and removal of long-gone consumers.
async fn trim_loop(worker: Arc<Worker>, settings: Settings, done: CancellationToken) {
    while pause(&done, settings.trim_interval).await {
        match worker.stream.trim().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(trimmed = n, "trimmed the job stream"),
            Err(e) => tracing::warn!(error = %e, "cannot trim the job stream"),
        }
        match worker.stream.prune_consumers(settings.consumer_ttl).await {
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
