//! The retention job: finished jobs past KEEL_JOBS_RETENTION_DAYS disappear
//! with their history, in batches; everything else stays.

use chrono::{DateTime, Utc};
use keel_proto::jobs::v1::GetJobRequest;
use keel_shared::testing::eventually;
use tonic::Code;
use uuid::Uuid;

use crate::support::{Svc, WAIT};

/// A job row as it would be after a life that began `created_days_ago`.
async fn insert(
    svc: &Svc,
    created_days_ago: i64,
    status: &str,
    finished_at: Option<DateTime<Utc>>,
) -> Uuid {
    let created = Utc::now() - chrono::Duration::days(created_days_ago);
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        created.timestamp() as u64,
        created.timestamp_subsec_nanos(),
    );
    let id = Uuid::new_v7(ts);
    let client = svc.db.pool.get().await.unwrap();
    // One statement: the retention loop is running and must not see the job
    // without its history row.
    client
        .execute(
            "WITH j AS (
                 INSERT INTO jobs (id, user_id, kind, payload, max_attempts, run_at, created_at,
                                   status, attempt, finished_at)
                 VALUES ($1, $2, 'echo', '{}', 1, $3, $3, $4, 1, $5)
                 RETURNING id)
             INSERT INTO job_events (job_id, event, status, attempt)
             SELECT id, 'created', 'queued', 0 FROM j",
            &[&id, &svc.user, &created, &status, &finished_at],
        )
        .await
        .unwrap();
    id
}

async fn exists(svc: &Svc, id: Uuid) -> bool {
    match svc
        .jobs
        .clone()
        .get_job(svc.u(GetJobRequest { id: id.to_string() }))
        .await
    {
        Ok(_) => true,
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => panic!("GetJob: {s:?}"),
    }
}

#[tokio::test]
async fn finished_jobs_past_retention_are_deleted_in_batches_and_nothing_else() {
    let svc = Svc::start_with(|c| {
        c.retention_days = 1;
        c.retention_batch = 2;
        c.retention_interval_ms = 100;
    })
    .await;
    let long_ago = Some(Utc::now() - chrono::Duration::days(2));
    let mut expired = Vec::new();
    for status in ["succeeded", "failed", "cancelled", "succeeded", "failed"] {
        expired.push(insert(&svc, 3, status, long_ago).await);
    }
    let kept = [
        // Old but still waiting or running.
        insert(&svc, 3, "queued", None).await,
        insert(&svc, 3, "running", None).await,
        // Old but finished within the retention period.
        insert(
            &svc,
            3,
            "succeeded",
            Some(Utc::now() - chrono::Duration::hours(1)),
        )
        .await,
        // Recent.
        insert(&svc, 0, "failed", Some(Utc::now())).await,
    ];
    let live = svc.create_kind("echo").await;

    eventually(WAIT, "expired jobs deleted", || async {
        let mut any = false;
        for id in &expired {
            any |= exists(&svc, *id).await;
        }
        !any
    })
    .await;
    for id in kept {
        assert!(exists(&svc, id).await, "{id} was deleted");
    }
    assert_eq!(svc.get(&live.id).await.id, live.id);
    let client = svc.db.pool.get().await.unwrap();
    let events: i64 = client
        .query_one(
            "SELECT count(*) FROM job_events WHERE job_id = ANY($1)",
            &[&expired],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 0, "history goes with its job");
}

#[tokio::test]
async fn a_deleted_users_jobs_go_with_their_history_and_deliveries() {
    let svc = Svc::start().await;
    let (gone, gone_token) = svc.other_user().await;
    let mut theirs = Vec::new();
    for _ in 0..3 {
        let job = svc
            .jobs
            .clone()
            .create_job(keel_shared::testing::authed(
                keel_proto::jobs::v1::CreateJobRequest {
                    kind: "echo".into(),
                    ..Default::default()
                },
                &gone_token,
            ))
            .await
            .expect("create")
            .into_inner()
            .job
            .unwrap();
        theirs.push(Uuid::parse_str(&job.id).unwrap());
    }
    let mine = svc.create_kind("echo").await;
    let mine = Uuid::parse_str(&mine.id).unwrap();

    let client = svc.db.pool.get().await.unwrap();
    client
        .execute("DELETE FROM users WHERE id = $1", &[&gone])
        .await
        .unwrap();
    let left = |table: &str| {
        let sql = format!("SELECT count(*) FROM {table} WHERE job_id = ANY($1)");
        let (client, theirs) = (&client, &theirs);
        async move {
            let theirs: i64 = client.query_one(&sql, &[theirs]).await.unwrap().get(0);
            let mine: i64 = client.query_one(&sql, &[&vec![mine]]).await.unwrap().get(0);
            (theirs, mine)
        }
    };
    assert_eq!(
        left("job_events").await,
        (0, 1),
        "history: theirs gone, mine kept"
    );
    assert_eq!(
        left("job_outbox").await,
        (0, 1),
        "deliveries: theirs gone, mine kept"
    );
    assert!(exists(&svc, mine).await);
}
