//! keel-bench stopped by a signal mid-run leaves nothing behind: not the
//! services and workers it started, not its database, not its Redis keys.
//! Runs the real binaries of this build (`cargo test --workspace` builds
//! them next to keel-bench).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The processes `pid` started that are still its children.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The Redis keys under the bench's prefix (its database's name).
async fn keys(redis: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(redis)
        .await
        .expect("KEYS")
}

fn signal(name: &str, pid: u32) {
    let sent = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{name} {pid}");
}

#[tokio::test]
async fn a_bench_stopped_by_sigterm_stops_what_it_started_and_drops_its_database() {
    let bench = Path::new(env!("CARGO_BIN_EXE_keel-bench"));
    let bin_dir = bench.parent().expect("the binaries' folder");
    for service in ["keel-auth", "keel-jobs", "keel-memory", "keel-worker"] {
        assert!(
            bin_dir.join(service).is_file(),
            "{service} is not built in {}: run `cargo build --workspace --bins` first",
            bin_dir.display()
        );
    }
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let stderr =
        std::env::temp_dir().join(format!("keel-bench-interrupt-{}", uuid::Uuid::new_v4()));

    // An end-to-end run far longer than the test: three services and two
    // stream workers running when the signal comes.
    let mut run = Command::new(bench)
        .args([
            "--scenario",
            "e2e-jobs",
            "--e2e-jobs",
            "10000000",
            "--workers",
            "2",
        ])
        .arg("--bin-dir")
        .arg(bin_dir)
        .env("DATABASE_URL", &database_url)
        .env("REDIS_URL", &redis_url)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start keel-bench");
    let pid = run.id();
    let database = format!("keel_bench_{pid}");

    let mut redis = redis::Client::open(redis_url.as_str())
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = loop {
        let started = children(pid);
        if started.len() >= 5 && !keys(&mut redis, &database).await.is_empty() {
            break started;
        }
        if let Some(status) = run.try_wait().expect("poll keel-bench") {
            panic!(
                "keel-bench ended before its workers started ({status}): {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "keel-bench did not start its services and workers, with their streams, in time; \
             children: {started:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    signal("TERM", pid);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = run.try_wait().expect("poll keel-bench") {
            break status;
        }
        if Instant::now() > deadline {
            signal("KILL", pid);
            panic!("keel-bench did not end within 60 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let said = std::fs::read_to_string(&stderr).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr);

    // What is left, found and then cleaned up before any assertion, so a
    // failure leaves nothing behind either.
    let alive: Vec<u32> = started
        .iter()
        .copied()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    for p in &alive {
        signal("KILL", *p);
    }
    let (db, conn) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls)
        .await
        .expect("connect to Postgres");
    tokio::spawn(conn);
    let database_left: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await
        .expect("look for the bench database")
        .get(0);
    if database_left > 0 {
        db.batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await
        .expect("drop the database left behind");
    }
    let keys_left = keys(&mut redis, &database).await;
    if !keys_left.is_empty() {
        let _: () = redis::cmd("UNLINK")
            .arg(&keys_left)
            .query_async(&mut redis)
            .await
            .expect("UNLINK the keys left behind");
    }

    assert_eq!(
        status.code(),
        Some(130),
        "exit status after SIGTERM; stderr: {said}"
    );
    assert!(
        said.contains("interrupted"),
        "says it was interrupted: {said}"
    );
    assert!(
        alive.is_empty(),
        "processes keel-bench started still run: {alive:?}"
    );
    assert_eq!(
        database_left, 0,
        "the bench database {database} was dropped"
    );
    assert!(
        keys_left.is_empty(),
        "the bench's Redis keys were deleted: {keys_left:?}"
    );
}
