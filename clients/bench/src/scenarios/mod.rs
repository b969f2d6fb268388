//! The scenarios: each drives one hot path through gRPC and, where the path is
//! one SQL statement or transaction, the same work straight against Postgres.
//! [`SCENARIOS`] lists them in the order they run; [`run`] walks that table,
//! setting up what each one needs first.

// Proto request literals end in `..Default::default()`, so a field the
// contract adds (memory namespaces, ...) needs no edit here; on messages whose
// every field is set today that update is needless, and stays.
#![allow(clippy::needless_update)]

mod auth;
mod drive;
mod e2e;
mod fairness;
mod jobs;
mod memory;
mod watch;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use futures::future::LocalBoxFuture;
use keel_proto::auth::v1::RegisterRequest;
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::jobs::v1::jobs_service_client::JobsServiceClient;
use keel_proto::memory::v1::memory_service_client::MemoryServiceClient;
use tonic::transport::Channel;

use self::drive::{Channels, channel};
pub(crate) use self::memory::{query, tag, text};
use crate::Opts;
use crate::baseline::Baseline;
use crate::stats::{self, Stats};
use crate::system::{System, Usage};

const PASSWORD: &str = "bench password 123";

/// One row of the table: what a scenario is called (BENCHMARKS.md and
/// scripts use the name), what it measures, what must be in place before it
/// runs, and the function that runs it (`None`: nothing to report, e.g.
/// get-job when create-job created no job).
pub(crate) struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    pub needs: &'static [Need],
    run: Run,
}

type Run = for<'a> fn(&'a mut Ctx) -> LocalBoxFuture<'a, Result<Option<Stats>>>;

/// What a scenario needs before it starts. Without `StreamWorkers`, no
/// stream worker process runs when it starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Need {
    /// `--workers` keel-worker processes running, warmed up by one echo job.
    StreamWorkers,
    /// That scenario runs first (and is reported), even when not asked
    /// for: this one works on what it leaves.
    Scenario(&'static str),
    /// The search corpus seeded (`--search-corpus` memories, not measured).
    SearchCorpus,
}

/// `run: boxed!(module::function)` for `async fn function(&mut Ctx) -> Result<Option<Stats>>`.
macro_rules! boxed {
    ($f:path) => {
        |cx| Box::pin($f(cx))
    };
}

/// Every scenario, in the order they run.
pub(crate) const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "e2e-jobs",
        description: "N echo jobs, one CreateJob each from --e2e-clients clients, until all SUCCEEDED on the stream workers",
        needs: &[Need::StreamWorkers],
        run: boxed!(e2e::e2e_jobs),
    },
    Scenario {
        name: "e2e-half-load",
        description: "echo jobs offered open-loop at half of e2e-jobs' rate (or --e2e-rate): create->start latency and RSS",
        needs: &[Need::StreamWorkers],
        run: boxed!(e2e::half_load),
    },
    // After half-load: the RSS that scenario reports must not include what
    // batch-e2e's 500-job calls leave in the allocator.
    Scenario {
        name: "batch-e2e",
        description: "N echo jobs through BatchCreateJobs, 500 per call, until all SUCCEEDED on the stream workers",
        needs: &[Need::StreamWorkers],
        run: boxed!(e2e::batch_e2e),
    },
    Scenario {
        name: "fairness",
        description: "user A's --fairness-jobs echo jobs (BatchCreateJobs), then user B's one job per 100 ms while they drain: B's create->start, A's jobs/s with and without B",
        needs: &[Need::StreamWorkers],
        run: boxed!(fairness::fairness),
    },
    // No stream worker runs now: claim-e2e's jobs go to the bench's own
    // claiming workers only, and the figures hold no idle stream worker.
    Scenario {
        name: "claim-e2e",
        description: "N jobs no stream worker serves, one CreateJob each, taken by in-process ClaimJobs workers",
        needs: &[],
        run: boxed!(e2e::claim_e2e),
    },
    Scenario {
        name: "watch",
        description: "--watchers WatchJob streams, 10 per job, until each saw its job's terminal state (starts its own workers)",
        needs: &[],
        run: boxed!(watch::watch),
    },
    Scenario {
        name: "create-job",
        description: "CreateJob for --seconds, against the same insert in raw SQL",
        needs: &[],
        run: boxed!(jobs::create_job),
    },
    Scenario {
        name: "get-job",
        description: "GetJob of the jobs create-job created, against raw SQL",
        needs: &[Need::Scenario("create-job")],
        run: boxed!(jobs::get_job),
    },
    Scenario {
        name: "list-jobs",
        description: "ListJobs, pages of 50, against raw SQL",
        needs: &[Need::Scenario("create-job")],
        run: boxed!(jobs::list_jobs),
    },
    Scenario {
        name: "memory-put",
        description: "PutMemory of 40-word memories, against raw SQL",
        needs: &[],
        run: boxed!(memory::memory_put),
    },
    Scenario {
        name: "memory-get",
        description: "GetMemory of the memories memory-put wrote, against raw SQL",
        needs: &[Need::Scenario("memory-put")],
        run: boxed!(memory::memory_get),
    },
    Scenario {
        name: "memory-health",
        description: "grpc.health.v1.Health/Check on the memory service: the gRPC hop alone, no SQL, no token",
        needs: &[],
        run: boxed!(memory::memory_health),
    },
    Scenario {
        name: "memory-search",
        description: "SearchMemories (limit 10) over the seeded corpus, against raw SQL",
        needs: &[Need::SearchCorpus],
        run: boxed!(memory::memory_search),
    },
    Scenario {
        name: "workspace",
        description: "GetWorkspace over the seeded corpus, against raw SQL",
        needs: &[Need::SearchCorpus],
        run: boxed!(memory::workspace),
    },
    Scenario {
        name: "auth-login",
        description: "Login (argon2id) from twice as many clients as cores",
        needs: &[],
        run: boxed!(auth::login),
    },
    Scenario {
        name: "auth-read",
        description: "GetCurrentUser: token check plus one row",
        needs: &[],
        run: boxed!(auth::read),
    },
];

