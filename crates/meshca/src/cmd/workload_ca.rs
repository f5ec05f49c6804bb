//! `meshca workload-ca`: istiod's CA role for one cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use meshca_pki::TrustDomain;
use meshca_workload_ca::{Authenticator, CachingAuthenticator, JwtAuthenticator, Metrics, Options, TtlPolicy};

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
    #[arg(long)]
    jwt_issuer: String,
    /// JWKS file with the issuer's public keys.
    #[arg(long)]
    jwks: PathBuf,
    /// Audience the tokens must carry.
    #[arg(long, default_value = meshca_workload_ca::ISTIO_CA_AUDIENCE)]
    audience: String,
    /// Cache verified tokens until they expire.
    #[arg(long)]
    cache_tokens: bool,
    /// Leaf lifetime when the request asks for none.
    #[arg(long, default_value = "24h")]
    default_ttl: DurationArg,
    /// Longest leaf lifetime; longer requests are clamped.
    #[arg(long, default_value = "2160h")]
    max_ttl: DurationArg,
    /// Requests per second before RESOURCE_EXHAUSTED (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_requests_per_second: u32,
    /// Metrics address (Prometheus text at /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// File with the bearer token required on /metrics.
    #[arg(long)]
    metrics_token_file: Option<PathBuf>,
}

/// Builds the JWT authenticator from flags.
pub fn jwt_auth(
    issuer: &str,
    jwks: &std::path::Path,
    audience: &str,
    cache: bool,
) -> anyhow::Result<Arc<dyn Authenticator>> {
    let text = std::fs::read_to_string(jwks).with_context(|| format!("reading {}", jwks.display()))?;
    let jwt = JwtAuthenticator::from_jwks(issuer, &text, audience).with_context(|| format!("{}", jwks.display()))?;
    Ok(if cache { Arc::new(CachingAuthenticator::new(jwt, 100_000)) } else { Arc::new(jwt) })
}

/// Runs until Ctrl-C.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let metrics_token = match &a.metrics_token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
        }
        None => None,
    };
    let opts = Options {
        cacerts_dir: a.cacerts,
        listen: a.listen,
        metrics_listen: a.metrics_listen,
        metrics_token,
        trust_domain: a.trust_domain,
        auth: jwt_auth(&a.jwt_issuer, &a.jwks, &a.audience, a.cache_tokens)?,
        ttl: TtlPolicy { default: a.default_ttl.0, max: a.max_ttl.0 },
        max_per_second: a.max_requests_per_second,
    };
    meshca_workload_ca::serve(
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
    .await?;
    Ok(())
}
