//! Access tokens: Ed25519-signed JWTs that auth issues and every service
//! verifies locally, plus the gate that turns `authorization: Bearer ..`
//! (access token, API key or worker credential) into a typed [`Caller`], and
//! the admin gate in front of the admin services ([`Admin`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Request, Status};
use uuid::Uuid;

use crate::ApiError;
use crate::identity::{self, Identity};
use crate::worker_credentials::WorkerCredentials;

pub const DEFAULT_ISSUER: &str = "keel-auth";
pub const DEFAULT_AUDIENCE: &str = "keel";

/// The claims of a Keel access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccessClaims {
    /// User id (UUID).
    pub sub: String,
    pub email: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// Session id, so a token can be traced to its sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an Ed25519 PKCS#8 private key PEM: {0}")]
    Private(String),
    #[error("not an Ed25519 public key PEM: {0}")]
    Public(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Key id: the first 16 hex digits of SHA-256 over the raw public key.
fn key_id(public_key: &ed25519_dalek::VerifyingKey) -> String {
    hex::encode(&Sha256::digest(public_key.as_bytes())[..8])
}

/// An Ed25519 key pair as PEM text: what auth is configured with.
pub struct SigningKeyPem {
    pub private_pem: String,
    pub public_pem: String,
}

impl SigningKeyPem {
    /// A fresh random key pair (used for local runs and tests).
    pub fn generate() -> Self {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Self::from_key(&key)
    }

    fn from_key(key: &ed25519_dalek::SigningKey) -> Self {
        let private_pem = key
            .to_pkcs8_pem(Default::default())
            .expect("an Ed25519 key always encodes")
            .to_string();
        let public_pem = key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .expect("an Ed25519 key always encodes");
        Self {
            private_pem,
            public_pem,
        }
    }

    /// The public half of a private key PEM.
    pub fn public_from_private(private_pem: &str) -> Result<String, KeyError> {
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(private_pem)
            .map_err(|e| KeyError::Private(e.to_string()))?;
        Ok(Self::from_key(&key).public_pem)
    }
}

/// Issues access tokens. Only the auth service (and tests) hold one.
#[derive(Clone)]
pub struct TokenSigner {
    key: EncodingKey,
    kid: String,
    issuer: String,
    audience: String,
    ttl: Duration,
}

impl TokenSigner {
    pub fn from_private_pem(
        private_pem: &str,
        issuer: &str,
        audience: &str,
        ttl: Duration,
    ) -> Result<Self, KeyError> {
        let signing = ed25519_dalek::SigningKey::from_pkcs8_pem(private_pem)
            .map_err(|e| KeyError::Private(e.to_string()))?;
        let key = EncodingKey::from_ed_pem(private_pem.as_bytes())
            .map_err(|e| KeyError::Private(e.to_string()))?;
        Ok(Self {
            key,
            kid: key_id(&signing.verifying_key()),
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            ttl,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// Signs a token for `user_id` valid from `now` for the configured lifetime.
    pub fn sign(
        &self,
        user_id: Uuid,
        email: &str,
        session_id: Option<Uuid>,
        now: DateTime<Utc>,
    ) -> (String, DateTime<Utc>) {
        let expires_at = now + self.ttl;
        let claims = AccessClaims {
            sub: user_id.to_string(),
            email: email.to_string(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            sid: session_id.map(|s| s.to_string()),
        };
        (self.sign_claims(&claims), expires_at)
    }

    /// Signs arbitrary claims (tests use it for expired or wrong-audience tokens).
    pub fn sign_claims(&self, claims: &AccessClaims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("Ed25519 signing does not fail")
    }
}

/// A verified access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub user_id: Uuid,
    pub email: String,
    pub expires_at: DateTime<Utc>,
    /// The session (sign-in) the token belongs to; tokens auth issues always have one.
    pub session_id: Option<Uuid>,
}

/// Verifies access tokens locally: EdDSA only, signature by a known key id,
/// `exp`, `iss` and `aud` checked. Several public keys may be loaded so a key
/// can be rotated without logging anyone out.
///
/// A client sends the same token on every call until it expires, so tokens
/// that verified are remembered (by SHA-256, until their `exp`) and the
/// signature check runs once per token rather than once per call.
pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
    verified: quick_cache::sync::Cache<[u8; 32], VerifiedToken>,
}

/// Most verified tokens remembered (about 100 bytes each).
const VERIFIED_CACHE_ENTRIES: usize = 10_000;

impl TokenVerifier {
    pub fn from_public_pems(
        pems: &[String],
        issuer: &str,
        audience: &str,
    ) -> Result<Self, KeyError> {
        let mut keys = HashMap::new();
        for pem in pems {
            let public = ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
                .map_err(|e| KeyError::Public(e.to_string()))?;
            let key = DecodingKey::from_ed_pem(pem.as_bytes())
                .map_err(|e| KeyError::Public(e.to_string()))?;
            keys.insert(key_id(&public), key);
        }
        if keys.is_empty() {
            return Err(KeyError::Public("no public key given".into()));
        }
        // Pinned to EdDSA: `alg: none`, HS256-with-the-public-key and RS/ES
        // tokens are all refused before any signature check.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        // Expiry is checked against the caller's clock (see `verify_at`),
        // the same rule for a token seen first and for one remembered.
        validation.validate_exp = false;
        Ok(Self {
            keys,
            validation,
            verified: quick_cache::sync::Cache::new(VERIFIED_CACHE_ENTRIES),
        })
    }

    pub fn verify(&self, token: &str) -> Result<VerifiedToken, ApiError> {
        self.verify_at(token, Utc::now())
    }

    /// [`TokenVerifier::verify`] as of `now`.
    pub fn verify_at(&self, token: &str, now: DateTime<Utc>) -> Result<VerifiedToken, ApiError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(known) = self.verified.get(&digest) {
            if self.unexpired(&known, now) {
                return Ok(known);
            }
            self.verified.remove(&digest);
        }
        let verified = self.verify_signed(token)?;
        if !self.unexpired(&verified, now) {
            return Err(expired_or_invalid());
        }
        self.verified.insert(digest, verified.clone());
        Ok(verified)
    }

    /// Not expired at `now`, give or take the leeway.
    fn unexpired(&self, token: &VerifiedToken, now: DateTime<Utc>) -> bool {
        now.timestamp() <= token.expires_at.timestamp() + self.validation.leeway as i64
    }

    /// Signature, algorithm, key, issuer, audience and claims; not expiry.
    fn verify_signed(&self, token: &str) -> Result<VerifiedToken, ApiError> {
        let invalid = expired_or_invalid;
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
        if header.alg != Algorithm::EdDSA {
            return Err(invalid());
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.get(kid))
            .ok_or_else(invalid)?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation)
            .map_err(|_| invalid())?;
        let user_id = Uuid::parse_str(&data.claims.sub).map_err(|_| invalid())?;
        let expires_at = DateTime::from_timestamp(data.claims.exp, 0).ok_or_else(invalid)?;
        let session_id = match data.claims.sid.as_deref() {
            Some(sid) => Some(Uuid::parse_str(sid).map_err(|_| invalid())?),
            None => None,
        };
        Ok(VerifiedToken {
            user_id,
            email: data.claims.email,
            expires_at,
            session_id,
        })
    }
}

fn expired_or_invalid() -> ApiError {
    ApiError::Unauthenticated("invalid or expired access token".into())
}

/// Who is calling, as established by [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An access token of a session that has not ended.
    User(VerifiedToken),
    /// An API key acting for its user.
    ApiKey { user_id: Uuid, key_id: Uuid },
    /// A worker presenting a worker credential.
    Worker(Worker),
}

