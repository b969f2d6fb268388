//! Schedules across replicas: three keel-jobs processes on one database fire
//! an every-second schedule while the replica caught in the middle of firing
//! a tick is SIGKILLed. Every tick still gets exactly one job: the killed
//! replica's transaction never commits, and a surviving replica fires the
//! tick instead.

use std::time::Duration;

use keel_faults::{RedisTarget, Sandbox, Service, channel, pg, report, tenant};
use keel_proto::jobs::v1::CreateScheduleRequest;
use keel_proto::jobs::v1::schedule_service_client::ScheduleServiceClient;
use keel_shared::testing::{self, TestRedis};

const REPLICAS: usize = 3;
const KILLS: usize = 2;
const KIND: &str = "sched.fault";

/// `url` with an application name, so pg_stat_activity tells which replica
/// a backend serves.
fn named(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

/// Waits until a replica's tick transaction is blocked inserting its job
/// (behind the lock the test holds); returns that replica's index and the
/// tick it is firing.
async fn replica_mid_tick(
    db: &tokio_postgres::Client,
    schedule_id: &str,
) -> (usize, chrono::DateTime<chrono::Utc>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = db
            .query(
                "SELECT application_name FROM pg_stat_activity
                  WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO jobs%'",
                &[],
            )
            .await
            .expect("pg_stat_activity");
        if let Some(row) = rows.first() {
            let name: String = row.get(0);
            let index = name
                .strip_prefix("jobs-")
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("unexpected backend {name:?} inserting a job"));
            let tick = db
                .query_one(
                    "SELECT next_run_at FROM schedules WHERE id = $1::text::uuid",
                    &[&schedule_id],
                )
                .await
                .expect("the schedule")
                .get(0);
            return (index, tick);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replica started firing a tick"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tick_creates_one_job_across_replicas_and_a_sigkill_mid_tick() {
    let sandbox = Sandbox::new("schedules-kill");
    let (db, token) = tenant("schedules-kill@example.com").await;
    let redis = TestRedis::new();
    let target = RedisTarget::shared(&redis);

    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        let url = named(&db.url, &format!("jobs-{i}"));
        replicas.push(
            Service::jobs(&sandbox, &url, &target, |env| {
                env.set("KEEL_SCHEDULE_MIN_INTERVAL_SECS", 1)
                    .set("KEEL_SCHEDULE_TICK_MS", 50)
            })
            .await,
        );
    }
    let schedule = ScheduleServiceClient::new(channel(replicas[0].addr))
        .create_schedule(testing::authed(
            CreateScheduleRequest {
                name: "every-second".into(),
                cron: "* * * * * *".into(),
                kind: KIND.into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("create schedule")
        .into_inner()
        .schedule
        .unwrap();

    let watcher = pg(&db.url).await;
    let mut blocker = pg(&db.url).await;
    let mut killed_ticks = Vec::new();
    for kill in 1..=KILLS {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        // Hold every tick at its job insert: whichever replica locked the
        // due schedule is then caught mid-tick.
        let hold = blocker.transaction().await.expect("begin");
        hold.batch_execute("LOCK TABLE job_outbox IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock job_outbox");
        let (victim, tick) = replica_mid_tick(&watcher, &schedule.id).await;
        replicas[victim].sigkill();
        report!(
            "schedules kill {kill}: SIGKILL of replica {victim} while it fired the tick of {tick}"
        );
        hold.rollback().await.expect("release the lock");
        killed_ticks.push(tick);
        // The tick is fired by a surviving replica.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let jobs: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM jobs WHERE schedule_id = $1::text::uuid
                        AND scheduled_for = $2",
                    &[&schedule.id, &tick],
                )
                .await
                .expect("count")
                .get(0);
            if jobs == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the killed replica's tick {tick} was never fired"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replicas[victim].start();
        replicas[victim].wait_serving().await;
    }
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    for replica in &mut replicas {
        replica.assert_alive();
    }
    for replica in &mut replicas {
        replica.sigkill();
    }

    let rows = watcher
        .query(
            "SELECT scheduled_for, count(*) FROM jobs WHERE schedule_id = $1::text::uuid
              GROUP BY scheduled_for ORDER BY scheduled_for",
            &[&schedule.id],
        )
        .await
        .expect("ticks");
    let per_tick: Vec<(chrono::DateTime<chrono::Utc>, i64)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let all_jobs: i64 = watcher
        .query_one("SELECT count(*) FROM jobs WHERE kind = $1", &[&KIND])
        .await
        .expect("jobs")
        .get(0);
    report!(
        "schedules kill: {} ticks fired by {REPLICAS} replicas with {KILLS} SIGKILLs mid-tick; \
         {all_jobs} jobs",
        per_tick.len()
    );
    assert!(per_tick.len() >= 5, "ticks fired: {per_tick:?}");
    for (tick, jobs) in &per_tick {
        assert_eq!(*jobs, 1, "tick {tick} has {jobs} jobs");
    }
    assert_eq!(
        all_jobs,
        per_tick.len() as i64,
        "every job of the kind belongs to exactly one tick"
    );
    for tick in &killed_ticks {
        assert!(
            per_tick.iter().any(|(t, _)| t == tick),
            "the tick {tick} caught in the kill has its job"
        );
    }
}
