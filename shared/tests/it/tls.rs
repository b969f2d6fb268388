//! TLS against real servers: a private Postgres with `ssl=on` and a
//! hostssl-only pg_hba (plain connections are refused), and a
//! `redis-server --tls-port`, both serving a certificate for `localhost`
//! signed by a CA made here with rcgen. Connections go through what the
//! binaries use (`db::connect`, `redis::pool`/`redis::client`), and the
//! assertions are on the error text an operator would see.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pki::{TempDir, ca};
use keel_shared::config::{DatabaseConfig, RedisConfig};
use rcgen::{CertificateParams, DnType, KeyPair};

/// PEM files: `ca.pem` (signs the server's certificate), `other-ca.pem`
/// (signs nothing the servers present), `server.pem`/`server.key` (for the
/// name `localhost` only).
struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn generate(dir: &Path) -> Self {
        let ca_cert = ca("Keel test CA");
        let other = ca("Some other CA");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca_cert).expect("server cert");
        let pki = Self {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
        std::fs::write(&pki.other_ca, other.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The newest `/usr/lib/postgresql/*/bin` holding `initdb`, or `initdb`'s
/// directory on PATH.
fn pg_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    dirs.sort();
    if let Some((_, bin)) = dirs.pop() {
        return Some(bin);
    }
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

/// A private Postgres cluster serving TLS only, run as the `postgres` user
/// when we are root (as CI is), stopped on drop.
struct TlsPostgres {
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    as_postgres: bool,
}

impl TlsPostgres {
    /// Err(reason) when this machine cannot run one.
    fn start(dir: &Path, pki: &Pki) -> Result<Self, String> {
        let bin = pg_bindir().ok_or("no initdb under /usr/lib/postgresql/*/bin or on PATH")?;
        let as_postgres = is_root();
        let pg = Self {
            port: free_port(),
            bin,
            dir: dir.to_path_buf(),
            as_postgres,
        };
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err("root, and chown to the postgres user failed (no such user?)".into());
            }
        }
        // Postgres refuses a key others can read.
        let ok = pg
            .command("chmod")
            .arg("600")
            .arg(&pki.key)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err("chmod 600 on the server key failed".into());
        }
        let data = dir.join("data");
        let initdb = pg
            .command(&pg.bin.join("initdb").display().to_string())
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !initdb.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&initdb.stderr).trim()
            ));
        }
        // TLS only over TCP: a plain TCP connection matches no line.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl all all ::1/128 trust\n",
        )
        .map_err(|e| e.to_string())?;
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on \
             -c ssl_cert_file={} -c ssl_key_file={}",
            pg.port,
            dir.display(),
            pki.cert.display(),
            pki.key.display()
        );
        let started = pg
            .command(&pg.bin.join("pg_ctl").display().to_string())
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if !started.status.success() {
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            return Err(format!("pg_ctl start failed: {log}"));
        }
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        }
    }

    /// A config for `host` with these query parameters, giving up after 1s.
    fn config(&self, host: &str, params: &str) -> DatabaseConfig {
        let mut cfg = DatabaseConfig::from_url(format!(
            "postgres://postgres@{host}:{}/postgres{params}",
            self.port
        ));
        cfg.db_pool_size = 1;
        cfg.db_connect_timeout_secs = 1;
        cfg
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = self
            .command(&self.bin.join("pg_ctl").display().to_string())
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Connects as a binary does; Ok(whether the session is encrypted), or
/// the start-up error's text (which must be one line).
async fn connect(cfg: &DatabaseConfig) -> Result<bool, String> {
    match keel_shared::db::connect(cfg).await {
        Ok(pool) => {
            let client = pool.get().await.expect("pooled connection");
            let row = client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .expect("query over the connection");
            Ok(row.get(0))
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                !text.contains('\n'),
                "start-up error is not one line: {text}"
            );
            Err(text)
        }
    }
}

