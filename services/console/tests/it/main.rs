//! Integration tests of the console: real auth, jobs and memory servers
//! in-process on their own database and Redis prefix, the console in front of
//! them, a small ClaimJobs runner, plain HTTP clients and a real browser.

mod browser;
mod http;
mod support;
