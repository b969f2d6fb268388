//! The `keel` binary against the real services (in-process, on their own
//! database and Redis prefix): what it prints and what it changes.

mod control;
mod dead_letters;
mod memories;
mod output;
mod schedules;
mod support;
