//! `keel-bench --peers`: Keel's end-to-end scenarios, then the peer job
//! queues' harness (`--peers-dir`: BullMQ, graphile-worker, pg-boss) at the
//! same N, in one sitting, and one table of jobs/s with the ratios Keel/peer
//! and issue #20's targets.
//!
//! The harness folder is read-only: it is copied to a temporary folder and
//! `npm ci` installs its locked dependencies there. Each peer run is one
//! `node <lib>_bench.js` process (its own worker processes forked from it)
//! that enqueues N jobs while its workers wait, drains them, then enqueues N
//! more with the workers idle and times those to the last completion: its
//! `e2e_rate` is the figure set against Keel's end-to-end scenarios.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::Opts;
use crate::scenarios::{self, Outcome};
use crate::stats::{self, ServerCost, Stats};
use crate::system::ServerWork;

/// The Keel scenarios the peers are set against.
const KEEL_SCENARIOS: [&str; 3] = ["e2e-jobs", "batch-e2e", "claim-e2e"];

/// Lines of a failed peer run's stderr shown (its first: what failed first).
const STDERR_SHOWN: usize = 15;

/// Job slots per peer worker process (the harness's own default).
const PEER_CONCURRENCY: usize = 64;

/// One peer run's longest wait; the harness gives up on its own after 5
/// (BullMQ, graphile-worker) or 15 minutes (pg-boss).
const PEER_PATIENCE: Duration = Duration::from_secs(20 * 60);

/// How jobs are enqueued.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// One enqueue call per job (64 concurrent callers).
    Single,
    /// Many jobs per call.
    Bulk,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Bulk => "bulk",
        }
    }

    /// The Keel scenarios enqueueing the same way.
    fn keel(self) -> &'static [&'static str] {
        match self {
            Mode::Single => &["e2e-jobs", "claim-e2e"],
            Mode::Bulk => &["batch-e2e"],
        }
    }
}

/// One peer variant: which harness script, with what arguments after
/// `<mode> <procs> <N> <concurrency>`.
struct Peer {
    system: &'static str,
    config: &'static str,
    script: &'static str,
    extra: &'static [&'static str],
    mode: Mode,
    how: &'static str,
}

const BULLMQ: &str = "BullMQ 6.7 (Redis only)";
const GRAPHILE: &str = "graphile-worker 0.17 (Postgres)";
const PGBOSS: &str = "pg-boss 10 (Postgres)";

const PEERS: &[Peer] = &[
    Peer {
        system: BULLMQ,
        config: "default",
        script: "bullmq_bench.js",
        extra: &[],
        mode: Mode::Single,
        how: "one add() per job",
    },
    Peer {
        system: BULLMQ,
        config: "default",
        script: "bullmq_bench.js",
        extra: &[],
        mode: Mode::Bulk,
        how: "addBulk, 1000 per call",
    },
    Peer {
        system: GRAPHILE,
        config: "default",
        script: "graphile_bench.js",
        extra: &["default"],
        mode: Mode::Single,
        how: "one addJob() per job",
    },
    Peer {
        system: GRAPHILE,
        config: "default",
        script: "graphile_bench.js",
        extra: &["default"],
        mode: Mode::Bulk,
        how: "one add_jobs() call",
    },
    Peer {
        system: GRAPHILE,
        config: "batching on",
        script: "graphile_bench.js",
        extra: &["tuned"],
        mode: Mode::Single,
        how: "one addJob() per job",
    },
    Peer {
        system: GRAPHILE,
        config: "batching on",
        script: "graphile_bench.js",
        extra: &["tuned"],
        mode: Mode::Bulk,
        how: "one add_jobs() call",
    },
    Peer {
        system: PGBOSS,
        config: "batchSize=100",
        script: "pgboss_bench.js",
        extra: &["100"],
        mode: Mode::Single,
        how: "one send() per job",
    },
    Peer {
        system: PGBOSS,
        config: "batchSize=100",
        script: "pgboss_bench.js",
        extra: &["100"],
        mode: Mode::Bulk,
        how: "insert(), 1000 per call",
    },
];

