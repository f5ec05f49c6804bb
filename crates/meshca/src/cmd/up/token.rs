//! `meshca token`: a fresh service-account token from an `up` folder's demo identity provider.

use std::path::PathBuf;

use anyhow::Context;
use meshca_clock::Clock as _;
use meshca_workload_ca::{DemoIdp, ISTIO_CA_AUDIENCE};

use super::{idp_key_path, issuer_for};
use crate::cmd::DurationArg;

/// Arguments of `meshca token`.
#[derive(clap::Args)]
pub struct TokenArgs {
    /// The `meshca up` folder.
    #[arg(long)]
    dir: PathBuf,
    /// The cluster whose issuer signs the token.
    #[arg(long)]
    cluster: String,
    /// Namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Service account.
    #[arg(long)]
    service_account: String,
    /// Lifetime.
    #[arg(long, default_value = "1h")]
    ttl: DurationArg,
    /// Audience.
    #[arg(long, default_value = ISTIO_CA_AUDIENCE)]
    audience: String,
}

/// `meshca token`: a fresh token from the demo identity provider.
pub fn token(a: TokenArgs) -> anyhow::Result<()> {
    let key = std::fs::read(idp_key_path(&a.dir))
        .with_context(|| format!("reading the demo issuer key under {}", a.dir.display()))?;
    let idp = DemoIdp::from_key(&key, &issuer_for(&a.cluster))?;
    say!("{}", idp.mint(&a.namespace, &a.service_account, &a.audience, a.ttl.0, meshca_clock::SystemClock.now())?);
    Ok(())
}
