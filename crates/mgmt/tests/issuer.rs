//! The management plane's domain services in-process, on a manual clock, over a real directory
//! store in a temp dir: the issuer's rules (each denial and its gRPC status), its rate limit
//! refilling with simulated time, bootstrap tokens expiring, and the authority loader keeping the
//! last good CA. No sockets and no sleeping; the gRPC handlers are called as functions where the
//! status a caller sees is the point. The same services over real mutual TLS are tested end to
//! end in `crates/meshca/tests/mgmt_bad_input.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshca_clock::{Clock, ManualClock};
use meshca_mgmt::authority::Capability;
use meshca_mgmt::grpc::{Settings, Shared};
use meshca_mgmt::issuer::{Denied, Issuer};
use meshca_mgmt::loader::{Loader, PolicySource, StorePolicy};
use meshca_mgmt::ratelimit::RateLimiter;
use meshca_mgmt::records::{self, ClusterRecord};
use meshca_mgmt::registration::RegistrationService;
use meshca_mgmt::relay::RelayCa;
use meshca_mgmt::tokens;
use meshca_pki::{CaBundle, Cert, KeyAlgorithm, PrivateKey, RootSet, Usage, build_csr, verify_chain};
use meshca_policy::Policy;
use meshca_proto::IssueReason;
use meshca_proto::mgmt::RegisterRequest;
use meshca_proto::mgmt::registration_server::Registration;
use meshca_store::dir::DirStore;
use meshca_store::sqlite::SqliteStore;
use meshca_store::{Precondition, Store, typed};
use tokio::sync::watch;
use tonic::Code;

struct Plane {
    tmp: tempfile::TempDir,
    clock: ManualClock,
    store: Arc<dyn Store>,
    loader: Loader,
    authority: watch::Receiver<Arc<meshca_mgmt::authority::Authority>>,
    issuer: Issuer,
}

/// The backends the management plane runs on a single machine: the directory tree (writes one
/// object at a time) and SQLite (transactions: an issuance's record and audit entry together).
#[derive(Debug, Clone, Copy)]
enum Backend {
    Dir,
    Sqlite,
}

impl Backend {
    fn open(self, dir: &std::path::Path) -> Arc<dyn Store> {
        match self {
            Backend::Dir => Arc::new(DirStore::open(dir).unwrap()),
            Backend::Sqlite => Arc::new(SqliteStore::open(dir.join("store.db")).unwrap()),
        }
    }
}

fn policy(extra: &str) -> String {
    format!(
        "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  config:\n    generated: {{}}\n  intermediateCertOptions: {{ ttl: 1h }}\n{extra}"
    )
}

impl Plane {
    async fn start(policy_yaml: &str, burst: u32, per_minute: f64) -> Plane {
        Plane::start_on(Backend::Dir, policy_yaml, burst, per_minute).await
    }

    async fn start_on(backend: Backend, policy_yaml: &str, burst: u32, per_minute: f64) -> Plane {
        let tmp = tempfile::tempdir().unwrap();
        let clock = ManualClock::at_2026();
        let store = backend.open(tmp.path());
        let source = Arc::new(StorePolicy::new(store.clone()));
        source.apply(policy_yaml).await.unwrap();
        let fallback = Policy::generated_default(Duration::from_secs(3600));
        let (loader, authority) =
            Loader::start_single(store.clone(), source, fallback, clock.shared(), Duration::from_secs(30)).await;
        let limiter = RateLimiter::new(burst, per_minute, clock.shared());
        let issuer = Issuer::new(
            store.clone(),
            meshca_mgmt::meshes::single(authority.clone(), meshca_mgmt::records::Keyspace::legacy(), None),
            limiter,
            None,
        );
        Plane { tmp, clock, store, loader, authority, issuer }
    }

    /// A bootstrap token for `cluster`, valid for a minute, created by an operator.
    async fn token(&self, cluster: &str) -> Result<tokens::NewToken, meshca_mgmt::MgmtError> {
        tokens::create(
            self.store.as_ref(),
            cluster,
            &Default::default(),
            Duration::from_secs(60),
            "operator test",
            self.clock.now(),
        )
        .await
    }

