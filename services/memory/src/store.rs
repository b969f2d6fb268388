//! Every SQL statement of the memory service. Each write is one statement, so
//! a conditional write is decided atomically by the row it touches.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Client, Pool};
use keel_shared::ApiError;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::domain::{NewMemory, RECENT_MEMORIES};
use crate::error::MemoryError;

macro_rules! memory_cols {
    () => {
        "key, content, tags, metadata, version, created_at, updated_at"
    };
}

/// Upsert. The version comes from `memory_versions` (see V8): the key's last
/// version plus one, or 1 for a key never written, also when the memory was
/// deleted meanwhile. Taking it locks that row first, so puts of one key
/// queue there and a re-created memory numbers on after the deleted one. A
/// new memory gets created_at = updated_at. `clock_timestamp()` in the update
/// is read after the row lock is taken, so updated_at never goes backwards
/// under concurrent writers. `xmax = 0` only on a row this statement inserted.
const PUT_UNCONDITIONAL: &str = concat!(
    "WITH issued AS ( \
         INSERT INTO memory_versions AS v (user_id, key, version) VALUES ($1, $2, 1) \
         ON CONFLICT (user_id, key) DO UPDATE SET version = v.version + 1 \
         RETURNING v.version AS next_version \
     ) \
     INSERT INTO memories AS m (user_id, key, content, tags, metadata, version, created_at, updated_at) \
     SELECT $1, $2, $3, $4, $5, issued.next_version, now.t, now.t \
     FROM issued, (SELECT clock_timestamp() AS t) AS now \
     ON CONFLICT (user_id, key) DO UPDATE \
        SET content = EXCLUDED.content, tags = EXCLUDED.tags, metadata = EXCLUDED.metadata, \
            version = EXCLUDED.version, updated_at = clock_timestamp() \
     RETURNING (m.xmax = 0) AS created, ",
    memory_cols!()
);

/// Update only if the stored version is the expected one. A live memory's
/// version is its key's `memory_versions` row, so the next number is taken
/// there, under that row's lock, and only while both still say the expected
/// version: concurrent callers with the same expectation queue on the lock,
/// and after the first commits the others match nothing (and take nothing).
/// The memory is re-checked on its own row too (a delete only locks that).
const PUT_CONDITIONAL: &str = concat!(
    "WITH issued AS ( \
         UPDATE memory_versions AS v SET version = v.version + 1 \
          WHERE v.user_id = $1 AND v.key = $2 AND v.version = $6 \
            AND EXISTS (SELECT 1 FROM memories \
                        WHERE user_id = $1 AND key = $2 AND version = $6) \
         RETURNING v.version AS next_version \
     ) \
     UPDATE memories AS m \
        SET content = $3, tags = $4, metadata = $5, version = issued.next_version, \
            updated_at = clock_timestamp() \
       FROM issued \
      WHERE m.user_id = $1 AND m.key = $2 AND m.version = $6 \
     RETURNING ",
    memory_cols!()
);

const GET: &str = concat!(
    "SELECT ",
    memory_cols!(),
    " FROM memories WHERE user_id = $1 AND key = $2"
);

const CURRENT_VERSION: &str = "SELECT version FROM memories WHERE user_id = $1 AND key = $2";

const DELETE: &str = "DELETE FROM memories \
     WHERE user_id = $1 AND key = $2 AND ($3::bigint = 0 OR version = $3) \
     RETURNING version";

/// One page in key order: after the cursor, inside the prefix range (the
/// primary key (user_id, key) in byte order serves all three bounds).
const LIST: &str = concat!(
    "SELECT ",
    memory_cols!(),
    " FROM memories \
     WHERE user_id = $1 AND key > $2 AND key >= $3 AND key < $4 \
     ORDER BY key LIMIT $5"
);

const LIST_TAGGED: &str = concat!(
    "SELECT ",
    memory_cols!(),
    " FROM memories \
     WHERE user_id = $1 AND key > $2 AND key >= $3 AND key < $4 AND tags @> ARRAY[$6::text] \
     ORDER BY key LIMIT $5"
);

/// Search in one round trip. The query must be selective: have lexemes left
/// after stop words, and not match an empty document (a query made only of
/// exclusions, or `x OR -y`, would match nearly every memory). Every row
/// carries `selective`; with no match, or an unselective query (whose
/// memories are never scanned), there is one row with NULL memory columns.
///
/// ts_rank (not ts_rank_cd) so repeats of a word in content saturate: for a
/// one-word query, a single key or tag hit (weight A, 0.61) always outranks
/// any number of content-only hits (weight C, below 0.33).
const SEARCH: &str = concat!(
    "SELECT s.selective, m.* \
     FROM websearch_to_tsquery('english'::regconfig, $2) AS q \
     CROSS JOIN LATERAL (SELECT numnode(q) > 0 AND NOT (''::tsvector @@ q) AS selective) AS s \
     LEFT JOIN LATERAL ( \
         SELECT ",
    memory_cols!(),
    ", ts_rank(search, q) AS score \
         FROM memories \
         WHERE s.selective AND user_id = $1 AND search @@ q \
         ORDER BY score DESC, key LIMIT $3 \
     ) AS m ON true \
     ORDER BY m.score DESC, m.key"
);

