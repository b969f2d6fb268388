//! Start-up: fail fast with one clear line, serve health and reflection when ready.

use std::process::Command;
use std::time::{Duration, Instant};

use keel_shared::config::RuntimeConfig;
use keel_shared::testing::{self, TestDb};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_keel-auth");

#[test]
fn missing_database_url_exits_with_one_clear_line() {
    let out = Command::new(BIN)
        .env_remove("DATABASE_URL")
        .env("KEEL_AUTH_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert_eq!(last, "keel-auth: DATABASE_URL is not set");
}

#[test]
fn unreachable_postgres_exits_naming_host_and_port() {
    let started = Instant::now();
    let out = Command::new(BIN)
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/keel")
        .env("KEEL_DB_CONNECT_TIMEOUT_SECS", "1")
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
    let config = keel_auth::Config {
        listen_addr: addr,
        database: db.config(),
        runtime: RuntimeConfig::default(),
    };
    let server = tokio::spawn(keel_auth::run(config, listener, shutdown.clone()));
    testing::assert_serving_with_reflection(addr, &["keel.auth.v1.AuthService"]).await;
    shutdown.cancel();
    server.await.unwrap().expect("clean shutdown");
}
