//! Every SQL statement of the auth service: users, sessions, refresh tokens,
//! API keys, the login-failure counters and the admin role.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use keel_shared::auth::Admin;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::domain::{self, RefreshDecision, RefreshTokenState};
use crate::error::AuthError;

#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
}

impl UserRow {
    fn from_row(row: &Row) -> Self {
        Self {
            id: row.get("id"),
            email: row.get("email"),
            display_name: row.get("display_name"),
            created_at: row.get("created_at"),
        }
    }
}

pub struct NewUser<'a> {
    pub id: Uuid,
    pub email: &'a str,
    pub display_name: &'a str,
    pub password_hash: &'a str,
}

/// A session's first (or next) refresh token, by hash.
pub struct NewRefreshToken {
    pub hash: [u8; 32],
    pub expires_at: DateTime<Utc>,
}

pub enum RefreshOutcome {
    Rotated {
        user: UserRow,
        session_id: Uuid,
    },
    /// Known token, refused for `decision`'s reason (reuse has revoked the session).
    Refused {
        decision: RefreshDecision,
        user_id: Uuid,
        session_id: Uuid,
    },
    Unknown,
}

/// What RevokeAdmin did.
pub enum RevokeOutcome {
    /// The user no longer holds the role (or never did).
    Revoked(UserRow),
    /// The user is the only admin: nothing changed.
    LastAdmin,
    UnknownUser,
}

pub enum LogoutOutcome {
    Revoked { user_id: Uuid, session_id: Uuid },
    AlreadyRevoked { user_id: Uuid, session_id: Uuid },
    Unknown,
}

/// The answer to a login attempt's reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Go ahead and check the password.
    Granted,
    /// Attempts in flight fill the limit: try again when they are settled.
    Busy,
    /// The limit of failures in this window is reached.
    Refused,
}

/// How a granted login attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginAttempt {
    Succeeded,
    Failed,
    Abandoned,
}

/// An API key as listed (never its secret).
#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiKeyRow {
    fn from_row(row: &Row) -> Self {
        Self {
            id: row.get("id"),
            name: row.get("name"),
            prefix: row.get("prefix"),
            created_at: row.get("created_at"),
            expires_at: row.get("expires_at"),
            last_used_at: row.get("last_used_at"),
        }
    }
}

pub struct NewApiKey<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: &'a str,
    pub prefix: &'a str,
    pub hash: [u8; 32],
    pub expires_at: Option<DateTime<Utc>>,
}

const API_KEY_COLUMNS: &str = "id, name, prefix, created_at, expires_at, last_used_at";

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