    async fn register(&self, cluster: &str) {
        let rec = ClusterRecord { name: cluster.into(), registered_at: 1, ..Default::default() };
        typed::put(self.store.as_ref(), &records::cluster(cluster).unwrap(), &rec, Precondition::Absent).await.unwrap();
    }

    async fn issue(&self, cluster: &str, csr: &str) -> Result<meshca_mgmt::issuer::Issued, Denied> {
        self.issuer.issue(cluster, csr, IssueReason::Initial, self.clock.now()).await
    }

    /// The registration service over this plane, with `peer_rate` per address for calls without
    /// a client certificate.
    async fn registration(&self, peer_rate: meshca_serve::Rate) -> RegistrationService {
        let relay = Arc::new(RelayCa::load_or_create(self.store.as_ref(), self.clock.now()).await.unwrap());
        let (nudge, _) = watch::channel(0);
        let (reported, reported_rx) = watch::channel(0);
        // Registration never asks the root rotation anything: no controller.
        drop(reported_rx);
        let limiter = RateLimiter::new(5, 6.0, self.clock.shared());
        RegistrationService(Arc::new(Shared {
            store: self.store.clone(),
            relay,
            meshes: meshca_mgmt::meshes::single(self.authority.clone(), meshca_mgmt::records::Keyspace::legacy(), None),
            issuer: Issuer::new(
                self.store.clone(),
                meshca_mgmt::meshes::single(self.authority.clone(), meshca_mgmt::records::Keyspace::legacy(), None),
                limiter,
                None,
            ),
            settings: Settings::default(),
            nudge,
            policy_source: Arc::new(StorePolicy::new(self.store.clone())),
            clock: self.clock.shared(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            peers: meshca_serve::KeyedLimiter::new(peer_rate, self.clock.shared()),
            serve_metrics: meshca_serve::ServeMetrics::default(),
            reported,
            local_operator: None,
        }))
    }
}

/// A `Register` request from `peer` (as tonic hands it to the service).
fn register_request(token: &str, peer: [u8; 4]) -> tonic::Request<RegisterRequest> {
    let identity_csr = build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &[]).unwrap();
    let mut r = tonic::Request::new(RegisterRequest {
        bootstrap_token: token.into(),
        identity_csr,
        cluster: "cluster-1".into(),
    });
    r.extensions_mut().insert(tonic::transport::server::TcpConnectInfo {
        local_addr: None,
        remote_addr: Some(std::net::SocketAddr::from((peer, 50_000))),
    });
    r
}

fn csr(alg: KeyAlgorithm, cluster: &str) -> (PrivateKey, String) {
    let key = PrivateKey::generate(alg).unwrap();
    let csr = meshca_agent::source::csr_for(&key, "meshca", cluster).unwrap();
    (key, csr)
}

#[tokio::test]
async fn an_issued_intermediate_chains_to_the_root_and_is_recorded_before_the_answer() {
    let p = Plane::start(&policy(""), 5, 6.0).await;
    p.register("cluster-1").await;
    let (key, csr) = csr(KeyAlgorithm::EcdsaP256, "cluster-1");
    let issued = p.issue("cluster-1", &csr).await.unwrap();
    let cert = Cert::from_pem(issued.certificate.as_bytes()).unwrap();
    let chain: Vec<Cert> = issued.chain.iter().map(|c| Cert::from_pem(c.as_bytes()).unwrap()).collect();
    let roots = RootSet::from_pem(issued.root_set.as_bytes()).unwrap();
    verify_chain(&cert, &chain[..chain.len() - 1], &roots, p.clock.now(), Usage::Ca).unwrap();
    CaBundle::validate(&CaBundle::assemble(&key, &cert, &chain, &roots), p.clock.now()).unwrap();
    assert_eq!(cert.subject(), "L=cluster-1,CN=meshca intermediate,O=meshca");
    assert_eq!(issued.generation, p.authority.borrow().generation);
    let log = records::read_issued(p.store.as_ref(), "cluster-1").await.unwrap().unwrap();
    assert_eq!(log.value.records()[0].serial, issued.serial);
    assert_eq!(log.value.records()[0].reason, IssueReason::Initial);
    assert_eq!(log.value.records()[0].issued_at, meshca_clock::unix(p.clock.now()));
}

