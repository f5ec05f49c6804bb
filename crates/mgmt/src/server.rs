//! `meshca server`: wires the store, the authority loader, the relay CA and the gRPC services
//! behind one TLS listener.
//!
//! Every task the server starts (the authority loader, the serving certificate's renewal, the
//! metrics endpoint, the dashboard, the SPIFFE bundle endpoint, the status publisher) runs in one `JoinSet` under one cancellation token,
//! and its connections and calls are owned by [`meshca_serve::GrpcServer`]: when the server
//! stops, the token fires, long-lived trust streams end, calls in flight get
//! [`ServerOptions::serve`]'s drain timeout, and each child gets [`CHILD_GRACE`] more, so
//! nothing outlives [`serve_with`] and it returns within those bounds of the stop signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshca_clock::SharedClock;

use meshca_policy::{Policy, PolicySet};
use meshca_proto::mgmt::{
    certificate_issuer_server::CertificateIssuerServer, operator_server::OperatorServer,
    registration_server::RegistrationServer,
};
use meshca_store::Store;
use meshca_tls::{Identity, PeerPolicy, SpiffeVerifier, SwappableCert, grpc};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::authority;
use crate::error::MgmtError;
use crate::grpc::{IssuerService, Settings, Shared};
use crate::issuer::Issuer;
use crate::loader::{PolicySource, StorePolicy};
use crate::operator::OperatorService;
use crate::ratelimit::RateLimiter;
use crate::registration::RegistrationService;
use crate::relay::RelayCa;
use crate::replica::{self, Leader};
use meshca_serve::{GrpcServer, KeyedLimiter, Rate, ServeConfig};

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
    /// Where the operator's credentials are kept (client certificate, key, relay CA, address):
    /// written on first start, reused while valid, replaced when revoked or near expiry.
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
    /// Requests per address from callers without a client certificate (registration), before
    /// anything else is done with them.
    pub peer_rate: Rate,
    /// Connection caps and timeouts, and the drain on stop.
    pub serve: ServeConfig,
}

/// Default budget per address of calls without a client certificate (registration): 10 a second,
/// 50 at once — far above one cluster's needs (it registers once), far below what would let
/// one address keep the store busy with bootstrap-token lookups.
pub const DEFAULT_PEER_RATE: Rate = Rate::new(10.0, 50);

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
        let id = meshca_tls::Identity::new(&cert, &[], &key);
        meshca_tls::client_config(
            meshca_tls::ServerTrust::Roots(&relay),
            meshca_tls::ClientAuth::Identity(id),
            meshca_tls::Versions::Tls13,
        )
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

/// What Kubernetes mode adds to [`serve`], the time it runs on, and the dashboard. The default is
/// the embedded single-replica server on the system clock, without a dashboard.
pub struct ServeWith {
    /// The policy's source; the store object `meshca/root-trust-policy` when `None`.
    pub policy_source: Option<Arc<dyn PolicySource>>,
    /// The leader election's view; `None` runs as the only replica (always the leader). See
    /// [`crate::replica`] for what followers do.
    pub leader: Option<watch::Receiver<Leader>>,
    /// The clock.
    pub clock: SharedClock,
    /// The web dashboard's listener, when it is served.
    pub dashboard: Option<crate::dashboard::DashboardListener>,
    /// The SPIFFE bundle endpoint's listener and profile, when it is served.
    pub bundle_endpoint: Option<crate::federation::BundleEndpoint>,
}

impl Default for ServeWith {
    fn default() -> Self {
        ServeWith {
            policy_source: None,
            leader: None,
            clock: meshca_clock::system(),
            dashboard: None,
            bundle_endpoint: None,
        }
    }
}

/// How long a stopping server waits for its children (the metrics endpoint, the loader) once
/// the gRPC server has drained.
pub const CHILD_GRACE: Duration = Duration::from_secs(2);

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

/// [`serve`] with a policy source, a leader election (Kubernetes mode) and a clock. Returns
/// [`MgmtError::LostLeadership`] when this replica led and lost its lease.
pub async fn serve_with(
    store: Arc<dyn Store>,
    opts: ServerOptions,
    with: ServeWith,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), MgmtError> {
    meshca_tls::provider::install();
    let clock = with.clock.clone();
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let result = run(store, opts, with, on_bound, shutdown, &cancel, &mut tasks).await;
    // Whatever ended the server, its children end with it.
    cancel.cancel();
    meshca_serve::stop_children(&mut tasks, CHILD_GRACE, "management-plane").await;
    drop(clock);
    result
}

