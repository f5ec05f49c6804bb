//! The SPIFFE bundle endpoint's flags, for `meshca server` and `meshca up`: the listener is bound
//! here so the URL is known (and printed) before the server starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use meshca_mgmt::federation::endpoint::endpoint_id;
use meshca_mgmt::federation::{BundleEndpoint, Profile};
use meshca_pki::{Cert, PrivateKey, TrustDomain};

use super::DurationArg;

/// Where and how the SPIFFE bundle endpoint is served.
#[derive(clap::Args, Debug, Clone)]
pub struct BundleEndpointArgs {
    /// Serve the trust domain's SPIFFE bundle (its root set as a JWK Set, with a sequence number
    /// that grows with every change of the root set) over HTTPS at `/` on this address. Anyone
    /// who reaches it may read it: a trust bundle is public. `meshca up` serves it on a free
    /// port unless given one.
    #[arg(long)]
    pub bundle_endpoint_addr: Option<SocketAddr>,
    /// The `https_web` profile: the endpoint's certificate chain (PEM, the server's certificate
    /// first), from a CA the fetching side trusts — what Istio's `spiffeBundleUrl` needs.
    /// Without it the endpoint uses `https_spiffe`: a serving SVID of the trust domain
    /// (`spiffe://<trust domain>/meshca/bundle-endpoint`) under the mesh's own root.
    #[arg(long, requires = "bundle_endpoint_key")]
    pub bundle_endpoint_cert: Option<PathBuf>,
    /// The key of --bundle-endpoint-cert (PEM). Read once at start.
    #[arg(long, requires = "bundle_endpoint_cert")]
    pub bundle_endpoint_key: Option<PathBuf>,
    /// `spiffe_refresh_hint` of the bundle: how often consumers should fetch it again.
    #[arg(long, default_value = "5m")]
    pub bundle_refresh_hint: DurationArg,
}

/// How to reach the endpoint, for printing.
pub struct Access {
    /// `https://<host>:<port>/`.
    pub url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: &'static str,
    /// The serving SVID's SPIFFE ID (`https_spiffe`).
    pub spiffe_id: Option<String>,
}

impl Access {
    /// One line for the operator.
    pub fn describe(&self) -> String {
        match &self.spiffe_id {
            Some(id) => format!("{} ({}, endpoint SPIFFE ID {id})", self.url, self.profile),
            None => format!("{} ({})", self.url, self.profile),
        }
    }
}

impl BundleEndpointArgs {
    /// Binds the endpoint on `addr` (or the flag's address) and reads the `https_web`
    /// certificate. The URL names the certificate's first DNS name (`https_web`) or the
    /// management plane's first host name.
    pub async fn open(
        &self,
        addr: SocketAddr,
        hostnames: &[String],
        trust_domain: &TrustDomain,
    ) -> anyhow::Result<(BundleEndpoint, Access)> {
        let (profile, host) = match (&self.bundle_endpoint_cert, &self.bundle_endpoint_key) {
            (Some(cert), Some(key)) => {
                let (ck, host) = read_web_identity(cert, key)?;
                (Profile::Web(ck), host)
            }
            _ => (Profile::Spiffe, None),
        };
        let host = host.or_else(|| hostnames.first().cloned()).unwrap_or_else(|| "localhost".into());
        self.bind(addr, profile, &host, trust_domain).await
    }

    /// Binds the endpoint on `addr` with `profile`, reached at `host` (`meshca up --federate`
    /// brings an `https_web` certificate of its own).
    pub async fn bind(
        &self,
        addr: SocketAddr,
        profile: Profile,
        host: &str,
        trust_domain: &TrustDomain,
    ) -> anyhow::Result<(BundleEndpoint, Access)> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the SPIFFE bundle endpoint to {addr}"))?;
        let port = listener.local_addr().context("the bundle endpoint's address")?.port();
        let access = Access {
            url: format!("https://{host}:{port}/"),
            profile: profile.name(),
            spiffe_id: matches!(profile, Profile::Spiffe).then(|| endpoint_id(trust_domain).to_string()),
        };
        Ok((BundleEndpoint { listener, profile, refresh_hint: self.bundle_refresh_hint.0 }, access))
    }
}

/// The `https_web` chain and key, checked to belong together, and the certificate's first DNS
/// name.
fn read_web_identity(
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(std::sync::Arc<rustls::sign::CertifiedKey>, Option<String>)> {
    let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let chain = Cert::parse_pem_bundle(&pem).with_context(|| format!("{}", cert.display()))?;
    let (leaf, rest) = chain.split_first().with_context(|| format!("{} holds no certificate", cert.display()))?;
    let key_pem = zeroize::Zeroizing::new(std::fs::read(key).with_context(|| format!("reading {}", key.display()))?);
    let key = PrivateKey::from_pem(&key_pem).with_context(|| format!("{}", key.display()))?;
    anyhow::ensure!(
        leaf.has_public_key(key.public_key_spki()),
        "--bundle-endpoint-key is not the key of --bundle-endpoint-cert ({})",
        leaf.subject()
    );
    let ck = meshca_tls::Identity::new(leaf, rest, &key).certified_key()?;
    Ok((ck, leaf.dns_sans().first().cloned()))
}
