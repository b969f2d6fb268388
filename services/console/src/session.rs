//! Server-side sessions, in this process's memory: a random 256-bit id in the
//! cookie, the operator's tokens and CSRF token here. A restart signs every
//! operator out; replicas need sticky sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::RngCore;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "keel_console_session";
/// The sign-in form's CSRF cookie (double submit: no session exists yet).
pub(crate) const LOGIN_COOKIE: &str = "keel_console_login";

/// The auth service's tokens of one operator.
#[derive(Clone)]
pub(crate) struct Tokens {
    pub(crate) access_token: String,
    pub(crate) access_expires_at: DateTime<Utc>,
    pub(crate) refresh_token: String,
}

impl Tokens {
    pub(crate) fn from_pair(pair: keel_proto::auth::v1::TokenPair) -> Self {
        let access_expires_at = pair
            .access_token_expires_at
            .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .unwrap_or_else(Utc::now);
        Self {
            access_token: pair.access_token,
            access_expires_at,
            refresh_token: pair.refresh_token,
        }
    }

    /// True when the access token is expired or about to be.
    pub(crate) fn stale(&self) -> bool {
        self.access_expires_at - chrono::Duration::seconds(30) <= Utc::now()
    }
}

/// What a handler sees of the signed-in operator.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) email: String,
    pub(crate) csrf: String,
    pub(crate) tokens: Tokens,
}

struct Entry {
    email: String,
    csrf: String,
    tokens: Tokens,
    flash: Option<String>,
    created: Instant,
    last_used: Instant,
}

pub(crate) struct Sessions {
    entries: Mutex<HashMap<String, Entry>>,
    /// One token refresh at a time: a refresh token is used once, so two
    /// requests must not both spend it.
    refreshing: tokio::sync::Mutex<()>,
    idle: Duration,
    max: Duration,
}

impl Sessions {
    pub(crate) fn new(idle: Duration, max: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
            idle,
            max,
        }
    }

    pub(crate) fn max_age(&self) -> Duration {
        self.max
    }

    /// A new session for the operator; returns its id (the cookie's value).
    pub(crate) fn create(&self, email: String, tokens: Tokens) -> String {
        let id = random_token();
        let now = Instant::now();
        let entry = Entry {
            email,
            csrf: random_token(),
            tokens,
            flash: None,
            created: now,
            last_used: now,
        };
        let mut entries = self.lock();
        entries.retain(|_, e| self.alive(e, now));
        entries.insert(id.clone(), entry);
        id
    }

    /// The live session `id`, marked used; None when unknown or expired
    /// (an expired one is dropped).
    pub(crate) fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut entries = self.lock();
        let entry = entries.get_mut(id)?;
        if !self.alive(entry, now) {
            entries.remove(id);
            return None;
        }
        entry.last_used = now;
        Some(Session {
            id: id.to_string(),
            email: entry.email.clone(),
            csrf: entry.csrf.clone(),
            tokens: entry.tokens.clone(),
        })
    }

    /// The CSRF token of the live session `id`.
    pub(crate) fn csrf(&self, id: &str) -> Option<String> {
        let now = Instant::now();
        let entries = self.lock();
        entries
            .get(id)
            .filter(|e| self.alive(e, now))
            .map(|e| e.csrf.clone())
    }

    pub(crate) fn remove(&self, id: &str) -> Option<Tokens> {
        self.lock().remove(id).map(|e| e.tokens)
    }

    pub(crate) fn set_flash(&self, id: &str, message: String) {
        if let Some(e) = self.lock().get_mut(id) {
            e.flash = Some(message);
        }
    }

    pub(crate) fn take_flash(&self, id: &str) -> Option<String> {
        self.lock().get_mut(id).and_then(|e| e.flash.take())
    }

    /// Held while a session's tokens are refreshed.
    pub(crate) async fn refresh_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.refreshing.lock().await
    }

    pub(crate) fn set_tokens(&self, id: &str, tokens: Tokens) {
        if let Some(e) = self.lock().get_mut(id) {
            e.tokens = tokens;
        }
    }

    fn alive(&self, e: &Entry, now: Instant) -> bool {
        now.duration_since(e.last_used) < self.idle && now.duration_since(e.created) < self.max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// 256 random bits from the OS, hex.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The value of cookie `name` in the request's Cookie headers.
pub(crate) fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            access_token: "a".into(),
            access_expires_at: Utc::now() + chrono::Duration::minutes(10),
            refresh_token: "r".into(),
        }
    }

    #[test]
    fn ids_are_256_random_bits() {
        let a = random_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_token());
    }

    #[test]
    fn an_idle_session_expires() {
        let sessions = Sessions::new(Duration::from_millis(1), Duration::from_secs(60));
        let id = sessions.create("a@example.com".into(), tokens());
        std::thread::sleep(Duration::from_millis(5));
        assert!(sessions.get(&id).is_none());
        assert!(sessions.csrf(&id).is_none());
    }

    #[test]
    fn a_session_ends_at_its_maximum_age_even_when_used() {
        let sessions = Sessions::new(Duration::from_secs(60), Duration::from_millis(20));
        let id = sessions.create("a@example.com".into(), tokens());
        assert!(sessions.get(&id).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::COOKIE,
            "other=1; keel_console_session=abc; x=y".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, LOGIN_COOKIE), None);
    }
}
