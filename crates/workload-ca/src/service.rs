//! Istio's `CreateCertificate`, exactly as istio-agent calls it: a PEM CSR, an optional lifetime,
//! a bearer token. The leaf's identity comes from the token, never from the CSR.
//!
//! What a request costs before it is answered, and who pays for it:
//!
//! 1. the caller's address pays one unit of its pre-authentication budget ([`Limits::peer`]) —
//!    a map lookup, so an anonymous flood is refused for almost nothing and never touches the
//!    budget of any identity;
//! 2. it waits for its turn in the admission queue ([`Limits::admission`]): bounded, fair across
//!    addresses, refused at once with a retry hint when full;
//! 3. the token is verified, and the identity it proves pays one unit of its issuance budget
//!    ([`Limits::identity`]);
//! 4. only then is the CSR verified and a leaf signed.
//!
//! Every refusal is `RESOURCE_EXHAUSTED` with a retry hint ([`meshca_serve::pushback`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshca_pki::{CsrPolicy, LeafParams, SpiffeId, TrustDomain, verify_csr};
use meshca_proto::istio::istio_certificate_service_server::IstioCertificateService;
use meshca_proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
use meshca_serve::{Admission, AdmissionConfig, KeyedLimiter, PeerKey, Rate, Refusal, RefusedBy, ServeMetrics};
use tonic::{Request, Response, Status};

use crate::authn::{AuthError, Authenticator, bearer};
use crate::ca::CaHolder;
use crate::metrics::Metrics;

/// Lifetime rules for leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Used when the request asks for none (or ≤ 0).
    pub default: Duration,
    /// Longer requests are clamped to this.
    pub max: Duration,
}

impl Default for TtlPolicy {
    /// Istio's: 24 h by default, 90 days at most.
    fn default() -> Self {
        TtlPolicy { default: Duration::from_secs(24 * 3600), max: Duration::from_secs(90 * 86400) }
    }
}

impl TtlPolicy {
    /// The lifetime for a requested `validity_duration` (seconds).
    pub fn resolve(&self, requested_secs: i64) -> Duration {
        if requested_secs <= 0 { self.default } else { Duration::from_secs(requested_secs as u64).min(self.max) }
    }
}

/// The request limits (docs/architecture.md, "Security defaults"; the sizing is in
/// docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Requests per address before authentication.
    pub peer: Rate,
    /// Requests per authenticated SPIFFE identity.
    pub identity: Rate,
    /// The admission queue.
    pub admission: AdmissionConfig,
}

/// Default pre-authentication budget per address: 20 requests a second, 100 at once.
pub const DEFAULT_PEER_RATE: Rate = Rate::new(20.0, 100);
/// Default issuance budget per identity: 5 a second, 50 at once.
pub const DEFAULT_IDENTITY_RATE: Rate = Rate::new(5.0, 50);
/// Default admission queue: requests waiting in total, and from one address.
pub const DEFAULT_MAX_QUEUED: usize = 1024;
/// Default share of the admission queue one address may hold.
pub const DEFAULT_MAX_QUEUED_PER_PEER: usize = 128;
/// Default longest wait in the admission queue.
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Default requests worked on at once: four per core (a request is CPU-bound, but a TokenReview
/// is a round trip to the API server).
pub fn default_max_in_flight() -> usize {
    4 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            peer: DEFAULT_PEER_RATE,
            identity: DEFAULT_IDENTITY_RATE,
            admission: AdmissionConfig {
                max_in_flight: default_max_in_flight(),
                max_queued: DEFAULT_MAX_QUEUED,
                max_queued_per_key: DEFAULT_MAX_QUEUED_PER_PEER,
                max_wait: DEFAULT_MAX_QUEUE_WAIT,
            },
        }
    }
}

/// The service.
pub struct WorkloadCa {
    /// The CA in service.
    pub ca: Arc<CaHolder>,
    /// Caller authentication.
    pub auth: Arc<dyn Authenticator>,
    /// The mesh trust domain.
    pub trust_domain: TrustDomain,
    /// Leaf lifetimes.
    pub ttl: TtlPolicy,
    /// Keys accepted in CSRs.
    pub csr_policy: CsrPolicy,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    peers: KeyedLimiter<PeerKey>,
    identities: KeyedLimiter<SpiffeId>,
    admission: Admission<PeerKey>,
}

