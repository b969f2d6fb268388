//! Start-up: fail fast with one clear line, serve health and reflection when ready.

use std::process::Command;
use std::time::{Duration, Instant};

use keel_shared::testing::{self, TestDb};
use tokio_util::sync::CancellationToken;

use crate::support::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_keel-auth");

#[test]
fn missing_database_url_exits_with_one_clear_line() {
    let out = Command::new(BIN)
        .env_remove("DATABASE_URL")
        .env_remove("KEEL_JWT_PRIVATE_KEY_FILE")
        .env("KEEL_AUTH_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert_eq!(last, "keel-auth: DATABASE_URL is not set");
}

#[test]
fn missing_signing_key_exits_with_one_clear_line() {
    let dir = TempDir::new();
    let absent = dir.path().join("absent.pem");
    let run = |key: Option<&std::path::Path>| {
        let mut cmd = Command::new(BIN);
        cmd.env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/keel")
            .env("KEEL_AUTH_ADDR", "127.0.0.1:0")
            .env_remove("KEEL_JWT_GENERATE_KEY")
            .env_remove("KEEL_JWT_PRIVATE_KEY_FILE");
        if let Some(key) = key {
            cmd.env("KEEL_JWT_PRIVATE_KEY_FILE", key);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr
            .trim_end()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(run(None), "keel-auth: KEEL_JWT_PRIVATE_KEY_FILE is not set");
    assert_eq!(
        run(Some(&absent)),
        format!(
            "keel-auth: KEEL_JWT_PRIVATE_KEY_FILE is invalid: {}: no such file \
             (set KEEL_JWT_GENERATE_KEY=true to create one)",
            absent.display()
        )
    );
}

#[test]
fn unreachable_postgres_exits_naming_host_and_port() {
    let dir = TempDir::new();
    let key_file = dir.path().join("signing.pem");
    let started = Instant::now();
    let out = Command::new(BIN)
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/keel")
        .env("KEEL_DB_CONNECT_TIMEOUT_SECS", "1")
        .env("KEEL_JWT_PRIVATE_KEY_FILE", &key_file)
        .env("KEEL_JWT_GENERATE_KEY", "true")
        .env("KEEL_AUTH_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("keel-auth: cannot reach Postgres at 127.0.0.1:1/keel"),
        "{stderr}"
    );
    // Bounded retry, not a hang (generous bound: this is not a timing test).
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn serves_health_and_reflection_once_ready() {
    let db = TestDb::new().await;
    let (listener, addr) = testing::listener().await;
    let shutdown = CancellationToken::new();
    let keys = TempDir::new();
    let mut config = crate::support::config(&db, &keys.path().join("signing.pem"));
    config.listen_addr = addr;
    config.tokens.jwt_generate_key = true;
    let server = tokio::spawn(keel_auth::run(config, listener, shutdown.clone()));
    testing::assert_serving_with_reflection(
        addr,
        &["keel.auth.v1.AuthService", "keel.admin.v1.UserAdminService"],
    )
    .await;
    shutdown.cancel();
    server.await.unwrap().expect("clean shutdown");
}
