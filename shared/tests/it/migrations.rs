//! Migrations are idempotent and safe to run from several processes at once.

use keel_shared::testing::TestDb;

#[tokio::test]
async fn migrations_run_twice_and_concurrently_without_change() {
    let db = TestDb::new().await; // already migrated from the template
    let count = |pool: deadpool_postgres::Pool| async move {
        let client = pool.get().await.unwrap();
        let row = client
            .query_one("SELECT count(*) FROM refinery_schema_history", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let before = count(db.pool.clone()).await;
    assert!(before >= 1, "template applied the migrations");

    let runs = (0..4).map(|_| {
        let pool = db.pool.clone();
        tokio::spawn(async move { keel_shared::migrate::run(&pool).await })
    });
    for run in futures::future::join_all(runs).await {
        run.unwrap().expect("re-running migrations succeeds");
    }
    assert_eq!(count(db.pool.clone()).await, before);
}

#[tokio::test]
async fn fresh_database_migrates_concurrently() {
    let db = TestDb::new().await;
    let client = db.pool.get().await.unwrap();
    let scratch = format!("{}_fresh", db.name);
    let admin = tokio_postgres::connect(&keel_shared::testing::admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(admin.1);
    admin
        .0
        .batch_execute(&format!("CREATE DATABASE \"{scratch}\""))
        .await
        .unwrap();
    drop(client);
    let url = keel_shared::testing::with_dbname(&db.url, &scratch);
    let pool = keel_shared::db::connect(&keel_shared::config::DatabaseConfig::from_url(url))
        .await
        .unwrap();
    let runs = (0..3).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { keel_shared::migrate::run(&pool).await })
    });
    for run in futures::future::join_all(runs).await {
        run.unwrap()
            .expect("concurrent first-time migrations succeed");
    }
    let tables: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'users'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1);
    pool.close();
    admin
        .0
        .batch_execute(&format!("DROP DATABASE \"{scratch}\" WITH (FORCE)"))
        .await
        .unwrap();
}

/// Makes the database's record of its first applied migration differ from
/// the embedded one (what an edited migration file looks like to refinery);
/// returns that migration's name as refinery prints it (`V1__name`).
async fn tamper_first_migration(pool: &deadpool_postgres::Pool) -> String {
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "UPDATE refinery_schema_history SET checksum = '1' \
             WHERE version = (SELECT min(version) FROM refinery_schema_history) \
             RETURNING version, name",
            &[],
        )
        .await
        .unwrap();
    format!("V{}__{}", row.get::<_, i32>(0), row.get::<_, &str>(1))
}

#[tokio::test]
async fn a_changed_applied_migration_is_refused_naming_it() {
    let db = TestDb::new().await;
    let name = tamper_first_migration(&db.pool).await;
    let err = keel_shared::migrate::run(&db.pool)
        .await
        .expect_err("a divergent migration is refused");
    let message = err.to_string();
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(
        message.starts_with(&format!(
            "database migration failed: migration {name} applied to this database differs from \
             the {name} built into this binary"
        )),
        "{message}"
    );
}
