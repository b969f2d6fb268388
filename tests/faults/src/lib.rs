//! Harness of the fault-injection suite: the real `keel-*` binaries as child
//! processes (SIGKILLed on drop, [`processes`]), private Redis and Postgres
//! servers that a test may stop and start ([`servers`]), gRPC calls to a
//! stack ([`calls`]), and the few queries the assertions need ([`history`]).

use std::time::Duration;

/// The worker credential of every stack the suite starts.
pub const WORKER_TOKEN: &str = "faults-worker-token";
/// The kind only the suite's claiming worker serves: no stream worker
/// reads it, so its jobs are reachable through ClaimJobs alone.
pub const CLAIM_KIND: &str = "faults.claim";
/// Bound on every wait for recovery: generous, this is a 2-core CI machine.
pub const WAIT: Duration = Duration::from_secs(120);
/// The deadline a client gives each call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes a line to the real stderr, past the test harness's capture, so the
/// counts show in `cargo test` output.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "faults: {}", format!($($arg)*));
    }};
}

// After `report!`: a macro is visible only in modules declared below it.
mod calls;
mod history;
mod processes;
mod redis_cluster;
mod servers;

pub use calls::*;
pub use history::*;
pub use processes::*;
pub use redis_cluster::*;
pub use servers::*;