/// A worker authenticated by a worker credential; runner RPCs find it in
/// the request's extensions (see [`Authenticator::workers_only`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// The credential's name; None for the single shared KEEL_WORKER_TOKEN.
    name: Option<String>,
}

impl Worker {
    /// The worker the runner gate put on the request.
    pub fn of<T>(request: &Request<T>) -> Result<&Worker, ApiError> {
        request
            .extensions()
            .get::<Worker>()
            .ok_or_else(|| ApiError::Unauthenticated("missing worker credential".into()))
    }

    /// The credential's name (None for the shared KEEL_WORKER_TOKEN).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// A named credential may record transitions only as `name` or
    /// `name/<anything>` (PERMISSION_DENIED naming `worker_id` otherwise);
    /// the shared KEEL_WORKER_TOKEN may record any worker id.
    pub fn may_record_as(&self, worker_id: &str) -> Result<(), ApiError> {
        let Some(name) = &self.name else {
            return Ok(());
        };
        let bound = worker_id == name
            || worker_id
                .strip_prefix(name.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        if bound {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(format!(
                "worker_id: the worker credential {name:?} may only record as \"{name}\" or \"{name}/...\""
            )))
        }
    }
}

/// A signed-in user holding the admin role; admin handlers find it in the
/// request's extensions (see [`Authenticator::admins_only`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub user_id: Uuid,
    pub email: String,
}