#[tokio::test]
async fn postgres_sslmodes_against_a_tls_only_server() {
    let dir = TempDir::new("pg");
    let pki = Pki::generate(&dir.0);
    let pg = match TlsPostgres::start(&dir.0, &pki) {
        Ok(pg) => pg,
        Err(reason) => {
            eprintln!("SKIPPED postgres_sslmodes_against_a_tls_only_server: {reason}");
            return;
        }
    };
    let ca = pki.ca.display().to_string();
    let other_ca = pki.other_ca.display().to_string();
    let port = pg.port;

    // verify-full, the CA, the name on the certificate: connects, encrypted.
    let full = pg.config(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    );
    assert_eq!(connect(&full).await, Ok(true), "verify-full with the CA");

    // The same CA through KEEL_DB_CA_FILE instead of the URL.
    let mut via_setting = pg.config("localhost", "?sslmode=verify-full");
    via_setting.db_ca_file = Some(pki.ca.clone());
    assert_eq!(
        connect(&via_setting).await,
        Ok(true),
        "verify-full, KEEL_DB_CA_FILE"
    );

    // verify-full to a host the certificate does not name: refused.
    let wrong_host = pg.config(
        "127.0.0.1",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    );
    let err = connect(&wrong_host)
        .await
        .expect_err("verify-full, wrong host");
    assert_eq!(
        err,
        format!(
            "Postgres at 127.0.0.1:{port}/postgres: TLS certificate is for localhost \
             but the host is 127.0.0.1 with sslmode=verify-full"
        )
    );

    // No CA given: the system's roots, which do not know ours.
    let system_roots = pg.config("localhost", "?sslmode=verify-full");
    let err = connect(&system_roots)
        .await
        .expect_err("verify-full, system roots");
    assert!(
        err.ends_with("TLS certificate not trusted (unknown issuer) with sslmode=verify-full")
            || err.contains("no system root certificates found"),
        "{err}"
    );

    // verify-ca checks the chain, not the name: the same host connects.
    let chain_only = pg.config("127.0.0.1", &format!("?sslmode=verify-ca&sslrootcert={ca}"));
    assert_eq!(
        connect(&chain_only).await,
        Ok(true),
        "verify-ca, other host name"
    );

    // A CA that did not sign the server's certificate: refused, in both modes.
    for mode in ["verify-full", "verify-ca"] {
        let untrusted = pg.config(
            "localhost",
            &format!("?sslmode={mode}&sslrootcert={other_ca}"),
        );
        let err = connect(&untrusted).await.expect_err("untrusted CA");
        assert_eq!(
            err,
            format!(
                "Postgres at localhost:{port}/postgres: TLS certificate not trusted \
                 (unknown issuer) with sslmode={mode}"
            )
        );
    }

    // require encrypts without verifying ...
    let require = pg.config("127.0.0.1", "?sslmode=require");
    assert_eq!(connect(&require).await, Ok(true), "require without a CA");
    // ... unless a root certificate is given: then it checks the chain (libpq).
    let mut require_ca = pg.config("127.0.0.1", "?sslmode=require");
    require_ca.db_ca_file = Some(pki.other_ca.clone());
    let err = connect(&require_ca)
        .await
        .expect_err("require with an untrusted CA");
    assert!(
        err.contains("not trusted (unknown issuer) with sslmode=require"),
        "{err}"
    );

    // prefer takes TLS when offered.
    let prefer = pg.config("localhost", "?sslmode=prefer");
    assert_eq!(connect(&prefer).await, Ok(true), "prefer");

    // disable (and no sslmode at all, today's default) is plain TCP, which
    // this server's pg_hba refuses.
    for params in ["?sslmode=disable", ""] {
        let plain = pg.config("127.0.0.1", params);
        let err = connect(&plain)
            .await
            .expect_err("plain TCP to a TLS-only server");
        assert!(
            err.starts_with(&format!(
                "cannot reach Postgres at 127.0.0.1:{port}/postgres"
            )) && err.contains("no pg_hba.conf entry")
                && err.contains("no encryption"),
            "{params:?}: {err}"
        );
    }

    // An unreadable CA file names the setting it came from.
    let mut missing = pg.config("localhost", "?sslmode=verify-full");
    missing.db_ca_file = Some(dir.0.join("absent.pem"));
    let err = connect(&missing).await.expect_err("missing CA file");
    assert!(
        err.starts_with("KEEL_DB_CA_FILE is invalid: cannot read CA file"),
        "{err}"
    );
}

