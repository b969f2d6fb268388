//! Starts the real Keel binaries (and workers) as child processes on free
//! ports against a fresh database and Redis prefix, and reads their CPU time
//! and memory from /proc.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use redis::AsyncCommands;

use crate::stats::ServerCost;

/// A process's (name, CPU seconds so far, peak RSS in MiB).
pub(crate) type Usage = (String, f64, f64);

pub(crate) struct System {
    pub auth: String,
    pub jobs: String,
    pub memory: String,
    /// URL of the bench database (for seeding and the raw-SQL baseline).
    pub db_url: String,
    /// The services' KEEL_WORKER_TOKEN, for the bench's own claiming workers.
    pub worker_token: String,
    admin_url: String,
    db_name: String,
    bin_dir: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    redis_url: String,
    services: Vec<(String, Child)>,
    workers: Vec<Child>,
    /// Stands in for autovacuum's ANALYZE when the server has it off.
    analyzer: Option<tokio::task::JoinHandle<()>>,
    /// `--keep-database`: not dropped at the end.
    keep_database: bool,
}

/// How often the bench runs ANALYZE when the server's autovacuum is off:
/// autovacuum's own pace (`autovacuum_naptime`, 60 s by default, is how
/// often it visits a database). Analyzing more often than a real server
/// would hid plans that go wrong between two visits (a StartJob batch
/// scanning every queued job) and cost a fifth of a core in ANALYZE.
const ANALYZE_EVERY: Duration = Duration::from_secs(60);

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl System {
    pub(crate) async fn start(
        bin_dir: &Path,
        admin_url: &str,
        redis_url: &str,
        keep_database: bool,
    ) -> Result<Self> {
        let db_name = format!("keel_bench_{}", std::process::id());
        let (admin, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
            .await
            .with_context(|| "cannot connect to Postgres (set DATABASE_URL)".to_string())?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
            ))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{db_name}\""))
            .await?;
        let db_url = keel_shared::db::with_dbname(admin_url, &db_name);
        let autovacuum: String = admin.query_one("SHOW autovacuum", &[]).await?.get(0);
        let analyzer = if autovacuum == "off" {
            println!(
                "keel-bench: this Postgres runs with autovacuum off; every {}s the bench analyzes \
                 the tables of its database that autovacuum would, as autovacuum would",
                ANALYZE_EVERY.as_secs()
            );
            Some(tokio::spawn(analyze_every(db_url.clone(), ANALYZE_EVERY)))
        } else {
            None
        };
        let dir = std::env::temp_dir().join(&db_name);
        std::fs::create_dir_all(&dir)?;
        let (auth, jobs, memory) = (
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
            format!("127.0.0.1:{}", free_port()?),
        );
        let key = dir.join("signing.pem");
        let worker_token = format!("bench-{}", uuid::Uuid::new_v4());
        let env = vec![
            ("DATABASE_URL".into(), db_url.clone()),
            ("REDIS_URL".into(), redis_url.to_string()),
            ("KEEL_REDIS_PREFIX".into(), db_name.clone()),
            ("KEEL_WORKER_TOKEN".into(), worker_token.clone()),
            (
                "KEEL_JWT_PRIVATE_KEY_FILE".into(),
                key.display().to_string(),
            ),
            ("KEEL_JWT_GENERATE_KEY".into(), "true".into()),
            (
                "KEEL_JWT_PUBLIC_KEY_FILES".into(),
                format!("{}.pub", key.display()),
            ),
            ("KEEL_AUTH_ADDR".into(), auth.clone()),
            ("KEEL_JOBS_ADDR".into(), jobs.clone()),
            ("KEEL_MEMORY_ADDR".into(), memory.clone()),
            ("KEEL_JOBS_URL".into(), format!("http://{jobs}")),
            ("RUST_LOG".into(), "warn".into()),
        ];
        let mut system = Self {
            auth,
            jobs,
            memory,
            db_url,
            worker_token,
            admin_url: admin_url.to_string(),
            db_name,
            bin_dir: bin_dir.to_path_buf(),
            dir,
            env,
            redis_url: redis_url.to_string(),
            services: Vec::new(),
            workers: Vec::new(),
            analyzer,
            keep_database,
        };
        for (name, addr) in [
            ("auth", system.auth.clone()),
            ("jobs", system.jobs.clone()),
            ("memory", system.memory.clone()),
        ] {
            let child = system.spawn(name, &[])?;
            system.services.push((name.to_string(), child));
            system.wait_healthy(name, &addr).await?;
        }
        Ok(system)
    }

    fn spawn(&self, name: &str, extra: &[(&str, String)]) -> Result<Child> {
        let bin = self.bin_dir.join(format!("keel-{name}"));
        let log = std::fs::File::create(
            self.dir
                .join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple())),
        )?;
        let mut cmd = Command::new(&bin);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log);
        cmd.spawn().with_context(|| {
            format!(
                "cannot start {} (build it first: cargo build --release --bins)",
                bin.display()
            )
        })
    }

    async fn wait_healthy(&self, name: &str, addr: &str) -> Result<()> {
        for _ in 0..300 {
            if keel_shared::grpc_client::probe(addr).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "keel-{name} did not become healthy on {addr}; logs in {}",
            self.dir.display()
        )
    }

    /// Starts `n` worker processes with `concurrency` handlers each.
    pub(crate) async fn start_workers(&mut self, n: usize, concurrency: usize) -> Result<()> {
        for _ in 0..n {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let child = self.spawn(
                "worker",
                &[
                    ("KEEL_WORKER_HEALTH_ADDR", addr.clone()),
                    ("KEEL_WORKER_CONCURRENCY", concurrency.to_string()),
                ],
            )?;
            self.workers.push(child);
            self.wait_healthy("worker", &addr).await?;
        }
        Ok(())
    }

    pub(crate) fn has_workers(&self) -> bool {
        !self.workers.is_empty()
    }

    pub(crate) fn stop_workers(&mut self) {
        for mut w in self.workers.drain(..) {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// (name, CPU seconds so far, peak RSS in MiB) of each service process and of the workers together.
    /// Resident memory (MiB) of each service now, and the largest worker's.
    pub(crate) fn rss_now(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .services
            .iter()
            .map(|(name, c)| (name.clone(), status_mib(c.id(), "VmRSS:")))
            .collect();
        if !self.workers.is_empty() {
            let rss = self
                .workers
                .iter()
                .map(|c| status_mib(c.id(), "VmRSS:"))
                .fold(0.0, f64::max);
            out.push(("worker".into(), rss));
        }
        out
    }

    /// Redis connections a service holds now: (all, in pub/sub mode). Its
    /// sockets come from /proc; Redis's `CLIENT LIST` says which subscribe.
    pub(crate) async fn redis_connections(&self, name: &str) -> Result<(usize, usize)> {
        let pid = self
            .services
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
            .context("no such service")?;
        let client = redis::Client::open(self.redis_url.as_str())?;
        let redis_port = match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(_, port) => *port,
            _ => bail!("counting Redis connections needs a TCP REDIS_URL"),
        };
        let ports = tcp_ports_to(pid, redis_port);
        let mut conn = client.get_multiplexed_async_connection().await?;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await?;
        let (mut all, mut pubsub) = (0, 0);
        for line in list.lines() {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            };
            let port = field("addr")
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u16>().ok());
            if port.is_some_and(|p| ports.contains(&p)) {
                all += 1;
                pubsub += usize::from(field("flags").is_some_and(|f| f.contains('P')));
            }
        }
        Ok((all, pubsub))
    }

    pub(crate) fn usage(&self) -> Vec<Usage> {
        let mut out: Vec<Usage> = self
            .services
            .iter()
            .map(|(name, c)| {
                let (cpu, hwm) = proc_usage(c.id());
                (name.clone(), cpu, hwm)
            })
            .collect();
        if !self.workers.is_empty() {
            let (cpu, hwm) = self
                .workers
                .iter()
                .map(|c| proc_usage(c.id()))
                .fold((0.0, 0.0), |(c, h), (c2, h2)| (c + c2, f64::max(h, h2)));
            out.push((format!("worker x{}", self.workers.len()), cpu, hwm));
        }
        out
    }
}

