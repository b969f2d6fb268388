//! `keel schedules create | list | get | pause | resume | delete` against the
//! real jobs service.

use crate::support::{Env, Servers, field, parse_table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_create_list_get_pause_resume_delete() {
    let env = Env::start(Servers::NoWorker).await;
    env.sign_in("schedules@example.com").await;

    let created = env
        .ok(&[
            "schedules",
            "create",
            "nightly-report",
            "30 2 * * *",
            "--kind",
            "report.render",
            "--timezone",
            "Europe/Berlin",
            "--payload",
            r#"{"pages":3}"#,
        ])
        .await;
    let id = field(&created, "ID");
    assert_eq!(field(&created, "NAME"), "nightly-report");
    assert_eq!(field(&created, "TIMEZONE"), "Europe/Berlin");
    assert_eq!(field(&created, "STATE"), "active");
    assert_eq!(field(&created, "PAYLOAD"), r#"{"pages":3}"#);
    assert_eq!(field(&created, "LAST RUN"), "-");
    let next = chrono::DateTime::parse_from_rfc3339(&field(&created, "NEXT RUN"))
        .expect("NEXT RUN is RFC 3339");
    let berlin = next.with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(berlin.format("%H:%M").to_string(), "02:30");

    let (header, rows) = parse_table(&env.ok(&["schedules", "list"]).await);
    assert_eq!(
        header,
        ["ID", "NAME", "CRON", "TIMEZONE", "KIND", "STATE", "NEXT"]
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0][..6],
        [
            id.as_str(),
            "nightly-report",
            "30 2 * * *",
            "Europe/Berlin",
            "report.render",
            "active"
        ]
    );

    let paused = env.ok(&["schedules", "pause", &id]).await;
    assert_eq!(field(&paused, "STATE"), "paused");
    assert_eq!(field(&paused, "NEXT RUN"), "-");
    let json = env.json(&["schedules", "get", &id]).await;
    assert_eq!(json["paused"], true);
    assert!(json["next_run_at"].is_null());
    assert_eq!(json["payload"]["pages"], 3);
    let resumed = env.json(&["schedules", "resume", &id]).await;
    assert_eq!(resumed["paused"], false);
    assert!(resumed["next_run_at"].is_string());

    // Refused input: the exit status and the field named on stderr.
    let bad = env
        .keel(&["schedules", "create", "x", "every day", "--kind", "echo"])
        .await;
    assert!(!bad.success);
    assert!(
        bad.stderr.contains("InvalidArgument") && bad.stderr.contains("cron"),
        "{}",
        bad.stderr
    );
    let bad = env
        .keel(&[
            "schedules",
            "create",
            "x",
            "@daily",
            "--kind",
            "echo",
            "--timezone",
            "Moon/Base",
        ])
        .await;
    assert!(!bad.success);
    assert!(bad.stderr.contains("timezone"), "{}", bad.stderr);

    let deleted = env.json(&["schedules", "delete", &id]).await;
    assert_eq!(deleted["deleted"], id.as_str());
    let gone = env.keel(&["schedules", "get", &id]).await;
    assert!(!gone.success);
    assert!(gone.stderr.contains("NotFound"), "{}", gone.stderr);
    let listed = env.json(&["schedules", "list"]).await;
    assert_eq!(listed["schedules"].as_array().unwrap().len(), 0);
}
