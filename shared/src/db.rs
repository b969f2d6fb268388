//! The Postgres pool: built once at start-up, with a bounded wait for the
//! server, over TLS as `DATABASE_URL`'s `sslmode` says.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Pool, PoolBuilder, RecyclingMethod, Runtime,
};
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StartupError;
use crate::backoff::Backoff;
use crate::config::DatabaseConfig;
use crate::tls::{self, Verify};

/// libpq's `sslmode`, all five of the values Keel honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP (the default, as for a local server).
    #[default]
    Disable,
    /// TLS when the server offers it, plain otherwise; nothing verified.
    Prefer,
    /// TLS, certificate not verified (unless a CA is given: then as `VerifyCa`).
    Require,
    /// TLS, the certificate chains to a trusted CA; the host name is not checked.
    VerifyCa,
    /// TLS, the certificate chains to a trusted CA and names the host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            other => Err(format!(
                "unknown sslmode {other:?} (disable, prefer, require, verify-ca or verify-full)"
            )),
        }
    }
}

/// `DATABASE_URL` read once: what tokio-postgres understands, plus the TLS
/// parameters it does not (it knows only three sslmodes and no
/// `sslrootcert`), taken out of the URL before it sees it.
#[derive(Debug)]
pub struct DbUrl {
    /// Connection settings, `ssl_mode` already set from `sslmode`.
    pub pg: tokio_postgres::Config,
    pub sslmode: SslMode,
    /// `sslrootcert`: a PEM file of trusted CAs (`system`: the system's roots).
    pub root_cert: Option<PathBuf>,
}

/// Parses a URL (`postgres://...?sslmode=verify-full&sslrootcert=/ca.pem`)
/// or a key=value string (`host=db sslmode=require`): the one place
/// `sslmode` and `sslrootcert` are interpreted.
pub fn parse_url(url: &str) -> Result<DbUrl, StartupError> {
    let invalid = |reason: String| StartupError::InvalidVar {
        var: "DATABASE_URL",
        reason,
    };
    let (rest, params) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        take_url_params(url)
    } else {
        take_keyword_params(url)
    };
    let mut sslmode = SslMode::default();
    let mut root_cert = None;
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => sslmode = value.parse().map_err(invalid)?,
            _ => root_cert = Some(PathBuf::from(value)).filter(|p| !p.as_os_str().is_empty()),
        }
    }
    let mut pg = tokio_postgres::Config::from_str(&rest).map_err(|e| invalid(e.to_string()))?;
    pg.ssl_mode(match sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok(DbUrl {
        pg,
        sslmode,
        root_cert,
    })
}

const TLS_PARAMS: [&str; 2] = ["sslmode", "sslrootcert"];

/// The URL without its `sslmode`/`sslrootcert` query parameters, and those
/// (percent-decoded).
fn take_url_params(url: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if TLS_PARAMS.contains(&key) {
            taken.push((
                key.to_string(),
                percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned(),
            ));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, taken)
}

/// The key=value string without its `sslmode`/`sslrootcert` pairs, and
/// those (values unquoted). Follows libpq's syntax: spaces may surround
/// `=`, values may be single-quoted with backslash escapes.
fn take_keyword_params(s: &str) -> (String, Vec<(String, String)>) {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut kept = String::new();
    let mut taken = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        skip_ws(&mut i);
        let mut value = String::new();
        if i < chars.len() && chars[i] == '=' {
            i += 1;
            skip_ws(&mut i);
            if i < chars.len() && chars[i] == '\'' {
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    value.push(chars[i]);
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && !chars[i].is_whitespace() {
                    value.push(chars[i]);
                    i += 1;
                }
            }
        }
        let end = i.min(chars.len());
        if TLS_PARAMS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            kept.extend(&chars[start..end]);
            kept.push(' ');
        }
    }
    (kept.trim_end().to_string(), taken)
}

