//! Start-up: serve health and reflection when ready; run the real binary
//! with blank optional settings.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use clap::CommandFactory;
use keel_shared::testing::{self, TestDb};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_keel-memory");

#[tokio::test]
async fn serves_health_and_reflection_once_ready() {
    let db = TestDb::new().await;
    let (listener, addr) = testing::listener().await;
    let shutdown = CancellationToken::new();
    let config = keel_memory::Config::new(addr, db.config(), testing::verifier_config());
    let server = tokio::spawn(keel_memory::run(config, listener, shutdown.clone()));
    testing::assert_serving_with_reflection(
        addr,
        &[
            "keel.memory.v1.MemoryService",
            "keel.admin.v1.MemoryAdminService",
        ],
    )
    .await;
    shutdown.cancel();
    server.await.unwrap().expect("clean shutdown");
}

/// Compose files and manifests pass `${VAR:-}` for settings they leave
/// alone: every variable the binary reads, set but empty, means its default.
#[tokio::test]
async fn blank_settings_count_as_unset_and_the_binary_serves() {
    let db = TestDb::new().await;
    let given = [
        ("DATABASE_URL", db.url.clone()),
        (
            "KEEL_JWT_PUBLIC_KEY_FILES",
            testing::keys().public_key_file.display().to_string(),
        ),
        ("KEEL_MEMORY_ADDR", "127.0.0.1:0".to_string()),
    ];
    let mut command = tokio::process::Command::new(BIN);
    for arg in keel_memory::Config::command().get_arguments() {
        if let Some(name) = arg.get_env() {
            command.env(name, "");
        }
    }
    let mut child = command
        .envs(given)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // "... keel-memory serving addr=Some(127.0.0.1:PORT)"
            if line.contains("keel-memory serving") {
                let (_, rest) = line.split_once("Some(").expect("address in line");
                let (addr, _) = rest.split_once(')').unwrap();
                return Some(addr.parse::<SocketAddr>().unwrap());
            }
            seen.push(line);
        }
        None
    })
    .await
    .expect("keel-memory did not come up in time");
    let Some(addr) = addr else {
        let status = child.wait().await.unwrap();
        panic!("keel-memory exited ({status}):\n{}", seen.join("\n"));
    };
    testing::assert_serving_with_reflection(addr, &["keel.memory.v1.MemoryService"]).await;
    child.kill().await.unwrap();
}

/// An applied migration that differs from the embedded one (here: its
/// recorded checksum, which is what an edited migration file looks like)
/// stops the binary with one line naming it, before it serves anything.
#[tokio::test]
async fn a_changed_applied_migration_stops_the_binary_with_one_line() {
    let db = TestDb::new().await;
    let row = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "UPDATE refinery_schema_history SET checksum = '1' \
             WHERE version = (SELECT min(version) FROM refinery_schema_history) \
             RETURNING version, name",
            &[],
        )
        .await
        .unwrap();
    let name = format!("V{}__{}", row.get::<_, i32>(0), row.get::<_, &str>(1));
    let child = tokio::process::Command::new(BIN)
        .env("DATABASE_URL", &db.url)
        .env(
            "KEEL_JWT_PUBLIC_KEY_FILES",
            &testing::keys().public_key_file,
        )
        .env("KEEL_MEMORY_ADDR", "127.0.0.1:0")
        .env_remove("KEEL_METRICS_ADDR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // A binary that accepted the migrations would serve until killed.
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("keel-memory started despite a changed migration")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "keel-memory: database migration failed: migration {name} applied to this database \
             differs from the {name} built into this binary"
        )),
        "{stderr}"
    );
}
