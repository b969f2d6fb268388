//! What `keel` prints: tables by default, `-o json` for scripts, whole
//! numbers as integers, one line per transition from `jobs watch`.

use serde_json::Value;

use crate::support::{Env, Servers, field, parse_table};

const STATUSES: &[&str] = &["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_print_whole_numbers_as_integers_tables_by_default_and_json_on_request() {
    let env = Env::start(Servers::All).await;
    let signed_in = env
        .ok(&["register", "jobs@example.com", "--name", "Jobs"])
        .await;
    assert_eq!(field(&signed_in, "EMAIL"), "jobs@example.com");

    // create: one job as aligned NAME value lines, its payload as it was sent.
    let payload = r#"{"n":1,"half":0.5,"list":[2,-3],"big":1e3}"#;
    let created = env
        .ok(&["jobs", "create", "echo", "--payload", payload])
        .await;
    let id = field(&created, "ID");
    assert_eq!(field(&created, "KIND"), "echo");
    let shown: Value = serde_json::from_str(&field(&created, "PAYLOAD")).unwrap();
    assert_eq!(
        shown.to_string(),
        r#"{"big":1000,"half":0.5,"list":[2,-3],"n":1}"#,
        "{created}"
    );

    // get -o json: integers stay integers, in the text and once parsed.
    env.ok(&["jobs", "watch", &id]).await;
    let raw = env.ok(&["-o", "json", "jobs", "get", &id]).await;
    assert!(raw.contains("\"n\": 1\n"), "{raw}");
    assert!(
        !raw.contains("1.0"),
        "no whole number printed as a float: {raw}"
    );
    let job: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(job["status"], "SUCCEEDED");
    for doc in [&job["payload"], &job["output"]] {
        assert!(doc["n"].is_u64() && doc["n"] == 1, "{doc}");
        assert!(doc["big"].is_u64() && doc["big"] == 1000, "{doc}");
        assert_eq!(doc["list"][1].as_i64(), Some(-3));
        assert_eq!(doc["half"].as_f64(), Some(0.5));
    }
    let table = env.ok(&["jobs", "get", &id]).await;
    assert_eq!(field(&table, "STATUS"), "SUCCEEDED");
    assert_eq!(field(&table, "ATTEMPT"), "1/3");
    assert_eq!(
        field(&table, "OUTPUT"),
        r#"{"big":1000,"half":0.5,"list":[2,-3],"n":1}"#
    );

    // list: a table with aligned columns by default, JSON with -o json.
    let second = field(
        &env.ok(&["jobs", "create", "echo", "--payload", r#"{"m":2}"#])
            .await,
        "ID",
    );
    let (header, rows) = parse_table(&env.ok(&["jobs", "list", "--kind", "echo"]).await);
    assert_eq!(header, ["ID", "KIND", "STATUS", "ATTEMPT", "CREATED"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let mut ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    ids.sort();
    let mut want = vec![id.as_str(), second.as_str()];
    want.sort();
    assert_eq!(ids, want);
    for row in &rows {
        assert_eq!(row[1], "echo");
        assert!(STATUSES.contains(&row[2].as_str()), "{row:?}");
        assert!(row[3].ends_with("/3"), "{row:?}");
        chrono::DateTime::parse_from_rfc3339(&row[4]).expect("CREATED is RFC 3339");
    }
    let listed = env.json(&["jobs", "list", "--kind", "echo"]).await;
    let jobs = listed["jobs"].as_array().expect("jobs array");
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs.iter()
            .any(|j| j["id"] == id.as_str() && j["payload"]["n"].is_u64())
    );
    assert_eq!(listed["next_page_token"], "");

    // Other commands print tables too, and JSON on request.
    let (header, rows) = parse_table(&env.ok(&["health"]).await);
    assert_eq!(header, ["SERVER", "STATUS"]);
    assert!(rows.iter().all(|r| r[1] == "SERVING"), "{rows:?}");
    assert_eq!(env.json(&["whoami"]).await["email"], "jobs@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_watch_prints_one_line_per_update() {
    let env = Env::start(Servers::All).await;
    env.sign_in("watch@example.com").await;

    // Table mode: "TIME   STATUS   attempt N/M[   error: ...]" per update.
    let sleep = field(
        &env.ok(&["jobs", "create", "sleep", "--payload", r#"{"ms":1500}"#])
            .await,
        "ID",
    );
    let out = env.ok(&["jobs", "watch", &sleep]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        chrono::DateTime::parse_from_rfc3339(words[0])
            .unwrap_or_else(|e| panic!("{line:?} starts with a time: {e}"));
        assert!(STATUSES.contains(&words[1]), "{line:?}");
        assert_eq!(words[2], "attempt", "{line:?}");
        assert!(!line.contains("error"), "{line:?}");
    }
    assert!(
        lines.last().unwrap().contains("   SUCCEEDED   attempt 1/3"),
        "{out}"
    );
    assert!(out.contains("   RUNNING   "), "the run is seen: {out}");

    // A failure shows its error on the last line.
    let fail = field(
        &env.ok(&[
            "jobs",
            "create",
            "fail",
            "--max-attempts",
            "1",
            "--payload",
            r#"{"message":"boom","retryable":false}"#,
        ])
        .await,
        "ID",
    );
    let out = env.ok(&["jobs", "watch", &fail]).await;
    let last = out.lines().last().unwrap();
    assert!(
        last.contains("   FAILED      attempt 1/1   error: "),
        "{out}"
    );
    assert!(last.contains("boom"), "{out}");

    // -o json: one JSON object per line.
    let sleep = field(
        &env.ok(&["jobs", "create", "sleep", "--payload", r#"{"ms":1500}"#])
            .await,
        "ID",
    );
    let out = env.ok(&["-o", "json", "jobs", "watch", &sleep]).await;
    let updates: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(updates.iter().all(|u| u["id"] == sleep.as_str()));
    assert_eq!(updates.last().unwrap()["status"], "SUCCEEDED");
    assert_eq!(updates.last().unwrap()["output"]["slept_ms"], 1500);
    assert!(updates.last().unwrap()["output"]["slept_ms"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memories_print_tables_by_default_and_json_on_request() {
    let env = Env::start(Servers::All).await;
    env.sign_in("memories@example.com").await;

    let put = env
        .ok(&[
            "memories",
            "put",
            "notes/cli",
            "--content",
            "the command line client",
            "--tag",
            "cli",
            "--tag",
            "tools",
            "--metadata",
            r#"{"stars":5,"ratio":0.25}"#,
        ])
        .await;
    assert_eq!(put.trim(), "created notes/cli (version 1)");
    env.ok(&["memories", "put", "a", "--content", "short"])
        .await;

    let (header, rows) = parse_table(&env.ok(&["memories", "list"]).await);
    assert_eq!(header, ["KEY", "VERSION", "TAGS", "UPDATED"]);
    assert_eq!(rows.len(), 2);
    let notes = rows
        .iter()
        .find(|r| r[0] == "notes/cli")
        .expect("notes/cli row");
    assert_eq!(notes[1], "1");
    assert_eq!(notes[2], "cli,tools");
    chrono::DateTime::parse_from_rfc3339(&notes[3]).expect("UPDATED is RFC 3339");
    let short = rows.iter().find(|r| r[0] == "a").expect("a row");
    assert_eq!(short[2], "-");

    let got = env.ok(&["memories", "get", "notes/cli"]).await;
    assert_eq!(field(&got, "TAGS"), "cli,tools");
    assert_eq!(field(&got, "METADATA"), r#"{"ratio":0.25,"stars":5}"#);
    assert!(got.ends_with("\nthe command line client\n"), "{got}");

    let listed = env.json(&["memories", "list"]).await;
    let memories = listed["memories"].as_array().expect("memories array");
    assert_eq!(memories.len(), 2);
    let json = env.json(&["memories", "get", "notes/cli"]).await;
    assert_eq!(json["metadata"]["stars"], 5);
    assert!(json["metadata"]["stars"].is_u64());
    assert_eq!(json["version"], 1);

    let (header, rows) = parse_table(&env.ok(&["memories", "search", "command line"]).await);
    assert_eq!(
        header,
        ["SCORE", "KEY", "VERSION", "TAGS", "UPDATED", "SNIPPET"]
    );
    assert_eq!(rows[0][1], "notes/cli");
    let found = env.json(&["memories", "search", "command line"]).await;
    assert_eq!(found[0]["memory"]["key"], "notes/cli");
    assert_eq!(env.json(&["workspace"]).await["memory_count"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_urls_reach_a_live_replica_and_health_lists_each() {
    let env = Env::start(Servers::All).await;
    env.sign_in("replicas@example.com").await;
    let jobs = env.jobs_addr.expect("the jobs service runs");
    let live = format!("http://{jobs}");
    // Nothing listens on port 9: a replica that is down.
    let down = "http://127.0.0.1:9";
    for urls in [format!("{down},{live}"), format!("{live}, {down}")] {
        // The replicas are tried in random order: a few runs meet both.
        for _ in 0..4 {
            let listed = env.json(&["--jobs-url", &urls, "jobs", "list"]).await;
            assert!(listed["jobs"].is_array(), "{listed}");
        }
        let run = env
            .keel(&["-o", "json", "--jobs-url", &urls, "health"])
            .await;
        assert!(!run.success, "a replica is down: {}", run.stdout);
        let report: Value = serde_json::from_str(&run.stdout).expect("JSON");
        assert_eq!(report[&live], "SERVING", "{report}");
        assert_eq!(report[down], "NOT_SERVING", "{report}");
    }
    // An empty URL in the list is refused, saying so.
    let run = env
        .keel(&["--jobs-url", &format!("{live},,{down}"), "jobs", "list"])
        .await;
    assert!(!run.success);
    assert!(run.stderr.contains("empty URL"), "{}", run.stderr);
}
