//! Integration tests of the worker: real Redis, Postgres and gRPC.

mod startup;
