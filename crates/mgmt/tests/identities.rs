//! Which control-plane certificates the management plane accepts, attacked in-process: the real
//! server (`meshca_mgmt::serve_with`) on 127.0.0.1 with real mutual TLS, its store in a temp dir,
//! on a manual clock that starts at the real time (rustls checks certificate validity against the
//! real clock; every step here stays within the two minutes NotBefore is backdated), and in-test
//! gRPC clients presenting the certificates an attacker would hold. Also the real agent loop
//! (`meshca_agent::run`) renewing its identity and carrying on past the overlap window.
//!
//! Every certificate used here verifies against the relay CA; what is tested is that a
//! verifying certificate is not enough once its cluster's record has moved on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use meshca_clock::{Clock, ManualClock};
use meshca_mgmt::records::{self, ClusterRecord, StatusRecord};
use meshca_mgmt::server::creds;
use meshca_mgmt::{ServeWith, ServerOptions, Settings};
use meshca_pki::{Cert, KeyAlgorithm, PrivateKey, RootSet, build_csr};
use meshca_policy::Policy;
use meshca_proto::Phase;
use meshca_proto::mgmt::certificate_issuer_client::CertificateIssuerClient;
use meshca_proto::mgmt::operator_client::OperatorClient;
use meshca_proto::mgmt::registration_client::RegistrationClient;
use meshca_proto::mgmt::{
    ClusterStatus, GetStatusRequest, IssueIntermediateRequest, IssueOperatorRequest, RegisterRequest,
    RemoveClusterRequest, RenewIdentityRequest, RevokeOperatorRequest, WatchTrustRequest,
};
use meshca_store::dir::DirStore;
use meshca_store::{ObjectKey, Store, typed};
use meshca_testsupport::eventually;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

const OVERLAP: Duration = Duration::from_secs(20);

/// A management plane running in this process.
struct Plane {
    dir: PathBuf,
    clock: ManualClock,
    store: Arc<DirStore>,
    addr: SocketAddr,
    relay: RootSet,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), meshca_mgmt::MgmtError>>>,
}

/// Agent identities live 160 s here. Their NotBefore is backdated 120 s, so the agent's half-life
/// renewal comes 20 s after issuance: the whole exchange stays within the 120 s that the real
/// clock (which rustls checks certificates against) may lag the manual one.
fn settings() -> Settings {
    Settings {
        identity_ttl: Duration::from_secs(160),
        identity_overlap: OVERLAP,
        report_interval: Duration::from_secs(5),
        ..Settings::default()
    }
}

