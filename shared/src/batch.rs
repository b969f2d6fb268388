//! Group commit: calls that queue up while one batch is in flight run
//! together as the next batch (one statement and commit, or one RPC), each
//! with its own reply. Nothing waits for more calls, so a lone call adds no latency.

use std::future::Future;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

type Reply<O, E> = oneshot::Sender<Result<O, E>>;

/// The queue of calls waiting for their batch.
pub type Queue<I, O, E> = mpsc::Receiver<(I, Reply<O, E>)>;

/// A call's batcher has stopped (shutdown) before answering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shutting down: the call was not made")]
pub struct Stopped;

impl From<Stopped> for tonic::Status {
    fn from(e: Stopped) -> Self {
        tonic::Status::unavailable(e.to_string())
    }
}

/// The callers' side of one batched operation.
pub struct Batcher<I, O, E> {
    queue: mpsc::Sender<(I, Reply<O, E>)>,
}

impl<I, O, E: From<Stopped>> Batcher<I, O, E> {
    /// At most `capacity` calls wait; further callers wait for room.
    pub fn new(capacity: usize) -> (Self, Queue<I, O, E>) {
        let (queue, rx) = mpsc::channel(capacity);
        (Self { queue }, rx)
    }

    /// Queues `item` for the next batch and waits for its outcome.
    pub async fn call(&self, item: I) -> Result<O, E> {
        let (reply, outcome) = oneshot::channel();
        self.queue.send((item, reply)).await.map_err(|_| Stopped)?;
        outcome.await.map_err(|_| Stopped)?
    }
}

/// Runs queued calls in batches of up to `max`, at most `in_flight` batches
/// at a time, until `shutdown`; batches already started still answer their
/// callers. `run_batch` gets the items in queue order and returns one outcome
/// per item, in order. Nothing waits for more calls: a batch is whatever
/// queued up meanwhile.
pub async fn run<I, O, E, F, Fut>(
    mut queue: Queue<I, O, E>,
    max: usize,
    in_flight: usize,
    shutdown: CancellationToken,
    mut run_batch: F,
) where
    F: FnMut(Vec<I>) -> Fut,
    Fut: Future<Output = Vec<Result<O, E>>>,
{
    let mut running = FuturesUnordered::new();
    let mut calls = Vec::with_capacity(max);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = running.next() => continue,
            n = queue.recv_many(&mut calls, max), if running.len() < in_flight.max(1) => {
                if n == 0 {
                    break;
                }
            }
        }
        let (items, replies): (Vec<I>, Vec<Reply<O, E>>) = calls.drain(..).unzip();
        let batch = run_batch(items);
        running.push(async move {
            let outcomes = batch.await;
            debug_assert_eq!(outcomes.len(), replies.len());
            // A caller that gave up meanwhile has dropped its receiver: nothing to do.
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        });
    }
    while running.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    #[derive(Debug)]
    enum TestError {
        Odd,
        Stopped,
    }

    impl From<Stopped> for TestError {
        fn from(_: Stopped) -> Self {
            TestError::Stopped
        }
    }

    fn outcome(i: u32) -> Result<u32, TestError> {
        if i.is_multiple_of(2) {
            Ok(i * 10)
        } else {
            Err(TestError::Odd)
        }
    }

    #[tokio::test]
    async fn each_caller_gets_its_own_outcome_from_coalesced_batches() {
        let (batcher, queue) = Batcher::<u32, u32, TestError>::new(64);
        let batcher = Arc::new(batcher);
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let shutdown = CancellationToken::new();
        let (seen, r, m) = (sizes.clone(), running.clone(), most.clone());
        let task = tokio::spawn(run(
            queue,
            8,
            2,
            shutdown.clone(),
            move |items: Vec<u32>| {
                seen.lock().unwrap().push(items.len());
                let (r, m) = (r.clone(), m.clone());
                async move {
                    m.fetch_max(r.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    items.into_iter().map(outcome).collect()
                }
            },
        ));
        let calls: Vec<_> = (0..40u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { (i, b.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, got) = call.await.unwrap();
            match (got, outcome(i)) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(TestError::Odd), Err(_)) => {}
                (got, _) => panic!("call {i}: {got:?}"),
            }
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|&n| (1..=8).contains(&n)), "{sizes:?}");
        assert!(sizes.len() < 40, "nothing coalesced: {sizes:?}");
        assert_eq!(most.load(Ordering::SeqCst), 2, "batches in flight");

        shutdown.cancel();
        task.await.unwrap();
        let err = batcher.call(1).await.unwrap_err();
        assert!(matches!(err, TestError::Stopped));
    }

    #[tokio::test]
    async fn a_batch_under_way_at_shutdown_still_answers() {
        let (batcher, queue) = Batcher::<u32, u32, TestError>::new(4);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(run(
            queue,
            8,
            1,
            shutdown.clone(),
            move |items: Vec<u32>| {
                stop.cancel();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    items.into_iter().map(outcome).collect()
                }
            },
        ));
        assert_eq!(batcher.call(2).await.unwrap(), 20);
        task.await.unwrap();
    }
}
