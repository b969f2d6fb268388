//! One message, start to finish: StartJob, the handler with heartbeats and
//! cancellation, CompleteJob / FailJob, then XACK (or not, when the outcome
//! could not be recorded). Also the dead-letter path.

use std::any::Any;
use std::future::Future;
use std::time::Duration;

use keel_proto::jobs::v1::{
    CompleteJobRequest, FailJobRequest, HeartbeatRequest, Job, StartJobRequest, StartJobResponse,
};
use keel_shared::time::sleep_until;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

use crate::client::{Answer, classify};
use crate::consumer::Shared;
use crate::handler::{HandlerError, JobContext, Progress};
use crate::stream::Message;

/// After a handler's token is cancelled, how long it gets to return before
/// its task is aborted.
const CANCEL_PATIENCE: Duration = Duration::from_secs(2);
/// Longest error text sent to the jobs service.
const MAX_ERROR_CHARS: usize = 2000;

/// How a call to the jobs service ended, when it did not succeed.
#[derive(Debug)]
enum CallError {
    /// The transition does not apply (already recorded, finished, ...).
    Refused(Status),
    /// The request was rejected as invalid.
    Rejected(Status),
    /// Transient failures until we had to stop trying.
    GaveUp,
}

/// Calls the jobs service, retrying transient failures with backoff until
/// `give_up` is cancelled (always trying at least once).
async fn call<T, F, Fut>(
    give_up: &CancellationToken,
    what: &'static str,
    job: &str,
    mut f: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut failures = 0u32;
    loop {
        match f().await {
            Ok(response) => return Ok(response),
            Err(status) => match classify(&status) {
                Answer::Refused => return Err(CallError::Refused(status)),
                Answer::Rejected => return Err(CallError::Rejected(status)),
                Answer::Transient => {
                    tracing::warn!(
                        job_id = job, call = what, code = ?status.code(), message = status.message(),
                        "jobs service call failed; retrying"
                    );
                    if give_up.is_cancelled() {
                        return Err(CallError::GaveUp);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(failures)) => {}
                        _ = give_up.cancelled() => return Err(CallError::GaveUp),
                    }
                    failures = failures.saturating_add(1);
                }
            },
        }
    }
}

/// 100 ms doubling up to 5 s, plus up to a quarter of jitter so that many
/// workers do not retry in step.
pub(crate) fn backoff(failures: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
    let jitter = (Uuid::new_v4().as_u128() % (base as u128 / 4 + 1)) as u64;
    Duration::from_millis(base + jitter)
}

/// Why a running handler was stopped before it returned on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The job's owner asked to cancel it.
    CancelRequested,
    /// The worker is shutting down and the grace period is over.
    Shutdown,
    /// The jobs service no longer considers this attempt running (its lease
    /// expired and it was handed to someone else, or it was recorded).
    LeaseLost,
}

/// What to tell the jobs service about the attempt.
#[derive(Debug, PartialEq)]
enum Outcome {
    Complete {
        output: Value,
        cancelled: bool,
    },
    Fail {
        error: String,
        retryable: bool,
    },
    /// Nothing: the attempt is not ours any more.
    Nothing,
}

impl Outcome {
    /// The `outcome` label of the worker's job metrics.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Complete {
                cancelled: false, ..
            } => "succeeded",
            Outcome::Complete {
                cancelled: true, ..
            } => "cancelled",
            Outcome::Fail {
                retryable: true, ..
            } => "retryable",
            Outcome::Fail {
                retryable: false, ..
            } => "failed",
            Outcome::Nothing => "lease_lost",
        }
    }
}

impl Shared {
    /// Runs one message from the stream to its acknowledgement, in a span
    /// that continues the trace of the call that created the job.
    pub(crate) async fn process(&self, message: Message) {
        let span = tracing::info_span!(
            "job",
            otel.name = "keel.worker/RunJob",
            otel.kind = "consumer",
            message_id = %message.id,
            trace_id = tracing::field::Empty,
        );
        keel_shared::telemetry::continue_trace(&span, message.traceparent.as_deref());
        self.process_message(message).instrument(span).await
    }

