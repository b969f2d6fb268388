//! Integration tests of the memory service: real Postgres, real gRPC.

mod support;

mod crud;
mod hostile;
mod isolation;
mod limits;
mod listing;
mod search;
mod security;
mod startup;
mod versions;
mod workspace;