#[tokio::test]
async fn every_denial_says_why_with_the_right_status() {
    let p = Plane::start(&policy("  clusters: [cluster-1, cluster-2]\n"), 5, 6.0).await;
    p.register("cluster-1").await;
    p.register("cluster-9").await;
    let code = |d: Denied| {
        let s = d.into_status();
        (s.code(), s.message().to_string())
    };
    let (_, good) = csr(KeyAlgorithm::EcdsaP256, "cluster-1");
    let cases = [
        (p.issue("cluster-2", &good).await, Code::PermissionDenied, "cluster cluster-2 is not registered"),
        (p.issue("cluster-9", &good).await, Code::FailedPrecondition, "selected by no RootTrustPolicy"),
        (
            p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP384, "cluster-1").1).await,
            Code::InvalidArgument,
            "intermediate CSR from cluster-1",
        ),
        (
            p.issue("cluster-1", "not a csr").await,
            Code::InvalidArgument,
            "neither a PEM CERTIFICATE REQUEST nor a DER CSR",
        ),
        (
            p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-2").1).await,
            Code::PermissionDenied,
            "names cluster \"cluster-2\"",
        ),
    ];
    for (result, want, needle) in cases {
        let (c, m) = code(result.expect_err(needle));
        assert_eq!(c, want, "{m}");
        assert!(m.contains(needle), "{needle:?} not in {m:?}");
    }
    // A replayed CSR gets nothing the second time: a key is certified once.
    p.issue("cluster-1", &good).await.unwrap();
    let (c, m) = code(p.issue("cluster-1", &good).await.expect_err("replay"));
    assert_eq!(c, Code::AlreadyExists, "{m}");
}

/// Fail closed, on both backends: while the audit log cannot be written (here its head record is
/// corrupt, as a damaged or hand-edited store leaves it) no intermediate and no bootstrap token is
/// handed out, and the caller is told to retry (UNAVAILABLE); once the log can be written again
/// the next issuance is answered and is the only one in the log. What a retry of the refused CSR
/// gets is what `Denied::Unaudited` documents: on SQLite the record and the entry are one
/// transaction, so neither was written and the same CSR is issued; on the directory tree the
/// serial's record was written first and stays, so the same CSR is a replay and a new key is
/// issued.
#[tokio::test]
async fn nothing_is_handed_out_while_the_audit_log_cannot_be_written() {
    use meshca_mgmt::audit;
    for backend in [Backend::Dir, Backend::Sqlite] {
        let p = Plane::start_on(backend, &policy(""), 5, 6.0).await;
        p.register("cluster-1").await;
        let first = p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.unwrap();
        let garbage = meshca_store::Secret::with_data([(typed::RECORD_KEY, b"{ not json".to_vec())]);
        p.store.put(&audit::head_key(), &garbage, Precondition::Any).await.unwrap();

        let (_, refused) = csr(KeyAlgorithm::EcdsaP256, "cluster-1");
        let denied = p.issue("cluster-1", &refused).await.unwrap_err();
        assert!(matches!(denied, Denied::Unaudited { .. }), "{backend:?}: {denied:?}");
        let status = denied.into_status();
        assert_eq!(status.code(), Code::Unavailable, "{backend:?}: {status:?}");
        assert!(
            status.message().contains("the audit log could not be written, so no intermediate was handed out"),
            "{backend:?}: {status:?}"
        );
        let token = p.token("cluster-2").await;
        assert!(token.is_err(), "{backend:?}: a token was shown although its creation is not in the audit log");
        let recorded = issued_serials(&p, "cluster-1").await;

        p.store.delete(&audit::head_key(), Precondition::Any).await.unwrap();
        let issued = match backend {
            Backend::Sqlite => {
                assert_eq!(
                    recorded,
                    std::slice::from_ref(&first.serial),
                    "{backend:?}: the refused serial was recorded"
                );
                p.issue("cluster-1", &refused).await.unwrap()
            }
            Backend::Dir => {
                assert_eq!(recorded.len(), 2, "{backend:?}: the refused serial is in the issued log: {recorded:?}");
                let replay = p.issue("cluster-1", &refused).await.unwrap_err();
                assert!(matches!(replay, Denied::KeyReused(_)), "{backend:?}: {replay:?}");
                p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.unwrap()
            }
        };
        let log = audit::read_log(p.store.as_ref()).await.unwrap();
        audit::verify_anchored(&log.entries, log.head.as_ref()).unwrap();
        let issuances: Vec<&str> = log
            .entries
            .iter()
            .filter(|e| e.action == audit::Action::IntermediateIssued.as_str())
            .map(|e| e.details["serial"].as_str())
            .collect();
        assert_eq!(
            issuances,
            [first.serial.as_str(), issued.serial.as_str()],
            "{backend:?}: the refused issuance has no entry"
        );
        assert_eq!(issued_serials(&p, "cluster-1").await[0], issued.serial, "{backend:?}");
        assert!(log.entries.iter().all(|e| e.action != audit::Action::BootstrapTokenCreated.as_str()), "{backend:?}");
    }
}

