//! Schema migrations from `migrations/`, embedded in every binary and applied at
//! start-up under a Postgres advisory lock, so services starting together do not race.

use deadpool_postgres::Pool;

use crate::StartupError;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Arbitrary constant: the advisory lock key that serialises migrations.
const MIGRATION_LOCK_KEY: i64 = 0x6b65_656c_6d69_6772; // "keelmigr"

/// Applies every pending migration. Idempotent; refuses to start when an
/// applied migration differs from the embedded one.
pub async fn run(pool: &Pool) -> Result<(), StartupError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| StartupError::Migration(e.to_string()))?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(|e| StartupError::Migration(e.to_string()))?;
    let result = embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_abort_missing(true)
        .run_async(&mut **client)
        .await;
    // Unlock even when migrating failed; a dropped connection would release it too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result.map_err(refusal)?;
    for m in report.applied_migrations() {
        tracing::info!(version = m.version(), name = m.name(), "applied migration");
    }
    warn_if_autovacuum_off(&client).await;
    Ok(())
}

/// One line that names the migration and says what to do about it.
fn refusal(err: refinery::Error) -> StartupError {
    use refinery::error::Kind;
    StartupError::Migration(match err.kind() {
        Kind::DivergentVersion(applied, embedded) => format!(
            "migration {applied} applied to this database differs from the {embedded} built into \
             this binary (checksum {} applied, {} built in); refusing to start: an applied \
             migration must never change, add a new one instead",
            applied.checksum(),
            embedded.checksum()
        ),
        Kind::MissingVersion(migration) => format!(
            "migration {migration} is applied to this database but not built into this binary, \
             or is numbered below the newest applied one; refusing to start"
        ),
        _ => err.to_string(),
    })
}

/// The services keep prepared statements per connection; Postgres re-plans
/// them when ANALYZE refreshes a table's statistics. Without autovacuum that
/// never happens, and plans chosen while a table was small (sequential scans)
/// stay as it grows.
async fn warn_if_autovacuum_off(client: &tokio_postgres::Client) {
    if let Ok(row) = client.query_one("SHOW autovacuum", &[]).await
        && row.get::<_, &str>(0) == "off"
    {
        tracing::warn!(
            "Postgres runs with autovacuum off: table statistics go stale, and the plans of \
             prepared statements chosen while tables were small (sequential scans) stay as they \
             grow; turn autovacuum on, or run ANALYZE regularly"
        );
    }
}

/// A fingerprint of the embedded migrations (names and checksums), used by the
/// test harness to name its template database.
pub fn fingerprint() -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for m in embedded::migrations::runner().get_migrations() {
        hasher.update(m.name().as_bytes());
        hasher.update(m.checksum().to_le_bytes());
    }
    hex::encode(&hasher.finalize()[..6])
}
