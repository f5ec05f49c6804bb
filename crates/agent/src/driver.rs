//! The agent's driver: it observes (the trust stream, the `cacerts` object, the clock), asks the
//! [`Runner`] what to do, does it, and tells the runner how it went. The decisions are all in
//! [`crate::runner`] and [`crate::plan`]; here are only the effects.
//!
//! Tasks: the trust stream runs in a `JoinSet` beside the loop, under the same cancellation
//! token; when the agent stops (shutdown, or a fatal error) both end before [`run_with`] returns.

use std::sync::Arc;

use futures::StreamExt;
use meshca_clock::{SharedClock, unix};
use meshca_pki::bundle::{self, CaBundle};
use meshca_pki::chain::rfc3339;
use meshca_pki::{KeyAlgorithm, PrivateKey, build_csr};
use meshca_proto::mgmt::certificate_issuer_client::CertificateIssuerClient;
use meshca_proto::mgmt::{ClusterStatus, RenewIdentityRequest, TrustState, WatchTrustRequest};
use meshca_store::{Precondition, Store};
use meshca_tls::SwappableCert;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::cacerts::{self, Held, Stamp};
use crate::connection::Connection;
use crate::identity::{self, AgentIdentity};
use crate::istiod::{IstiodEffect, IstiodPlan};
use crate::plan::{self, Trust};
use crate::runner::{Effect, Note, Observation, Runner, RunnerConfig, Unwritten};
use crate::source::{self, IntermediateSource, Obtained};
use crate::{AgentError, AgentOptions, Failure, jitter};

/// The trust stream's state, as the loop sees it.
#[derive(Debug, Clone, Default)]
pub struct Link {
    /// The last trust state received (kept across disconnections).
    pub trust: Option<TrustState>,
    /// Whether the stream is up.
    pub connected: bool,
    /// Why it is not, when it is not.
    pub error: String,
}

/// What the agent needs from the management plane besides intermediates: its status reports and
/// its own identity. The gRPC implementation is [`GrpcControlPlane`]; in-process tests use their
/// own.
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync {
    /// Sends a status report.
    async fn report(&self, status: ClusterStatus) -> Result<(), AgentError>;
    /// Whether the agent's identity is at half life at `now`.
    fn identity_due(&self, now: std::time::SystemTime) -> bool;
    /// Renews the agent's identity.
    async fn renew_identity(&self) -> Result<(), AgentError>;
}

/// The management plane over gRPC, with the agent's identity (stored, and swapped into the
/// client's TLS configuration when renewed).
pub struct GrpcControlPlane {
    issuer: Connection,
    store: Arc<dyn Store>,
    identity_key: meshca_store::ObjectKey,
    state: std::sync::Mutex<IdentityState>,
    client_cert: Arc<SwappableCert>,
}

/// The agent's identity as the control plane holds it between renewals.
struct IdentityState {
    /// The identity in use.
    current: Arc<AgentIdentity>,
    /// The key of a renewal whose answer did not arrive: the retry asks for the same key, which
    /// the management plane then certifies again even though it already moved on (see its
    /// `identities` rules). Dropped once a renewal succeeds or is refused outright.
    pending_key: Option<PrivateKey>,
    /// A renewed identity in use whose save to the store failed: saved again before anything
    /// else, so a restart does not come back with the replaced one.
    unsaved: bool,
}

impl GrpcControlPlane {
    fn state(&self) -> std::sync::MutexGuard<'_, IdentityState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl ControlPlane for GrpcControlPlane {
    async fn report(&self, status: ClusterStatus) -> Result<(), AgentError> {
        self.issuer.client().report_status(status).await.map_err(AgentError::rpc("ReportStatus"))?;
        Ok(())
    }

    fn identity_due(&self, now: std::time::SystemTime) -> bool {
        let st = self.state();
        st.unsaved || st.current.needs_renewal(now)
    }

