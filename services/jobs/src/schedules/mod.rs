//! ScheduleService: cron schedules that create a job on each tick, exactly
//! once across replicas and restarts.

mod convert;
pub mod cron;
pub mod domain;
pub mod grpc;
pub mod service;
mod store;
pub mod ticker;

pub use grpc::ScheduleApi;
pub use service::{Schedules, Settings};
