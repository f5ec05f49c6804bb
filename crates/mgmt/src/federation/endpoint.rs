//! The SPIFFE bundle endpoint (`meshca server --bundle-endpoint-addr`): the trust domain's bundle
//! ([`super::publish`]) at `GET /`, over HTTPS with one of the two profiles of the SPIFFE Trust
//! Domain and Bundle specification (§5.2):
//!
//! - `https_web`: a certificate the operator configures (from a public or company CA); clients
//!   check it like any web server's, by host name. This is what Istio's
//!   `MeshConfig.caCertificates[].spiffeBundleUrl` speaks.
//! - `https_spiffe`: a serving SVID of the trust domain, [`endpoint_id`], issued by the management
//!   plane's own signer and renewed at half its life on the injected clock, and at once when the
//!   signer changes (a root rotation's Switching phase). Clients authenticate it with the bundle
//!   they already hold, as SPIRE does.
//!
//! The bundle is public by design (it holds only certificates, which every workload presents
//! anyway), so requests are not authenticated; the listener's handshake deadline and connection
//! cap ([`meshca_serve::https`]) keep anyone who can reach the port from exhausting the process.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshca_clock::SharedClock;
use meshca_pki::{KeyAlgorithm, LeafParams, PrivateKey, SpiffeId, TrustDomain};
use meshca_serve::https::{Limits, TlsListener};
use meshca_store::Store;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::publish::{Published, Publisher, Served};
use crate::error::MgmtError;
use crate::meshes::MeshView;
use crate::replica::Leader;

/// How a bundle endpoint authenticates itself to the clients that fetch from it.
#[derive(Debug, Clone)]
pub enum Profile {
    /// `https_web`: the operator's certificate chain and key.
    Web(Arc<CertifiedKey>),
    /// `https_spiffe`: a serving SVID ([`endpoint_id`]) under the mesh's own signer.
    Spiffe,
}

impl Profile {
    /// The profile's name in the specification.
    pub fn name(&self) -> &'static str {
        match self {
            Profile::Web(_) => "https_web",
            Profile::Spiffe => "https_spiffe",
        }
    }
}

/// What the caller gives the management plane to serve the bundle endpoint: a bound listener
/// (so `meshca up` can print the address before the server starts) and the profile.
#[derive(Debug)]
pub struct BundleEndpoint {
    /// Where to serve.
    pub listener: TcpListener,
    /// How the endpoint authenticates itself.
    pub profile: Profile,
    /// `spiffe_refresh_hint` of the documents served.
    pub refresh_hint: Duration,
}

/// Default `spiffe_refresh_hint`: five minutes, the specification's suggested default. A root
/// rotation's Distributing phase lasts far longer, so consumers learn of the new root before any
/// workload presents a certificate under it.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);

/// Lifetime of the `https_spiffe` serving SVID (renewed at half of it).
pub const SVID_TTL: Duration = Duration::from_secs(24 * 3600);

/// The SPIFFE ID of the bundle endpoint's serving SVID in trust domain `td`: what a federating
/// peer configures as the endpoint's SPIFFE ID for `https_spiffe`.
pub fn endpoint_id(td: &TrustDomain) -> SpiffeId {
    // A constant, valid path.
    SpiffeId::new(td.clone(), "meshca/bundle-endpoint").unwrap_or_else(|_| unreachable!("constant SPIFFE ID path"))
}

/// The listener's limits: [`meshca_serve::https::HANDSHAKE_TIMEOUT`] and
/// [`meshca_serve::https::MAX_CONNECTIONS`], like the dashboard's.
pub const LIMITS: Limits = Limits::new("bundle endpoint");

/// Everything the endpoint is served from.
pub(crate) struct Wiring {
    pub store: Arc<dyn Store>,
    pub meshes: watch::Receiver<Arc<MeshView>>,
    pub clock: SharedClock,
    pub leader: Option<watch::Receiver<Leader>>,
}