const USER_COLUMNS: &str = "id, email, display_name, created_at";

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Store {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Inserts the user and their first session in one transaction. A second
    /// user with the same email (in any case) is `EmailTaken`, also when two
    /// registrations race: the unique index decides.
    pub async fn create_user_with_session(
        &self,
        user: NewUser<'_>,
        session_id: Uuid,
        token: &NewRefreshToken,
    ) -> Result<UserRow, AuthError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx
            .prepare_cached(&format!(
                "INSERT INTO users (id, email, display_name, password_hash) \
                 VALUES ($1, $2, $3, $4) RETURNING {USER_COLUMNS}"
            ))
            .await?;
        let row = tx
            .query_one(
                &stmt,
                &[
                    &user.id,
                    &user.email,
                    &user.display_name,
                    &user.password_hash,
                ],
            )
            .await
            .map_err(|e| match e.code() {
                Some(code) if *code == SqlState::UNIQUE_VIOLATION => AuthError::EmailTaken,
                _ => e.into(),
            })?;
        insert_session(&tx, session_id, user.id, token).await?;
        tx.commit().await?;
        Ok(UserRow::from_row(&row))
    }

    /// The user with this (normalised) email and their password hash.
    pub async fn find_user_by_email(
        &self,
        email: &str,
    ) -> Result<Option<(UserRow, String)>, AuthError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {USER_COLUMNS}, password_hash FROM users WHERE lower(email) = lower($1)"
            ))
            .await?;
        let row = client.query_opt(&stmt, &[&email]).await?;
        Ok(row.map(|r| (UserRow::from_row(&r), r.get("password_hash"))))
    }

    pub async fn get_user(&self, id: Uuid) -> Result<Option<UserRow>, AuthError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .await?;
        Ok(client
            .query_opt(&stmt, &[&id])
            .await?
            .map(|r| UserRow::from_row(&r)))
    }

    /// Counts a login attempt for this email before its password is checked
    /// (see [`Store::finish_login_attempt`] for the other half). Refused when
    /// `limit` attempts already failed in the current window, busy when the
    /// failures and the attempts in flight together fill it. The window starts
    /// with its first attempt, and again once it has passed or everything in
    /// it succeeded. One statement, so concurrent attempts on any replica
    /// cannot slip past the limit.
    pub async fn reserve_login_attempt(
        &self,
        email_hash: &[u8; 32],
        limit: u32,
        window: Duration,
    ) -> Result<Reservation, AuthError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO login_failures AS f (email_hash, failures, pending, window_started_at) \
                 VALUES ($1, 0, 1, now()) \
                 ON CONFLICT (email_hash) DO UPDATE SET \
                   failures = CASE WHEN f.window_started_at <= now() - make_interval(secs => $3) \
                                   THEN 0 ELSE f.failures END, \
                   pending = CASE WHEN f.window_started_at <= now() - make_interval(secs => $3) \
                                  THEN 1 ELSE f.pending + 1 END, \
                   window_started_at = CASE WHEN f.window_started_at <= now() - make_interval(secs => $3) \
                                              OR (f.failures = 0 AND f.pending = 0) \
                                            THEN now() ELSE f.window_started_at END \
                 WHERE f.window_started_at <= now() - make_interval(secs => $3) \
                    OR f.failures + f.pending < $2 \
                 RETURNING failures",
            )
            .await?;
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let window = secs(window);
        if client
            .query_opt(&stmt, &[&email_hash.as_slice(), &limit, &window])
            .await?
            .is_some()
        {
            return Ok(Reservation::Granted);
        }
        let stmt = client
            .prepare_cached("SELECT failures >= $2 FROM login_failures WHERE email_hash = $1")
            .await?;
        let exhausted = client
            .query_opt(&stmt, &[&email_hash.as_slice(), &limit])
            .await?
            .is_some_and(|row| row.get::<_, bool>(0));
        Ok(if exhausted {
            Reservation::Refused
        } else {
            Reservation::Busy
        })
    }

    /// Settles an attempt granted by [`Store::reserve_login_attempt`]: a
    /// failure is counted, a success forgets the failures, an attempt that
    /// could not be checked (an internal error) only leaves.
    pub async fn finish_login_attempt(
        &self,
        email_hash: &[u8; 32],
        attempt: LoginAttempt,
    ) -> Result<(), AuthError> {
        let client = self.pool.get().await?;
        let sql = match attempt {
            // An upsert: the sweep may have removed the row meanwhile.
            LoginAttempt::Failed => {
                "INSERT INTO login_failures AS f (email_hash, failures, pending) VALUES ($1, 1, 0) \
                 ON CONFLICT (email_hash) DO UPDATE \
                 SET failures = f.failures + 1, pending = greatest(f.pending - 1, 0)"
            }
            LoginAttempt::Succeeded => {
                "UPDATE login_failures SET failures = 0, pending = greatest(pending - 1, 0) \
                 WHERE email_hash = $1"
            }
            LoginAttempt::Abandoned => {
                "UPDATE login_failures SET pending = greatest(pending - 1, 0) WHERE email_hash = $1"
            }
        };
        let stmt = client.prepare_cached(sql).await?;
        client.execute(&stmt, &[&email_hash.as_slice()]).await?;
        Ok(())
    }

    /// A new session (one sign-in) with its first refresh token.
    pub async fn create_session(
        &self,
        session_id: Uuid,
        user_id: Uuid,
        token: &NewRefreshToken,
    ) -> Result<(), AuthError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        insert_session(&tx, session_id, user_id, token).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Rotates a refresh token in one transaction. The token and its session
    /// are locked (`FOR UPDATE`), so of two concurrent refreshes with one
    /// token the second sees it used: that is reuse, and revokes the session.
    pub async fn refresh(
        &self,
        presented_hash: &[u8; 32],
        next: &NewRefreshToken,
        now: DateTime<Utc>,
    ) -> Result<RefreshOutcome, AuthError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx
            .prepare_cached(
                "SELECT t.session_id, t.expires_at, t.used_at IS NOT NULL AS used, \
                        s.revoked_at IS NOT NULL AS revoked, \
                        u.id, u.email, u.display_name, u.created_at \
                 FROM refresh_tokens t \
                 JOIN sessions s ON s.id = t.session_id \
                 JOIN users u ON u.id = s.user_id \
                 WHERE t.token_hash = $1 \
                 FOR UPDATE OF t, s",
            )
            .await?;
        let Some(row) = tx.query_opt(&stmt, &[&presented_hash.as_slice()]).await? else {
            return Ok(RefreshOutcome::Unknown);
        };
        let session_id: Uuid = row.get("session_id");
        let user = UserRow::from_row(&row);
        let state = RefreshTokenState {
            used: row.get("used"),
            session_revoked: row.get("revoked"),
            expires_at: row.get("expires_at"),
        };
        let decision = domain::decide_refresh(state, now);
        match decision {
            RefreshDecision::Rotate => {
                let mark = tx
                    .prepare_cached(
                        "UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1",
                    )
                    .await?;
                tx.execute(&mark, &[&presented_hash.as_slice()]).await?;
                insert_refresh_token(&tx, session_id, next).await?;
                tx.commit().await?;
                Ok(RefreshOutcome::Rotated { user, session_id })
            }
            RefreshDecision::RevokeForReuse => {
                revoke_session(&tx, session_id, "reuse").await?;
                tx.commit().await?;
                Ok(RefreshOutcome::Refused {
                    decision,
                    user_id: user.id,
                    session_id,
                })
            }
            RefreshDecision::SessionRevoked | RefreshDecision::Expired => {
                tx.rollback().await?;
                Ok(RefreshOutcome::Refused {
                    decision,
                    user_id: user.id,
                    session_id,
                })
            }
        }
    }

    /// Revokes the session that this refresh token (current or already
    /// rotated) belongs to.
    pub async fn logout(&self, presented_hash: &[u8; 32]) -> Result<LogoutOutcome, AuthError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx
            .prepare_cached(
                "SELECT s.id, s.user_id, s.revoked_at IS NOT NULL AS revoked \
                 FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id \
                 WHERE t.token_hash = $1 \
                 FOR UPDATE OF s",
            )
            .await?;
        let Some(row) = tx.query_opt(&stmt, &[&presented_hash.as_slice()]).await? else {
            return Ok(LogoutOutcome::Unknown);
        };
        let (session_id, user_id): (Uuid, Uuid) = (row.get("id"), row.get("user_id"));
        if row.get::<_, bool>("revoked") {
            tx.rollback().await?;
            return Ok(LogoutOutcome::AlreadyRevoked {
                user_id,
                session_id,
            });
        }
        revoke_session(&tx, session_id, "logout").await?;
        tx.commit().await?;
        Ok(LogoutOutcome::Revoked {
            user_id,
            session_id,
        })
    }

    /// The user with this id and their password hash.
    pub async fn find_user_with_hash(
        &self,
        id: Uuid,
    ) -> Result<Option<(UserRow, String)>, AuthError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {USER_COLUMNS}, password_hash FROM users WHERE id = $1"
            ))
            .await?;
        let row = client.query_opt(&stmt, &[&id]).await?;
        Ok(row.map(|r| (UserRow::from_row(&r), r.get("password_hash"))))
    }

    /// Replaces the password hash `checked_hash` (the one the current
    /// password was verified against) with `password_hash`, ends every
    /// session of the user and opens the session `session_id`, in one
    /// transaction. Returns the ended sessions. When the hash is no longer
    /// `checked_hash` (a concurrent change won) nothing changes and the
    /// answer is `WrongPassword`: the current password is no longer it.
    pub async fn change_password(
        &self,
        user_id: Uuid,
        checked_hash: &str,
        password_hash: &str,
        session_id: Uuid,
        token: &NewRefreshToken,
    ) -> Result<Vec<Uuid>, AuthError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx
            .prepare_cached(
                "UPDATE users SET password_hash = $3, updated_at = now() \
                 WHERE id = $1 AND password_hash = $2",
            )
            .await?;
        if tx
            .execute(&stmt, &[&user_id, &checked_hash, &password_hash])
            .await?
            == 0
        {
            return Err(AuthError::WrongPassword);
        }
        let ended = revoke_user_sessions(&tx, user_id, "password_changed").await?;
        insert_session(&tx, session_id, user_id, token).await?;
        tx.commit().await?;
        Ok(ended)
    }

    /// Ends every session of the user. Returns the ended sessions.
    pub async fn logout_all(&self, user_id: Uuid) -> Result<Vec<Uuid>, AuthError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let ended = revoke_user_sessions(&tx, user_id, "logout_all").await?;
        tx.commit().await?;
        Ok(ended)
    }

    pub async fn create_api_key(&self, key: NewApiKey<'_>) -> Result<ApiKeyRow, AuthError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING {API_KEY_COLUMNS}"
            ))
            .await?;
        let row = client
            .query_one(
                &stmt,
                &[
                    &key.id,
                    &key.user_id,
                    &key.name,
                    &key.prefix,
                    &key.hash.as_slice(),
                    &key.expires_at,
                ],
            )
            .await?;
        Ok(ApiKeyRow::from_row(&row))
    }

    /// The user's keys that are not revoked (expired ones included), newest first.
    pub async fn list_api_keys(&self, user_id: Uuid) -> Result<Vec<ApiKeyRow>, AuthError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {API_KEY_COLUMNS} FROM api_keys \
                 WHERE user_id = $1 AND revoked_at IS NULL ORDER BY id DESC"
            ))
            .await?;
        let rows = client.query(&stmt, &[&user_id]).await?;
        Ok(rows.iter().map(ApiKeyRow::from_row).collect())
    }

    /// Revokes the user's key `id`; false when there is no such key of
    /// theirs that is not revoked yet.
    pub async fn revoke_api_key(&self, user_id: Uuid, id: Uuid) -> Result<bool, AuthError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE api_keys SET revoked_at = now() \
                 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
            )
            .await?;
        Ok(client.execute(&stmt, &[&id, &user_id]).await? == 1)
    }

    /// Deletes login counters whose window has passed and refresh tokens that
    /// have expired (an expired token is refused whether or not it is kept).
    /// Gives the admin role to the accounts with these (normalised) emails
    /// that do not hold it (the KEEL_ADMIN_EMAILS bootstrap); returns them.
    pub async fn grant_admin_by_email(&self, emails: &[String]) -> Result<Vec<Uuid>, AuthError> {
        if emails.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO admins (user_id) \
                 SELECT id FROM users WHERE lower(email) = ANY($1) \
                 ON CONFLICT (user_id) DO NOTHING RETURNING user_id",
            )
            .await?;
        let rows = client.query(&stmt, &[&emails]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// A page of accounts, newest first (ids are v7), strictly before
    /// `before`, whose email contains `email_contains` (case-insensitive;
    /// empty: every account), each with whether it is an admin.
    pub async fn list_users(
        &self,
        email_contains: &str,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<(UserRow, bool)>, AuthError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT u.id, u.email, u.display_name, u.created_at, \
                        EXISTS (SELECT 1 FROM admins a WHERE a.user_id = u.id) AS admin \
                 FROM users u \
                 WHERE ($1 = '' OR strpos(lower(u.email), lower($1)) > 0) \
                   AND ($2::uuid IS NULL OR u.id < $2) \
                 ORDER BY u.id DESC LIMIT $3",
            )
            .await?;
        let rows = client
            .query(&stmt, &[&email_contains, &before, &limit])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (UserRow::from_row(r), r.get("admin")))
            .collect())
    }

    /// Gives `user_id` the admin role (a no-op when it holds it) and records
    /// the call in the audit trail, in one transaction. None: no such user.
    pub async fn grant_admin(
        &self,
        admin: &Admin,
        user_id: Uuid,
    ) -> Result<Option<UserRow>, AuthError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let Some(user) = user_for_update(&tx, user_id).await? else {
            return Ok(None);
        };
        let stmt = tx
            .prepare_cached(
                "INSERT INTO admins (user_id, granted_by) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO NOTHING",
            )
            .await?;
        let changed = tx.execute(&stmt, &[&user_id, &admin.user_id]).await? == 1;
        keel_shared::audit::record(
            &tx,
            admin,
            "admin.grant",
            &format!("user:{user_id}"),
            serde_json::json!({ "email": user.email, "changed": changed }),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(user))
    }

    /// Takes the admin role from `user_id` (a no-op when it does not hold
    /// it) and records the call, in one transaction; refuses to leave Keel
    /// without an admin. Every admin row is locked first, so two admins
    /// revoking each other at once cannot both succeed.
    pub async fn revoke_admin(
        &self,
        admin: &Admin,
        user_id: Uuid,
    ) -> Result<RevokeOutcome, AuthError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let stmt = tx
            .prepare_cached("SELECT user_id FROM admins ORDER BY user_id FOR UPDATE")
            .await?;
        let admins: Vec<Uuid> = tx
            .query(&stmt, &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let Some(user) = user_for_update(&tx, user_id).await? else {
            return Ok(RevokeOutcome::UnknownUser);
        };
        let holds = admins.contains(&user_id);
        if holds && admins.len() == 1 {
            return Ok(RevokeOutcome::LastAdmin);
        }
        if holds {
            let stmt = tx
                .prepare_cached("DELETE FROM admins WHERE user_id = $1")
                .await?;
            tx.execute(&stmt, &[&user_id]).await?;
        }
        keel_shared::audit::record(
            &tx,
            admin,
            "admin.revoke",
            &format!("user:{user_id}"),
            serde_json::json!({ "email": user.email, "changed": holds }),
        )
        .await?;
        tx.commit().await?;
        Ok(RevokeOutcome::Revoked(user))
    }

    pub async fn sweep(&self, login_window: Duration) -> Result<(u64, u64), AuthError> {
        let client = self.pool.get().await?;
        let failures = client
            .execute(
                "DELETE FROM login_failures \
                 WHERE window_started_at <= now() - make_interval(secs => $1)",
                &[&secs(login_window)],
            )
            .await?;
        let tokens = client
            .execute("DELETE FROM refresh_tokens WHERE expires_at <= now()", &[])
            .await?;
        Ok((failures, tokens))
    }
}

