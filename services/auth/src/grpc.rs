//! gRPC handlers for `keel.auth.v1.AuthService`: decode, validate, call the
//! store, encode. Register, Login, Refresh, Logout and VerifyToken need no
//! bearer token; GetCurrentUser authenticates inside its handler.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_proto::auth::v1::auth_service_server::AuthService;
use keel_proto::auth::v1::*;
use keel_shared::auth::{Authenticator, TokenSigner, TokenVerifier};
use keel_shared::time::to_timestamp;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{self, Passwords, RefreshDecision};
use crate::error::AuthError;
use crate::store::{
    LoginAttempt, LogoutOutcome, NewRefreshToken, NewUser, RefreshOutcome, Reservation, Store,
    UserRow,
};

/// How long a login waits for concurrent attempts on the same email to be
/// settled before it is refused as rate limited.
const LOGIN_BUSY_PATIENCE: Duration = Duration::from_secs(2);

/// Everything the handlers need, built once by `run`.
pub struct AuthApi {
    pub(crate) store: Store,
    pub(crate) signer: TokenSigner,
    pub(crate) verifier: Arc<TokenVerifier>,
    pub(crate) authenticator: Authenticator,
    pub(crate) passwords: Arc<Passwords>,
    /// Bounds the hashes in flight: each one holds argon2's memory cost.
    pub(crate) hashing: Arc<Semaphore>,
    pub(crate) refresh_token_ttl: Duration,
    pub(crate) login_max_failures: u32,
    pub(crate) login_failure_window: Duration,
}

/// A freshly minted refresh token: the plaintext goes to the client once,
/// only the hash is stored.
struct MintedRefresh {
    token: String,
    stored: NewRefreshToken,
}

impl AuthApi {
    fn mint_refresh(&self, now: DateTime<Utc>) -> MintedRefresh {
        let token = domain::new_refresh_token();
        let stored = NewRefreshToken {
            hash: domain::refresh_token_digest(&token),
            expires_at: now + self.refresh_token_ttl,
        };
        MintedRefresh { token, stored }
    }

    fn token_pair(
        &self,
        user: &UserRow,
        session_id: Uuid,
        refresh: MintedRefresh,
        now: DateTime<Utc>,
    ) -> TokenPair {
        let (access_token, access_expires) =
            self.signer
                .sign(user.id, &user.email, Some(session_id), now);
        TokenPair {
            access_token,
            access_token_expires_at: Some(to_timestamp(access_expires)),
            refresh_token: refresh.token,
            refresh_token_expires_at: Some(to_timestamp(refresh.stored.expires_at)),
        }
    }

