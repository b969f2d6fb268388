//! The SQL of fair dispatch: the relay fills each kind's stream with the
//! next outbox rows taking turns between the users who have rows waiting.

use deadpool_postgres::GenericClient;

use super::Publication;
use crate::error::JobsError;

/// Advisory lock class of a kind's relay round (the key is the kind's hash).
const RELAY_LOCK_CLASS: i32 = 22;

/// Those of `kinds` no other replica is relaying right now, locked for this
/// transaction: one replica at a time fills a kind's stream, so the
/// backlog bound is not overshot by replicas counting the same room.
pub async fn lock_relay_kinds(
    client: &impl GenericClient,
    kinds: &[&str],
) -> Result<Vec<String>, JobsError> {
    const SQL: &str = "SELECT k FROM unnest($2::text[]) AS k
                       WHERE pg_try_advisory_xact_lock($1, hashtext(k))";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .query(&stmt, &[&RELAY_LOCK_CLASS, &kinds])
        .await?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}

/// Locks up to `rooms[i]` due outbox rows of `kinds[i]`, taking turns
/// between users: each user's rows in their own order (priority, then due
/// time), then the first of every user before the second of any, and so
/// on, higher priority first; within a turn, the row that became due last
/// goes first, so a user who just arrived is not put behind the head of a
/// backlog that has waited (the order within a turn is otherwise free).
/// Rows others hold are skipped. Call inside a transaction; the locks last
/// until it ends.
///
/// The users are found with a loose scan of the (kind, user, ...) index,
/// so a round costs one probe per user with rows waiting plus the rows it
/// takes, however long one user's backlog is. The picked ids go to the
/// final lookup as an array, which the planner sees as a few rows: as an
/// `IN (subquery)` it hash-joined the whole outbox with `jobs` (~200 ms a
/// round with 100,000 rows waiting, instead of ~2 ms).
pub async fn claim_fair(
    client: &impl GenericClient,
    kinds: &[&str],
    rooms: &[i64],
) -> Result<Vec<Publication>, JobsError> {
    const SQL: &str = "WITH RECURSIVE input AS (
            SELECT * FROM unnest($1::text[], $2::int8[]) AS t(fair_kind, room)
         ), users AS (
            SELECT i.fair_kind, i.room,
                   (SELECT o.user_id FROM job_outbox o
                    WHERE o.kind = i.fair_kind AND o.deliver_at <= now()
                    ORDER BY o.user_id LIMIT 1) AS uid
            FROM input i
            UNION ALL
            SELECT u.fair_kind, u.room,
                   (SELECT o.user_id FROM job_outbox o
                    WHERE o.kind = u.fair_kind AND o.user_id > u.uid AND o.deliver_at <= now()
                    ORDER BY o.user_id LIMIT 1)
            FROM users u WHERE u.uid IS NOT NULL
         ), candidates AS (
            SELECT u.fair_kind, u.room, c.*,
                   row_number() OVER (PARTITION BY u.fair_kind, u.uid
                                      ORDER BY c.c_priority DESC, c.c_deliver_at, c.c_id) AS turn
            FROM users u,
            LATERAL (SELECT o.job_id AS c_id, o.priority AS c_priority, o.deliver_at AS c_deliver_at
                     FROM job_outbox o
                     WHERE o.kind = u.fair_kind AND o.user_id = u.uid AND o.deliver_at <= now()
                     ORDER BY o.priority DESC, o.deliver_at
                     LIMIT u.room) c
            WHERE u.uid IS NOT NULL
         ), picked AS (
            SELECT c_id, room,
                   row_number() OVER (PARTITION BY fair_kind
                                      ORDER BY c_priority DESC, turn, c_deliver_at DESC, c_id) AS place
            FROM candidates
         )
         SELECT o.job_id, j.kind, o.attempt, j.traceparent, j.priority
         FROM job_outbox o JOIN jobs j ON j.id = o.job_id
         WHERE o.job_id = ANY (ARRAY(SELECT c_id FROM picked WHERE place <= room))
           AND o.deliver_at <= now()
         FOR UPDATE OF o SKIP LOCKED";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .query(&stmt, &[&kinds, &rooms])
        .await?
        .iter()
        .map(Publication::from_row)
        .collect()
}

/// The kinds with outbox rows (due or not): a loose scan, one probe per kind.
pub async fn outbox_kinds(client: &impl GenericClient) -> Result<Vec<String>, JobsError> {
    const SQL: &str = "WITH RECURSIVE k AS (
            SELECT min(kind) AS kind FROM job_outbox
            UNION ALL
            SELECT (SELECT min(o.kind) FROM job_outbox o WHERE o.kind > k.kind)
            FROM k WHERE k.kind IS NOT NULL
         )
         SELECT kind FROM k WHERE kind IS NOT NULL";
    let stmt = client.prepare_cached(SQL).await?;
    client
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}