/// The targets of issue #20, as ratios Keel/peer in the same run.
struct Target {
    keel: &'static str,
    at_least: f64,
    system: &'static str,
    config: &'static str,
    mode: Mode,
    label: &'static str,
}

const TARGETS: &[Target] = &[
    Target {
        keel: "e2e-jobs",
        at_least: 0.6,
        system: BULLMQ,
        config: "default",
        mode: Mode::Single,
        label: "e2e-jobs >= 0.6 x BullMQ single",
    },
    Target {
        keel: "batch-e2e",
        at_least: 0.5,
        system: GRAPHILE,
        config: "batching on",
        mode: Mode::Bulk,
        label: "batch-e2e >= 0.5 x graphile-worker batching-on bulk",
    },
];

/// What one peer run gave: its end-to-end jobs/s, or why there is none;
/// the CPU its processes (node producer and workers) used per job, and the
/// servers' work per job.
struct PeerResult {
    peer: &'static Peer,
    e2e: Result<f64, String>,
    cpu_us_per_job: Option<f64>,
    servers_per_job: Option<ServerCost>,
}

/// A Keel scenario's figures for the table.
struct KeelRow {
    name: String,
    jobs_per_sec: f64,
    errors: usize,
    cpu_us_per_job: Vec<(String, f64)>,
    servers_per_job: Option<ServerCost>,
}

impl KeelRow {
    fn from_stats(s: &Stats) -> Self {
        Self {
            name: s.name.clone(),
            jobs_per_sec: s.ops_per_sec(),
            errors: s.errors,
            cpu_us_per_job: s.cpu_us_per_job.clone(),
            servers_per_job: s.servers_per_job,
        }
    }
}

pub(crate) async fn run(mut opts: Opts) -> Result<()> {
    if !opts.scenarios.is_empty() {
        bail!(
            "--peers runs {}; leave out --scenario",
            KEEL_SCENARIOS.join(", ")
        );
    }
    let harness = Harness::prepare(&opts).await?;
    let load_before = load_average();
    let started = chrono::Utc::now();
    opts.scenarios = KEEL_SCENARIOS.map(String::from).to_vec();
    let n = opts.e2e_jobs;
    let procs = opts.workers;
    let outcome: Outcome = scenarios::run(opts.clone()).await?;
    outcome.print();
    println!(
        "\npeers: {} runs of N = {n} from {}, {procs} worker processes x{PEER_CONCURRENCY} each",
        PEERS.len(),
        opts.peers_dir.display()
    );
    let mut peers = Vec::new();
    for peer in PEERS {
        let result = harness.run(peer, n, procs).await;
        match &result.e2e {
            Ok(rate) => println!(
                "peers: {} {} {}: {rate:.0} jobs/s end to end",
                peer.system,
                peer.config,
                peer.mode.arg()
            ),
            Err(why) => println!(
                "peers: {} {} {}: failed: {why}",
                peer.system,
                peer.config,
                peer.mode.arg()
            ),
        }
        peers.push(result);
    }
    let keel: Vec<KeelRow> = outcome.results.iter().map(KeelRow::from_stats).collect();
    println!(
        "\nSide by side, {} UTC, N = {n} no-op jobs per system, {} cores, load average {} before, {} after; \
         Keel {} workers x{}, peers {procs} worker processes x{PEER_CONCURRENCY}\n",
        started.format("%Y-%m-%d %H:%M"),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_before,
        load_average(),
        opts.workers,
        opts.worker_concurrency,
    );
    print!("{}", table(&keel, &peers));
    println!();
    print!("{}", targets(&keel, &peers));
    Ok(())
}

