//! Test harness (feature `testing`): real Postgres and Redis, one database and
//! one Redis key prefix per test, tokens signed by a per-process test key.
//!
//! Servers: `DATABASE_URL` / `REDIS_URL` when set (the database named in
//! `DATABASE_URL` is only used to create test databases beside it), else
//! `postgres://postgres@127.0.0.1:5432/postgres` and `redis://127.0.0.1:6379`.
//! `scripts/test.sh` starts temporary servers when neither answers.

pub mod fuzz;
pub mod tokens;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use crate::auth::{SigningKeyPem, TokenSigner, TokenVerifier, VerifierConfig};
use crate::config::{DatabaseConfig, RedisConfig};

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";

/// URL of the Postgres server the tests use, pointing at its `postgres` database.
pub fn admin_url() -> String {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG.to_string());
    with_dbname(&url, "postgres")
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS.to_string())
}

pub use crate::db::with_dbname;

async fn admin_client() -> tokio_postgres::Client {
    let url = admin_url();
    let (client, conn) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok(pair) => pair,
        Err(e) => panic!(
            "tests need a Postgres server: cannot connect to {} ({e}). Set DATABASE_URL, or run \
             the tests with scripts/test.sh, which starts one.",
            describe(&url)
        ),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn describe(url: &str) -> String {
    match tokio_postgres::Config::from_str(url) {
        Ok(cfg) => {
            let host = match cfg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "localhost".into(),
            };
            format!(
                "{host}:{}",
                cfg.get_ports().first().copied().unwrap_or(5432)
            )
        }
        Err(_) => "an unparsable DATABASE_URL".into(),
    }
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// The migrated template database, built once per set of migrations (and
/// shared by concurrent test processes through an advisory lock).
async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let name = format!("keel_tmpl_{}", crate::migrate::fingerprint());
            let admin = admin_client().await;
            admin
                .execute("SELECT pg_advisory_lock(7340032)", &[])
                .await
                .expect("advisory lock");
            let exists = admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                .await
                .expect("query pg_database")
                .is_some();
            if !exists {
                // Build under a scratch name, then rename: a half-built template is never visible.
                let scratch = format!("keel_build_{}", Uuid::new_v4().simple());
                admin
                    .batch_execute(&format!("CREATE DATABASE \"{scratch}\""))
                    .await
                    .expect("create template database");
                {
                    let mut cfg = DatabaseConfig::from_url(with_dbname(&admin_url(), &scratch));
                    cfg.db_pool_size = 1;
                    let pool = crate::db::connect(&cfg).await.expect("connect to template");
                    crate::migrate::run(&pool).await.expect("migrate template");
                    pool.close();
                }
                let mut tries = 0;
                loop {
                    match admin
                        .batch_execute(&format!(
                            "ALTER DATABASE \"{scratch}\" RENAME TO \"{name}\""
                        ))
                        .await
                    {
                        Ok(()) => break,
                        Err(e) if tries < 100 => {
                            tries += 1;
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("rename template database: {e}"),
                    }
                }
            }
            admin
                .execute("SELECT pg_advisory_unlock(7340032)", &[])
                .await
                .expect("advisory unlock");
            name
        })
        .await
}

/// A fresh, migrated database of its own, dropped when this goes out of scope.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: Pool,
}

