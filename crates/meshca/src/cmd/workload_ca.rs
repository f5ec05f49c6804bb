//! `meshca workload-ca`: istiod's CA role for one cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshca_pki::TrustDomain;
use meshca_serve::Rate;
use meshca_workload_ca::{Authenticator, CachingAuthenticator, JwtAuthenticator, Metrics, Options, TtlPolicy, service};

use super::DurationArg;

/// Arguments of `meshca workload-ca`.
#[derive(clap::Args)]
pub struct Args {
    /// The `cacerts` directory (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem).
    #[arg(long)]
    cacerts: PathBuf,
    /// gRPC address (Istio's CA port is 15012).
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// The mesh trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: TrustDomain,
    /// Issuer (`iss`) of the service-account tokens callers present.
    #[arg(long, required_unless_present = "tokenreview")]
    jwt_issuer: Option<String>,
    /// JWKS file with the issuer's public keys.
    #[arg(long, required_unless_present = "tokenreview")]
    jwks: Option<PathBuf>,
    /// Authenticate callers by TokenReview with the API server of --kubeconfig/--kube-url/
    /// --in-cluster (Kubernetes mode, as istiod does) instead of --jwt-issuer/--jwks.
    #[arg(long, conflicts_with_all = ["jwt_issuer", "jwks"])]
    tokenreview: bool,
    /// With --tokenreview: this cluster's name (a request whose `clusterid` names it is reviewed
    /// by the local API server).
    #[arg(long)]
    cluster_name: Option<String>,
    /// With --tokenreview: `CLUSTER=KUBECONFIG` — review the tokens of requests whose `clusterid`
    /// is CLUSTER with that cluster's API server. Repeatable.
    #[arg(long = "remote-cluster", value_name = "CLUSTER=KUBECONFIG")]
    remote_clusters: Vec<String>,
    /// Read `cacerts` from this Secret (`NAMESPACE/NAME`) through the API server and mirror it
    /// into --cacerts, for running where no kubelet mounts the Secret (in a pod, mount it instead).
    #[arg(long, requires = "cacerts")]
    cacerts_secret: Option<String>,
    #[command(flatten)]
    kube: super::kube::KubeArgs,
    /// Audience the tokens must carry.
    #[arg(long, default_value = meshca_workload_ca::ISTIO_CA_AUDIENCE)]
    audience: String,
    /// How long a verified token is trusted before it is verified again (never past its own
    /// expiry); a revoked token (its service account deleted) is refused within this time. 0s
    /// verifies every request.
    #[arg(long, default_value = "10s", value_parser = duration_or_zero)]
    token_cache_ttl: Duration,
    /// Leaf lifetime when the request asks for none.
    #[arg(long, default_value = "24h")]
    default_ttl: DurationArg,
    /// Longest leaf lifetime; longer requests are clamped.
    #[arg(long, default_value = "2160h")]
    max_ttl: DurationArg,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    serve: super::ServeArgs,
    /// Metrics address (Prometheus text at /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// File with the bearer token required on /metrics.
    #[arg(long)]
    metrics_token_file: Option<PathBuf>,
}

/// The workload CA's request limits (docs/architecture.md, "Security defaults"; sizing in
/// docs/benchmarks.md). Every refusal is RESOURCE_EXHAUSTED with a retry hint
/// (`grpc-retry-pushback-ms` and google.rpc.RetryInfo).
#[derive(clap::Args)]
struct LimitArgs {
    /// Requests one address (IPv6: one /64) may make per second before its token is even looked
    /// at: an anonymous or forged-token flood is refused for almost no work and never uses any
    /// identity's budget (0: no limit). Behind a gateway that hides client addresses (e.g. an
    /// east-west gateway carrying a remote cluster's workloads), raise it.
    #[arg(long, default_value_t = service::DEFAULT_PEER_RATE.per_second)]
    peer_requests_per_second: f64,
    /// Requests one address may make at once, on top of that rate.
    #[arg(long, default_value_t = service::DEFAULT_PEER_RATE.burst)]
    peer_request_burst: u32,
    /// Certificates one SPIFFE identity (one service account) may get per second, counted once
    /// its token is verified (0: no limit).
    #[arg(long, default_value_t = service::DEFAULT_IDENTITY_RATE.per_second)]
    identity_requests_per_second: f64,
    /// Certificates one identity may get at once, on top of that rate (a Deployment scaling out
    /// asks once per replica).
    #[arg(long, default_value_t = service::DEFAULT_IDENTITY_RATE.burst)]
    identity_request_burst: u32,
    /// Requests worked on at once; more wait their turn, fairly across addresses (0: four per
    /// core).
    #[arg(long, default_value_t = 0)]
    max_concurrent_requests: usize,
    /// Requests that may wait for their turn; one more is answered RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = service::DEFAULT_MAX_QUEUED)]
    max_queued_requests: usize,
    /// Requests from one address that may wait for their turn.
    #[arg(long, default_value_t = service::DEFAULT_MAX_QUEUED_PER_PEER)]
    max_queued_per_peer: usize,
    /// The longest a request waits for its turn before RESOURCE_EXHAUSTED (never until the
    /// caller's own deadline).
    #[arg(long, default_value = "5s")]
    max_queue_wait: DurationArg,
}