impl Plane {
    async fn start(dir: &Path, clock: &ManualClock) -> Plane {
        let store = Arc::new(DirStore::open(dir.join("store")).unwrap());
        let opts = ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            hostnames: vec!["localhost".into()],
            policy_yaml: None,
            default_policy: Policy::generated_default(Duration::from_secs(3600)),
            operator_dir: Some(dir.join("operator")),
            settings: settings(),
            issue_burst: 5,
            issue_per_minute: 6.0,
            metrics_listen: None,
            metrics_token: None,
            peer_rate: meshca_mgmt::server::DEFAULT_PEER_RATE,
            serve: meshca_serve::ServeConfig::default(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound) = tokio::sync::oneshot::channel();
        let with = ServeWith { clock: clock.shared(), ..Default::default() };
        let task = tokio::spawn(meshca_mgmt::serve_with(
            store.clone(),
            opts,
            with,
            move |a| {
                let _ = bound_tx.send(a);
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let addr = bound.await.expect("the server binds");
        let relay = RootSet::from_pem(&std::fs::read(dir.join("operator").join(creds::RELAY_CA)).unwrap()).unwrap();
        Plane { dir: dir.to_path_buf(), clock: clock.clone(), store, addr, relay, stop: Some(stop), task: Some(task) }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }

    /// A new channel (so a new TLS connection) presenting `id`, or nothing.
    fn channel(&self, id: Option<&Identity>) -> Channel {
        let auth = match id {
            Some(id) => meshca_tls::ClientAuth::Identity(meshca_tls::Identity::new(&id.cert, &[], &id.key)),
            None => meshca_tls::ClientAuth::None,
        };
        let config =
            meshca_tls::client_config(meshca_tls::ServerTrust::Roots(&self.relay), auth, meshca_tls::Versions::Tls13)
                .unwrap();
        meshca_tls::grpc::channel(&self.addr.to_string(), config, "localhost").unwrap()
    }

    fn issuer(&self, id: &Identity) -> CertificateIssuerClient<Channel> {
        CertificateIssuerClient::new(self.channel(Some(id)))
    }

    /// The operator whose credentials are in `dir`.
    fn operator_in(&self, dir: &Path) -> OperatorClient<Channel> {
        let config = creds::client_config(dir).unwrap();
        OperatorClient::new(meshca_tls::grpc::channel(&self.addr.to_string(), config, "localhost").unwrap())
    }

    fn operator(&self) -> OperatorClient<Channel> {
        self.operator_in(&self.dir.join("operator"))
    }

    /// Registers `cluster` with a fresh bootstrap token, as an agent does.
    async fn register(&self, cluster: &str) -> Identity {
        let token = meshca_mgmt::tokens::create(
            self.store.as_ref(),
            cluster,
            &Default::default(),
            Duration::from_secs(600),
            "operator test",
            self.clock.now(),
        )
        .await
        .unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let resp = RegistrationClient::new(self.channel(None))
            .register(RegisterRequest {
                bootstrap_token: token.token,
                identity_csr: build_csr(&key, &[]).unwrap(),
                cluster: cluster.into(),
            })
            .await
            .expect("registered")
            .into_inner();
        Identity { cert: Cert::from_pem(resp.certificate.as_bytes()).unwrap(), key }
    }

    async fn record(&self, cluster: &str) -> Option<ClusterRecord> {
        typed::get::<ClusterRecord>(self.store.as_ref(), &records::cluster(cluster).unwrap())
            .await
            .unwrap()
            .map(|v| v.value)
    }
}

/// An agent certificate and its key.
#[derive(Debug)]
struct Identity {
    cert: Cert,
    key: PrivateKey,
}

impl Identity {
    fn serial(&self) -> String {
        self.cert.serial_hex()
    }
}

fn report(phase: Phase, error: &str) -> ClusterStatus {
    ClusterStatus { phase: phase as i32, last_error: error.into(), agent_version: "0.1.0".into(), ..Default::default() }
}

/// A status report over a new connection presenting `id`.
async fn report_as(p: &Plane, id: &Identity) -> Result<(), tonic::Status> {
    p.issuer(id).report_status(report(Phase::Ready, "")).await.map(drop)
}

async fn renew_as(p: &Plane, id: &Identity, key: &PrivateKey) -> Result<Identity, tonic::Status> {
    let resp = p.issuer(id).renew_identity(RenewIdentityRequest { identity_csr: build_csr(key, &[]).unwrap() }).await?;
    let cert = Cert::from_pem(resp.into_inner().certificate.as_bytes()).unwrap();
    Ok(Identity { cert, key: PrivateKey::from_pem(key.to_pkcs8_pem().as_bytes()).unwrap() })
}

#[track_caller]
fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, needle: &str) -> String {
    let s = r.expect_err("must be refused");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains(needle), "{:?} should say {needle:?}", s.message());
    s.message().to_string()
}

/// Opens a trust stream presenting `id` and takes its first state.
async fn trust_stream(p: &Plane, id: &Identity) -> tonic::Streaming<meshca_proto::mgmt::TrustState> {
    let mut s = p.issuer(id).watch_trust(WatchTrustRequest {}).await.expect("stream opened").into_inner();
    s.next().await.expect("a first state").expect("a first state");
    s
}

/// The next item of an open stream, which must be the refusal that ends it.
async fn ends_refused(s: &mut tonic::Streaming<meshca_proto::mgmt::TrustState>, needle: &str) {
    let next = tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("the stream must end promptly");
    match next {
        Some(Err(st)) => {
            assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
            assert!(st.message().contains(needle), "{:?} should say {needle:?}", st.message());
        }
        other => panic!("expected the stream to end with a refusal, got {other:?}"),
    }
}

/// The attack: a stolen agent certificate kept working after the cluster renewed, and could
/// renew itself for ever. Now the predecessor is accepted for the overlap only (new connections
/// included, so an agent's calls in flight finish), may not renew, and is refused on every call
/// — and on its open trust stream — once the window has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_identity_is_refused_after_its_overlap_and_cannot_renew_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let p = Plane::start(tmp.path(), &clock).await;
    let a = p.register("cluster-1").await;
    report_as(&p, &a).await.expect("the registered identity is accepted");
    let mut stream_a = trust_stream(&p, &a).await;