/// The serials in a cluster's issued log, newest first.
async fn issued_serials(p: &Plane, cluster: &str) -> Vec<String> {
    let log = records::read_issued(p.store.as_ref(), cluster).await.unwrap();
    log.map(|l| l.value.records().iter().map(|r| r.serial.clone()).collect()).unwrap_or_default()
}

/// A second replica's issuer, on its own instance of `p`'s store (as another process would open it).
fn other_replica(p: &Plane, backend: Backend) -> Issuer {
    let store = match backend {
        Backend::Dir => Arc::new(DirStore::open(p.tmp.path()).unwrap()) as Arc<dyn Store>,
        Backend::Sqlite => Arc::new(SqliteStore::open(p.tmp.path().join("store.db")).unwrap()),
    };
    Issuer::new(
        store,
        meshca_mgmt::meshes::single(p.authority.clone(), meshca_mgmt::records::Keyspace::legacy(), None),
        RateLimiter::new(1000, 1e6, p.clock.shared()),
        None,
    )
}

/// Two replicas sharing one store (a leader whose lease ran out mid-call and its successor) sent
/// the same CSRs at the same moment certify each key once, on both backends: for each CSR one of
/// them answers and the other refuses it as a replay, and the issued log and the audit log hold
/// exactly the serials that were answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sent_the_same_csr_at_once_certify_its_key_once() {
    use meshca_mgmt::audit;
    for backend in [Backend::Dir, Backend::Sqlite] {
        let p = Plane::start_on(backend, &policy(""), 1000, 1e6).await;
        p.register("cluster-1").await;
        let other = other_replica(&p, backend);
        let mut answered = Vec::new();
        for _ in 0..20 {
            let (_, request) = csr(KeyAlgorithm::EcdsaP256, "cluster-1");
            let now = p.clock.now();
            let (a, b) = tokio::join!(
                p.issuer.issue("cluster-1", &request, IssueReason::Initial, now),
                other.issue("cluster-1", &request, IssueReason::Initial, now)
            );
            let (won, lost) = match (a, b) {
                (Ok(i), Err(d)) | (Err(d), Ok(i)) => (i, d),
                (a, b) => {
                    panic!("{backend:?}: not exactly one answer: {:?} / {:?}", a.map(|i| i.serial), b.map(|i| i.serial))
                }
            };
            assert!(matches!(lost, Denied::KeyReused(_)), "{backend:?}: {lost:?}");
            answered.push(won.serial);
        }
        let mut recorded = issued_serials(&p, "cluster-1").await;
        recorded.reverse();
        assert_eq!(recorded, answered, "{backend:?}: the issued log");
        let log = audit::read_log(p.store.as_ref()).await.unwrap();
        audit::verify_anchored(&log.entries, log.head.as_ref()).unwrap();
        let audited: Vec<String> = log
            .entries
            .iter()
            .filter(|e| e.action == audit::Action::IntermediateIssued.as_str())
            .map(|e| e.details["serial"].clone())
            .collect();
        assert_eq!(audited, answered, "{backend:?}: the audit log");
    }
}