/// Builds the pool and waits (up to the configured timeout) until one
/// connection succeeds, so a wrong URL or a down server fails start-up with a
/// message naming host and port. A certificate the `sslmode` refuses fails
/// at once: waiting does not fix it.
pub async fn connect(cfg: &DatabaseConfig) -> Result<Pool, StartupError> {
    let DbUrl {
        pg,
        sslmode,
        root_cert,
    } = parse_url(cfg.url()?)?;
    let target = describe_target(&pg);
    let ca_var = if root_cert.is_some() {
        "DATABASE_URL"
    } else {
        "KEEL_DB_CA_FILE"
    };
    let ca = root_cert.or_else(|| cfg.db_ca_file.clone());
    let verify = match sslmode {
        SslMode::Disable => None,
        SslMode::Prefer => Some(Verify::Nothing),
        // libpq: `require` with a root certificate behaves as verify-ca.
        SslMode::Require if ca.is_some() => Some(Verify::Chain),
        SslMode::Require => Some(Verify::Nothing),
        SslMode::VerifyCa => Some(Verify::Chain),
        SslMode::VerifyFull => Some(Verify::Full),
    };
    let manager_config = || ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let connector = match verify {
        None => None,
        Some(verify) => {
            let roots = match verify {
                Verify::Nothing => rustls::RootCertStore::empty(),
                _ => {
                    let file = ca.as_deref().filter(|p| p.as_os_str() != "system");
                    tls::roots(file).map_err(|reason| match file {
                        Some(_) => StartupError::InvalidVar {
                            var: ca_var,
                            reason,
                        },
                        None => StartupError::Other(format!(
                            "sslmode={} needs a CA to trust: {reason}; set sslrootcert in \
                             DATABASE_URL or KEEL_DB_CA_FILE",
                            sslmode.as_str()
                        )),
                    })?
                }
            };
            let config =
                tls::client_config(verify, roots).map_err(|reason| StartupError::InvalidVar {
                    var: "DATABASE_URL",
                    reason,
                })?;
            Some(MakeRustlsConnect::new(config))
        }
    };
    let build = |max_size: usize| {
        let manager = match &connector {
            None => Manager::from_config(pg.clone(), NoTls, manager_config()),
            Some(tls) => Manager::from_config(pg.clone(), tls.clone(), manager_config()),
        };
        with_session_settings(Pool::builder(manager))
            .max_size(max_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StartupError::InvalidVar {
                var: "DATABASE_URL",
                reason: e.to_string(),
            })
    };
    let pool = build(cfg.db_pool_size.max(1))?;

    let deadline = Instant::now() + cfg.connect_timeout();
    const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut failures = 0;
    loop {
        let err = match pool.get().await {
            Ok(_) => {
                refuse_statement_losing_pooler(&build(1 + PROBE_HOLDERS)?, &target).await?;
                return Ok(pool);
            }
            Err(e) => e,
        };
        let refused = match &err {
            deadpool_postgres::PoolError::Backend(e) => tls::find_rustls_error(e),
            other => tls::find_rustls_error(other),
        };
        if let Some(refused) = refused {
            return Err(StartupError::PostgresTls {
                target,
                cause: tls::describe(refused),
                sslmode: sslmode.as_str(),
            });
        }
        let pause = RETRY.delay(failures);
        if Instant::now() + pause < deadline {
            tracing::warn!(target = %target, error = %err, "Postgres not reachable yet, retrying");
            tokio::time::sleep(pause).await;
            failures += 1;
        } else {
            return Err(StartupError::PostgresUnreachable {
                target,
                waited: cfg.connect_timeout(),
                cause: crate::error::source_chain(&err),
            });
        }
    }
}

/// How long the pooler probe waits for its statement before calling the
/// answer inconclusive (a pooler with one server connection queues it behind
/// the holder's transaction).
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// Transactions opened to pin server connections (see below).
const PROBE_HOLDERS: usize = 2;

/// Refuses a pooler that hands one client connection's transactions to
/// different server connections without carrying named prepared statements
/// along (PgBouncer in transaction mode before 1.21, or later without
/// `max_prepared_statements`): every Keel query is a named prepared
/// statement, so such a pooler fails queries at random under load.
///
/// Detected, not configured: `client` prepares a statement and runs it once
/// (its server connection is now the pooler's most recently used), then
/// up to [`PROBE_HOLDERS`] other connections each open a transaction, pinning
/// a server connection, until one is pinned to `client`'s backend. Run again,
/// the statement must then travel to another backend: a pooler that loses it
/// answers `26000` (`prepared statement "sN" does not exist`). Directly, in
/// session mode, or with a pooler that re-prepares, it simply runs. Anything
/// else (a holder that cannot connect, a queued statement) is inconclusive
/// and logged, not fatal.
/// Settings each new connection gets before its first use.
///
/// JIT off: Keel's statements are short, and once a table is large the
/// planner's estimate for a prepared statement's generic plan can pass
/// `jit_above_cost`, after which Postgres compiles the statement with LLVM
/// on every execution (measured: 250-300 ms per relay round with 100,000
/// jobs waiting, more than half of the machine's CPU). Behind a
/// transaction-mode pooler a session setting may land on another server
/// connection: there, set it on the role (`ALTER ROLE keel SET jit = off`,
/// docs/operations.md).
const SESSION_SETTINGS: &str = "SET jit = off";

fn with_session_settings(builder: PoolBuilder) -> PoolBuilder {
    builder.post_create(Hook::async_fn(|client, _| {
        Box::pin(async move {
            client
                .batch_execute(SESSION_SETTINGS)
                .await
                .map_err(HookError::Backend)
        })
    }))
}

