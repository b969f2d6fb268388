//! Named worker credentials: a file of `name:sha256-hex-of-secret` lines,
//! re-read while the service runs so that removing a line revokes that
//! worker within seconds. A worker presents `name:secret` as its bearer
//! token and may only record transitions as `name` or `name/<anything>`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// Longest credential name.
pub const MAX_NAME_BYTES: usize = 64;

/// How often the file is looked at for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

type Table = HashMap<String, [u8; 32]>;

/// The credentials currently in the file, by name.
pub struct WorkerCredentials {
    path: PathBuf,
    table: RwLock<Arc<Table>>,
    /// Compared against when the name is unknown, so a miss costs what a hit does.
    decoy: [u8; 32],
}

impl WorkerCredentials {
    /// Reads `path`; any malformed line is an error naming its line number.
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (table, errors) = parse(&text);
        if let Some(first) = errors.into_iter().next() {
            return Err(format!("{}: {first}", path.display()));
        }
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            table: RwLock::new(Arc::new(table)),
            decoy: Sha256::digest(b"keel-no-such-worker").into(),
        }))
    }

    /// How many credentials are loaded.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The credential's name when `presented` is `name:secret` for a line of
    /// the file, compared in constant time.
    pub fn check(&self, presented: &str) -> Option<String> {
        let (name, secret) = presented.split_once(':')?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let table = self.current();
        let (expected, known) = match table.get(name) {
            Some(hash) => (hash, true),
            None => (&self.decoy, false),
        };
        let matches: bool = digest.ct_eq(expected).into();
        (matches && known).then(|| name.to_string())
    }

    fn current(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the file. Malformed lines are skipped (with a warning naming
    /// the line), a missing or unreadable file empties the set: on doubt a
    /// credential stops working rather than outliving its removal.
    pub fn reload(&self) {
        let table = match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let (table, errors) = parse(&text);
                for e in errors {
                    tracing::warn!(file = %self.path.display(), "worker credentials: {e}; line ignored");
                }
                table
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "worker credentials unreadable: no worker credential is accepted until it is readable again");
                Table::new()
            }
        };
        let mut current = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if **current != table {
            tracing::info!(file = %self.path.display(), credentials = table.len(), "worker credentials reloaded");
            *current = Arc::new(table);
        }
    }

    /// Re-reads the file every `every` until `shutdown`.
    pub fn spawn_reloader(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let this = self.clone();
                // File I/O off the async threads.
                let _ = tokio::task::spawn_blocking(move || this.reload()).await;
            }
        });
    }
}

/// The credentials of `text` and the errors of its malformed lines (blank
/// lines and `#` comments are skipped). Errors never quote the line.
fn parse(text: &str) -> (Table, Vec<String>) {
    let mut table = Table::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let n = i + 1;
        let Some((name, hash)) = line.split_once(':') else {
            errors.push(format!("line {n}: expected name:sha256-hex"));
            continue;
        };
        if let Err(why) = validate_name(name) {
            errors.push(format!("line {n}: name {why}"));
            continue;
        }
        let Some(digest) = decode_hex32(hash.trim()) else {
            errors.push(format!(
                "line {n}: the hash must be 64 hex digits (SHA-256 of the secret)"
            ));
            continue;
        };
        if table.insert(name.to_string(), digest).is_some() {
            errors.push(format!("line {n}: name {name:?} appears twice"));
        }
    }
    (table, errors)
}

/// 1..=64 bytes of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err("must be 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may only hold letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// A new credential for `name`: the token the worker presents
/// (`name:secret`, for KEEL_WORKER_TOKEN) and the line for the file.
pub fn new_credential(name: &str) -> Result<(String, String), &'static str> {
    validate_name(name)?;
    let mut random = [0u8; 32];
    OsRng.fill_bytes(&mut random);
    let secret = URL_SAFE_NO_PAD.encode(random);
    let digest = Sha256::digest(secret.as_bytes());
    Ok((
        format!("{name}:{secret}"),
        format!("{name}:{}", hex::encode(digest)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_credentials_check_and_others_do_not() {
        let (token, line) = new_credential("builder-1").unwrap();
        let (table, errors) = parse(&format!("# workers\n\n{line}\n"));
        assert!(errors.is_empty(), "{errors:?}");
        let creds = WorkerCredentials {
            path: PathBuf::new(),
            table: RwLock::new(Arc::new(table)),
            decoy: [0; 32],
        };
        assert_eq!(creds.check(&token).as_deref(), Some("builder-1"));
        let (other, _) = new_credential("builder-1").unwrap();
        assert_eq!(creds.check(&other), None, "another secret");
        let secret = token.split_once(':').unwrap().1;
        assert_eq!(creds.check(&format!("builder-2:{secret}")), None);
        assert_eq!(creds.check(secret), None, "no name");
    }

    #[test]
    fn malformed_lines_are_named_by_number_without_their_content() {
        let secret_looking = "w:not-hex-at-all-but-maybe-a-secret";
        let (table, errors) = parse(&format!(
            "ok:{}\n{secret_looking}\nbad name:{}\nnocolon\n",
            "a".repeat(64),
            "b".repeat(64)
        ));
        assert_eq!(table.len(), 1);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("line 2:"), "{errors:?}");
        assert!(errors.iter().all(|e| !e.contains("maybe-a-secret")));
        assert!(new_credential("has space").is_err());
        assert!(new_credential(&"x".repeat(65)).is_err());
    }
}