    async fn hashing_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, AuthError> {
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
        let mut pause = Duration::from_millis(20);
        loop {
            let reservation = self
                .store
                .reserve_login_attempt(
                    email_hash,
                    self.login_max_failures,
                    self.login_failure_window,
                )
                .await?;
            match reservation {
                Reservation::Granted => return Ok(()),
                Reservation::Busy if tokio::time::Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
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

fn user_proto(user: &UserRow) -> User {
    User {
        id: user.id.to_string(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        created_at: Some(to_timestamp(user.created_at)),
    }
}

/// Short prefix of the email digest: enough to correlate audit lines, not the address.
fn email_tag(email_hash: &[u8; 32]) -> String {
    domain::hex(&email_hash[..8])
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        let email = domain::normalize_email(&req.email)?;
        domain::validate_new_password(&req.password)?;
        let display_name = domain::normalize_display_name(&req.display_name)?;

        let password_hash = self.hash_password(req.password).await?;
        let now = Utc::now();
        let refresh = self.mint_refresh(now);
        let session_id = Uuid::now_v7();
        let new_user = NewUser {
            id: Uuid::now_v7(),
            email: &email,
            display_name: &display_name,
            password_hash: &password_hash,
        };
        let user = self
            .store
            .create_user_with_session(new_user, session_id, &refresh.stored)
            .await?;
        tracing::info!(target: "audit", event = "user_registered", user_id = %user.id, session_id = %session_id);
        let tokens = self.token_pair(&user, session_id, refresh, now);
        Ok(Response::new(RegisterResponse {
            user: Some(user_proto(&user)),
            tokens: Some(tokens),
        }))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let req = request.into_inner();
        let email = domain::normalize_email(&req.email)?;
        domain::validate_login_password(&req.password)?;
        let email_hash = domain::email_digest(&email);

        // Before any hashing: a limited email costs the server nothing more.
        self.reserve_login_attempt(&email_hash).await?;
        let checked = self.check_credentials(&email, req.password).await;
        let attempt = match &checked {
            Ok(Some(_)) => LoginAttempt::Succeeded,
            Ok(None) => LoginAttempt::Failed,
            Err(_) => LoginAttempt::Abandoned,
        };
        let settled = self.store.finish_login_attempt(&email_hash, attempt).await;
        let Some(user) = checked? else {
            settled?;
            tracing::info!(target: "audit", event = "login_failed", email_hash = %email_tag(&email_hash));
            return Err(AuthError::InvalidCredentials.into());
        };
        settled?;

        let now = Utc::now();
        let refresh = self.mint_refresh(now);
        let session_id = Uuid::now_v7();
        self.store
            .create_session(session_id, user.id, &refresh.stored)
            .await?;
        tracing::info!(target: "audit", event = "login_succeeded", user_id = %user.id, session_id = %session_id);
        let tokens = self.token_pair(&user, session_id, refresh, now);
        Ok(Response::new(LoginResponse {
            user: Some(user_proto(&user)),
            tokens: Some(tokens),
        }))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        let req = request.into_inner();
        domain::validate_refresh_token(&req.refresh_token)?;
        let presented = domain::refresh_token_digest(&req.refresh_token);
        let now = Utc::now();
        let next = self.mint_refresh(now);
        match self.store.refresh(&presented, &next.stored, now).await? {
            RefreshOutcome::Rotated { user, session_id } => {
                tracing::info!(target: "audit", event = "token_refreshed", user_id = %user.id, session_id = %session_id);
                let tokens = self.token_pair(&user, session_id, next, now);
                Ok(Response::new(RefreshResponse {
                    tokens: Some(tokens),
                }))
            }
            RefreshOutcome::Refused {
                decision: RefreshDecision::RevokeForReuse,
                user_id,
                session_id,
            } => {
                tracing::warn!(target: "audit", event = "refresh_token_reuse_detected", user_id = %user_id, session_id = %session_id, "session revoked");
                Err(AuthError::InvalidRefreshToken.into())
            }
            RefreshOutcome::Refused {
                decision,
                user_id,
                session_id,
            } => {
                tracing::info!(target: "audit", event = "refresh_refused", reason = ?decision, user_id = %user_id, session_id = %session_id);
                Err(AuthError::InvalidRefreshToken.into())
            }
            RefreshOutcome::Unknown => Err(AuthError::InvalidRefreshToken.into()),
        }
    }

    /// Revokes the token's session. Idempotent for a token of an already
    /// revoked session (OK again); an unknown token is UNAUTHENTICATED.
    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let req = request.into_inner();
        domain::validate_refresh_token(&req.refresh_token)?;
        let presented = domain::refresh_token_digest(&req.refresh_token);
        match self.store.logout(&presented).await? {
            LogoutOutcome::Revoked {
                user_id,
                session_id,
            } => {
                tracing::info!(target: "audit", event = "logout", user_id = %user_id, session_id = %session_id);
            }
            LogoutOutcome::AlreadyRevoked { .. } => {}
            LogoutOutcome::Unknown => return Err(AuthError::InvalidRefreshToken.into()),
        }
        Ok(Response::new(LogoutResponse {}))
    }

    async fn get_current_user(
        &self,
        request: Request<GetCurrentUserRequest>,
    ) -> Result<Response<GetCurrentUserResponse>, Status> {
        let caller = self.authenticator.authenticate(request.metadata())?;
        let user_id = caller.user_id()?;
        let user = self
            .store
            .get_user(user_id)
            .await?
            .ok_or(AuthError::UserGone)?;
        Ok(Response::new(GetCurrentUserResponse {
            user: Some(user_proto(&user)),
        }))
    }

    /// The same checks the other services make locally (signature, `exp`,
    /// `iss`, `aud`, EdDSA only); it does not consult sessions.
    async fn verify_token(
        &self,
        request: Request<VerifyTokenRequest>,
    ) -> Result<Response<VerifyTokenResponse>, Status> {
        let req = request.into_inner();
        domain::validate_access_token(&req.access_token)?;
        let token = self.verifier.verify(&req.access_token)?;
        Ok(Response::new(VerifyTokenResponse {
            user_id: token.user_id.to_string(),
            email: token.email,
            expires_at: Some(to_timestamp(token.expires_at)),
        }))
    }
}