impl LimitArgs {
    fn limits(&self) -> service::Limits {
        service::Limits {
            peer: Rate::new(self.peer_requests_per_second, self.peer_request_burst),
            identity: Rate::new(self.identity_requests_per_second, self.identity_request_burst),
            admission: meshca_serve::AdmissionConfig {
                max_in_flight: match self.max_concurrent_requests {
                    0 => service::default_max_in_flight(),
                    n => n,
                },
                max_queued: self.max_queued_requests,
                max_queued_per_key: self.max_queued_per_peer,
                max_wait: self.max_queue_wait.0,
            },
        }
    }
}

/// A duration, zero included (`0s` turns a cache off).
fn duration_or_zero(s: &str) -> Result<Duration, String> {
    meshca_policy::duration::parse(s).ok_or_else(|| format!("{s:?} is not a duration (examples: 0s, 10s, 5m)"))
}

/// Identities a token cache keeps at most (a cache that fills up is emptied of expired entries,
/// then cleared).
const TOKEN_CACHE_ENTRIES: usize = 100_000;

/// `auth` behind a cache of verified tokens kept for `ttl`, or `auth` itself for a zero `ttl`.
pub fn cached<A: Authenticator>(auth: A, ttl: Duration) -> Arc<dyn Authenticator> {
    if ttl.is_zero() { Arc::new(auth) } else { Arc::new(CachingAuthenticator::new(auth, TOKEN_CACHE_ENTRIES, ttl)) }
}

/// Builds the JWT authenticator from flags.
pub fn jwt_auth(
    issuer: &str,
    jwks: &std::path::Path,
    audience: &str,
    cache_ttl: Duration,
) -> anyhow::Result<Arc<dyn Authenticator>> {
    let text = std::fs::read_to_string(jwks).with_context(|| format!("reading {}", jwks.display()))?;
    let jwt = JwtAuthenticator::from_jwks(issuer, &text, audience).with_context(|| format!("{}", jwks.display()))?;
    Ok(cached(jwt, cache_ttl))
}

/// Runs until Ctrl-C or SIGTERM, then drains within --shutdown-grace.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let metrics_token = a.metrics_token_file.as_deref().map(super::read_token_file).transpose()?;
    let client = a.kube.client().await?;
    let auth: Arc<dyn Authenticator> = match (&a.jwt_issuer, &a.jwks) {
        (Some(issuer), Some(jwks)) if !a.tokenreview => jwt_auth(issuer, jwks, &a.audience, a.token_cache_ttl)?,
        _ => {
            let local = client.clone().context("--tokenreview needs --kubeconfig, --kube-url or --in-cluster")?;
            let mut review = meshca_kube::tokenreview::TokenReviewAuthenticator::new(local, &a.audience);
            if let Some(name) = &a.cluster_name {
                review = review.with_local_cluster(name);
            }
            for spec in &a.remote_clusters {
                let (name, path) = spec
                    .split_once('=')
                    .with_context(|| format!("--remote-cluster {spec:?} is not CLUSTER=KUBECONFIG"))?;
                let conn = meshca_kube::Connection::Kubeconfig { path: path.into(), context: None };
                review = review
                    .with_remote(name, meshca_kube::connect(&conn).await.with_context(|| format!("cluster {name}"))?);
            }
            // A token is reviewed once per --token-cache-ttl (istiod reviews every call; a herd of
            // renewals would put that load on the API server for nothing).
            cached(review, a.token_cache_ttl)
        }
    };
    let stop_mirror = tokio_util::sync::CancellationToken::new();
    let mirror = match &a.cacerts_secret {
        Some(secret) => {
            let client = client.clone().context("--cacerts-secret needs --kubeconfig, --kube-url or --in-cluster")?;
            let store = Arc::new(meshca_kube::store::KubeStore::new(client));
            let key = super::kube::object_key(secret)?;
            Some(super::kube::mirror_secret(store, key, a.cacerts.clone(), stop_mirror.clone()).await?)
        }
        None => None,
    };
    let opts = Options {
        cacerts_dir: a.cacerts,
        listen: a.listen,
        metrics_listen: a.metrics_listen,
        metrics_token,
        trust_domain: a.trust_domain,
        auth,
        ttl: TtlPolicy { default: a.default_ttl.0, max: a.max_ttl.0 },
        limits: a.limits.limits(),
        serve: a.serve.config(meshca_serve::server::DEFAULT_MAX_PER_IDENTITY),
        clock: meshca_clock::system(),
    };
    let served = meshca_workload_ca::serve(
        opts,
        Metrics::new(),
        |addr, metrics| {
            eprintln!(
                "workload CA listening on {addr}{}",
                metrics.map(|m| format!("; metrics on http://{m}/metrics")).unwrap_or_default()
            )
        },
        super::ctrl_c(),
    )
    .await;
    stop_mirror.cancel();
    if let Some(m) = mirror {
        let _ = m.await;
    }
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_cache_ttl_may_be_zero() {
        assert_eq!(duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(duration_or_zero("10s"), Ok(Duration::from_secs(10)));
        assert!(duration_or_zero("soon").is_err());
    }
}