impl WorkloadCa {
    /// A service with `limits`, timed (for the rate limits' refill) by the CA's clock.
    pub fn new(
        ca: Arc<CaHolder>,
        auth: Arc<dyn Authenticator>,
        trust_domain: TrustDomain,
        ttl: TtlPolicy,
        metrics: Arc<Metrics>,
        limits: Limits,
    ) -> Self {
        let clock = ca.clock().clone();
        WorkloadCa {
            ca,
            auth,
            trust_domain,
            ttl,
            csr_policy: CsrPolicy::default(),
            metrics,
            peers: KeyedLimiter::new(limits.peer, clock.clone()),
            identities: KeyedLimiter::new(limits.identity, clock),
            admission: Admission::new(limits.admission),
        }
    }

    /// The admission queue (its state, for metrics and tests).
    pub fn admission(&self) -> &Admission<PeerKey> {
        &self.admission
    }

    fn serve_metrics(&self) -> &ServeMetrics {
        &self.metrics.serve
    }

    fn refuse(&self, by: RefusedBy, message: String, retry_after: Duration) -> Status {
        self.metrics.rate_limited.inc();
        self.serve_metrics().refused(by);
        meshca_serve::resource_exhausted(message, retry_after)
    }

    async fn handle(&self, request: Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, Status> {
        let peer = meshca_serve::peer_key(&request);
        if let Err(wait) = self.peers.check(&peer) {
            return Err(self.refuse(
                RefusedBy::PeerRate,
                format!("{peer} is over its budget of {} requests before authentication", self.peers.rate()),
                wait,
            ));
        }
        let _turn = match self.admission.enter(peer).await {
            Ok(permit) => Turn::new(self, permit),
            Err(refusal) => {
                let by = match refusal {
                    Refusal::WaitedTooLong { .. } => RefusedBy::QueueWait,
                    Refusal::Full { .. } | Refusal::KeyFull { .. } => RefusedBy::QueueFull,
                };
                return Err(self.refuse(by, format!("the workload CA is busy: {refusal}"), refusal.retry_after()));
            }
        };
        let md = request.metadata();
        let authz = md.get("authorization").and_then(|v| v.to_str().ok());
        let cluster_id = md.get("clusterid").and_then(|v| v.to_str().ok()).map(str::to_string);
        let authenticated = match bearer(authz) {
            Ok(token) => self.auth.authenticate(token, cluster_id.as_deref()).await,
            Err(e) => Err(e),
        };
        let who = match authenticated {
            Ok(a) => a.caller,
            Err(e) => {
                self.metrics.auth_failures.inc();
                tracing::info!(reason = %e, %peer, "caller not authenticated");
                return Err(match e {
                    AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
                    _ => Status::unauthenticated(e.to_string()),
                });
            }
        };
        let id = SpiffeId::workload(&self.trust_domain, &who.namespace, &who.service_account).map_err(|e| {
            self.metrics.sign_errors.inc();
            Status::invalid_argument(format!("caller identity: {e}"))
        })?;
        if let Err(wait) = self.identities.check(&id) {
            tracing::info!(%id, %peer, "issuance rate-limited");
            return Err(self.refuse(
                RefusedBy::IdentityRate,
                format!("{id} is over its issuance budget of {}", self.identities.rate()),
                wait,
            ));
        }
        let r = request.into_inner();
        if let Some(m) = &r.metadata
            && m.fields.contains_key("ImpersonatedIdentity")
        {
            self.metrics.sign_errors.inc();
            return Err(Status::permission_denied(
                "impersonation (ImpersonatedIdentity) is not allowed for this caller",
            ));
        }
        let csr = verify_csr(r.csr.as_bytes(), &self.csr_policy).map_err(|e| {
            self.metrics.sign_errors.inc();
            Status::invalid_argument(format!("CSR refused: {e}"))
        })?;
        let ttl = self.ttl.resolve(r.validity_duration);
        let state = self.ca.current();
        let now = self.ca.clock().now();
        let ca = state.bundle.ca_cert();
        if let Some(reason) = &state.revoked {
            self.metrics.sign_errors.inc();
            return Err(Status::unavailable(format!(
                "this cluster's intermediate CA cannot sign: {reason}; the cluster's meshca agent is writing a new one (see `meshca status`)"
            )));
        }
        if ca.not_after() <= now {
            self.metrics.sign_errors.inc();
            return Err(Status::unavailable(format!(
                "this cluster's intermediate CA (serial {}) expired at {}; no certificate can be issued until the cluster's meshca agent writes a new cacerts (see `meshca status`)",
                ca.serial_hex(),
                meshca_pki::chain::rfc3339(ca.not_after())
            )));
        }
        let issued = state
            .bundle
            .signer()
            .sign_leaf(csr.public_key_spki(), &LeafParams::workload(id.clone(), ttl), now)
            .map_err(|e| {
                self.metrics.sign_errors.inc();
                tracing::error!(error = %e, %id, "signing failed");
                Status::failed_precondition(format!("cannot sign: {e}"))
            })?;
        let mut cert_chain = Vec::with_capacity(1 + state.chain_pems.len());
        cert_chain.push(issued.to_pem());
        cert_chain.extend(state.chain_pems.iter().cloned());
        tracing::debug!(%id, serial = %issued.serial_hex, cluster_id = cluster_id.as_deref().unwrap_or(""), "issued workload certificate");
        Ok(IstioCertificateResponse { cert_chain })
    }
}

/// A request's turn in the admission queue, keeping the queue's gauges current.
struct Turn<'a> {
    ca: &'a WorkloadCa,
    permit: Option<meshca_serve::admission::Permit<PeerKey>>,
}