    let b = renew_as(&p, &a, &PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap()).await.expect("renewed");
    let rec = p.record("cluster-1").await.unwrap();
    assert_eq!(
        (rec.identity_serial.as_str(), rec.previous_identity_serial.as_str()),
        (b.serial().as_str(), a.serial().as_str())
    );
    report_as(&p, &b).await.expect("the new identity is accepted");
    report_as(&p, &a).await.expect("within the overlap, the old one still is (a new connection too)");

    // The old identity cannot renew itself into a fresh one (a thief would live for ever).
    let thief_key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    refused(renew_as(&p, &a, &thief_key).await, "only the current identity");
    assert_eq!(p.record("cluster-1").await.unwrap().identity_serial, b.serial(), "nothing changed");

    clock.advance(OVERLAP + Duration::from_secs(1));
    ends_refused(&mut stream_a, "was replaced at a renewal").await;
    refused(report_as(&p, &a).await, "was replaced at a renewal");
    let csr =
        meshca_agent::source::csr_for(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), "meshca", "cluster-1")
            .unwrap();
    refused(
        p.issuer(&a).issue_intermediate(IssueIntermediateRequest { csr: csr.clone(), reason: 1 }).await,
        "was replaced",
    );
    refused(p.issuer(&a).watch_trust(WatchTrustRequest {}).await, "was replaced");
    refused(renew_as(&p, &a, &thief_key).await, "was replaced");
    // The current identity is untouched by all this.
    p.issuer(&b).issue_intermediate(IssueIntermediateRequest { csr, reason: 1 }).await.expect("B is the cluster now");
    report_as(&p, &b).await.unwrap();
    p.stop().await;
}

/// A renewal whose answer was lost is retried by the (now) predecessor for the same key, and
/// answered; a different key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_renewal_answer_can_be_fetched_again_for_the_same_key_only() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let p = Plane::start(tmp.path(), &clock).await;
    let a = p.register("cluster-1").await;
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let lost = renew_as(&p, &a, &key).await.unwrap();
    let again = renew_as(&p, &a, &key).await.expect("the same key: the agent's retry");
    assert_ne!(again.serial(), lost.serial());
    report_as(&p, &again).await.unwrap();
    refused(report_as(&p, &lost).await, "not the current identity");
    refused(renew_as(&p, &a, &PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap()).await, "only the current");
    p.stop().await;
}

