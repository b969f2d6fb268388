//! Integration tests of the worker: real Redis, Postgres and gRPC, with the
//! jobs service running in-process.

mod delivery;
mod flow;
mod kinds;
mod metrics;
mod recovery;
mod replicas;
mod shutdown;
mod startup;
mod support;
mod transitions;
