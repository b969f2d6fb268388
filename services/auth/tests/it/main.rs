//! Integration tests of the auth service: real Postgres, real gRPC.

mod across;
mod admin;
mod api_keys;
mod audit;
mod flows;
mod hostile;
mod keyfile;
mod login;
mod register;
mod security;
mod startup;
mod support;
mod tokens;