/// Re-registering a cluster (the operator's answer to a lost or stolen agent identity) ends
/// every earlier identity at once, and `meshca cluster remove` ends the last one: calls and open
/// trust streams are refused, nothing more is issued, and the records are archived, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_registration_and_a_removal_end_every_earlier_identity_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let p = Plane::start(tmp.path(), &clock).await;
    let a = p.register("cluster-1").await;
    let mut stream_a = trust_stream(&p, &a).await;
    let csr = || {
        meshca_agent::source::csr_for(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), "meshca", "cluster-1")
            .unwrap()
    };
    p.issuer(&a).issue_intermediate(IssueIntermediateRequest { csr: csr(), reason: 1 }).await.unwrap();

    let c = p.register("cluster-1").await;
    ends_refused(&mut stream_a, "not the current identity").await;
    refused(report_as(&p, &a).await, "register this agent again");
    report_as(&p, &c).await.expect("the new registration is the cluster now");
    let mut stream_c = trust_stream(&p, &c).await;

    // An unused token for the cluster, which removal must void too.
    let spare = meshca_mgmt::tokens::create(
        p.store.as_ref(),
        "cluster-1",
        &Default::default(),
        Duration::from_secs(600),
        "operator test",
        clock.now(),
    )
    .await
    .unwrap();
    let removed = p
        .operator()
        .remove_cluster(RemoveClusterRequest { cluster: "cluster-1".into() })
        .await
        .expect("removed")
        .into_inner();
    assert_eq!(removed.tokens_deleted, 1);
    ends_refused(&mut stream_c, "is not registered").await;
    refused(report_as(&p, &c).await, "is not registered");
    refused(
        p.issuer(&c).issue_intermediate(IssueIntermediateRequest { csr: csr(), reason: 1 }).await,
        "not registered",
    );
    let spare_used = RegistrationClient::new(p.channel(None))
        .register(RegisterRequest {
            bootstrap_token: spare.token,
            identity_csr: build_csr(&PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &[]).unwrap(),
            cluster: "cluster-1".into(),
        })
        .await;
    assert_eq!(spare_used.expect_err("the token went with the cluster").code(), Code::Unauthenticated);

    // Archived, not deleted: the registration, the issued log and the last status.
    assert!(p.record("cluster-1").await.is_none());
    let archive = p.store.get(&ObjectKey::new(records::NAMESPACE, &removed.archive).unwrap()).await.unwrap().unwrap();
    let reg: ClusterRecord = serde_json::from_slice(archive.value.get("cluster.json").unwrap()).unwrap();
    assert_eq!(reg.identity_serial, c.serial());
    let issued: records::IssuedLog = serde_json::from_slice(archive.value.get("issued.json").unwrap()).unwrap();
    assert_eq!(issued.records().len(), 1);
    let status: StatusRecord = serde_json::from_slice(archive.value.get("status.json").unwrap()).unwrap();
    assert_eq!(status.phase, Phase::Ready);
    let st = p.operator().get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert!(st.clusters.iter().all(|c| c.name != "cluster-1"), "gone from the status");

    // Removing it again is a not-found; adding it back starts afresh.
    let again = p.operator().remove_cluster(RemoveClusterRequest { cluster: "cluster-1".into() }).await;
    assert_eq!(again.expect_err("not registered").code(), Code::NotFound);
    // One audit entry for the removal (the repeat left none), naming the operator and the archive,
    // and the chain verifies.
    let log = meshca_mgmt::audit::read(p.store.as_ref()).await.unwrap();
    let removals: Vec<_> = log.iter().filter(|e| e.action == "cluster-removed").collect();
    assert_eq!(removals.len(), 1, "{removals:?}");
    assert_eq!(removals[0].cluster, "cluster-1");
    assert!(removals[0].actor.contains("operator"), "{:?}", removals[0]);
    assert_eq!(removals[0].details.get("archive").map(String::as_str), Some(removed.archive.as_str()));
    meshca_mgmt::audit::verify(&log).unwrap();
    let d = p.register("cluster-1").await;
    report_as(&p, &d).await.unwrap();
    refused(report_as(&p, &c).await, "not the current identity");
    p.stop().await;
}

