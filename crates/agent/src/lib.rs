//! meshca's agent: one per workload cluster.
//!
//! It registers once with a bootstrap token (then reuses its stored identity), generates the
//! cluster's intermediate key in memory, sends only a CSR, and writes `cacerts` through the store
//! in one atomic update after validating it exactly as istiod would. It renews before expiry
//! (and when the policy, the root set or an operator says so), with a new key each time. When the
//! management plane is unreachable it keeps the current `cacerts`, retries with capped
//! exponential backoff and says so; it never deletes or half-writes `cacerts`.
#![forbid(unsafe_code)]

pub mod identity;
pub mod plan;
pub mod source;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use meshca_pki::bundle::{self, BundleFiles, CaBundle};
use meshca_pki::chain::rfc3339;
use meshca_pki::{Cert, KeyAlgorithm, PrivateKey, RootSet, build_csr};
use meshca_proto::mgmt::certificate_issuer_client::CertificateIssuerClient;
use meshca_proto::mgmt::{ClusterStatus, RenewIdentityRequest, TrustState, WatchTrustRequest};
use meshca_store::{ObjectKey, Precondition, Secret, Store, StoreError};
use meshca_tls::{SwappableCert, grpc};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::identity::AgentIdentity;
use crate::plan::{Current, Decision, Reason, Trust};

/// Label marking objects meshca manages.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshca");
/// Annotation: the policy generation a `cacerts` was issued under.
pub const ANN_GENERATION: &str = "meshca.io/policy-generation";
/// Annotation: the operator rotation counter a `cacerts` answers.
pub const ANN_ROTATE: &str = "meshca.io/rotate-request";
/// Annotation: the serial of the intermediate.
pub const ANN_SERIAL: &str = "meshca.io/serial";
/// Annotation: when the intermediate was issued (unix seconds). Its NotBefore is backdated, so
/// renewal planning measures the lifetime from here.
pub const ANN_ISSUED_AT: &str = "meshca.io/issued-at";

/// Agent failures that stop it (anything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The agent's identity is missing, corrupt, or could not be obtained.
    #[error("agent identity: {0}")]
    Identity(String),
    /// The management plane refused a request for a reason retrying will not fix.
    #[error("management plane refused: {0}")]
    Refused(String),
    /// The management plane could not be reached.
    #[error("management plane unreachable: {0}")]
    Unreachable(String),
    /// The management plane is rate-limiting this cluster; retried after the backoff.
    #[error("management plane rate-limited this cluster: {0}")]
    Throttled(String),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] meshca_tls::TlsError),
    /// A source other than the management plane (Vault) failed; the message names it. Retried
    /// with backoff like any failed issuance.
    #[error("{0}")]
    Upstream(String),
}

