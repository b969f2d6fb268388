//! AdminService: the operators' view of every user's jobs, the queues, the
//! workers, the dead letters and the schedules, and the audit trail of what
//! admins did. Served behind the admin gate.

mod grpc;
mod service;
mod store;
pub(crate) mod workers;

pub(crate) use grpc::AdminApi;
pub(crate) use service::AdminService;
