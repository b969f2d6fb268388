//! Group commit: calls that queue up while one batch is in flight run
//! together as the next batch (one statement, one commit), each with its own reply.

use std::future::Future;

use keel_shared::ApiError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::JobsError;

type Reply<O> = oneshot::Sender<Result<O, JobsError>>;

/// The queue of calls waiting for their batch.
pub type Queue<I, O> = mpsc::Receiver<(I, Reply<O>)>;

/// The callers' side of one batched operation.
pub struct Batcher<I, O> {
    queue: mpsc::Sender<(I, Reply<O>)>,
}

impl<I, O> Batcher<I, O> {
    /// At most `capacity` calls wait; further callers wait for room.
    pub fn new(capacity: usize) -> (Self, Queue<I, O>) {
        let (queue, rx) = mpsc::channel(capacity);
        (Self { queue }, rx)
    }

    /// Queues `item` for the next batch and waits for its outcome.
    pub async fn call(&self, item: I) -> Result<O, JobsError> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send((item, reply))
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

fn stopped() -> JobsError {
    JobsError::Api(ApiError::Unavailable("the jobs service is stopping".into()))
}

/// Runs queued calls in batches of up to `max` until `shutdown`: `run_batch`
/// gets the items in queue order and returns one outcome per item, in order.
/// Nothing waits for more calls: a batch is whatever queued up meanwhile.
pub async fn run<I, O, F, Fut>(
    mut queue: Queue<I, O>,
    max: usize,
    shutdown: CancellationToken,
    mut run_batch: F,
) where
    F: FnMut(Vec<I>) -> Fut,
    Fut: Future<Output = Vec<Result<O, JobsError>>>,
{
    let mut calls = Vec::with_capacity(max);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            n = queue.recv_many(&mut calls, max) => if n == 0 { return },
        }
        let (items, replies): (Vec<I>, Vec<Reply<O>>) = calls.drain(..).unzip();
        let outcomes = run_batch(items).await;
        debug_assert_eq!(outcomes.len(), replies.len());
        // A caller that gave up meanwhile has dropped its receiver: nothing to do.
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn each_caller_gets_its_own_outcome_and_calls_coalesce() {
        let (batcher, queue) = Batcher::<u32, u32>::new(64);
        let batcher = Arc::new(batcher);
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(queue, 8, shutdown.clone(), move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move {
                tokio::task::yield_now().await;
                items
                    .into_iter()
                    .map(|i| {
                        if i % 2 == 0 {
                            Ok(i * 10)
                        } else {
                            Err(JobsError::NotFound)
                        }
                    })
                    .collect()
            }
        }));
        let calls: Vec<_> = (0..20u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { (i, b.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, outcome) = call.await.unwrap();
            match outcome {
                Ok(v) => assert_eq!((i % 2, v), (0, i * 10)),
                Err(e) => assert!(i % 2 == 1 && matches!(e, JobsError::NotFound)),
            }
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&n| (1..=8).contains(&n)), "{sizes:?}");

        shutdown.cancel();
        task.await.unwrap();
        let err = batcher.call(1).await.unwrap_err();
        assert!(matches!(err, JobsError::Api(ApiError::Unavailable(_))));
    }
}
