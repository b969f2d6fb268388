//! Integration tests of the auth service: real Postgres, real gRPC.

mod startup;
