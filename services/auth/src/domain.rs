//! Auth rules without I/O: input validation, refresh-token material and the
//! refresh state machine (password hashing is in `passwords`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};

use crate::error::AuthError;

pub const PASSWORD_MIN_CHARS: usize = 8;
pub const PASSWORD_MAX_CHARS: usize = 128;
pub const DISPLAY_NAME_MAX_CHARS: usize = 256;
/// RFC 5321 limits: 254 octets in all, 64 in the local part.
pub const EMAIL_MAX_BYTES: usize = 254;
pub const EMAIL_LOCAL_MAX_BYTES: usize = 64;
/// Refresh tokens are 43 characters; anything far longer is not one of ours.
pub const REFRESH_TOKEN_MAX_BYTES: usize = 256;
pub const ACCESS_TOKEN_MAX_BYTES: usize = 8 * 1024;

/// Trims and lower-cases an email and checks it looks like `local@domain.tld`.
pub fn normalize_email(raw: &str) -> Result<String, AuthError> {
    let bad = |reason: &str| AuthError::invalid("email", reason);
    let trimmed = raw.trim();
    // Bound the input before lower-casing it (which may change its length).
    if trimmed.len() > EMAIL_MAX_BYTES {
        return Err(bad("is longer than 254 bytes"));
    }
    let email = trimmed.to_lowercase();
    if email.is_empty() {
        return Err(bad("is required"));
    }
    if email.len() > EMAIL_MAX_BYTES {
        return Err(bad("is longer than 254 bytes"));
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("must not contain spaces or control characters"));
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err(bad("must look like name@example.com"));
    };
    let labels_ok = domain.split('.').count() >= 2
        && domain
            .split('.')
            .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
    if local.is_empty()
        || local.len() > EMAIL_LOCAL_MAX_BYTES
        || domain.contains('@')
        || !labels_ok
        || domain.contains(['(', ')', '<', '>', ',', ';', ':', '\\', '"', '[', ']'])
    {
        return Err(bad("must look like name@example.com"));
    }
    Ok(email)
}

/// A new password: 8..=128 characters (not bytes), no composition rules.
pub fn validate_new_password(password: &str) -> Result<(), AuthError> {
    validate_new_password_field("password", password)
}

/// [`validate_new_password`] for a field of another name (`new_password`).
pub fn validate_new_password_field(field: &'static str, password: &str) -> Result<(), AuthError> {
    let n = password.chars().count();
    if n < PASSWORD_MIN_CHARS {
        return Err(AuthError::invalid(field, "must be at least 8 characters"));
    }
    if n > PASSWORD_MAX_CHARS {
        return Err(AuthError::invalid(field, "must be at most 128 characters"));
    }
    Ok(())
}

/// A password presented at login: only bounded (so no huge input is hashed);
/// the length rule for new passwords may change without locking anyone out.
pub fn validate_login_password(password: &str) -> Result<(), AuthError> {
    validate_presented_password("password", password)
}

/// [`validate_login_password`] for a field of another name (`current_password`).
pub fn validate_presented_password(field: &'static str, password: &str) -> Result<(), AuthError> {
    if password.is_empty() {
        return Err(AuthError::invalid(field, "is required"));
    }
    if password.chars().count() > PASSWORD_MAX_CHARS {
        return Err(AuthError::invalid(field, "must be at most 128 characters"));
    }
    Ok(())
}

pub const API_KEY_NAME_MAX_CHARS: usize = 128;

/// An API key's name: trimmed, 1..=128 characters, no control characters.
pub fn normalize_api_key_name(raw: &str) -> Result<String, AuthError> {
    let name = raw.trim();
    if name.is_empty() {
        return Err(AuthError::invalid("name", "is required"));
    }
    if name.chars().count() > API_KEY_NAME_MAX_CHARS {
        return Err(AuthError::invalid("name", "must be at most 128 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(AuthError::invalid(
            "name",
            "must not contain control characters",
        ));
    }
    Ok(name.to_string())
}

/// An API key's optional expiry: in the future when set.
pub fn validate_api_key_expiry(
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), AuthError> {
    match expires_at {
        Some(at) if at <= now => Err(AuthError::invalid("expires_at", "must be in the future")),
        _ => Ok(()),
    }
}

