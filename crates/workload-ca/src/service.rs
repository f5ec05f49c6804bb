//! Istio's `CreateCertificate`, exactly as istio-agent calls it: a PEM CSR, an optional lifetime,
//! a bearer token. The leaf's identity comes from the token, never from the CSR.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use meshca_pki::{CsrPolicy, LeafParams, SpiffeId, TrustDomain, verify_csr};
use meshca_proto::istio::istio_certificate_service_server::IstioCertificateService;
use meshca_proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
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
    limiter: Option<DefaultDirectRateLimiter>,
}

impl WorkloadCa {
    /// A service; `max_per_second` of 0 disables the rate limit.
    pub fn new(
        ca: Arc<CaHolder>,
        auth: Arc<dyn Authenticator>,
        trust_domain: TrustDomain,
        ttl: TtlPolicy,
        metrics: Arc<Metrics>,
        max_per_second: u32,
    ) -> Self {
        let limiter = NonZeroU32::new(max_per_second).map(|n| RateLimiter::direct(Quota::per_second(n)));
        WorkloadCa { ca, auth, trust_domain, ttl, csr_policy: CsrPolicy::default(), metrics, limiter }
    }

    async fn handle(&self, request: Request<IstioCertificateRequest>) -> Result<IstioCertificateResponse, Status> {
        // The limit comes first, so a flood of callers (authenticated or not) cannot make the CA
        // spend a token verification (or a TokenReview round trip) per request.
        if let Some(l) = &self.limiter
            && l.check().is_err()
        {
            self.metrics.rate_limited.inc();
            return Err(Status::resource_exhausted(
                "certificate requests are over the configured rate limit; retry shortly",
            ));
        }
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
                tracing::info!(reason = %e, "caller not authenticated");
                return Err(match e {
                    AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
                    _ => Status::unauthenticated(e.to_string()),
                });
            }
        };
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
        let id = SpiffeId::workload(&self.trust_domain, &who.namespace, &who.service_account).map_err(|e| {
            self.metrics.sign_errors.inc();
            Status::invalid_argument(format!("caller identity: {e}"))
        })?;
        let ttl = self.ttl.resolve(r.validity_duration);
        let state = self.ca.current();
        let now = self.ca.clock().now();
        let ca = state.bundle.ca_cert();
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
        let ca = WorkloadCa::new(holder.clone(), Arc::new(auth), td, TtlPolicy::default(), metrics.clone(), 0);
        let token =
            idp.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(4 * 3600), now).expect("test setup");
        let csr = meshca_pki::build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("test setup"), &[])
            .expect("test setup");
        let request = || {
            let mut r =
                Request::new(IstioCertificateRequest { csr: csr.clone(), validity_duration: 0, metadata: None });
            r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("test setup"));
            r
        };
        ca.create_certificate(request()).await.expect("signs while the intermediate is valid");
        let gauge = || {
            let text = metrics.render();
            text.lines().find(|l| l.starts_with("meshca_workload_ca_intermediate_expired ")).map(str::to_string)
        };
        let mut pending = None;
        holder.poll(&mut pending);
        assert_eq!(gauge().as_deref(), Some("meshca_workload_ca_intermediate_expired 0"));

        clock.advance(Duration::from_secs(3601));
        let s = ca.create_certificate(request()).await.expect_err("nothing can be signed");
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(s.message().contains(&cert.serial_hex()) && s.message().contains("expired at"), "{}", s.message());
        holder.poll(&mut pending);
        holder.poll(&mut pending);
        assert_eq!(gauge().as_deref(), Some("meshca_workload_ca_intermediate_expired 1"));
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
