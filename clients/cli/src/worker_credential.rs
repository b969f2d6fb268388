//! `keel worker-credential new NAME`: mints a named worker credential
//! locally (nothing is sent anywhere).

use anyhow::{Result, anyhow};

/// Worker credentials for the jobs service's KEEL_WORKER_CREDENTIALS_FILE.
#[derive(clap::Subcommand)]
pub(crate) enum WorkerCredentialCommand {
    /// Print a new credential: the worker's KEEL_WORKER_TOKEN (`NAME:secret`,
    /// shown only now) and the line to add to the credentials file
    /// (`NAME:sha256-hex`). NAME: 1..=64 of [A-Za-z0-9._-].
    New { name: String },
}

pub(crate) fn run(cmd: &WorkerCredentialCommand) -> Result<()> {
    match cmd {
        WorkerCredentialCommand::New { name } => {
            let (token, line) = keel_shared::worker_credentials::new_credential(name)
                .map_err(|why| anyhow!("NAME {why}"))?;
            println!("# The worker's KEEL_WORKER_TOKEN (shown only now):");
            println!("{token}");
            println!("# The line for the jobs service's KEEL_WORKER_CREDENTIALS_FILE:");
            println!("{line}");
            Ok(())
        }
    }
}
