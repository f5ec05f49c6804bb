//! `meshca server`: wires the store, the authority loader, the relay CA and the gRPC services
//! behind one TLS listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_pki::{CsrPolicy, KeyAlgorithm, PrivateKey, build_csr, verify_csr};
use meshca_policy::Policy;
use meshca_proto::identity::Caller;
use meshca_proto::mgmt::{
    certificate_issuer_server::CertificateIssuerServer, operator_server::OperatorServer,
    registration_server::RegistrationServer,
};
use meshca_store::{Store, fsutil};
use meshca_tls::{Identity, PeerPolicy, SpiffeVerifier, SwappableCert, grpc};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::authority::{self, Authority, PolicySource};
use crate::error::MgmtError;
use crate::ratelimit::RateLimiter;
use crate::relay::RelayCa;
use crate::replica::{self, Leader};
use crate::service::{IssuerService, OperatorService, RegistrationService, Settings, Shared};

/// Largest gRPC message accepted (a CSR or a policy is a few KB).
const MAX_MESSAGE: usize = 256 * 1024;

/// How `meshca server` runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// DNS names on the serving certificate (agents use one of them as the server name).
    pub hostnames: Vec<String>,
    /// A policy to put in force at start (written to the store), instead of the stored one.
    pub policy_yaml: Option<String>,
    /// The policy used when none is stored.
    pub default_policy: Policy,
    /// Where to write the operator's credentials (client certificate, key, relay CA, address).
    pub operator_dir: Option<PathBuf>,
    /// Service tunables.
    pub settings: Settings,
    /// Issuance burst per cluster.
    pub issue_burst: u32,
    /// Issuance refill per cluster per minute.
    pub issue_per_minute: f64,
    /// Prometheus endpoint address (none: no metrics endpoint).
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token required on `/metrics`.
    pub metrics_token: Option<String>,
}

/// Files in the operator credentials directory.
pub mod creds {
    /// The operator's client certificate.
    pub const CERT: &str = "operator.pem";
    /// Its key (0600).
    pub const KEY: &str = "operator-key.pem";
    /// The relay CA, to verify the server.
    pub const RELAY_CA: &str = "relay-ca.pem";
    /// The server's `host:port`.
    pub const SERVER: &str = "server";

    use std::path::Path;

    use meshca_pki::{Cert, PrivateKey, RootSet};

    use crate::error::MgmtError;

    fn read(dir: &Path, name: &str) -> Result<Vec<u8>, MgmtError> {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| MgmtError::Io {
            context: format!("reading {} (is the credentials folder right?)", path.display()),
            source,
        })
    }

    /// The TLS client configuration of the operator whose credentials are in `dir`: its client
    /// certificate, and the relay CA as the only root for the server.
    pub fn client_config(dir: &Path) -> Result<rustls::ClientConfig, MgmtError> {
        let cert = Cert::from_pem(&read(dir, CERT)?).map_err(|e| MgmtError::pki("operator certificate", e))?;
        let key = PrivateKey::from_pem(&read(dir, KEY)?).map_err(|e| MgmtError::pki("operator key", e))?;
        let relay = RootSet::from_pem(&read(dir, RELAY_CA)?).map_err(|e| MgmtError::pki("relay CA", e))?;
        let mut roots = rustls::RootCertStore::empty();
        for r in relay.iter() {
            roots
                .add(rustls_pki_types::CertificateDer::from(r.der().to_vec()))
                .map_err(|e| MgmtError::pki("relay CA", e))?;
        }
        let id = meshca_tls::Identity::new(&cert, &[], &key);
        rustls::ClientConfig::builder_with_provider(meshca_tls::provider::get())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .and_then(|b| b.with_root_certificates(roots).with_client_auth_cert(id.chain.clone(), id.key()))
            .map_err(|e| MgmtError::pki("operator TLS configuration", e))
    }

    /// The management plane's `host:port` recorded beside the credentials.
    pub fn recorded_server(dir: &Path) -> Result<String, MgmtError> {
        let raw = read(dir, SERVER)?;
        String::from_utf8(raw)
            .map(|s| s.trim().to_string())
            .map_err(|_| MgmtError::pki("credentials", format!("{} is not UTF-8", dir.join(SERVER).display())))
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> MgmtError {
    move |source| MgmtError::Io { context, source }
}

/// Issues an operator identity and writes it with the relay CA and the server address.
fn write_operator_credentials(
    dir: &std::path::Path,
    relay: &RelayCa,
    addr: SocketAddr,
    now: SystemTime,
) -> Result<(), MgmtError> {
    fsutil::create_private_dir(dir).map_err(io(format!("creating {}", dir.display())))?;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| MgmtError::pki("operator key", e))?;
    let csr = build_csr(&key, &[]).map_err(|e| MgmtError::pki("operator CSR", e))?;
    let csr = verify_csr(csr.as_bytes(), &CsrPolicy::default()).map_err(|e| MgmtError::pki("operator CSR", e))?;
    let cert = relay.issue_identity(
        csr.public_key_spki(),
        &Caller::Operator { name: "admin".into() },
        Duration::from_secs(365 * 86400),
        now,
    )?;
    let w = |name: &str, data: &[u8], mode| {
        fsutil::write_atomic(&dir.join(name), data, mode).map_err(io(format!("writing {}", dir.join(name).display())))
    };
    w(creds::KEY, key.to_pkcs8_pem().as_bytes(), 0o600)?;
    w(creds::CERT, cert.to_pem().as_bytes(), 0o644)?;
    w(creds::RELAY_CA, relay.roots().to_pem().as_bytes(), 0o644)?;
    w(creds::SERVER, addr.to_string().as_bytes(), 0o644)?;
    Ok(())
}