impl Admin {
    /// The admin the admin gate put on the request.
    pub fn of<T>(request: &Request<T>) -> Result<&Admin, ApiError> {
        request
            .extensions()
            .get::<Admin>()
            .ok_or_else(|| ApiError::Unauthenticated("missing bearer token".into()))
    }
}

impl Caller {
    /// The calling user's id (an access token's or an API key's); a worker
    /// credential is PERMISSION_DENIED here.
    pub fn user_id(&self) -> Result<Uuid, ApiError> {
        match self {
            Caller::User(t) => Ok(t.user_id),
            Caller::ApiKey { user_id, .. } => Ok(*user_id),
            Caller::Worker(_) => Err(ApiError::PermissionDenied(
                "the worker credential cannot call user RPCs".into(),
            )),
        }
    }

    /// The user behind an access token: what managing keys, passwords and
    /// sessions needs. An API key is PERMISSION_DENIED (a leaked key must not
    /// mint more, nor lock its user out).
    pub fn signed_in_user(&self) -> Result<&VerifiedToken, ApiError> {
        match self {
            Caller::User(t) => Ok(t),
            Caller::ApiKey { .. } => Err(ApiError::PermissionDenied(
                "an API key cannot manage API keys, passwords or sessions: use an access token"
                    .into(),
            )),
            Caller::Worker(_) => Err(ApiError::PermissionDenied(
                "the worker credential cannot call user RPCs".into(),
            )),
        }
    }

    /// The worker behind a worker credential; a user's token is PERMISSION_DENIED.
    pub fn into_worker(self) -> Result<Worker, ApiError> {
        match self {
            Caller::Worker(worker) => Ok(worker),
            Caller::User(_) | Caller::ApiKey { .. } => Err(ApiError::PermissionDenied(
                "this RPC needs the worker credential".into(),
            )),
        }
    }

    /// The access token of a user holding the admin role, checked against
    /// `identity` (remembered for the credential cache period, so a revoked
    /// role stops working within it). An API key, a worker credential or a
    /// user without the role is PERMISSION_DENIED.
    pub async fn admin(&self, identity: Option<&Identity>) -> Result<&VerifiedToken, ApiError> {
        let token = match self {
            Caller::User(t) => t,
            Caller::ApiKey { .. } => {
                return Err(ApiError::PermissionDenied(
                    "admin RPCs need a signed-in admin's access token, not an API key".into(),
                ));
            }
            Caller::Worker(_) => {
                return Err(ApiError::PermissionDenied(
                    "the worker credential cannot call admin RPCs".into(),
                ));
            }
        };
        let Some(identity) = identity else {
            return Err(ApiError::PermissionDenied(
                "admin RPCs are not served here".into(),
            ));
        };
        if identity.is_admin(token.user_id).await? {
            Ok(token)
        } else {
            Err(ApiError::PermissionDenied(
                "this RPC needs the admin role".into(),
            ))
        }
    }

