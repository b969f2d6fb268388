//! StartJob and CompleteJob calls go out together: the calls that queue up
//! while one RPC is out travel as one StartJobs / CompleteJobs call (a lone
//! call stays a plain StartJob / CompleteJob). A jobs service without the
//! batched RPCs (an older version) gets single calls.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use keel_proto::jobs::v1::{
    CompleteJobRequest, CompleteJobResponse, CompleteJobsRequest, ItemError, StartJobRequest,
    StartJobResponse, StartJobsRequest, complete_job_result, start_job_result,
};
use keel_shared::batch::{self, Batcher};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{Instrument, Span};

use crate::client::JobsClient;

/// Most items in one batched call.
const MAX_ITEMS: usize = 256;
/// Batched calls of one kind out at once.
const IN_FLIGHT: usize = 2;
/// Calls waiting for their batch; beyond this callers wait for room.
const QUEUE: usize = 4096;
/// After the jobs service answered UNIMPLEMENTED, how long to send single
/// calls before trying the batched RPCs again (it may have been upgraded).
const SINGLE_CALLS_FOR: Duration = Duration::from_secs(60);

/// A call waiting for its batch, with the span of the job it belongs to: a
/// call sent on its own continues that job's trace, a batched call links to it.
type Call<R> = (R, Span);

/// The worker's StartJob and CompleteJob calls, batched. The batching tasks
/// end when this is dropped.
pub(crate) struct Transitions {
    starts: Batcher<Call<StartJobRequest>, StartJobResponse, Status>,
    completions: Batcher<Call<CompleteJobRequest>, CompleteJobResponse, Status>,
}

impl Transitions {
    /// Spawns the batching tasks.
    pub(crate) fn spawn(client: JobsClient) -> Self {
        let rpc = Arc::new(Rpc {
            client,
            single_until: Mutex::new(None),
        });
        let (starts, start_queue) = Batcher::new(QUEUE);
        let (completions, complete_queue) = Batcher::new(QUEUE);
        // Not cancelled: each task ends when its Batcher (in `self`) is dropped.
        let forever = CancellationToken::new();
        let r = rpc.clone();
        tokio::spawn(batch::run(
            start_queue,
            MAX_ITEMS,
            IN_FLIGHT,
            forever.clone(),
            move |calls| {
                let r = r.clone();
                async move { r.start(calls).await }
            },
        ));
        tokio::spawn(batch::run(
            complete_queue,
            MAX_ITEMS,
            IN_FLIGHT,
            forever,
            move |calls| {
                let r = rpc.clone();
                async move { r.complete(calls).await }
            },
        ));
        Self {
            starts,
            completions,
        }
    }

    pub(crate) async fn start(&self, req: StartJobRequest) -> Result<StartJobResponse, Status> {
        self.starts.call((req, Span::current())).await
    }

    pub(crate) async fn complete(
        &self,
        req: CompleteJobRequest,
    ) -> Result<CompleteJobResponse, Status> {
        self.completions.call((req, Span::current())).await
    }
}

struct Rpc {
    client: JobsClient,
    /// Set when the jobs service answered a batched call UNIMPLEMENTED.
    single_until: Mutex<Option<Instant>>,
}

impl Rpc {
    async fn start(
        &self,
        calls: Vec<Call<StartJobRequest>>,
    ) -> Vec<Result<StartJobResponse, Status>> {
        if calls.len() == 1 || !self.batched() {
            return self
                .one_by_one(calls, |mut c, req| async move {
                    c.start_job(req).await.map(|r| r.into_inner())
                })
                .await;
        }
        let n = calls.len();
        let span = batch_span("keel.worker/StartJobs", &calls);
        let requests = calls.into_iter().map(|(req, _)| req).collect();
        let answer = self
            .client
            .clone()
            .start_jobs(StartJobsRequest { requests })
            .instrument(span)
            .await;
        match answer {
            Ok(answer) => per_item(n, answer.into_inner().results, |r| match r.outcome {
                Some(start_job_result::Outcome::Started(started)) => Ok(started),
                Some(start_job_result::Outcome::Error(e)) => Err(item_status(e)),
                None => Err(Status::internal("StartJobs: a result without an outcome")),
            }),
            Err(status) => self.refused_batch(n, status),
        }
    }

