//! The job queue's metrics: transitions, leases, retention and the outbox
//! (recorded by the jobs service), attempts and dead letters (recorded by the
//! worker), and the stream's gauges.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use super::enabled;

/// Most distinct job kinds used as label values; further kinds are counted
/// as `other` (kinds are chosen by users, labels must stay bounded).
pub const MAX_KIND_LABELS: usize = 200;

/// The label value for a job kind: the kind itself for the first
/// [`MAX_KIND_LABELS`] kinds seen, `other` after that.
pub fn kind_label(kind: &str) -> String {
    static KINDS: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut kinds = KINDS.lock().unwrap_or_else(|e| e.into_inner());
    let kinds = kinds.get_or_insert_with(HashSet::new);
    if kinds.contains(kind) {
        return kind.to_string();
    }
    if kinds.len() < MAX_KIND_LABELS {
        kinds.insert(kind.to_string());
        return kind.to_string();
    }
    "other".into()
}

/// Jobs service: a job of `kind` made `transition` (created, started,
/// succeeded, failed, retried, cancelled).
pub fn job_transition(transition: &'static str, kind: &str) {
    if enabled() {
        metrics::counter!("keel_jobs_transitions_total", "transition" => transition, "kind" => kind_label(kind))
            .increment(1);
    }
}

/// Jobs service: a running job whose lease expired was reaped; `outcome` is
/// what became of it (queued, failed, cancelled).
pub fn lease_reaped(outcome: &'static str) {
    metrics::counter!("keel_jobs_leases_reaped_total", "outcome" => outcome).increment(1);
}

/// Jobs service: finished jobs deleted by the retention job.
pub fn retention_deleted(count: u64) {
    if count > 0 {
        metrics::counter!("keel_jobs_retention_deleted_total").increment(count);
    }
}

/// Jobs service: the outbox as last sampled.
pub fn outbox(rows: i64, due: i64, oldest_due_seconds: f64) {
    metrics::gauge!("keel_jobs_outbox_rows").set(rows as f64);
    metrics::gauge!("keel_jobs_outbox_due").set(due as f64);
    metrics::gauge!("keel_jobs_outbox_oldest_due_seconds").set(oldest_due_seconds);
}

/// Worker: one attempt of a job of `kind` ran for `elapsed` and ended with
/// `outcome` (succeeded, failed, retryable, cancelled, lease_lost).
pub fn worker_job(kind: &str, outcome: &'static str, elapsed: Duration) {
    if enabled() {
        let kind = kind_label(kind);
        metrics::counter!("keel_worker_jobs_total", "kind" => kind.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("keel_worker_job_duration_seconds", "kind" => kind)
            .record(elapsed.as_secs_f64());
    }
}

/// Worker: a message was moved to the dead-letter stream.
pub fn dead_lettered(reason: &'static str) {
    metrics::counter!("keel_worker_dead_lettered_total", "reason" => reason).increment(1);
}

/// Worker: the job stream and its consumer group as last sampled.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueStats {
    pub stream_length: u64,
    pub pending: u64,
    /// Entries not yet delivered to the group (`None`: Redis cannot tell).
    pub lag: Option<u64>,
    pub consumers: u64,
    pub dead_letter_length: u64,
}

pub fn queue(stats: QueueStats) {
    metrics::gauge!("keel_queue_stream_length").set(stats.stream_length as f64);
    metrics::gauge!("keel_queue_pending").set(stats.pending as f64);
    if let Some(lag) = stats.lag {
        metrics::gauge!("keel_queue_lag").set(lag as f64);
    }
    metrics::gauge!("keel_queue_consumers").set(stats.consumers as f64);
    metrics::gauge!("keel_queue_dead_letter_length").set(stats.dead_letter_length as f64);
}

pub(super) fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "keel_jobs_transitions_total",
        "job transitions recorded by the jobs service, by kind"
    );
    describe_counter!(
        "keel_jobs_leases_reaped_total",
        "running jobs whose lease expired, by what became of them"
    );
    describe_counter!(
        "keel_jobs_retention_deleted_total",
        "finished jobs deleted by the retention job"
    );
    describe_gauge!(
        "keel_jobs_outbox_rows",
        "outbox rows (jobs not yet started)"
    );
    describe_gauge!(
        "keel_jobs_outbox_due",
        "outbox rows due for (re)publication"
    );
    describe_gauge!(
        "keel_jobs_outbox_oldest_due_seconds",
        Unit::Seconds,
        "how long the oldest due outbox row has waited for the relay"
    );
    describe_counter!(
        "keel_worker_jobs_total",
        "job attempts run by this worker, by kind and outcome"
    );
    describe_histogram!(
        "keel_worker_job_duration_seconds",
        Unit::Seconds,
        "handler run time, by kind"
    );
    describe_counter!(
        "keel_worker_dead_lettered_total",
        "messages moved to the dead-letter stream"
    );
    describe_gauge!("keel_queue_stream_length", "entries in the job stream");
    describe_gauge!(
        "keel_queue_pending",
        "entries delivered to a worker and not yet acknowledged"
    );
    describe_gauge!(
        "keel_queue_lag",
        "entries not yet delivered to the consumer group"
    );
    describe_gauge!("keel_queue_consumers", "consumers in the group");
    describe_gauge!(
        "keel_queue_dead_letter_length",
        "entries in the dead-letter stream"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_labels_are_bounded() {
        let first = kind_label("kind-label-test-a");
        assert_eq!(first, "kind-label-test-a");
        for i in 0..MAX_KIND_LABELS {
            kind_label(&format!("kind-label-fill-{i}"));
        }
        assert_eq!(kind_label("kind-label-test-a"), "kind-label-test-a");
        assert_eq!(kind_label("kind-label-test-new"), "other");
    }
}
