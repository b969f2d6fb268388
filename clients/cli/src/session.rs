//! The signed-in session, kept in the user's config dir with 0600 permissions.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Session {
    pub email: String,
    pub access_token: String,
    /// Unix seconds.
    pub access_token_expires_at: i64,
    pub refresh_token: String,
}

/// `$KEEL_CONFIG_DIR`, else `$XDG_CONFIG_HOME/keel`, else `~/.config/keel`.
pub(crate) fn dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("KEEL_CONFIG_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(d).join("keel"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set KEEL_CONFIG_DIR")?;
    Ok(PathBuf::from(home).join(".config").join("keel"))
}

fn path() -> Result<PathBuf> {
    Ok(dir()?.join("session.json"))
}

pub(crate) fn load() -> Result<Session> {
    let path = path()?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("not signed in (no {}); run `keel login`", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
}

pub(crate) fn save(session: &Session) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let path = path()?;
    let dir = path.parent().expect("session path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("write {}", path.display()))?;
    // An existing file keeps its old mode through open(): tighten it explicitly.
    #[cfg(unix)]
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(serde_json::to_string_pretty(session)?.as_bytes())?;
    Ok(())
}

pub(crate) fn clear() -> Result<()> {
    match std::fs::remove_file(path()?) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}
