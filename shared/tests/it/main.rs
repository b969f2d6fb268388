//! Integration tests of the shared crate against a real Postgres.

mod health;
mod migrations;