    async fn renew_identity(&self) -> Result<(), AgentError> {
        let unsaved = {
            let st = self.state();
            st.unsaved.then(|| st.current.clone())
        };
        if let Some(id) = unsaved {
            id.save(self.store.as_ref(), &self.identity_key).await?;
            self.state().unsaved = false;
            tracing::info!(serial = %id.cert.serial_hex(), "agent identity saved");
            return Ok(());
        }
        let key = match self.state().pending_key.take() {
            Some(k) => k,
            None => PrivateKey::generate(KeyAlgorithm::EcdsaP256).map_err(|e| AgentError::Identity(e.to_string()))?,
        };
        let csr = build_csr(&key, &[]).map_err(|e| AgentError::Identity(e.to_string()))?;
        let resp = match self.issuer.client().renew_identity(RenewIdentityRequest { identity_csr: csr }).await {
            Ok(r) => r,
            Err(status) => {
                let e = AgentError::rpc("RenewIdentity")(status);
                if e.failure() != Failure::Refused {
                    // The request may have been carried out with its answer lost: retry the same key.
                    self.state().pending_key = Some(key);
                }
                return Err(e);
            }
        };
        let next = Arc::new(AgentIdentity::from_response(resp.into_inner(), key)?);
        // In use at once: the management plane accepts the replaced certificate only briefly.
        self.client_cert.swap(next.tls().certified_key()?);
        self.issuer.reconnect()?;
        let saved = next.save(self.store.as_ref(), &self.identity_key).await;
        {
            let mut st = self.state();
            st.current = next.clone();
            st.unsaved = saved.is_err();
        }
        tracing::info!(serial = %next.cert.serial_hex(), not_after = %rfc3339(next.cert.not_after()), "agent identity renewed; reconnected with it");
        saved
    }
}

/// What the agent's trust is, in planning terms, for an agent whose intermediates come from
/// `source`.
fn trust_of(t: &TrustState, source: &dyn IntermediateSource) -> Trust {
    Trust {
        vault_delegated: t.vault.is_some() && !source.serves_vault_mode(),
        auto_restart: t.auto_restart_pods,
        generation: t.policy_generation.clone(),
        roots_fingerprint: t.root_set_fingerprint.clone(),
        rotate_requests: t.rotate_requests,
        grace_ratio: if t.grace_period_ratio > 0.0 && t.grace_period_ratio < 1.0 {
            t.grace_period_ratio
        } else {
            plan::DEFAULT_GRACE
        },
        enrolled: t.enrolled,
        report_interval: std::time::Duration::from_secs(t.report_interval_seconds.max(0).unsigned_abs()),
        crl_digest: cacerts::crl_digest(&t.crl),
    }
}

/// The serials the CRLs in `ca-crl.pem` list, for the log.
fn listed(crl: &cacerts::CrlFile) -> Vec<String> {
    let crls = crl.pem.as_deref().map(|p| meshca_pki::Crl::parse_pem_bundle(p.as_bytes()).unwrap_or_default());
    crls.unwrap_or_default().iter().flat_map(|c| c.revoked().iter().map(|r| r.serial_hex.clone())).collect()
}

/// An intermediate obtained and validated whose write failed: kept, and written again.
struct Pending {
    bundle: CaBundle,
    files: meshca_pki::BundleFiles,
    crl: cacerts::CrlFile,
    stamp: Stamp,
    plan: Unwritten,
}

/// Obtains the agent's identity: the stored one, or a registration with the bootstrap token.
async fn ensure_identity(
    store: &dyn Store,
    opts: &AgentOptions,
    cancel: &CancellationToken,
) -> Result<Option<AgentIdentity>, AgentError> {
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
        return Ok(Some(id));
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
                return Ok(Some(id));
            }
            Err(e) if e.failure() != Failure::Refused => {
                let wait = plan::backoff(attempt, opts.backoff_base, opts.backoff_max, jitter());
                attempt += 1;
                tracing::warn!(error = %e, retry_in = ?wait, "management plane unreachable during registration");
                tokio::select! {
                    _ = opts.clock.sleep(wait) => {}
                    _ = cancel.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Keeps a WatchTrust stream open, reconnecting with backoff, and publishes its state. When the
/// connection is replaced (a renewed identity), the stream moves to the new one at once.
async fn watch_trust(mut conn: Connection, opts: AgentOptions, tx: watch::Sender<Link>, cancel: CancellationToken) {
    let mut attempt = 0u32;
    loop {
        let mut issuer = conn.client_and_mark();
        let error = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = conn.replaced() => {
                tracing::info!("moving the trust stream to the connection with the renewed identity");
                attempt = 0;
                continue;
            }
            e = stream_once(&mut issuer, &tx, &mut attempt) => e,
        };
        if tx.borrow().connected {
            tracing::warn!(%error, "lost the trust stream to the management plane; reconnecting");
        }
        tx.send_modify(|l| {
            l.connected = false;
            l.error = error.clone();
        });
        let wait = plan::backoff(attempt, opts.backoff_base, opts.backoff_max, jitter());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = opts.clock.sleep(wait) => {}
        }
    }
}