    async fn process_message(&self, message: Message) {
        let Some(job_id) = valid_job_id(&message) else {
            tracing::warn!(message_id = %message.id, "stream entry without a valid job_id: dead-lettering it");
            if self.dead_letter_entry(&message, 1, "no valid job_id").await {
                keel_shared::metrics::dead_lettered("invalid_message");
                self.ack(&message).await;
            }
            return;
        };
        let id = job_id.to_string();
        let start = self.start(&id, &message.id).await;
        let job = match start {
            Ok(started) => started.job.unwrap_or_default(),
            Err(CallError::Refused(status) | CallError::Rejected(status)) => {
                tracing::debug!(job_id = %id, message_id = %message.id, reason = status.message(), "start refused: skipping");
                self.ack(&message).await;
                return;
            }
            // Left pending: another delivery (XAUTOCLAIM, or the jobs
            // service's own recovery) brings it back.
            Err(CallError::GaveUp) => return,
        };
        let attempt = job.attempt;
        tracing::info!(job_id = %id, kind = %job.kind, attempt, "job started");

        let kind = job.kind.clone();
        let began = std::time::Instant::now();
        let (outcome, ack) = self.run_attempt(job_id, job).await;
        keel_shared::metrics::worker_job(&kind, outcome.label(), began.elapsed());
        let recorded = self.record(&id, attempt, outcome).await;
        if recorded && ack {
            self.ack(&message).await;
        }
    }

    /// StartJob for this delivery (stream entry), retried while the jobs
    /// service is unreachable until shutdown. A retry whose first call was
    /// applied but not answered gets the same attempt back (same delivery).
    async fn start(&self, id: &str, delivery_id: &str) -> Result<StartJobResponse, CallError> {
        call(&self.shutdown, "StartJob", id, || {
            self.transitions.start(StartJobRequest {
                id: id.to_string(),
                worker_id: self.worker_id.clone(),
                delivery_id: delivery_id.to_string(),
            })
        })
        .await
    }

    /// Runs the handler of a started job. Returns what to record, and whether
    /// the message should be acknowledged once that is recorded.
    async fn run_attempt(&self, job_id: Uuid, job: Job) -> (Outcome, bool) {
        let payload = match job.payload.as_ref().map(keel_shared::json::struct_to_json) {
            None => Value::Object(Default::default()),
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                return (
                    Outcome::Fail {
                        error: format!("payload: {e}"),
                        retryable: false,
                    },
                    true,
                );
            }
        };
        let Some(handler) = self.registry.get(&job.kind) else {
            return (
                Outcome::Fail {
                    error: format!("no handler for job kind \"{}\"", job.kind),
                    retryable: false,
                },
                true,
            );
        };
        let cancel = CancellationToken::new();
        let progress = Progress::default();
        let ctx = JobContext {
            id: job_id,
            kind: job.kind.clone(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            payload,
            cancel: cancel.clone(),
            progress: progress.clone(),
        };
        // A task of its own: a panic ends that task, not the worker.
        let mut task = tokio::spawn(async move { handler.run(ctx).await }.in_current_span());

        let id = job_id.to_string();
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + self.heartbeat_interval,
            self.heartbeat_interval,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop: Option<Stop> = None;
        let mut abort_at: Option<Instant> = None;
        let result = loop {
            tokio::select! {
                biased;
                res = &mut task => break res,
                _ = heartbeat.tick() => {
                    match self.heartbeat(&id, job.attempt, &progress).await {
                        Ok(true) if stop != Some(Stop::CancelRequested) => {
                            tracing::info!(job_id = %id, "cancellation requested: stopping the handler");
                            stop = Some(Stop::CancelRequested);
                        }
                        Ok(_) => {}
                        Err(()) if stop.is_none() => {
                            tracing::warn!(job_id = %id, "lease lost: stopping the handler");
                            stop = Some(Stop::LeaseLost);
                        }
                        Err(()) => {}
                    }
                }
                _ = self.hard_stop.cancelled(), if stop.is_none() => {
                    tracing::warn!(job_id = %id, "grace period over: stopping the handler");
                    stop = Some(Stop::Shutdown);
                }
                _ = sleep_until(abort_at) => {
                    tracing::warn!(job_id = %id, "handler ignored cancellation: aborting it");
                    task.abort();
                    abort_at = None;
                }
            }
            if stop.is_some() && !cancel.is_cancelled() {
                cancel.cancel();
                abort_at = Some(Instant::now() + CANCEL_PATIENCE);
            }
        };
        let result = result.map_err(|e| {
            if e.is_panic() {
                let msg = panic_message(e.into_panic());
                tracing::error!(job_id = %id, panic = %msg, "handler panicked");
                format!("handler panicked: {msg}")
            } else {
                "handler was aborted".to_string()
            }
        });
        outcome(stop, result)
    }

