//! WatchJob: subscribe to the job's announcements first, then read and send
//! the current state, then forward each newer state until a terminal one.
//! Postgres is re-read periodically too, so a lost announcement (or Redis
//! being down) only delays an update, never hangs the stream.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_proto::jobs::v1::WatchJobResponse;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::delivery::decode_announcement;
use crate::error::JobsError;
use crate::grpc::job_to_proto;
use crate::service::Jobs;
use crate::store::{self, JobRow};

/// Longest we wait for Redis to accept the subscription before polling instead.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

type Sink = mpsc::Sender<Result<WatchJobResponse, Status>>;

pub async fn watch(
    jobs: Arc<Jobs>,
    redis: Option<redis::Client>,
    user_id: Uuid,
    id: Uuid,
    shutdown: CancellationToken,
) -> Result<mpsc::Receiver<Result<WatchJobResponse, Status>>, JobsError> {
    let channel = jobs.delivery.redis_config().job_updates_channel(&id);
    // Subscribing before the first read means no transition can slip between them.
    let subscription = match redis {
        Some(client) => subscribe(client, channel).await,
        None => None,
    };
    let current = jobs.get(user_id, id).await?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(forward(jobs, subscription, user_id, current, tx, shutdown));
    Ok(rx)
}

struct Subscription {
    // Held so the connection stays subscribed.
    _sink: redis::aio::PubSubSink,
    messages: redis::aio::PubSubStream,
}

async fn subscribe(client: redis::Client, channel: String) -> Option<Subscription> {
    let attempt = async {
        let pubsub = client.get_async_pubsub().await?;
        let (mut sink, messages) = pubsub.split();
        sink.subscribe(&channel).await?;
        Ok::<_, redis::RedisError>(Subscription {
            _sink: sink,
            messages,
        })
    };
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, attempt).await {
        Ok(Ok(sub)) => Some(sub),
        _ => {
            tracing::debug!("cannot subscribe to job updates; WatchJob polls Postgres instead");
            None
        }
    }
}

async fn forward(
    jobs: Arc<Jobs>,
    mut subscription: Option<Subscription>,
    user_id: Uuid,
    current: JobRow,
    tx: Sink,
    shutdown: CancellationToken,
) {
    let mut last_version = current.version;
    if !send(&tx, &current).await || current.status.is_terminal() {
        return;
    }
    let mut poll = tokio::time::interval(jobs.settings.watch_poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await; // the first tick is immediate
    loop {
        let next = async {
            match subscription.as_mut() {
                Some(s) => s.messages.next().await,
                None => std::future::pending().await,
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
            message = next => match message {
                Some(msg) => match decode_announcement(msg.get_payload_bytes()) {
                    Some((version, job)) => Step::Update(version, Box::new(job)),
                    None => reread(&jobs, user_id, current.id, &tx).await,
                },
                None => {
                    // The subscription dropped (Redis went away): poll from now on.
                    subscription = None;
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
            .send(Ok(WatchJobResponse { job: Some(*job) }))
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
    let read = async {
        let client = jobs.pool.get().await?;
        store::user_job(&client, user_id, id)
            .await?
            .ok_or(JobsError::NotFound)
    };
    match read.await {
        Ok(job) => Step::Update(job.version, Box::new(job_to_proto(&job))),
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            Step::End
        }
    }
}

async fn send(tx: &Sink, job: &JobRow) -> bool {
    tx.send(Ok(WatchJobResponse {
        job: Some(job_to_proto(job)),
    }))
    .await
    .is_ok()
}
