//! Integration tests of the memory service: real Postgres, real gRPC.

mod admin;
mod support;

mod crud;
mod expiry;
mod history;
mod hostile;
mod isolation;
mod limits;
mod listing;
mod namespaces;
mod ranking;
mod search;
mod search_pages;
mod security;
mod startup;
mod versions;
mod workspace;
