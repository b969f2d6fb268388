//! The auth service's orchestration: password hashing under a bound, the
//! login back-off, sessions and token minting. Handlers call it with
//! validated input; it calls the store.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_shared::auth::TokenSigner;
use keel_shared::backoff::Backoff;
use keel_shared::identity::{self, Identity};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::admin::Bootstrap;
use crate::domain::{self, RefreshDecision};
use crate::error::AuthError;
use crate::passwords::Passwords;
use crate::store::{
    ApiKeyRow, LoginAttempt, LogoutOutcome, NewApiKey, NewRefreshToken, NewUser, RefreshOutcome,
    Reservation, Store, UserRow,
};

/// How long a login waits for concurrent attempts on the same email to be
/// settled before it is refused as rate limited.
const LOGIN_BUSY_PATIENCE: Duration = Duration::from_secs(2);
/// How often it looks again meanwhile.
const LOGIN_BUSY_RETRY: Backoff =
    Backoff::new(Duration::from_millis(20), Duration::from_millis(250));

/// Login rate limiting, as configured.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    pub max_failures: u32,
    pub failure_window: Duration,
}

/// An access token and a refresh token for one session, as handed to a client.
#[derive(Debug)]
pub struct IssuedTokens {
    pub access_token: String,
    pub access_token_expires_at: DateTime<Utc>,
    pub refresh_token: String,
    pub refresh_token_expires_at: DateTime<Utc>,
}

/// A freshly minted refresh token: the plaintext goes to the client once,
/// only the hash is stored.
struct MintedRefresh {
    token: String,
    stored: NewRefreshToken,
}

/// Users, sessions and tokens.
pub struct Auth {
    store: Store,
    signer: TokenSigner,
    passwords: Arc<Passwords>,
    /// Bounds the hashes in flight: each one holds argon2's memory cost.
    hashing: Arc<Semaphore>,
    refresh_token_ttl: Duration,
    login: LoginLimits,
    /// This process's session and API-key checks: told at once what it ends
    /// (other processes learn within their cache period).
    identity: Arc<Identity>,
    bootstrap: Bootstrap,
}

/// How auth is set up, besides its store, signer and password hasher.
pub struct Settings {
    pub max_concurrent_hashes: usize,
    pub refresh_token_ttl: Duration,
    pub login: LoginLimits,
    /// The KEEL_ADMIN_EMAILS accounts.
    pub bootstrap: Bootstrap,
}

impl Auth {
    pub fn new(
        store: Store,
        signer: TokenSigner,
        passwords: Passwords,
        identity: Arc<Identity>,
        settings: Settings,
    ) -> Self {
        Self {
            store,
            signer,
            passwords: Arc::new(passwords),
            hashing: Arc::new(Semaphore::new(settings.max_concurrent_hashes)),
            refresh_token_ttl: settings.refresh_token_ttl,
            login: settings.login,
            identity,
            bootstrap: settings.bootstrap,
        }
    }

    /// Creates the user and their first session. `email`, `password` and
    /// `display_name` are already validated and normalised.
    pub async fn register(
        &self,
        email: &str,
        password: String,
        display_name: &str,
    ) -> Result<(UserRow, IssuedTokens), AuthError> {
        let password_hash = self.hash_password(password).await?;
        let now = Utc::now();
        let refresh = self.mint_refresh(now);
        let session_id = Uuid::now_v7();
        let new_user = NewUser {
            id: Uuid::now_v7(),
            email,
            display_name,
            password_hash: &password_hash,
        };
        let user = self
            .store
            .create_user_with_session(new_user, session_id, &refresh.stored)
            .await?;
        tracing::info!(target: "audit", event = "user_registered", user_id = %user.id, session_id = %session_id);
        self.bootstrap
            .grant_if_listed(&self.store, &self.identity, &user.email)
            .await;
        let tokens = self.issue(&user, session_id, refresh, now);
        Ok((user, tokens))
    }

    /// Checks the password (counted against the email's login limit) and
    /// opens a new session.
    pub async fn login(
        &self,
        email: &str,
        password: String,
    ) -> Result<(UserRow, IssuedTokens), AuthError> {
        let email_hash = domain::email_digest(email);
        // Before any hashing: a limited email costs the server nothing more.
        self.reserve_login_attempt(&email_hash).await?;
        let checked = self.check_credentials(email, password).await;
        let attempt = match &checked {
            Ok(Some(_)) => LoginAttempt::Succeeded,
            Ok(None) => LoginAttempt::Failed,
            Err(_) => LoginAttempt::Abandoned,
        };
        let settled = self.store.finish_login_attempt(&email_hash, attempt).await;
        let Some(user) = checked? else {
            settled?;
            tracing::info!(target: "audit", event = "login_failed", email_hash = %email_tag(&email_hash));
            return Err(AuthError::InvalidCredentials);
        };
        settled?;

        let now = Utc::now();
        let refresh = self.mint_refresh(now);
        let session_id = Uuid::now_v7();
        self.store
            .create_session(session_id, user.id, &refresh.stored)
            .await?;
        tracing::info!(target: "audit", event = "login_succeeded", user_id = %user.id, session_id = %session_id);
        self.bootstrap
            .grant_if_listed(&self.store, &self.identity, &user.email)
            .await;
        let tokens = self.issue(&user, session_id, refresh, now);
        Ok((user, tokens))
    }

