//! `meshca workload-ca`: Istio's CA API over TLS, with a serving certificate issued from the
//! cluster intermediate (so a stock Istio client trusting `root-cert.pem` can call it), and
//! Prometheus metrics on a separate, token-protected HTTP port.
//!
//! The reload watcher, the serving certificate's renewal and the metrics endpoint run in one
//! `JoinSet` under one cancellation token, and end with the server. Connections and calls are
//! owned by [`meshca_serve::GrpcServer`]: capped, timed out when idle or slow to handshake, and
//! drained within [`Options::serve`]'s drain timeout when the server stops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_clock::SharedClock;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use meshca_pki::{KeyAlgorithm, LeafParams, PrivateKey, SpiffeId, TrustDomain};
use meshca_proto::istio::istio_certificate_service_server::IstioCertificateServiceServer;
use meshca_serve::{GrpcServer, ServeConfig};
use meshca_tls::{Identity, SwappableCert, grpc};
use tokio::net::TcpListener;

use crate::authn::Authenticator;
use crate::ca::{CaHolder, CaState, LoadError};
use crate::metrics::Metrics;
use crate::service::{Limits, TtlPolicy, WorkloadCa};

/// Largest request accepted: a CSR is a few KB.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Names on istiod's serving certificate, which Istio clients dial.
pub const SERVING_NAMES: [&str; 2] = ["istiod.istio-system.svc", "localhost"];

/// How the workload CA runs.
pub struct Options {
    /// The `cacerts` directory.
    pub cacerts_dir: PathBuf,
    /// The gRPC address.
    pub listen: SocketAddr,
    /// The metrics address (none: no metrics endpoint).
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token required on `/metrics` (none: open, for a loopback-only scrape).
    pub metrics_token: Option<String>,
    /// The mesh trust domain.
    pub trust_domain: TrustDomain,
    /// Caller authentication.
    pub auth: Arc<dyn Authenticator>,
    /// Leaf lifetimes.
    pub ttl: TtlPolicy,
    /// Request limits: per address before authentication, per identity after, and the admission
    /// queue.
    pub limits: Limits,
    /// Connection caps and timeouts, and the drain on stop.
    pub serve: ServeConfig,
    /// The time.
    pub clock: SharedClock,
}

/// Failures that stop the workload CA.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The initial `cacerts` is unusable.
    #[error("cacerts: {0}")]
    Load(#[from] LoadError),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] meshca_tls::TlsError),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(String),
}

/// Issues the serving certificate from the CA in service. (Public for the transport-floor
/// benchmark, `ca-floor`, which must present the same certificate.)
pub fn serving_identity(
    state: &CaState,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<Arc<rustls::sign::CertifiedKey>, ServeError> {
    let signer = state.bundle.signer();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| ServeError::Io(e.to_string()))?;
    let id = SpiffeId::workload(td, "istio-system", "istiod").map_err(|e| ServeError::Io(e.to_string()))?;
    let params = LeafParams {
        identity: Some(id),
        dns_names: SERVING_NAMES.iter().map(|s| s.to_string()).collect(),
        ttl: Duration::from_secs(24 * 3600),
    };
    let leaf = signer
        .sign_leaf(key.public_key_spki(), &params, now)
        .and_then(|i| i.parse().map_err(meshca_pki::IssueError::from))
        .map_err(|e| ServeError::Io(format!("serving certificate: {e}")))?;
    // Send the intermediates, not the root: clients have it.
    let chain = signer.chain();
    let above = &chain[..chain.len().saturating_sub(1)];
    Ok(Identity::new(&leaf, above, &key).certified_key()?)
}

/// The TLS the gRPC server speaks: TLS 1.3 and 1.2, no client certificates (callers prove
/// themselves with tokens), `h2` by ALPN, the serving certificate from `serving`. (Public for
/// the transport-floor benchmark, `ca-floor`, which must speak the same.)
pub fn tls_config(serving: Arc<SwappableCert>) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let tls = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(meshca_tls::TlsError::from)?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    Ok(grpc::server_config_for_grpc(tls))
}

#[derive(Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    token: Option<Arc<String>>,
}

