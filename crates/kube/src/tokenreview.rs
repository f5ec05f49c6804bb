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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use meshca_workload_ca::authn::{AuthError, Authenticated, Authenticator, parse_service_account};

/// How long an accepted token without an `exp` claim (a legacy Secret-based token) is trusted
/// before it is reviewed again.
pub const UNKNOWN_EXPIRY_CACHE: Duration = Duration::from_secs(60);

/// Reviews tokens with one or more clusters' API servers.
pub struct TokenReviewAuthenticator {
    local: Client,
    remotes: HashMap<String, Client>,
    audience: String,
    local_cluster: Option<String>,
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
        TokenReviewAuthenticator { local, remotes: HashMap::new(), audience: audience.to_string(), local_cluster: None }
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

/// The `exp` claim of a JWT, unverified: read only after the API server vouched for the token.
fn expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.get("exp")?.as_u64()?))
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
        let expires_at = expiry(token).unwrap_or_else(|| SystemTime::now() + UNKNOWN_EXPIRY_CACHE);
        Ok(Authenticated { caller, expires_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_read_from_the_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":1700000000,"sub":"x"}"#);
        let t = format!("h.{payload}.s");
        assert_eq!(expiry(&t), Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        assert_eq!(expiry("garbage"), None);
        assert_eq!(expiry("a.!!!.c"), None);
    }
}
