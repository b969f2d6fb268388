//! The access-token signing key: read from its file, or (for local runs)
//! generated once and kept, with its public half beside it as `<file>.pub`.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use keel_shared::StartupError;
use keel_shared::auth::SigningKeyPem;

use crate::config::TokenConfig;

const VAR: &str = "KEEL_JWT_PRIVATE_KEY_FILE";

/// Where the public half of `private_key_file` is written: `<file>.pub`.
pub fn public_key_path(private_key_file: &Path) -> PathBuf {
    let mut name = OsString::from(private_key_file.as_os_str());
    name.push(".pub");
    PathBuf::from(name)
}

/// The private key PEM named by the config, generating it first when allowed.
pub fn load_or_generate(config: &TokenConfig) -> Result<String, StartupError> {
    let path = config
        .jwt_private_key_file
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or(StartupError::MissingVar(VAR))?;
    let invalid = |reason: String| StartupError::InvalidVar {
        var: VAR,
        reason: format!("{}: {reason}", path.display()),
    };

    let private_pem = match fs::read_to_string(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound && config.jwt_generate_key => {
            generate(path).map_err(|e| invalid(format!("cannot create key: {e}")))?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(invalid(
                "no such file (set KEEL_JWT_GENERATE_KEY=true to create one)".into(),
            ));
        }
        Err(e) => return Err(invalid(e.to_string())),
    };
    let public_pem =
        SigningKeyPem::public_from_private(&private_pem).map_err(|e| invalid(e.to_string()))?;
    if config.jwt_generate_key {
        let pub_path = public_key_path(path);
        let current = fs::read_to_string(&pub_path).ok();
        if current.as_deref() != Some(public_pem.as_str()) {
            write_replacing(&pub_path, &public_pem, 0o644)
                .map_err(|e| invalid(format!("cannot write {}: {e}", pub_path.display())))?;
            tracing::info!(path = %pub_path.display(), "wrote JWT public key");
        }
    }
    Ok(private_pem)
}

/// Creates a fresh key at `path` (mode 0600, parent directories created).
/// Written to a temporary file and hard-linked into place, so a concurrent
/// start never sees half a key and never overwrites another's: the loser
/// reads the winner's key.
fn generate(path: &Path) -> io::Result<String> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let pem = SigningKeyPem::generate();
    let tmp = temp_path(path);
    write_new(&tmp, &pem.private_pem, 0o600)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "generated JWT signing key");
            Ok(pem.private_pem)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fs::read_to_string(path),
        Err(e) => Err(e),
    }
}

fn write_replacing(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

fn write_new(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    PathBuf::from(name)
}