/// The whole workspace in one statement. Totals come from an index-only scan
/// of (user_id, updated_at, key) INCLUDE (content_bytes), tag counts from the
/// trigger-kept `memory_tag_counts`, recent from the head of that same index.
/// Each row is one recent memory (newest first) carrying the totals; the tag
/// counts ride on the first row only. With no memories there is one row and
/// the memory columns are NULL.
const WORKSPACE: &str = "WITH totals AS ( \
         SELECT count(*) AS memory_count, \
                coalesce(sum(content_bytes), 0)::bigint AS total_content_bytes, \
                max(updated_at) AS last_updated_at \
         FROM memories WHERE user_id = $1 \
     ), tag_totals AS ( \
         SELECT coalesce(array_agg(tag ORDER BY tag), '{}') AS tag_names, \
                coalesce(array_agg(memories ORDER BY tag), '{}') AS tag_counts \
         FROM memory_tag_counts WHERE user_id = $1 AND memories > 0 \
     ), recent AS ( \
         SELECT key, content, tags, metadata, version, created_at, updated_at, \
                row_number() OVER (ORDER BY updated_at DESC, key) AS position \
         FROM (SELECT key, content, tags, metadata, version, created_at, updated_at \
               FROM memories WHERE user_id = $1 \
               ORDER BY updated_at DESC, key LIMIT $2) AS newest \
     ) \
     SELECT totals.memory_count, totals.total_content_bytes, totals.last_updated_at, \
            CASE WHEN coalesce(r.position, 1) = 1 THEN tag_totals.tag_names END AS tag_names, \
            CASE WHEN coalesce(r.position, 1) = 1 THEN tag_totals.tag_counts END AS tag_counts, \
            r.key, r.content, r.tags, r.metadata, r.version, r.created_at, r.updated_at \
     FROM totals CROSS JOIN tag_totals LEFT JOIN recent AS r ON true \
     ORDER BY r.position";