/// Starts the bundle's publisher, the serving SVID's renewal (`https_spiffe`) and the HTTPS
/// server in `tasks`; they stop when `cancel` fires.
pub(crate) fn spawn(
    e: BundleEndpoint,
    w: Wiring,
    cancel: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<(), MgmtError> {
    let (out, served) = watch::channel(Served::new());
    let publisher = Publisher {
        store: w.store,
        meshes: w.meshes.clone(),
        clock: w.clock.clone(),
        refresh_hint: e.refresh_hint,
        leader: w.leader,
        out,
    };
    tasks.spawn(publisher.run(cancel.child_token()));
    let resolver: Arc<dyn ResolvesServerCert> = match &e.profile {
        Profile::Web(ck) => Arc::new(Fixed(ck.clone())),
        Profile::Spiffe => {
            let svid = Arc::new(Svid::default());
            tasks.spawn(renew_svid(svid.clone(), w.meshes, w.clock, cancel.child_token()));
            svid
        }
    };
    let tls = server_config(resolver)?;
    if let Ok(addr) = e.listener.local_addr() {
        tracing::info!(%addr, profile = e.profile.name(), "SPIFFE bundle endpoint listening");
    }
    let listener = TlsListener::<std::net::SocketAddr>::new(e.listener, tls, LIMITS)
        .map_err(|source| MgmtError::Io { context: "the bundle endpoint's listener".into(), source })?;
    let app = axum::Router::new()
        .route("/", axum::routing::get(only_bundle))
        .route("/{trust_domain}", axum::routing::get(bundle))
        .with_state(served);
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
            tracing::error!(error = %e, "the bundle endpoint stopped");
        }
    });
    Ok(())
}

/// TLS 1.2 and 1.3 (SPIFFE clients include Go's defaults and older SPIRE releases), no client
/// certificate, HTTP/1.1.
fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<rustls::ServerConfig>, MgmtError> {
    let mut config = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
        .with_safe_default_protocol_versions()
        .map_err(meshca_tls::TlsError::from)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `GET /`: with one mesh, its bundle document (503 while no root set is known); with several,
/// a 404 naming the per-trust-domain paths.
async fn only_bundle(axum::extract::State(served): axum::extract::State<watch::Receiver<Served>>) -> Response {
    let current = served.borrow().clone();
    match current.len() {
        0 => (StatusCode::SERVICE_UNAVAILABLE, "the trust domain's root set is not known yet\n").into_response(),
        1 => current.values().next().map_or_else(|| StatusCode::NOT_FOUND.into_response(), |p| document(p)),
        _ => {
            let paths: Vec<String> = current.keys().map(|td| format!("/{td}")).collect();
            let text = format!("this endpoint serves several trust domains; GET one of {}\n", paths.join(", "));
            (StatusCode::NOT_FOUND, text).into_response()
        }
    }
}

/// `GET /<trust domain>`: that trust domain's bundle document; 404 for a trust domain this
/// management plane does not serve (or whose root set is not known yet).
async fn bundle(
    axum::extract::State(served): axum::extract::State<watch::Receiver<Served>>,
    axum::extract::Path(trust_domain): axum::extract::Path<String>,
) -> Response {
    let current = served.borrow().get(&trust_domain).cloned();
    match current {
        Some(p) => document(&p),
        None => (StatusCode::NOT_FOUND, "no bundle of this trust domain is served here\n").into_response(),
    }
}

fn document(p: &Published) -> Response {
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], p.document.clone())
        .into_response()
}

/// The `https_web` certificate.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The `https_spiffe` serving SVID in force; none while the management plane cannot sign (Vault
/// mode), when handshakes fail.
#[derive(Debug, Default)]
struct Svid {
    current: ArcSwapOption<CertifiedKey>,
}

impl ResolvesServerCert for Svid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// What the serving SVID in force was issued under, and when it is renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidHeld {
    /// The signer's certificate fingerprint.
    pub signer: String,
    /// The trust domain it names.
    pub trust_domain: TrustDomain,
    /// Half of its lifetime.
    pub renew_at: SystemTime,
}

/// The pure step: whether to issue a serving SVID now. Yes without one, when the signer or the
/// trust domain changed (a root rotation's switch, a policy change), and from half its lifetime.
pub fn svid_due(held: Option<&SvidHeld>, signer: &str, trust_domain: &TrustDomain, now: SystemTime) -> bool {
    held.is_none_or(|h| h.signer != signer || &h.trust_domain != trust_domain || now >= h.renew_at)
}

