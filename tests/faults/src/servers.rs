//! Private Redis and Postgres servers that a test may stop and start again.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_shared::testing;

use crate::WAIT;
use crate::processes::{Proc, Sandbox, free_port};

/// A private `redis-server` (no persistence) on a port of its own, which a
/// test may kill and start again on the same port.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    starts: u32,
    proc: Option<Proc>,
}

impl PrivateRedis {
    /// None (with the reason printed) when `redis-server` is not installed.
    pub async fn start(sandbox: &Sandbox) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            report!("SKIPPED: redis-server is not installed");
            return None;
        }
        let mut redis = Self {
            port: free_port(),
            dir: sandbox.dir.clone(),
            starts: 0,
            proc: None,
        };
        redis.restart().await;
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: everything in memory is gone.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts (again) on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        self.starts += 1;
        let mut command = Command::new("redis-server");
        command.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.display().to_string(),
        ]);
        let log = self.dir.join(format!("redis-{}.log", self.starts));
        self.proc = Some(Proc::spawn(command, &log));
        let url = self.url();
        testing::eventually(WAIT, "private redis-server to answer", || async {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                return false;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return false;
            };
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
        })
        .await;
    }
}

/// A private Postgres cluster from the local binaries (`initdb`, `pg_ctl`),
/// run as the `postgres` user when we are root, stopped on drop.
pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    as_postgres: bool,
    running: bool,
}

impl PrivatePostgres {
    /// Initialises and starts a cluster; Err(reason) when no binaries exist.
    pub fn start(sandbox: &Sandbox) -> Result<Self, String> {
        let bin = pg_bindir().ok_or("no PostgreSQL initdb under /usr/lib/postgresql/*/bin")?;
        let dir = sandbox.dir.join("pg");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let as_postgres = is_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&sandbox.dir)
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err("chown to the postgres user failed (no such user?)".into());
            }
        }
        let pg = Self {
            port: free_port(),
            bin,
            dir,
            as_postgres,
            running: false,
        };
        let data = pg.dir.join("data");
        let log = std::fs::File::create(pg.dir.join("initdb.log")).map_err(|e| e.to_string())?;
        let status = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("initdb failed, see {}", pg.dir.display()));
        }
        let mut pg = pg;
        pg.start_server();
        Ok(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_server(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start failed, see {}",
            self.dir.display()
        );
        self.running = true;
    }

    /// `pg_ctl stop -m immediate`: a crash, as far as clients can tell;
    /// committed transactions survive through the WAL.
    pub fn crash(&mut self) {
        assert!(
            self.stop(),
            "pg_ctl stop failed, see {}",
            self.dir.display()
        );
    }

    fn stop(&mut self) -> bool {
        self.running = false;
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn command(&self, tool: &str) -> Command {
        let program = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            self.stop();
        }
    }
}

fn pg_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").exists())
        .collect();
    // Highest major version first.
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// How a [`PrivatePgBouncer`] hands out server connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client connection, for its whole life.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// A private `pgbouncer` on a port of its own, in front of the Postgres
/// server at `upstream` (`postgres://user@host:port/...`): every database of
/// that server under its own name, trust authentication, logs in the sandbox.
/// Run as the `postgres` user when we are root (PgBouncer refuses root).
pub struct PrivatePgBouncer {
    pub port: u16,
    pub mode: PoolMode,
    _proc: Proc,
}

impl PrivatePgBouncer {
    /// None (with the reason printed) when `pgbouncer` is not installed
    /// (`apt-get install pgbouncer`; scripts/test.sh does it as root).
    pub async fn start(sandbox: &Sandbox, upstream: &str, mode: PoolMode) -> Option<Self> {
        let Some(program) = pgbouncer_program() else {
            report!("SKIPPED: pgbouncer is not installed (Debian: apt-get install pgbouncer)");
            return None;
        };
        let upstream: tokio_postgres::Config = upstream.parse().expect("upstream Postgres URL");
        let host = match upstream.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_string(),
        };
        let upstream_port = upstream.get_ports().first().copied().unwrap_or(5432);
        let user = upstream.get_user().unwrap_or("postgres").to_string();
        let port = free_port();
        let dir = sandbox.dir.join(format!("pgbouncer-{}", mode.as_str()));
        std::fs::create_dir_all(&dir).expect("create pgbouncer dir");
        let userlist = dir.join("userlist.txt");
        std::fs::write(&userlist, format!("\"{user}\" \"\"\n")).expect("write userlist");
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 * = host={host} port={upstream_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {userlist}\n\
                 admin_users = {user}\n\
                 pool_mode = {mode}\n\
                 max_client_conn = 500\n\
                 default_pool_size = 20\n\
                 ignore_startup_parameters = extra_float_digits\n",
                userlist = userlist.display(),
                mode = mode.as_str(),
            ),
        )
        .expect("write pgbouncer.ini");
        let mut command = Command::new(program);
        if is_root() {
            command.args(["-u", "postgres"]);
        }
        command.arg(&ini);
        let log = sandbox.dir.join(format!("pgbouncer-{}.log", mode.as_str()));
        let bouncer = Self {
            port,
            mode,
            _proc: Proc::spawn(command, &log),
        };
        let url = bouncer.url("pgbouncer");
        testing::eventually(WAIT, "private pgbouncer to answer", || async {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    client.simple_query("SHOW VERSION").await.is_ok()
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    false
                }
            }
        })
        .await;
        Some(bouncer)
    }

    /// The URL of database `db` through this pooler (`pgbouncer`: its admin console).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

/// `pgbouncer` on PATH, else Debian's /usr/sbin/pgbouncer (not on a
/// non-root PATH).
fn pgbouncer_program() -> Option<PathBuf> {
    ["pgbouncer", "/usr/sbin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}
