//! The dead-letter path: a message that cannot be run (no valid job id) or
//! was delivered too many times is copied to the dead-letter stream and
//! acknowledged; its job, when it can still be started, is failed for good.

use crate::context::Worker;
use crate::recording::{self, CallError, Outcome};
use crate::stream::Message;

/// A message delivered too many times: fail its job (when it can still be
/// started, i.e. nobody else has it), copy it to the dead-letter stream,
/// acknowledge it.
pub(crate) async fn too_many_deliveries(worker: &Worker, message: Message, deliveries: u64) {
    let reason = format!(
        "dead-lettered after {} deliveries",
        deliveries.saturating_sub(1)
    );
    if let Some(job_id) = message.job_uuid() {
        let id = job_id.to_string();
        match recording::start(worker, &id, &message.id).await {
            Ok(started) => {
                let attempt = started.job.map(|j| j.attempt).unwrap_or_default();
                let failed = Outcome::Fail {
                    error: reason.clone(),
                    retryable: false,
                };
                if !recording::record(worker, &id, attempt, failed).await {
                    return;
                }
            }
            Err(CallError::Refused(_) | CallError::Rejected(_)) => {}
            Err(CallError::GaveUp) => return,
        }
    }
    tracing::warn!(message_id = %message.id, job_id = ?message.job_id, deliveries, "message dead-lettered");
    if copy(worker, &message, deliveries, &reason).await {
        keel_shared::metrics::dead_lettered("max_deliveries");
        worker.ack(&message).await;
    }
}

/// A stream entry without a valid job id: nothing to run or fail.
pub(crate) async fn invalid(worker: &Worker, message: Message) {
    tracing::warn!(message_id = %message.id, "stream entry without a valid job_id: dead-lettering it");
    if copy(worker, &message, 1, "no valid job_id").await {
        keel_shared::metrics::dead_lettered("invalid_message");
        worker.ack(&message).await;
    }
}

async fn copy(worker: &Worker, message: &Message, deliveries: u64, reason: &str) -> bool {
    worker
        .redis_retry("XADD dead-letter", || {
            worker.stream.dead_letter(message, deliveries, reason)
        })
        .await
}
