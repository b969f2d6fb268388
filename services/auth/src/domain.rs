//! Auth rules without I/O: input validation, password hashing, refresh-token
//! material and the refresh state machine.

use std::sync::{Mutex, MutexGuard, PoisonError};

use argon2::password_hash::{self, Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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
    let n = password.chars().count();
    if n < PASSWORD_MIN_CHARS {
        return Err(AuthError::invalid(
            "password",
            "must be at least 8 characters",
        ));
    }
    if n > PASSWORD_MAX_CHARS {
        return Err(AuthError::invalid(
            "password",
            "must be at most 128 characters",
        ));
    }
    Ok(())
}

/// A password presented at login: only bounded (so no huge input is hashed);
/// the length rule for new passwords may change without locking anyone out.
pub fn validate_login_password(password: &str) -> Result<(), AuthError> {
    if password.is_empty() {
        return Err(AuthError::invalid("password", "is required"));
    }
    if password.chars().count() > PASSWORD_MAX_CHARS {
        return Err(AuthError::invalid(
            "password",
            "must be at most 128 characters",
        ));
    }
    Ok(())
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

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes and verifies passwords with argon2id. Both are CPU-heavy and
/// blocking: call them from `spawn_blocking`.
pub struct Passwords {
    argon2: Argon2<'static>,
    /// Argon2 memory for the configured parameters, reused across hashes.
    pool: BlockPool,
    /// A hash of a random password with the same parameters: unknown emails are
    /// verified against it so they cost what a wrong password costs.
    dummy_hash: String,
}

impl Passwords {
    /// `max_concurrent` is how many hashes may run at once (the caller bounds
    /// them); at most that many memory buffers are kept between hashes.
    pub fn new(
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
        max_concurrent: usize,
    ) -> Result<Self, String> {
        let params = Params::new(memory_kib, iterations, parallelism, None)
            .map_err(|e| format!("invalid argon2 parameters: {e}"))?;
        let pool = BlockPool::new(params.block_count(), max_concurrent.max(1));
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut passwords = Self {
            argon2,
            pool,
            dummy_hash: String::new(),
        };
        let mut random = [0u8; 32];
        OsRng.fill_bytes(&mut random);
        passwords.dummy_hash = passwords.hash(&URL_SAFE_NO_PAD.encode(random))?;
        Ok(passwords)
    }

    /// A PHC string (`$argon2id$v=19$m=..,t=..,p=..$salt$hash`), the same as
    /// the stock `PasswordHasher` makes.
    pub fn hash(&self, password: &str) -> Result<String, String> {
        let argon2_error = |e: password_hash::Error| format!("argon2: {e}");
        let salt = SaltString::generate(&mut OsRng);
        let mut salt_buf = [0u8; SALT_BUF_BYTES];
        let salt_bytes = salt.decode_b64(&mut salt_buf).map_err(argon2_error)?;
        let params = self.argon2.params();
        let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let mut blocks = self.pool.take();
        let output = Output::init_with(output_len, |out| {
            self.argon2
                .hash_password_into_with_memory(
                    password.as_bytes(),
                    salt_bytes,
                    out,
                    blocks.as_mut_slice(),
                )
                .map_err(password_hash::Error::from)
        })
        .map_err(argon2_error)?;
        drop(blocks);
        let hash = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(params).map_err(argon2_error)?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(hash.to_string())
    }

    /// Verifies against `hash`, or against the dummy hash when there is no
    /// user (always false then, at the same cost). The hash's own parameters
    /// are used, so hashes made under older settings keep working.
    pub fn verify(&self, password: &str, hash: Option<&str>) -> bool {
        let parsed = hash.and_then(|h| PasswordHash::new(h).ok());
        match parsed {
            Some(parsed) => self.verify_parsed(password.as_bytes(), &parsed),
            None => {
                if let Ok(dummy) = PasswordHash::new(&self.dummy_hash) {
                    let _ = self.verify_parsed(password.as_bytes(), &dummy);
                }
                false
            }
        }
    }

    /// What the stock `PasswordVerifier` does, but hashing into pooled memory
    /// when the hash needs no more than the pool's buffers hold.
    fn verify_parsed(&self, password: &[u8], hash: &PasswordHash<'_>) -> bool {
        let (Some(salt), Some(expected)) = (hash.salt, &hash.hash) else {
            return false;
        };
        let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
            return false;
        };
        let Ok(version) = hash
            .version
            .map_or(Ok(Version::default()), Version::try_from)
        else {
            return false;
        };
        // Includes the output length, taken from the stored hash.
        let Ok(params) = Params::try_from(hash) else {
            return false;
        };
        let mut salt_buf = [0u8; SALT_BUF_BYTES];
        let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };
        let needed = params.block_count();
        let argon2 = Argon2::new(algorithm, version, params);
        let mut out = [0u8; Output::MAX_LENGTH];
        let Some(out) = out.get_mut(..expected.len()) else {
            return false;
        };
        let hashed = if needed <= self.pool.block_count {
            // Argon2 uses the first `needed` blocks and overwrites them all
            // before reading, so a larger, used buffer gives the same result.
            let mut blocks = self.pool.take();
            argon2.hash_password_into_with_memory(password, salt, out, blocks.as_mut_slice())
        } else {
            // Stored under larger settings than today's: rare, so not pooled.
            argon2.hash_password_into(password, salt, out)
        };
        // `Output` compares in constant time.
        hashed.is_ok() && Output::new(out).is_ok_and(|computed| computed == *expected)
    }
}

/// Room for any PHC salt decoded (at most 64 base64 characters).
const SALT_BUF_BYTES: usize = 64;

