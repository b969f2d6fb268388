//! `keel memories` with namespaces, history, expiry and search pages.

use crate::support::{Env, Servers, parse_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memories_in_a_namespace_and_their_history() {
    let env = Env::start(Servers::All).await;
    env.sign_in("history@example.com").await;
    for content in ["first plan", "second plan", "third plan"] {
        env.ok(&[
            "memories",
            "--namespace",
            "agent-1",
            "put",
            "plan",
            "--content",
            content,
        ])
        .await;
    }
    env.ok(&[
        "memories",
        "put",
        "plan",
        "--content",
        "default namespace plan",
    ])
    .await;

    // History: newest first, only in its namespace.
    let (header, rows) = parse_table(
        &env.ok(&["memories", "history", "plan", "--namespace", "agent-1"])
            .await,
    );
    assert_eq!(header, ["KEY", "VERSION", "TAGS", "UPDATED"]);
    let versions: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(versions, ["3", "2", "1"]);
    let history = env.json(&["memories", "history", "plan"]).await;
    assert_eq!(history.as_array().unwrap().len(), 1);

    let v1 = env
        .json(&[
            "memories",
            "get",
            "plan",
            "--namespace",
            "agent-1",
            "--version",
            "1",
        ])
        .await;
    assert_eq!(v1["content"], "first plan");
    assert_eq!(v1["namespace"], "agent-1");

    // Search: the namespace's memories only, with a marked snippet.
    let found = env
        .json(&["memories", "search", "plan", "--namespace", "agent-1"])
        .await;
    let found = found.as_array().unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["memory"]["content"], "third plan");
    assert_eq!(found[0]["snippet"], "third «plan»");

    // Workspace per namespace and across all.
    let ws = env.json(&["workspace", "--namespace", "agent-1"]).await;
    assert_eq!(ws["memory_count"], 1);
    assert_eq!(
        env.json(&["workspace", "--all-namespaces"]).await["memory_count"],
        2
    );

    // An expiry in the past is refused, naming the field.
    let run = env
        .keel(&[
            "memories",
            "put",
            "gone",
            "--content",
            "x",
            "--expires-at",
            "2001-01-01T00:00:00Z",
        ])
        .await;
    assert!(!run.success);
    assert!(run.stderr.contains("expires_at"), "{}", run.stderr);
}