/// The markdown table: Keel's rows, then each peer's with its ratios.
fn table(keel: &[KeelRow], peers: &[PeerResult]) -> String {
    let mut out = String::from(
        "| system | mode | jobs/s | Keel/peer | CPU us/job (client-side processes) | servers per job |\n\
         | --- | --- | ---: | --- | --- | --- |\n",
    );
    for k in keel {
        let how = match k.name.as_str() {
            "e2e-jobs" => "one CreateJob per job, stream workers",
            "batch-e2e" => "BatchCreateJobs, 500 per call, stream workers",
            "claim-e2e" => "one CreateJob per job, ClaimJobs workers",
            _ => "",
        };
        let errors = match k.errors {
            0 => String::new(),
            e => format!(" ({e} errors)"),
        };
        out.push_str(&format!(
            "| Keel (Postgres + Redis) | {}: {how} | {}{errors} | | {} | {} |\n",
            k.name,
            thousands(k.jobs_per_sec),
            stats::cpu_list(&k.cpu_us_per_job),
            k.servers_per_job.map(|c| c.to_string()).unwrap_or_default(),
        ));
    }
    for p in peers {
        let (rate, ratios) = match &p.e2e {
            Ok(rate) => {
                let ratios: Vec<String> = p
                    .peer
                    .mode
                    .keel()
                    .iter()
                    .filter_map(|name| {
                        let k = keel.iter().find(|k| k.name == *name && k.errors == 0)?;
                        Some(format!("{name} {:.2}", k.jobs_per_sec / rate))
                    })
                    .collect();
                (thousands(*rate), ratios.join(", "))
            }
            Err(why) => (format!("failed: {why}"), String::new()),
        };
        let cpu = p
            .cpu_us_per_job
            .map(|us| format!("node (producer + workers) {us:.0}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "| {}, {} | {}: {} | {rate} | {ratios} | {cpu} | {} |\n",
            p.peer.system,
            p.peer.config,
            p.peer.mode.arg(),
            p.peer.how,
            p.servers_per_job.map(|c| c.to_string()).unwrap_or_default(),
        ));
    }
    out
}

/// One line per target of issue #20: the ratio and met / not met, or why
/// it was not measured.
fn targets(keel: &[KeelRow], peers: &[PeerResult]) -> String {
    let mut out = String::from("Targets (issue #20, ratios in this run):\n");
    for t in TARGETS {
        let k = keel.iter().find(|k| k.name == t.keel);
        let p = peers.iter().find(|p| {
            p.peer.system == t.system && p.peer.config == t.config && p.peer.mode == t.mode
        });
        let verdict = match (k, p.map(|p| &p.e2e)) {
            (Some(k), Some(Ok(rate))) if *rate > 0.0 && k.errors == 0 => {
                let ratio = k.jobs_per_sec / rate;
                let met = if ratio >= t.at_least {
                    "met"
                } else {
                    "not met"
                };
                format!(
                    "{ratio:.2} ({} / {} jobs/s): {met}",
                    thousands(k.jobs_per_sec),
                    thousands(*rate)
                )
            }
            (None, _) => format!("not measured: no {} figure", t.keel),
            (Some(k), _) if k.errors > 0 => format!(
                "not measured: {} had {} errors (jobs not created or not finished)",
                t.keel, k.errors
            ),
            _ => "not measured: the peer run failed".to_string(),
        };
        out.push_str(&format!("- {}: {verdict}\n", t.label));
    }
    out
}

/// 20879.4 -> "20,879".
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The load averages (1, 5, 15 min) as `uptime` prints them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// A writable copy of the harness with its dependencies installed, and the
/// databases and environment its scripts expect.
struct Harness {
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    /// The Postgres server the peers use (for its WAL position).
    db_url: String,
}

