//! Integration tests of the shared crate against a real Postgres.

mod balance;
mod config;
mod db;
mod grpc_tls;
mod health;
mod migrations;
mod pki;
mod redis_keys;
mod tls;