/// CPU seconds so far of this process (the bench client).
pub(crate) fn own_cpu() -> f64 {
    proc_usage(std::process::id()).0
}

/// CPU seconds so far of this process's children that it has waited for
/// (and of the children they waited for): the peer harness's node processes.
pub(crate) fn children_cpu() -> f64 {
    // cutime and cstime are the 16th and 17th fields.
    stat_seconds(std::process::id(), [13, 14])
}

/// What the Postgres and Redis servers did so far, read before and after a
/// run to tell their share of the cost per job: the CPU of their processes
/// on this machine (every process named `postgres` or `redis-server`, and
/// the exited ones their parents waited for, such as a closed connection's
/// backend; a server on another machine is not seen), and the position of
/// Postgres's write-ahead log. Everything the servers did in between counts,
/// other clients' work included: figures for a machine running only the
/// bench.
pub(crate) struct ServerWork {
    /// CPU seconds of the `postgres` processes; `None`: none on this machine.
    postgres_cpu: Option<f64>,
    /// CPU seconds of the `redis-server` processes; `None`: none here.
    redis_cpu: Option<f64>,
    /// The WAL position in bytes; `None`: it could not be read.
    wal_bytes: Option<f64>,
}

impl ServerWork {
    /// The servers' CPU and WAL now; `db_url` is any database of the server.
    pub(crate) async fn read(db_url: &str) -> Self {
        let wal_bytes = async {
            let (db, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
                .await
                .ok()?;
            tokio::spawn(conn);
            let row = db
                .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
                .await
                .ok()?;
            row.get::<_, Option<f64>>(0)
        }
        .await;
        let (mut postgres_cpu, mut redis_cpu) = (None, None);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            let server = match comm.trim_end() {
                "postgres" => &mut postgres_cpu,
                "redis-server" => &mut redis_cpu,
                _ => continue,
            };
            // utime and stime, and the waited-for children's cutime and cstime.
            let cpu = stat_seconds(pid, [11, 12]) + stat_seconds(pid, [13, 14]);
            *server = Some(server.unwrap_or(0.0) + cpu);
        }
        Self {
            postgres_cpu,
            redis_cpu,
            wal_bytes,
        }
    }

