//! One message, start to finish: StartJob, the handler in a task of its own
//! with heartbeats and cancellation, then its outcome recorded and the
//! message acknowledged (or not, when the outcome could not be recorded).

use std::any::Any;
use std::time::Duration;

use keel_proto::jobs::v1::{HeartbeatRequest, Job};
use keel_shared::time::sleep_until;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::client::{Answer, classify};
use crate::context::Worker;
use crate::dead_letter;
use crate::handler::{HandlerError, JobContext, Progress};
use crate::recording::{self, CallError, Outcome};
use crate::stream::Message;

/// After a handler's token is cancelled, how long it gets to return before
/// its task is aborted.
const CANCEL_PATIENCE: Duration = Duration::from_secs(2);

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

/// What a heartbeat learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pulse {
    /// Still ours; the owner may have asked to cancel.
    Running { cancel_requested: bool },
    /// The attempt is no longer ours.
    Lost,
}

/// Runs one message from the stream to its acknowledgement, in a span that
/// continues the trace of the call that created the job.
pub(crate) async fn process(worker: &Worker, message: Message) {
    let span = tracing::info_span!(
        "job",
        otel.name = "keel.worker/RunJob",
        otel.kind = "consumer",
        message_id = %message.id,
        trace_id = tracing::field::Empty,
    );
    keel_shared::telemetry::continue_trace(&span, message.traceparent.as_deref());
    process_message(worker, message).instrument(span).await
}

async fn process_message(worker: &Worker, message: Message) {
    let Some(job_id) = message.job_uuid() else {
        return dead_letter::invalid(worker, message).await;
    };
    let id = job_id.to_string();
    let job = match recording::start(worker, &id, &message.id).await {
        Ok(started) => started.job.unwrap_or_default(),
        Err(CallError::Refused(status) | CallError::Rejected(status)) => {
            tracing::debug!(job_id = %id, message_id = %message.id, reason = status.message(), "start refused: skipping");
            worker.ack(&message).await;
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
    let (outcome, ack) = run_attempt(worker, job_id, job).await;
    keel_shared::metrics::worker_job(&kind, outcome.label(), began.elapsed());
    let recorded = recording::record(worker, &id, attempt, outcome).await;
    if recorded && ack {
        worker.ack(&message).await;
    }
}

/// Runs the handler of a started job. Returns what to record, and whether
/// the message should be acknowledged once that is recorded.
async fn run_attempt(worker: &Worker, job_id: Uuid, job: Job) -> (Outcome, bool) {
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
    let Some(handler) = worker.registry.get(&job.kind) else {
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
    let mut beat = tokio::time::interval_at(
        Instant::now() + worker.heartbeat_interval,
        worker.heartbeat_interval,
    );
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop: Option<Stop> = None;
    let mut abort_at: Option<Instant> = None;
    let result = loop {
        tokio::select! {
            biased;
            res = &mut task => break res,
            _ = beat.tick() => {
                match heartbeat(worker, &id, job.attempt, &progress).await {
                    Pulse::Running { cancel_requested: true } if stop != Some(Stop::CancelRequested) => {
                        tracing::info!(job_id = %id, "cancellation requested: stopping the handler");
                        stop = Some(Stop::CancelRequested);
                    }
                    Pulse::Running { .. } => {}
                    Pulse::Lost if stop.is_none() => {
                        tracing::warn!(job_id = %id, "lease lost: stopping the handler");
                        stop = Some(Stop::LeaseLost);
                    }
                    Pulse::Lost => {}
                }
            }
            _ = worker.hard_stop.cancelled(), if stop.is_none() => {
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
/// new one. Transient failures are logged and look like "no news" (the
/// report is sent with the next one).
async fn heartbeat(worker: &Worker, id: &str, attempt: i32, progress: &Progress) -> Pulse {
    let report = progress.take();
    let req = HeartbeatRequest {
        id: id.to_string(),
        attempt,
        worker_id: worker.worker_id.clone(),
        progress: report.as_ref().map(keel_shared::json::json_to_struct),
    };
    let answer = worker.client.clone().heartbeat(req).await;
    if let (Err(_), Some(report)) = (&answer, report) {
        progress.restore(report);
    }
    match answer {
        Ok(r) => Pulse::Running {
            cancel_requested: r.into_inner().cancel_requested,
        },
        Err(status) => match classify(&status) {
            Answer::Refused => Pulse::Lost,
            _ => {
                tracing::warn!(job_id = id, code = ?status.code(), message = status.message(), "heartbeat failed");
                Pulse::Running {
                    cancel_requested: false,
                }
            }
        },
    }
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
    fn panic_messages() {
        assert_eq!(panic_message(Box::new("boom")), "boom");
        assert_eq!(panic_message(Box::new(String::from("bang"))), "bang");
        assert_eq!(panic_message(Box::new(7)), "(no message)");
    }

    #[test]
    fn job_ids_must_be_uuids() {
        let m = |id: Option<&str>| Message {
            stream: "keel:jobs:stream:{echo}".into(),
            id: "1-0".into(),
            job_id: id.map(String::from),
            traceparent: None,
        };
        assert!(m(None).job_uuid().is_none());
        assert!(m(Some("x")).job_uuid().is_none());
        let id = Uuid::now_v7();
        assert_eq!(m(Some(&id.to_string())).job_uuid(), Some(id));
    }
}