impl<'a> Turn<'a> {
    fn new(ca: &'a WorkloadCa, permit: meshca_serve::admission::Permit<PeerKey>) -> Self {
        let t = Turn { ca, permit: Some(permit) };
        t.publish();
        t
    }

    fn publish(&self) {
        let m = self.ca.serve_metrics();
        m.in_flight.set(i64::try_from(self.ca.admission.in_flight()).unwrap_or(i64::MAX));
        m.queued.set(i64::try_from(self.ca.admission.queued()).unwrap_or(i64::MAX));
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // The turn passes on first, so the gauges show the state after it.
        drop(self.permit.take());
        self.publish();
    }
}

#[tonic::async_trait]
impl IstioCertificateService for WorkloadCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let start = Instant::now();
        self.metrics.csr_count.inc();
        let result = self.handle(request).await;
        if result.is_ok() {
            self.metrics.issued.inc();
            self.metrics.latency.observe(start.elapsed().as_secs_f64());
        }
        result.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use meshca_clock::{Clock, ManualClock};
    use meshca_pki::{CaBundle, CaSigner, IntermediateParams, KeyAlgorithm, PrivateKey, RootParams, RootSet};

    use crate::authn::{ISTIO_CA_AUDIENCE, JwtAuthenticator};
    use crate::idp::DemoIdp;

    /// A workload CA on a `cacerts` directory (root → cluster intermediate, one hour), with a
    /// caller's token and CSR.
    struct Fixture {
        root: CaSigner,
        cert: meshca_pki::Cert,
        dir: tempfile::TempDir,
        metrics: Arc<Metrics>,
        holder: Arc<CaHolder>,
        ca: WorkloadCa,
        token: String,
        csr: String,
    }

    impl Fixture {
        fn new(clock: &ManualClock) -> Fixture {
            let now = clock.now();
            let root = CaSigner::new_root(
                PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("test setup"),
                &RootParams::new("t"),
                now,
            )
            .expect("test setup");
            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("test setup");
            let td = TrustDomain::new("cluster.local").expect("test setup");
            let params = IntermediateParams {
                ttl: Duration::from_secs(3600),
                ..IntermediateParams::cluster("o", "cluster-1", td.clone())
            };
            let cert = root
                .sign_intermediate(key.public_key_spki(), &params, now)
                .expect("test setup")
                .parse()
                .expect("test setup");
            let roots = RootSet::from_certs(vec![root.cert().clone()]).expect("test setup");
            let files = CaBundle::assemble(&key, &cert, &[root.cert().clone()], &roots);
            let dir = tempfile::tempdir().expect("test setup");
            for (name, data) in files.entries() {
                std::fs::write(dir.path().join(name), data).expect("test setup");
            }
            let metrics = Metrics::new();
            let holder = CaHolder::load(dir.path(), metrics.clone(), clock.shared()).expect("test setup");
            let idp = DemoIdp::generate("https://idp.test").expect("test setup");
            let auth = JwtAuthenticator::from_jwks("https://idp.test", &idp.jwks_json(), ISTIO_CA_AUDIENCE)
                .expect("test setup")
                .with_clock(clock.shared());
            let ca = WorkloadCa::new(
                holder.clone(),
                Arc::new(auth),
                td,
                TtlPolicy::default(),
                metrics.clone(),
                Limits::default(),
            );
            let token = idp
                .mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(4 * 3600), now)
                .expect("test setup");
            let csr = meshca_pki::build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("test setup"), &[])
                .expect("test setup");
            Fixture { root, cert, dir, metrics, holder, ca, token, csr }
        }

        fn request(&self) -> Request<IstioCertificateRequest> {
            let mut r =
                Request::new(IstioCertificateRequest { csr: self.csr.clone(), validity_duration: 0, metadata: None });
            r.metadata_mut().insert("authorization", format!("Bearer {}", self.token).parse().expect("test setup"));
            r
        }
    }

    /// The attack: once the cluster intermediate in service had expired, callers learned nothing
    /// but a TLS error. The service itself now answers UNAVAILABLE naming the intermediate and
    /// when it expired (what a caller whose handshake still succeeds — a resumed TLS session, a
    /// client not checking the chain's time — sees), logs it once, and raises
    /// `meshca_workload_ca_intermediate_expired`. A TLS client that checks the serving chain
    /// still fails the handshake: the serving certificate chains through the expired
    /// intermediate, and no certificate it could present would verify.
    #[tokio::test]
    async fn an_expired_intermediate_is_answered_unavailable_with_the_reason_and_flagged_once() {
        let clock = ManualClock::new(std::time::SystemTime::now());
        let f = Fixture::new(&clock);
        f.ca.create_certificate(f.request()).await.expect("signs while the intermediate is valid");
        let gauge = || {
            let text = f.metrics.render();
            text.lines().find(|l| l.starts_with("meshca_workload_ca_intermediate_expired ")).map(str::to_string)
        };
        let mut pending = None;
        f.holder.poll(&mut pending);
        assert_eq!(gauge().as_deref(), Some("meshca_workload_ca_intermediate_expired 0"));

        clock.advance(Duration::from_secs(3601));
        let s = f.ca.create_certificate(f.request()).await.expect_err("nothing can be signed");
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(s.message().contains(&f.cert.serial_hex()) && s.message().contains("expired at"), "{}", s.message());
        f.holder.poll(&mut pending);
        f.holder.poll(&mut pending);
        assert_eq!(gauge().as_deref(), Some("meshca_workload_ca_intermediate_expired 1"));
    }

    /// A CRL from the root naming the intermediate in service, written beside it: from the next
    /// poll nothing is signed with it (UNAVAILABLE naming the serial), and a restart refuses the
    /// directory outright. A CRL from another CA naming the same serial changes nothing.
    #[tokio::test]
    async fn a_revoked_intermediate_signs_nothing_and_is_refused_at_load() {
        use meshca_pki::{CrlParams, Reason, Revoked};
        let clock = ManualClock::new(std::time::SystemTime::now());
        let f = Fixture::new(&clock);
        let now = clock.now();
        let crl_path = f.dir.path().join(meshca_pki::bundle::CA_CRL);
        let listing = |signer: &CaSigner| {
            let revoked =
                vec![Revoked { serial_hex: f.cert.serial_hex(), revoked_at: now, reason: Reason::KeyCompromise }];
            let params = CrlParams { number: 1, this_update: now, next_update: now + Duration::from_secs(60), revoked };
            signer.sign_crl(&params).expect("test setup").to_pem()
        };
        let impostor = CaSigner::new_root(
            PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("test setup"),
            &RootParams::new("t"),
            now,
        )
        .expect("test setup");
        let mut pending = None;
        std::fs::write(&crl_path, listing(&impostor)).expect("test setup");
        f.holder.poll(&mut pending);
        assert!(f.holder.current().revoked.is_none(), "a CRL the issuer did not sign says nothing");
        f.ca.create_certificate(f.request()).await.expect("still signs");

        std::fs::write(&crl_path, listing(&f.root)).expect("test setup");
        assert!(f.holder.poll(&mut pending), "the in-service bundle is marked");
        let s = f.ca.create_certificate(f.request()).await.expect_err("nothing is signed");
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(s.message().contains(&f.cert.serial_hex()) && s.message().contains("revoked"), "{}", s.message());
        match CaHolder::load(f.dir.path(), Metrics::new(), clock.shared()) {
            Err(crate::ca::LoadError::Revoked { reason, .. }) => {
                assert!(reason.contains(&f.cert.serial_hex()), "{reason}")
            }
            Err(e) => panic!("expected a revoked bundle, got {e}"),
            Ok(_) => panic!("expected a revoked bundle to be refused at load"),
        }
    }

    #[test]
    fn lifetimes_follow_istios_rules() {
        let p = TtlPolicy::default();
        assert_eq!(p.resolve(0), Duration::from_secs(86400));
        assert_eq!(p.resolve(-5), Duration::from_secs(86400));
        assert_eq!(p.resolve(3600), Duration::from_secs(3600));
        assert_eq!(p.resolve(365 * 86400), Duration::from_secs(90 * 86400));
    }
}
