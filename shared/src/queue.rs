//! The Redis names the jobs service and the worker agree on.

use crate::config::RedisConfig;

/// Consumer group the workers read the job stream with.
pub const CONSUMER_GROUP: &str = "workers";
/// Stream entry field holding the job id (the worker fetches the rest with StartJob).
pub const FIELD_JOB_ID: &str = "job_id";
/// Stream entry field holding the W3C trace context the job was created in
/// (absent when tracing was off).
pub const FIELD_TRACEPARENT: &str = crate::telemetry::TRACEPARENT;

impl RedisConfig {
    /// The stream of jobs ready to run.
    pub fn jobs_stream(&self) -> String {
        self.key("jobs:stream")
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
