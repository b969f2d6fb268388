//! Every SQL statement of the memory service. Each write is one statement, so
//! a conditional write is decided atomically by the row it touches.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Client, Pool};
use keel_shared::ApiError;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::domain::{NewMemory, RECENT_MEMORIES};
use crate::error::MemoryError;

macro_rules! memory_cols {
    () => {
        "namespace, key, content, tags, metadata, version, created_at, updated_at, expires_at"
    };
}

/// The same columns of `memory_history` (alias h).
macro_rules! history_cols {
    () => {
        "h.namespace, h.key, h.content, h.tags, h.metadata, h.version, h.created_at, \
         h.updated_at, h.expires_at"
    };
}

/// A memory every reader sees: not expired. `now()` is the statement's
/// transaction start, so one statement sees one instant.
macro_rules! live {
    () => {
        "(expires_at IS NULL OR expires_at > now())"
    };
}

/// Upsert. The version comes from `memory_versions` (see V8): the key's last
/// version plus one, or 1 for a key never written, also when the memory was
/// deleted meanwhile. Taking it locks that row first, so puts of one key
/// queue there and a re-created memory numbers on after the deleted one. A
/// new memory gets created_at = updated_at. `clock_timestamp()` in the update
/// is read after the row lock is taken, so updated_at never goes backwards
/// under concurrent writers. `xmax = 0` only on a row this statement inserted.
///
/// An expired row not swept yet is replaced as if absent: it gets the new
/// created_at (so created_at = updated_at marks a creation, as on insert)
/// and the history trigger (V12) drops its history. That trigger reads how
/// many versions to keep from the setting made here for this statement only.
const PUT_UNCONDITIONAL: &str = concat!(
    "WITH issued AS ( \
         INSERT INTO memory_versions AS v (user_id, namespace, key, version) VALUES ($1, $2, $3, 1) \
         ON CONFLICT (user_id, namespace, key) DO UPDATE SET version = v.version + 1 \
         RETURNING v.version AS next_version \
     ) \
     INSERT INTO memories AS m \
         (user_id, namespace, key, content, tags, metadata, version, created_at, updated_at, expires_at) \
     SELECT $1, $2, $3, $4, $5, $6, issued.next_version, now.t, now.t, $7 \
     FROM issued, (SELECT clock_timestamp() AS t, \
                          set_config('keel.memory_versions_kept', $8, true) AS kept) AS now \
     ON CONFLICT (user_id, namespace, key) DO UPDATE \
        SET content = EXCLUDED.content, tags = EXCLUDED.tags, metadata = EXCLUDED.metadata, \
            version = EXCLUDED.version, expires_at = EXCLUDED.expires_at, \
            created_at = CASE WHEN m.expires_at <= now() THEN EXCLUDED.created_at \
                              ELSE m.created_at END, \
            updated_at = CASE WHEN m.expires_at <= now() THEN EXCLUDED.updated_at \
                              ELSE clock_timestamp() END \
     RETURNING (m.xmax = 0 OR m.created_at = m.updated_at) AS created, ",
    memory_cols!()
);

/// Update only if the stored version is the expected one. A live memory's
/// version is its key's `memory_versions` row, so the next number is taken
/// there, under that row's lock, and only while both still say the expected
/// version: concurrent callers with the same expectation queue on the lock,
/// and after the first commits the others match nothing (and take nothing).
/// The memory is re-checked on its own row too (a delete only locks that).
/// An expired memory matches nothing.
const PUT_CONDITIONAL: &str = concat!(
    "WITH issued AS ( \
         UPDATE memory_versions AS v SET version = v.version + 1 \
          WHERE v.user_id = $1 AND v.namespace = $2 AND v.key = $3 AND v.version = $9 \
            AND EXISTS (SELECT 1 FROM memories \
                        WHERE user_id = $1 AND namespace = $2 AND key = $3 AND version = $9 \
                          AND ",
    live!(),
    ") \
         RETURNING v.version AS next_version \
     ) \
     UPDATE memories AS m \
        SET content = $4, tags = $5, metadata = $6, version = issued.next_version, \
            updated_at = clock_timestamp(), expires_at = $7 \
       FROM issued, (SELECT set_config('keel.memory_versions_kept', $8, true) AS kept) AS cfg \
      WHERE m.user_id = $1 AND m.namespace = $2 AND m.key = $3 AND m.version = $9 \
        AND (m.expires_at IS NULL OR m.expires_at > now()) AND cfg.kept IS NOT NULL \
     RETURNING ",
    memory_cols!()
);