/// One WatchTrust stream, until it fails; returns why.
async fn stream_once(
    issuer: &mut CertificateIssuerClient<Channel>,
    tx: &watch::Sender<Link>,
    attempt: &mut u32,
) -> String {
    let mut stream = match issuer.watch_trust(WatchTrustRequest {}).await {
        Ok(resp) => resp.into_inner(),
        Err(s) => return AgentError::rpc("WatchTrust")(s).to_string(),
    };
    loop {
        match stream.next().await {
            Some(Ok(state)) => {
                *attempt = 0;
                tx.send_modify(|l| {
                    l.trust = Some(state);
                    l.connected = true;
                    l.error.clear();
                });
            }
            Some(Err(s)) => return AgentError::rpc("WatchTrust")(s).to_string(),
            None => return "management plane unreachable: the trust stream ended".into(),
        }
    }
}

/// Runs the agent until `shutdown` fires, with the management plane as the source of
/// intermediates.
pub async fn run(store: Arc<dyn Store>, opts: AgentOptions, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_with(store, opts, None, shutdown).await
}

/// Runs the agent with another source of intermediates (Vault mode); the management plane still
/// supplies the policy's renewal parameters and receives the status.
pub async fn run_with(
    store: Arc<dyn Store>,
    opts: AgentOptions,
    custom: Option<Arc<dyn IntermediateSource>>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    meshca_tls::provider::install();
    let Some(ident) = ensure_identity(store.as_ref(), &opts, &shutdown).await? else { return Ok(()) };
    let client_cert = SwappableCert::new(ident.tls().certified_key()?);
    let config = identity::client_config(&ident.relay, Some(client_cert.clone()))?;
    let issuer = Connection::new(&opts.server, &opts.server_name, config)?;
    let (link_tx, link_rx) = watch::channel(Link::default());
    let cancel = shutdown.child_token();
    let mut tasks = JoinSet::new();
    tasks.spawn(watch_trust(issuer.clone(), opts.clone(), link_tx, cancel.clone()));
    let source: Arc<dyn IntermediateSource> =
        custom.unwrap_or_else(|| Arc::new(source::ManagementSource { issuer: issuer.clone() }));
    let control = Arc::new(GrpcControlPlane {
        issuer,
        store: store.clone(),
        identity_key: opts.identity.clone(),
        state: std::sync::Mutex::new(IdentityState { current: Arc::new(ident), pending_key: None, unsaved: false }),
        client_cert,
    });
    let result = drive(store, &opts, source, control, link_rx, cancel.clone()).await;
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    result
}

/// The agent's loop on its own: what [`run_with`] runs once the identity and the connections
/// are set up. `link` is the trust stream's state. Returns when `cancel` fires.
pub async fn drive(
    store: Arc<dyn Store>,
    opts: &AgentOptions,
    source: Arc<dyn IntermediateSource>,
    control: Arc<dyn ControlPlane>,
    link: watch::Receiver<Link>,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    let mut runner = Runner::new(
        RunnerConfig {
            backoff_base: opts.backoff_base,
            backoff_max: opts.backoff_max,
            adopt_existing: opts.adopt_existing,
            cacerts: opts.cacerts.to_string(),
        },
        jitter(),
    );
    if let Some(istiod) = &opts.istiod {
        runner = runner.with_istiod(IstiodPlan::new(istiod.deployment(), opts.backoff_base, opts.backoff_max));
    }
    let driver = Driver {
        runner,
        clock: opts.clock.clone(),
        store,
        opts: opts.clone(),
        control,
        source,
        held: Held::Absent,
        pending: None,
        logged: String::new(),
        own_writes: Default::default(),
        expired_logged: None,
        upstream: Upstream::default(),
        crl_problem: String::new(),
        federated_written: None,
    };
    driver.run(link, cancel).await
}

struct Driver {
    runner: Runner,
    clock: SharedClock,
    store: Arc<dyn Store>,
    opts: AgentOptions,
    control: Arc<dyn ControlPlane>,
    source: Arc<dyn IntermediateSource>,
    held: Held,
    pending: Option<Pending>,
    /// The last error logged, so a persisting condition is logged once, not on every pass.
    logged: String,
    /// The versions of `cacerts` this agent wrote last (the newest is the one held).
    own_writes: std::collections::VecDeque<meshca_store::ResourceVersion>,
    /// The serial of the intermediate in service whose expiry was logged (once).
    expired_logged: Option<String>,
    /// The CRLs the source's upstream publishes itself (Vault's PKI), when it does.
    upstream: Upstream,
    /// Why the last `ca-crl.pem` built was left out (empty: it was written, or none is published).
    crl_problem: String,
    /// The federated bundles last written ([`crate::federated`]); `None` before the first write.
    federated_written: Option<Vec<meshca_proto::mgmt::FederatedBundle>>,
}

