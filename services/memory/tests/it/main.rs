//! Integration tests of the memory service: real Postgres, real gRPC.

mod startup;