    /// Rotates a refresh token; reuse of a rotated one revokes its session.
    pub async fn refresh(&self, refresh_token: &str) -> Result<IssuedTokens, AuthError> {
        let presented = domain::refresh_token_digest(refresh_token);
        let now = Utc::now();
        let next = self.mint_refresh(now);
        match self.store.refresh(&presented, &next.stored, now).await? {
            RefreshOutcome::Rotated { user, session_id } => {
                tracing::info!(target: "audit", event = "token_refreshed", user_id = %user.id, session_id = %session_id);
                Ok(self.issue(&user, session_id, next, now))
            }
            RefreshOutcome::Refused {
                decision: RefreshDecision::RevokeForReuse,
                user_id,
                session_id,
            } => {
                tracing::warn!(target: "audit", event = "refresh_token_reuse_detected", user_id = %user_id, session_id = %session_id, "session revoked");
                self.identity.forget_session(session_id);
                Err(AuthError::InvalidRefreshToken)
            }
            RefreshOutcome::Refused {
                decision,
                user_id,
                session_id,
            } => {
                tracing::info!(target: "audit", event = "refresh_refused", reason = ?decision, user_id = %user_id, session_id = %session_id);
                Err(AuthError::InvalidRefreshToken)
            }
            RefreshOutcome::Unknown => Err(AuthError::InvalidRefreshToken),
        }
    }

    /// Revokes the session of this refresh token. Idempotent for a token of
    /// an already revoked session; an unknown token is `InvalidRefreshToken`.
    pub async fn logout(&self, refresh_token: &str) -> Result<(), AuthError> {
        let presented = domain::refresh_token_digest(refresh_token);
        match self.store.logout(&presented).await? {
            LogoutOutcome::Revoked {
                user_id,
                session_id,
            } => {
                tracing::info!(target: "audit", event = "logout", user_id = %user_id, session_id = %session_id);
                self.identity.forget_session(session_id);
                Ok(())
            }
            LogoutOutcome::AlreadyRevoked { .. } => Ok(()),
            LogoutOutcome::Unknown => Err(AuthError::InvalidRefreshToken),
        }
    }

    pub async fn current_user(&self, user_id: Uuid) -> Result<UserRow, AuthError> {
        self.store
            .get_user(user_id)
            .await?
            .ok_or(AuthError::UserGone)
    }

    /// Checks the current password (counted against the login limit of the
    /// user's email, like a login), sets the new one, ends every session of
    /// the user and opens a fresh one, whose tokens are returned.
    pub async fn change_password(
        &self,
        user_id: Uuid,
        current_password: String,
        new_password: String,
    ) -> Result<IssuedTokens, AuthError> {
        let (user, hash) = self
            .store
            .find_user_with_hash(user_id)
            .await?
            .ok_or(AuthError::UserGone)?;
        let email_hash = domain::email_digest(&user.email);
        self.reserve_login_attempt(&email_hash).await?;
        let verified = self
            .verify_password(current_password, Some(hash.clone()))
            .await;
        let attempt = match &verified {
            Ok(true) => LoginAttempt::Succeeded,
            Ok(false) => LoginAttempt::Failed,
            Err(_) => LoginAttempt::Abandoned,
        };
        let settled = self.store.finish_login_attempt(&email_hash, attempt).await;
        if !verified? {
            settled?;
            tracing::info!(target: "audit", event = "password_change_refused", user_id = %user.id);
            return Err(AuthError::WrongPassword);
        }
        settled?;

        let password_hash = self.hash_password(new_password).await?;
        let now = Utc::now();
        let refresh = self.mint_refresh(now);
        let session_id = Uuid::now_v7();
        let ended = self
            .store
            .change_password(user.id, &hash, &password_hash, session_id, &refresh.stored)
            .await?;
        for ended in &ended {
            self.identity.forget_session(*ended);
        }
        tracing::info!(target: "audit", event = "password_changed", user_id = %user.id, session_id = %session_id, sessions_ended = ended.len());
        Ok(self.issue(&user, session_id, refresh, now))
    }

    /// Ends every session of the user.
    pub async fn logout_all(&self, user_id: Uuid) -> Result<(), AuthError> {
        let ended = self.store.logout_all(user_id).await?;
        for ended in &ended {
            self.identity.forget_session(*ended);
        }
        tracing::info!(target: "audit", event = "logout_all", user_id = %user_id, sessions_ended = ended.len());
        Ok(())
    }