const GET: &str = concat!(
    "SELECT ",
    memory_cols!(),
    " FROM memories WHERE user_id = $1 AND namespace = $2 AND key = $3 AND ",
    live!()
);

/// The current versions of live memories, one lookup per row of the
/// arrays (user ids $1, namespaces $2, keys $3), each by the primary key;
/// `ord` says which lookup a row answers (absent: none).
const GET_MANY: &str = concat!(
    "SELECT q.ord, m.* FROM unnest($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY
            AS q(q_user, q_namespace, q_key, ord),
     LATERAL (SELECT ",
    memory_cols!(),
    " FROM memories WHERE user_id = q_user AND namespace = q_namespace AND key = q_key AND ",
    live!(),
    ") AS m"
);

/// One version ($4) of a live memory: the current one, or an earlier one
/// still kept (at most $5 versions below the current).
const GET_VERSION: &str = concat!(
    "SELECT ",
    memory_cols!(),
    " FROM memories WHERE user_id = $1 AND namespace = $2 AND key = $3 AND version = $4 AND ",
    live!(),
    " UNION ALL SELECT ",
    history_cols!(),
    " FROM memories AS m JOIN memory_history AS h \
        ON h.user_id = m.user_id AND h.namespace = m.namespace AND h.key = m.key \
     WHERE m.user_id = $1 AND m.namespace = $2 AND m.key = $3 \
       AND (m.expires_at IS NULL OR m.expires_at > now()) \
       AND h.version = $4 AND h.version < m.version AND h.version >= m.version - $5"
);

/// A live memory's current version and the earlier ones still kept, newest first.
const LIST_VERSIONS: &str = concat!(
    "SELECT ",
    memory_cols!(),
    " FROM memories WHERE user_id = $1 AND namespace = $2 AND key = $3 AND ",
    live!(),
    " UNION ALL SELECT ",
    history_cols!(),
    " FROM memories AS m JOIN memory_history AS h \
        ON h.user_id = m.user_id AND h.namespace = m.namespace AND h.key = m.key \
     WHERE m.user_id = $1 AND m.namespace = $2 AND m.key = $3 \
       AND (m.expires_at IS NULL OR m.expires_at > now()) \
       AND h.version < m.version AND h.version >= m.version - $4 \
     ORDER BY version DESC"
);

const CURRENT_VERSION: &str = concat!(
    "SELECT version FROM memories WHERE user_id = $1 AND namespace = $2 AND key = $3 AND ",
    live!()
);

const DELETE: &str = concat!(
    "DELETE FROM memories \
     WHERE user_id = $1 AND namespace = $2 AND key = $3 AND ($4::bigint = 0 OR version = $4) AND ",
    live!(),
    " RETURNING version"
);

/// One page in key order: after the cursor, inside the prefix range (the
/// primary key (user_id, namespace, key) in byte order serves all three bounds).
const LIST: &str = concat!(
    "SELECT ",
    memory_cols!(),
    " FROM memories \
     WHERE user_id = $1 AND namespace = $6 AND key > $2 AND key >= $3 AND key < $4 AND ",
    live!(),
    " ORDER BY key LIMIT $5"
);

const LIST_TAGGED: &str = concat!(
    "SELECT ",
    memory_cols!(),
    " FROM memories \
     WHERE user_id = $1 AND namespace = $6 AND key > $2 AND key >= $3 AND key < $4 \
       AND tags @> ARRAY[$7::text] AND ",
    live!(),
    " ORDER BY key LIMIT $5"
);

/// Search in one statement. The query must be selective: have lexemes left
/// after stop words, and not match an empty document (a query made only of
/// exclusions, or `x OR -y`, would match nearly every memory). Every row
/// carries `selective`; with no match, or an unselective query (whose
/// memories are never scanned), there is one row with NULL memory columns.
///
/// Candidates: the matches (carrying every tag of $4) in the namespace,
/// newest update first, at most $5 of them: the index on (user_id,
/// namespace, updated_at DESC) stops after $5 matches however many exist;
/// a rare query goes through the GIN index instead (the planner sees the
/// query words: this statement is planned per call, not cached).
///
/// ts_rank (not ts_rank_cd) so repeats of a word in content saturate: for a
/// one-word query, a single key or tag hit (weight A, 0.61) always outranks
/// any number of content-only hits (weight C, below 0.33). The page is the
/// next $6 after the cursor ($7 score, $8 key) in (score DESC, key) order;
/// the snippet (ts_headline, the costliest part per row) is made for the
/// first $9 rows only, not for the one fetched to know a next page exists.
const SEARCH: &str = concat!(
    "SELECT s.selective, p.*, \
            CASE WHEN p.position <= $9 THEN \
                ts_headline('english'::regconfig, p.content, q, \
                            'StartSel=«, StopSel=», MaxWords=30, MinWords=10, MaxFragments=1') \
            END AS snippet \
     FROM websearch_to_tsquery('english'::regconfig, $3) AS q \
     CROSS JOIN LATERAL (SELECT numnode(q) > 0 AND NOT (''::tsvector @@ q) AS selective) AS s \
     LEFT JOIN LATERAL ( \
         SELECT ranked.*, row_number() OVER (ORDER BY ranked.score DESC, ranked.key) AS position \
         FROM ( \
             SELECT ",
    memory_cols!(),
    ", ts_rank(search, q) AS score \
             FROM (SELECT * FROM memories \
                   WHERE s.selective AND user_id = $1 AND namespace = $2 AND search @@ q \
                     AND tags @> $4::text[] AND ",
    live!(),
    "                ORDER BY updated_at DESC LIMIT $5) AS candidates \
         ) AS ranked \
         WHERE $7::real IS NULL OR ranked.score < $7 OR (ranked.score = $7 AND ranked.key > $8) \
         ORDER BY ranked.score DESC, ranked.key LIMIT $6 \
     ) AS p ON true \
     ORDER BY p.score DESC, p.key"
);

/// The workspace in one statement, for one namespace ($2) or all ($2 is
/// ignored). Totals and tag counts come from the trigger-kept
/// `memory_totals` and `memory_tag_counts` (a few rows whatever the number
/// of memories), minus the memories that expired and are not swept yet
/// (read from the small partial expiry index). Each row is one recent memory
/// (newest first) carrying the totals; the tag counts ride on the first row
/// only. With no memories there is one row and the memory columns are NULL.
///
/// Cached with nothing left to the planner per call: the recent list's
/// LIMIT is a constant ([`RECENT_MEMORIES`]), so Postgres settles on one
/// generic plan after five executions. With LIMIT as a parameter the generic
/// plan's estimate (10% of the rows) always lost to a fresh custom plan, and
/// planning this statement on every call cost more than running it (0.33 ms
/// vs 0.22 ms at 100k memories). A generic plan cannot see which namespace it
/// serves, so the only index it may walk for the newest memories is the
/// per-namespace one (V15 drops the per-user one that a rare namespace would
/// have had to filter row by row); across namespaces ($newest) the newest of
/// each namespace the user has (from `memory_totals`) are merged.
macro_rules! workspace_sql {
    ($scope:literal, $newest:ident) => {
        concat!(
            "WITH expired AS ( \
                 SELECT content_bytes, tags FROM memories \
                 WHERE user_id = $1 AND ",
            $scope,
            " AND expires_at IS NOT NULL AND expires_at <= now() \
             ), totals AS ( \
                 SELECT coalesce((SELECT sum(memories) FROM memory_totals \
                                  WHERE user_id = $1 AND ",
            $scope,
            "), 0)::bigint - (SELECT count(*) FROM expired) AS memory_count, \
                        coalesce((SELECT sum(content_bytes) FROM memory_totals \
                                  WHERE user_id = $1 AND ",
            $scope,
            "), 0)::bigint - coalesce((SELECT sum(content_bytes) FROM expired), 0)::bigint \
                            AS total_content_bytes \
             ), tag_totals AS ( \
                 SELECT coalesce(array_agg(tag ORDER BY tag), '{}') AS tag_names, \
                        coalesce(array_agg(n ORDER BY tag), '{}') AS tag_counts \
                 FROM (SELECT c.tag, sum(c.n)::bigint AS n \
                       FROM (SELECT tag, memories AS n FROM memory_tag_counts \
                             WHERE user_id = $1 AND ",
            $scope,
            "             UNION ALL \
                             SELECT t.tag, -count(*) FROM expired, unnest(expired.tags) AS t(tag) \
                             GROUP BY t.tag) AS c \
                       GROUP BY c.tag) AS d \
                 WHERE n > 0 \
             ), recent AS ( \
                 SELECT ",
            memory_cols!(),
            ", row_number() OVER (ORDER BY updated_at DESC, key) AS position \
                 FROM (",
            $newest!(),
            ") AS newest \
             ) \
             SELECT totals.memory_count, totals.total_content_bytes, \
                    CASE WHEN coalesce(r.position, 1) = 1 THEN tag_totals.tag_names END AS tag_names, \
                    CASE WHEN coalesce(r.position, 1) = 1 THEN tag_totals.tag_counts END AS tag_counts, \
                    r.namespace, r.key, r.content, r.tags, r.metadata, r.version, r.created_at, \
                    r.updated_at, r.expires_at \
             FROM totals CROSS JOIN tag_totals LEFT JOIN recent AS r ON true \
             ORDER BY r.position"
        )
    };
}

/// The newest [`RECENT_MEMORIES`] live memories of namespace $2.
macro_rules! newest_in_namespace {
    () => {
        concat!(
            "SELECT ",
            memory_cols!(),
            " FROM memories WHERE user_id = $1 AND namespace = $2 AND ",
            live!(),
            " ORDER BY updated_at DESC, key LIMIT 5"
        )
    };
}

/// The newest [`RECENT_MEMORIES`] live memories across the user's
/// namespaces: the newest of each, merged.
macro_rules! newest_in_all_namespaces {
    () => {
        concat!(
            "SELECT n.* FROM (SELECT DISTINCT namespace FROM memory_totals \
                              WHERE user_id = $1 AND $2::text IS NOT NULL) AS ns, \
             LATERAL (SELECT ",
            memory_cols!(),
            " FROM memories WHERE user_id = $1 AND namespace = ns.namespace AND ",
            live!(),
            " ORDER BY updated_at DESC, key LIMIT 5) AS n \
             ORDER BY n.updated_at DESC, n.key LIMIT 5"
        )
    };
}

// The LIMIT written into the two statements above.
const _: () = assert!(RECENT_MEMORIES == 5);

const WORKSPACE_NAMESPACE: &str = workspace_sql!("namespace = $2", newest_in_namespace);
const WORKSPACE_ALL: &str = workspace_sql!("$2::text IS NOT NULL", newest_in_all_namespaces);

/// One bounded batch of the expiry sweep: the oldest expiries first; rows a
/// writer holds are left for the next batch.
const SWEEP_EXPIRED: &str = "DELETE FROM memories \
     WHERE (user_id, namespace, key) IN ( \
         SELECT user_id, namespace, key FROM memories \
         WHERE expires_at <= now() ORDER BY expires_at LIMIT $1 \
         FOR UPDATE SKIP LOCKED) \
       AND expires_at <= now()";

/// A memory as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRow {
    pub namespace: String,
    pub key: String,
    pub content: String,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl TryFrom<&Row> for MemoryRow {
    type Error = MemoryError;

    fn try_from(row: &Row) -> Result<Self, MemoryError> {
        Ok(Self {
            namespace: row.try_get("namespace")?,
            key: row.try_get("key")?,
            content: row.try_get("content")?,
            tags: row.try_get("tags")?,
            metadata: row.try_get("metadata")?,
            version: row.try_get("version")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            expires_at: row.try_get("expires_at")?,
        })
    }
}

/// One search match.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub memory: MemoryRow,
    pub score: f32,
    pub snippet: String,
}

