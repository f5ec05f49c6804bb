//! A sample workload of `meshca up`: it gets its leaf from its own cluster's workload CA the way
//! istio-agent does (CSR + service-account token), renews it at half life, serves mutual TLS, and
//! keeps dialling workloads in the other clusters of its mesh, verifying their SPIFFE IDs. Every
//! handshake is counted; a failure is what meshca exists to prevent.
//!
//! With several meshes ([`traffic`]) it also probes the workloads of the other meshes now and
//! then, counted apart: refused while the meshes do not federate (another root, another trust
//! domain), accepted once they do.
//!
//! Revocation: the workload reads its cluster's `ca-crl.pem` as a file, as Istio's proxies read
//! the `istio-ca-crl` ConfigMap istiod fills from it (every [`CRL_POLL`]). Its verifier checks
//! every peer chain against those CRLs (with the grace of [`meshca_tls::revocation`]), its calls
//! to the workload CA check the CA's serving chain against them, and when they name the issuer of
//! its own leaf (or a CA above it) it renews at once instead of at half life — so a revoked
//! cluster's workloads hold leaves from its new intermediate long before their peers stop
//! accepting the old ones ([`decide`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use meshca_clock::SharedClock;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use anyhow::{Context, anyhow};
use meshca_pki::{Cert, Crl, KeyAlgorithm, PrivateKey, RootSet, SpiffeId, TrustDomain, build_csr};
use meshca_proto::istio::IstioCertificateRequest;
use meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_tls::{Identity, PeerPolicy, RevocationGrace, SpiffeVerifier, SwappableCert};
use meshca_workload_ca::{DemoIdp, ISTIO_CA_AUDIENCE};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How often a workload re-reads its cluster's `ca-crl.pem`.
pub const CRL_POLL: Duration = Duration::from_millis(250);

/// How soon a failed renewal is retried while the current leaf is under a revoked CA (the
/// workload CA answers UNAVAILABLE until the agent writes the new intermediate, which it polls
/// for every 200 ms); other failures are retried every second.
const REVOKED_RETRY: Duration = Duration::from_millis(200);

/// Counters shared with the display.
#[derive(Default)]
pub struct Counters {
    /// Handshakes (and ping/pong exchanges) that succeeded, as the client side.
    pub ok: AtomicU64,
    /// Those that failed.
    pub failed: AtomicU64,
    /// Leaves obtained (first one included).
    pub leaves: AtomicU64,
    /// Leaf requests that failed (each retried a second later while the current leaf lasts).
    pub leaves_failed: AtomicU64,
    /// The last failure, for the display.
    pub last_error: Mutex<String>,
    /// Probes of workloads of other meshes that completed (mutual TLS, the peer's SPIFFE ID).
    pub cross_mesh_ok: AtomicU64,
    /// Those that were refused.
    pub cross_mesh_refused: AtomicU64,
    /// Why the last one was refused.
    pub last_refusal: Mutex<String>,
}

/// One sample workload.
pub struct Workload {
    /// Its cluster.
    pub cluster: String,
    /// Its cluster's mesh (policy name).
    pub mesh: String,
    /// Its identity.
    pub id: SpiffeId,
    /// Where it serves mTLS.
    pub addr: std::net::SocketAddr,
    cert: Arc<SwappableCert>,
    verifier: Arc<SpiffeVerifier>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// NotAfter of the current leaf.
    pub leaf_not_after: Mutex<SystemTime>,
    /// Serial of the intermediate that signed the current leaf.
    pub issuer_serial: Mutex<String>,
    /// Where the current leaf and its chain are written (PEM, public), for scripts and tests.
    pub chain_file: std::path::PathBuf,
    clock: SharedClock,
}