impl AgentError {
    /// Classifies a gRPC status: transport-level failures are retryable outages.
    pub fn from_status(s: tonic::Status) -> Self {
        use tonic::Code;
        match s.code() {
            Code::ResourceExhausted => AgentError::Throttled(s.message().to_string()),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                AgentError::Unreachable(format!("{}: {}", code_name(s.code()), s.message()))
            }
            _ => AgentError::Refused(format!("{}: {}", code_name(s.code()), s.message())),
        }
    }
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The cluster this agent serves (must match its identity).
    pub cluster: String,
    /// Management plane `host:port`.
    pub server: String,
    /// TLS server name of the management plane.
    pub server_name: String,
    /// Bootstrap token, needed only for the first start.
    pub bootstrap_token: Option<String>,
    /// The relay CA (PEM), needed only for the first start.
    pub relay_ca: Option<Vec<u8>>,
    /// Where `cacerts` goes.
    pub cacerts: ObjectKey,
    /// Where the agent keeps its identity.
    pub identity: ObjectKey,
    /// Take over a `cacerts` meshca did not write.
    pub adopt_existing: bool,
    /// First retry delay.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl AgentOptions {
    /// Defaults for `cluster` talking to `server`: `istio-system/cacerts`,
    /// `meshca-system/agent-identity`, backoff 1 s → 30 s.
    pub fn new(cluster: &str, server: &str) -> Result<Self, AgentError> {
        Ok(AgentOptions {
            cluster: cluster.to_string(),
            server: server.to_string(),
            server_name: "localhost".into(),
            bootstrap_token: None,
            relay_ca: None,
            cacerts: ObjectKey::new("istio-system", "cacerts")?,
            identity: ObjectKey::new("meshca-system", "agent-identity")?,
            adopt_existing: false,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        })
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// The `cacerts` found in the store.
enum Found {
    /// None yet.
    Absent,
    /// Written by meshca and valid.
    Ours { current: Current, bundle: Box<CaBundle>, version: meshca_store::ResourceVersion },
    /// Written by meshca but no longer valid (expired, corrupt): to be replaced.
    OursInvalid { reason: String, version: meshca_store::ResourceVersion },
    /// Written by someone else.
    Foreign { version: meshca_store::ResourceVersion, roots: Option<RootSet> },
}

async fn read_cacerts(store: &dyn Store, key: &ObjectKey, now: SystemTime) -> Result<Found, AgentError> {
    let Some(v) = store.get(key).await? else { return Ok(Found::Absent) };
    let s = &v.value;
    let files = BundleFiles::from_lookup(|name| s.get(name).map(<[u8]>::to_vec));
    if s.labels.get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1) {
        let roots = RootSet::from_pem(&files.root_cert).ok();
        return Ok(Found::Foreign { version: v.version, roots });
    }
    match CaBundle::validate(&files, now) {
        Ok(bundle) => {
            let ca = bundle.ca_cert();
            let issued_at = s
                .annotations
                .get(ANN_ISSUED_AT)
                .and_then(|t| t.parse::<u64>().ok())
                .map(|t| UNIX_EPOCH + Duration::from_secs(t))
                .filter(|t| *t >= ca.not_before() && *t < ca.not_after());
            let current = Current {
                not_before: issued_at.unwrap_or(ca.not_before()),
                not_after: ca.not_after(),
                generation: s.annotations.get(ANN_GENERATION).cloned().unwrap_or_default(),
                rotate_handled: s.annotations.get(ANN_ROTATE).and_then(|r| r.parse().ok()).unwrap_or(0),
                roots_fingerprint: bundle.roots().fingerprint(),
            };
            Ok(Found::Ours { current, bundle: Box::new(bundle), version: v.version })
        }
        Err(e) => Ok(Found::OursInvalid { reason: e.to_string(), version: v.version }),
    }
}

/// What the agent reports and logs about itself.
#[derive(Debug, Clone, Default)]
struct Health {
    last_error: String,
    last_renewal: i64,
    next_renewal: i64,
    phase: &'static str,
}

struct Agent {
    store: Arc<dyn Store>,
    opts: AgentOptions,
    ident: AgentIdentity,
    client_cert: Arc<SwappableCert>,
    issuer: CertificateIssuerClient<Channel>,
    source: Arc<dyn source::IntermediateSource>,
    health: Health,
    failures: u32,
}

impl Agent {
    fn trust_from(t: &TrustState) -> Trust {
        Trust {
            generation: t.policy_generation.clone(),
            roots_fingerprint: t.root_set_fingerprint.clone(),
            rotate_requests: t.rotate_requests,
            grace_ratio: if t.grace_period_ratio > 0.0 && t.grace_period_ratio < 1.0 {
                t.grace_period_ratio
            } else {
                plan::DEFAULT_GRACE
            },
            enrolled: t.enrolled,
        }
    }

    /// Obtains a new intermediate from the source and writes `cacerts`. The key exists only in
    /// memory until it is written, together with its certificate, in one update.
    async fn issue(&mut self, reason: Reason, trust: &TrustState, found: &Found) -> Result<Cert, AgentError> {
        let key_algorithm: KeyAlgorithm = trust.key_algorithm.parse().unwrap_or_default();
        let obtained =
            self.source.obtain(source::Request { cluster: &self.opts.cluster, key_algorithm, reason, trust }).await?;
        let files = obtained.files;
        // Exactly the checks istiod makes, before anything is written.
        let bundle = CaBundle::validate(&files, SystemTime::now()).map_err(|e| {
            AgentError::Refused(format!("the intermediate obtained is a bundle istiod would refuse: {e}"))
        })?;
        let cert = bundle.ca_cert().clone();
        let previous_roots = match found {
            Found::Ours { bundle, .. } => Some(bundle.roots().clone()),
            Found::Foreign { roots, .. } => roots.clone(),
            _ => None,
        };
        if let Some(old) = previous_roots {
            bundle::check_root_transition(&old, bundle.roots()).map_err(|e| AgentError::Refused(e.to_string()))?;
        }
        let mut secret = Secret::with_data(files.entries().map(|(k, v)| (k.to_string(), v.to_vec())))
            .label(MANAGED_BY.0, MANAGED_BY.1)
            .annotation(ANN_GENERATION, &trust.policy_generation)
            .annotation(ANN_ROTATE, &trust.rotate_requests.to_string())
            .annotation(ANN_SERIAL, &obtained.serial)
            .annotation(ANN_ISSUED_AT, &unix(SystemTime::now()).to_string());
        secret.annotations.insert("meshca.io/cluster".into(), self.opts.cluster.clone());
        let pre = match found {
            Found::Absent => Precondition::Absent,
            Found::Ours { version, .. } | Found::OursInvalid { version, .. } | Found::Foreign { version, .. } => {
                Precondition::Version(version.clone())
            }
        };
        self.store.put(&self.opts.cacerts, &secret, pre).await?;
        Ok(cert)
    }

