//! Telling the jobs service about an attempt: StartJob for a delivery, and
//! CompleteJob or FailJob for its outcome, retried through outages of the
//! jobs service until the worker has to give up.

use std::future::Future;
use std::time::Duration;

use keel_proto::jobs::v1::{CompleteJobRequest, FailJobRequest, StartJobRequest, StartJobResponse};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::client::{Answer, classify};
use crate::context::{RETRY, Worker};

/// Longest error text sent to the jobs service.
const MAX_ERROR_CHARS: usize = 2000;

/// How a call to the jobs service ended, when it did not succeed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The transition does not apply (already recorded, finished, ...).
    Refused(Status),
    /// The request was rejected as invalid.
    Rejected(Status),
    /// Transient failures until we had to stop trying.
    GaveUp,
}

/// What to tell the jobs service about an attempt.
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome {
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
    pub(crate) fn label(&self) -> &'static str {
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

/// Calls the jobs service, retrying transient failures with back-off until
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
            Err(status) if flow_hint(&status).is_some() => {
                // Flow control held the start back: not a failure. The
                // message stays ours (the keepalive keeps it from looking
                // idle, so no one takes it over and its delivery count does
                // not grow: it is never dead-lettered for this); try again
                // after the suggested delay.
                let wait = jittered(flow_hint(&status).unwrap_or_default());
                tracing::debug!(
                    job_id = job,
                    call = what,
                    ?wait,
                    reason = status.message(),
                    "held back by flow control; trying again"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = give_up.cancelled() => return Err(CallError::GaveUp),
                }
            }
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
                        _ = tokio::time::sleep(RETRY.delay(failures)) => {}
                        _ = give_up.cancelled() => return Err(CallError::GaveUp),
                    }
                    failures = failures.saturating_add(1);
                }
            },
        }
    }
}

/// StartJob for this delivery (stream entry), retried while the jobs
/// service is unreachable until shutdown. A retry whose first call was
/// applied but not answered gets the same attempt back (same delivery).
pub(crate) async fn start(
    worker: &Worker,
    id: &str,
    delivery_id: &str,
) -> Result<StartJobResponse, CallError> {
    call(&worker.shutdown, "StartJob", id, || {
        worker.transitions.start(StartJobRequest {
            id: id.to_string(),
            worker_id: worker.worker_id.clone(),
            delivery_id: delivery_id.to_string(),
        })
    })
    .await
}

/// Records an outcome. True when it is settled (recorded now, or already
/// recorded by someone else); false when the jobs service could not be
/// reached before the worker had to give up.
pub(crate) async fn record(worker: &Worker, id: &str, attempt: i32, outcome: Outcome) -> bool {
    let (error, retryable) = match outcome {
        Outcome::Nothing => return true,
        Outcome::Complete { output, cancelled } => {
            let req = CompleteJobRequest {
                id: id.to_string(),
                attempt,
                output: Some(keel_shared::json::json_to_struct(&output)),
                cancelled,
                worker_id: worker.worker_id.clone(),
            };
            let res = call(&worker.abandon, "CompleteJob", id, || {
                worker.transitions.complete(req.clone())
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
        worker_id: worker.worker_id.clone(),
    };
    let res = call(&worker.abandon, "FailJob", id, || {
        let (mut c, req) = (worker.client.clone(), req.clone());
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

/// The retry delay of a flow control refusal (RESOURCE_EXHAUSTED,
/// "flow control: ...; retry in N ms"); None for any other answer.
fn flow_hint(status: &Status) -> Option<Duration> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    let rest = status.message().strip_prefix("flow control: ")?;
    let ms = rest.rsplit_once("retry in ")?.1.strip_suffix(" ms")?;
    ms.parse().ok().map(Duration::from_millis)
}

/// `wait` plus up to a quarter more, so held-back workers spread out.
fn jittered(wait: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    wait + wait.mul_f64(f64::from(nanos % 1024) / 4096.0)
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_control_refusals_carry_their_delay() {
        let held = Status::resource_exhausted(
            "flow control: kind \"echo\" has 2 running jobs, its max_running; retry in 500 ms",
        );
        assert_eq!(flow_hint(&held), Some(Duration::from_millis(500)));
        assert_eq!(
            flow_hint(&Status::resource_exhausted("too many watchers")),
            None
        );
        assert_eq!(
            flow_hint(&Status::unavailable("flow control: x; retry in 5 ms")),
            None
        );
        let w = jittered(Duration::from_millis(400));
        assert!(w >= Duration::from_millis(400) && w <= Duration::from_millis(500));
    }

    #[test]
    fn long_errors_are_truncated_on_a_char_boundary() {
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hi", 2), "hi");
    }
}
