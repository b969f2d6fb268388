//! The Redis names the jobs service and the worker agree on.
//!
//! Work is routed by kind: each kind has a stream of its own, read only by
//! workers that serve that kind. Workers that read streams announce their
//! kinds in a sorted set (kind -> when last seen, in ms); the jobs service
//! publishes a job to its kind's stream only while a worker announced that
//! kind within [`SERVED_KIND_TTL`], and otherwise leaves it to ClaimJobs
//! callers (or to a stream worker that announces the kind later).

use std::time::Duration;

use crate::config::RedisConfig;

/// Consumer group the workers read the job streams with.
pub const CONSUMER_GROUP: &str = "workers";
/// Stream entry field holding the job id (the worker fetches the rest with StartJob).
pub const FIELD_JOB_ID: &str = "job_id";
/// Stream entry field holding the W3C trace context the job was created in
/// (absent when tracing was off).
pub const FIELD_TRACEPARENT: &str = crate::telemetry::TRACEPARENT;
/// A kind counts as served by stream workers this long after a worker last
/// announced it. Workers announce their kinds far more often than that.
pub const SERVED_KIND_TTL: Duration = Duration::from_secs(60);
/// How often a stream worker announces its kinds.
pub const ANNOUNCE_KINDS_EVERY: Duration = Duration::from_secs(10);

impl RedisConfig {
    /// The stream of ready jobs of one kind: `<prefix>:jobs:stream:{<kind>}`.
    /// The braces make the kind a Redis Cluster hash tag, so each kind's
    /// stream lives in one slot and kinds spread over the masters.
    pub fn jobs_stream(&self, kind: &str) -> String {
        self.key(&format!("jobs:stream:{{{kind}}}"))
    }

    /// The kinds stream workers serve: a sorted set, kind -> last seen (ms).
    pub fn served_kinds(&self) -> String {
        self.key("jobs:kinds")
    }

    /// Where messages delivered too many times are moved.
    pub fn dead_letter_stream(&self) -> String {
        self.key("jobs:dead")
    }

    /// Pub/sub channel announcing every transition of one job.
    pub fn job_updates_channel(&self, job_id: &uuid::Uuid) -> String {
        self.key(&format!("jobs:updates:{job_id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_own_hash_tagged_stream() {
        let config = RedisConfig::new("redis://127.0.0.1:6379", "keel");
        assert_eq!(config.jobs_stream("echo"), "keel:jobs:stream:{echo}");
        assert_eq!(config.served_kinds(), "keel:jobs:kinds");
    }
}
