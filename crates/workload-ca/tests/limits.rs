//! In process, on a manual clock: the workload CA's request limits, called the way tonic calls
//! the service (a `Request` carrying the connection's address), with a real `cacerts` bundle,
//! real ES256 tokens from the demo issuer and real P-256 CSRs.
//!
//! - an anonymous flood from one address spends that address's pre-authentication budget only:
//!   a real workload on another address keeps getting certificates, and its identity's issuance
//!   budget is untouched;
//! - one identity's issuance budget runs out and refills on the clock, other identities unaffected;
//! - a herd (every request held at once): bounded in-flight and queued work, everything over it
//!   answered RESOURCE_EXHAUSTED with a retry hint at once, every request answered — none dropped,
//!   none left hanging — and a quiet address served ahead of a noisy one's queue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_clock::{Clock as _, ManualClock, SharedClock};
use meshca_pki::{CaBundle, CaSigner, IntermediateParams, KeyAlgorithm, PrivateKey, RootParams, RootSet, TrustDomain};
use meshca_proto::istio::IstioCertificateRequest;
use meshca_proto::istio::istio_certificate_service_server::IstioCertificateService;
use meshca_serve::pushback::retry_after;
use meshca_serve::{AdmissionConfig, Rate, RefusedBy};
use meshca_workload_ca::authn::{AuthError, Authenticated, Authenticator};
use meshca_workload_ca::ca::CaHolder;
use meshca_workload_ca::service::{Limits, WorkloadCa};
use meshca_workload_ca::{DemoIdp, ISTIO_CA_AUDIENCE, JwtAuthenticator, Metrics, TtlPolicy};
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::transport::server::TcpConnectInfo;

const ISSUER: &str = "https://idp.meshca.test/limits";