    /// Per job since `before` (what either reading lacks is `None`).
    pub(crate) fn per_job(&self, before: &Self, jobs: usize) -> ServerCost {
        let jobs = jobs.max(1) as f64;
        let per_job = |now: Option<f64>, was: Option<f64>| Some((now? - was?) / jobs);
        ServerCost {
            postgres_us: per_job(self.postgres_cpu, before.postgres_cpu).map(|s| s * 1e6),
            redis_us: per_job(self.redis_cpu, before.redis_cpu).map(|s| s * 1e6),
            wal_bytes: per_job(self.wal_bytes, before.wal_bytes),
        }
    }
}

/// The whole machine's CPU time so far, from the first line of /proc/stat:
/// read before and after a run, the share of the machine's CPU it kept busy
/// (everything running counts, not only the bench and its servers).
pub(crate) struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    pub(crate) fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait irq softirq steal ...
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|v| v.parse().ok())
            .collect();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        let total: u64 = ticks.iter().sum();
        Self {
            busy: total - idle,
            total,
        }
    }

    /// The share (0..=1) of the machine's CPU busy since `before`.
    pub(crate) fn busy_since(&self, before: &Self) -> f64 {
        let total = self.total.saturating_sub(before.total);
        self.busy.saturating_sub(before.busy) as f64 / total.max(1) as f64
    }
}

/// CPU seconds (user + system) and peak RSS (MiB) of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    // utime and stime are the 14th and 15th fields.
    (stat_seconds(pid, [11, 12]), status_mib(pid, "VmHWM:"))
}

/// The sum of two clock-tick fields of /proc/<pid>/stat, in seconds;
/// `fields` count from the one after the parenthesised command name (the 3rd).
fn stat_seconds(pid: u32, fields: [usize; 2]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let values: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        values
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(fields[0]) + ticks(fields[1])) / 100.0 // USER_HZ is 100 on Linux
}

/// Local ports of the process's TCP connections to `remote_port`, from its
/// socket inodes (/proc/<pid>/fd) and the kernel's socket tables.
fn tcp_ports_to(pid: u32, remote_port: u16) -> std::collections::HashSet<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let port = |hex_addr: &str| u16::from_str_radix(hex_addr.rsplit_once(':')?.1, 16).ok();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let (local, remote, inode) = (f.get(1)?, f.get(2)?, f.get(9)?);
                    (inodes.contains(*inode) && port(remote)? == remote_port)
                        .then(|| port(local))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A memory line of /proc/<pid>/status (`VmRSS:`, `VmHWM:`), in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

impl Drop for System {
    fn drop(&mut self) {
        if let Some(analyzer) = self.analyzer.take() {
            analyzer.abort();
        }
        self.stop_workers();
        for (_, c) in &mut self.services {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.keep_database {
            println!("keel-bench: kept database {}", self.db_name);
            return;
        }
        let admin_url = self.admin_url.clone();
        let redis_url = self.redis_url.clone();
        let db = self.db_name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                if let Err(e) = drop_redis_prefix(&redis_url, &db).await {
                    eprintln!("keel-bench: could not delete the Redis keys under {db}: {e}");
                }
                let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Deletes every Redis key under `prefix` (the services' `KEEL_REDIS_PREFIX`):
/// the job streams, their groups and the served kinds a run leaves behind.
async fn drop_redis_prefix(url: &str, prefix: &str) -> Result<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<'_, String> = conn.scan_match(format!("{prefix}:*")).await?;
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
        keys
    };
    for chunk in keys.chunks(500) {
        redis::cmd("UNLINK")
            .arg(chunk)
            .query_async::<()>(&mut conn)
            .await?;
    }
    Ok(())
}

/// Every `every`, runs ANALYZE on the tables of the database at `url` that
/// autovacuum would analyze (its default thresholds: 50 rows plus 10% of the
/// table changed since the last analyze). Fresh statistics also make
/// Postgres re-plan the services' prepared statements, which would otherwise
/// keep plans chosen while the tables were small. Errors only end it.
async fn analyze_every(url: String, every: Duration) {
    const DUE: &str = "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables
                       WHERE n_mod_since_analyze > 50 + 0.1 * greatest(n_live_tup, 0)";
    let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        return;
    };
    tokio::spawn(conn);
    loop {
        tokio::time::sleep(every).await;
        let Ok(due) = client.query(DUE, &[]).await else {
            return;
        };
        for row in due {
            let table: String = row.get(0);
            if client
                .batch_execute(&format!("ANALYZE {table}"))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