impl Harness {
    /// Fails, before anything is measured, when the harness or npm is missing.
    async fn prepare(opts: &Opts) -> Result<Self> {
        let source = &opts.peers_dir;
        for file in ["harness.js", "package.json", "package-lock.json"] {
            if !source.join(file).is_file() {
                bail!(
                    "--peers-dir {}: no {file} there; point --peers-dir (or KEEL_PEERS_DIR) at the \
                     peer harness folder (default ../shared/peers from the repository root)",
                    source.display()
                );
            }
        }
        for tool in ["node", "npm"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
            if !found.is_ok_and(|s| s.success()) {
                bail!(
                    "--peers needs Node.js and npm on PATH to run the peer harness; `{tool} --version` failed"
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("keel-bench-peers-{}", std::process::id()));
        let harness = Self {
            env: vec![
                (
                    "GW_DATABASE_URL",
                    keel_shared::db::with_dbname(&opts.database_url, "peers_graphile"),
                ),
                (
                    "PGBOSS_DATABASE_URL",
                    keel_shared::db::with_dbname(&opts.database_url, "peers_pgboss"),
                ),
            ],
            dir,
            db_url: opts.database_url.clone(),
        };
        copy_files(source, &harness.dir)?;
        println!(
            "peers: npm ci in {} (the harness's locked dependencies)",
            harness.dir.display()
        );
        let npm = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&harness.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .context("npm ci")?;
        if !npm.status.success() {
            bail!(
                "npm ci in {} failed: {}",
                harness.dir.display(),
                tail(&npm.stderr)
            );
        }
        create_databases(&opts.database_url, &["peers_graphile", "peers_pgboss"]).await?;
        if !opts.redis_url.starts_with("redis://127.0.0.1:6379") {
            println!(
                "peers: note: the BullMQ harness always uses Redis at 127.0.0.1:6379, not {}",
                opts.redis_url
            );
        }
        Ok(harness)
    }

    /// One `node <script> <mode> <procs> <n> 64 [extra]` run.
    async fn run(&self, peer: &'static Peer, n: usize, procs: usize) -> PeerResult {
        let servers_before = ServerWork::read(&self.db_url).await;
        let cpu_before = crate::system::children_cpu();
        let outcome = self.node(peer, n, procs).await;
        // Every job was enqueued and run twice (the drain, then the end-to-end pass).
        let jobs = 2 * n.max(1);
        let cpu = (crate::system::children_cpu() - cpu_before) * 1e6 / jobs as f64;
        let servers = ServerWork::read(&self.db_url)
            .await
            .per_job(&servers_before, jobs);
        PeerResult {
            peer,
            cpu_us_per_job: outcome.is_ok().then_some(cpu),
            servers_per_job: outcome.is_ok().then_some(servers),
            e2e: outcome.map_err(|e| format!("{e:#}")),
        }
    }

    async fn node(&self, peer: &Peer, n: usize, procs: usize) -> Result<f64> {
        let mut child = Command::new("node")
            .arg(peer.script)
            .arg(peer.mode.arg())
            .arg(procs.to_string())
            .arg(n.to_string())
            .arg(PEER_CONCURRENCY.to_string())
            .args(peer.extra)
            .current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a run that hangs is stopped with
            // the worker processes it forked.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start node {}", peer.script))?;
        let pid = child.id();
        // Read to the end apart from waiting for the exit: the worker
        // processes the harness forked share its stdout and stderr.
        let stdout = read_all(child.stdout.take());
        let stderr = read_all(child.stderr.take());
        let status = tokio::time::timeout(PEER_PATIENCE, child.wait()).await;
        // A worker process outlives the harness when the harness gave up on
        // it (say a crashed sibling left jobs locked) or was stopped: end
        // whatever is left of the run's process group.
        if let Some(pid) = pid {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status()
                .await;
        }
        let (stdout, stderr) = (stdout.await?, stderr.await?);
        let Ok(status) = status else {
            bail!(
                "no answer within {} s: {}",
                PEER_PATIENCE.as_secs(),
                tail(&stderr)
            );
        };
        let status = status?;
        let stdout = String::from_utf8_lossy(&stdout);
        let line = stdout.lines().rev().find(|l| l.starts_with('{'));
        let rate = match line.map(parse_run) {
            Some(Ok(rate)) if status.success() => Ok(rate),
            Some(Ok(_)) => Err(anyhow::anyhow!("its completion check failed ({status})")),
            Some(Err(e)) => Err(e),
            None => Err(anyhow::anyhow!("{status}, no result: {}", tail(&stderr))),
        };
        if rate.is_err() {
            // What the harness and its workers said, for the reader to judge.
            let text = String::from_utf8_lossy(&stderr);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            for line in lines.iter().take(STDERR_SHOWN) {
                println!("peers:   | {line}");
            }
        }
        rate
    }
}

/// Everything a child writes to this pipe, until every writer closed it.
fn read_all<R>(pipe: Option<R>) -> tokio::task::JoinHandle<Vec<u8>>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut out).await;
        }
        out
    })
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A harness result line's end-to-end jobs/s, when its own check passed.
fn parse_run(line: &str) -> Result<f64> {
    let run: serde_json::Value = serde_json::from_str(line).context("harness result line")?;
    if run["ok"] != serde_json::Value::Bool(true) {
        bail!("its completion check failed: {line}");
    }
    run["e2e_rate"]
        .as_f64()
        .context("harness result line without e2e_rate")
}

