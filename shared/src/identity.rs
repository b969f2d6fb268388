//! The one place outside the auth service that reads auth's tables: whether
//! a session (an access token's `sid`) has ended, whom an API key acts for,
//! and whether a user holds the admin role. Jobs and memory call it through
//! [`crate::auth::Authenticator`].
//!
//! Postgres is the source of truth and answers are remembered for a short
//! time (`KEEL_CREDENTIAL_CACHE_SECS`, default 5 s): a revoked session, API
//! key or admin role stops working on every replica within that time, and a known
//! credential costs one query per cache period per process. Besides the
//! reads it writes one column, `api_keys.last_used_at` (at most once a
//! minute per key). When Postgres cannot answer, a credential whose answer
//! has run out is refused (UNAVAILABLE): fail closed.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::ApiError;

/// Every API key starts with this.
pub const API_KEY_PREFIX: &str = "keel_";
/// `keel_` and 43 URL-safe base64 characters (32 random bytes).
pub const API_KEY_LEN: usize = API_KEY_PREFIX.len() + 43;
/// How much of a key listings show (`keel_` and 8 characters).
pub const API_KEY_SHOWN_LEN: usize = API_KEY_PREFIX.len() + 8;
pub const DEFAULT_CACHE_SECS: u64 = 5;
/// `last_used_at` is written at most this often per key.
const LAST_USED_EVERY_SECS: f64 = 60.0;
const CACHE_ENTRIES: usize = 100_000;

/// Whether `token` has the shape of an API key (checked before any lookup).
pub fn looks_like_api_key(token: &str) -> bool {
    token.starts_with(API_KEY_PREFIX)
}

fn well_formed_api_key(token: &str) -> bool {
    token.len() == API_KEY_LEN
        && token[API_KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// SHA-256 of an API key: what is stored and looked up.
pub fn api_key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// An active API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyGrant {
    pub key_id: Uuid,
    pub user_id: Uuid,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Clone)]
struct Remembered<T> {
    value: T,
    at: Instant,
}

/// Session and API-key checks against auth's tables, remembered briefly.
pub struct Identity {
    pool: Pool,
    cache_for: Duration,
    sessions: quick_cache::sync::Cache<Uuid, Remembered<bool>>,
    keys: quick_cache::sync::Cache<[u8; 32], Remembered<Option<ApiKeyGrant>>>,
    admins: quick_cache::sync::Cache<Uuid, Remembered<bool>>,
}

impl Identity {
    pub fn new(pool: Pool, cache_for: Duration) -> Self {
        Self {
            pool,
            cache_for,
            sessions: quick_cache::sync::Cache::new(CACHE_ENTRIES),
            keys: quick_cache::sync::Cache::new(CACHE_ENTRIES),
            admins: quick_cache::sync::Cache::new(CACHE_ENTRIES),
        }
    }

    fn fresh<T: Clone>(&self, remembered: Option<Remembered<T>>) -> Option<T> {
        remembered
            .filter(|r| r.at.elapsed() < self.cache_for)
            .map(|r| r.value)
    }

    /// Forgets what is remembered about a session (auth calls it after ending one).
    pub fn forget_session(&self, session_id: Uuid) {
        self.sessions.remove(&session_id);
    }

    /// Forgets what is remembered about every API key (auth calls it after a revocation).
    pub fn forget_api_keys(&self) {
        self.keys.clear();
    }

    /// Forgets whether a user is an admin (auth calls it after a grant or revocation).
    pub fn forget_admin(&self, user_id: Uuid) {
        self.admins.remove(&user_id);
    }