/// How to reach the workload's cluster CA.
#[derive(Clone)]
pub struct CaEndpoint {
    /// `host:port`.
    pub address: String,
    /// The cluster's root-cert.pem (to verify the workload CA, as istio-agent does); read at
    /// every request so a root rotation is followed.
    pub root_file: std::path::PathBuf,
    /// The cluster's ca-crl.pem, read every [`CRL_POLL`].
    pub crl_file: std::path::PathBuf,
    /// Where the cluster's agent writes the federated trust domains' bundles
    /// (`<trust domain>.pem`, see `meshca_agent::federated`); re-read every
    /// [`FEDERATION_RELOAD`].
    pub federated_dir: std::path::PathBuf,
    /// The cluster name (sent as `clusterid`).
    pub cluster: String,
    /// The time (tokens are minted on it).
    pub clock: SharedClock,
    /// Issuer of the cluster's service-account tokens.
    pub idp: Arc<DemoIdp>,
}

/// How often a workload re-reads the federated bundles.
pub const FEDERATION_RELOAD: Duration = Duration::from_secs(2);

/// The federated bundles in `dir`: `(trust domain, roots)` per `<trust domain>.pem` (none when
/// the directory does not exist: no federation).
fn read_federated(dir: &std::path::Path) -> anyhow::Result<Vec<(TrustDomain, RootSet)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(td) = name.strip_suffix(".pem").filter(|_| !name.starts_with('.')) else { continue };
        let path = dir.join(&name);
        let roots = RootSet::from_pem(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("{}", path.display()))?;
        out.push((TrustDomain::new(td).with_context(|| format!("{}", path.display()))?, roots));
    }
    out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Ok(out)
}

/// A leaf just obtained.
struct Fetched {
    identity: Identity,
    /// The root set from the response.
    roots: RootSet,
    /// The leaf, then each CA above it below the root.
    chain: Vec<Cert>,
}

/// Requests a leaf; the CA's serving chain is checked against `crls`.
async fn fetch_leaf(ca: &CaEndpoint, id: &SpiffeId, ttl: Duration, crls: &[Crl]) -> anyhow::Result<Fetched> {
    let root_pem = std::fs::read(&ca.root_file).with_context(|| format!("reading {}", ca.root_file.display()))?;
    let roots = RootSet::from_pem(&root_pem).context("cluster root-cert.pem")?;
    let config = meshca_tls::client_config(
        meshca_tls::ServerTrust::RootsWithCrls(&roots, crls),
        meshca_tls::ClientAuth::None,
        meshca_tls::Versions::Tls13And12,
    )?;
    let channel = meshca_tls::grpc::channel(&ca.address, config, "istiod.istio-system.svc")?;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
    let csr = build_csr(&key, &[])?;
    let (ns, sa) = id.workload_parts()?;
    let token = ca.idp.mint(ns, sa, ISTIO_CA_AUDIENCE, Duration::from_secs(3600), ca.clock.now())?;
    let mut req =
        tonic::Request::new(IstioCertificateRequest { csr, validity_duration: ttl.as_secs() as i64, metadata: None });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    req.metadata_mut().insert("clusterid", ca.cluster.parse()?);
    let resp = IstioCertificateServiceClient::new(channel)
        .create_certificate(req)
        .await
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?;
    let pems = resp.into_inner().cert_chain;
    anyhow::ensure!(pems.len() >= 2, "the CA returned {} certificate(s)", pems.len());
    // Leaf first, then one CA per element; the last element is the root set to trust (both
    // roots during a root rotation), which is how the workload learns a new root.
    let (last, certs) = pems.split_last().context("an empty chain")?;
    let certs = certs.iter().map(|p| Cert::from_pem(p.as_bytes())).collect::<Result<Vec<_>, _>>()?;
    let leaf = certs[0].clone();
    anyhow::ensure!(leaf.uri_sans() == [id.to_string()], "the leaf carries {:?}, not {id}", leaf.uri_sans());
    let root_set = RootSet::from_pem(last.as_bytes())?;
    let identity = Identity::new(&leaf, &certs[1..], &key);
    Ok(Fetched { identity, roots: root_set, chain: certs })
}

/// Why a workload renews its leaf now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Half its lifetime has passed (istio-agent's default).
    HalfLife,
    /// A CRL names the certificate with this subject and serial in the leaf's chain (its
    /// issuer, normally): the leaf will soon stop being accepted.
    Revoked {
        /// The revoked certificate.
        subject: String,
        /// Its serial.
        serial: String,
    },
}

