//! Integration tests of the jobs service: real Postgres, Redis and gRPC.

mod access;
mod admin;
mod batched_rpcs;
mod batching;
mod cancel;
mod claims;
mod control;
mod create;
mod delivery;
mod flow;
mod hostile;
mod lifecycle;
mod listing;
mod plans;
mod redis_proxy;
mod retention;
mod schedules;
mod security;
mod startup;
mod support;
mod watch;
mod worker_credentials;