    /// The caller the gate put on the request.
    pub fn of<T>(request: &Request<T>) -> Result<&Caller, ApiError> {
        request
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| ApiError::Unauthenticated("missing bearer token".into()))
    }
}

/// The bearer token from `authorization: Bearer <token>`.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, ApiError> {
    let value = metadata.get("authorization").map(|v| v.to_str());
    parse_bearer(value.map(|v| v.map_err(|_| ())))
}

fn bearer_from_headers(headers: &http::HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get("authorization").map(|v| v.to_str());
    parse_bearer(value.map(|v| v.map_err(|_| ())))
}

fn parse_bearer(value: Option<Result<&str, ()>>) -> Result<&str, ApiError> {
    let missing = || ApiError::Unauthenticated("missing bearer token".into());
    let value = value.ok_or_else(missing)?.map_err(|_| missing())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(missing());
    }
    Ok(token.trim())
}

/// Turns `authorization: Bearer ..` into a [`Caller`]: the shared worker
/// token, a named worker credential, an API key or an access token (whose
/// session must not have ended). Wrap a service with [`Authenticator::users`]
/// or [`Authenticator::workers_only`].
#[derive(Clone)]
pub struct Authenticator {
    verifier: Arc<TokenVerifier>,
    /// SHA-256 of the shared worker token, compared in constant time.
    worker_token_digest: Option<[u8; 32]>,
    worker_credentials: Option<Arc<WorkerCredentials>>,
    /// Session and API-key checks; without it API keys are refused and
    /// sessions are not consulted.
    identity: Option<Arc<Identity>>,
}

impl Authenticator {
    pub fn new(verifier: Arc<TokenVerifier>, worker_token: Option<&str>) -> Self {
        Self {
            verifier,
            worker_token_digest: worker_token
                .filter(|t| !t.is_empty())
                .map(|t| Sha256::digest(t.as_bytes()).into()),
            worker_credentials: None,
            identity: None,
        }
    }

    /// Also accepts the named credentials of this file.
    pub fn with_worker_credentials(mut self, credentials: Arc<WorkerCredentials>) -> Self {
        self.worker_credentials = Some(credentials);
        self
    }

