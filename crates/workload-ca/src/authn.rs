//! Caller authentication: who is asking for a certificate.
//!
//! The identity a leaf carries comes only from here — the verified bearer token — never from the
//! CSR. Verifiers sit behind one trait: JWTs checked against a configured issuer and JWKS (this
//! module), and Kubernetes TokenReview (the Kubernetes mode). A cache in front of either keeps a
//! verified token's identity for a bounded time ([`DEFAULT_TOKEN_CACHE_TTL`] by default), so a
//! revoked token is refused within that time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use meshca_clock::{SharedClock, from_unix, unix};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The audience Istio's CA expects on service-account tokens.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// An authenticated caller: a Kubernetes service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// A successful authentication and how long it may be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// Who.
    pub caller: Caller,
    /// Until when (the token's expiry).
    pub expires_at: SystemTime,
}

/// Why a caller was not authenticated. Messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("no bearer token: send `authorization: Bearer <service-account token>`")]
    Missing,
    /// The metadata is not `Bearer <token>`.
    #[error("the authorization metadata is not a bearer token")]
    NotBearer,
    /// The token failed verification.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The token is valid but names no service account.
    #[error("token subject {0:?} is not a Kubernetes service account")]
    NotServiceAccount(String),
    /// The verifier itself failed (e.g. the API server is unreachable).
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

/// Verifies bearer tokens.
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies `token`; `cluster_id` is Istio's optional `clusterid` metadata.
    async fn authenticate(&self, token: &str, cluster_id: Option<&str>) -> Result<Authenticated, AuthError>;
}

/// Extracts the token from an `authorization` value.
pub fn bearer(value: Option<&str>) -> Result<&str, AuthError> {
    let v = value.ok_or(AuthError::Missing)?.trim();
    let (scheme, token) = v.split_once(' ').ok_or(AuthError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::NotBearer);
    }
    Ok(token.trim())
}

/// Parses `system:serviceaccount:<ns>:<sa>`.
pub fn parse_service_account(sub: &str) -> Result<Caller, AuthError> {
    let rest =
        sub.strip_prefix("system:serviceaccount:").ok_or_else(|| AuthError::NotServiceAccount(sub.to_string()))?;
    let (ns, sa) = rest.split_once(':').ok_or_else(|| AuthError::NotServiceAccount(sub.to_string()))?;
    if ns.is_empty() || sa.is_empty() || sa.contains(':') {
        return Err(AuthError::NotServiceAccount(sub.to_string()));
    }
    Ok(Caller { namespace: ns.to_string(), service_account: sa.to_string() })
}

#[derive(Debug, Deserialize)]
struct K8sClaim {
    namespace: String,
    serviceaccount: K8sName,
}

#[derive(Debug, Deserialize)]
struct K8sName {
    name: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    nbf: Option<u64>,
    iat: Option<u64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<K8sClaim>,
}

/// The latest time a token may name (9999-12-31T23:59:59Z). A numeric claim past it is refused
/// as malformed rather than carried into time arithmetic.
pub const MAX_CLAIM_TIME: u64 = 253_402_300_799;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// Range-checks a numeric time claim: at most [`MAX_CLAIM_TIME`], so no later arithmetic on it
/// (a `SystemTime` addition, a cache expiry) can overflow.
pub fn check_claim_time(name: &str, value: u64) -> Result<u64, AuthError> {
    if value > MAX_CLAIM_TIME {
        return Err(AuthError::Rejected(format!("the {name} claim {value} is out of range")));
    }
    Ok(value)
}

/// Checks a token's `exp` and `nbf` against `now`, every value range-checked first.
pub fn check_times(exp: u64, nbf: Option<u64>, now: SystemTime) -> Result<SystemTime, AuthError> {
    check_claim_time("exp", exp)?;
    if let Some(v) = nbf {
        check_claim_time("nbf", v)?;
    }
    let now = u64::try_from(unix(now)).unwrap_or(0);
    if exp.saturating_add(LEEWAY_SECS) <= now {
        return Err(AuthError::Rejected("expired".into()));
    }
    if nbf.is_some_and(|n| n > now.saturating_add(LEEWAY_SECS)) {
        return Err(AuthError::Rejected("not valid yet (nbf)".into()));
    }
    Ok(from_unix(i64::try_from(exp).unwrap_or(i64::MAX)))
}

