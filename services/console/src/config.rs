//! The console's one typed config, from flags or env.

use std::net::SocketAddr;
use std::time::Duration;

use keel_shared::StartupError;
use keel_shared::config::{GrpcClientTlsConfig, RuntimeConfig};

const DEFAULT_SESSION_IDLE_SECS: u64 = 30 * 60;
const DEFAULT_SESSION_MAX_SECS: u64 = 12 * 60 * 60;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "keel-console", about = "Keel operator console", version)]
pub struct Config {
    /// Address the console's HTTP server listens on.
    #[arg(long, env = "KEEL_CONSOLE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// URL of the auth service (sign in, token refresh, users).
    #[arg(long, env = "KEEL_AUTH_URL", default_value = "http://127.0.0.1:50051")]
    pub auth_url: String,
    /// URL of the jobs service (AdminService).
    #[arg(long, env = "KEEL_JOBS_URL", default_value = "http://127.0.0.1:50052")]
    pub jobs_url: String,
    /// URL of the memory service (MemoryAdminService).
    #[arg(
        long,
        env = "KEEL_MEMORY_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub memory_url: String,
    /// Mark the session cookie `Secure` (the browser then sends it over
    /// HTTPS only): set it when the console is reached through TLS.
    #[arg(long, env = "KEEL_CONSOLE_SECURE_COOKIES", default_value_t = false)]
    pub secure_cookies: bool,
    /// A session unused for this long (seconds) is signed out.
    #[arg(long, env = "KEEL_CONSOLE_SESSION_IDLE_SECS", default_value_t = DEFAULT_SESSION_IDLE_SECS)]
    pub session_idle_secs: u64,
    /// A session ends this long (seconds) after sign-in, used or not.
    #[arg(long, env = "KEEL_CONSOLE_SESSION_MAX_SECS", default_value_t = DEFAULT_SESSION_MAX_SECS)]
    pub session_max_secs: u64,
    /// TLS to the services when their URLs are https://.
    #[command(flatten)]
    pub tls: GrpcClientTlsConfig,
    #[command(flatten)]
    pub runtime: RuntimeConfig,
}

impl Config {
    /// A config with every default, for tests.
    pub fn new(
        addr: SocketAddr,
        auth_url: impl Into<String>,
        jobs_url: impl Into<String>,
        memory_url: impl Into<String>,
    ) -> Self {
        Self {
            addr,
            auth_url: auth_url.into(),
            jobs_url: jobs_url.into(),
            memory_url: memory_url.into(),
            secure_cookies: false,
            session_idle_secs: DEFAULT_SESSION_IDLE_SECS,
            session_max_secs: DEFAULT_SESSION_MAX_SECS,
            tls: GrpcClientTlsConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }

    pub fn session_idle(&self) -> Duration {
        Duration::from_secs(self.session_idle_secs)
    }

    pub fn session_max(&self) -> Duration {
        Duration::from_secs(self.session_max_secs)
    }

    /// Checks what can be checked without a network: every bad value at once.
    pub fn validate(&self) -> Result<(), StartupError> {
        let mut problems = Vec::new();
        let at_least_one = |var| StartupError::InvalidVar {
            var,
            reason: "must be at least 1".into(),
        };
        if self.session_idle_secs == 0 {
            problems.push(at_least_one("KEEL_CONSOLE_SESSION_IDLE_SECS"));
        }
        if self.session_max_secs == 0 {
            problems.push(at_least_one("KEEL_CONSOLE_SESSION_MAX_SECS"));
        }
        if self.runtime.tls.tls_cert_file.is_some() {
            problems.push(StartupError::InvalidVar {
                var: "KEEL_TLS_CERT_FILE",
                reason: "the console serves plain HTTP: terminate TLS in front of it and set \
                         KEEL_CONSOLE_SECURE_COOKIES=true"
                    .into(),
            });
        }
        StartupError::check_all(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let mut c = Config::new(
            "127.0.0.1:0".parse().unwrap(),
            "http://a",
            "http://j",
            "http://m",
        );
        assert!(c.validate().is_ok());
        c.session_idle_secs = 0;
        c.session_max_secs = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "KEEL_CONSOLE_SESSION_IDLE_SECS is invalid: must be at least 1; \
             KEEL_CONSOLE_SESSION_MAX_SECS is invalid: must be at least 1"
        );
    }
}