/// The issuer keeps each cluster's issued log in memory between issuances; a log another replica
/// has written since is not overwritten from that copy: its records stay, and a key it certified
/// is refused here as a replay.
#[tokio::test]
async fn a_log_written_by_another_replica_is_read_again_not_overwritten() {
    for backend in [Backend::Dir, Backend::Sqlite] {
        let p = Plane::start_on(backend, &policy(""), 1000, 1e6).await;
        p.register("cluster-1").await;
        let other = other_replica(&p, backend);
        let now = p.clock.now();
        let first = p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.unwrap();
        let (_, theirs) = csr(KeyAlgorithm::EcdsaP256, "cluster-1");
        let second = other.issue("cluster-1", &theirs, IssueReason::Initial, now).await.unwrap();
        let replay = p.issue("cluster-1", &theirs).await.expect_err("the other replica certified this key");
        assert!(matches!(replay, Denied::KeyReused(_)), "{backend:?}: {replay:?}");
        let third = p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.unwrap();
        assert_eq!(
            issued_serials(&p, "cluster-1").await,
            [third.serial, second.serial, first.serial],
            "{backend:?}: the issued log, newest first"
        );
    }
}

#[tokio::test]
async fn the_rate_limit_refills_with_simulated_time_per_cluster() {
    let p = Plane::start(&policy(""), 2, 6.0).await;
    p.register("cluster-1").await;
    p.register("cluster-2").await;
    for _ in 0..2 {
        p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.unwrap();
    }
    let d = p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.expect_err("limited");
    assert!(matches!(d, Denied::RateLimited { retry_after, .. } if retry_after == Duration::from_secs(10)), "{d}");
    let s = d.into_status();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("retry in 10s"), "{}", s.message());
    assert_eq!(
        meshca_serve::pushback::retry_after(&s),
        Some(Duration::from_secs(10)),
        "the hint is machine-readable too"
    );
    p.issue("cluster-2", &csr(KeyAlgorithm::EcdsaP256, "cluster-2").1).await.expect("a bucket of its own");
    p.clock.advance(Duration::from_secs(9));
    assert!(p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.is_err());
    p.clock.advance(Duration::from_secs(1));
    p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.expect("refilled after 10 s");
}

#[tokio::test]
async fn a_bootstrap_token_expires_on_the_clock_and_registration_says_so() {
    let p = Plane::start(&policy(""), 5, 6.0).await;
    let service = p.registration(meshca_mgmt::server::DEFAULT_PEER_RATE).await;
    let token = p.token("cluster-1").await.unwrap();
    let identity_csr = || build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &[]).unwrap();
    let request = |token: &str| {
        tonic::Request::new(RegisterRequest {
            bootstrap_token: token.into(),
            identity_csr: identity_csr(),
            cluster: "cluster-1".into(),
        })
    };
    p.clock.advance(Duration::from_secs(61));
    let s = service.register(request(&token.token)).await.expect_err("expired");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("expired at") && s.message().contains("meshca cluster add"), "{}", s.message());

    let fresh = p.token("cluster-1").await.unwrap();
    p.clock.advance(Duration::from_secs(59));
    let id = service.register(request(&fresh.token)).await.expect("within its lifetime").into_inner();
    assert_eq!(id.cluster, "cluster-1");
    let s = service.register(request(&fresh.token)).await.expect_err("single use");
    assert!(s.message().contains("already used"), "{}", s.message());
}