async fn metrics_handler(
    State(s): State<MetricsState>,
    headers: HeaderMap,
) -> (StatusCode, [(axum::http::header::HeaderName, &'static str); 1], String) {
    if let Some(want) = &s.token
        && !meshca_tls::bearer_matches(headers.get("authorization").and_then(|v| v.to_str().ok()), want)
    {
        return (
            StatusCode::UNAUTHORIZED,
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            "a bearer token is required\n".into(),
        );
    }
    (StatusCode::OK, [(axum::http::header::CONTENT_TYPE, meshca_tls::METRICS_CONTENT_TYPE)], s.metrics.render())
}

/// How long a stopping workload CA waits for its children (the reload watcher, the serving
/// certificate's renewal, the metrics endpoint) once its gRPC server has drained.
const CHILD_GRACE: Duration = Duration::from_secs(2);

/// How often the serving certificate is re-issued (it lives 24 h).
const SERVING_RENEWAL: Duration = Duration::from_secs(12 * 3600);

/// Runs until `shutdown`, then drains (within [`Options::serve`]'s drain timeout) and stops its
/// children (within a further 2 s). `on_bound` gets the gRPC and metrics addresses.
pub async fn serve(
    opts: Options,
    metrics: Arc<Metrics>,
    on_bound: impl FnOnce(SocketAddr, Option<SocketAddr>),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    meshca_tls::provider::install();
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let result = run(opts, metrics, on_bound, shutdown, &cancel, &mut tasks).await;
    cancel.cancel();
    meshca_serve::stop_children(&mut tasks, CHILD_GRACE, "workload-CA").await;
    result
}

async fn run(
    opts: Options,
    metrics: Arc<Metrics>,
    on_bound: impl FnOnce(SocketAddr, Option<SocketAddr>),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<(), ServeError> {
    let clock = opts.clock.clone();
    let holder = CaHolder::load(&opts.cacerts_dir, metrics.clone(), clock.clone())?;
    let serving = SwappableCert::new(serving_identity(&holder.current(), &opts.trust_domain, clock.now())?);

    // Reload: new bundle -> new serving certificate; and renew the serving certificate at half life.
    {
        let on_reload = serving.clone();
        let td = opts.trust_domain.clone();
        let reload_clock = clock.clone();
        // A bundle marked revoked signs nothing, not even the serving certificate: the current
        // one stays until the agent writes the new intermediate (clients that check the CRLs
        // refuse it meanwhile; the CA would answer UNAVAILABLE anyway).
        tasks.spawn(holder.clone().watch(
            move |state| match state.revoked {
                Some(_) => {}
                None => match serving_identity(state, &td, reload_clock.now()) {
                    Ok(ck) => on_reload.swap(ck),
                    Err(e) => tracing::error!(error = %e, "re-issuing the serving certificate failed"),
                },
            },
            cancel.child_token(),
        ));
        let serving = serving.clone();
        let holder = holder.clone();
        let td = opts.trust_domain.clone();
        let clock = clock.clone();
        let stop = cancel.child_token();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = clock.sleep(SERVING_RENEWAL) => {}
                }
                let state = holder.current();
                if state.revoked.is_some() {
                    continue;
                }
                match serving_identity(&state, &td, clock.now()) {
                    Ok(ck) => serving.swap(ck),
                    Err(e) => tracing::error!(error = %e, "renewing the serving certificate failed"),
                }
            }
        });
    }

    let tls = tls_config(serving)?;
    let listener =
        TcpListener::bind(opts.listen).await.map_err(|e| ServeError::Io(format!("binding {}: {e}", opts.listen)))?;
    let addr = listener.local_addr().map_err(|e| ServeError::Io(e.to_string()))?;

    let mut metrics_addr = None;
    if let Some(m) = opts.metrics_listen {
        let l = TcpListener::bind(m).await.map_err(|e| ServeError::Io(format!("binding {m}: {e}")))?;
        metrics_addr = Some(l.local_addr().map_err(|e| ServeError::Io(e.to_string()))?);
        let state = MetricsState { metrics: metrics.clone(), token: opts.metrics_token.map(Arc::new) };
        let app = axum::Router::new().route("/metrics", get(metrics_handler)).with_state(state);
        let stop = cancel.child_token();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the metrics endpoint failed");
            }
        });
    }
    tracing::info!(%addr, metrics = ?metrics_addr, cacerts = %opts.cacerts_dir.display(), "workload CA listening");
    on_bound(addr, metrics_addr);

    let service = WorkloadCa::new(holder, opts.auth, opts.trust_domain, opts.ttl, metrics.clone(), opts.limits);
    let routes = tonic::service::Routes::new(
        IstioCertificateServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
    );
    let token = cancel.clone();
    GrpcServer::new(tls, routes, opts.serve, metrics.serve.clone())
        .serve(listener, async move {
            shutdown.await;
            token.cancel();
        })
        .await;
    Ok(())
}