    async fn report(&mut self) {
        let now = SystemTime::now();
        let found = read_cacerts(self.store.as_ref(), &self.opts.cacerts, now).await;
        let mut st = ClusterStatus {
            phase: self.health.phase.to_string(),
            last_error: self.health.last_error.clone(),
            last_renewal: self.health.last_renewal,
            next_renewal: self.health.next_renewal,
            key_location: self.source.key_location().into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        // The lifetime start reported is the issuance time (NotBefore is backdated), so the
        // management plane's overdue alerts plan with the same numbers as the agent.
        if let Ok(Found::Ours { current, bundle, .. }) = &found {
            st.intermediate_serial = bundle.ca_cert().serial_hex();
            st.intermediate_not_after = unix(current.not_after);
            st.intermediate_not_before = unix(current.not_before);
            st.root_set_fingerprint = current.roots_fingerprint.clone();
            st.policy_generation = current.generation.clone();
        }
        if let Err(e) = self.issuer.report_status(st).await {
            tracing::debug!(error = %e, "status report failed");
        }
    }

    async fn renew_identity(&mut self) -> Result<(), AgentError> {
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| AgentError::Identity(e.to_string()))?;
        let csr = build_csr(&key, &[]).map_err(|e| AgentError::Identity(e.to_string()))?;
        let resp = self
            .issuer
            .renew_identity(RenewIdentityRequest { identity_csr: csr })
            .await
            .map_err(AgentError::from_status)?;
        let next = AgentIdentity::from_response(resp.into_inner(), key)?;
        next.save(self.store.as_ref(), &self.opts.identity).await?;
        self.client_cert.swap(next.tls().certified_key()?);
        tracing::info!(serial = %next.cert.serial_hex(), not_after = %rfc3339(next.cert.not_after()), "agent identity renewed");
        self.ident = next;
        Ok(())
    }
}

