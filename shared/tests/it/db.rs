//! The Postgres pool's connections, as the services get them.

use keel_shared::testing::TestDb;

/// Every pooled connection has JIT compilation off: with it on, Postgres
/// compiled the relay's prepared statement on every execution once 100,000
/// jobs waited (hundreds of milliseconds each; BENCHMARKS.md, "Fairness").
#[tokio::test]
async fn every_pooled_connection_runs_without_jit() {
    let db = TestDb::new().await;
    // Held at once, so each is a connection of its own.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(db.pool.get().await.expect("a pooled connection"));
    }
    for client in &held {
        let jit: String = client.query_one("SHOW jit", &[]).await.unwrap().get(0);
        assert_eq!(jit, "off");
    }
    let pids: std::collections::HashSet<i32> =
        futures::future::join_all(held.iter().map(|c| async move {
            c.query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }))
        .await
        .into_iter()
        .collect();
    assert_eq!(pids.len(), 3, "three server connections");
}