/// A cluster intermediate under a fresh root, written as a plain `cacerts` directory.
fn write_cacerts(dir: &Path, now: SystemTime) {
    let root =
        CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("t"), now).unwrap();
    let roots = RootSet::from_certs(vec![root.cert().clone()]).unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let params = IntermediateParams::cluster("t", "cluster-1", TrustDomain::new("cluster.local").unwrap());
    let cert = root.sign_intermediate(key.public_key_spki(), &params, now).unwrap().parse().unwrap();
    let files = CaBundle::assemble(&key, &cert, root.chain(), &roots);
    for (name, data) in files.entries() {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

/// Holds every token verification until the test lets it through: a herd that arrives at once.
struct Gated<A> {
    inner: A,
    gate: Arc<Semaphore>,
}

#[async_trait::async_trait]
impl<A: Authenticator> Authenticator for Gated<A> {
    async fn authenticate(&self, token: &str, cluster_id: Option<&str>) -> Result<Authenticated, AuthError> {
        self.gate.acquire().await.expect("the gate stays open").forget();
        self.inner.authenticate(token, cluster_id).await
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    idp: DemoIdp,
    csr: String,
    metrics: Arc<Metrics>,
    ca: Arc<WorkloadCa>,
}

impl Fixture {
    /// A workload CA with `limits`; with `gate`, every token check waits for a permit from it.
    fn new(limits: Limits, gate: Option<Arc<Semaphore>>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(SystemTime::now());
        let shared: SharedClock = clock.shared();
        write_cacerts(dir.path(), clock.now());
        let metrics = Metrics::new();
        let holder = CaHolder::load(dir.path(), metrics.clone(), shared.clone()).unwrap();
        let idp = DemoIdp::generate(ISSUER).unwrap();
        let jwt = JwtAuthenticator::from_jwks(ISSUER, &idp.jwks_json(), ISTIO_CA_AUDIENCE).unwrap().with_clock(shared);
        let auth: Arc<dyn Authenticator> = match gate {
            Some(gate) => Arc::new(Gated { inner: jwt, gate }),
            None => Arc::new(jwt),
        };
        let td = TrustDomain::new("cluster.local").unwrap();
        let ca = Arc::new(WorkloadCa::new(holder, auth, td, TtlPolicy::default(), metrics.clone(), limits));
        let csr = meshca_pki::build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &[]).unwrap();
        Fixture { _dir: dir, clock, idp, csr, metrics, ca }
    }

    fn token(&self, sa: &str) -> String {
        self.idp.mint("default", sa, ISTIO_CA_AUDIENCE, Duration::from_secs(3600), self.clock.now()).unwrap()
    }

    /// A request as tonic hands it to the service: from `peer`, with `token` (if any).
    fn request(&self, peer: [u8; 4], token: Option<&str>) -> tonic::Request<IstioCertificateRequest> {
        request(&self.csr, peer, token)
    }
}

fn request(csr: &str, peer: [u8; 4], token: Option<&str>) -> tonic::Request<IstioCertificateRequest> {
    let mut r = tonic::Request::new(IstioCertificateRequest { csr: csr.into(), validity_duration: 0, metadata: None });
    r.extensions_mut().insert(TcpConnectInfo { local_addr: None, remote_addr: Some(SocketAddr::from((peer, 40_000))) });
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

const ATTACKER: [u8; 4] = [10, 0, 0, 66];
const WORKLOAD: [u8; 4] = [10, 0, 0, 1];

fn limits(peer: Rate, identity: Rate) -> Limits {
    Limits { peer, identity, ..Limits::default() }
}

/// An anonymous flood (no token, then a forged token) from one address: after that address's
/// burst, each request is RESOURCE_EXHAUSTED with a retry hint — refused before its token is
/// looked at (the authentication-failure counter stops moving). Meanwhile a real workload on
/// another address gets every certificate it asks for, and its identity's whole issuance burst is
/// still there afterwards: the flood never touched it. The attacker's budget refills on the clock.
#[tokio::test]
async fn an_anonymous_flood_spends_only_its_own_addresss_budget() {
    let f = Fixture::new(limits(Rate::new(2.0, 10), Rate::new(1.0, 5)), None);
    let forger = DemoIdp::generate(ISSUER).unwrap();
    let forged = forger.mint("default", "sleep", ISTIO_CA_AUDIENCE, Duration::from_secs(3600), f.clock.now());
    let forged = forged.unwrap();
    let real = f.token("sleep");
    let mut refused = 0;
    for i in 0..200 {
        let token = if i % 2 == 0 { None } else { Some(forged.as_str()) };
        match f.ca.create_certificate(f.request(ATTACKER, token)).await {
            Err(s) if s.code() == Code::Unauthenticated => assert!(i < 10, "request {i} reached authentication"),
            Err(s) if s.code() == Code::ResourceExhausted => {
                refused += 1;
                assert!(s.message().contains("10.0.0.66"), "{}", s.message());
                let hint = retry_after(&s).expect("a retry hint");
                assert!(hint > Duration::ZERO && hint <= Duration::from_millis(500), "2/s: {hint:?}");
            }
            other => panic!("request {i}: {other:?}"),
        }
        // The real workload, interleaved with the flood, is served every time (5 in its burst).
        if i % 50 == 0 {
            let chain =
                f.ca.create_certificate(f.request(WORKLOAD, Some(&real))).await.expect("the real workload is served");
            assert_eq!(chain.into_inner().cert_chain.len(), 3);
        }
    }
    assert_eq!(refused, 190, "all but the burst of 10");
    assert_eq!(f.metrics.auth_failures.get(), 10, "only the burst reached the token check");
    assert_eq!(f.metrics.serve.refused_count(RefusedBy::PeerRate), 190);
    // The identity's budget (burst 5) was charged only by its own 4 requests.
    f.ca.create_certificate(f.request(WORKLOAD, Some(&real))).await.expect("the fifth of its burst");
    let s = f.ca.create_certificate(f.request(WORKLOAD, Some(&real))).await.expect_err("the sixth is over");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("spiffe://cluster.local/ns/default/sa/sleep"), "{}", s.message());
    // The attacker's address refills at 2/s.
    f.clock.advance(Duration::from_secs(1));
    let s = f.ca.create_certificate(f.request(ATTACKER, None)).await.expect_err("no token");
    assert_eq!(s.code(), Code::Unauthenticated, "refilled: the request reaches authentication again");
}

/// One identity's issuance budget: its burst, then RESOURCE_EXHAUSTED naming it with a hint of
/// exactly the refill time; another identity on the same address is unaffected; after the clock
/// moves by the hint, one more certificate. (Was an end-to-end test sleeping 1.1 s.)
#[tokio::test]
async fn an_identitys_issuance_budget_runs_out_and_refills_on_the_clock() {
    let f = Fixture::new(limits(Rate::UNLIMITED, Rate::new(0.5, 3)), None);
    let sleep = f.token("sleep");
    for _ in 0..3 {
        f.ca.create_certificate(f.request(WORKLOAD, Some(&sleep))).await.expect("within the burst");
    }
    let s = f.ca.create_certificate(f.request(WORKLOAD, Some(&sleep))).await.expect_err("over the burst");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(retry_after(&s), Some(Duration::from_secs(2)), "one every 2 s: {}", s.message());
    assert!(s.message().contains("retry in 2s"), "{}", s.message());
    let other = f.token("httpbin");
    f.ca.create_certificate(f.request(WORKLOAD, Some(&other))).await.expect("another identity has its own budget");
    f.clock.advance(Duration::from_millis(1999));
    assert!(f.ca.create_certificate(f.request(WORKLOAD, Some(&sleep))).await.is_err(), "not yet");
    f.clock.advance(Duration::from_millis(1));
    f.ca.create_certificate(f.request(WORKLOAD, Some(&sleep))).await.expect("refilled");
    assert_eq!(f.metrics.serve.refused_count(RefusedBy::IdentityRate), 2);
}

/// A herd: 60 workloads (30 addresses, two each, distinct identities) ask at once while every
/// token check is held. At most 4 are worked on and at most 10 wait (4 per address); everyone
/// else is answered RESOURCE_EXHAUSTED with a retry hint at once, while the first 14 are still
/// held. When the checks are let through, the 14 get certificates. Every one of the 60 requests
/// is answered — none dropped, none hanging — and the queue never held more than its bound.
#[tokio::test]
async fn a_herd_is_bounded_refused_with_a_hint_and_never_left_hanging() {
    let gate = Arc::new(Semaphore::new(0));
    let admission = AdmissionConfig {
        max_in_flight: 4,
        max_queued: 10,
        max_queued_per_key: 4,
        max_wait: Duration::from_secs(3600),
    };
    let f = Fixture::new(Limits { peer: Rate::UNLIMITED, identity: Rate::UNLIMITED, admission }, Some(gate.clone()));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..60u8 {
        let (ca, req) = (f.ca.clone(), f.request([10, 1, 0, i / 2], Some(&f.token(&format!("sa-{i}")))));
        calls.spawn(async move { ca.create_certificate(req).await.map(|r| r.into_inner().cert_chain.len()) });
    }
    // Everyone over the bounds is answered while the gate is still shut.
    let mut exhausted = 0;
    while exhausted < 46 {
        let answer = tokio::time::timeout(Duration::from_secs(30), calls.join_next())
            .await
            .expect("a refusal came at once, not after a wait")
            .expect("calls are pending")
            .unwrap();
        let s = answer.expect_err("nothing is issued while the gate is shut");
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        let hint = retry_after(&s).expect("a retry hint");
        assert!(hint >= Duration::from_millis(50) && hint <= Duration::from_secs(60), "{hint:?}");
        exhausted += 1;
    }
    assert_eq!((f.ca.admission().in_flight(), f.ca.admission().queued()), (4, 10), "the bounds hold");
    assert_eq!(calls.len(), 14);
    gate.add_permits(1000);
    let mut issued = 0;
    while let Some(answer) =
        tokio::time::timeout(Duration::from_secs(30), calls.join_next()).await.expect("every held request is answered")
    {
        assert_eq!(answer.unwrap().expect("issued once its turn came"), 3);
        issued += 1;
    }
    assert_eq!((issued, exhausted), (14, 46), "every request answered exactly once");
    assert_eq!(f.ca.admission().queued_high_water(), 10, "memory: never more than the bound waited");
    assert_eq!((f.ca.admission().in_flight(), f.ca.admission().queued()), (0, 0));
    assert_eq!(f.metrics.serve.refused_count(RefusedBy::QueueFull), 46);
}

/// Fair queueing: while one address's herd fills the queue, a request from a quiet address is
/// served within one round of turns — not behind the herd — and a request that cannot get its turn within the
/// longest wait is refused with a hint rather than left until the client's deadline.
#[tokio::test(start_paused = true)]
async fn a_quiet_address_is_served_ahead_of_a_noisy_ones_queue_and_no_one_waits_past_the_bound() {
    let gate = Arc::new(Semaphore::new(0));
    let admission =
        AdmissionConfig { max_in_flight: 1, max_queued: 50, max_queued_per_key: 50, max_wait: Duration::from_secs(5) };
    let f = Fixture::new(Limits { peer: Rate::UNLIMITED, identity: Rate::UNLIMITED, admission }, Some(gate.clone()));
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut calls = tokio::task::JoinSet::new();
    let noisy = [10, 2, 0, 1];
    let quiet = [10, 2, 0, 2];
    for (i, peer) in (0..8).map(|i| (i, noisy)).chain([(100, quiet)]) {
        let (ca, req, order) = (f.ca.clone(), f.request(peer, Some(&f.token(&format!("sa-{i}")))), order.clone());
        calls.spawn(async move {
            let r = ca.create_certificate(req).await;
            order.lock().unwrap().push((i, r.as_ref().map(|_| ()).map_err(|s| s.code())));
            r.map(drop)
        });
        tokio::task::yield_now().await;
    }
    // Let one check through at a time: the first of the herd holds the only slot, then the turn
    // goes round the addresses.
    for _ in 0..3 {
        gate.add_permits(1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let served: Vec<i32> = order.lock().unwrap().iter().filter(|(_, r)| r.is_ok()).map(|(i, _)| *i).collect();
    // Round-robin over addresses: the herd's address had the first two turns (it was in line
    // first), the quiet one the third — not the ninth.
    assert_eq!(served, [0, 1, 100], "the quiet address is not served behind the herd");
    // The rest of the herd waits; past the longest wait each is refused, with a hint (one more
    // holds the slot, stuck at the gate until it opens).
    tokio::time::sleep(Duration::from_secs(6)).await;
    gate.add_permits(100);
    while let Some(r) = calls.join_next().await {
        if let Err(s) = r.unwrap() {
            assert_eq!(s.code(), Code::ResourceExhausted);
            assert!(s.message().contains("waited too long"), "{}", s.message());
            assert!(retry_after(&s).is_some());
        }
    }
    assert_eq!(f.metrics.serve.refused_count(RefusedBy::QueueWait), 5);
    assert_eq!((f.ca.admission().in_flight(), f.ca.admission().queued()), (0, 0));
}
