//! Integration tests of the jobs service: real Postgres, Redis and gRPC.

mod startup;
