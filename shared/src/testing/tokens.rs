//! Crafted access tokens for the services' security tests: each claims to be
//! a user and must not pass (forged, expired, wrong key, unsigned, misaddressed).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::auth::{AccessClaims, DEFAULT_AUDIENCE, DEFAULT_ISSUER, SigningKeyPem, TokenSigner};

/// Valid claims for `sub` (victim@example.com, issued now, ten minutes left).
pub fn claims(sub: impl ToString) -> AccessClaims {
    let now = chrono::Utc::now().timestamp();
    AccessClaims {
        sub: sub.to_string(),
        email: "victim@example.com".into(),
        iss: DEFAULT_ISSUER.into(),
        aud: DEFAULT_AUDIENCE.into(),
        iat: now,
        exp: now + 600,
        sid: None,
    }
}

/// `token` with the first byte of its signature flipped.
pub fn forged_signature(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[0] ^= 1;
    format!("{head}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// `claims` signed by `signer`, issued an hour ago and expired ten minutes ago.
pub fn expired(signer: &TokenSigner, claims: AccessClaims) -> String {
    let now = chrono::Utc::now().timestamp();
    signer.sign_claims(&AccessClaims {
        iat: now - 3600,
        exp: now - 600,
        ..claims
    })
}

/// `claims` signed by a fresh key nobody trusts.
pub fn wrong_key(claims: &AccessClaims) -> String {
    TokenSigner::from_private_pem(
        &SigningKeyPem::generate().private_pem,
        DEFAULT_ISSUER,
        DEFAULT_AUDIENCE,
        Duration::from_secs(900),
    )
    .unwrap()
    .sign_claims(claims)
}

/// A token whose header names `alg` and the key id `kid`, with `claims` and
/// `signature` (already encoded) as given: `alg: none`, HS256 and the like.
pub fn unsigned(alg: &str, kid: &str, claims: &AccessClaims, signature: &str) -> String {
    let header = URL_SAFE_NO_PAD
        .encode(format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}"}}"#).as_bytes());
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{payload}.{signature}")
}

/// `claims` for another audience, signed by `signer`.
pub fn wrong_audience(signer: &TokenSigner, claims: AccessClaims) -> String {
    signer.sign_claims(&AccessClaims {
        aud: "somebody-else".into(),
        ..claims
    })
}

/// `claims` from another issuer, signed by `signer`.
pub fn wrong_issuer(signer: &TokenSigner, claims: AccessClaims) -> String {
    signer.sign_claims(&AccessClaims {
        iss: "evil-auth".into(),
        ..claims
    })
}

/// `claims` with the subject `sub` (not a UUID, say), signed by `signer`.
pub fn with_subject(signer: &TokenSigner, claims: AccessClaims, sub: &str) -> String {
    signer.sign_claims(&AccessClaims {
        sub: sub.into(),
        ..claims
    })
}