/// The server's operator credentials are written once and reused at later starts (nothing is
/// rewritten, and no second valid certificate appears); other operators get their own; a revoked
/// certificate is refused on every call, and revoking the server's own makes it write new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_credentials_are_reused_and_a_revoked_one_is_refused_on_every_call() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let p = Plane::start(tmp.path(), &clock).await;
    let ops = tmp.path().join("operator");
    let files = |dir: &Path| {
        [creds::CERT, creds::KEY, creds::RELAY_CA, creds::SERVER]
            .map(|f| (std::fs::read(dir.join(f)).unwrap(), std::fs::metadata(dir.join(f)).unwrap().modified().unwrap()))
    };
    let first = files(&ops);
    let admin_serial = Cert::from_pem(&first[0].0).unwrap().serial_hex();
    p.operator().get_status(GetStatusRequest::default()).await.expect("admin works");
    p.stop().await;

    clock.advance(Duration::from_secs(30));
    let p = Plane::start(tmp.path(), &clock).await;
    let second = files(&ops);
    for (i, name) in ["certificate", "key", "relay CA"].iter().enumerate() {
        assert_eq!(first[i], second[i], "the {name} is reused untouched");
    }
    p.operator().get_status(GetStatusRequest::default()).await.expect("the same credentials still work");

    // A second operator with credentials of her own.
    let alice_dir = tmp.path().join("alice");
    std::fs::create_dir(&alice_dir).unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let issued = p
        .operator()
        .issue_operator(IssueOperatorRequest {
            name: "alice".into(),
            csr: build_csr(&key, &[]).unwrap(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(alice_dir.join(creds::CERT), &issued.certificate).unwrap();
    std::fs::write(alice_dir.join(creds::KEY), key.to_pkcs8_pem().as_bytes()).unwrap();
    std::fs::write(alice_dir.join(creds::RELAY_CA), &issued.relay_ca).unwrap();
    p.operator_in(&alice_dir).get_status(GetStatusRequest::default()).await.expect("alice works");

    let r = p.operator().revoke_operator(RevokeOperatorRequest { serial: issued.serial.to_lowercase() }).await.unwrap();
    let r = r.into_inner();
    assert_eq!((r.name.as_str(), r.already_revoked, r.replaced_local_credentials), ("alice", false, false));
    let s = p.operator_in(&alice_dir).get_status(GetStatusRequest::default()).await.expect_err("alice is revoked");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("revoked"), "{}", s.message());
    let s = p.operator_in(&alice_dir).remove_cluster(RemoveClusterRequest { cluster: "x".into() }).await;
    assert_eq!(s.expect_err("every call").code(), Code::Unauthenticated);
    p.operator().get_status(GetStatusRequest::default()).await.expect("admin is not affected");

    // Revoking the server's own credentials (a copy leaked): refused from then on, replaced at once.
    let stolen = tmp.path().join("stolen");
    std::fs::create_dir(&stolen).unwrap();
    for f in [creds::CERT, creds::KEY, creds::RELAY_CA] {
        std::fs::copy(ops.join(f), stolen.join(f)).unwrap();
    }
    let r = p
        .operator()
        .revoke_operator(RevokeOperatorRequest { serial: admin_serial.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(r.replaced_local_credentials);
    let s = p.operator_in(&stolen).get_status(GetStatusRequest::default()).await.expect_err("the stolen copy");
    assert_eq!(s.code(), Code::Unauthenticated);
    let fresh = Cert::from_pem(&std::fs::read(ops.join(creds::CERT)).unwrap()).unwrap();
    assert_ne!(fresh.serial_hex(), admin_serial);
    p.operator().get_status(GetStatusRequest::default()).await.expect("the new local credentials work");
    p.stop().await;

    // And a restart keeps the new ones (not revoked), rather than going back to writing.
    let p = Plane::start(tmp.path(), &clock).await;
    assert_eq!(
        Cert::from_pem(&std::fs::read(ops.join(creds::CERT)).unwrap()).unwrap().serial_hex(),
        fresh.serial_hex()
    );
    p.stop().await;
}

/// The attack: an agent put ANSI/OSC sequences in the error it reported, and `meshca status`
/// printed them raw. The management plane now escapes free text before storing it, bounds it,
/// and refuses reports whose fixed-shape fields are not that shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_text_reaches_operators_escaped_and_malformed_reports_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let p = Plane::start(tmp.path(), &clock).await;
    let a = p.register("cluster-1").await;
    let hostile = "\u{1b}[2J\u{1b}[H\u{1b}]0;meshca: all clear\u{7}\u{1b}[32mRoot rotated OK\u{1b}[0m";
    p.issuer(&a).report_status(report(Phase::Degraded, &format!("{hostile}{}", "A".repeat(10_000)))).await.unwrap();
    let st = p.operator().get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    let c = st.clusters.iter().find(|c| c.name == "cluster-1").unwrap();
    let err = &c.status.as_ref().unwrap().last_error;
    assert!(err.starts_with("\\x1b[2J\\x1b[H\\x1b]0;meshca: all clear\\x07"), "{err}");
    assert!(!err.chars().any(meshca_proto::text::needs_escape), "{err:?}");
    assert_eq!(err.chars().count(), meshca_mgmt::report::MAX_ERROR_CHARS);
    for a_ in &st.alerts {
        assert!(!a_.message.chars().any(meshca_proto::text::needs_escape), "{:?}", a_.message);
    }

    for (bad, field) in [
        (ClusterStatus { phase: 42, ..report(Phase::Ready, "") }, "phase 42"),
        (
            ClusterStatus { intermediate_serial: "\u{1b}]0;x\u{7}".into(), ..report(Phase::Ready, "") },
            "intermediate_serial",
        ),
        (ClusterStatus { key_location: "\u{9b}2J".into(), ..report(Phase::Ready, "") }, "key_location"),
        (ClusterStatus { intermediate_not_after: i64::MIN, ..report(Phase::Ready, "") }, "intermediate_not_after"),
    ] {
        let s = p.issuer(&a).report_status(bad).await.expect_err(field);
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(field) && !s.message().chars().any(meshca_proto::text::needs_escape), "{s:?}");
    }
    p.stop().await;
}

/// The real agent loop renews its identity at half life, moves its connections (the trust
/// stream included) to the new certificate at once, and keeps reporting after the old
/// certificate's overlap has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_identity_reconnects_and_keeps_working_past_the_overlap() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,h2=warn,tower=warn,hyper=warn,rustls=warn")
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let p = Plane::start(tmp.path(), &clock).await;
    let token = meshca_mgmt::tokens::create(
        p.store.as_ref(),
        "cluster-1",
        &Default::default(),
        Duration::from_secs(600),
        "operator test",
        clock.now(),
    )
    .await
    .unwrap();
    let agent_store = Arc::new(DirStore::open(tmp.path().join("agent")).unwrap());
    let mut opts = meshca_agent::AgentOptions::new("cluster-1", &p.addr.to_string()).unwrap();
    opts.bootstrap_token = Some(token.token);
    opts.relay_ca = Some(p.relay.to_pem().into_bytes());
    opts.clock = clock.shared();
    let stop = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(meshca_agent::run(agent_store.clone(), opts, stop.clone()));

    let status = |p: &Plane| {
        let store = p.store.clone();
        async move {
            typed::get::<StatusRecord>(store.as_ref(), &records::status("cluster-1").unwrap())
                .await
                .unwrap()
                .map(|v| v.value)
        }
    };
    eventually(Duration::from_secs(30), "the agent to write cacerts and report Ready", || async {
        status(&p).await.filter(|s| s.phase == Phase::Ready && !s.intermediate_serial.is_empty())
    })
    .await;
    let first = p.record("cluster-1").await.unwrap().identity_serial;

    // Half of the identity's lifetime (see `settings`): the agent renews.
    let renewed = {
        let mut renewed = None;
        for _ in 0..40 {
            clock.advance(Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let rec = p.record("cluster-1").await.unwrap();
            if rec.identity_serial != first {
                renewed = Some(rec);
                break;
            }
        }
        renewed.expect("the agent renewed its identity at half life")
    };
    assert_eq!(renewed.previous_identity_serial, first);
    let identity_key = ObjectKey::new("meshca-system", "agent-identity").unwrap();
    eventually(Duration::from_secs(10), "the renewed identity saved for the next start", || async {
        let stored = meshca_agent::identity::AgentIdentity::load(agent_store.as_ref(), &identity_key).await.unwrap()?;
        (stored.cert.serial_hex() == renewed.identity_serial).then_some(())
    })
    .await;

    // Past the overlap, the old certificate is refused everywhere; the agent still reports,
    // so every connection it uses now presents the new one.
    clock.advance(OVERLAP + Duration::from_secs(1));
    let after = meshca_clock::unix(clock.now());
    for _ in 0..12 {
        clock.advance(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(Duration::from_secs(20), "a report after the overlap ended", || async {
        clock.advance(Duration::from_millis(500));
        status(&p).await.filter(|s| s.reported_at > after && s.phase == Phase::Ready)
    })
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();
    p.stop().await;
}