/// Keeps the serving SVID current until cancelled. A TLS server presents one certificate before
/// it knows the path asked for, so with several meshes the SVID is of the first policy by name
/// (the others' trust domains are served over `https_web`; see docs/federation.md).
async fn renew_svid(
    svid: Arc<Svid>,
    mut meshes: watch::Receiver<Arc<MeshView>>,
    clock: SharedClock,
    cancel: CancellationToken,
) {
    const RETRY: Duration = Duration::from_secs(30);
    let mut held: Option<SvidHeld> = None;
    let mut warned = false;
    loop {
        let Some(auth) = meshes.borrow_and_update().meshes().first().map(|m| m.authority()) else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = meshes.changed() => if r.is_err() { return } else { continue },
            }
        };
        let now = clock.now();
        let wake = match auth.signing() {
            Some(s) => {
                let signer = s.signer.cert().fingerprint();
                let td = &auth.policy.trust_domain;
                // Never sooner than RETRY: an SVID clamped to a signer about to expire would
                // otherwise be re-issued in a loop.
                if !svid_due(held.as_ref(), &signer, td, now) {
                    held.as_ref().map_or(now + RETRY, |h| h.renew_at.max(now + RETRY))
                } else {
                    match issue_svid(&s.signer, td, now) {
                        Ok((ck, renew_at)) => {
                            svid.current.store(Some(ck));
                            tracing::info!(id = %endpoint_id(td), "bundle endpoint: serving SVID issued");
                            held = Some(SvidHeld { signer, trust_domain: td.clone(), renew_at });
                            warned = false;
                            renew_at.max(now + RETRY)
                        }
                        // The SVID in force (if any) stays until a retry succeeds.
                        Err(e) => {
                            tracing::error!(error = %e, "bundle endpoint: issuing the serving SVID failed; will retry");
                            now + RETRY
                        }
                    }
                }
            }
            None => {
                if !warned {
                    tracing::error!(
                        "bundle endpoint: https_spiffe needs the management plane to sign (not Vault mode, and a CA \
                         that loads); handshakes fail until it can. Serve https_web with --bundle-endpoint-cert instead"
                    );
                    warned = true;
                }
                svid.current.store(None);
                held = None;
                now + RETRY
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = meshes.changed() => if r.is_err() { return },
            _ = clock.sleep_until(wake) => {}
        }
    }
}

/// A serving SVID from `signer`, and when to renew it (half its lifetime).
fn issue_svid(
    signer: &meshca_pki::CaSigner,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, SystemTime), MgmtError> {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| MgmtError::pki("serving SVID key", e))?;
    let params = LeafParams::workload(endpoint_id(td), SVID_TTL);
    let issued =
        signer.sign_leaf(key.public_key_spki(), &params, now).map_err(|e| MgmtError::pki("serving SVID", e))?;
    let leaf = meshca_pki::Cert::from_der(issued.der).map_err(|e| MgmtError::pki("serving SVID", e))?;
    // The chain up to (not including) a self-signed root: the client has the root in its bundle.
    let above: Vec<meshca_pki::Cert> = signer.chain().iter().filter(|c| !c.is_self_issued()).cloned().collect();
    let renew_at = issued.not_before + (issued.not_after.duration_since(issued.not_before).unwrap_or_default() / 2);
    let ck = meshca_tls::Identity::new(&leaf, &above, &key).certified_key()?;
    Ok((ck, renew_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_svid_is_due_without_one_on_a_new_signer_or_trust_domain_and_at_half_life() {
        let td = TrustDomain::new("mesh.example").expect("td");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let held = SvidHeld { signer: "sha256:a".into(), trust_domain: td.clone(), renew_at: t0 + SVID_TTL / 2 };
        assert!(svid_due(None, "sha256:a", &td, t0));
        assert!(!svid_due(Some(&held), "sha256:a", &td, t0));
        assert!(svid_due(Some(&held), "sha256:b", &td, t0), "a root rotation's switch re-issues");
        assert!(svid_due(Some(&held), "sha256:a", &TrustDomain::new("other.example").expect("td"), t0));
        assert!(svid_due(Some(&held), "sha256:a", &td, t0 + SVID_TTL / 2));
    }
}