/// What Kubernetes mode adds to [`serve`]: where the policy comes from and, with several
/// replicas, who leads. The default is the embedded single-replica server.
#[derive(Default)]
pub struct ServeWith {
    /// The policy's source; the store object `meshca/root-trust-policy` when `None`.
    pub policy_source: Option<Arc<dyn PolicySource>>,
    /// The leader election's view; `None` runs as the only replica (always the leader). See
    /// [`crate::replica`] for what followers do.
    pub leader: Option<watch::Receiver<Leader>>,
}

/// Runs the management plane until `shutdown` resolves. `on_bound` receives the bound address
/// (useful with port 0).
pub async fn serve(
    store: Arc<dyn Store>,
    opts: ServerOptions,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MgmtError> {
    serve_with(store, opts, ServeWith::default(), on_bound, shutdown).await
}

/// [`serve`] with a policy source and a leader election (Kubernetes mode). Returns
/// [`MgmtError::LostLeadership`] when this replica led and lost its lease.
pub async fn serve_with(
    store: Arc<dyn Store>,
    opts: ServerOptions,
    with: ServeWith,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MgmtError> {
    meshca_tls::provider::install();
    let now = SystemTime::now();
    let policy_source: Arc<dyn PolicySource> =
        with.policy_source.clone().unwrap_or_else(|| Arc::new(authority::StorePolicy::new(store.clone())));
    if let Some(text) = &opts.policy_yaml {
        // Like `meshca policy apply`: a policy whose CA cannot be loaded is refused before it
        // replaces the stored one.
        let trial = authority::load(store.as_ref(), Policy::from_yaml(text)?, now).await;
        if let Some(e) = trial.error {
            return Err(MgmtError::Pki(e));
        }
        policy_source.apply(text).await?;
    }
    let relay = Arc::new(RelayCa::load_or_create(store.as_ref(), now).await?);
    let authority: watch::Receiver<Arc<Authority>> = authority::spawn_loader_from(
        store.clone(),
        policy_source.clone(),
        opts.default_policy.clone(),
        Duration::from_secs(30),
    )
    .await;

    // Serving certificate from the relay CA, renewed at half life without a restart.
    let serving_ttl = Duration::from_secs(7 * 86400);
    let (cert, key) = relay.issue_serving(&opts.hostnames, serving_ttl, now)?;
    let swappable = SwappableCert::new(Identity::new(&cert, &[], &key).certified_key()?);
    {
        let relay = relay.clone();
        let swappable = swappable.clone();
        let names = opts.hostnames.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(serving_ttl / 2).await;
                match relay
                    .issue_serving(&names, serving_ttl, SystemTime::now())
                    .and_then(|(c, k)| Ok(Identity::new(&c, &[], &k).certified_key()?))
                {
                    Ok(ck) => swappable.swap(ck),
                    Err(e) => tracing::error!(error = %e, "renewing the serving certificate failed"),
                }
            }
        });
    }
    let verifier = SpiffeVerifier::new(
        relay.roots(),
        PeerPolicy::UriPrefix(format!("spiffe://{}/", meshca_proto::identity::RELAY_TRUST_DOMAIN)),
        false,
    )?;
    let tls = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(meshca_tls::TlsError::from)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(swappable);
    let tls = grpc::server_config_for_grpc(tls);

    let listener = TcpListener::bind(opts.listen).await.map_err(io(format!("binding {}", opts.listen)))?;
    let addr = listener.local_addr().map_err(io("local address".into()))?;
    if let Some(dir) = &opts.operator_dir {
        write_operator_credentials(dir, &relay, addr, now)?;
    }
    tracing::info!(%addr, "management plane listening");
    on_bound(addr);

    if let Some(m) = opts.metrics_listen {
        let l = TcpListener::bind(m).await.map_err(io(format!("binding {m}")))?;
        tracing::info!(addr = %l.local_addr().map_err(io("local address".into()))?, "metrics listening");
        let state = crate::metrics::MetricsState {
            store: store.clone(),
            authority: authority.clone(),
            report_interval: opts.settings.report_interval,
            token: opts.metrics_token.clone().map(Arc::new),
        };
        let app = axum::Router::new().route("/metrics", axum::routing::get(crate::metrics::handler)).with_state(state);
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
    }
    let (nudge, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        store,
        relay,
        authority,
        limiter: RateLimiter::new(opts.issue_burst, opts.issue_per_minute),
        settings: opts.settings,
        nudge,
        leader: with.leader.clone(),
        policy_source,
    });
    if with.policy_source.is_some() {
        tokio::spawn(publish_status(shared.clone()));
    }
    let router = tonic::transport::Server::builder()
        .add_service(
            RegistrationServer::new(RegistrationService(shared.clone())).max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(CertificateIssuerServer::new(IssuerService(shared.clone())).max_decoding_message_size(MAX_MESSAGE))
        .add_service(OperatorServer::new(OperatorService(shared)).max_decoding_message_size(MAX_MESSAGE));
    let grpc_error = |e| MgmtError::Io { context: "gRPC server".into(), source: std::io::Error::other(e) };
    match with.leader {
        None => {
            router.serve_with_incoming_shutdown(grpc::tls_incoming(listener, tls), shutdown).await.map_err(grpc_error)
        }
        Some(leader) => {
            let incoming = replica::incoming(listener, tls, leader.clone());
            let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
            let stop = async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = replica::lost(leader) => { let _ = lost_tx.send(()); }
                }
            };
            router.serve_with_incoming_shutdown(incoming, stop).await.map_err(grpc_error)?;
            match lost_rx.await {
                Ok(()) => Err(MgmtError::LostLeadership("the lease moved or could not be renewed in time".into())),
                Err(_) => Ok(()),
            }
        }
    }
}

/// Publishes the mesh's status through the policy source (in Kubernetes mode, the
/// RootTrustPolicy's status subresource) every report interval and whenever the authority
/// changes — on the leader only, so replicas do not fight over it.
async fn publish_status(shared: Arc<Shared>) {
    let mut authority = shared.authority.clone();
    loop {
        if replica::is_leader(shared.leader.as_ref()) {
            let auth = authority.borrow_and_update().clone();
            let now = crate::tokens::unix(SystemTime::now());
            match crate::status::collect(shared.store.as_ref(), &auth, now, shared.settings.report_interval).await {
                Ok(st) => {
                    if let Err(e) = shared.policy_source.publish_status(&st, &auth).await {
                        tracing::warn!(error = %e, "publishing the policy status failed; will retry");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "collecting the status failed; will retry"),
            }
        }
        tokio::select! {
            r = authority.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(shared.settings.report_interval) => {}
        }
    }
}