    /// One heartbeat, carrying the handler's progress report if it made a
    /// new one. `Ok(cancel_requested)`, or `Err(())` when the attempt is no
    /// longer ours. Transient failures are logged and look like "no news"
    /// (the report is sent with the next one).
    async fn heartbeat(&self, id: &str, attempt: i32, progress: &Progress) -> Result<bool, ()> {
        let report = progress.take();
        let req = HeartbeatRequest {
            id: id.to_string(),
            attempt,
            worker_id: self.worker_id.clone(),
            progress: report.as_ref().map(keel_shared::json::json_to_struct),
        };
        let answer = self.client.clone().heartbeat(req).await;
        if let (Err(_), Some(report)) = (&answer, report) {
            progress.restore(report);
        }
        match answer {
            Ok(r) => Ok(r.into_inner().cancel_requested),
            Err(status) => match classify(&status) {
                Answer::Refused => Err(()),
                _ => {
                    tracing::warn!(job_id = id, code = ?status.code(), message = status.message(), "heartbeat failed");
                    Ok(false)
                }
            },
        }
    }

    /// Records an outcome. True when it is settled (recorded now, or already
    /// recorded by someone else); false when the jobs service could not be
    /// reached before the worker had to give up.
    async fn record(&self, id: &str, attempt: i32, outcome: Outcome) -> bool {
        let (error, retryable) = match outcome {
            Outcome::Nothing => return true,
            Outcome::Complete { output, cancelled } => {
                let req = CompleteJobRequest {
                    id: id.to_string(),
                    attempt,
                    output: Some(keel_shared::json::json_to_struct(&output)),
                    cancelled,
                    worker_id: self.worker_id.clone(),
                };
                let res = call(&self.abandon, "CompleteJob", id, || {
                    self.transitions.complete(req.clone())
                })
                .await;
                match res {
                    Ok(_) => {
                        tracing::info!(job_id = id, attempt, cancelled, "job completed");
                        return true;
                    }
                    Err(CallError::Refused(status)) => {
                        tracing::info!(
                            job_id = id,
                            attempt,
                            reason = status.message(),
                            "completion not recorded: already settled"
                        );
                        return true;
                    }
                    Err(CallError::GaveUp) => return false,
                    // The output itself was refused (too large, say): the
                    // attempt fails, and retrying would produce it again.
                    Err(CallError::Rejected(status)) => (
                        format!("output rejected by the jobs service: {}", status.message()),
                        false,
                    ),
                }
            }
            Outcome::Fail { error, retryable } => (error, retryable),
        };
        let error = truncate(&error, MAX_ERROR_CHARS);
        let req = FailJobRequest {
            id: id.to_string(),
            attempt,
            error: error.clone(),
            retryable,
            worker_id: self.worker_id.clone(),
        };
        let res = call(&self.abandon, "FailJob", id, || {
            let (mut c, req) = (self.client.clone(), req.clone());
            async move { c.fail_job(req).await.map(|r| r.into_inner()) }
        })
        .await;
        match res {
            Ok(_) => {
                tracing::info!(job_id = id, attempt, retryable, error = %error, "job attempt failed");
                true
            }
            Err(CallError::Refused(status)) => {
                tracing::info!(
                    job_id = id,
                    attempt,
                    reason = status.message(),
                    "failure not recorded: already settled"
                );
                true
            }
            Err(CallError::Rejected(status)) => {
                tracing::error!(
                    job_id = id,
                    attempt,
                    reason = status.message(),
                    "failure rejected by the jobs service"
                );
                true
            }
            Err(CallError::GaveUp) => false,
        }
    }

    /// A message delivered too many times: fail its job (when it can still be
    /// started, i.e. nobody else has it), copy it to the dead-letter stream,
    /// acknowledge it.
    pub(crate) async fn dead_letter(&self, message: Message, deliveries: u64) {
        let reason = format!(
            "dead-lettered after {} deliveries",
            deliveries.saturating_sub(1)
        );
        if let Some(job_id) = valid_job_id(&message) {
            let id = job_id.to_string();
            let start = self.start(&id, &message.id).await;
            match start {
                Ok(started) => {
                    let attempt = started.job.map(|j| j.attempt).unwrap_or_default();
                    let failed = Outcome::Fail {
                        error: reason.clone(),
                        retryable: false,
                    };
                    if !self.record(&id, attempt, failed).await {
                        return;
                    }
                }
                Err(CallError::Refused(_) | CallError::Rejected(_)) => {}
                Err(CallError::GaveUp) => return,
            }
        }
        tracing::warn!(message_id = %message.id, job_id = ?message.job_id, deliveries, "message dead-lettered");
        if self.dead_letter_entry(&message, deliveries, &reason).await {
            keel_shared::metrics::dead_lettered("max_deliveries");
            self.ack(&message).await;
        }
    }

    async fn dead_letter_entry(&self, message: &Message, deliveries: u64, reason: &str) -> bool {
        self.redis_retry("XADD dead-letter", || {
            self.stream.dead_letter(message, deliveries, reason)
        })
        .await
    }