/// A `redis-server` listening for TLS only, killed on drop.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    fn start(dir: &Path, pki: &Pki) -> Result<Self, String> {
        let port = free_port();
        let mut child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&pki.cert)
            .arg("--tls-key-file")
            .arg(&pki.key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args(["--tls-auth-clients", "no", "--bind", "127.0.0.1 -::1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                let line = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .to_string();
                return Err(format!(
                    "redis-server refused --tls-port (built without TLS?): {line}"
                ));
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self { port, child });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("redis-server did not listen within 10s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PING through the pool every service uses; the error text when it fails.
async fn redis_ping(cfg: &RedisConfig) -> Result<String, String> {
    let pool = keel_shared::redis::pool(cfg).map_err(|e| e.to_string())?;
    let mut conn = pool
        .get()
        .await
        .map_err(|e| keel_shared::error::source_chain(&e))?;
    redis::cmd("PING")
        .query_async::<String>(&mut *conn)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn rediss_urls_with_a_ca_file() {
    let dir = TempDir::new("redis");
    let pki = Pki::generate(&dir.0);
    let server = match TlsRedis::start(&dir.0, &pki) {
        Ok(server) => server,
        Err(reason) => {
            eprintln!("SKIPPED rediss_urls_with_a_ca_file: {reason}");
            return;
        }
    };
    let url = |host: &str| format!("rediss://{host}:{}", server.port);
    let with_ca = |host: &str, ca: &Path| {
        let mut cfg = RedisConfig::new(url(host), "tls-test");
        cfg.redis_ca_file = Some(ca.to_path_buf());
        cfg
    };

    // The CA in KEEL_REDIS_CA_FILE, the name on the certificate: works,
    // through the pool and through a client (pub/sub, stream readers).
    let good = with_ca("localhost", &pki.ca);
    assert_eq!(redis_ping(&good).await, Ok("PONG".to_string()));
    let client = keel_shared::redis::client(&good).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("client connection over TLS");
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");

    // Refused: a CA that did not sign the certificate, no CA file (the
    // system's roots do not know ours), a host the certificate does not name.
    let untrusted = redis_ping(&with_ca("localhost", &pki.other_ca)).await;
    assert!(
        matches!(&untrusted, Err(e) if e.contains("UnknownIssuer")),
        "{untrusted:?}"
    );
    let system_roots = redis_ping(&RedisConfig::new(url("localhost"), "tls-test")).await;
    assert!(
        matches!(&system_roots, Err(e) if e.contains("UnknownIssuer")),
        "{system_roots:?}"
    );
    let wrong_host = redis_ping(&with_ca("127.0.0.1", &pki.ca)).await;
    assert!(
        matches!(&wrong_host, Err(e) if e.contains("not valid for name")),
        "{wrong_host:?}"
    );

    // A plain redis:// URL to the TLS port gets no answer it understands.
    let plain = redis_ping(&RedisConfig::new(
        format!("redis://localhost:{}", server.port),
        "tls-test",
    ))
    .await;
    assert!(plain.is_err(), "{plain:?}");

    // A CA file with a redis:// URL is a mistake, said at start-up.
    let mut mismatch = RedisConfig::new(format!("redis://localhost:{}", server.port), "t");
    mismatch.redis_ca_file = Some(pki.ca.clone());
    let err = keel_shared::redis::pool(&mismatch).expect_err("CA file without rediss://");
    assert_eq!(
        err.to_string(),
        "KEEL_REDIS_CA_FILE is invalid: set, but REDIS_URL is not a rediss:// URL"
    );
}