/// The time claims of a JWT read *without* verifying it: for the TokenReview path, where the
/// API server has verified the token and meshca only wants its expiry to cache the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeClaims {
    /// `exp`, range-checked.
    pub exp: Option<u64>,
    /// `nbf`, range-checked.
    pub nbf: Option<u64>,
    /// `iat`, range-checked.
    pub iat: Option<u64>,
}

/// Reads and range-checks the numeric time claims (`exp`, `nbf`, `iat`) of `token`'s payload
/// without verifying its signature. A payload that is not a base64url JSON object has none
/// (`Ok` with all `None`: a legacy or opaque token); a claim that is present but not an integer
/// between 0 and [`MAX_CLAIM_TIME`] is refused ([`AuthError::Rejected`], answered
/// UNAUTHENTICATED) — never carried into time arithmetic.
pub fn read_time_claims(token: &str) -> Result<TimeClaims, AuthError> {
    use base64::Engine;
    let Some(payload) = token.split('.').nth(1) else { return Ok(TimeClaims::default()) };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
        return Ok(TimeClaims::default());
    };
    let Ok(serde_json::Value::Object(claims)) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok(TimeClaims::default());
    };
    let read = |name: &str| -> Result<Option<u64>, AuthError> {
        match claims.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => check_claim_time(name, n).map(Some),
                None => Err(AuthError::Rejected(format!(
                    "the {name} claim is not a time (an integer number of seconds from 0 to {MAX_CLAIM_TIME})"
                ))),
            },
        }
    };
    Ok(TimeClaims { exp: read("exp")?, nbf: read("nbf")?, iat: read("iat")? })
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies JWTs signed by a configured issuer's keys (a JWKS document): signature, issuer,
/// audience, expiry and not-before (with 30 s of leeway for clock skew).
pub struct JwtAuthenticator {
    issuer: String,
    audience: String,
    keys: Vec<Key>,
    clock: SharedClock,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator").field("issuer", &self.issuer).field("keys", &self.keys.len()).finish()
    }
}

impl JwtAuthenticator {
    /// From a JWKS JSON document. Only asymmetric keys (EC, RSA) are accepted.
    pub fn from_jwks(issuer: &str, jwks_json: &str, audience: &str) -> Result<Self, AuthError> {
        let set: JwkSet = serde_json::from_str(jwks_json).map_err(|e| AuthError::Unavailable(format!("JWKS: {e}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
            let alg = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => continue,
                },
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthError::Unavailable(format!("JWKS key: {e}")))?;
            keys.push(Key { kid: jwk.common.key_id.clone(), alg, key });
        }
        if keys.is_empty() {
            return Err(AuthError::Unavailable("the JWKS holds no usable EC or RSA key".into()));
        }
        Ok(JwtAuthenticator {
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            keys,
            clock: meshca_clock::system(),
        })
    }

    /// The same verifier, checking expiry against `clock`.
    pub fn with_clock(self, clock: SharedClock) -> Self {
        JwtAuthenticator { clock, ..self }
    }