/// Obtains the agent's identity: the stored one, or a registration with the bootstrap token.
async fn ensure_identity(
    store: &dyn Store,
    opts: &AgentOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<AgentIdentity, AgentError> {
    if let Some(id) = AgentIdentity::load(store, &opts.identity).await? {
        if id.cluster != opts.cluster {
            return Err(AgentError::Identity(format!(
                "the stored identity is for cluster {}, but this agent is for {}",
                id.cluster, opts.cluster
            )));
        }
        if opts.bootstrap_token.is_some() {
            tracing::info!(cluster = %id.cluster, "already registered; the bootstrap token is not needed and was not used");
        }
        return Ok(id);
    }
    let token = opts.bootstrap_token.as_deref().ok_or_else(|| {
        AgentError::Identity("not registered yet: pass the bootstrap token printed by `meshca cluster add`".into())
    })?;
    let relay = opts.relay_ca.as_deref().ok_or_else(|| {
        AgentError::Identity(
            "not registered yet: pass the relay CA (`--relay-ca`) to verify the management plane".into(),
        )
    })?;
    let mut attempt = 0;
    loop {
        match identity::register(&opts.server, &opts.server_name, relay, token, &opts.cluster).await {
            Ok(id) => {
                if id.cluster != opts.cluster {
                    return Err(AgentError::Identity(format!(
                        "the bootstrap token registers cluster {}, but this agent is for {}",
                        id.cluster, opts.cluster
                    )));
                }
                id.save(store, &opts.identity).await?;
                tracing::info!(cluster = %id.cluster, serial = %id.cert.serial_hex(), "registered with the management plane");
                return Ok(id);
            }
            Err(AgentError::Unreachable(e) | AgentError::Throttled(e)) => {
                let wait = plan::backoff(attempt, opts.backoff_base, opts.backoff_max, jitter());
                attempt += 1;
                tracing::warn!(error = %e, retry_in = ?wait, "management plane unreachable during registration");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return Err(AgentError::Unreachable("shut down before registering".into())),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Keeps a WatchTrust stream open, reconnecting with backoff; publishes the latest state (and
/// `None` while disconnected).
fn spawn_trust_watch(
    mut issuer: CertificateIssuerClient<Channel>,
    opts: AgentOptions,
    tx: watch::Sender<Option<TrustState>>,
    errors: watch::Sender<String>,
) {
    tokio::spawn(async move {
        let mut attempt = 0u32;
        loop {
            match issuer.watch_trust(WatchTrustRequest {}).await {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(state) => {
                                attempt = 0;
                                errors.send_replace(String::new());
                                if tx.send(Some(state)).is_err() {
                                    return;
                                }
                            }
                            Err(s) => {
                                errors.send_replace(AgentError::from_status(s).to_string());
                                break;
                            }
                        }
                    }
                }
                Err(s) => {
                    errors.send_replace(AgentError::from_status(s).to_string());
                }
            }
            if tx.is_closed() {
                return;
            }
            tx.send_replace(None);
            let wait = plan::backoff(attempt, opts.backoff_base, opts.backoff_max, jitter());
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(wait).await;
        }
    });
}

/// Runs the agent until `shutdown` becomes true, with the management plane as the source of
/// intermediates.
pub async fn run(store: Arc<dyn Store>, opts: AgentOptions, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
    run_with(store, opts, None, shutdown).await
}

/// Runs the agent with another source of intermediates (Vault mode); the management plane still
/// supplies the policy's renewal parameters and receives the status.
pub async fn run_with(
    store: Arc<dyn Store>,
    opts: AgentOptions,
    custom: Option<Arc<dyn source::IntermediateSource>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    meshca_tls::provider::install();
    let ident = ensure_identity(store.as_ref(), &opts, &mut shutdown).await?;
    let client_cert = SwappableCert::new(ident.tls().certified_key()?);
    let config = identity::client_config(&ident.relay, Some(client_cert.clone()))?;
    let channel = grpc::channel(&opts.server, config, &opts.server_name)?;
    let issuer = CertificateIssuerClient::new(channel);
    let (trust_tx, mut trust_rx) = watch::channel(None);
    let (err_tx, err_rx) = watch::channel(String::new());
    spawn_trust_watch(issuer.clone(), opts.clone(), trust_tx, err_tx);

    let source: Arc<dyn source::IntermediateSource> =
        custom.unwrap_or_else(|| Arc::new(source::ManagementSource { issuer: issuer.clone() }));
    let mut agent = Agent {
        store,
        opts,
        ident,
        client_cert,
        issuer,
        source,
        health: Health { phase: "Waiting", ..Default::default() },
        failures: 0,
    };
    let mut last_trust: Option<TrustState> = None;
    let mut report_every = Duration::from_secs(30);
    let mut next_report = tokio::time::Instant::now();
    let mut last_logged = String::new();
    let jit = jitter();
    tracing::info!(cluster = %agent.opts.cluster, cacerts = %agent.opts.cacerts, "agent started");

    loop {
        if let Some(t) = trust_rx.borrow_and_update().clone() {
            if t.report_interval_seconds > 0 {
                report_every = Duration::from_secs(t.report_interval_seconds as u64);
            }
            last_trust = Some(t);
        }
        let connected = trust_rx.borrow().is_some();
        let now = SystemTime::now();
        let found = read_cacerts(agent.store.as_ref(), &agent.opts.cacerts, now).await?;
        let current = match &found {
            Found::Ours { current, .. } => Some(current.clone()),
            _ => None,
        };
        let trust = last_trust.as_ref().map(Agent::trust_from);
        let mut wake = tokio::time::Instant::now() + Duration::from_secs(60);

        let blocked = match &found {
            Found::Foreign { .. } if !agent.opts.adopt_existing => Some(format!(
                "{} exists and was not written by meshca; refusing to overwrite it. Start the agent with \
                 --adopt-existing to let meshca replace it (the new root set must contain the old one or be contained in it)",
                agent.opts.cacerts
            )),
            _ => None,
        };
        if let Some(msg) = blocked {
            agent.health.phase = "Waiting";
            agent.health.last_error = msg.clone();
            if last_logged != msg {
                tracing::error!("{msg}");
                last_logged = msg;
            }
        } else {
            let decision = match (&found, &trust) {
                (Found::OursInvalid { reason, .. }, Some(t)) if t.enrolled => {
                    tracing::warn!(%reason, "the current cacerts is no longer valid; replacing it");
                    Decision::IssueNow(Reason::Initial)
                }
                (Found::Foreign { .. }, Some(t)) if t.enrolled => Decision::IssueNow(Reason::Initial),
                _ => plan::decide(current.as_ref(), trust.as_ref(), now, jit),
            };
            match decision {
                Decision::IssueNow(reason) if connected => {
                    agent.health.phase = "Renewing";
                    let trust_state = last_trust.clone().unwrap_or_default();
                    match agent.issue(reason, &trust_state, &found).await {
                        Ok(cert) => {
                            agent.failures = 0;
                            agent.health.last_error.clear();
                            agent.health.last_renewal = unix(SystemTime::now());
                            agent.health.phase = "Ready";
                            last_logged.clear();
                            tracing::info!(
                                reason = reason.as_str(),
                                serial = %cert.serial_hex(),
                                not_after = %rfc3339(cert.not_after()),
                                "cacerts written"
                            );
                            next_report = tokio::time::Instant::now();
                            continue;
                        }
                        Err(e) => {
                            let wait = plan::backoff(
                                agent.failures,
                                agent.opts.backoff_base,
                                agent.opts.backoff_max,
                                jitter(),
                            );
                            agent.failures = agent.failures.saturating_add(1);
                            agent.health.last_error = e.to_string();
                            agent.health.phase = if current.is_some() { "Degraded" } else { "Waiting" };
                            let keep = current
                                .as_ref()
                                .map(|c| format!("keeping the current cacerts (valid until {})", rfc3339(c.not_after)))
                                .unwrap_or_else(|| "no cacerts yet".into());
                            tracing::warn!(error = %e, reason = reason.as_str(), retry_in = ?wait, "could not renew the intermediate; {keep}");
                            wake = tokio::time::Instant::now() + wait;
                        }
                    }
                }
                Decision::IssueNow(reason) => {
                    // Due, but the management plane is not reachable right now.
                    let err = err_rx.borrow().clone();
                    agent.health.phase = if current.is_some() { "Degraded" } else { "Waiting" };
                    agent.health.last_error = if err.is_empty() { "management plane unreachable".into() } else { err };
                    let wait = plan::backoff(agent.failures, agent.opts.backoff_base, agent.opts.backoff_max, jitter());
                    agent.failures = agent.failures.saturating_add(1);
                    let keep = current
                        .as_ref()
                        .map(|c| format!("keeping the current cacerts (valid until {})", rfc3339(c.not_after)))
                        .unwrap_or_else(|| "no cacerts yet".into());
                    if last_logged != agent.health.last_error {
                        tracing::warn!(error = %agent.health.last_error, reason = reason.as_str(), "renewal due but the management plane is unreachable; {keep}; retrying with backoff");
                        last_logged = agent.health.last_error.clone();
                    }
                    wake = tokio::time::Instant::now() + wait;
                }
                Decision::WaitUntil(at) => {
                    agent.health.phase =
                        if connected || agent.health.last_error.is_empty() { "Ready" } else { "Degraded" };
                    agent.health.next_renewal = unix(at);
                    let d = at.duration_since(SystemTime::now()).unwrap_or_default();
                    wake = tokio::time::Instant::now() + d.min(Duration::from_secs(300));
                }
                Decision::Idle => {
                    agent.health.phase = "Waiting";
                }
            }
        }

        if agent.ident.needs_renewal(SystemTime::now())
            && connected
            && let Err(e) = agent.renew_identity().await
        {
            tracing::warn!(error = %e, "renewing the agent identity failed; will retry");
        }

        if tokio::time::Instant::now() >= next_report && connected {
            agent.report().await;
            next_report = tokio::time::Instant::now() + report_every;
        }
        if connected {
            wake = wake.min(next_report.max(tokio::time::Instant::now() + Duration::from_millis(100)));
        }
        tokio::select! {
            _ = shutdown.changed() => {
                tracing::info!("agent stopping; cacerts is left in place");
                return Ok(());
            }
            r = trust_rx.changed() => if r.is_err() { return Ok(()) },
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}