    /// Queues the acknowledgement (see `consumer::ack_loop`); once that loop
    /// has ended (shutdown), acknowledges directly.
    async fn ack(&self, message: &Message) {
        if self.acks.send(message.key()).is_err() {
            let key = message.key();
            self.redis_retry("XACK", || self.stream.ack(std::slice::from_ref(&key)))
                .await;
        }
    }

    /// A few tries with backoff; a message left pending is not lost (it comes
    /// back through XAUTOCLAIM), so this gives up rather than block.
    pub(crate) async fn redis_retry<F, Fut>(&self, what: &'static str, mut f: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), crate::stream::StreamError>>,
    {
        for failures in 0..5 {
            match f().await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(command = what, error = %e, "redis command failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(failures)) => {}
                        _ = self.abandon.cancelled() => return false,
                    }
                }
            }
        }
        false
    }
}

fn valid_job_id(message: &Message) -> Option<Uuid> {
    message
        .job_id
        .as_deref()
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
}

/// What to record for a handler's result, and whether to acknowledge the
/// message once recorded. A job stopped by shutdown is failed back for a
/// retry but not acknowledged: it did not finish.
fn outcome(
    stop: Option<Stop>,
    result: Result<Result<Value, HandlerError>, String>,
) -> (Outcome, bool) {
    match (stop, result) {
        (Some(Stop::LeaseLost), _) => (Outcome::Nothing, true),
        (Some(Stop::CancelRequested), res) => (
            Outcome::Complete {
                output: match res {
                    Ok(Ok(v)) => v,
                    _ => Value::Object(Default::default()),
                },
                cancelled: true,
            },
            true,
        ),
        (Some(Stop::Shutdown), _) => (
            Outcome::Fail {
                error: "worker shutting down".into(),
                retryable: true,
            },
            false,
        ),
        (None, Ok(Ok(output))) => (
            Outcome::Complete {
                output,
                cancelled: false,
            },
            true,
        ),
        (None, Ok(Err(e))) => (
            Outcome::Fail {
                retryable: e.retryable(),
                error: e.to_string(),
            },
            true,
        ),
        (None, Err(error)) => (
            Outcome::Fail {
                error,
                retryable: true,
            },
            true,
        ),
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn outcomes() {
        let ok = || Ok(Ok(json!({"a": 1})));
        assert_eq!(
            outcome(None, ok()),
            (
                Outcome::Complete {
                    output: json!({"a": 1}),
                    cancelled: false
                },
                true
            )
        );
        assert_eq!(
            outcome(None, Ok(Err(HandlerError::Permanent("p".into())))),
            (
                Outcome::Fail {
                    error: "p".into(),
                    retryable: false
                },
                true
            )
        );
        assert_eq!(
            outcome(None, Err("handler panicked: x".into())),
            (
                Outcome::Fail {
                    error: "handler panicked: x".into(),
                    retryable: true
                },
                true
            )
        );
        // Cancellation wins over whatever the handler returned.
        assert_eq!(
            outcome(
                Some(Stop::CancelRequested),
                Ok(Err(HandlerError::Retryable("cancelled after 3 ms".into())))
            ),
            (
                Outcome::Complete {
                    output: json!({}),
                    cancelled: true
                },
                true
            )
        );
        // Shutdown fails the attempt back for a retry and leaves the message pending.
        assert_eq!(
            outcome(Some(Stop::Shutdown), ok()),
            (
                Outcome::Fail {
                    error: "worker shutting down".into(),
                    retryable: true
                },
                false
            )
        );
        assert_eq!(
            outcome(Some(Stop::LeaseLost), ok()),
            (Outcome::Nothing, true)
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) >= Duration::from_millis(100));
        assert!(backoff(0) <= Duration::from_millis(125));
        assert!(backoff(3) >= Duration::from_millis(800));
        assert!(backoff(30) <= Duration::from_millis(6_250));
    }

    #[test]
    fn panic_messages_and_truncation() {
        assert_eq!(panic_message(Box::new("boom")), "boom");
        assert_eq!(panic_message(Box::new(String::from("bang"))), "bang");
        assert_eq!(panic_message(Box::new(7)), "(no message)");
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hi", 2), "hi");
    }

    #[test]
    fn job_ids_must_be_uuids() {
        let m = |id: Option<&str>| Message {
            stream: "keel:jobs:stream:{echo}".into(),
            id: "1-0".into(),
            job_id: id.map(String::from),
            traceparent: None,
        };
        assert!(valid_job_id(&m(None)).is_none());
        assert!(valid_job_id(&m(Some("x"))).is_none());
        let id = Uuid::now_v7();
        assert_eq!(valid_job_id(&m(Some(&id.to_string()))), Some(id));
    }
}