/// Where a search page starts: after this (score, key) in rank order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchCursor<'a> {
    pub score: f32,
    pub key: &'a str,
}

/// What a search looks for, and which page.
#[derive(Debug, Clone)]
pub struct SearchQuery<'a> {
    pub namespace: &'a str,
    pub query: &'a str,
    pub tags: &'a [String],
    pub candidates: i64,
    pub limit: i64,
    /// How many of the first results get a snippet.
    pub snippets: i64,
    pub after: Option<SearchCursor<'a>>,
}

/// Which memories a workspace sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    Namespace(&'a str),
    AllNamespaces,
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

/// A memory to read by its key: its current version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub user_id: Uuid,
    pub namespace: String,
    pub key: String,
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

    /// Creates or updates, keeping up to `versions_kept` earlier versions;
    /// true when this call created the memory.
    pub async fn put(
        &self,
        user_id: Uuid,
        memory: &NewMemory,
        versions_kept: i64,
    ) -> Result<(MemoryRow, bool), MemoryError> {
        let client = self.client().await?;
        let kept = versions_kept.to_string();
        let (row, created) = if memory.expected_version == 0 {
            let stmt = client.prepare_cached(PUT_UNCONDITIONAL).await?;
            let params: [&(dyn ToSql + Sync); 8] = [
                &user_id,
                &memory.namespace,
                &memory.key,
                &memory.content,
                &memory.tags,
                &memory.metadata,
                &memory.expires_at,
                &kept,
            ];
            let row = client
                .query_one(&stmt, &params)
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
                        &memory.namespace,
                        &memory.key,
                        &memory.content,
                        &memory.tags,
                        &memory.metadata,
                        &memory.expires_at,
                        &kept,
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
                current: current_version(&client, user_id, &memory.namespace, &memory.key).await?,
            }),
        }
    }

    /// The memory's current version, or (`version` > 0) that version while it
    /// is current or among the `versions_kept` before it.
    pub async fn get(
        &self,
        user_id: Uuid,
        namespace: &str,
        key: &str,
        version: i64,
        versions_kept: i64,
    ) -> Result<MemoryRow, MemoryError> {
        let client = self.client().await?;
        let row = if version == 0 {
            let stmt = client.prepare_cached(GET).await?;
            client
                .query_opt(&stmt, &[&user_id, &namespace, &key])
                .await?
        } else {
            let stmt = client.prepare_cached(GET_VERSION).await?;
            client
                .query_opt(
                    &stmt,
                    &[&user_id, &namespace, &key, &version, &versions_kept],
                )
                .await?
        };
        MemoryRow::try_from(&row.ok_or(MemoryError::NotFound)?)
    }

    /// The current version of each memory of `lookups` (None: absent or
    /// expired), in order, in one statement.
    pub async fn get_current_many(
        &self,
        lookups: &[Lookup],
    ) -> Result<Vec<Option<MemoryRow>>, MemoryError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(GET_MANY).await?;
        let users: Vec<Uuid> = lookups.iter().map(|l| l.user_id).collect();
        let namespaces: Vec<&str> = lookups.iter().map(|l| l.namespace.as_str()).collect();
        let keys: Vec<&str> = lookups.iter().map(|l| l.key.as_str()).collect();
        let rows = client.query(&stmt, &[&users, &namespaces, &keys]).await?;
        let mut found = vec![None; lookups.len()];
        for row in &rows {
            let ord: i64 = row.try_get("ord")?;
            let slot = usize::try_from(ord - 1)
                .ok()
                .and_then(|i| found.get_mut(i))
                .ok_or_else(|| ApiError::Internal(format!("lookup {ord} out of range")))?;
            *slot = Some(MemoryRow::try_from(row)?);
        }
        Ok(found)
    }

    /// The current version then the earlier ones kept, newest first; empty
    /// when the memory does not exist.
    pub async fn versions(
        &self,
        user_id: Uuid,
        namespace: &str,
        key: &str,
        versions_kept: i64,
    ) -> Result<Vec<MemoryRow>, MemoryError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(LIST_VERSIONS).await?;
        let rows = client
            .query(&stmt, &[&user_id, &namespace, &key, &versions_kept])
            .await?;
        rows.iter().map(MemoryRow::try_from).collect()
    }

    /// Deletes, unconditionally when `expected_version` is 0.
    pub async fn delete(
        &self,
        user_id: Uuid,
        namespace: &str,
        key: &str,
        expected_version: i64,
    ) -> Result<(), MemoryError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(DELETE).await?;
        if client
            .query_opt(&stmt, &[&user_id, &namespace, &key, &expected_version])
            .await?
            .is_some()
        {
            return Ok(());
        }
        match current_version(&client, user_id, namespace, key).await? {
            Some(current) if expected_version != 0 => Err(MemoryError::VersionMismatch {
                expected: expected_version,
                current: Some(current),
            }),
            // Gone (or deleted by someone else meanwhile): absent now.
            _ => Err(MemoryError::NotFound),
        }
    }

    /// Up to `limit` memories of `namespace` in key order, after `after`
    /// (exclusive), with keys in `[lower, upper)`, carrying `tag` when given.
    pub async fn list(
        &self,
        user_id: Uuid,
        namespace: &str,
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
                    .query(
                        &stmt,
                        &[&user_id, &after, &lower, &upper, &limit, &namespace],
                    )
                    .await?
            }
            Some(tag) => {
                let stmt = client.prepare_cached(LIST_TAGGED).await?;
                client
                    .query(
                        &stmt,
                        &[&user_id, &after, &lower, &upper, &limit, &namespace, &tag],
                    )
                    .await?
            }
        };
        rows.iter().map(MemoryRow::try_from).collect()
    }

    /// One user's memories of `namespace`, most recently updated first,
    /// after the cursor `(updated_at, key)`, read for `admin`: the read is
    /// recorded in the audit trail in the same transaction.
    pub async fn list_for_admin(
        &self,
        admin: &keel_shared::auth::Admin,
        user_id: Uuid,
        namespace: &str,
        after: Option<(DateTime<Utc>, &str)>,
        limit: i64,
    ) -> Result<Vec<MemoryRow>, MemoryError> {
        const SQL: &str = concat!(
            "SELECT ",
            memory_cols!(),
            " FROM memories \
             WHERE user_id = $1 AND namespace = $2 AND ",
            live!(),
            " AND ($3::timestamptz IS NULL OR updated_at < $3 OR (updated_at = $3 AND key > $4)) \
             ORDER BY updated_at DESC, key LIMIT $5"
        );
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let stmt = tx.prepare_cached(SQL).await?;
        let (at, key) = after.unzip();
        let key = key.unwrap_or_default();
        let rows = tx
            .query(&stmt, &[&user_id, &namespace, &at, &key, &limit])
            .await?;
        keel_shared::audit::record(
            &tx,
            admin,
            "memory.read",
            &format!("user:{user_id}"),
            serde_json::json!({ "namespace": namespace }),
        )
        .await?;
        tx.commit().await?;
        rows.iter().map(MemoryRow::try_from).collect()
    }

    /// Best matches first, or None when the query has nothing selective to
    /// search for (only stop words, symbols or exclusions).
    pub async fn search(
        &self,
        user_id: Uuid,
        search: &SearchQuery<'_>,
    ) -> Result<Option<Vec<SearchHit>>, MemoryError> {
        let client = self.client().await?;
        // Not a cached statement: an unnamed one, planned with this call's
        // words (so the planner can choose between the recency index and the
        // GIN index), sent with its parameter types in one round trip.
        let (score, key) = match search.after {
            Some(c) => (Some(c.score), c.key),
            None => (None, ""),
        };
        let rows = client
            .query_typed(
                SEARCH,
                &[
                    (&user_id, Type::UUID),
                    (&search.namespace, Type::TEXT),
                    (&search.query, Type::TEXT),
                    (&search.tags, Type::TEXT_ARRAY),
                    (&search.candidates, Type::INT8),
                    (&search.limit, Type::INT8),
                    (&score, Type::FLOAT4),
                    (&key, Type::TEXT),
                    (&search.snippets, Type::INT8),
                ],
            )
            .await?;
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
                Ok(Some(_)) => Some(search_hit(row)),
                Err(e) => Some(Err(e.into())),
            })
            .collect::<Result<_, MemoryError>>()
            .map(Some)
    }

    pub async fn workspace(
        &self,
        user_id: Uuid,
        scope: Scope<'_>,
    ) -> Result<Workspace, MemoryError> {
        let client = self.client().await?;
        let (sql, namespace) = match scope {
            Scope::Namespace(ns) => (WORKSPACE_NAMESPACE, ns),
            Scope::AllNamespaces => (WORKSPACE_ALL, ""),
        };
        let stmt = client.prepare_cached(sql).await?;
        let rows = client.query(&stmt, &[&user_id, &namespace]).await?;
        let mut workspace = Workspace::default();
        for (i, row) in rows.iter().enumerate() {
            if i == 0 {
                workspace.memory_count = row.try_get("memory_count")?;
                workspace.total_content_bytes = row.try_get("total_content_bytes")?;
                let names: Vec<String> = row.try_get("tag_names")?;
                let counts: Vec<i64> = row.try_get("tag_counts")?;
                workspace.tag_counts = names.into_iter().zip(counts).collect();
            }
            if row.try_get::<_, Option<String>>("key")?.is_some() {
                workspace.recent.push(MemoryRow::try_from(row)?);
            }
        }
        workspace.last_updated_at = workspace.recent.first().map(|m| m.updated_at);
        Ok(workspace)
    }

    /// Deletes up to `batch` expired memories (their history goes with them);
    /// how many it deleted.
    pub async fn sweep_expired(&self, batch: i64) -> Result<u64, MemoryError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SWEEP_EXPIRED).await?;
        Ok(client.execute(&stmt, &[&batch]).await?)
    }
}

fn search_hit(row: &Row) -> Result<SearchHit, MemoryError> {
    Ok(SearchHit {
        memory: MemoryRow::try_from(row)?,
        score: row.try_get("score")?,
        snippet: row
            .try_get::<_, Option<String>>("snippet")?
            .unwrap_or_default(),
    })
}

async fn current_version(
    client: &Client,
    user_id: Uuid,
    namespace: &str,
    key: &str,
) -> Result<Option<i64>, MemoryError> {
    let stmt = client.prepare_cached(CURRENT_VERSION).await?;
    Ok(client
        .query_opt(&stmt, &[&user_id, &namespace, &key])
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