    /// Verifies `token` now (what [`Authenticator::authenticate`] does, synchronously).
    pub fn verify(&self, token: &str) -> Result<Authenticated, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Rejected(format!("malformed JWT: {e}")))?;
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid))
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::Rejected(format!(
                "no trusted key for algorithm {:?} and key id {:?}",
                header.alg, header.kid
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Times are checked below against the injected clock, after a range check: jsonwebtoken
        // would read the system clock itself.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let mut last = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => {
                    let c = data.claims;
                    let caller = parse_service_account(&c.sub)?;
                    if let Some(k8s) = &c.kubernetes
                        && (k8s.namespace != caller.namespace || k8s.serviceaccount.name != caller.service_account)
                    {
                        return Err(AuthError::Rejected("the kubernetes.io claim disagrees with the subject".into()));
                    }
                    if let Some(iat) = c.iat {
                        check_claim_time("iat", iat)?;
                    }
                    let expires_at = check_times(c.exp, c.nbf, self.clock.now())?;
                    return Ok(Authenticated { caller, expires_at });
                }
                Err(e) => last = Some(e),
            }
        }
        let reason = match last.as_ref().map(|e| e.kind()) {
            Some(jsonwebtoken::errors::ErrorKind::ExpiredSignature) => "expired".to_string(),
            Some(jsonwebtoken::errors::ErrorKind::ImmatureSignature) => "not valid yet (nbf)".to_string(),
            Some(jsonwebtoken::errors::ErrorKind::InvalidAudience) => {
                format!("wrong audience (want {})", self.audience)
            }
            Some(jsonwebtoken::errors::ErrorKind::InvalidIssuer) => format!("wrong issuer (want {})", self.issuer),
            Some(jsonwebtoken::errors::ErrorKind::InvalidSignature) => {
                "signature does not verify with any trusted key".into()
            }
            Some(jsonwebtoken::errors::ErrorKind::InvalidClaimFormat(claim)) => {
                format!("the {claim} claim is malformed")
            }
            Some(jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim)) => {
                format!("the {claim} claim is missing")
            }
            Some(jsonwebtoken::errors::ErrorKind::Json(_)) => {
                "malformed claims (a time claim that is not an integer number of seconds, or a missing field)".into()
            }
            Some(other) => format!("{other:?}"),
            None => "unverifiable".into(),
        };
        Err(AuthError::Rejected(reason))
    }
}

#[async_trait::async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, token: &str, _cluster_id: Option<&str>) -> Result<Authenticated, AuthError> {
        self.verify(token)
    }
}

/// How long a verified token is trusted without being verified again, by default: a token's
/// revocation (in Kubernetes mode, its service account or pod deleted) takes effect for new
/// requests within this time. The same as the Kubernetes API server's own cache of successful
/// token authentications (10 s), so a TokenReview answer is at most about twice that old.
pub const DEFAULT_TOKEN_CACHE_TTL: Duration = Duration::from_secs(10);

/// Remembers successful authentications for at most `max_age` (and never past the token's own
/// expiry), so a caller asking often (or a TokenReview round trip) is not paid for on every
/// request, while a revoked token stops working within `max_age`. Only a SHA-256 of the token
/// (and the `clusterid` it came with) is kept. Failures are never cached.
pub struct CachingAuthenticator<A> {
    inner: A,
    max_entries: usize,
    max_age: Duration,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    clock: SharedClock,
}

struct Cached {
    authenticated: Authenticated,
    /// The earlier of the token's expiry and its verification plus `max_age`.
    until: SystemTime,
}

impl<A> CachingAuthenticator<A> {
    /// Wraps `inner`, keeping at most `max_entries` identities, each for at most `max_age`.
    pub fn new(inner: A, max_entries: usize, max_age: Duration) -> Self {
        CachingAuthenticator {
            inner,
            max_entries,
            max_age,
            cache: Mutex::new(HashMap::new()),
            clock: meshca_clock::system(),
        }
    }

    /// The same cache, expiring entries on `clock`.
    pub fn with_clock(self, clock: SharedClock) -> Self {
        CachingAuthenticator { clock, ..self }
    }
}

fn token_key(token: &str, cluster_id: Option<&str>) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(cluster_id.unwrap_or("").as_bytes());
    ctx.update(&[0]);
    ctx.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[async_trait::async_trait]