/// The scenarios to run for `asked` (all when empty), with what they need,
/// in table order; an unknown name is an error that lists the known ones.
pub(crate) fn plan(asked: &[String]) -> Result<Vec<&'static Scenario>> {
    let mut chosen = BTreeSet::new();
    for name in asked {
        let Some(scenario) = SCENARIOS.iter().find(|s| s.name == name) else {
            bail!(
                "--scenario {name}: no such scenario; the scenarios are {}",
                SCENARIOS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        chosen.insert(scenario.name);
    }
    if asked.is_empty() {
        chosen.extend(SCENARIOS.iter().map(|s| s.name));
    }
    // Table order puts every needed scenario before the one needing it, so
    // walking it backwards adds each need before it is visited.
    for scenario in SCENARIOS.iter().rev() {
        if chosen.contains(scenario.name) {
            for need in scenario.needs {
                if let Need::Scenario(other) = need {
                    chosen.insert(other);
                }
            }
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| chosen.contains(s.name))
        .collect())
}

/// `--list`: one line per scenario, in the order they run.
pub(crate) fn print_list() {
    for s in SCENARIOS {
        let needs: Vec<String> = s
            .needs
            .iter()
            .map(|need| match need {
                Need::StreamWorkers => "stream workers".to_string(),
                Need::Scenario(other) => format!("runs {other} first"),
                Need::SearchCorpus => "seeded corpus".to_string(),
            })
            .collect();
        let needs = match needs.is_empty() {
            true => String::new(),
            false => format!(" [{}]", needs.join("; ")),
        };
        println!("{:<16} {}{needs}", s.name, s.description);
    }
}

/// What a run produced: one row per scenario, and each process's CPU
/// seconds and peak RSS (the workers' as they were when they stopped).
pub(crate) struct Outcome {
    pub results: Vec<Stats>,
    pub usage: Vec<Usage>,
}

impl Outcome {
    pub(crate) fn print(&self) {
        println!();
        stats::print_header();
        for s in &self.results {
            stats::print_row(s);
        }
        println!();
        println!(
            "{:<16} {:>12} {:>14}",
            "process", "CPU seconds", "peak RSS MiB"
        );
        for (name, cpu, rss) in &self.usage {
            println!("{name:<16} {cpu:>12.1} {rss:>14.1}");
        }
        let errors: usize = self.results.iter().map(|s| s.errors).sum();
        println!("\n{} scenarios, {errors} errors", self.results.len());
    }
}

/// Starts the system, runs the planned scenarios in table order, and stops
/// everything (the bench database is dropped) before returning.
pub(crate) async fn run(opts: Opts) -> Result<Outcome> {
    let plan = plan(&opts.scenarios)?;
    let mut cx = Ctx::start(opts).await?;
    for scenario in plan {
        cx.prepare(scenario).await?;
        if let Some(stats) = (scenario.run)(&mut cx).await? {
            cx.results.push(stats);
        }
    }
    cx.stop_stream_workers();
    let usage = cx
        .system
        .usage()
        .into_iter()
        .chain(cx.worker_usage)
        .collect();
    Ok(Outcome {
        results: cx.results,
        usage,
    })
}

/// What the scenarios share: the running system, a registered user, clients,
/// the raw-SQL baseline, and what earlier scenarios left for later ones.
pub(crate) struct Ctx {
    opts: Opts,
    system: System,
    cores: usize,
    email: String,
    token: Arc<String>,
    jobs: Channels,
    memory: Channels,
    auth: Channels,
    baseline: Baseline,
    results: Vec<Stats>,
    /// Ids of the jobs create-job created, for get-job.
    created_job_ids: Arc<Mutex<Vec<String>>>,
    /// How many memories memory-put wrote, for memory-get.
    memory_puts: usize,
    corpus_seeded: bool,
    /// The stream workers' usage, read when they first stopped.
    worker_usage: Option<Usage>,
}

impl Ctx {
    async fn start(opts: Opts) -> Result<Self> {
        let system = System::start(
            &opts.bin_dir,
            &opts.database_url,
            &opts.redis_url,
            opts.keep_database,
        )
        .await?;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        println!(
            "keel-bench: {} cores, concurrency {}, {}s per scenario, binaries from {}{}",
            cores,
            opts.concurrency,
            opts.seconds,
            opts.bin_dir.display(),
            if opts.quick { " (--quick)" } else { "" }
        );

        let mut auth = AuthServiceClient::new(channel(&system.auth).await?);
        let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
        let registered = auth
            .register(RegisterRequest {
                email: email.clone(),
                password: PASSWORD.into(),
                display_name: "bench".into(),
                ..Default::default()
            })
            .await
            .context("Register")?
            .into_inner();
        let token = Arc::new(registered.tokens.context("tokens")?.access_token);
        let user_id = registered.user.context("user")?.id;
        let baseline = Baseline::connect(&system.db_url, &user_id).await?;
        Ok(Self {
            jobs: Channels::connect(&system.jobs, 4).await?,
            memory: Channels::connect(&system.memory, 4).await?,
            auth: Channels::connect(&system.auth, 4).await?,
            opts,
            system,
            cores,
            email,
            token,
            baseline,
            results: Vec::new(),
            created_job_ids: Arc::default(),
            memory_puts: 0,
            corpus_seeded: false,
            worker_usage: None,
        })
    }

    /// Puts in place what `scenario` needs (see [`Need`]).
    async fn prepare(&mut self, scenario: &Scenario) -> Result<()> {
        if scenario.needs.contains(&Need::StreamWorkers) {
            if !self.system.has_workers() {
                self.system
                    .start_workers(self.opts.workers, self.opts.worker_concurrency)
                    .await?;
                e2e::warm_up(self.jobs_client()(0), &self.token).await?;
            }
        } else {
            self.stop_stream_workers();
        }
        if scenario.needs.contains(&Need::SearchCorpus) && !self.corpus_seeded {
            memory::seed_corpus(self).await?;
            self.corpus_seeded = true;
        }
        Ok(())
    }

    /// Stops the stream workers, if any run, keeping the first ones' usage
    /// for the report.
    fn stop_stream_workers(&mut self) {
        if self.system.has_workers() {
            if self.worker_usage.is_none() {
                self.worker_usage = self.system.usage().pop();
            }
            self.system.stop_workers();
        }
    }

    /// Call `i`'s jobs client (over connection `i % 4`).
    fn jobs_client(
        &self,
    ) -> impl Fn(usize) -> JobsServiceClient<Channel> + Clone + Send + Sync + 'static {
        let channels = self.jobs.clone();
        move |i| JobsServiceClient::new(channels.get(i))
    }

    fn memory_client(
        &self,
    ) -> impl Fn(usize) -> MemoryServiceClient<Channel> + Clone + Send + Sync + 'static {
        let channels = self.memory.clone();
        move |i| MemoryServiceClient::new(channels.get(i))
    }

    fn auth_client(
        &self,
    ) -> impl Fn(usize) -> AuthServiceClient<Channel> + Clone + Send + Sync + 'static {
        let channels = self.auth.clone();
        move |i| AuthServiceClient::new(channels.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(plan: &[&Scenario]) -> Vec<&'static str> {
        plan.iter().map(|s| s.name).collect()
    }

    #[test]
    fn names_are_unique_and_needs_come_earlier() {
        for (i, scenario) in SCENARIOS.iter().enumerate() {
            assert!(
                SCENARIOS[..i].iter().all(|s| s.name != scenario.name),
                "{} twice",
                scenario.name
            );
            for need in scenario.needs {
                if let Need::Scenario(other) = need {
                    assert!(
                        SCENARIOS[..i].iter().any(|s| s.name == *other),
                        "{} needs {other}, which does not run before it",
                        scenario.name
                    );
                }
            }
        }
    }

    #[test]
    fn the_names_scripts_and_benchmarks_md_use_stay() {
        assert_eq!(
            names(&plan(&[]).unwrap()),
            [
                "e2e-jobs",
                "e2e-half-load",
                "batch-e2e",
                "fairness",
                "claim-e2e",
                "watch",
                "create-job",
                "get-job",
                "list-jobs",
                "memory-put",
                "memory-get",
                "memory-health",
                "memory-search",
                "workspace",
                "auth-login",
                "auth-read",
            ]
        );
    }

    #[test]
    fn a_scenario_brings_what_it_reads_in_table_order() {
        let asked = ["memory-get".to_string(), "get-job".to_string()];
        assert_eq!(
            names(&plan(&asked).unwrap()),
            ["create-job", "get-job", "memory-put", "memory-get"]
        );
    }

    #[test]
    fn an_unknown_scenario_is_refused_by_name() {
        let error = plan(&["e2e-job".to_string()]).err().unwrap().to_string();
        assert!(error.contains("--scenario e2e-job"), "{error}");
        assert!(error.contains("e2e-jobs, e2e-half-load"), "{error}");
    }
}