async fn insert_session(
    tx: &Transaction<'_>,
    session_id: Uuid,
    user_id: Uuid,
    token: &NewRefreshToken,
) -> Result<(), AuthError> {
    let stmt = tx
        .prepare_cached("INSERT INTO sessions (id, user_id) VALUES ($1, $2)")
        .await?;
    tx.execute(&stmt, &[&session_id, &user_id]).await?;
    insert_refresh_token(tx, session_id, token).await
}

async fn insert_refresh_token(
    tx: &Transaction<'_>,
    session_id: Uuid,
    token: &NewRefreshToken,
) -> Result<(), AuthError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO refresh_tokens (token_hash, session_id, expires_at) VALUES ($1, $2, $3)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[&token.hash.as_slice(), &session_id, &token.expires_at],
    )
    .await?;
    Ok(())
}

async fn revoke_session(
    tx: &Transaction<'_>,
    session_id: Uuid,
    reason: &str,
) -> Result<(), AuthError> {
    let stmt = tx
        .prepare_cached(
            "UPDATE sessions SET revoked_at = now(), revoked_reason = $2 \
             WHERE id = $1 AND revoked_at IS NULL",
        )
        .await?;
    tx.execute(&stmt, &[&session_id, &reason]).await?;
    Ok(())
}

async fn revoke_user_sessions(
    tx: &Transaction<'_>,
    user_id: Uuid,
    reason: &str,
) -> Result<Vec<Uuid>, AuthError> {
    let stmt = tx
        .prepare_cached(
            "UPDATE sessions SET revoked_at = now(), revoked_reason = $2 \
             WHERE user_id = $1 AND revoked_at IS NULL RETURNING id",
        )
        .await?;
    let rows = tx.query(&stmt, &[&user_id, &reason]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The user, its row locked until the transaction ends (so a grant or
/// revocation does not race the account's deletion).
async fn user_for_update(tx: &Transaction<'_>, id: Uuid) -> Result<Option<UserRow>, AuthError> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id = $1 FOR KEY SHARE"
        ))
        .await?;
    Ok(tx
        .query_opt(&stmt, &[&id])
        .await?
        .map(|r| UserRow::from_row(&r)))
}
