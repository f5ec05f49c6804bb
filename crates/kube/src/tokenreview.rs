//! The workload CA's caller authentication in Kubernetes mode: the caller's service-account token
//! is sent to the API server in a TokenReview, as istiod does. The API server checks the
//! signature, expiry, audience (`istio-ca`) and — for TokenRequest-bound tokens — that the service
//! account (and the pod it is bound to) still exists.
//!
//! Istio's `clusterid` metadata selects the cluster whose API server reviews the token, so one
//! workload CA can authenticate workloads of several clusters (each needs `create` on
//! `tokenreviews` there: the `system:auth-delegator` ClusterRole or `deploy/`'s narrower one).
//!
//! Wrap it in [`meshca_workload_ca::CachingAuthenticator`] to review a token once for its whole
//! lifetime: [`Authenticated::expires_at`] is the token's own `exp` (read from the JWT only after
//! the API server accepted it), or [`UNKNOWN_EXPIRY_CACHE`] for a token without one.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use meshca_clock::SharedClock;
use meshca_workload_ca::authn::{AuthError, Authenticated, Authenticator, parse_service_account, read_time_claims};

/// How long an accepted token without an `exp` claim (a legacy Secret-based token) is trusted
/// before it is reviewed again.
pub const UNKNOWN_EXPIRY_CACHE: Duration = Duration::from_secs(60);

/// Reviews tokens with one or more clusters' API servers.
pub struct TokenReviewAuthenticator {
    local: Client,
    remotes: HashMap<String, Client>,
    audience: String,
    local_cluster: Option<String>,
    clock: SharedClock,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .field("local_cluster", &self.local_cluster)
            .field("remotes", &self.remotes.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TokenReviewAuthenticator {
    /// Reviews with `local` (this cluster's API server) for `audience` (Istio's: `istio-ca`).
    pub fn new(local: Client, audience: &str) -> Self {
        TokenReviewAuthenticator {
            local,
            remotes: HashMap::new(),
            audience: audience.to_string(),
            local_cluster: None,
            clock: meshca_clock::system(),
        }
    }

    /// The same reviewer, timing cached answers on `clock`.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The name of the local cluster: a request whose `clusterid` names it is reviewed locally.
    pub fn with_local_cluster(mut self, name: &str) -> Self {
        self.local_cluster = Some(name.to_string());
        self
    }

    /// Reviews tokens of requests whose `clusterid` is `cluster` with that cluster's API server.
    pub fn with_remote(mut self, cluster: &str, client: Client) -> Self {
        self.remotes.insert(cluster.to_string(), client);
        self
    }

    fn client_for(&self, cluster_id: Option<&str>) -> Result<&Client, AuthError> {
        match cluster_id.filter(|c| !c.is_empty()) {
            None => Ok(&self.local),
            Some(c) if self.local_cluster.as_deref() == Some(c) => Ok(&self.local),
            Some(c) => self.remotes.get(c).ok_or_else(|| {
                AuthError::Rejected(format!("clusterid {c:?} is not a cluster this workload CA can review tokens for"))
            }),
        }
    }
}

/// How long the API server's answer about `token` may be cached from `now`: until the token's own
/// `exp` (read without verifying — the API server vouched for the token — and range-checked, so
/// a huge or malformed `exp` is refused instead of overflowing a time), or
/// [`UNKNOWN_EXPIRY_CACHE`] for a token without one.
fn expiry(token: &str, now: std::time::SystemTime) -> Result<std::time::SystemTime, AuthError> {
    let times = read_time_claims(token)?;
    Ok(match times.exp {
        Some(exp) => meshca_clock::from_unix(i64::try_from(exp).unwrap_or(i64::MAX)),
        None => now + UNKNOWN_EXPIRY_CACHE,
    })
}

#[async_trait::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, token: &str, cluster_id: Option<&str>) -> Result<Authenticated, AuthError> {
        let client = self.client_for(cluster_id)?;
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(|e| match crate::api_status(&e) {
            // The reviewer itself is not allowed to review: a deployment mistake, not the caller's.
            Some((code, m)) => AuthError::Unavailable(format!("TokenReview refused ({code}): {m}")),
            None => AuthError::Unavailable(format!("TokenReview: {e}")),
        })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
            return Err(AuthError::Rejected(why));
        }
        // The API server answers with the audiences it matched; insist ours is among them (an
        // API server that ignores `spec.audiences` would return none).
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(AuthError::Rejected(format!("wrong audience (want {})", self.audience)));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let caller = parse_service_account(&username)?;
        let expires_at = expiry(token, self.clock.now())?;
        Ok(Authenticated { caller, expires_at })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use base64::Engine;
    use meshca_clock::{Clock, ManualClock};

    use super::*;

    fn token(claims: &str) -> String {
        format!("h.{}.s", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims))
    }

    #[test]
    fn expiry_is_read_from_the_payload_on_the_injected_clock() {
        let now = ManualClock::at_2026().now();
        assert_eq!(
            expiry(&token(r#"{"exp":1700000000,"sub":"x"}"#), now),
            Ok(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        for opaque in ["garbage", "a.!!!.c", &token("[1,2]"), &token(r#"{"sub":"x"}"#)] {
            assert_eq!(expiry(opaque, now), Ok(now + UNKNOWN_EXPIRY_CACHE), "{opaque}");
        }
    }

    /// The attack: a token from a trusted issuer with `exp` ≥ 2^63 used to panic the request task
    /// (`UNIX_EPOCH + Duration::from_secs(exp)` overflows). It is refused instead, as is every
    /// other numeric claim that is not a time.
    #[test]
    fn a_huge_or_malformed_time_claim_is_refused_not_a_panic() {
        let now = SystemTime::now();
        for claims in [
            r#"{"exp":9223372036854775808}"#,
            r#"{"exp":18446744073709551615}"#,
            r#"{"exp":253402300800}"#,
            r#"{"exp":1e300}"#,
            r#"{"exp":-1}"#,
            r#"{"exp":"soon"}"#,
            r#"{"exp":1700000000,"nbf":18446744073709551615}"#,
            r#"{"exp":1700000000,"iat":1.5}"#,
        ] {
            let e = expiry(&token(claims), now).expect_err(claims);
            assert!(matches!(e, AuthError::Rejected(_)), "{claims}: {e}");
        }
    }
}