/// The line of a child's stderr that says what went wrong: the first error
/// line that is not a stack frame (what failed first; later ones are often
/// its echoes), else the last line that is not node's closing `Node.js vX`.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .iter()
        .find(|l| !l.starts_with(char::is_whitespace) && l.contains("Error"))
        .or_else(|| lines.iter().rev().find(|l| !l.starts_with("Node.js v")))
        .map_or("nothing on stderr", |l| l.trim())
        .to_string()
}

/// Copies the files of `from` (not its folders: node_modules, results) into
/// a fresh `to`.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Creates the databases the harness scripts use, when missing.
async fn create_databases(admin_url: &str, names: &[&str]) -> Result<()> {
    let (admin, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to Postgres (set DATABASE_URL)")?;
    tokio::spawn(conn);
    for name in names {
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[name])
            .await?
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keel() -> Vec<KeelRow> {
        ["e2e-jobs", "batch-e2e", "claim-e2e"]
            .iter()
            .zip([3000.0, 4000.0, 3500.0])
            .map(|(name, rate)| KeelRow {
                name: name.to_string(),
                jobs_per_sec: rate,
                errors: 0,
                cpu_us_per_job: vec![("jobs".into(), 75.0), ("worker x2".into(), 52.4)],
                servers_per_job: Some(ServerCost {
                    postgres_us: Some(181.2),
                    redis_us: Some(21.7),
                    wal_bytes: Some(1904.0),
                }),
            })
            .collect()
    }

    fn peer(system: &str, config: &str, mode: Mode) -> &'static Peer {
        PEERS
            .iter()
            .find(|p| p.system == system && p.config == config && p.mode == mode)
            .unwrap()
    }

    #[test]
    fn a_harness_line_gives_its_end_to_end_rate_only_when_its_check_passed() {
        let ok = r#"{"lib":"bullmq","enqueue":"single","e2e_rate":6527.25,"ok":true}"#;
        assert_eq!(parse_run(ok).unwrap(), 6527.25);
        let failed = r#"{"lib":"bullmq","e2e_rate":6527.25,"ok":false}"#;
        assert!(
            parse_run(failed)
                .unwrap_err()
                .to_string()
                .contains("completion check failed")
        );
        assert!(parse_run("{not json").is_err());
    }

    #[test]
    fn ratios_set_each_peer_against_the_keel_scenarios_enqueueing_the_same_way() {
        let peers = [
            PeerResult {
                peer: peer(BULLMQ, "default", Mode::Single),
                e2e: Ok(6000.0),
                cpu_us_per_job: Some(120.4),
                // Redis on this machine, Postgres elsewhere.
                servers_per_job: Some(ServerCost {
                    postgres_us: None,
                    redis_us: Some(88.0),
                    wal_bytes: None,
                }),
            },
            PeerResult {
                peer: peer(GRAPHILE, "batching on", Mode::Bulk),
                e2e: Err("no answer within 1200 s".into()),
                cpu_us_per_job: None,
                servers_per_job: None,
            },
        ];
        let table = table(&keel(), &peers);
        assert!(
            table.contains(
                "| Keel (Postgres + Redis) | e2e-jobs: one CreateJob per job, stream workers | 3,000 | | \
                 jobs 75, worker x2 52 | Postgres 181 us, Redis 22 us, WAL 1904 B |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| 6,000 | e2e-jobs 0.50, claim-e2e 0.58 | node (producer + workers) 120 | Redis 88 us |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| failed: no answer within 1200 s |  |  |  |"),
            "{table}"
        );

        let targets = targets(&keel(), &peers);
        assert!(
            targets.contains(
                "- e2e-jobs >= 0.6 x BullMQ single: 0.50 (3,000 / 6,000 jobs/s): not met"
            ),
            "{targets}"
        );
        assert!(
            targets.contains(
                "- batch-e2e >= 0.5 x graphile-worker batching-on bulk: not measured: the peer run failed"
            ),
            "{targets}"
        );
    }

    #[test]
    fn a_keel_scenario_with_errors_gives_no_ratio() {
        let mut keel = keel();
        keel[1].errors = 19_606;
        let peers = [PeerResult {
            peer: peer(GRAPHILE, "batching on", Mode::Bulk),
            e2e: Ok(8000.0),
            cpu_us_per_job: None,
            servers_per_job: None,
        }];
        let table = table(&keel, &peers);
        assert!(table.contains("| 4,000 (19606 errors) |"), "{table}");
        assert!(table.contains("| 8,000 |  |"), "{table}");
        assert!(
            targets(&keel, &peers).contains(
                "batching-on bulk: not measured: batch-e2e had 19606 errors (jobs not created or not finished)"
            )
        );
    }

    #[test]
    fn a_target_reached_reads_met() {
        let peers = [PeerResult {
            peer: peer(GRAPHILE, "batching on", Mode::Bulk),
            e2e: Ok(8000.0),
            cpu_us_per_job: None,
            servers_per_job: None,
        }];
        assert!(
            targets(&keel(), &peers).contains("batching-on bulk: 0.50 (4,000 / 8,000 jobs/s): met")
        );
    }

    #[test]
    fn a_failed_run_is_summed_up_by_its_error_line() {
        let stderr = b"/tmp/peers/harness.js:28\n    throw new Error(`timeout`);\n    ^\n\n\
            Error: timeout: 19986/20000\n    at waitDone (/tmp/peers/harness.js:28:41)\n\n\
            Node.js v20.20.2\n";
        assert_eq!(tail(stderr), "Error: timeout: 19986/20000");
        assert_eq!(tail(b"npm ERR! network\n"), "npm ERR! network");
        assert_eq!(
            tail(b"Error: connect ECONNREFUSED\nlater: Error [ERR_IPC_CHANNEL_CLOSED]\n"),
            "Error: connect ECONNREFUSED"
        );
        assert_eq!(tail(b"just this\nNode.js v20.20.2\n"), "just this");
        assert_eq!(tail(b""), "nothing on stderr");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(20879.4), "20,879");
        assert_eq!(thousands(999.6), "1,000");
        assert_eq!(thousands(1234567.0), "1,234,567");
        assert_eq!(thousands(12.0), "12");
    }

    #[test]
    fn a_missing_harness_is_refused_before_anything_runs() {
        let opts = <Opts as clap::Parser>::parse_from([
            "keel-bench",
            "--peers",
            "--peers-dir",
            "/nonexistent/peers",
        ]);
        let error = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(Harness::prepare(&opts))
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("--peers-dir /nonexistent/peers: no harness.js there"),
            "{error}"
        );
    }
}