    /// Checks sessions and API keys against Postgres (see [`Identity`]).
    pub fn with_identity(mut self, identity: Arc<Identity>) -> Self {
        self.identity = Some(identity);
        self
    }

    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        self.authenticate_token(bearer_token(metadata)?).await
    }

    async fn authenticate_token(&self, token: &str) -> Result<Caller, ApiError> {
        if let Some(worker) = self.worker(token) {
            return Ok(Caller::Worker(worker));
        }
        if identity::looks_like_api_key(token) {
            let Some(identity) = &self.identity else {
                return Err(ApiError::Unauthenticated(
                    "API keys are not accepted here".into(),
                ));
            };
            let grant = identity.check_api_key(token).await?;
            return Ok(Caller::ApiKey {
                user_id: grant.user_id,
                key_id: grant.key_id,
            });
        }
        let verified = self.verifier.verify(token)?;
        if let (Some(identity), Some(session_id)) = (&self.identity, verified.session_id) {
            identity.check_session(session_id).await?;
        }
        Ok(Caller::User(verified))
    }

    fn worker(&self, token: &str) -> Option<Worker> {
        if let Some(expected) = &self.worker_token_digest {
            let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if bool::from(presented.ct_eq(expected)) {
                return Some(Worker { name: None });
            }
        }
        let name = self.worker_credentials.as_ref()?.check(token)?;
        Some(Worker { name: Some(name) })
    }

    /// `service` with every call authenticated and its [`Caller`] attached;
    /// which callers an RPC accepts is the handler's business ([`Caller::user_id`]).
    pub fn users<S>(&self, service: S) -> Gate<S> {
        Gate {
            inner: service,
            authenticator: self.clone(),
            admits: Admits::Users,
        }
    }

    /// `service` admitting only worker credentials (a user's token or API key
    /// is PERMISSION_DENIED, a bad credential UNAUTHENTICATED), with the
    /// [`Worker`] attached: no runner handler can forget the check.
    pub fn workers_only<S>(&self, service: S) -> Gate<S> {
        Gate {
            inner: service,
            authenticator: self.clone(),
            admits: Admits::Workers,
        }
    }

    /// `service` admitting only signed-in users holding the admin role (see
    /// [`Caller::admin`]), with the [`Admin`] attached: no admin handler
    /// can forget the check.
    pub fn admins_only<S>(&self, service: S) -> Gate<S> {
        Gate {
            inner: service,
            authenticator: self.clone(),
            admits: Admits::Admins,
        }
    }

    async fn admit(
        &self,
        admits: Admits,
        token: &str,
        extensions: &mut http::Extensions,
    ) -> Result<(), ApiError> {
        let caller = self.authenticate_token(token).await?;
        match admits {
            Admits::Users => {
                extensions.insert(caller);
            }
            Admits::Workers => {
                extensions.insert(caller.into_worker()?);
            }
            Admits::Admins => {
                let token = caller.admin(self.identity.as_deref()).await?;
                extensions.insert(Admin {
                    user_id: token.user_id,
                    email: token.email.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Which callers a [`Gate`] lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admits {
    Users,
    Workers,
    Admins,
}

/// A gRPC service behind an [`Authenticator`]: an asynchronous interceptor
/// (API keys and sessions may need a query), per service.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    authenticator: Authenticator,
    admits: Admits,
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The ready service is the one to call; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authenticator = self.authenticator.clone();
        let admits = self.admits;
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let admitted = match bearer_from_headers(&parts.headers) {
                Ok(token) => {
                    authenticator
                        .admit(admits, token, &mut parts.extensions)
                        .await
                }
                Err(e) => Err(e),
            };
            let request = http::Request::from_parts(parts, body);
            match admitted {
                Ok(()) => inner.call(request).await,
                Err(e) => Ok(Status::from(e).into_http()),
            }
        })
    }
}

/// Token settings shared by every service that verifies tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifierConfig {
    /// PEM file(s) with the Ed25519 public key(s) that access tokens may be
    /// signed with (comma-separated; two during a key rotation).
    #[arg(long, env = "KEEL_JWT_PUBLIC_KEY_FILES", value_delimiter = ',')]
    pub jwt_public_key_files: Vec<std::path::PathBuf>,
    /// Expected `iss` claim.
    #[arg(long, env = "KEEL_JWT_ISSUER", default_value = DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// Expected `aud` claim.
    #[arg(long, env = "KEEL_JWT_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub jwt_audience: String,
    /// How long (seconds) whether a session has ended, or whom an API key
    /// acts for, is remembered before Postgres is asked again: a logged-out
    /// session or a revoked API key stops working within this time.
    #[arg(long, env = "KEEL_CREDENTIAL_CACHE_SECS", default_value_t = identity::DEFAULT_CACHE_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub credential_cache_secs: u64,
}

impl VerifierConfig {
    pub fn credential_cache(&self) -> Duration {
        Duration::from_secs(self.credential_cache_secs.max(1))
    }