/// Registration is the one call anyone may make, so its address pays before the bootstrap token
/// is looked up: a flood of bad tokens from one address is answered UNAUTHENTICATED for the
/// burst, then RESOURCE_EXHAUSTED with a retry hint; a cluster registering from another address
/// meanwhile succeeds; the flooding address's budget refills on the clock.
#[tokio::test]
async fn a_registration_flood_from_one_address_spends_only_its_own_budget() {
    let p = Plane::start(&policy(""), 5, 6.0).await;
    let service = p.registration(meshca_serve::Rate::new(1.0, 5)).await;
    let attacker = [192, 0, 2, 66];
    for i in 0..30 {
        let s = service.register(register_request("abc.bogus", attacker)).await.expect_err("a bogus token");
        match i {
            0..5 => assert_eq!(s.code(), Code::Unauthenticated, "within the burst, the token is checked"),
            _ => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                assert!(s.message().contains("192.0.2.66"), "{}", s.message());
                assert_eq!(meshca_serve::pushback::retry_after(&s), Some(Duration::from_secs(1)));
            }
        }
    }
    let token = p.token("cluster-1").await.unwrap();
    let id = service.register(register_request(&token.token, [192, 0, 2, 1])).await.expect("another address registers");
    assert_eq!(id.into_inner().cluster, "cluster-1");
    p.clock.advance(Duration::from_secs(1));
    let s = service.register(register_request("abc.bogus", attacker)).await.expect_err("a bogus token");
    assert_eq!(s.code(), Code::Unauthenticated, "refilled");
}

#[tokio::test]
async fn a_refused_policy_changes_nothing_and_a_broken_secret_keeps_the_last_good_ca() {
    let mut p = Plane::start(&policy(""), 5, 6.0).await;
    let first = p.authority.borrow().clone();
    assert!(matches!(first.capability, Capability::Signing(_)));

    // A policy naming a secret that does not exist is stored (as a bad edit would be) but the
    // loader keeps the last good CA in force and says why.
    let source = StorePolicy::new(p.store.clone());
    source.apply(&policy("").replace("generated: {}", "secretRef: { name: missing }")).await.unwrap();
    p.loader.reload().await;
    let now = p.authority.borrow().clone();
    assert!(matches!(now.capability, Capability::Signing(_)), "still signing");
    assert_eq!(now.generation, first.generation, "nothing for agents to react to");
    assert!(now.warning.as_deref().unwrap_or("").contains("meshca/missing: not found"), "{:?}", now.warning);

    // An unparsable one is refused outright: the previous policy stays, with a warning.
    source.apply("kind: [").await.unwrap();
    p.loader.reload().await;
    let now = p.authority.borrow().clone();
    assert_eq!(now.generation, first.generation);
    assert!(now.warning.as_deref().unwrap_or("").contains("refused"), "{:?}", now.warning);

    // A good change moves the generation: every cluster re-issues.
    source.apply(&policy("").replace("ttl: 1h", "ttl: 2h")).await.unwrap();
    p.loader.reload().await;
    let now = p.authority.borrow().clone();
    assert_ne!(now.generation, first.generation);
    assert_eq!(now.policy.intermediate.ttl, Duration::from_secs(7200));
    assert_eq!(now.warning, None);
}

#[tokio::test]
async fn in_vault_mode_the_management_plane_signs_nothing() {
    let vault = "  config:\n    vault: { server: 'https://vault:8200', caPath: pki/root/sign-intermediate, auth: { token: { tokenFile: /t } } }\n";
    let text = policy("").replace("  config:\n    generated: {}\n", vault);
    let p = Plane::start(&text, 5, 6.0).await;
    p.register("cluster-1").await;
    assert!(matches!(p.authority.borrow().capability, Capability::Delegated(_)));
    let d = p.issue("cluster-1", &csr(KeyAlgorithm::EcdsaP256, "cluster-1").1).await.expect_err("vault");
    assert!(matches!(d, Denied::DelegatedToVault), "{d}");
    let rec = ClusterRecord { name: "cluster-1".into(), ..Default::default() };
    let t = meshca_mgmt::grpc::trust_state(&p.authority.borrow(), &rec, &Settings::default());
    let v = t.vault.expect("the Vault block is delivered");
    assert_eq!((v.server.as_str(), v.ca_path.as_str()), ("https://vault:8200", "pki/root/sign-intermediate"));
    assert!(t.root_set.is_empty(), "the root set comes from Vault's chain");
}

