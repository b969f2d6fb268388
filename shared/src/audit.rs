//! The admin audit trail: one row per admin action, written by each
//! service's store in the same transaction as the change it records.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::auth::Admin;

/// Longest `target` kept (the column's check).
const MAX_TARGET_CHARS: usize = 256;

/// Records that `admin` did `action` (e.g. "job.retry") to `target` (e.g.
/// "job:<id>"), with `detail` (never a secret). Call it on the transaction
/// that makes the change, so the record and the change commit together.
pub async fn record(
    client: &impl GenericClient,
    admin: &Admin,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<Uuid, tokio_postgres::Error> {
    let id = Uuid::now_v7();
    let target: String = target.chars().take(MAX_TARGET_CHARS).collect();
    let stmt = client
        .prepare_cached(
            "INSERT INTO admin_audit (id, admin_user_id, admin_email, action, target, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[&id, &admin.user_id, &admin.email, &action, &target, &detail],
        )
        .await?;
    Ok(id)
}