    pub fn load(&self) -> Result<TokenVerifier, crate::StartupError> {
        if self.jwt_public_key_files.is_empty() {
            return Err(crate::StartupError::MissingVar("KEEL_JWT_PUBLIC_KEY_FILES"));
        }
        let pems = self
            .jwt_public_key_files
            .iter()
            .map(|p| {
                std::fs::read_to_string(p).map_err(|e| crate::StartupError::InvalidVar {
                    var: "KEEL_JWT_PUBLIC_KEY_FILES",
                    reason: format!("{}: {e}", p.display()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        TokenVerifier::from_public_pems(&pems, &self.jwt_issuer, &self.jwt_audience).map_err(|e| {
            crate::StartupError::InvalidVar {
                var: "KEEL_JWT_PUBLIC_KEY_FILES",
                reason: e.to_string(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (TokenSigner, TokenVerifier) {
        let pem = SigningKeyPem::generate();
        let signer = TokenSigner::from_private_pem(
            &pem.private_pem,
            DEFAULT_ISSUER,
            DEFAULT_AUDIENCE,
            Duration::from_secs(900),
        )
        .unwrap();
        let verifier =
            TokenVerifier::from_public_pems(&[pem.public_pem], DEFAULT_ISSUER, DEFAULT_AUDIENCE)
                .unwrap();
        (signer, verifier)
    }

    #[test]
    fn accepts_own_tokens_and_rejects_tampering() {
        let (signer, verifier) = pair();
        let id = Uuid::now_v7();
        let (token, _) = signer.sign(id, "a@example.com", None, Utc::now());
        assert_eq!(verifier.verify(&token).unwrap().user_id, id);

        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert!(verifier.verify(&parts.join(".")).is_err());
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let (signer, mut verifier) = pair();
        verifier.validation.leeway = 0;
        let id = Uuid::now_v7();
        let now = Utc::now();
        let claims = |exp: i64| AccessClaims {
            sub: id.to_string(),
            email: "a@example.com".into(),
            iss: DEFAULT_ISSUER.into(),
            aud: DEFAULT_AUDIENCE.into(),
            iat: now.timestamp(),
            exp,
            sid: None,
        };
        let token = signer.sign_claims(&claims(now.timestamp() + 1));
        assert_eq!(verifier.verify_at(&token, now).unwrap().user_id, id);
        assert_eq!(
            verifier.verify_at(&token, now).unwrap().user_id,
            id,
            "remembered"
        );
        let later = now + chrono::Duration::seconds(2);
        assert!(
            verifier.verify_at(&token, later).is_err(),
            "expired while remembered"
        );
        assert!(
            verifier.verify_at(&token, later).is_err(),
            "expired once forgotten"
        );
        // A token that never verified is not remembered as valid.
        let expired = signer.sign_claims(&claims(now.timestamp() - 60));
        assert!(verifier.verify_at(&expired, now).is_err());
        assert!(verifier.verify_at(&expired, now).is_err());
        // The leeway applies to both paths alike.
        verifier.validation.leeway = 5;
        let fresh = signer.sign_claims(&claims(now.timestamp() + 1));
        let within = now + chrono::Duration::seconds(4);
        assert!(verifier.verify_at(&fresh, within).is_ok(), "first seen");
        assert!(verifier.verify_at(&fresh, within).is_ok(), "remembered");
        assert!(
            verifier
                .verify_at(&fresh, now + chrono::Duration::seconds(7))
                .is_err()
        );
    }

    #[test]
    fn rejects_alg_none_and_other_keys() {
        let (_, verifier) = pair();
        let (other, _) = pair();
        let (token, _) = other.sign(Uuid::now_v7(), "a@example.com", None, Utc::now());
        assert!(verifier.verify(&token).is_err());

        // {"alg":"none","typ":"JWT"} . {"sub":...} . (no signature)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIwMTkzMDAwMC0wMDAwLTcwMDAtODAwMC0wMDAwMDAwMDAwMDAiLCJleHAiOjQxMDI0NDQ4MDAsImlzcyI6ImtlZWwtYXV0aCIsImF1ZCI6ImtlZWwifQ.";
        assert!(verifier.verify(none).is_err());
    }
}