/// An id field holding a UUID.
pub fn parse_id(field: &'static str, raw: &str) -> Result<uuid::Uuid, AuthError> {
    if raw.is_empty() {
        return Err(AuthError::invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(raw).map_err(|_| AuthError::invalid(field, "must be a UUID"))
}

/// A new API key: `keel_` and 32 random bytes in base64url (43 characters).
pub fn new_api_key() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    format!(
        "{}{}",
        keel_shared::identity::API_KEY_PREFIX,
        URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Trimmed; 0..=256 characters, no control characters. Empty is allowed.
pub fn normalize_display_name(raw: &str) -> Result<String, AuthError> {
    let name = raw.trim();
    if name.chars().count() > DISPLAY_NAME_MAX_CHARS {
        return Err(AuthError::invalid(
            "display_name",
            "must be at most 256 characters",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(AuthError::invalid(
            "display_name",
            "must not contain control characters",
        ));
    }
    Ok(name.to_string())
}

/// SHA-256 of the normalised email: the rate-limit key, and what audit logs
/// show for failed logins instead of the address.
pub fn email_digest(email: &str) -> [u8; 32] {
    Sha256::digest(email.as_bytes()).into()
}

/// A new opaque refresh token: 32 random bytes, base64url without padding.
pub fn new_refresh_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What is stored instead of a refresh token.
pub fn refresh_token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Checks that a presented refresh token is non-empty and of sane length.
pub fn validate_refresh_token(token: &str) -> Result<(), AuthError> {
    if token.is_empty() {
        return Err(AuthError::invalid("refresh_token", "is required"));
    }
    if token.len() > REFRESH_TOKEN_MAX_BYTES {
        return Err(AuthError::invalid("refresh_token", "is too long"));
    }
    Ok(())
}

pub fn validate_access_token(token: &str) -> Result<(), AuthError> {
    if token.is_empty() {
        return Err(AuthError::invalid("access_token", "is required"));
    }
    if token.len() > ACCESS_TOKEN_MAX_BYTES {
        return Err(AuthError::invalid("access_token", "is too long"));
    }
    Ok(())
}

/// The state of a presented refresh token, as read under lock.
#[derive(Debug, Clone, Copy)]
pub struct RefreshTokenState {
    pub used: bool,
    pub session_revoked: bool,
    pub expires_at: DateTime<Utc>,
}

/// What Refresh does with a presented token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshDecision {
    /// Mark it used and issue its successor.
    Rotate,
    /// It was already rotated: someone holds a copy. Revoke the whole session.
    RevokeForReuse,
    /// The session was already revoked (logout or earlier reuse).
    SessionRevoked,
    Expired,
}

pub fn decide_refresh(state: RefreshTokenState, now: DateTime<Utc>) -> RefreshDecision {
    if state.session_revoked {
        RefreshDecision::SessionRevoked
    } else if state.used {
        RefreshDecision::RevokeForReuse
    } else if state.expires_at <= now {
        RefreshDecision::Expired
    } else {
        RefreshDecision::Rotate
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    #[test]
    fn emails_are_trimmed_lowercased_and_checked() {
        assert_eq!(
            normalize_email("  Alice@Example.COM \n").unwrap(),
            "alice@example.com"
        );
        for bad in [
            "",
            "   ",
            "alice",
            "alice@",
            "@example.com",
            "alice@example",
            "a b@example.com",
            "a@b@example.com",
            "alice@example..com",
            "alice@-example.com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}@example.com", "a".repeat(65));
        assert!(normalize_email(&long).is_err());
        let err = normalize_email("nope").unwrap_err();
        assert!(err.to_string().starts_with("email:"), "{err}");
    }

    #[test]
    fn password_length_counts_characters_not_bytes() {
        assert!(validate_new_password(&"a".repeat(7)).is_err());
        assert!(validate_new_password(&"a".repeat(8)).is_ok());
        assert!(validate_new_password(&"a".repeat(128)).is_ok());
        assert!(validate_new_password(&"a".repeat(129)).is_err());
        // 8 characters, 16 bytes; 128 characters, 512 bytes.
        assert!(validate_new_password(&"é".repeat(8)).is_ok());
        assert!(validate_new_password(&"😀".repeat(128)).is_ok());
        assert!(validate_new_password(&"é".repeat(4)).is_err());
    }

    #[test]
    fn display_names_are_bounded() {
        assert_eq!(normalize_display_name("  Me ").unwrap(), "Me");
        assert_eq!(normalize_display_name("").unwrap(), "");
        assert!(normalize_display_name(&"x".repeat(256)).is_ok());
        assert!(normalize_display_name(&"x".repeat(257)).is_err());
        assert!(normalize_display_name("a\u{0}b").is_err());
    }

    #[test]
    fn api_keys_have_the_shape_the_services_expect() {
        let key = new_api_key();
        assert_eq!(key.len(), keel_shared::identity::API_KEY_LEN);
        assert!(keel_shared::identity::looks_like_api_key(&key));
        assert_ne!(key, new_api_key());
        assert!(normalize_api_key_name("  ").is_err());
        assert_eq!(normalize_api_key_name(" ci ").unwrap(), "ci");
        assert!(normalize_api_key_name(&"x".repeat(129)).is_err());
        let now = Utc::now();
        assert!(validate_api_key_expiry(Some(now), now).is_err());
        assert!(validate_api_key_expiry(None, now).is_ok());
        assert!(parse_id("id", "nope").is_err());
    }

    #[test]
    fn refresh_tokens_are_random_and_hashed() {
        let a = new_refresh_token();
        let b = new_refresh_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(refresh_token_digest(&a), refresh_token_digest(&a));
        assert_ne!(refresh_token_digest(&a), refresh_token_digest(&b));
    }

    #[test]
    fn refresh_decisions() {
        let now = Utc::now();
        let live = RefreshTokenState {
            used: false,
            session_revoked: false,
            expires_at: now + Duration::hours(1),
        };
        assert_eq!(decide_refresh(live, now), RefreshDecision::Rotate);
        let used = RefreshTokenState { used: true, ..live };
        assert_eq!(decide_refresh(used, now), RefreshDecision::RevokeForReuse);
        let revoked = RefreshTokenState {
            session_revoked: true,
            ..used
        };
        assert_eq!(
            decide_refresh(revoked, now),
            RefreshDecision::SessionRevoked
        );
        let expired = RefreshTokenState {
            expires_at: now - Duration::seconds(1),
            ..live
        };
        assert_eq!(decide_refresh(expired, now), RefreshDecision::Expired);
    }
}
