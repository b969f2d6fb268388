//! `keel jobs history | retry | delete` against the real services and worker.

use serde_json::Value;

use crate::support::{Env, Servers, field, parse_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_history_retry_and_delete() {
    let env = Env::start(Servers::All).await;
    env.sign_in("control@example.com").await;
    let id = field(
        &env.ok(&[
            "jobs",
            "create",
            "fail",
            "--max-attempts",
            "1",
            "--timeout",
            "60",
            "--payload",
            r#"{"message":"boom","retryable":false}"#,
        ])
        .await,
        "ID",
    );
    assert_eq!(env.json(&["jobs", "get", &id]).await["timeout"], 60);
    assert_eq!(
        field(&env.ok(&["jobs", "get", &id]).await, "TIMEOUT"),
        "60s"
    );
    env.ok(&["jobs", "watch", &id]).await;

    // history: a table of the transitions, oldest first.
    let (header, rows) = parse_table(&env.ok(&["jobs", "history", &id]).await);
    assert_eq!(
        header,
        ["AT", "EVENT", "STATUS", "ATTEMPT", "WORKER", "ERROR"]
    );
    let events: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(events, ["created", "started", "failed"], "{rows:?}");
    assert_eq!(rows[0][2..], ["QUEUED", "0", "-", "-"]);
    assert_eq!(rows[2][2], "FAILED");
    assert_ne!(rows[2][4], "-", "the worker is named: {rows:?}");
    assert!(rows[2][5].contains("boom"), "{rows:?}");
    for row in &rows {
        chrono::DateTime::parse_from_rfc3339(&row[0]).expect("AT is RFC 3339");
    }

    // retry: the job again, queued with a fresh set of attempts.
    let retried = env.ok(&["jobs", "retry", &id]).await;
    assert_eq!(field(&retried, "STATUS"), "QUEUED");
    assert_eq!(field(&retried, "ATTEMPT"), "0/1");
    env.ok(&["jobs", "watch", &id]).await;
    let history = env.json(&["jobs", "history", &id]).await;
    let events: Vec<&str> = history["events"]
        .as_array()
        .expect("events array")
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "created", "started", "failed", "retried", "started", "failed"
        ]
    );
    let last = &history["events"][5];
    assert_eq!(last["status"], "FAILED");
    assert!(last["attempt"].is_u64() && last["attempt"] == 1, "{last}");

    // A job that is not failed or cancelled is not retried.
    let ok = field(&env.ok(&["jobs", "create", "echo"]).await, "ID");
    env.ok(&["jobs", "watch", &ok]).await;
    let refused = env.keel(&["jobs", "retry", &ok]).await;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("FailedPrecondition"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("succeeded"), "{}", refused.stderr);

    // delete: gone, history and all.
    assert_eq!(
        env.ok(&["jobs", "delete", &id]).await.trim(),
        format!("deleted {id}")
    );
    let deleted: Value = env.json(&["jobs", "delete", &ok]).await;
    assert_eq!(deleted["deleted"], ok.as_str());
    for args in [["jobs", "get", &id], ["jobs", "history", &id]] {
        let gone = env.keel(&args).await;
        assert!(!gone.success, "{args:?}");
        assert!(gone.stderr.contains("NotFound"), "{}", gone.stderr);
    }
}
