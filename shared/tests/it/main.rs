//! Integration tests of the shared crate against a real Postgres.

mod migrations;