impl TestDb {
    pub async fn new() -> Self {
        let template = template().await;
        let name = format!("keel_t_{}", Uuid::new_v4().simple());
        let admin = admin_client().await;
        let mut tries = 0;
        // A just-renamed template can still show a closing connection for a moment.
        while let Err(e) = admin
            .batch_execute(&format!(
                "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
            ))
            .await
        {
            tries += 1;
            assert!(tries < 100, "create test database: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = with_dbname(&admin_url(), &name);
        let pool = crate::db::connect(&DatabaseConfig::from_url(url.clone()))
            .await
            .expect("connect to test database");
        Self { name, url, pool }
    }

    pub fn config(&self) -> DatabaseConfig {
        DatabaseConfig::from_url(self.url.clone())
    }

    /// Inserts a user row directly (for services' tests that only need an owner).
    pub async fn create_user(&self, email: &str) -> Uuid {
        let id = Uuid::now_v7();
        let client = self.pool.get().await.expect("pool");
        client
            .execute(
                "INSERT INTO users (id, email, display_name, password_hash) VALUES ($1, $2, '', 'not-a-hash')",
                &[&id, &email],
            )
            .await
            .expect("insert user");
        id
    }

    /// Gives a user the admin role directly (as the KEEL_ADMIN_EMAILS
    /// bootstrap would).
    pub async fn make_admin(&self, user_id: Uuid) {
        let client = self.pool.get().await.expect("pool");
        client
            .execute(
                "INSERT INTO admins (user_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&user_id],
            )
            .await
            .expect("insert admin");
    }

    /// A user holding the admin role and an access token of theirs.
    pub async fn create_admin(&self, email: &str) -> (Uuid, String) {
        let id = self.create_user(email).await;
        self.make_admin(id).await;
        (id, user_token(id, email))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        let name = self.name.clone();
        // Drop runs outside any async context we can rely on: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let admin = admin_client().await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

/// A Redis config with a key prefix of its own; the keys are deleted on drop.
pub struct TestRedis {
    pub config: RedisConfig,
}

impl TestRedis {
    pub fn new() -> Self {
        Self {
            config: RedisConfig::new(
                redis_url(),
                format!("keel-test:{}", Uuid::new_v4().simple()),
            ),
        }
    }

    pub fn pool(&self) -> crate::redis::Pool {
        crate::redis::pool(&self.config).expect("redis pool")
    }
}

impl TestRedis {
    /// Reads the entry of `job_id` from `stream` as consumer `consumer` of
    /// the workers' group, waiting up to `wait` for it to be published, and
    /// leaves it pending: a worker that read it and died. Returns the entry id.
    pub async fn read_as_dead_consumer(
        &self,
        stream: &str,
        consumer: &str,
        job_id: &str,
        wait: Duration,
    ) -> String {
        let deadline = tokio::time::Instant::now() + wait;
        let pool = self.pool();
        loop {
            let mut conn = pool.get().await.expect("redis connection");
            let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(crate::queue::CONSUMER_GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(10)
                .arg("STREAMS")
                .arg(stream)
                .arg(">")
                .query_async(&mut *conn)
                .await
                .expect("XREADGROUP");
            let entries: Vec<_> = reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            if let Some(entry) = entries.first() {
                assert_eq!(entries.len(), 1);
                let id = entry.get::<String>(crate::queue::FIELD_JOB_ID);
                assert_eq!(id.as_deref(), Some(job_id));
                return entry.id.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the job never reached the stream"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.config.redis_url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return;
        };
        let pattern = format!("{}:*", self.config.redis_prefix);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

/// The per-process test signing key.
pub struct TestKeys {
    pub pem: SigningKeyPem,
    pub signer: TokenSigner,
    pub verifier: Arc<TokenVerifier>,
    pub public_key_file: std::path::PathBuf,
}

pub fn keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let pem = SigningKeyPem::generate();
        let signer = TokenSigner::from_private_pem(
            &pem.private_pem,
            crate::auth::DEFAULT_ISSUER,
            crate::auth::DEFAULT_AUDIENCE,
            Duration::from_secs(900),
        )
        .expect("test signer");
        let verifier = Arc::new(
            TokenVerifier::from_public_pems(
                std::slice::from_ref(&pem.public_pem),
                crate::auth::DEFAULT_ISSUER,
                crate::auth::DEFAULT_AUDIENCE,
            )
            .expect("test verifier"),
        );
        let public_key_file = std::env::temp_dir().join(format!(
            "keel-test-{}-{}.pub.pem",
            std::process::id(),
            Uuid::new_v4().simple()
        ));
        std::fs::write(&public_key_file, &pem.public_pem).expect("write test public key");
        TestKeys {
            pem,
            signer,
            verifier,
            public_key_file,
        }
    })
}

/// A verifier config that trusts the per-process test key.
pub fn verifier_config() -> VerifierConfig {
    VerifierConfig {
        jwt_public_key_files: vec![keys().public_key_file.clone()],
        jwt_issuer: crate::auth::DEFAULT_ISSUER.into(),
        jwt_audience: crate::auth::DEFAULT_AUDIENCE.into(),
        credential_cache_secs: 1,
    }
}

/// A valid access token for `user_id`, signed by the test key.
pub fn user_token(user_id: Uuid, email: &str) -> String {
    keys().signer.sign(user_id, email, None, Utc::now()).0
}

/// A listener on a free loopback port.
pub async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// A channel to `addr`, retrying while the server starts.
pub async fn channel(addr: SocketAddr) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(2));
    for _ in 0..100 {
        if let Ok(ch) = endpoint.connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {addr} did not come up");
}

/// Attaches `authorization: Bearer <token>` to a request.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
}

/// Waits until `check` holds, polling, or panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Asserts that the server at `addr` reports SERVING for "" and each of
/// `services` (waiting briefly for readiness), and that reflection v1 lists
/// every one of them.
pub async fn assert_serving_with_reflection(addr: SocketAddr, services: &[&str]) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let channel = channel(addr).await;
    let mut health = HealthClient::new(channel.clone());
    for name in std::iter::once("").chain(services.iter().copied()) {
        let mut status = None;
        for _ in 0..100 {
            let resp = health
                .check(HealthCheckRequest {
                    service: name.to_string(),
                })
                .await
                .expect("health check")
                .into_inner();
            status = Some(resp.status());
            if status == Some(ServingStatus::Serving) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, Some(ServingStatus::Serving), "health of {name:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(futures_lite_once(request))
        .await
        .expect("reflection call")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("reflection response")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let listed: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in services.iter().chain(&[
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ]) {
        assert!(listed.iter().any(|l| l == name), "{name} not in {listed:?}");
    }
}

fn futures_lite_once<T: Send + 'static>(item: T) -> impl tokio_stream::Stream<Item = T> + Send {
    tokio_stream::once(item)
}
