//! Access tokens: Ed25519-signed JWTs that auth issues and every service
//! verifies locally, plus the interceptor that turns `authorization: Bearer ..`
//! into a typed [`Caller`] for handlers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use uuid::Uuid;

use crate::ApiError;

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
    Sha256::digest(public_key.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
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
        Ok(Self {
            keys,
            validation,
            verified: quick_cache::sync::Cache::new(VERIFIED_CACHE_ENTRIES),
        })
    }

    pub fn verify(&self, token: &str) -> Result<VerifiedToken, ApiError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(known) = self.verified.get(&digest) {
            // The same expiry rule (and leeway) as the full check below.
            if Utc::now().timestamp()
                <= known.expires_at.timestamp() + self.validation.leeway as i64
            {
                return Ok(known);
            }
            self.verified.remove(&digest);
        }
        let verified = self.verify_signed(token)?;
        self.verified.insert(digest, verified.clone());
        Ok(verified)
    }

    fn verify_signed(&self, token: &str) -> Result<VerifiedToken, ApiError> {
        let invalid = || ApiError::Unauthenticated("invalid or expired access token".into());
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
        Ok(VerifiedToken {
            user_id,
            email: data.claims.email,
            expires_at,
        })
    }
}

/// Who is calling, as established by [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    User(VerifiedToken),
    /// A worker presenting a worker credential.
    Worker(Worker),
}

/// A worker authenticated by [`RunnerGate`], in the request's extensions of
/// every runner RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    _private: (),
}

impl Worker {
    /// The worker the runner interceptor put on the request.
    pub fn of<T>(request: &Request<T>) -> Result<&Worker, ApiError> {
        request
            .extensions()
            .get::<Worker>()
            .ok_or_else(|| ApiError::Unauthenticated("missing worker credential".into()))
    }
}

impl Caller {
    /// The calling user's id; a worker credential is PERMISSION_DENIED here.
    pub fn user_id(&self) -> Result<Uuid, ApiError> {
        match self {
            Caller::User(t) => Ok(t.user_id),
            Caller::Worker(_) => Err(ApiError::PermissionDenied(
                "the worker credential cannot call user RPCs".into(),
            )),
        }
    }

    /// The worker behind a worker credential; a user's token is PERMISSION_DENIED.
    pub fn into_worker(self) -> Result<Worker, ApiError> {
        match self {
            Caller::Worker(worker) => Ok(worker),
            Caller::User(_) => Err(ApiError::PermissionDenied(
                "this RPC needs the worker credential".into(),
            )),
        }
    }

    /// The caller the interceptor put on the request.
    pub fn of<T>(request: &Request<T>) -> Result<&Caller, ApiError> {
        request
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| ApiError::Unauthenticated("missing bearer token".into()))
    }
}

/// The bearer token from `authorization: Bearer <token>`.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, ApiError> {
    let missing = || ApiError::Unauthenticated("missing bearer token".into());
    let value = metadata
        .get("authorization")
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(missing());
    }
    Ok(token.trim())
}

/// Interceptor that authenticates every call and attaches a [`Caller`].
/// Which callers an RPC accepts is the handler's business
/// ([`Caller::user_id`]); runner services use [`RunnerGate`] instead.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Arc<TokenVerifier>,
    /// SHA-256 of the worker credential, compared in constant time.
    worker_token_digest: Option<[u8; 32]>,
}

impl Authenticator {
    pub fn new(verifier: Arc<TokenVerifier>, worker_token: Option<&str>) -> Self {
        Self {
            verifier,
            worker_token_digest: worker_token
                .filter(|t| !t.is_empty())
                .map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        let token = bearer_token(metadata)?;
        if let Some(expected) = &self.worker_token_digest {
            let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if constant_time_eq(&presented, expected) {
                return Ok(Caller::Worker(Worker { _private: () }));
            }
        }
        self.verifier.verify(token).map(Caller::User)
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.authenticate(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Interceptor for a runner service: admits only worker credentials (a
/// user's token is PERMISSION_DENIED, no token UNAUTHENTICATED) and attaches
/// the [`Worker`], so no runner handler can forget the check.
#[derive(Clone)]
pub struct RunnerGate {
    authenticator: Authenticator,
}

impl RunnerGate {
    pub fn new(authenticator: Authenticator) -> Self {
        Self { authenticator }
    }
}

impl Interceptor for RunnerGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let worker = self
            .authenticator
            .authenticate(request.metadata())?
            .into_worker()?;
        request.extensions_mut().insert(worker);
        Ok(request)
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
}

impl VerifierConfig {
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
        let now = Utc::now().timestamp();
        let claims = |exp: i64| AccessClaims {
            sub: id.to_string(),
            email: "a@example.com".into(),
            iss: DEFAULT_ISSUER.into(),
            aud: DEFAULT_AUDIENCE.into(),
            iat: now,
            exp,
            sid: None,
        };
        let token = signer.sign_claims(&claims(now + 1));
        assert_eq!(verifier.verify(&token).unwrap().user_id, id);
        assert_eq!(verifier.verify(&token).unwrap().user_id, id, "remembered");
        std::thread::sleep(Duration::from_millis(2_100));
        assert!(verifier.verify(&token).is_err(), "expired while remembered");
        assert!(verifier.verify(&token).is_err());
        // A token that never verified is not remembered as valid.
        let expired = signer.sign_claims(&claims(now - 60));
        assert!(verifier.verify(&expired).is_err());
        assert!(verifier.verify(&expired).is_err());
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
