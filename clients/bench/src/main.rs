//! `keel-bench`: drives the real Keel binaries over gRPC with many concurrent
//! clients and prints, per scenario, throughput, latency percentiles, errors,
//! the services' CPU seconds and peak RSS, and the ratio to the same work done
//! directly against Postgres. See BENCHMARKS.md for the command and figures.

mod baseline;
mod peers;
mod scenarios;
mod stats;
mod system;

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Clone)]
#[command(name = "keel-bench", about = "Keel benchmarks")]
pub struct Opts {
    /// Small counts and short durations: a smoke run of every scenario.
    #[arg(long)]
    pub quick: bool,
    /// Run only these scenarios (default: all; --list names them).
    #[arg(long = "scenario")]
    pub scenarios: Vec<String>,
    /// Print the scenarios (name, what it needs, what it measures) and exit.
    #[arg(long)]
    pub list: bool,
    /// Side by side with the peer job queues: e2e-jobs, batch-e2e and
    /// claim-e2e, then BullMQ, graphile-worker and pg-boss from --peers-dir
    /// at the same N (--e2e-jobs) and worker processes (--workers); prints one
    /// table of jobs/s with the ratios Keel/peer. Needs Node.js and npm.
    #[arg(long)]
    pub peers: bool,
    /// The peer harness folder (read only: it is copied, then `npm ci`).
    #[arg(long, env = "KEEL_PEERS_DIR", default_value = "../shared/peers")]
    pub peers_dir: PathBuf,
    /// Concurrent clients per scenario.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds per throughput scenario.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Jobs in the end-to-end scenarios.
    #[arg(long, default_value_t = 20_000)]
    pub e2e_jobs: usize,
    /// User A's backlog in the fairness scenario.
    #[arg(long, default_value_t = 100_000)]
    pub fairness_jobs: usize,
    /// Jobs per second offered in e2e-half-load (default: half of the
    /// e2e-jobs throughput measured in the same run).
    #[arg(long)]
    pub e2e_rate: Option<f64>,
    /// Worker processes in the end-to-end scenarios.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Concurrent clients creating jobs in e2e-jobs and batch-e2e (32 clients
    /// leave the pipeline waiting on CreateJob's commit: see BENCHMARKS.md).
    #[arg(long, default_value_t = 64)]
    pub e2e_clients: usize,
    /// Handlers per worker process.
    #[arg(long, default_value_t = 128)]
    pub worker_concurrency: usize,
    /// Claiming workers in claim-e2e: in-process ClaimJobs clients, each
    /// with its own HTTP/2 connection.
    #[arg(long, default_value_t = 2)]
    pub claim_workers: usize,
    /// Jobs a claiming worker holds at once (1..=1000): it claims up to its
    /// free capacity per ClaimJobs call.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub claim_batch: u16,
    /// Concurrent WatchJob streams in the watch scenario (10 per job).
    #[arg(long, default_value_t = 10_000)]
    pub watchers: usize,
    /// Memories seeded before memory-search.
    #[arg(long, default_value_t = 100_000)]
    pub search_corpus: usize,
    /// Other users given the same corpus (straight into Postgres) before
    /// memory-search and workspace, so indexes are shared as in production.
    #[arg(long, default_value_t = 20)]
    pub search_other_users: usize,
    /// Leave the bench database in place at the end (its name is printed),
    /// e.g. to EXPLAIN the statements on the seeded corpus afterwards.
    #[arg(long)]
    pub keep_database: bool,
    /// Folder with the keel-* binaries.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Postgres server to create the bench database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
}

impl Opts {
    fn quickened(mut self) -> Self {
        if self.quick {
            self.seconds = 2;
            self.e2e_jobs = self.e2e_jobs.min(500);
            self.fairness_jobs = self.fairness_jobs.min(2_000);
            self.search_corpus = self.search_corpus.min(1_000);
            self.search_other_users = self.search_other_users.min(2);
            self.watchers = self.watchers.min(200);
            self.concurrency = self.concurrency.min(16);
            self.e2e_clients = self.e2e_clients.min(16);
            self.worker_concurrency = self.worker_concurrency.min(16);
        }
        self
    }
}

/// Exit status after SIGINT or SIGTERM (128 + SIGINT, as shells report it).
const INTERRUPTED: i32 = 130;

#[tokio::main]
async fn main() {
    let opts = keel_shared::config::parse_config::<Opts>().quickened();
    // On SIGINT or SIGTERM the run is dropped where it stands: the services
    // and workers it started are killed, and its database and Redis keys are
    // dropped (`System`'s Drop), instead of outliving the bench.
    let interrupted = keel_shared::shutdown::on_signal();
    let run = async {
        if opts.list {
            scenarios::print_list();
            Ok(())
        } else if opts.peers {
            peers::run(opts).await
        } else {
            scenarios::run(opts).await.map(|outcome| outcome.print())
        }
    };
    let finished = tokio::select! {
        done = run => Some(done),
        () = interrupted.cancelled() => None,
    };
    let Some(done) = finished else {
        // The run was dropped with the `select!`, and with it the system.
        eprintln!("keel-bench: interrupted: stopped the services and workers it started");
        std::process::exit(INTERRUPTED);
    };
    if let Err(e) = done {
        eprintln!("keel-bench: {e:#}");
        std::process::exit(1);
    }
}