async fn run(
    store: Arc<dyn Store>,
    opts: ServerOptions,
    with: ServeWith,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<(), MgmtError> {
    let clock = with.clock.clone();
    let now = clock.now();
    let policy_source: Arc<dyn PolicySource> =
        with.policy_source.clone().unwrap_or_else(|| Arc::new(StorePolicy::new(store.clone())));
    if let Some(text) = &opts.policy_yaml {
        // Like `meshca policy apply`: a policy whose CA cannot be loaded is refused before it
        // replaces the stored ones.
        let set = PolicySet::from_yaml(text)?;
        for policy in set.policies() {
            if let Some(e) = authority::trial(store.as_ref(), policy, now).await {
                return Err(MgmtError::Pki(format!("policy {}: {e}", policy.name)));
            }
        }
        // Written only when it differs from the stored one: a restart with the same flags
        // writes nothing.
        if policy_source.read().await.ok().flatten().as_ref() != Some(&set) {
            policy_source.apply(text).await?;
        }
    }
    let relay = Arc::new(RelayCa::load_or_create(store.as_ref(), now).await?);
    // One mesh per policy: its loader, its root rotation (which turns the policy's authority
    // into the one in force for its phase), its CRL publisher and federation poller. The issuer,
    // the trust streams, status and metrics all read the meshes' effective authorities.
    let (reported, reported_rx) = watch::channel(0u64);
    let (nudge, _) = watch::channel(0u64);
    let (supervisor, meshes) = crate::meshes::Supervisor::start(crate::meshes::Wiring {
        store: store.clone(),
        source: policy_source.clone(),
        fallback: opts.default_policy.clone(),
        clock: clock.clone(),
        leader: with.leader.clone(),
        report_interval: opts.settings.report_interval,
        crl_ttl: opts.settings.crl_ttl,
        reported: reported_rx,
        nudge: nudge.clone(),
        resync: Duration::from_secs(30),
    })
    .await?;
    tasks.spawn(supervisor.run(cancel.child_token()));

    // Serving certificate from the relay CA, renewed at half life without a restart.
    let serving_ttl = Duration::from_secs(7 * 86400);
    let (cert, key) = relay.issue_serving(&opts.hostnames, serving_ttl, now)?;
    let swappable = SwappableCert::new(Identity::new(&cert, &[], &key).certified_key()?);
    tasks.spawn(renew_serving(
        relay.clone(),
        swappable.clone(),
        opts.hostnames.clone(),
        serving_ttl,
        clock.clone(),
        cancel.child_token(),
    ));
    let verifier = SpiffeVerifier::new(
        relay.roots(),
        PeerPolicy::UriPrefix(format!("spiffe://{}/", meshca_proto::identity::RELAY_TRUST_DOMAIN)),
        false,
    )?;
    let tls = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(meshca_tls::TlsError::from)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(swappable.clone());
    let tls = grpc::server_config_for_grpc(tls);
    let serve_metrics = meshca_serve::ServeMetrics::default();

    let listener = TcpListener::bind(opts.listen).await.map_err(io(format!("binding {}", opts.listen)))?;
    let addr = listener.local_addr().map_err(io("local address".into()))?;
    // The operator's credentials are reused while valid: a restart writes nothing there (so a
    // server whose disk is full still starts), and earlier copies do not pile up valid for a year.
    let local_operator = opts.operator_dir.clone().map(|dir| crate::operators::LocalCredentials { dir, addr });
    if let Some(local) = &local_operator {
        crate::operators::ensure_local(store.as_ref(), &relay, local, now).await?;
    }
    tracing::info!(%addr, "management plane listening");
    on_bound(addr);

    if let Some(m) = opts.metrics_listen {
        let l = TcpListener::bind(m).await.map_err(io(format!("binding {m}")))?;
        tracing::info!(addr = %l.local_addr().map_err(io("local address".into()))?, "metrics listening");
        let state = crate::metrics::MetricsState {
            store: store.clone(),
            meshes: meshes.clone(),
            report_interval: opts.settings.report_interval,
            token: opts.metrics_token.clone().map(Arc::new),
            clock: clock.clone(),
            serve: serve_metrics.clone(),
        };
        let app = axum::Router::new().route("/metrics", axum::routing::get(crate::metrics::handler)).with_state(state);
        let stop = cancel.child_token();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the metrics endpoint failed");
            }
        });
    }
    if let Some(d) = with.dashboard {
        let wiring = crate::dashboard::Wiring {
            store: store.clone(),
            meshes: meshes.clone(),
            report_interval: opts.settings.report_interval,
            clock: clock.clone(),
            relay: relay.clone(),
            serving: swappable.clone(),
        };
        crate::dashboard::spawn(d, wiring, cancel.child_token(), tasks)?;
    }
    if let Some(e) = with.bundle_endpoint {
        let wiring = crate::federation::endpoint::Wiring {
            store: store.clone(),
            meshes: meshes.clone(),
            clock: clock.clone(),
            leader: with.leader.clone(),
        };
        crate::federation::endpoint::spawn(e, wiring, cancel.child_token(), tasks)?;
    }
    let issuer = Issuer::new(
        store.clone(),
        meshes.clone(),
        RateLimiter::new(opts.issue_burst, opts.issue_per_minute, clock.clone()),
        with.leader.clone(),
    );
    let shared = Arc::new(Shared {
        store,
        relay,
        meshes,
        issuer,
        settings: opts.settings,
        nudge,
        peers: KeyedLimiter::new(opts.peer_rate, clock.clone()),
        serve_metrics: serve_metrics.clone(),
        policy_source,
        clock,
        shutdown: cancel.clone(),
        reported,
        local_operator,
    });
    if with.policy_source.is_some() {
        tasks.spawn(publish_status(shared.clone(), with.leader.clone(), cancel.child_token()));
    }
    let routes = tonic::service::Routes::new(
        RegistrationServer::new(RegistrationService(shared.clone())).max_decoding_message_size(MAX_MESSAGE),
    )
    .add_service(CertificateIssuerServer::new(IssuerService(shared.clone())).max_decoding_message_size(MAX_MESSAGE))
    .add_service(OperatorServer::new(OperatorService(shared)).max_decoding_message_size(MAX_MESSAGE));
    // The server drains once `stop` fires: it cancels the token first, so the trust streams
    // (which would otherwise hold their connections open for ever) end and the drain completes.
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    let token = cancel.clone();
    let leader = with.leader.clone();
    let stop = async move {
        match leader {
            None => shutdown.await,
            Some(leader) => tokio::select! {
                _ = shutdown => {}
                _ = replica::lost(leader) => { let _ = lost_tx.send(()); }
            },
        }
        token.cancel();
    };
    let mut server =
        GrpcServer::new(tls, routes, opts.serve, serve_metrics).with_identify(Arc::new(control_plane_identity));
    if let Some(leader) = with.leader {
        server = server.with_router(replica::router(leader));
    }
    server.serve(listener, stop).await;
    match lost_rx.await {
        Ok(()) => Err(MgmtError::LostLeadership("the lease moved or could not be renewed in time".into())),
        Err(_) => Ok(()),
    }
}