/// Whether to renew now: when `crls` revoke a certificate of `chain` (the leaf first, then each
/// CA above it; the root it was issued under is looked up in `roots`), or when `due` (half the
/// leaf's lifetime) has come.
pub fn decide(chain: &[Cert], roots: &RootSet, crls: &[Crl], now: SystemTime, due: SystemTime) -> Option<Renewal> {
    let mut full = chain.to_vec();
    if let Some(root) = chain.last().and_then(|top| roots.iter().find(|r| r.subject_der() == top.issuer_der())) {
        full.push(root.clone());
    }
    if let Some((serial, subject)) = meshca_pki::crl::revoked_in_chain(crls, &full) {
        return Some(Renewal::Revoked { subject, serial });
    }
    (now >= due).then_some(Renewal::HalfLife)
}

/// Reads `file` every [`CRL_POLL`] and publishes its CRLs (to the verifier and to `tx`) when
/// they change. A file that does not parse keeps the last good set (the agent never writes one),
/// and so does a file that went away or cannot be read (the agent writes none while it cannot
/// satisfy istiod, e.g. during a root rotation until the cluster re-issues): what was revoked
/// stays revoked.
async fn watch_crls(
    file: std::path::PathBuf,
    verifier: Arc<SpiffeVerifier>,
    tx: watch::Sender<Arc<Vec<Crl>>>,
    clock: SharedClock,
) {
    let mut seen: Option<Vec<u8>> = None;
    loop {
        // Missing (or unreadable): the last set stays; none yet reads as none.
        let bytes = std::fs::read(&file).ok().or_else(|| seen.clone()).unwrap_or_default();
        if seen.as_ref() != Some(&bytes) {
            match Crl::parse_pem_bundle(&bytes) {
                Ok(crls) => match verifier.set_crls(&crls) {
                    Ok(()) => {
                        tracing::debug!(file = %file.display(), crls = crls.len(), "CRLs loaded");
                        tx.send_replace(Arc::new(crls));
                    }
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "CRLs unusable; keeping the last ones")
                    }
                },
                Err(e) => tracing::warn!(file = %file.display(), error = %e, "CRLs unreadable; keeping the last ones"),
            }
            seen = Some(bytes);
        }
        clock.sleep(CRL_POLL).await;
    }
}