async fn refuse_statement_losing_pooler(probe: &Pool, target: &str) -> Result<(), StartupError> {
    const SQL: &str = "SELECT pg_backend_pid()";
    let inconclusive = |why: &dyn std::fmt::Display| {
        tracing::debug!(target = %target, reason = %why, "connection pooler probe inconclusive");
        Ok(())
    };
    let client = match tokio::time::timeout(PROBE_WAIT, probe.get()).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return inconclusive(&e),
        Err(_) => return inconclusive(&"a connection timed out"),
    };
    let statement = match client.prepare(SQL).await {
        Ok(s) => s,
        Err(e) => return inconclusive(&e),
    };
    let backend: i32 = match client.query_one(&statement, &[]).await {
        Ok(row) => row.get(0),
        Err(e) => return lost_statement(&e, target).map_or_else(|| inconclusive(&e), Err),
    };
    let mut holders = Vec::new();
    for _ in 0..PROBE_HOLDERS {
        let holder = match tokio::time::timeout(PROBE_WAIT, probe.get()).await {
            Ok(Ok(holder)) => holder,
            Ok(Err(e)) => return inconclusive(&e),
            Err(_) => return inconclusive(&"a second connection timed out"),
        };
        let pinned =
            tokio::time::timeout(PROBE_WAIT, holder.simple_query(&format!("BEGIN; {SQL}"))).await;
        let pinned_pid = match pinned {
            Ok(Ok(messages)) => messages.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    row.get(0).and_then(|pid| pid.parse::<i32>().ok())
                }
                _ => None,
            }),
            Ok(Err(e)) => return inconclusive(&e),
            Err(_) => return inconclusive(&"a second transaction timed out"),
        };
        holders.push(holder);
        if pinned_pid == Some(backend) {
            break;
        }
    }
    let again = tokio::time::timeout(PROBE_WAIT, client.query_one(&statement, &[])).await;
    // The probe pool is dropped with its connections: closing the holders
    // ends their transactions (rolled back).
    match again {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => lost_statement(&e, target).map_or_else(|| inconclusive(&e), Err),
        Err(_) => inconclusive(&"the statement waited behind another transaction"),
    }
}

/// The start-up error when `e` says a prepared statement of this session
/// is missing on the server (SQLSTATE 26000).
fn lost_statement(e: &tokio_postgres::Error, target: &str) -> Option<StartupError> {
    let db = e.as_db_error()?;
    (db.code() == &tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME).then(|| {
        StartupError::Other(format!(
            "Postgres at {target} is reached through a connection pooler in transaction mode \
             that loses prepared statements between transactions ({}); use session mode \
             (PgBouncer pool_mode = session), PgBouncer >= 1.21 with max_prepared_statements \
             > 0, or connect directly",
            db.message()
        ))
    })
}

/// `host:port/dbname` (or the socket path) for messages; never the password.
fn describe_target(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

/// `url` with its database name replaced (for tools that create databases).
pub fn with_dbname(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> DbUrl {
        parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn no_sslmode_is_plain_as_before() {
        let u = parsed("postgres://postgres@127.0.0.1:5432/keel");
        assert_eq!(u.sslmode, SslMode::Disable);
        assert_eq!(
            u.pg.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        assert_eq!(u.root_cert, None);
        assert_eq!(u.pg.get_dbname(), Some("keel"));
    }

    #[test]
    fn url_tls_parameters_are_taken_out_and_the_rest_kept() {
        let u = parsed(
            "postgresql://u:p@db.example:6543/keel?application_name=keel&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fkeel%2Fca%20root.pem&connect_timeout=3",
        );
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        assert_eq!(
            u.pg.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(u.root_cert, Some(PathBuf::from("/etc/keel/ca root.pem")));
        assert_eq!(u.pg.get_application_name(), Some("keel"));
        assert_eq!(u.pg.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(u.pg.get_ports(), [6543]);
    }

    #[test]
    fn each_sslmode_maps_to_what_tokio_postgres_negotiates() {
        use tokio_postgres::config::SslMode as Pg;
        for (mode, ours, theirs) in [
            ("disable", SslMode::Disable, Pg::Disable),
            ("prefer", SslMode::Prefer, Pg::Prefer),
            ("require", SslMode::Require, Pg::Require),
            ("verify-ca", SslMode::VerifyCa, Pg::Require),
            ("verify-full", SslMode::VerifyFull, Pg::Require),
        ] {
            let u = parsed(&format!("postgres://h/db?sslmode={mode}"));
            assert_eq!((u.sslmode, u.pg.get_ssl_mode()), (ours, theirs), "{mode}");
            assert_eq!(ours.as_str(), mode);
        }
    }

    #[test]
    fn keyword_form_is_read_too() {
        let u = parsed(
            "host=db.example port=6543 sslmode = 'verify-ca' sslrootcert=/ca.pem dbname=keel",
        );
        assert_eq!(u.sslmode, SslMode::VerifyCa);
        assert_eq!(u.root_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(u.pg.get_dbname(), Some("keel"));
        assert_eq!(u.pg.get_ports(), [6543]);
    }

    #[test]
    fn an_unknown_sslmode_is_a_startup_error() {
        let err = parse_url("postgres://h/db?sslmode=allow").unwrap_err();
        assert_eq!(
            err.to_string(),
            "DATABASE_URL is invalid: unknown sslmode \"allow\" \
             (disable, prefer, require, verify-ca or verify-full)"
        );
    }
}
