//! Who may see the dashboard.
//!
//! Two credentials open it:
//! - the operator's client certificate (issued by the relay CA, `spiffe://meshca.internal/operator/…`),
//!   checked in the TLS handshake ([`crate::listener`]); nothing else is needed with it;
//! - the login token `meshca server` / `meshca up` print. Only its SHA-256 digest is kept
//!   ([`LoginDigest`]); presenting it on the login page opens a session: a random id in a cookie
//!   that is `Secure; HttpOnly; SameSite=Strict` with an absolute expiry. The server keeps the
//!   id's digest and its expiry only, so a memory dump yields neither the token nor a usable
//!   cookie.
//!
//! Everything here is pure but for the random generator: time comes in as `now`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::DashboardError;

/// The session cookie's name. The `__Host-` prefix makes browsers refuse it unless it is
/// `Secure`, has `Path=/` and no `Domain`: it cannot be set by another host or over plain HTTP.
pub const COOKIE: &str = "__Host-meshca-session";

/// Sessions kept at most; the earliest to expire goes first when more are opened.
pub const MAX_SESSIONS: usize = 1024;

fn random_secret() -> Result<Zeroizing<String>, DashboardError> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(bytes.as_mut()).map_err(|_| DashboardError::Random)?;
    Ok(Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref())))
}

fn sha256(s: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A login token: 256 random bits, URL-safe. Shown once to the operator; the server keeps its
/// [`LoginDigest`]. `Debug` does not print it.
pub struct LoginToken(Zeroizing<String>);

impl LoginToken {
    /// A fresh token.
    pub fn generate() -> Result<Self, DashboardError> {
        random_secret().map(LoginToken)
    }

    /// The token, to show the operator.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// What the server keeps.
    pub fn digest(&self) -> LoginDigest {
        LoginDigest::of(&self.0)
    }
}

impl std::fmt::Debug for LoginToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginToken(…)")
    }
}

/// The SHA-256 digest of a login token.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginDigest([u8; 32]);

impl LoginDigest {
    /// The digest of `token`.
    pub fn of(token: &str) -> Self {
        LoginDigest(sha256(token))
    }

    /// Whether `presented` is the token (digests compared in constant time).
    pub fn matches(&self, presented: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(&sha256(presented.trim()), &self.0).is_ok()
    }
}

impl std::fmt::Debug for LoginDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginDigest(…)")
    }
}

/// A session just opened: the cookie's value, for the `Set-Cookie` header only.
pub struct NewSession {
    /// The session id (the cookie's value).
    pub id: Zeroizing<String>,
    /// When it stops working.
    pub expires: SystemTime,
}

/// The open sessions: digest of the id → expiry.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    live: Mutex<HashMap<[u8; 32], SystemTime>>,
}

impl Sessions {
    /// Sessions that last `ttl` from login.
    pub fn new(ttl: Duration) -> Self {
        Sessions { ttl, live: Mutex::new(HashMap::new()) }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], SystemTime>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session at `now`. Expired sessions are forgotten; beyond [`MAX_SESSIONS`], the
    /// one closest to expiry is dropped.
    pub fn open(&self, now: SystemTime) -> Result<NewSession, DashboardError> {
        let id = random_secret()?;
        let expires = now + self.ttl;
        let mut live = self.live();
        live.retain(|_, until| *until > now);
        while live.len() >= MAX_SESSIONS {
            let Some(oldest) = live.iter().min_by_key(|(_, until)| **until).map(|(k, _)| *k) else { break };
            live.remove(&oldest);
        }
        live.insert(sha256(&id), expires);
        Ok(NewSession { id, expires })
    }

    /// Whether `id` is an open session at `now` (an expired one is forgotten).
    pub fn check(&self, id: &str, now: SystemTime) -> bool {
        let key = sha256(id);
        let mut live = self.live();
        match live.get(&key) {
            Some(until) if *until > now => true,
            Some(_) => {
                live.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Ends the session `id` (logout).
    pub fn close(&self, id: &str) {
        self.live().remove(&sha256(id));
    }

    /// How many sessions are kept.
    pub fn len(&self) -> usize {
        self.live().len()
    }

    /// Whether no session is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id in a request's `Cookie` headers, if any.
pub fn session_cookie<'a>(cookie_headers: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    cookie_headers
        .into_iter()
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
}

/// The `Set-Cookie` value that stores a session for `max_age`.
pub fn set_cookie(id: &str, max_age: Duration) -> String {
    format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}", max_age.as_secs())
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600 + s)
    }

    #[test]
    fn only_the_token_matches_its_digest_and_neither_prints() {
        let token = LoginToken::generate().expect("token");
        assert_eq!(token.secret().len(), 43, "256 bits, base64url without padding");
        let digest = token.digest();
        assert!(digest.matches(token.secret()));
        assert!(digest.matches(&format!(" {}\n", token.secret())), "pasted with whitespace");
        assert!(!digest.matches(&token.secret()[1..]));
        assert!(!digest.matches(""));
        assert!(!digest.matches(LoginToken::generate().expect("token").secret()));
        assert!(!format!("{token:?} {digest:?}").contains(token.secret()));
    }

    #[test]
    fn a_session_works_until_it_expires_or_is_closed() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let s = sessions.open(t(0)).expect("session");
        assert_eq!(s.expires, t(60));
        assert!(sessions.check(&s.id, t(59)));
        assert!(!sessions.check(&s.id, t(60)), "expired at its expiry");
        assert!(sessions.is_empty(), "an expired session is forgotten when seen");
        let s = sessions.open(t(100)).expect("session");
        assert!(!sessions.check("forged", t(100)));
        sessions.close(&s.id);
        assert!(!sessions.check(&s.id, t(101)), "closed by logout");
    }

    #[test]
    fn sessions_are_bounded_and_expired_ones_go_first() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let first = sessions.open(t(0)).expect("session");
        // Every later one expires after the first (opened at t(1) to t(29)).
        for i in 1..MAX_SESSIONS as u64 + 5 {
            sessions.open(t(1 + i % 29)).expect("session");
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert!(!sessions.check(&first.id, t(1)), "the one closest to expiry was dropped");
        // Once all have expired, opening one forgets every other.
        sessions.open(t(1_000)).expect("session");
        assert_eq!(sessions.len(), 1);
    }

    #[test]
    fn the_cookie_is_found_among_others_and_set_with_every_protection() {
        let id = "abc-DEF_123";
        let headers = ["theme=dark; __Host-meshca-session=abc-DEF_123", "other=1"];
        assert_eq!(session_cookie(headers), Some(id));
        assert_eq!(session_cookie(["meshca-session=x; __Host-meshca-sessionX=y"]), None);
        let set = set_cookie(id, Duration::from_secs(3600));
        for part in
            ["__Host-meshca-session=abc-DEF_123", "Path=/", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=3600"]
        {
            assert!(set.split("; ").any(|p| p == part), "{part} in {set}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