    /// A new API key for the user: the secret (returned once, stored only
    /// as its SHA-256) and its listing.
    pub async fn create_api_key(
        &self,
        user_id: Uuid,
        name: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(String, ApiKeyRow), AuthError> {
        let secret = domain::new_api_key();
        let key = self
            .store
            .create_api_key(NewApiKey {
                id: Uuid::now_v7(),
                user_id,
                name,
                prefix: &secret[..identity::API_KEY_SHOWN_LEN],
                hash: identity::api_key_digest(&secret),
                expires_at,
            })
            .await?;
        tracing::info!(target: "audit", event = "api_key_created", user_id = %user_id, key_id = %key.id);
        Ok((secret, key))
    }

    pub async fn list_api_keys(&self, user_id: Uuid) -> Result<Vec<ApiKeyRow>, AuthError> {
        self.store.list_api_keys(user_id).await
    }

    /// Revokes one of the user's keys; another user's, unknown or already
    /// revoked is `ApiKeyNotFound`.
    pub async fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid) -> Result<(), AuthError> {
        if !self.store.revoke_api_key(user_id, key_id).await? {
            return Err(AuthError::ApiKeyNotFound);
        }
        self.identity.forget_api_keys();
        tracing::info!(target: "audit", event = "api_key_revoked", user_id = %user_id, key_id = %key_id);
        Ok(())
    }

    fn mint_refresh(&self, now: DateTime<Utc>) -> MintedRefresh {
        let token = domain::new_refresh_token();
        let stored = NewRefreshToken {
            hash: domain::refresh_token_digest(&token),
            expires_at: now + self.refresh_token_ttl,
        };
        MintedRefresh { token, stored }
    }

    fn issue(
        &self,
        user: &UserRow,
        session_id: Uuid,
        refresh: MintedRefresh,
        now: DateTime<Utc>,
    ) -> IssuedTokens {
        let (access_token, access_token_expires_at) =
            self.signer
                .sign(user.id, &user.email, Some(session_id), now);
        IssuedTokens {
            access_token,
            access_token_expires_at,
            refresh_token: refresh.token,
            refresh_token_expires_at: refresh.stored.expires_at,
        }
    }

    async fn hashing_permit(&self) -> Result<OwnedSemaphorePermit, AuthError> {
        self.hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| AuthError::Internal(format!("hashing semaphore: {e}")))
    }

    async fn hash_password(&self, password: String) -> Result<String, AuthError> {
        let passwords = self.passwords.clone();
        let permit = self.hashing_permit().await?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            passwords.hash(&password)
        })
        .await
        .map_err(|e| AuthError::Internal(format!("password hashing task: {e}")))?
        .map_err(AuthError::Internal)
    }

    /// Reserves a login attempt, waiting a little while concurrent attempts
    /// for the same email fill the limit (they are settled within a hash or
    /// two), rather than refusing a user who signs in from several places.
    async fn reserve_login_attempt(&self, email_hash: &[u8; 32]) -> Result<(), AuthError> {
        let deadline = tokio::time::Instant::now() + LOGIN_BUSY_PATIENCE;
        let mut waits = 0;
        loop {
            let pause = LOGIN_BUSY_RETRY.delay(waits);
            let reservation = self
                .store
                .reserve_login_attempt(
                    email_hash,
                    self.login.max_failures,
                    self.login.failure_window,
                )
                .await?;
            match reservation {
                Reservation::Granted => return Ok(()),
                Reservation::Busy if tokio::time::Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    waits += 1;
                }
                Reservation::Busy | Reservation::Refused => {
                    tracing::info!(target: "audit", event = "login_rate_limited", email_hash = %email_tag(email_hash));
                    return Err(AuthError::RateLimited);
                }
            }
        }
    }

    /// The user whose password this is, or None (unknown email and wrong
    /// password cost the same).
    async fn check_credentials(
        &self,
        email: &str,
        password: String,
    ) -> Result<Option<UserRow>, AuthError> {
        let found = self.store.find_user_by_email(email).await?;
        let (user, hash) = match found {
            Some((user, hash)) => (Some(user), Some(hash)),
            None => (None, None),
        };
        let verified = self.verify_password(password, hash).await?;
        Ok(user.filter(|_| verified))
    }

    async fn verify_password(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, AuthError> {
        let passwords = self.passwords.clone();
        let permit = self.hashing_permit().await?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            passwords.verify(&password, hash.as_deref())
        })
        .await
        .map_err(|e| AuthError::Internal(format!("password verification task: {e}")))
    }
}

/// Short prefix of the email digest: enough to correlate audit lines, not the address.
fn email_tag(email_hash: &[u8; 32]) -> String {
    hex::encode(&email_hash[..8])
}