    /// Whether the user holds the admin role (the `admins` table).
    pub async fn is_admin(&self, user_id: Uuid) -> Result<bool, ApiError> {
        if let Some(admin) = self.fresh(self.admins.get(&user_id)) {
            return Ok(admin);
        }
        let client = self.pool.get().await.map_err(unavailable)?;
        let stmt = client
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM admins WHERE user_id = $1)")
            .await
            .map_err(unavailable)?;
        let admin: bool = client
            .query_one(&stmt, &[&user_id])
            .await
            .map_err(unavailable)?
            .get(0);
        self.admins.insert(
            user_id,
            Remembered {
                value: admin,
                at: Instant::now(),
            },
        );
        Ok(admin)
    }

    /// Ok when the session exists and has not ended.
    pub async fn check_session(&self, session_id: Uuid) -> Result<(), ApiError> {
        let active = match self.fresh(self.sessions.get(&session_id)) {
            Some(active) => active,
            None => {
                let active = self.session_active(session_id).await?;
                self.sessions.insert(
                    session_id,
                    Remembered {
                        value: active,
                        at: Instant::now(),
                    },
                );
                active
            }
        };
        if active {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated(
                "this session has ended: sign in again".into(),
            ))
        }
    }

    async fn session_active(&self, session_id: Uuid) -> Result<bool, ApiError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let stmt = client
            .prepare_cached("SELECT revoked_at IS NULL FROM sessions WHERE id = $1")
            .await
            .map_err(unavailable)?;
        let row = client
            .query_opt(&stmt, &[&session_id])
            .await
            .map_err(unavailable)?;
        Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    }

    /// The user an API key acts for. Malformed, unknown, revoked and expired
    /// keys are all UNAUTHENTICATED with one message.
    pub async fn check_api_key(&self, key: &str) -> Result<ApiKeyGrant, ApiError> {
        let invalid = || ApiError::Unauthenticated("invalid, expired or revoked API key".into());
        if !well_formed_api_key(key) {
            return Err(invalid());
        }
        let digest = api_key_digest(key);
        let grant = match self.fresh(self.keys.get(&digest)) {
            Some(grant) => grant,
            None => {
                let grant = self.lookup_api_key(&digest).await?;
                self.keys.insert(
                    digest,
                    Remembered {
                        value: grant.clone(),
                        at: Instant::now(),
                    },
                );
                grant
            }
        };
        match grant {
            Some(grant) if grant.expires_at.is_none_or(|at| at > Utc::now()) => Ok(grant),
            _ => Err(invalid()),
        }
    }

    async fn lookup_api_key(&self, digest: &[u8; 32]) -> Result<Option<ApiKeyGrant>, ApiError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let stmt = client
            .prepare_cached(
                "SELECT id, user_id, expires_at, \
                        last_used_at IS NULL OR last_used_at < now() - make_interval(secs => $2) AS stale \
                 FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            )
            .await
            .map_err(unavailable)?;
        let Some(row) = client
            .query_opt(&stmt, &[&digest.as_slice(), &LAST_USED_EVERY_SECS])
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let grant = ApiKeyGrant {
            key_id: row.get("id"),
            user_id: row.get("user_id"),
            expires_at: row.get("expires_at"),
        };
        if row.get::<_, bool>("stale") {
            let stmt = client
                .prepare_cached("UPDATE api_keys SET last_used_at = now() WHERE id = $1")
                .await
                .map_err(unavailable)?;
            if let Err(e) = client.execute(&stmt, &[&grant.key_id]).await {
                // Bookkeeping only: the key is still good.
                tracing::warn!(error = %e, key_id = %grant.key_id, "could not record API key use");
            }
        }
        Ok(Some(grant))
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "credential check: postgres unavailable");
    ApiError::Unavailable("cannot check credentials right now, try again".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_shape() {
        let key = format!("{API_KEY_PREFIX}{}", "A".repeat(43));
        assert!(looks_like_api_key(&key));
        assert!(well_formed_api_key(&key));
        assert!(!well_formed_api_key(&format!("{key}A")));
        assert!(!well_formed_api_key(&key.replace('A', "!")));
        assert!(!looks_like_api_key("eyJhbGciOi"));
    }
}
