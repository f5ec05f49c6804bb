//! A sample workload of `meshca up`: it gets its leaf from its own cluster's workload CA the way
//! istio-agent does (CSR + service-account token), renews it at half life, serves mutual TLS, and
//! keeps dialling workloads in the other clusters, verifying their SPIFFE IDs. Every handshake is
//! counted; a failure is what meshca exists to prevent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use meshca_clock::SharedClock;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use anyhow::{Context, anyhow};
use meshca_pki::{Cert, KeyAlgorithm, PrivateKey, RootSet, SpiffeId, TrustDomain, build_csr};
use meshca_proto::istio::IstioCertificateRequest;
use meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_tls::{Identity, PeerPolicy, SpiffeVerifier, SwappableCert};
use meshca_workload_ca::{DemoIdp, ISTIO_CA_AUDIENCE};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_rustls::{TlsAcceptor, TlsConnector};

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
}

/// One sample workload.
pub struct Workload {
    /// Its cluster.
    pub cluster: String,
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
    /// The cluster name (sent as `clusterid`).
    pub cluster: String,
    /// The time (tokens are minted on it).
    pub clock: SharedClock,
    /// Issuer of the cluster's service-account tokens.
    pub idp: Arc<DemoIdp>,
}

/// Requests a leaf: returns the TLS identity, the root set from the response, and the leaf.
async fn fetch_leaf(ca: &CaEndpoint, id: &SpiffeId, ttl: Duration) -> anyhow::Result<(Identity, RootSet, Cert)> {
    let root_pem = std::fs::read(&ca.root_file).with_context(|| format!("reading {}", ca.root_file.display()))?;
    let roots = RootSet::from_pem(&root_pem).context("cluster root-cert.pem")?;
    let config = meshca_tls::client_config(
        meshca_tls::ServerTrust::Roots(&roots),
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
    let intermediates = &certs[1..];
    Ok((Identity::new(&leaf, intermediates, &key), root_set, leaf))
}

impl Workload {
    /// Gets the first leaf and starts serving and renewing, in `tasks` until `stop`.
    pub async fn start(
        cluster: &str,
        id: SpiffeId,
        td: &TrustDomain,
        ca: CaEndpoint,
        leaf_ttl: Duration,
        tasks: &mut JoinSet<()>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Arc<Workload>> {
        let (identity, roots, leaf) =
            fetch_leaf(&ca, &id, leaf_ttl).await.with_context(|| format!("first leaf for {id}"))?;
        let cert = SwappableCert::new(identity.certified_key()?);
        let verifier = SpiffeVerifier::new(&roots, PeerPolicy::TrustDomain(td.clone()), true)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let w = Arc::new(Workload {
            cluster: cluster.to_string(),
            id,
            addr: listener.local_addr()?,
            cert,
            verifier,
            counters: Arc::new(Counters::default()),
            leaf_not_after: Mutex::new(leaf.not_after()),
            clock: ca.clock.clone(),
        });
        w.counters.leaves.fetch_add(1, Ordering::Relaxed);
        let s = stop.clone();
        let me = w.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = s.cancelled() => {}
                _ = me.serve(listener) => {}
            }
        });
        let s = stop.clone();
        let me = w.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = s.cancelled() => {}
                _ = me.renew(ca, leaf_ttl, leaf) => {}
            }
        });
        Ok(w)
    }

    /// Renews the leaf at half its lifetime (istio-agent's default); on failure retries every
    /// second while the current leaf is still valid. Like istio-agent, the lifetime is counted from
    /// when the leaf was received: NotBefore is backdated for clock skew.
    async fn renew(self: Arc<Self>, ca: CaEndpoint, ttl: Duration, mut leaf: Cert) {
        let mut received = self.clock.now();
        loop {
            let life = leaf.not_after().duration_since(received).unwrap_or_default();
            self.clock.sleep_until(received + life / 2).await;
            loop {
                match fetch_leaf(&ca, &self.id, ttl).await {
                    Ok((identity, roots, next)) => match identity.certified_key() {
                        Ok(ck) => {
                            self.cert.swap(ck);
                            if let Err(e) = self.verifier.set_roots(&roots) {
                                tracing::warn!(error = %e, "updating trusted roots failed");
                            }
                            *self.leaf_not_after.lock().await = next.not_after();
                            self.counters.leaves.fetch_add(1, Ordering::Relaxed);
                            leaf = next;
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
                self.clock.sleep(Duration::from_secs(1)).await;
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

/// Keeps `me` calling random workloads of other clusters every `interval`.
pub async fn traffic(me: Arc<Workload>, peers: Vec<Arc<Workload>>, interval: Duration, stop: CancellationToken) {
    let others: Vec<Arc<Workload>> = peers.into_iter().filter(|p| p.cluster != me.cluster).collect();
    if others.is_empty() {
        return;
    }
    let mut i = 0usize;
    loop {
        let peer = &others[i % others.len()];
        i = i.wrapping_add(1);
        match me.call(peer.addr, &peer.id).await {
            Ok(()) => {
                me.counters.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                me.counters.failed.fetch_add(1, Ordering::Relaxed);
                let msg = format!("{} -> {}: {e:#}", me.id, peer.id);
                tracing::error!("handshake failed: {msg}");
                *me.counters.last_error.lock().await = msg;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = me.clock.sleep(interval) => {}
        }
    }
}