/// A memory as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRow {
    pub key: String,
    pub content: String,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TryFrom<&Row> for MemoryRow {
    type Error = MemoryError;

    fn try_from(row: &Row) -> Result<Self, MemoryError> {
        Ok(Self {
            key: row.try_get("key")?,
            content: row.try_get("content")?,
            tags: row.try_get("tags")?,
            metadata: row.try_get("metadata")?,
            version: row.try_get("version")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// The caller's aggregate figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workspace {
    pub memory_count: i64,
    pub total_content_bytes: i64,
    pub tag_counts: BTreeMap<String, i64>,
    pub last_updated_at: Option<DateTime<Utc>>,
    /// Newest update first.
    pub recent: Vec<MemoryRow>,
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn client(&self) -> Result<Client, MemoryError> {
        Ok(self.pool.get().await?)
    }

    /// Creates or updates; true when this call created the memory.
    pub async fn put(
        &self,
        user_id: Uuid,
        memory: &NewMemory,
    ) -> Result<(MemoryRow, bool), MemoryError> {
        let client = self.client().await?;
        let (row, created) = if memory.expected_version == 0 {
            let stmt = client.prepare_cached(PUT_UNCONDITIONAL).await?;
            let row = client
                .query_one(
                    &stmt,
                    &[
                        &user_id,
                        &memory.key,
                        &memory.content,
                        &memory.tags,
                        &memory.metadata,
                    ],
                )
                .await
                .map_err(write_error)?;
            let created = row.try_get("created")?;
            (Some(row), created)
        } else {
            let stmt = client.prepare_cached(PUT_CONDITIONAL).await?;
            let row = client
                .query_opt(
                    &stmt,
                    &[
                        &user_id,
                        &memory.key,
                        &memory.content,
                        &memory.tags,
                        &memory.metadata,
                        &memory.expected_version,
                    ],
                )
                .await
                .map_err(write_error)?;
            (row, false)
        };
        match row {
            Some(row) => Ok((MemoryRow::try_from(&row)?, created)),
            None => Err(MemoryError::VersionMismatch {
                expected: memory.expected_version,
                current: current_version(&client, user_id, &memory.key).await?,
            }),
        }
    }

    pub async fn get(&self, user_id: Uuid, key: &str) -> Result<MemoryRow, MemoryError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(GET).await?;
        let row = client
            .query_opt(&stmt, &[&user_id, &key])
            .await?
            .ok_or(MemoryError::NotFound)?;
        MemoryRow::try_from(&row)
    }

    /// Deletes, unconditionally when `expected_version` is 0.
    pub async fn delete(
        &self,
        user_id: Uuid,
        key: &str,
        expected_version: i64,
    ) -> Result<(), MemoryError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(DELETE).await?;
        if client
            .query_opt(&stmt, &[&user_id, &key, &expected_version])
            .await?
            .is_some()
        {
            return Ok(());
        }
        match current_version(&client, user_id, key).await? {
            Some(current) if expected_version != 0 => Err(MemoryError::VersionMismatch {
                expected: expected_version,
                current: Some(current),
            }),
            // Gone (or deleted by someone else meanwhile): absent now.
            _ => Err(MemoryError::NotFound),
        }
    }

    /// Up to `limit` memories in key order, after `after` (exclusive), with
    /// keys in `[lower, upper)`, carrying `tag` when given.
    pub async fn list(
        &self,
        user_id: Uuid,
        after: &str,
        (lower, upper): (&str, &str),
        tag: Option<&str>,
        limit: i64,
    ) -> Result<Vec<MemoryRow>, MemoryError> {
        let client = self.client().await?;
        let rows = match tag {
            None => {
                let stmt = client.prepare_cached(LIST).await?;
                client
                    .query(&stmt, &[&user_id, &after, &lower, &upper, &limit])
                    .await?
            }
            Some(tag) => {
                let stmt = client.prepare_cached(LIST_TAGGED).await?;
                client
                    .query(&stmt, &[&user_id, &after, &lower, &upper, &limit, &tag])
                    .await?
            }
        };
        rows.iter().map(MemoryRow::try_from).collect()
    }

    /// Best matches first, or None when the query has nothing selective to
    /// search for (only stop words, symbols or exclusions).
    pub async fn search(
        &self,
        user_id: Uuid,
        query: &str,
        limit: i64,
    ) -> Result<Option<Vec<(MemoryRow, f32)>>, MemoryError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SEARCH).await?;
        let rows = client.query(&stmt, &[&user_id, &query, &limit]).await?;
        let selective = match rows.first() {
            Some(row) => row.try_get::<_, bool>("selective")?,
            None => false,
        };
        if !selective {
            return Ok(None);
        }
        rows.iter()
            .filter_map(|row| match row.try_get::<_, Option<String>>("key") {
                Ok(None) => None,
                Ok(Some(_)) => {
                    Some(MemoryRow::try_from(row).and_then(|m| Ok((m, row.try_get("score")?))))
                }
                Err(e) => Some(Err(e.into())),
            })
            .collect::<Result<_, MemoryError>>()
            .map(Some)
    }

    pub async fn workspace(&self, user_id: Uuid) -> Result<Workspace, MemoryError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(WORKSPACE).await?;
        let rows = client.query(&stmt, &[&user_id, &RECENT_MEMORIES]).await?;
        let mut workspace = Workspace::default();
        for (i, row) in rows.iter().enumerate() {
            if i == 0 {
                workspace.memory_count = row.try_get("memory_count")?;
                workspace.total_content_bytes = row.try_get("total_content_bytes")?;
                workspace.last_updated_at = row.try_get("last_updated_at")?;
                let names: Vec<String> = row.try_get("tag_names")?;
                let counts: Vec<i64> = row.try_get("tag_counts")?;
                workspace.tag_counts = names.into_iter().zip(counts).collect();
            }
            if row.try_get::<_, Option<String>>("key")?.is_some() {
                workspace.recent.push(MemoryRow::try_from(row)?);
            }
        }
        Ok(workspace)
    }
}

async fn current_version(
    client: &Client,
    user_id: Uuid,
    key: &str,
) -> Result<Option<i64>, MemoryError> {
    let stmt = client.prepare_cached(CURRENT_VERSION).await?;
    Ok(client
        .query_opt(&stmt, &[&user_id, &key])
        .await?
        .map(|row| row.try_get(0))
        .transpose()?)
}

/// Write errors with a meaning for the caller; the rest go through the shared mapping.
fn write_error(e: tokio_postgres::Error) -> MemoryError {
    match e.code() {
        // The token's user no longer exists.
        Some(code) if *code == SqlState::FOREIGN_KEY_VIOLATION => MemoryError::Api(
            ApiError::Unauthenticated("the token's user no longer exists".into()),
        ),
        // Only reachable with limits raised far above the defaults: a tsvector holds at most 1 MB.
        Some(code) if *code == SqlState::PROGRAM_LIMIT_EXCEEDED => {
            MemoryError::invalid("content", "too large to index for search")
        }
        _ => e.into(),
    }
}