/// CRLs fetched from the source's upstream (Vault) rather than sent by the management plane.
#[derive(Default)]
struct Upstream {
    /// `Some(false)` once the source said it has none of its own; `None` before it was asked.
    own: Option<bool>,
    /// The last CRLs fetched (PEM).
    pem: String,
    /// When to fetch them again.
    next_fetch: Option<std::time::SystemTime>,
    /// The last fetch error logged, so a persisting one is logged once; empty once a fetch
    /// succeeds. Non-empty is what the report's `upstream_crl_unavailable` says (an alert).
    logged: String,
}

impl Driver {
    /// Why `ca-crl.pem` is missing or stale, for the status report: the last fetch of the
    /// upstream's CRL failed, or the last one built would not satisfy istiod.
    fn crl_note(&self) -> String {
        if !self.upstream.logged.is_empty() {
            return format!("the upstream CRL cannot be read: {}", self.upstream.logged);
        }
        self.crl_problem.clone()
    }
}

/// How many of its own writes the agent remembers to recognise stale watch events.
const OWN_WRITES_KEPT: usize = 8;

impl Driver {
    async fn run(mut self, mut link: watch::Receiver<Link>, cancel: CancellationToken) -> Result<(), AgentError> {
        tracing::info!(cluster = %self.opts.cluster, cacerts = %self.opts.cacerts, "agent started");
        let mut changes = self.store.watch(&self.opts.cacerts);
        // The watch yields the current state first.
        let first = changes.next().await.unwrap_or(Ok(None));
        self.held = Held::classify(first, self.clock.now());
        loop {
            let l = link.borrow_and_update().clone();
            if let Some(t) = &l.trust {
                self.fetch_upstream_crls(t).await;
            }
            let trust = l.trust.as_ref().map(|t| {
                let mut plan = trust_of(t, self.source.as_ref());
                plan.crl_digest = cacerts::crl_digest(self.published(t));
                plan
            });
            let now = self.clock.now();
            self.note_expiry(now);
            let step = self.runner.step(&Observation {
                now,
                held: &self.held,
                unwritten: self.pending.as_ref().map(|p| &p.plan),
                trust: trust.as_ref(),
                connected: l.connected,
                link_error: &l.error,
                identity_due: self.control.identity_due(now),
                jitter: jitter(),
            });
            match step.note {
                Some(Note::Foreign) => {
                    let msg = self.runner.last_error().to_string();
                    self.log_once(tracing::Level::ERROR, "cacerts is not meshca's", &msg);
                }
                Some(Note::DueButUnreachable) => {
                    let msg = self.runner.last_error().to_string();
                    let keep = self.keep_text();
                    self.log_once(
                        tracing::Level::WARN,
                        &format!("a new intermediate is due but the management plane is unreachable; {keep}; retrying with backoff"),
                        &msg,
                    );
                }
                None => {}
            }
            let mut again = false;
            for effect in step.effects {
                match effect {
                    Effect::Issue(reason) => again |= self.issue(reason, l.trust.as_ref()).await,
                    Effect::DropUnwritten => self.pending = None,
                    Effect::RetryWrite => again |= self.retry_write().await,
                    Effect::Reread => self.reread().await,
                    Effect::RenewIdentity => self.renew_identity().await,
                    Effect::Report => self.report(trust.as_ref()).await,
                    Effect::Istiod(e) => again |= self.istiod(e).await,
                    Effect::WriteCrl => again |= self.write_crl(l.trust.as_ref()).await,
                }
            }
            if let Some(t) = &l.trust {
                self.write_federated(&t.federated_bundles).await;
            }
            if self.opts.once && matches!(self.held, Held::Ours { .. }) {
                tracing::info!("cacerts is in place; stopping as asked (--once)");
                return Ok(());
            }
            if again {
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    tracing::info!("agent stopping; cacerts is left in place");
                    return Ok(());
                }
                r = link.changed() => if r.is_err() { return Ok(()) },
                change = changes.next() => self.observe(change),
                _ = self.clock.sleep_until(step.wake) => {}
            }
        }
    }

    /// A change of the `cacerts` object; validated only when its version differs from the one
    /// held (the agent's own writes come back through the watch too).
    fn observe(
        &mut self,
        change: Option<Result<Option<meshca_store::Versioned<meshca_store::Secret>>, meshca_store::StoreError>>,
    ) {
        let Some(change) = change else { return };
        if let (Ok(Some(v)), Some(held)) = (&change, self.held.version())
            && &v.version == held
        {
            return;
        }
        // A read the watch began before one of this agent's own later writes can finish after
        // it: an older version of ours is stale, not a change.
        if let Ok(Some(v)) = &change
            && self.own_writes.contains(&v.version)
        {
            return;
        }
        self.held = Held::classify(change, self.clock.now());
        match &self.held {
            Held::OursInvalid { reason, .. } => {
                tracing::warn!(%reason, "the current cacerts is no longer valid; replacing it");
            }
            Held::Foreign { .. } => {
                tracing::warn!(cacerts = %self.opts.cacerts, "cacerts was replaced by another writer")
            }
            Held::Absent => tracing::warn!(cacerts = %self.opts.cacerts, "cacerts was deleted; writing a new one"),
            _ => {}
        }
    }

    /// Logs `msg` with `error` unless the same error was the last one logged. Errors are
    /// compared without the file-system paths in them: the directory store names the data
    /// directory of each attempt, which differs every time.
    fn log_once(&mut self, level: tracing::Level, msg: &str, error: &str) {
        let key = without_paths(error);
        if self.logged == key {
            return;
        }
        self.logged = key;
        if level == tracing::Level::ERROR {
            tracing::error!(error = %error, "{msg}");
        } else {
            tracing::warn!(error = %error, "{msg}");
        }
    }

    fn keep_text(&self) -> String {
        match self.held.current() {
            Some(c) if c.not_after <= self.clock.now() => {
                format!("the cacerts in place expired at {}", rfc3339(c.not_after))
            }
            Some(c) => format!("keeping the current cacerts (valid until {})", rfc3339(c.not_after)),
            None => "no valid cacerts in place".into(),
        }
    }

    /// Logs, once per intermediate, that the one in service has expired: from then on the
    /// workload CA can sign nothing, and the TLS handshakes of its callers fail (its serving
    /// certificate chains through the expired intermediate). The status report keeps naming it,
    /// so the management plane raises its `IntermediateExpired` alert (and metric).
    fn note_expiry(&mut self, now: std::time::SystemTime) {
        let expired = match &self.held {
            Held::Ours { current, bundle, .. } if current.not_after <= now => {
                Some((bundle.ca_cert().serial_hex(), current.not_after))
            }
            Held::OursInvalid { lapsed: Some(l), .. } => Some((l.serial.clone(), l.current.not_after)),
            _ => None,
        };
        match expired {
            Some((serial, at)) if self.expired_logged.as_ref() != Some(&serial) => {
                tracing::error!(
                    %serial,
                    expired_at = %rfc3339(at),
                    cacerts = %self.opts.cacerts,
                    "the cluster intermediate in service has EXPIRED: no workload certificate can be issued until a new one is written; retrying"
                );
                self.expired_logged = Some(serial);
            }
            Some(_) => {}
            None => self.expired_logged = None,
        }
    }

    /// Obtains, validates and writes a new intermediate. Returns whether to step again at once.
    async fn issue(&mut self, reason: meshca_proto::IssueReason, trust: Option<&TrustState>) -> bool {
        let Some(trust) = trust else { return false };
        match self.obtain(reason, trust).await {
            Ok(pending) => {
                self.note_crl(&pending.crl);
                self.pending = Some(pending);
                self.retry_write().await
            }
            Err(e) => {
                let error = e.to_string();
                let wait = self.runner.failed(error.clone(), self.clock.now(), jitter());
                // Logged once per distinct error (a persisting one would otherwise repeat every
                // backoff period for as long as it lasts); every attempt at debug level. The
                // attempts in a row are in the status report and `meshca status`.
                let keep = self.keep_text();
                let attempts = self.runner.failures();
                tracing::debug!(%error, %reason, attempts, retry_in = ?wait, "could not obtain a new intermediate");
                self.log_once(
                    tracing::Level::WARN,
                    &format!("could not obtain a new intermediate ({reason}); {keep}; retrying with backoff"),
                    &error,
                );
                false
            }
        }
    }

    async fn obtain(&self, reason: meshca_proto::IssueReason, trust: &TrustState) -> Result<Pending, AgentError> {
        let key_algorithm: KeyAlgorithm = meshca_policy::key_algorithm_from_wire(trust.key_algorithm)?;
        let Obtained { files, serial } =
            self.source.obtain(source::Request { cluster: &self.opts.cluster, key_algorithm, reason, trust }).await?;
        let now = self.clock.now();
        // Exactly the checks istiod makes, before anything is written.
        let bundle = CaBundle::validate(&files, now).map_err(AgentError::BadBundle)?;
        if let Some(old) = self.held.roots() {
            bundle::check_root_transition(old, bundle.roots()).map_err(AgentError::RootTransition)?;
        }
        let stamp = Stamp {
            cluster: self.opts.cluster.clone(),
            generation: trust.policy_generation.clone(),
            rotate_requests: trust.rotate_requests,
            serial,
            issued_at: now,
        };
        let plan = Unwritten { current: cacerts::planned(&bundle, &stamp) };
        let crl = self.crl_for(&bundle, trust, now);
        Ok(Pending { bundle, files, crl, stamp, plan })
    }

    /// The CRLs published above the cluster intermediate: the source's own (Vault's), or the
    /// management plane's.
    fn published<'a>(&'a self, trust: &'a TrustState) -> &'a str {
        if self.upstream.own == Some(true) { &self.upstream.pem } else { &trust.crl }
    }

    /// Fetches the source's own CRLs (Vault's) when it has them and they are due: at start, then
    /// every half CRL lifetime, so a revocation made in Vault reaches `ca-crl.pem` within that.
    async fn fetch_upstream_crls(&mut self, trust: &TrustState) {
        let now = self.clock.now();
        if self.upstream.own == Some(false) || self.upstream.next_fetch.is_some_and(|at| now < at) {
            return;
        }
        let every = cacerts::crl_ttl(trust.crl_ttl_seconds) / 2;
        self.upstream.next_fetch = Some(now + every);
        match self.source.upstream_crls(trust).await {
            None => self.upstream.own = Some(false),
            Some(Ok(pem)) => {
                self.upstream.own = Some(true);
                self.upstream.pem = pem;
                if !self.upstream.logged.is_empty() {
                    self.upstream.logged.clear();
                    self.runner.report_now();
                }
            }
            Some(Err(e)) => {
                // The CRLs fetched last stay in use (an empty set at first: no ca-crl.pem).
                self.upstream.own = Some(true);
                let error = e.to_string();
                if self.upstream.logged != error {
                    tracing::warn!(%error, retry_in = ?every, "reading the upstream CRL failed; ca-crl.pem keeps the last one read");
                    self.upstream.logged = error;
                    self.runner.report_now();
                }
            }
        }
    }

    /// `ca-crl.pem` for `bundle` with what is published above it ([`Driver::note_crl`] keeps why
    /// there is none).
    fn crl_for(&self, bundle: &CaBundle, trust: &TrustState, now: std::time::SystemTime) -> cacerts::CrlFile {
        cacerts::crl_file(bundle, self.published(trust), cacerts::crl_ttl(trust.crl_ttl_seconds), now)
    }

    /// Remembers why `file` has no `ca-crl.pem` (logged and reported once per reason).
    fn note_crl(&mut self, file: &cacerts::CrlFile) {
        let problem = file.problem.clone().unwrap_or_default();
        if problem == self.crl_problem {
            return;
        }
        if !problem.is_empty() {
            tracing::warn!(%problem, "writing no ca-crl.pem: istiod would refuse the bundle with this one");
        }
        self.crl_problem = problem;
        self.runner.report_now();
    }

    /// Writes the bundle held again with a new `ca-crl.pem`. Returns whether to step again.
    async fn write_crl(&mut self, trust: Option<&TrustState>) -> bool {
        let (Some(trust), Held::Ours { bundle, current, version, .. }) = (trust, &self.held) else { return false };
        let now = self.clock.now();
        let crl = self.crl_for(bundle, trust, now);
        let (files, stamp) = cacerts::rewrite(bundle, current, &self.opts.cluster);
        let secret = cacerts::secret(&files, &crl, &stamp);
        let version = version.clone();
        self.note_crl(&crl);
        match self.store.put(&self.opts.cacerts, &secret, Precondition::Version(version)).await {
            Ok(version) => {
                tracing::info!(listed = ?listed(&crl), "ca-crl.pem written");
                self.runner.crl_written();
                self.remember_write(version.clone());
                if let Held::Ours { version: v, crl: c, .. } = &mut self.held {
                    *v = version;
                    *c = crl.held;
                }
                true
            }
            Err(e) => {
                let error = AgentError::Store(e).to_string();
                let wait = self.runner.failed(error.clone(), now, jitter());
                tracing::debug!(%error, retry_in = ?wait, "writing ca-crl.pem failed");
                self.log_once(tracing::Level::WARN, "writing ca-crl.pem failed; retrying with backoff", &error);
                let read = self.store.get(&self.opts.cacerts).await;
                self.held = Held::classify(read, self.clock.now());
                false
            }
        }
    }

    /// Writes the federated bundles when they differ from the last written (removes the object
    /// when there are none). A failure is logged and retried on the next pass.
    async fn write_federated(&mut self, bundles: &[meshca_proto::mgmt::FederatedBundle]) {
        if self.federated_written.as_deref() == Some(bundles) {
            return;
        }
        let key = match meshca_store::ObjectKey::new(self.opts.cacerts.namespace(), crate::federated::OBJECT) {
            Ok(k) => k,
            Err(e) => {
                return self.log_once(tracing::Level::ERROR, "the federated bundles cannot be named", &e.to_string());
            }
        };
        let written = match crate::federated::secret(bundles) {
            Err(e) => return self.log_once(tracing::Level::WARN, "federated bundles refused; the last ones stay", &e),
            Ok(Some(secret)) => self.store.put(&key, &secret, Precondition::Any).await.map(|_| ()),
            Ok(None) => match self.store.delete(&key, Precondition::Any).await {
                Err(meshca_store::StoreError::NotFound(_)) => Ok(()),
                other => other,
            },
        };
        match written {
            Ok(()) => {
                let domains: Vec<&str> = bundles.iter().map(|b| b.trust_domain.as_str()).collect();
                tracing::info!(object = %key, ?domains, "federated bundles written");
                self.federated_written = Some(bundles.to_vec());
            }
            // No federation, and none written by this agent: the removal of a leftover object is
            // tried once (an agent whose RBAC predates federation must not fail or retry here).
            Err(e) if bundles.is_empty() && self.federated_written.is_none() => {
                tracing::debug!(object = %key, error = %e, "no federated bundles; removing a leftover object failed");
                self.federated_written = Some(Vec::new());
            }
            Err(e) => {
                self.log_once(tracing::Level::WARN, "writing the federated bundles failed; will retry", &e.to_string())
            }
        }
    }

    fn remember_write(&mut self, version: meshca_store::ResourceVersion) {
        if self.own_writes.len() == OWN_WRITES_KEPT {
            self.own_writes.pop_front();
        }
        self.own_writes.push_back(version);
    }

    /// Writes the pending intermediate. Returns whether to step again at once.
    async fn retry_write(&mut self) -> bool {
        let Some(p) = self.pending.take() else { return false };
        let secret = cacerts::secret(&p.files, &p.crl, &p.stamp);
        let pre = match self.held.version() {
            Some(v) => Precondition::Version(v.clone()),
            None => Precondition::Absent,
        };
        match self.store.put(&self.opts.cacerts, &secret, pre).await {
            Ok(version) => {
                let ca = p.bundle.ca_cert();
                tracing::info!(
                    serial = %ca.serial_hex(),
                    not_after = %rfc3339(ca.not_after()),
                    "cacerts written"
                );
                self.runner.issued(self.clock.now());
                self.remember_write(version.clone());
                self.held = cacerts::written(p.bundle, &p.stamp, &p.crl, version);
                self.logged.clear();
                true
            }
            Err(e) => {
                let e = AgentError::Store(e);
                let error = e.to_string();
                let wait = self.runner.failed(error.clone(), self.clock.now(), jitter());
                let keep = self.keep_text();
                let attempts = self.runner.failures();
                tracing::debug!(%error, attempts, retry_in = ?wait, "writing cacerts failed");
                self.log_once(
                    tracing::Level::WARN,
                    &format!(
                        "writing cacerts failed; the intermediate obtained (serial {}) is kept in memory and its write retried with backoff, no new one is asked for; {keep}",
                        p.stamp.serial
                    ),
                    &error,
                );
                // A conflict means someone else wrote: look again before the next attempt.
                if matches!(e, AgentError::Store(meshca_store::StoreError::Conflict { .. })) {
                    let read = self.store.get(&self.opts.cacerts).await;
                    self.held = Held::classify(read, self.clock.now());
                }
                self.pending = Some(p);
                false
            }
        }
    }

    async fn reread(&mut self) {
        let read = self.store.get(&self.opts.cacerts).await;
        match read {
            Err(e) => {
                let error = e.to_string();
                let wait =
                    self.runner.failed(format!("reading {}: {error}", self.opts.cacerts), self.clock.now(), jitter());
                self.log_once(tracing::Level::WARN, &format!("reading cacerts failed; retrying in {wait:?}"), &error);
                self.held = Held::Unreadable { error };
            }
            ok => {
                self.runner.reread();
                self.held = Held::classify(ok, self.clock.now());
            }
        }
    }

    async fn renew_identity(&mut self) {
        match self.control.renew_identity().await {
            Ok(()) => self.runner.identity_renewed(),
            Err(e) => {
                let wait = self.runner.identity_failed(self.clock.now(), jitter());
                tracing::warn!(error = %e, retry_in = ?wait, "renewing the agent identity failed; will retry");
            }
        }
    }

    /// Reads or patches istiod's Deployment. Returns whether to step again at once.
    async fn istiod(&mut self, effect: IstiodEffect) -> bool {
        let Some(control) = self.opts.istiod.clone() else { return false };
        let now = self.clock.now();
        let outcome = match &effect {
            IstiodEffect::Read => control.read().await.map(|found| {
                if let Some(p) = self.runner.istiod_mut() {
                    p.observed(now, found);
                }
            }),
            IstiodEffect::Restart { serial } => control.restart(serial, now).await.map(|()| {
                tracing::info!(deployment = %control.deployment(), %serial, "istiod restarted for the new intermediate");
                if let Some(p) = self.runner.istiod_mut() {
                    p.restarted(now, serial);
                }
            }),
            IstiodEffect::Sidecar { present } => control.sidecar(*present).await.map(|()| {
                let what = if *present { "added to" } else { "removed from" };
                tracing::info!(deployment = %control.deployment(), "the Vault agent sidecar {what} istiod");
                if let Some(p) = self.runner.istiod_mut() {
                    p.sidecar_applied(*present);
                }
            }),
        };
        match outcome {
            Ok(()) => {
                // A change of state is worth reporting at once.
                self.runner.report_now();
                true
            }
            Err(problem) => {
                let message = problem.to_string();
                let wait =
                    self.runner.istiod_mut().map(|p| p.failed(now, effect, problem, jitter())).unwrap_or_default();
                self.log_once(
                    tracing::Level::ERROR,
                    &format!(
                        "cannot wire istiod ({}); cacerts is unaffected; retrying in {wait:?}",
                        control.deployment()
                    ),
                    &message,
                );
                self.runner.report_now();
                false
            }
        }
    }

    async fn report(&mut self, trust: Option<&Trust>) {
        let r = &self.runner;
        let mut st = ClusterStatus {
            phase: r.phase() as i32,
            last_error: r.last_error().to_string(),
            last_renewal: r.last_renewal().map(unix).unwrap_or(0),
            next_renewal: r.next_renewal().map(unix).unwrap_or(0),
            key_location: self.source.key_location().as_str().into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            consecutive_failures: r.failures(),
            foreign_cacerts: r.foreign(),
            istiod: r.istiod().map(IstiodPlan::status),
            istiod_only: trust.is_some_and(|t| t.vault_delegated),
            crl_note: self.crl_note(),
            upstream_crl_unavailable: !self.upstream.logged.is_empty(),
            ..Default::default()
        };
        // The lifetime start reported is the issuance time (NotBefore is backdated), so the
        // management plane's overdue alerts plan with the same numbers as the agent.
        // An expired intermediate still in place is reported too, so the management plane
        // alerts on it.
        let in_place = match &self.held {
            Held::Ours { current, bundle, .. } => Some((bundle.ca_cert().serial_hex(), current, Some(bundle))),
            Held::OursInvalid { lapsed: Some(l), .. } => Some((l.serial.clone(), &l.current, None)),
            _ => None,
        };
        if let Some((serial, current, bundle)) = in_place {
            st.intermediate_serial = serial;
            st.intermediate_not_after = unix(current.not_after);
            st.intermediate_not_before = unix(current.not_before);
            st.root_set_fingerprint = current.roots_fingerprint.clone();
            st.policy_generation = current.generation.clone();
            // What a root rotation's barrier checks: the root this cluster signs under, and
            // the certificate that signed its intermediate (an expired one signs nothing).
            if let Some(bundle) = bundle {
                let signer = bundle.signer();
                st.chain_root_fingerprint = signer.root().fingerprint();
                st.intermediate_issuer_fingerprint = signer.chain().get(1).map(|c| c.fingerprint()).unwrap_or_default();
            }
        }
        if let Err(e) = self.control.report(st).await {
            tracing::debug!(error = %e, "status report failed");
        }
    }
}

/// `error` with every word that looks like a file-system path (it contains a `/` and a `..v`
/// data-directory name, or starts with `/`) replaced by `<path>`, so two failures of the same
/// kind compare equal.
fn without_paths(error: &str) -> String {
    error
        .split(' ')
        .map(|w| if w.starts_with('/') || w.contains("/..") { "<path>" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_differing_only_in_their_paths_compare_equal() {
        let a =
            "store: /agent/istio-system/cacerts/..v0000000003_ab12/ca-cert.pem: No space left on device (os error 28)";
        let b =
            "store: /agent/istio-system/cacerts/..v0000000004_cd34/ca-cert.pem: No space left on device (os error 28)";
        assert_eq!(super::without_paths(a), super::without_paths(b));
        assert_ne!(super::without_paths(a), super::without_paths("store: Permission denied"));
        assert_eq!(super::without_paths("Unavailable: connection refused"), "Unavailable: connection refused");
    }
}
