//! The fault-injection suite: real `keel-*` processes, real Postgres and
//! Redis, and faults injected from outside (SIGKILL, stopped servers).

mod claim_workers;
mod jobs_kill;
mod load;
mod pooler;
mod postgres_outage;
mod redis_cluster;
mod redis_outage;
mod schedules_kill;
mod topology;
mod traces;
mod worker_crash;
