//! Password hashing with argon2id, reusing argon2's memory blocks between hashes.

use std::sync::{Mutex, MutexGuard, PoisonError};

use argon2::password_hash::{self, Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use rand::rngs::OsRng;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
