//! The few queries the assertions need: every job's history, read straight
//! from Postgres.

use std::collections::HashSet;
use std::time::Duration;

use keel_shared::testing;

use crate::WAIT;

/// A plain connection to a database (for the assertions' queries).
pub async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Counts of what the job history shows, for the assertions and the report.
#[derive(Debug, Default)]
pub struct History {
    pub jobs: i64,
    pub by_status: Vec<(String, i64)>,
    /// Jobs with more than one `succeeded` event.
    pub succeeded_twice: i64,
    /// Jobs not SUCCEEDED that are not terminal either.
    pub not_terminal: i64,
    /// Sum over jobs of (attempt - 1).
    pub retries: i64,
    /// Jobs whose `started` events are not exactly one.
    pub started_not_once: i64,
    /// Attempts that started and never finished (their worker vanished).
    pub interrupted: Vec<(String, String)>,
    /// (worker_id) of every `lease_expired` event.
    pub lease_expired: Vec<String>,
}

impl History {
    /// Attempts that never finished because their worker was one of `killed`.
    pub fn interrupted_on(&self, killed: &HashSet<String>) -> usize {
        self.interrupted
            .iter()
            .filter(|(_, w)| killed.contains(w))
            .count()
    }

    /// Only the `killed` workers lost attempts or leases, and each retry
    /// re-ran exactly one attempt a kill interrupted.
    pub fn assert_only_killed_workers_lost_attempts(&self, killed: &HashSet<String>) {
        for (job, worker) in &self.interrupted {
            assert!(
                killed.contains(worker),
                "attempt of {job} on {worker:?} never finished, but that worker was not killed"
            );
        }
        for worker in &self.lease_expired {
            assert!(
                killed.contains(worker),
                "a lease of live worker {worker:?} expired"
            );
        }
        assert_eq!(
            self.retries,
            self.interrupted_on(killed) as i64,
            "each retry re-runs exactly one attempt a SIGKILL interrupted"
        );
    }

    pub async fn read(db: &tokio_postgres::Client) -> Self {
        let mut h = History::default();
        for row in db
            .query(
                "SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status",
                &[],
            )
            .await
            .expect("jobs by status")
        {
            let (status, n): (String, i64) = (row.get(0), row.get(1));
            h.jobs += n;
            if !matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
                h.not_terminal += n;
            }
            h.by_status.push((status, n));
        }
        h.succeeded_twice = scalar(
            db,
            "SELECT count(*) FROM (SELECT job_id FROM job_events WHERE event = 'succeeded'
             GROUP BY job_id HAVING count(*) > 1) t",
        )
        .await;
        h.retries = scalar(
            db,
            "SELECT coalesce(sum(attempt - 1), 0)::int8 FROM jobs WHERE attempt > 1",
        )
        .await;
        h.started_not_once = scalar(
            db,
            "SELECT count(*) FROM jobs j WHERE (SELECT count(*) FROM job_events e
             WHERE e.job_id = j.id AND e.event = 'started') <> 1",
        )
        .await;
        h.interrupted = db
            .query(
                "SELECT s.job_id::text, coalesce(s.worker_id, '') FROM job_events s
                 WHERE s.event = 'started' AND NOT EXISTS (
                     SELECT 1 FROM job_events e WHERE e.job_id = s.job_id
                     AND e.attempt = s.attempt AND e.event IN ('succeeded', 'failed', 'cancelled'))
                 ORDER BY s.id",
                &[],
            )
            .await
            .expect("interrupted attempts")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        h.lease_expired = db
            .query(
                "SELECT coalesce(worker_id, '') FROM job_events WHERE event = 'lease_expired'",
                &[],
            )
            .await
            .expect("lease_expired events")
            .iter()
            .map(|r| r.get(0))
            .collect();
        h
    }

    pub fn count(&self, status: &str) -> i64 {
        self.by_status
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n)
    }

    /// Every job whose creation was acknowledged (`acked`, their ids) is in
    /// the database and SUCCEEDED, as is every job there, and none
    /// succeeded twice.
    pub async fn assert_every_job_succeeded_once(
        &self,
        db: &tokio_postgres::Client,
        acked: &[String],
    ) {
        for id in acked {
            let row = db
                .query_one("SELECT status FROM jobs WHERE id = $1::text::uuid", &[id])
                .await
                .unwrap_or_else(|e| panic!("acknowledged job {id} is missing: {e}"));
            assert_eq!(row.get::<_, String>(0), "succeeded", "job {id}");
        }
        assert_eq!(
            self.count("succeeded"),
            self.jobs,
            "every committed job succeeded"
        );
        assert_eq!(self.succeeded_twice, 0, "no job succeeded twice");
    }
}

async fn scalar(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Waits until every job in the database is terminal.
pub async fn wait_all_terminal(db: &tokio_postgres::Client, expected_at_least: i64) {
    testing::eventually(WAIT, "every job to reach a terminal state", || async {
        let row = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE status IN ('queued', 'running')) FROM jobs",
                &[],
            )
            .await;
        let done = matches!(&row, Ok(r) if r.get::<_, i64>(0) >= expected_at_least
            && r.get::<_, i64>(1) == 0);
        if !done {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        done
    })
    .await;
}
