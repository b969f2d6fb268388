//! Config parsing: a blank environment variable counts as unset.
//!
//! clap reads the real process environment and setting variables in-process
//! needs `unsafe`, so the test runs itself again as a child process with the
//! environment under test.

use std::net::SocketAddr;
use std::process::Command;

use keel_shared::config::{
    DatabaseConfig, LogFormat, RedisConfig, RuntimeConfig, try_parse_config_from,
};

/// Set in the child run; its value is the scenario to check.
const CHILD: &str = "KEEL_TEST_PARSE_CONFIG_CHILD";
const TEST: &str = "config::blank_environment_variables_count_as_unset";

/// The shared pieces every binary flattens into its config.
#[derive(Debug, clap::Parser)]
struct Shared {
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    redis: RedisConfig,
    #[command(flatten)]
    runtime: RuntimeConfig,
}

#[derive(Debug, clap::Parser)]
struct Small {
    #[arg(long, env = "KEEL_TEST_ADDR")]
    addr: Option<SocketAddr>,
    #[arg(long, env = "KEEL_TEST_COUNT", default_value_t = 7)]
    count: u32,
    #[arg(long, env = "KEEL_TEST_NAME", default_value = "fallback")]
    name: String,
    #[arg(long, env = "KEEL_TEST_SET", default_value_t = 1)]
    set: u32,
}

#[derive(Debug, clap::Parser)]
struct Required {
    #[arg(long, env = "KEEL_TEST_REQUIRED")]
    required: u32,
}

fn child(scenario: &str) {
    match scenario {
        "blank" => {
            // What clap alone does with these values: the bug this guards against.
            // (A blank path is "a value is required", a blank number or
            // address "invalid value ''".)
            let err = <Shared as clap::Parser>::try_parse_from(["keel"]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("invalid value ''") || text.contains("a value is required"),
                "{err}"
            );

            let shared: Shared = try_parse_config_from(["keel"]).expect("blank counts as unset");
            assert_eq!(shared.runtime.metrics.metrics_addr, None);
            assert_eq!(shared.runtime.otlp_endpoint, None);
            assert_eq!(shared.runtime.log_format, LogFormat::Human);
            assert_eq!(shared.runtime.shutdown_grace_secs, 10);
            assert_eq!(shared.database.database_url, None);
            assert_eq!(shared.database.db_pool_size, 16);
            assert_eq!(shared.database.db_ca_file, None);
            assert_eq!(shared.redis.redis_ca_file, None);
            assert_eq!(shared.redis.redis_prefix, "keel");
            assert_eq!(shared.redis.redis_url, "redis://127.0.0.1:6379");

            let small: Small = try_parse_config_from(["small"]).unwrap();
            assert_eq!(small.addr, None);
            assert_eq!(small.count, 7);
            assert_eq!(small.name, "fallback");
            // A variable with a value still applies...
            assert_eq!(small.set, 5);
            // ...and a flag still wins over it.
            let small: Small =
                try_parse_config_from(["small", "--set", "9", "--count", "3"]).unwrap();
            assert_eq!((small.set, small.count), (9, 3));

            // A required setting left blank is reported missing, naming it.
            let err = try_parse_config_from::<Required, _, _>(["required"]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
            assert!(err.to_string().contains("--required"), "{err}");
        }
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn blank_environment_variables_count_as_unset() {
    if let Ok(scenario) = std::env::var(CHILD) {
        return child(&scenario);
    }
    let blank = [
        "KEEL_METRICS_ADDR",
        "KEEL_METRICS_SAMPLE_MS",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "KEEL_LOG_FORMAT",
        "KEEL_SHUTDOWN_GRACE_SECS",
        "DATABASE_URL",
        "KEEL_DB_POOL_SIZE",
        "KEEL_DB_CONNECT_TIMEOUT_SECS",
        "KEEL_DB_CA_FILE",
        "REDIS_URL",
        "KEEL_REDIS_PREFIX",
        "KEEL_REDIS_POOL_SIZE",
        "KEEL_REDIS_CA_FILE",
        "KEEL_TEST_ADDR",
        "KEEL_TEST_NAME",
        "KEEL_TEST_REQUIRED",
    ];
    let out = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env_clear()
        .env(CHILD, "blank")
        .envs(blank.iter().map(|name| (name, "")))
        // Whitespace only counts as blank too.
        .env("KEEL_TEST_COUNT", "  ")
        .env("KEEL_TEST_SET", "5")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    // Guard against a filter that matched nothing (which also exits 0).
    assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
}