impl Workload {
    /// Gets the first leaf and starts serving, watching the CRLs and renewing, in `tasks` until
    /// `stop`. `chain_file` receives each leaf's chain.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        cluster: &str,
        mesh: &str,
        id: SpiffeId,
        td: &TrustDomain,
        ca: CaEndpoint,
        leaf_ttl: Duration,
        grace: RevocationGrace,
        chain_file: std::path::PathBuf,
        tasks: &mut JoinSet<()>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Arc<Workload>> {
        let crls = Crl::parse_pem_bundle(&std::fs::read(&ca.crl_file).unwrap_or_default()).unwrap_or_default();
        let first = fetch_leaf(&ca, &id, leaf_ttl, &crls).await.with_context(|| format!("first leaf for {id}"))?;
        let cert = SwappableCert::new(first.identity.certified_key()?);
        let verifier = SpiffeVerifier::with_revocation(&first.roots, PeerPolicy::Trusted, true, grace)?;
        verifier.set_federation(td, &read_federated(&ca.federated_dir)?)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let w = Arc::new(Workload {
            cluster: cluster.to_string(),
            mesh: mesh.to_string(),
            id,
            addr: listener.local_addr()?,
            cert,
            verifier,
            counters: Arc::new(Counters::default()),
            leaf_not_after: Mutex::new(first.chain[0].not_after()),
            issuer_serial: Mutex::new(String::new()),
            chain_file,
            clock: ca.clock.clone(),
        });
        w.record(&first.chain).await;
        w.counters.leaves.fetch_add(1, Ordering::Relaxed);
        let (crl_tx, crl_rx) = watch::channel(Arc::new(Vec::new()));
        let s = stop.clone();
        let me = w.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = s.cancelled() => {}
                _ = me.serve(listener) => {}
            }
        });
        let s = stop.clone();
        let (file, verifier, clock) = (ca.crl_file.clone(), w.verifier.clone(), w.clock.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = s.cancelled() => {}
                _ = watch_crls(file, verifier, crl_tx, clock) => {}
            }
        });
        let s = stop.clone();
        let me = w.clone();
        let (dir, own) = (ca.federated_dir.clone(), td.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = s.cancelled() => {}
                _ = me.follow_federation(dir, own) => {}
            }
        });
        let s = stop.clone();
        let me = w.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = s.cancelled() => {}
                _ = me.renew(ca, leaf_ttl, first, crl_rx) => {}
            }
        });
        Ok(w)
    }

    /// Notes a new leaf: its NotAfter and issuer for the display, its chain in `chain_file`.
    async fn record(&self, chain: &[Cert]) {
        *self.leaf_not_after.lock().await = chain[0].not_after();
        *self.issuer_serial.lock().await = chain.get(1).map(Cert::serial_hex).unwrap_or_default();
        let pem: String = chain.iter().map(Cert::to_pem).collect();
        if let Err(e) = super::write(&self.chain_file, pem.as_bytes(), 0o644) {
            tracing::warn!(id = %self.id, error = %e, "writing the leaf's chain failed");
        }
    }

    /// Renews the leaf at half its lifetime (istio-agent's default), or at once when the CRLs
    /// name a certificate of its chain ([`decide`]); on failure retries while the current leaf
    /// is still valid. Like istio-agent, the lifetime is counted from when the leaf was received:
    /// NotBefore is backdated for clock skew.
    async fn renew(
        self: Arc<Self>,
        ca: CaEndpoint,
        ttl: Duration,
        current: Fetched,
        mut crls: watch::Receiver<Arc<Vec<Crl>>>,
    ) {
        let (mut chain, mut roots) = (current.chain, current.roots);
        let mut received = self.clock.now();
        loop {
            let life = chain[0].not_after().duration_since(received).unwrap_or_default();
            let due = received + life / 2;
            let why = loop {
                let held = crls.borrow_and_update().clone();
                if let Some(why) = decide(&chain, &roots, &held, self.clock.now(), due) {
                    break why;
                }
                tokio::select! {
                    _ = self.clock.sleep_until(due) => {}
                    changed = crls.changed() => if changed.is_err() { return },
                }
            };
            let retry = match &why {
                Renewal::HalfLife => Duration::from_secs(1),
                Renewal::Revoked { subject, serial } => {
                    tracing::warn!(id = %self.id, %subject, %serial, "the CRL names this workload's certificate chain; renewing its leaf now");
                    REVOKED_RETRY
                }
            };
            loop {
                let held = crls.borrow().clone();
                match fetch_leaf(&ca, &self.id, ttl, &held).await {
                    Ok(next) => match next.identity.certified_key() {
                        Ok(ck) => {
                            self.cert.swap(ck);
                            if let Err(e) = self.verifier.set_roots(&next.roots) {
                                tracing::warn!(error = %e, "updating trusted roots failed");
                            }
                            self.record(&next.chain).await;
                            self.counters.leaves.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                id = %self.id,
                                issuer = %next.chain.get(1).map(Cert::serial_hex).unwrap_or_default(),
                                reason = ?why,
                                "leaf renewed"
                            );
                            (chain, roots) = (next.chain, next.roots);
                            received = self.clock.now();
                            break;
                        }
                        Err(e) => tracing::warn!(id = %self.id, error = %e, "new leaf unusable"),
                    },
                    Err(e) => {
                        self.counters.leaves_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(id = %self.id, error = %e, "leaf renewal failed; retrying");
                    }
                }
                self.clock.sleep(retry).await;
            }
        }
    }

    /// Re-reads the federated bundles every [`FEDERATION_RELOAD`] and applies them when they
    /// change; a set that does not read keeps the one in use.
    async fn follow_federation(self: Arc<Self>, dir: std::path::PathBuf, own: TrustDomain) {
        let mut applied = read_federated(&dir).unwrap_or_default();
        loop {
            self.clock.sleep(FEDERATION_RELOAD).await;
            match read_federated(&dir) {
                Ok(next) if next != applied => match self.verifier.set_federation(&own, &next) {
                    Ok(()) => {
                        let domains: Vec<&str> = next.iter().map(|(td, _)| td.as_str()).collect();
                        tracing::info!(id = %self.id, ?domains, "federated trust domains updated");
                        applied = next;
                    }
                    Err(e) => {
                        tracing::warn!(id = %self.id, error = %e, "federated bundles refused; the last ones stay")
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(id = %self.id, error = %format!("{e:#}"), "reading the federated bundles failed")
                }
            }
        }
    }

    fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        Ok(Arc::new(
            rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(self.verifier.clone())
                .with_cert_resolver(self.cert.clone()),
        ))
    }

    fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        Ok(Arc::new(meshca_tls::client_config(
            meshca_tls::ServerTrust::Verifier(self.verifier.clone()),
            meshca_tls::ClientAuth::Resolver(self.cert.clone()),
            meshca_tls::Versions::Tls13,
        )?))
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        let Ok(config) = self.server_config() else { return };
        let acceptor = TlsAcceptor::from(config);
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            let me = self.id.to_string();
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await else {
                    return;
                };
                let mut line = String::new();
                let (r, mut w) = tokio::io::split(&mut tls);
                let mut r = BufReader::new(r);
                if r.read_line(&mut line).await.is_ok() && line.trim() == "ping" {
                    let _ = w.write_all(format!("pong {me}\n").as_bytes()).await;
                    let _ = w.flush().await;
                }
                let _ = tls.shutdown().await;
            });
        }
    }

    /// One mTLS exchange with `peer`, verifying it is exactly `peer_id`.
    pub async fn call(&self, peer: std::net::SocketAddr, peer_id: &SpiffeId) -> anyhow::Result<()> {
        let connector = TlsConnector::from(self.client_config()?);
        let tcp = TcpStream::connect(peer).await?;
        let mut tls =
            tokio::time::timeout(Duration::from_secs(5), connector.connect(ServerName::try_from("workload")?, tcp))
                .await
                .context("handshake timed out")?
                .context("handshake")?;
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(meshca_tls::spiffe::peer_spiffe_id)
            .ok_or_else(|| anyhow!("the peer presented no SPIFFE ID"))?;
        anyhow::ensure!(&presented == peer_id, "expected {peer_id}, the peer is {presented}");
        tls.write_all(b"ping\n").await?;
        tls.flush().await?;
        let mut line = String::new();
        BufReader::new(&mut tls).read_line(&mut line).await?;
        anyhow::ensure!(line.trim() == format!("pong {peer_id}"), "unexpected answer {line:?}");
        Ok(())
    }
}