/// The control-plane identity (an agent's cluster, an operator) a client certificate proves, so a
/// connection is charged to it rather than to its address once the handshake is done: agents
/// behind one address (a NAT, a follower replica forwarding) are capped each on their own.
fn control_plane_identity(chain: &[rustls::pki_types::CertificateDer<'_>]) -> Option<String> {
    let leaf = meshca_pki::Cert::from_der(chain.first()?.to_vec()).ok()?;
    leaf.uri_sans().iter().find_map(|u| meshca_proto::identity::Caller::from_uri(u)).map(|c| c.to_string())
}

/// Renews the serving certificate at half its life, until cancelled.
async fn renew_serving(
    relay: Arc<RelayCa>,
    swappable: Arc<SwappableCert>,
    names: Vec<String>,
    ttl: Duration,
    clock: SharedClock,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = clock.sleep(ttl / 2) => {}
        }
        match relay
            .issue_serving(&names, ttl, clock.now())
            .and_then(|(c, k)| Ok(Identity::new(&c, &[], &k).certified_key()?))
        {
            Ok(ck) => swappable.swap(ck),
            Err(e) => tracing::error!(error = %e, "renewing the serving certificate failed"),
        }
    }
}

/// Publishes each mesh's status through the policy source (in Kubernetes mode, the status
/// subresource of its RootTrustPolicy) every report interval and whenever an authority changes —
/// on the leader only, so replicas do not fight over it.
async fn publish_status(shared: Arc<Shared>, leader: Option<watch::Receiver<Leader>>, cancel: CancellationToken) {
    let mut meshes = shared.meshes.clone();
    loop {
        if replica::is_leader(leader.as_ref()) {
            let view = meshes.borrow_and_update().clone();
            let now = meshca_clock::unix(shared.clock.now());
            for mesh in view.meshes() {
                match crate::status::collect(shared.store.as_ref(), &view, mesh, now, shared.settings.report_interval)
                    .await
                {
                    Ok(st) => {
                        if let Err(e) = shared.policy_source.publish_status(&st, &mesh.authority()).await {
                            tracing::warn!(error = %e, policy = %mesh.name, "publishing the policy status failed; will retry");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "collecting the status failed; will retry"),
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = meshes.changed() => if r.is_err() { return },
            _ = shared.clock.sleep(shared.settings.report_interval) => {}
        }
    }
}