/// The running loader follows a policy change in Vault mode (which references no secret to
/// watch) at once, not at its next resync: the clock does not move here.
#[tokio::test]
async fn in_vault_mode_the_running_loader_follows_a_policy_change() {
    let vault = "  config:\n    vault: { server: 'https://vault:8200', caPath: pki/root/sign-intermediate, auth: { token: { tokenFile: /t } } }\n";
    let text = policy("").replace("  config:\n    generated: {}\n", vault);
    let p = Plane::start(&text, 5, 6.0).await;
    let mut rx = p.authority.clone();
    let cancel = tokio_util::sync::CancellationToken::new();
    let loader = tokio::spawn(p.loader.run(cancel.clone()));
    StorePolicy::new(p.store.clone()).apply(&text.replace("caPath: pki/", "caPath: pki2/")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|a| matches!(&a.capability, Capability::Delegated(d) if d.delivery.spec.ca_path == "pki2/root/sign-intermediate")))
        .await
        .expect("the new policy is loaded without waiting for a resync")
        .unwrap();
    cancel.cancel();
    loader.await.unwrap();
}

/// With two RootTrustPolicies, each cluster's intermediate comes from its own mesh's root and
/// names its mesh's trust domain; a cluster both policies select is refused naming both, and a
/// cluster neither selects gets nothing. (The management plane's mesh supervisor, in-process.)
#[tokio::test]
async fn each_cluster_is_issued_by_its_own_mesh() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    let store: Arc<dyn Store> = Arc::new(DirStore::open(tmp.path()).unwrap());
    let source = Arc::new(StorePolicy::new(store.clone()));
    let doc = |name: &str, td: &str, select: &str| {
        format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: {name} }}\nspec:\n  trustDomain: {td}\n  {select}\n  config: {{ generated: {{}} }}\n"
        )
    };
    let set = [
        doc("prod", "prod.example", "clusters: [east-1, clash]"),
        doc("dev", "dev.example", "clusterSelector: { matchLabels: { env: dev } }"),
    ]
    .join("---\n");
    source.apply(&set).await.unwrap();
    let (reported_tx, reported) = watch::channel(0);
    let (nudge, _) = watch::channel(0);
    let (supervisor, view) = meshca_mgmt::meshes::Supervisor::start(meshca_mgmt::meshes::Wiring {
        store: store.clone(),
        source,
        fallback: Policy::generated_default(Duration::from_secs(3600)),
        clock: clock.shared(),
        leader: None,
        report_interval: Duration::from_secs(30),
        crl_ttl: Duration::from_secs(3600),
        reported,
        nudge,
        resync: Duration::from_secs(30),
    })
    .await
    .unwrap();
    let issuer = Issuer::new(store.clone(), view.clone(), RateLimiter::new(5, 6.0, clock.shared()), None);
    for (name, env) in [("east-1", ""), ("dev-1", "dev"), ("clash", "dev"), ("lone", "")] {
        let mut rec = ClusterRecord { name: name.into(), registered_at: 1, ..Default::default() };
        if !env.is_empty() {
            rec.labels.insert("env".into(), env.into());
        }
        typed::put(store.as_ref(), &records::cluster(name).unwrap(), &rec, Precondition::Absent).await.unwrap();
    }
    let v = view.borrow().clone();
    for (cluster, mesh, td) in [("east-1", "prod", "prod.example"), ("dev-1", "dev", "dev.example")] {
        let issued = issuer
            .issue(cluster, &csr(KeyAlgorithm::EcdsaP256, cluster).1, IssueReason::Initial, clock.now())
            .await
            .unwrap();
        let cert = Cert::from_pem(issued.certificate.as_bytes()).unwrap();
        let roots = v.get(mesh).unwrap().authority().roots().unwrap().clone();
        verify_chain(&cert, &[], &roots, clock.now(), Usage::Ca).unwrap();
        assert_eq!(RootSet::from_pem(issued.root_set.as_bytes()).unwrap(), roots, "{cluster}: its own mesh's root set");
        assert!(
            cert.uri_sans().iter().any(|u| u.starts_with(&format!("spiffe://{td}"))),
            "{cluster}: {:?}",
            cert.uri_sans()
        );
        let other = v.meshes().iter().find(|m| m.name != mesh).unwrap().authority().roots().unwrap().clone();
        assert!(
            verify_chain(&cert, &[], &other, clock.now(), Usage::Ca).is_err(),
            "{cluster} is not under the other root"
        );
    }
    let e = issuer
        .issue("clash", &csr(KeyAlgorithm::EcdsaP256, "clash").1, IssueReason::Initial, clock.now())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("selected by RootTrustPolicies dev and prod"), "{e}");
    let e = issuer
        .issue("lone", &csr(KeyAlgorithm::EcdsaP256, "lone").1, IssueReason::Initial, clock.now())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("selected by no RootTrustPolicy"), "{e}");
    drop((supervisor, reported_tx));
}