/// One exchange of `me` with `peer`; the error names both.
async fn exchange(me: &Workload, peer: &Workload) -> Result<(), String> {
    me.call(peer.addr, &peer.id).await.map_err(|e| format!("{} -> {}: {e:#}", me.id, peer.id))
}

/// One in this many calls of a workload is also a probe of another mesh's workload.
pub const CROSS_MESH_EVERY: usize = 4;

/// Keeps `me` calling the workloads of the other clusters of its mesh in turn, one every
/// `interval`; every [`CROSS_MESH_EVERY`]th call it also probes a workload of another mesh (every
/// call when its mesh has no other cluster). A probe refused while the meshes do not federate is
/// what should happen, and is logged at debug level; with `federated` it is a warning.
pub async fn traffic(
    me: Arc<Workload>,
    peers: Vec<Arc<Workload>>,
    interval: Duration,
    federated: bool,
    stop: CancellationToken,
) {
    let (mine, foreign): (Vec<Arc<Workload>>, Vec<Arc<Workload>>) =
        peers.into_iter().filter(|p| p.cluster != me.cluster).partition(|p| p.mesh == me.mesh);
    if mine.is_empty() && foreign.is_empty() {
        return;
    }
    let (mut i, mut probes) = (0usize, 0usize);
    loop {
        if let Some(peer) = mine.get(i % mine.len().max(1)) {
            match exchange(&me, peer).await {
                Ok(()) => me.counters.ok.fetch_add(1, Ordering::Relaxed),
                Err(msg) => {
                    tracing::error!("handshake failed: {msg}");
                    *me.counters.last_error.lock().await = msg;
                    me.counters.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        if !foreign.is_empty() && (mine.is_empty() || i % CROSS_MESH_EVERY == 0) {
            let peer = &foreign[probes % foreign.len()];
            probes = probes.wrapping_add(1);
            match exchange(&me, peer).await {
                Ok(()) => me.counters.cross_mesh_ok.fetch_add(1, Ordering::Relaxed),
                Err(msg) => {
                    if federated {
                        tracing::warn!("cross-mesh handshake refused although the meshes federate: {msg}");
                    } else {
                        tracing::debug!("cross-mesh handshake refused (the meshes do not federate): {msg}");
                    }
                    *me.counters.last_refusal.lock().await = msg;
                    me.counters.cross_mesh_refused.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        i = i.wrapping_add(1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = me.clock.sleep(interval) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, SystemTime};

    use meshca_pki::{
        CaSigner, CrlParams, IntermediateParams, KeyAlgorithm, LeafParams, PrivateKey, Reason, Revoked, RootParams,
        RootSet, SpiffeId, TrustDomain,
    };

    use super::{Renewal, decide};

    fn key() -> PrivateKey {
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap()
    }

    #[test]
    fn a_workload_renews_at_half_life_or_at_once_when_a_crl_names_its_issuer() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let td = TrustDomain::new("cluster.local").unwrap();
        let root = CaSigner::new_root(key(), &RootParams::new("meshca"), now).unwrap();
        let int_key = key();
        let params = IntermediateParams::cluster("meshca", "cluster-2", td.clone());
        let int = root.sign_intermediate(int_key.public_key_spki(), &params, now).unwrap().parse().unwrap();
        let int = CaSigner::new(int_key, vec![int, root.cert().clone()]).unwrap();
        let leaf_key = key();
        let id = SpiffeId::workload(&td, "default", "sleep-2").unwrap();
        let leaf = int
            .sign_leaf(leaf_key.public_key_spki(), &LeafParams::workload(id, Duration::from_secs(3600)), now)
            .unwrap()
            .parse()
            .unwrap();
        let chain = [leaf, int.cert().clone()];
        let roots = RootSet::from_pem(root.cert().to_pem().as_bytes()).unwrap();
        let due = now + Duration::from_secs(1800);
        let crl = |by: &CaSigner, revoked: Vec<Revoked>| {
            by.sign_crl(&CrlParams { number: 1, this_update: now, next_update: due, revoked }).unwrap()
        };
        let naming_int =
            vec![Revoked { serial_hex: int.cert().serial_hex(), revoked_at: now, reason: Reason::KeyCompromise }];

        assert_eq!(decide(&chain, &roots, &[], now, due), None);
        assert_eq!(decide(&chain, &roots, &[crl(&root, vec![])], now, due), None, "a CRL naming nothing");
        assert_eq!(decide(&chain, &roots, &[], due, due), Some(Renewal::HalfLife));
        let revoked = decide(&chain, &roots, &[crl(&root, naming_int.clone())], now, due);
        assert_eq!(
            revoked,
            Some(Renewal::Revoked { subject: int.cert().subject(), serial: int.cert().serial_hex() }),
            "the root's CRL names the leaf's issuer"
        );
        let impostor = CaSigner::new_root(key(), &RootParams::new("meshca"), now).unwrap();
        assert_eq!(decide(&chain, &roots, &[crl(&impostor, naming_int)], now, due), None, "not signed by the root");
    }
}
