//! ScheduleService: cron schedules that create a job on each tick, exactly
//! once across replicas and restarts.

mod convert;
pub(crate) mod cron;
pub(crate) mod domain;
pub(crate) mod grpc;
pub(crate) mod service;
mod store;
pub(crate) mod ticker;

pub(crate) use convert::schedule_to_proto;
pub(crate) use grpc::ScheduleApi;
pub(crate) use service::{Schedules, Settings};
