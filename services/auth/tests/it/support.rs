//! Test harness for the auth service: a server on its own database with its
//! own signing key, and a generated client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_auth::Config;
use keel_proto::admin::v1::user_admin_service_client::UserAdminServiceClient;
use keel_proto::auth::v1::auth_service_client::AuthServiceClient;
use keel_proto::auth::v1::{LoginRequest, RegisterRequest, RegisterResponse, TokenPair};
use keel_shared::StartupError;
use keel_shared::auth::SigningKeyPem;
use keel_shared::testing::{self, TestDb};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub(crate) type Client = AuthServiceClient<Channel>;
pub(crate) type AdminClient = UserAdminServiceClient<Channel>;

pub(crate) const PASSWORD: &str = "correct horse battery";

/// A scratch directory, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("keel-auth-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config for `db` signing with the key in `key_file`. Argon2 runs with
/// small parameters so debug-build tests stay quick; one test checks the
/// production defaults.
pub(crate) fn config(db: &TestDb, key_file: &Path) -> Config {
    let mut config = Config::new(
        "127.0.0.1:0".parse().unwrap(),
        db.config(),
        key_file.to_path_buf(),
    );
    config.database.db_pool_size = 4;
    config.login.argon2_memory_kib = 1024;
    config.login.argon2_iterations = 1;
    config
}

/// A running auth server.
pub(crate) struct Server {
    pub client: Client,
    pub admin: AdminClient,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), StartupError>>,
}

impl Server {
    pub(crate) async fn start(config: Config) -> Self {
        let (listener, addr) = testing::listener().await;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(keel_auth::run(config, listener, shutdown.clone()));
        let channel = testing::channel(addr).await;
        let client = AuthServiceClient::new(channel.clone());
        Self {
            client,
            admin: UserAdminServiceClient::new(channel),
            shutdown,
            handle,
        }
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().expect("clean shutdown");
    }
}

/// One database, one key, one server: what most tests need.
pub(crate) struct Env {
    pub db: TestDb,
    /// Holds the key file's directory until the test ends.
    pub _keys: TempDir,
    pub key_file: PathBuf,
    pub private_pem: String,
    pub server: Server,
}

impl Env {
    pub(crate) async fn new() -> Self {
        Self::with(|_| {}).await
    }

    pub(crate) async fn with(adjust: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::new().await;
        let keys = TempDir::new();
        let key_file = keys.path().join("signing.pem");
        let private_pem = SigningKeyPem::generate().private_pem;
        std::fs::write(&key_file, &private_pem).unwrap();
        let mut config = config(&db, &key_file);
        adjust(&mut config);
        let server = Server::start(config).await;
        Self {
            db,
            _keys: keys,
            key_file,
            private_pem,
            server,
        }
    }

    pub(crate) fn client(&self) -> Client {
        self.server.client.clone()
    }

    pub(crate) fn admin(&self) -> AdminClient {
        self.server.admin.clone()
    }

    pub(crate) async fn register(&self, email: &str) -> RegisterResponse {
        self.client()
            .register(register_req(email, PASSWORD))
            .await
            .expect("register")
            .into_inner()
    }

    /// Moves every login-failure window `by` into the past: the test's way
    /// of letting that much time pass (the windows are judged by Postgres's
    /// clock, so there is nothing to inject).
    pub(crate) async fn rewind_login_windows(&self, by: Duration) {
        let client = self.db.pool.get().await.unwrap();
        client
            .execute(
                "UPDATE login_failures SET window_started_at = window_started_at - make_interval(secs => $1)",
                &[&by.as_secs_f64()],
            )
            .await
            .unwrap();
    }

    /// Every refresh token's lifetime ends now.
    pub(crate) async fn expire_refresh_tokens(&self) {
        let client = self.db.pool.get().await.unwrap();
        client
            .execute(
                "UPDATE refresh_tokens SET expires_at = now() - interval '1 second'",
                &[],
            )
            .await
            .unwrap();
    }

    /// Signs `email` in again (with [`PASSWORD`]): a new session's tokens.
    pub(crate) async fn login(&self, email: &str) -> TokenPair {
        self.client()
            .login(login_req(email, PASSWORD))
            .await
            .expect("login")
            .into_inner()
            .tokens
            .expect("tokens")
    }

    /// The first column of every row `sql` returns.
    pub(crate) async fn column<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let client = self.db.pool.get().await.unwrap();
        client
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub(crate) async fn user_count(&self) -> i64 {
        let client = self.db.pool.get().await.unwrap();
        client
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get(0)
    }
}

pub(crate) fn register_req(email: &str, password: &str) -> RegisterRequest {
    RegisterRequest {
        email: email.into(),
        password: password.into(),
        display_name: "Test User".into(),
    }
}

pub(crate) fn login_req(email: &str, password: &str) -> LoginRequest {
    LoginRequest {
        email: email.into(),
        password: password.into(),
    }
}

/// The error of a call that must fail.
pub(crate) fn err<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> tonic::Status {
    result.expect_err("call should fail")
}