/// A cluster two policies claim is in neither mesh, so neither mesh's root rotation waits for it
/// (the barrier's `covered`); a cluster of one mesh is covered there only.
#[tokio::test]
async fn a_cluster_two_policies_claim_holds_back_neither_mesh() {
    use meshca_mgmt::authority::{Authority, Capability};
    use meshca_mgmt::meshes::{Mesh, MeshView};
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::open(tmp.path()).unwrap();
    let set = meshca_policy::PolicySet::from_yaml(
        "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: { name: prod }\nspec:\n  trustDomain: prod.example\n  clusters: [east-1, clash]\n  config: { generated: {} }\n---\n\
         apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: { name: dev }\nspec:\n  trustDomain: dev.example\n  clusterSelector: { matchLabels: { env: dev } }\n  config: { generated: {} }\n",
    )
    .unwrap();
    let view = MeshView::new(
        set.policies()
            .iter()
            .map(|p| Mesh {
                name: p.name.clone(),
                keys: records::Keyspace::named(&p.name),
                authority: watch::channel(Arc::new(Authority::new(
                    p.clone(),
                    Capability::Unavailable { reason: "test".into() },
                    None,
                )))
                .1,
                rotation: None,
            })
            .collect(),
    );
    for (name, env) in [("east-1", ""), ("clash", "dev"), ("dev-1", "dev")] {
        let mut rec = ClusterRecord { name: name.into(), registered_at: 1, ..Default::default() };
        if !env.is_empty() {
            rec.labels.insert("env".into(), env.into());
        }
        typed::put(&store, &records::cluster(name).unwrap(), &rec, Precondition::Absent).await.unwrap();
    }
    for (policy, want) in [("prod", vec!["east-1"]), ("dev", vec!["dev-1"])] {
        let reports = meshca_mgmt::convergence::reports(
            &store,
            set.get(policy).unwrap(),
            Some(&view),
            100,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let covered: Vec<&str> = reports.iter().filter(|r| r.covered).map(|r| r.name.as_str()).collect();
        assert_eq!(covered, want, "{policy}");
    }
    // Without the other meshes in view (a single mesh), its own selector decides, as before.
    let alone = meshca_mgmt::convergence::reports(&store, set.get("prod").unwrap(), None, 100, Duration::from_secs(30))
        .await
        .unwrap();
    let covered: Vec<&str> = alone.iter().filter(|r| r.covered).map(|r| r.name.as_str()).collect();
    assert_eq!(covered, ["clash", "east-1"]);
}
