//! WatchJob: join the job's announcements first (one shared pub/sub
//! connection per process, see subscriptions.rs), then read and send the
//! current state, then forward each newer state until a terminal one.
//! Postgres is re-read periodically too, so a lost announcement (or Redis
//! being down) only delays an update, never hangs the stream.

use std::sync::Arc;

use futures::Stream;
use keel_proto::jobs::v1::WatchJobResponse;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::convert::job_to_proto;
use crate::error::JobsError;
use crate::service::Jobs;
use crate::store::JobRow;
use crate::subscriptions::{Membership, Subscriptions, Update};

/// What a watcher's channel carries: boxed, because the channel allocates
/// its slots 32 at a time whatever its capacity, and one response is 384
/// bytes: a 12 KiB block per open stream. Boxed, 10,000 watchers held
/// keel-jobs at 156 MiB instead of 210 (BENCHMARKS.md, "WatchJob fan-out").
type Item = Result<Box<WatchJobResponse>, Status>;
const _: () = assert!(std::mem::size_of::<Item>() <= 16);

type Sink = mpsc::Sender<Item>;

pub(crate) async fn watch(
    jobs: Arc<Jobs>,
    subscriptions: Arc<Subscriptions>,
    user_id: Uuid,
    id: Uuid,
    shutdown: CancellationToken,
) -> Result<impl Stream<Item = Result<WatchJobResponse, Status>> + Send + 'static, JobsError> {
    // Joining (subscribed) before the first read means no transition can
    // slip between them. It takes one of the process's watcher slots.
    let membership = subscriptions.join(id).await?;
    let current = jobs.get(user_id, id).await?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(forward(jobs, membership, user_id, current, tx, shutdown));
    Ok(ReceiverStream::new(rx).map(|item| item.map(|response| *response)))
}

async fn forward(
    jobs: Arc<Jobs>,
    mut membership: Membership,
    user_id: Uuid,
    current: JobRow,
    tx: Sink,
    shutdown: CancellationToken,
) {
    let mut last_version = current.version;
    if !send(&tx, &current).await || current.status.is_terminal() {
        return;
    }
    let mut poll = tokio::time::interval(jobs.watch_poll());
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await; // the first tick is immediate
    // False once the announcements ended (never while the membership lives).
    let mut announced = true;
    loop {
        let next = async {
            if announced {
                membership.updates.recv().await
            } else {
                std::future::pending().await
            }
        };
        // Biased: an announcement already received wins over a re-read, so an
        // intermediate state is not skipped for a later one.
        let step = tokio::select! {
            biased;
            _ = tx.closed() => return,
            _ = shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("server shutting down"))).await;
                return;
            }
            update = next => match update {
                Ok(Update::Job(update)) => {
                    let (version, job) = &*update;
                    Step::Update(*version, Box::new(job.clone()))
                }
                // Announcements were missed (a reconnection, or this watcher fell behind).
                Ok(Update::Resync) | Err(RecvError::Lagged(_)) => {
                    reread(&jobs, user_id, current.id, &tx).await
                }
                Err(RecvError::Closed) => {
                    announced = false;
                    reread(&jobs, user_id, current.id, &tx).await
                }
            },
            _ = poll.tick() => reread(&jobs, user_id, current.id, &tx).await,
        };
        let (version, job) = match step {
            Step::Update(version, job) => (version, job),
            Step::End => return,
        };
        if version <= last_version {
            continue;
        }
        last_version = version;
        let terminal = is_terminal(&job);
        if tx
            .send(Ok(Box::new(WatchJobResponse { job: Some(*job) })))
            .await
            .is_err()
            || terminal
        {
            return;
        }
    }
}

enum Step {
    /// A state with its version (maybe one already sent).
    Update(i64, Box<keel_proto::jobs::v1::Job>),
    /// The stream is over (an error was sent, or the client left).
    End,
}

fn is_terminal(job: &keel_proto::jobs::v1::Job) -> bool {
    use keel_proto::jobs::v1::JobStatus;
    matches!(
        job.status(),
        JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
    )
}

/// The job as Postgres has it now; on an error the stream gets it and ends.
async fn reread(jobs: &Jobs, user_id: Uuid, id: Uuid, tx: &Sink) -> Step {
    match jobs.get(user_id, id).await {
        Ok(job) => Step::Update(job.version, Box::new(job_to_proto(&job))),
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            Step::End
        }
    }
}

async fn send(tx: &Sink, job: &JobRow) -> bool {
    tx.send(Ok(Box::new(WatchJobResponse {
        job: Some(job_to_proto(job)),
    })))
    .await
    .is_ok()
}