impl<A: Authenticator> Authenticator for CachingAuthenticator<A> {
    async fn authenticate(&self, token: &str, cluster_id: Option<&str>) -> Result<Authenticated, AuthError> {
        let key = token_key(token, cluster_id);
        let now = self.clock.now();
        if let Some(hit) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && hit.until > now
        {
            return Ok(hit.authenticated.clone());
        }
        let fresh = self.inner.authenticate(token, cluster_id).await?;
        let until = fresh.expires_at.min(now + self.max_age);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.max_entries {
            cache.retain(|_, v| v.until > now);
            if cache.len() >= self.max_entries {
                cache.clear();
            }
        }
        cache.insert(key, Cached { authenticated: fresh.clone(), until });
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idp::DemoIdp;

    use meshca_clock::{Clock as _, ManualClock};

    /// Tokens are minted and checked on one manual clock.
    fn clock() -> ManualClock {
        ManualClock::at_2026()
    }

    fn now() -> SystemTime {
        clock().now()
    }

    #[test]
    fn bearer_metadata_is_parsed_strictly() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(None), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::NotBearer));
        assert_eq!(bearer(Some("Bearer ")), Err(AuthError::NotBearer));
    }

    #[test]
    fn service_account_subjects_only() {
        assert_eq!(
            parse_service_account("system:serviceaccount:default:sleep"),
            Ok(Caller { namespace: "default".into(), service_account: "sleep".into() })
        );
        for bad in ["alice", "system:serviceaccount:default", "system:serviceaccount::x", "system:serviceaccount:a:b:c"]
        {
            assert!(parse_service_account(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn jwts_are_checked_for_key_issuer_audience_and_time() {
        let idp = DemoIdp::generate("https://idp.example").expect("idp");
        let auth = JwtAuthenticator::from_jwks("https://idp.example", &idp.jwks_json(), ISTIO_CA_AUDIENCE)
            .expect("jwks")
            .with_clock(clock().shared());
        let ok = idp.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(600), now()).expect("mint");
        let a = auth.authenticate(&ok, None).await.expect("valid");
        assert_eq!(a.caller, Caller { namespace: "default".into(), service_account: "sleep".into() });

        let expired = idp
            .mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(60), now() - Duration::from_secs(3600))
            .expect("mint");
        assert_eq!(auth.authenticate(&expired, None).await, Err(AuthError::Rejected("expired".into())));

        let wrong_aud = idp.mint("default", "sleep", "kubernetes", Duration::from_secs(600), now()).expect("mint");
        assert!(
            matches!(auth.authenticate(&wrong_aud, None).await, Err(AuthError::Rejected(m)) if m.contains("audience"))
        );

        let other = DemoIdp::generate("https://idp.example").expect("idp");
        let forged = other.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(600), now()).expect("mint");
        assert!(matches!(auth.authenticate(&forged, None).await, Err(AuthError::Rejected(_))));

        let other_iss = DemoIdp::from_key(idp.key_pem().as_bytes(), "https://elsewhere").expect("idp");
        let wrong_iss =
            other_iss.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(600), now()).expect("mint");
        assert!(
            matches!(auth.authenticate(&wrong_iss, None).await, Err(AuthError::Rejected(m)) if m.contains("issuer"))
        );

        assert!(matches!(auth.authenticate("not.a.jwt", None).await, Err(AuthError::Rejected(_))));
    }

    #[tokio::test]
    async fn the_cache_returns_the_same_identity_and_never_caches_failures() {
        let idp = DemoIdp::generate("https://idp.example").expect("idp");
        let auth = CachingAuthenticator::new(
            JwtAuthenticator::from_jwks("https://idp.example", &idp.jwks_json(), ISTIO_CA_AUDIENCE)
                .expect("jwks")
                .with_clock(clock().shared()),
            2,
            DEFAULT_TOKEN_CACHE_TTL,
        );
        let t = idp.mint("ns", "sa", ISTIO_CA_AUDIENCE, Duration::from_secs(600), now()).expect("mint");
        let a = auth.authenticate(&t, None).await.expect("valid");
        assert_eq!(auth.authenticate(&t, None).await.expect("cached"), a);
        assert!(auth.authenticate("garbage", None).await.is_err());
        assert!(auth.authenticate("garbage", None).await.is_err());
    }

    #[test]
    fn token_times_are_range_checked_and_compared_with_leeway() {
        let t = meshca_clock::unix(now()) as u64;
        assert!(check_times(t + 60, None, now()).is_ok());
        assert_eq!(check_times(t - 31, None, now()), Err(AuthError::Rejected("expired".into())));
        assert!(check_times(t - 29, None, now()).is_ok(), "30 s of skew tolerated");
        assert_eq!(check_times(t + 600, Some(t + 31), now()), Err(AuthError::Rejected("not valid yet (nbf)".into())));
        for huge in [1u64 << 63, u64::MAX, MAX_CLAIM_TIME + 1] {
            let e = check_times(huge, None, now()).expect_err("out of range");
            assert!(
                matches!(&e, AuthError::Rejected(m) if m.contains("exp claim") && m.contains("out of range")),
                "{e}"
            );
            assert!(check_times(t + 60, Some(huge), now()).is_err());
        }
    }

    #[tokio::test]
    async fn a_token_with_a_huge_expiry_is_refused_not_a_panic() {
        let idp = DemoIdp::generate("https://idp.example").expect("idp");
        let auth = JwtAuthenticator::from_jwks("https://idp.example", &idp.jwks_json(), ISTIO_CA_AUDIENCE)
            .expect("jwks")
            .with_clock(clock().shared());
        // 2^63 seconds: far past any SystemTime the platform can add.
        let huge = idp.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(1 << 63), now()).expect("mint");
        let e = auth.authenticate(&huge, None).await.expect_err("refused");
        assert!(matches!(&e, AuthError::Rejected(m) if m.contains("out of range")), "{e}");
    }

    /// Signed claims for `sleep` with the given time claims (any JSON), as a trusted issuer could
    /// send them.
    fn claims_with(times: &[(&str, serde_json::Value)]) -> serde_json::Value {
        let mut c = serde_json::json!({
            "iss": "https://idp.example",
            "sub": "system:serviceaccount:default:sleep",
            "aud": [ISTIO_CA_AUDIENCE],
        });
        for (k, v) in times {
            c[*k] = v.clone();
        }
        c
    }

    /// A JSON value a claim might hold: integers around every boundary that matters, negative
    /// and fractional numbers, huge floats, strings, nulls.
    fn claim_value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            (0u64..=MAX_CLAIM_TIME + 10).prop_map(serde_json::Value::from),
            Just(serde_json::Value::from(1u64 << 63)),
            Just(serde_json::Value::from(u64::MAX)),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever numbers (or non-numbers) a trusted issuer puts in `exp`, `nbf` and `iat`,
        /// the verifier answers — never panics — and accepts only times in range.
        #[test]
        fn any_time_claims_are_answered_never_a_panic(exp in claim_value(), nbf in claim_value(), iat in claim_value()) {
            let idp = DemoIdp::generate("https://idp.example").expect("idp");
            let auth = JwtAuthenticator::from_jwks("https://idp.example", &idp.jwks_json(), ISTIO_CA_AUDIENCE)
                .expect("jwks")
                .with_clock(clock().shared());
            let token = idp.sign_claims(&claims_with(&[("exp", exp.clone()), ("nbf", nbf.clone()), ("iat", iat.clone())])).expect("sign");
            let in_range = |v: &serde_json::Value| v.as_u64().is_some_and(|n| n <= MAX_CLAIM_TIME);
            match auth.verify(&token) {
                Ok(a) => {
                    prop_assert!(in_range(&exp), "accepted exp {exp}");
                    prop_assert!(nbf.is_null() || in_range(&nbf), "accepted nbf {nbf}");
                    prop_assert!(iat.is_null() || in_range(&iat), "accepted iat {iat}");
                    prop_assert_eq!(a.expires_at, from_unix(exp.as_u64().unwrap_or(0) as i64));
                }
                Err(e) => prop_assert!(matches!(e, AuthError::Rejected(_)), "{e}"),
            }
            // The unverified reader (the TokenReview path) agrees on what is in range.
            let read = read_time_claims(&token);
            let all_ok = [&exp, &nbf, &iat].iter().all(|v| v.is_null() || in_range(v));
            prop_assert_eq!(read.is_ok(), all_ok, "{:?}", read);
        }

        /// Arbitrary text as a token never panics either reader.
        #[test]
        fn arbitrary_tokens_never_panic(token in ".{0,300}", payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read_time_claims(&token);
            use base64::Engine;
            let crafted = format!("e30.{}.c2ln", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&payload));
            let _ = read_time_claims(&crafted);
            let idp = DemoIdp::generate("https://idp.example").expect("idp");
            let auth = JwtAuthenticator::from_jwks("https://idp.example", &idp.jwks_json(), ISTIO_CA_AUDIENCE).expect("jwks");
            prop_assert!(auth.verify(&token).is_err());
            prop_assert!(auth.verify(&crafted).is_err());
        }
    }

    #[tokio::test]
    async fn cached_identities_expire_with_their_token_on_the_clock() {
        let clock = clock();
        let idp = DemoIdp::generate("https://idp.example").expect("idp");
        let auth = CachingAuthenticator::new(
            JwtAuthenticator::from_jwks("https://idp.example", &idp.jwks_json(), ISTIO_CA_AUDIENCE)
                .expect("jwks")
                .with_clock(clock.shared()),
            8,
            Duration::from_secs(3600),
        )
        .with_clock(clock.shared());
        let t = idp.mint("ns", "sa", ISTIO_CA_AUDIENCE, Duration::from_secs(60), clock.now()).expect("mint");
        assert!(auth.authenticate(&t, None).await.is_ok());
        clock.advance(Duration::from_secs(59));
        assert!(auth.authenticate(&t, None).await.is_ok(), "cached and still valid");
        clock.advance(Duration::from_secs(60));
        assert_eq!(auth.authenticate(&t, None).await, Err(AuthError::Rejected("expired".into())));
    }

    /// A verifier whose answer for a caller turns to "no" once the caller is revoked: a stand-in
    /// for the API server's TokenReview after the service account was deleted (the real API
    /// server does this in `crates/meshca/tests/kube_e2e.rs`), so the cache's bound can be shown
    /// on a manual clock.
    struct Revocable {
        jwt: JwtAuthenticator,
        revoked: Mutex<Vec<Caller>>,
    }

    #[async_trait::async_trait]
    impl Authenticator for &'static Revocable {
        async fn authenticate(&self, token: &str, cluster_id: Option<&str>) -> Result<Authenticated, AuthError> {
            let a = self.jwt.authenticate(token, cluster_id).await?;
            if self.revoked.lock().expect("lock").contains(&a.caller) {
                return Err(AuthError::Rejected("service account deleted".into()));
            }
            Ok(a)
        }
    }

    #[tokio::test]
    async fn a_revoked_token_is_refused_once_its_cache_entry_is_older_than_the_ttl() {
        let clock = clock();
        let idp = DemoIdp::generate("https://idp.example").expect("idp");
        let inner: &'static Revocable = Box::leak(Box::new(Revocable {
            jwt: JwtAuthenticator::from_jwks("https://idp.example", &idp.jwks_json(), ISTIO_CA_AUDIENCE)
                .expect("jwks")
                .with_clock(clock.shared()),
            revoked: Mutex::new(Vec::new()),
        }));
        let auth = CachingAuthenticator::new(inner, 8, DEFAULT_TOKEN_CACHE_TTL).with_clock(clock.shared());
        let t = idp.mint("ns", "sa", ISTIO_CA_AUDIENCE, Duration::from_secs(3600), clock.now()).expect("mint");
        let caller = auth.authenticate(&t, None).await.expect("valid").caller;
        inner.revoked.lock().expect("lock").push(caller);
        clock.advance(DEFAULT_TOKEN_CACHE_TTL - Duration::from_secs(1));
        assert!(auth.authenticate(&t, None).await.is_ok(), "still within the cache's documented bound");
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            auth.authenticate(&t, None).await,
            Err(AuthError::Rejected("service account deleted".into())),
            "verified again once the entry is DEFAULT_TOKEN_CACHE_TTL old"
        );
        // And it stays refused (refusals are never cached, so nothing can bring it back).
        assert!(auth.authenticate(&t, None).await.is_err());
    }
}