/// Argon2 memory buffers (one per hash in flight) kept between hashes.
/// Allocating and freeing ~19 MiB per hash left it to the allocator whether
/// freed buffers go back to the OS; glibc raises its mmap threshold after the
/// first such free and then keeps them in per-thread heaps, so RSS grew with
/// the blocking threads that had hashed.
struct BlockPool {
    block_count: usize,
    capacity: usize,
    free: Mutex<Vec<Vec<Block>>>,
}

impl BlockPool {
    fn new(block_count: usize, capacity: usize) -> Self {
        Self {
            block_count,
            capacity,
            free: Mutex::new(Vec::with_capacity(capacity)),
        }
    }

    /// A free buffer, or a new one when all are in use.
    fn take(&self) -> PooledBlocks<'_> {
        let reused = self.lock().pop();
        let blocks = reused.unwrap_or_else(|| vec![Block::new(); self.block_count]);
        PooledBlocks { pool: self, blocks }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<Block>>> {
        // Only push and pop run under the lock: a poisoned list is still sound.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().len()
    }
}

/// A buffer taken from the pool; goes back (or is freed, when the pool is
/// full) on drop.
struct PooledBlocks<'a> {
    pool: &'a BlockPool,
    blocks: Vec<Block>,
}

impl PooledBlocks<'_> {
    fn as_mut_slice(&mut self) -> &mut [Block] {
        &mut self.blocks
    }
}

impl Drop for PooledBlocks<'_> {
    fn drop(&mut self) {
        let blocks = std::mem::take(&mut self.blocks);
        let mut free = self.pool.lock();
        if free.len() < self.pool.capacity {
            free.push(blocks);
        }
    }
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
    fn passwords_hash_with_argon2id_and_verify() {
        // Small parameters keep the unit test quick; the format is what matters.
        let passwords = Passwords::new(1024, 1, 1, 2).unwrap();
        let hash = passwords.hash("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{hash}");
        assert!(passwords.verify("correct horse", Some(&hash)));
        assert!(!passwords.verify("wrong horse", Some(&hash)));
        assert!(!passwords.verify("correct horse", None));
        assert!(!passwords.verify("correct horse", Some("not-a-hash")));
        assert!(Passwords::new(1, 0, 0, 2).is_err());
    }

    fn stock(m_cost: u32, t_cost: u32, p_cost: u32) -> Argon2<'static> {
        let params = Params::new(m_cost, t_cost, p_cost, None).unwrap();
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    #[test]
    fn pooled_hashes_verify_with_the_stock_verifier() {
        use argon2::password_hash::PasswordVerifier;

        let passwords = Passwords::new(1024, 2, 1, 2).unwrap();
        let hash = passwords.hash("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=1024,t=2,p=1$"), "{hash}");
        let parsed = PasswordHash::new(&hash).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"wrong horse", &parsed)
                .is_err()
        );
    }

    #[test]
    fn stock_hashes_verify_with_the_pooled_path() {
        use argon2::password_hash::PasswordHasher;

        let passwords = Passwords::new(1024, 2, 1, 2).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        let hash = stock(1024, 2, 1)
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(passwords.verify("correct horse", Some(&hash)));
        assert!(!passwords.verify("wrong horse", Some(&hash)));
        // A tampered output fails too (same length, one character changed).
        let (head, last) = hash.split_at(hash.len() - 1);
        let tampered = format!("{head}{}", if last == "A" { "B" } else { "A" });
        assert!(!passwords.verify("correct horse", Some(&tampered)));
    }

    #[test]
    fn hashes_under_other_parameters_still_verify() {
        use argon2::password_hash::PasswordHasher;

        let passwords = Passwords::new(1024, 2, 1, 2).unwrap();
        // Larger than the pool's buffers (a one-off buffer), smaller with two
        // lanes (fits in a pooled one), and another argon2 variant.
        let argon2i = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x13,
            Params::new(256, 3, 1, None).unwrap(),
        );
        for argon2 in [stock(8192, 1, 1), stock(512, 3, 2), argon2i] {
            let salt = SaltString::generate(&mut OsRng);
            let hash = argon2
                .hash_password(b"correct horse", &salt)
                .unwrap()
                .to_string();
            assert!(passwords.verify("correct horse", Some(&hash)), "{hash}");
            assert!(!passwords.verify("wrong horse", Some(&hash)), "{hash}");
        }
        assert!(passwords.pool.idle() <= 2);
    }

    #[test]
    fn pooled_buffers_are_reused_and_bounded() {
        let passwords = Passwords::new(1024, 1, 1, 2).unwrap();
        // The dummy hash at start-up left one buffer behind.
        assert_eq!(passwords.pool.idle(), 1);
        let first = passwords.pool.take().as_mut_slice().as_ptr();
        let again = passwords.pool.take().as_mut_slice().as_ptr();
        assert_eq!(first, again, "a returned buffer is handed out again");

        // More hashes at once than the limit: the extra buffers are freed.
        let held: Vec<_> = (0..4).map(|_| passwords.pool.take()).collect();
        assert_eq!(passwords.pool.idle(), 0);
        drop(held);
        assert_eq!(passwords.pool.idle(), 2);

        std::thread::scope(|s| {
            for i in 0..4 {
                let passwords = &passwords;
                s.spawn(move || {
                    let password = format!("password {i}");
                    let hash = passwords.hash(&password).unwrap();
                    assert!(passwords.verify(&password, Some(&hash)));
                    assert!(!passwords.verify(&password, None));
                });
            }
        });
        assert!(passwords.pool.idle() <= 2);
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