    async fn complete(
        &self,
        calls: Vec<Call<CompleteJobRequest>>,
    ) -> Vec<Result<CompleteJobResponse, Status>> {
        if calls.len() == 1 || !self.batched() {
            return self
                .one_by_one(calls, |mut c, req| async move {
                    c.complete_job(req).await.map(|r| r.into_inner())
                })
                .await;
        }
        let n = calls.len();
        let span = batch_span("keel.worker/CompleteJobs", &calls);
        let requests = calls.into_iter().map(|(req, _)| req).collect();
        let answer = self
            .client
            .clone()
            .complete_jobs(CompleteJobsRequest { requests })
            .instrument(span)
            .await;
        match answer {
            Ok(answer) => per_item(n, answer.into_inner().results, |r| match r.outcome {
                Some(complete_job_result::Outcome::Completed(done)) => Ok(done),
                Some(complete_job_result::Outcome::Error(e)) => Err(item_status(e)),
                None => Err(Status::internal(
                    "CompleteJobs: a result without an outcome",
                )),
            }),
            Err(status) => self.refused_batch(n, status),
        }
    }

    /// Each call on its own, concurrently, in its job's span.
    async fn one_by_one<R, T, F, Fut>(&self, calls: Vec<Call<R>>, f: F) -> Vec<Result<T, Status>>
    where
        F: Fn(JobsClient, R) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        join_all(
            calls
                .into_iter()
                .map(|(req, span)| f(self.client.clone(), req).instrument(span)),
        )
        .await
    }

    fn batched(&self) -> bool {
        match *self.single_until.lock().expect("single_until") {
            Some(until) => Instant::now() >= until,
            None => true,
        }
    }

    /// The whole batched call failed: every item gets its status. An older
    /// jobs service (UNIMPLEMENTED) gets single calls from now on; the items
    /// are answered UNAVAILABLE, so their callers retry them that way.
    fn refused_batch<T>(&self, n: usize, status: Status) -> Vec<Result<T, Status>> {
        let status = if status.code() == Code::Unimplemented {
            tracing::warn!(
                message = status.message(),
                "the jobs service has no batched transitions: sending single calls"
            );
            *self.single_until.lock().expect("single_until") =
                Some(Instant::now() + SINGLE_CALLS_FOR);
            Status::unavailable("the jobs service has no batched transitions; retry")
        } else {
            status
        };
        (0..n).map(|_| Err(status.clone())).collect()
    }
}

/// The span of a batched call, linked to the span of each job in it (a call
/// for many jobs cannot be a child of each job's trace).
fn batch_span<R>(name: &'static str, calls: &[Call<R>]) -> Span {
    let span = tracing::info_span!("transitions", otel.name = name, otel.kind = "client");
    keel_shared::telemetry::link_to(&span, calls.iter().map(|(_, member)| member));
    span
}

/// One outcome per item, in order; an answer with the wrong number of
/// results fails every item (INTERNAL, retried by the caller).
fn per_item<R, T>(
    n: usize,
    results: Vec<R>,
    f: impl FnMut(R) -> Result<T, Status>,
) -> Vec<Result<T, Status>> {
    if results.len() != n {
        let status = Status::internal(format!(
            "the jobs service answered {} results for {n} requests",
            results.len()
        ));
        return (0..n).map(|_| Err(status.clone())).collect();
    }
    results.into_iter().map(f).collect()
}

fn item_status(e: ItemError) -> Status {
    match Code::from_i32(e.code) {
        Code::Ok => Status::internal(format!("an item error with code OK: {}", e.message)),
        code => Status::new(code, e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_errors_keep_their_code_and_message() {
        let s = item_status(ItemError {
            code: Code::FailedPrecondition as i32,
            message: "job already succeeded".into(),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "job already succeeded");
        assert_eq!(item_status(ItemError::default()).code(), Code::Internal);
        let unknown = item_status(ItemError {
            code: 99,
            message: String::new(),
        });
        assert_eq!(unknown.code(), Code::Unknown);
    }

    #[test]
    fn a_short_answer_fails_every_item() {
        let got = per_item(3, vec![1, 2], Ok::<i32, Status>);
        assert_eq!(got.len(), 3);
        assert!(
            got.iter()
                .all(|r| r.as_ref().unwrap_err().code() == Code::Internal)
        );
        let got = per_item(2, vec![1, 2], Ok::<i32, Status>);
        assert_eq!(
            got.into_iter().map(|r| r.unwrap()).collect::<Vec<_>>(),
            [1, 2]
        );
    }
}
