//! The Redis names the jobs service and the worker agree on.

use crate::config::RedisConfig;

/// Consumer group the workers read the job stream with.
pub const CONSUMER_GROUP: &str = "workers";
/// Stream entry field holding the job id (the worker fetches the rest with StartJob).
pub const FIELD_JOB_ID: &str = "job_id";
/// Stream entry field holding the W3C trace context the job was created in
/// (absent when tracing was off).
pub const FIELD_TRACEPARENT: &str = crate::telemetry::TRACEPARENT;

/// Fields of a dead-letter entry besides [`FIELD_JOB_ID`] (empty when the
/// message had none) and [`FIELD_TRACEPARENT`] (when the message had one).
pub mod dead_letter {
    /// The stream key the message was read from (entries written before this
    /// field existed lack it: they came from the jobs stream).
    pub const FIELD_STREAM: &str = "stream";
    /// The message's entry id in that stream.
    pub const FIELD_MESSAGE_ID: &str = "message_id";
    /// How many times it was delivered.
    pub const FIELD_DELIVERIES: &str = "deliveries";
    /// The consumer (worker) that dead-lettered it.
    pub const FIELD_CONSUMER: &str = "consumer";
    /// Why it was dead-lettered.
    pub const FIELD_REASON: &str = "reason";
}

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
