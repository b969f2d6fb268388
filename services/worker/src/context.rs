//! What every task of the worker shares: the stream, the jobs service, the
//! handlers, and the three stages of shutdown.

use std::future::Future;
use std::time::Duration;

use keel_shared::backoff::Backoff;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::JobsClient;
use crate::handler::Registry;
use crate::stream::{JobStream, Message, MessageKey, StreamError};
use crate::transitions::Transitions;

/// How the worker retries Redis and the jobs service: 100 ms doubling up to
/// 5 s, jittered so that many workers do not retry in step.
pub(crate) const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Messages whose outcome is recorded, waiting for their XACK.
pub(crate) type AckQueue = mpsc::UnboundedReceiver<MessageKey>;

pub(crate) struct Worker {
    pub(crate) stream: JobStream,
    pub(crate) client: JobsClient,
    /// StartJob and CompleteJob, batched.
    pub(crate) transitions: Transitions,
    pub(crate) registry: Registry,
    /// Our consumer name, also our worker id for the jobs service.
    pub(crate) worker_id: String,
    pub(crate) heartbeat_interval: Duration,
    /// Stop reading; no retries of StartJob.
    pub(crate) shutdown: CancellationToken,
    /// The grace period is over: cancel running handlers.
    pub(crate) hard_stop: CancellationToken,
    /// Stop retrying to record outcomes.
    pub(crate) abandon: CancellationToken,
    /// Messages to acknowledge: one XACK for all that queue up while the
    /// previous one is out (the consumer's ack loop drains the [`AckQueue`]).
    acks: mpsc::UnboundedSender<MessageKey>,
}

impl Worker {
    pub(crate) fn new(
        stream: JobStream,
        client: JobsClient,
        registry: Registry,
        heartbeat_interval: Duration,
        shutdown: CancellationToken,
    ) -> (Self, AckQueue) {
        let (acks, ack_queue) = mpsc::unbounded_channel();
        let worker = Self {
            worker_id: stream.consumer().to_string(),
            stream,
            transitions: Transitions::spawn(client.clone()),
            client,
            registry,
            heartbeat_interval,
            shutdown,
            hard_stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            acks,
        };
        (worker, ack_queue)
    }

    /// Queues the acknowledgement of a message whose outcome is recorded;
    /// once the ack loop has ended (shutdown), acknowledges directly.
    pub(crate) async fn ack(&self, message: &Message) {
        if self.acks.send(message.key()).is_err() {
            let key = message.key();
            self.redis_retry("XACK", || self.stream.ack(std::slice::from_ref(&key)))
                .await;
        }
    }

    /// A few tries with back-off; a message left pending is not lost (it comes
    /// back through XAUTOCLAIM), so this gives up rather than block.
    pub(crate) async fn redis_retry<F, Fut>(&self, what: &'static str, mut f: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), StreamError>>,
    {
        for failures in 0..5 {
            match f().await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(command = what, error = %e, "redis command failed");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY.delay(failures)) => {}
                        _ = self.abandon.cancelled() => return false,
                    }
                }
            }
        }
        false
    }
}
