//! The SPIFFE bundle endpoint as the management plane serves it, in-process but over real TLS
//! sockets (`serve_with` with a bundle endpoint, on a manual clock), fetched with meshca's own
//! HTTPS client: the document is the root set in force, the `https_spiffe` serving SVID is
//! authenticated with the trust domain's bundle and its endpoint SPIFFE ID, `https_web` serves
//! the operator's certificate, the sequence grows through a root rotation (A → A+B → B) and
//! survives a restart.
//!
//! Istio's own code reading the same endpoint is `crates/meshca/tests/spiffe_bundle.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_clock::{Clock, ManualClock};
use meshca_http::{Client, HttpError, Url};
use meshca_mgmt::federation::endpoint::endpoint_id;
use meshca_mgmt::federation::poll;
use meshca_mgmt::federation::publish::{Sequences, sequences_key};
use meshca_mgmt::federation::{BundleEndpoint, Profile};
use meshca_mgmt::records::Keyspace;
use meshca_mgmt::server::creds;
use meshca_mgmt::{ServeWith, ServerOptions, Settings};
use meshca_pki::{CaSigner, Cert, KeyAlgorithm, LeafParams, PrivateKey, RootParams, RootSet, SpiffeId, TrustDomain};
use meshca_policy::Policy;
use meshca_proto::RotationPhase;
use meshca_proto::mgmt::RotateRootRequest;
use meshca_proto::mgmt::operator_client::OperatorClient;
use meshca_spiffe_bundle::Bundle;
use meshca_store::dir::DirStore;
use meshca_store::{Store, typed};
use meshca_testsupport::openssl::{self, KeyType};
use meshca_testsupport::wait::eventually;
use meshca_tls::{ClientAuth, PeerPolicy, ServerTrust, SpiffeVerifier, Versions};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

/// A management plane serving the bundle endpoint.
struct Plane {
    dir: Arc<tempfile::TempDir>,
    clock: ManualClock,
    store: Arc<DirStore>,
    grpc: SocketAddr,
    bundle: SocketAddr,
    stop: CancellationToken,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Plane {
    /// Starts on `dir` (a fresh one when `None`) at `clock`'s time.
    async fn start(dir: Option<Arc<tempfile::TempDir>>, clock: ManualClock, profile: Profile) -> Plane {
        Plane::start_as(dir, clock, profile, &td()).await
    }

    /// [`Plane::start`] for the trust domain `trust_domain`.
    async fn start_as(
        dir: Option<Arc<tempfile::TempDir>>,
        clock: ManualClock,
        profile: Profile,
        trust_domain: &TrustDomain,
    ) -> Plane {
        meshca_tls::provider::install();
        let dir = dir.unwrap_or_else(|| Arc::new(tempfile::tempdir().unwrap()));
        let store = Arc::new(DirStore::open(dir.path().join("store")).unwrap());
        let mut policy = Policy::generated_default(Duration::from_secs(3600));
        policy.trust_domain = trust_domain.clone();
        // Short gates, so a whole root rotation runs within the two minutes certificates are
        // backdated by (the TLS clients check them against the wall clock).
        policy.root_rotation.max_leaf_lifetime = Duration::from_secs(10);
        policy.root_rotation.skew = Duration::from_secs(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bundle = listener.local_addr().unwrap();
        let opts = ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            hostnames: vec!["localhost".into()],
            policy_yaml: None,
            default_policy: policy,
            operator_dir: Some(dir.path().join("operator")),
            settings: Settings::default(),
            issue_burst: 5,
            issue_per_minute: 6.0,
            metrics_listen: None,
            metrics_token: None,
            peer_rate: meshca_mgmt::server::DEFAULT_PEER_RATE,
            serve: meshca_serve::ServeConfig::default(),
        };
        let with = ServeWith {
            clock: clock.shared(),
            bundle_endpoint: Some(BundleEndpoint { listener, profile, refresh_hint: Duration::from_secs(60) }),
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let (server_store, server_stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let r = meshca_mgmt::serve_with(
                server_store,
                opts,
                with,
                move |a| {
                    let _ = bound_tx.send(a);
                },
                server_stop.cancelled_owned(),
            )
            .await;
            if let Err(e) = r {
                eprintln!("management plane: {e}");
            }
            let _ = done_tx.send(());
        });
        let grpc = bound_rx.await.expect("the management plane starts");
        Plane { dir, clock, store, grpc, bundle, stop, done }
    }

    async fn stop(self) -> Arc<tempfile::TempDir> {
        self.stop.cancel();
        let _ = self.done.await;
        self.dir
    }

    /// The generated root (the root set before any rotation).
    async fn roots(&self) -> RootSet {
        let rec = self.store.get(&meshca_mgmt::records::Keyspace::legacy().root_ca()).await.unwrap().unwrap();
        RootSet::from_pem(rec.value.get("ca-cert.pem").unwrap()).unwrap()
    }

    fn url(&self) -> Url {
        Url::parse(&format!("https://localhost:{}/", self.bundle.port())).unwrap()
    }

    /// Fetches `path` trusting the server as `tls` says.
    async fn get(&self, tls: rustls::ClientConfig, path: &str) -> Result<meshca_http::Response, HttpError> {
        let client = Client::new(&self.url(), Some(tls), Duration::from_secs(5), 1 << 20).unwrap();
        client.send(http::Method::GET, path, &[], None).await
    }

    /// The bundle, fetched over `https_spiffe` by a client holding `roots` and expecting the
    /// endpoint's SPIFFE ID.
    async fn fetch_spiffe(&self, roots: &RootSet) -> Result<Bundle, String> {
        let resp = self.get(spiffe_client(roots, endpoint_id(&td())), "/").await.map_err(|e| e.to_string())?;
        if resp.status != 200 {
            return Err(format!("status {}", resp.status));
        }
        Bundle::parse(&resp.body, &td(), self.clock.now()).map_err(|e| e.to_string())
    }

    async fn operator(&self) -> OperatorClient<tonic::transport::Channel> {
        let tls = creds::client_config(&self.dir.path().join("operator")).unwrap();
        let ch = meshca_tls::grpc::channel(&self.grpc.to_string(), tls, "localhost").unwrap();
        OperatorClient::new(ch)
    }

    async fn phase(&self) -> RotationPhase {
        let j = meshca_mgmt::rotation::controller::read_journal(
            self.store.as_ref(),
            &meshca_mgmt::records::Keyspace::legacy(),
        )
        .await
        .unwrap()
        .value;
        j.rotation.map_or(RotationPhase::Idle, |r| r.phase)
    }
}

/// A client authenticating the server as `https_spiffe` does: a chain to `roots`, and exactly
/// the SPIFFE ID `id`.
fn spiffe_client(roots: &RootSet, id: SpiffeId) -> rustls::ClientConfig {
    let verifier = SpiffeVerifier::new(roots, PeerPolicy::AnyOf(vec![id]), false).unwrap();
    meshca_tls::client_config(ServerTrust::Verifier(verifier), ClientAuth::None, Versions::Tls13And12).unwrap()
}

/// A `localhost` serving certificate (for `https_web`) from a fresh CA, and that CA.
fn web_identity(now: SystemTime) -> (RootSet, Arc<rustls::sign::CertifiedKey>) {
    let ca = CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("web"), now)
        .unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let params = LeafParams { identity: None, dns_names: vec!["localhost".into()], ttl: Duration::from_secs(3600) };
    let leaf = Cert::from_der(ca.sign_leaf(key.public_key_spki(), &params, now).unwrap().der).unwrap();
    let ck = meshca_tls::Identity::new(&leaf, &[], &key).certified_key().unwrap();
    (RootSet::from_certs(vec![ca.cert().clone()]).unwrap(), ck)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_spiffe_serves_the_root_set_under_an_svid_of_the_trust_domain() {
    let p = Plane::start(None, ManualClock::new(SystemTime::now()), Profile::Spiffe).await;
    let roots = p.roots().await;
    let bundle = eventually(WAIT, "the bundle", || async { p.fetch_spiffe(&roots).await.ok() }).await;
    assert_eq!(bundle.authorities, roots.iter().cloned().collect::<Vec<Cert>>());
    assert_eq!(bundle.sequence, 1);
    assert_eq!(bundle.refresh_hint, Some(Duration::from_secs(60)));

    let resp = p.get(spiffe_client(&roots, endpoint_id(&td())), "/").await.unwrap();
    assert!(String::from_utf8_lossy(&resp.body).contains("\"use\": \"x509-svid\""));
    let resp = p.get(spiffe_client(&roots, endpoint_id(&td())), "/other").await.unwrap();
    assert_eq!(resp.status, 404);

    // A client expecting another SPIFFE ID, or holding other roots, refuses the server.
    let other_id = SpiffeId::new(td(), "spire/server").unwrap();
    let e = p.get(spiffe_client(&roots, other_id), "/").await.expect_err("wrong SPIFFE ID");
    assert!(matches!(e, HttpError::Handshake { .. }), "{e}");
    let stranger = CaSigner::new_root(
        PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(),
        &RootParams::new("stranger"),
        p.clock.now(),
    )
    .unwrap();
    let stranger = RootSet::from_certs(vec![stranger.cert().clone()]).unwrap();
    let e = p.fetch_spiffe(&stranger).await.expect_err("other roots");
    assert!(e.contains("TLS handshake"), "{e}");
    p.stop().await;
}

/// The operator's certificate (here from a CA made for the test, with `localhost` as its DNS
/// name) is what `https_web` presents; a client checks it by host name like any web server's.
#[tokio::test(flavor = "multi_thread")]
async fn https_web_serves_the_configured_certificate() {
    meshca_tls::provider::install();
    let now = SystemTime::now();
    let (web_roots, ck) = web_identity(now);
    let p = Plane::start(None, ManualClock::new(now), Profile::Web(ck)).await;
    let web =
        meshca_tls::client_config(ServerTrust::Roots(&web_roots), ClientAuth::None, Versions::Tls13And12).unwrap();
    let roots = p.roots().await;
    let bundle = eventually(WAIT, "the bundle over https_web", || async {
        let r = p.get(web.clone(), "/").await.ok()?;
        Bundle::parse(&r.body, &td(), now).ok()
    })
    .await;
    assert_eq!(bundle.authorities, roots.iter().cloned().collect::<Vec<Cert>>());
    // The mesh's roots do not vouch for the web certificate.
    let e = p.fetch_spiffe(&roots).await.expect_err("https_web is not an SVID");
    assert!(e.contains("TLS handshake"), "{e}");
    p.stop().await;
}

/// A root rotation changes the root set twice (A → A+B → B) and the sequence with it; the
/// serving SVID follows the signer (B from Switching on); a restarted management plane serves the
/// same sequence for the same root set, never a smaller one.
#[tokio::test(flavor = "multi_thread")]
async fn the_sequence_grows_through_a_root_rotation_and_survives_a_restart() {
    let clock = ManualClock::new(SystemTime::now());
    let p = Plane::start(None, clock.clone(), Profile::Spiffe).await;
    let a = p.roots().await;
    let first = eventually(WAIT, "the bundle of {A}", || async { p.fetch_spiffe(&a).await.ok() }).await;
    assert_eq!(first.sequence, 1);

    let r = p
        .operator()
        .await
        .rotate_root(RotateRootRequest { abort: false, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.phase(), RotationPhase::Distributing, "{}", r.message);
    let both = eventually(WAIT, "the bundle of {A, B}", || async {
        p.fetch_spiffe(&a).await.ok().filter(|b| b.authorities.len() == 2)
    })
    .await;
    assert_eq!(both.sequence, 2);
    assert_eq!(both.authorities[0], a.iter().next().unwrap().clone(), "A stays first");
    let b = RootSet::from_certs(vec![both.authorities[1].clone()]).unwrap();

    // Through Switching (the SVID moves to B) and Draining to Retiring: {B}.
    let mut last = both;
    for _ in 0..40 {
        clock.advance(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(now) = p.fetch_spiffe(&b).await {
            assert!(now.sequence >= last.sequence, "the sequence never goes back");
            last = now;
            if last.authorities.len() == 1 && p.phase().await == RotationPhase::Idle {
                break;
            }
        }
    }
    assert_eq!(last.authorities, b.iter().cloned().collect::<Vec<Cert>>(), "the rotation ends on {{B}}");
    assert_eq!(last.sequence, 3);
    // A client holding only A cannot authenticate the endpoint any more: its SVID is B's.
    assert!(p.fetch_spiffe(&a).await.is_err());

    let dir = p.stop().await;
    let store = DirStore::open(dir.path().join("store")).unwrap();
    let seq: Sequences = typed::get(&store, &sequences_key()).await.unwrap().unwrap().value;
    assert_eq!(seq["cluster.local"].sequence, 3);
    let again = Plane::start(Some(dir), clock.clone(), Profile::Spiffe).await;
    let after = eventually(WAIT, "the bundle after a restart", || async { again.fetch_spiffe(&b).await.ok() }).await;
    assert_eq!((after.sequence, after.authorities), (3, last.authorities));
    again.stop().await;
}

// ---- reading another trust domain's bundle (federation::fetch) ----

use meshca_mgmt::federation::fetch::{EndpointAuth, Federated, FetchError, Source, fetch};

/// Another management plane's view: plane `p`'s trust domain fetched over `https_spiffe`,
/// authenticated by `held` (the operator's first bundle, then the last good one).
fn spiffe_source(p: &Plane) -> Source {
    Source {
        trust_domain: td(),
        url: format!("https://localhost:{}/", p.bundle.port()),
        auth: EndpointAuth::Spiffe(endpoint_id(&td())),
        timeout: Duration::from_secs(5),
    }
}

fn bundle_of(roots: &RootSet) -> Bundle {
    Bundle { trust_domain: td(), sequence: 0, refresh_hint: None, authorities: roots.iter().cloned().collect() }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_bundle_is_fetched_over_https_spiffe_with_the_first_bundle_and_the_endpoint_id() {
    let p = Plane::start(None, ManualClock::new(SystemTime::now()), Profile::Spiffe).await;
    let roots = p.roots().await;
    let now = p.clock.now();
    let source = spiffe_source(&p);
    let first = bundle_of(&roots);
    let state = Federated::new(Some(first.clone()), now);
    let got =
        eventually(WAIT, "the fetch", || async { fetch(&source, state.last_good.as_ref(), now).await.ok() }).await;
    assert_eq!(got.authorities, first.authorities);
    let next = state.observe(Ok(got), now);
    assert_eq!(next.next_fetch, now + Duration::from_secs(60), "the publisher's refresh hint");
    assert_eq!(next.failure, None);

    // Held roots that do not vouch for the endpoint, or another endpoint ID: refused in the handshake.
    let stranger =
        CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("s"), now).unwrap();
    let e = fetch(&source, Some(&bundle_of(&RootSet::from_certs(vec![stranger.cert().clone()]).unwrap())), now)
        .await
        .expect_err("stranger roots");
    assert!(matches!(e, FetchError::Http { source: HttpError::Handshake { .. }, .. }), "{e}");
    let other_id =
        Source { auth: EndpointAuth::Spiffe(SpiffeId::new(td(), "spire/server").unwrap()), ..source.clone() };
    let e = fetch(&other_id, Some(&first), now).await.expect_err("another endpoint ID");
    assert!(matches!(e, FetchError::Http { source: HttpError::Handshake { .. }, .. }), "{e}");
    // An endpoint ID outside the trust domain, or no first bundle: a configuration error.
    let elsewhere = Source {
        auth: EndpointAuth::Spiffe(SpiffeId::new(TrustDomain::new("other.example").unwrap(), "x").unwrap()),
        ..source.clone()
    };
    assert!(matches!(fetch(&elsewhere, Some(&first), now).await, Err(FetchError::Config { .. })));
    assert!(matches!(fetch(&source, None, now).await, Err(FetchError::Config { .. })));
    p.stop().await;
}

/// What the hostile endpoint answers.
#[derive(Clone)]
enum Answer {
    Body(u16, Vec<u8>),
    Hang,
}

/// A real HTTPS server standing in for a foreign trust domain's bundle endpoint that answers
/// whatever the test sets (bad documents, errors, nothing at all): the inputs meshca must refuse
/// come from outside by definition, so the test plays that outside. `https_web` with a
/// `localhost` certificate from its own CA.
struct Hostile {
    addr: SocketAddr,
    ca: RootSet,
    answer: Arc<std::sync::Mutex<Answer>>,
}

impl Hostile {
    async fn start() -> Hostile {
        meshca_tls::provider::install();
        let (ca, ck) = web_identity(SystemTime::now());
        let config = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(meshca_tls::SwappableCert::new(ck));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = meshca_serve::https::TlsListener::<SocketAddr>::new(
            tcp,
            Arc::new(config),
            meshca_serve::https::Limits::new("hostile"),
        )
        .unwrap();
        let answer = Arc::new(std::sync::Mutex::new(Answer::Body(404, Vec::new())));
        let shared = answer.clone();
        let app = axum::Router::new().route(
            "/bundle",
            axum::routing::get(move || {
                let a = shared.lock().unwrap().clone();
                async move {
                    match a {
                        Answer::Body(status, body) => (axum::http::StatusCode::from_u16(status).unwrap(), body),
                        Answer::Hang => std::future::pending().await,
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hostile { addr, ca, answer }
    }

    fn answer(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }

    fn serve(&self, doc: &Bundle) {
        self.answer(Answer::Body(200, doc.to_document().unwrap().into_bytes()));
    }

    fn source(&self) -> Source {
        Source {
            trust_domain: foreign(),
            url: format!("https://localhost:{}/bundle", self.addr.port()),
            auth: EndpointAuth::Web(self.ca.clone()),
            timeout: Duration::from_millis(500),
        }
    }
}

fn foreign() -> TrustDomain {
    TrustDomain::new("foreign.example").unwrap()
}

fn root_cert(name: &str, ttl: Duration, now: SystemTime) -> Cert {
    let params = RootParams { ttl, ..RootParams::new(name) };
    CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &params, now).unwrap().cert().clone()
}

/// Each bad answer is refused with a status that names what was wrong, and the last good bundle
/// is kept throughout; a good one replaces it again.
#[tokio::test(flavor = "multi_thread")]
async fn bad_bundles_and_a_hanging_endpoint_are_refused_and_the_last_good_one_is_kept() {
    let h = Hostile::start().await;
    let source = h.source();
    let now = SystemTime::now();
    let doc = |authorities: Vec<Cert>, sequence: u64| Bundle {
        trust_domain: foreign(),
        sequence,
        refresh_hint: Some(Duration::from_secs(5)),
        authorities,
    };
    let good = doc(vec![root_cert("good", Duration::from_secs(86400), now)], 4);
    h.serve(&good);
    let mut state = Federated::new(None, now);
    state = state.observe(fetch(&source, None, now).await, now);
    assert_eq!(state.last_good.as_ref(), Some(&good));
    assert_eq!(state.next_fetch, now + Duration::from_secs(30), "a 5 s hint is raised to the 30 s floor");

    // Certificates made for the cases: a leaf (not a CA), a root that expires in a minute, a CA
    // of another trust domain (OpenSSL, with its URI SAN).
    let signer =
        CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("x"), now).unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let id = SpiffeId::new(foreign(), "workload").unwrap();
    let leaf = signer.sign_leaf(key.public_key_spki(), &LeafParams::workload(id, Duration::from_secs(600)), now);
    let leaf = Cert::from_der(leaf.unwrap().der).unwrap();
    let short = root_cert("short", Duration::from_secs(60), now);
    let dir = tempfile::tempdir().unwrap();
    let extensions = [
        "basicConstraints=critical,CA:TRUE",
        "keyUsage=critical,keyCertSign",
        "subjectAltName=URI:spiffe://mesh.example",
    ];
    let (c, _) = openssl::self_signed(dir.path(), "c", KeyType::P256, "/O=elsewhere", 2, &extensions);
    let elsewhere = Cert::from_pem(&std::fs::read(c).unwrap()).unwrap();
    let later = now + Duration::from_secs(120);

    let cases: Vec<(&str, Answer, SystemTime, &str)> = vec![
        (
            "a key that is not a CA",
            Answer::Body(200, doc(vec![leaf], 5).to_document().unwrap().into()),
            now,
            "is not a CA",
        ),
        ("an expired root", Answer::Body(200, doc(vec![short], 5).to_document().unwrap().into()), later, "expired at"),
        (
            "a root of another trust domain",
            Answer::Body(200, doc(vec![elsewhere], 5).to_document().unwrap().into()),
            now,
            "belongs to trust domain mesh.example",
        ),
        (
            "a document over the size limit",
            Answer::Body(200, vec![b' '; meshca_spiffe_bundle::MAX_DOCUMENT_BYTES + 1]),
            now,
            "larger than",
        ),
        ("an endpoint that hangs", Answer::Hang, now, "no answer from"),
        ("an error status", Answer::Body(503, b"down".to_vec()), now, "HTTP status 503"),
        ("not JSON", Answer::Body(200, b"<html>".to_vec()), now, "not a SPIFFE bundle"),
        (
            "an older sequence with other roots",
            Answer::Body(
                200,
                doc(vec![root_cert("old", Duration::from_secs(86400), now)], 2).to_document().unwrap().into(),
            ),
            now,
            "went back from sequence 4 to 2",
        ),
    ];
    let mut first_failure = None;
    for (what, answer, at, expected) in cases {
        h.answer(answer);
        state = state.observe(fetch(&source, state.last_good.as_ref(), at).await, at);
        let (why, since) = state.failure.clone().unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(why.contains(expected), "{what}: {why}");
        assert!(why.contains("foreign.example"), "{what}: the status names the trust domain: {why}");
        assert_eq!(state.last_good.as_ref(), Some(&good), "{what}: the last good bundle is kept");
        assert_eq!(state.next_fetch, at + meshca_mgmt::federation::fetch::retry_after(since, at), "{what}");
        assert_eq!(*first_failure.get_or_insert(since), since, "failing since the first failure");
    }

    // The endpoint recovers: a newer bundle replaces the last good one and clears the failure.
    let newer = doc(vec![root_cert("newer", Duration::from_secs(86400), now)], 6);
    h.serve(&newer);
    state = state.observe(fetch(&source, state.last_good.as_ref(), now).await, now);
    assert_eq!((state.last_good.as_ref(), state.failure.as_ref()), (Some(&newer), None));
}

/// The policy of a [`Plane`] of trust domain `own` (the same generated root and options as its
/// default policy, so applying it keeps the root), federating with `foreign`: `(trust domain,
/// bundle endpoint URL)` pairs over `https_web` under `web_ca`.
fn federating_policy(own: &TrustDomain, foreign: &[(&TrustDomain, String)], web_ca: &RootSet) -> String {
    let ca = serde_json::to_string(&web_ca.to_pem()).unwrap();
    let entries: String = foreign
        .iter()
        .map(|(td, url)| {
            format!(
                "    - {{ trustDomain: {td}, bundleEndpointUrl: \"{url}\", profile: https_web, endpointCa: {ca} }}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  trustDomain: {own}\n  \
         config: {{ generated: {{}} }}\n  intermediateCertOptions: {{ ttl: 1h }}\n  rootRotation: {{ maxLeafLifetime: 10s, skew: 1s }}\n  \
         federation:\n{entries}"
    )
}

/// A workload of a [`Plane`]: a leaf for `id` signed by the plane's generated root (the way a
/// cluster's workload CA signs one, without the cluster intermediate in between), and the TLS
/// configs of a workload of that mesh: its verifier trusts the plane's roots for its own trust
/// domain and, for each foreign trust domain, exactly the bundle the plane hands its clusters.
struct MeshWorkload {
    leaf: Cert,
    key: Arc<rustls::sign::CertifiedKey>,
    verifier: Arc<SpiffeVerifier>,
}

impl MeshWorkload {
    async fn new(p: &Plane, own: &TrustDomain, id: &str) -> MeshWorkload {
        let w = MeshWorkload::of(p, &Keyspace::legacy(), id).await;
        w.follow(p, own).await;
        w
    }

    /// A workload of the mesh whose records are `keys`, trusting only its own root for now.
    async fn of(p: &Plane, keys: &Keyspace, id: &str) -> MeshWorkload {
        let rec = p.store.get(&keys.root_ca()).await.unwrap().unwrap();
        let root = Cert::from_pem(rec.value.get("ca-cert.pem").unwrap()).unwrap();
        let signer =
            CaSigner::new(PrivateKey::from_pem(rec.value.get("ca-key.pem").unwrap()).unwrap(), vec![root]).unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let params = LeafParams::workload(id.parse().unwrap(), Duration::from_secs(3600));
        let leaf =
            Cert::from_der(signer.sign_leaf(key.public_key_spki(), &params, p.clock.now()).unwrap().der).unwrap();
        let ck = meshca_tls::Identity::new(&leaf, &[], &key).certified_key().unwrap();
        let roots = RootSet::from_pem(rec.value.get("ca-cert.pem").unwrap()).unwrap();
        let verifier = SpiffeVerifier::new(&roots, PeerPolicy::Trusted, true).unwrap();
        MeshWorkload { leaf, key: ck, verifier }
    }

    /// Applies what the plane's trust stream carries now ([`poll::bundles`] of the stored record).
    async fn follow(&self, p: &Plane, own: &TrustDomain) -> Vec<(TrustDomain, RootSet)> {
        let bundles = p.distributed().await;
        self.verifier.set_federation(own, &bundles).unwrap();
        bundles
    }

    /// One mutual TLS handshake (and a byte each way) from `self` to `server` over a socket.
    async fn handshake(&self, server: &MeshWorkload) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sc = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(server.verifier.clone())
            .with_cert_resolver(meshca_tls::SwappableCert::new(server.key.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
        let serve = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("server: {e}"))?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| format!("server read: {e}"))?;
            tls.write_all(&b).await.map_err(|e| format!("server write: {e}"))?;
            tls.shutdown().await.ok();
            Ok::<(), String>(())
        });
        let cc = meshca_tls::client_config(
            ServerTrust::Verifier(self.verifier.clone()),
            ClientAuth::Resolver(meshca_tls::SwappableCert::new(self.key.clone())),
            Versions::Tls13,
        )
        .unwrap();
        let client = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::try_from("workload").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("client: {e}"))?;
            tls.write_all(b"x").await.map_err(|e| format!("client write: {e}"))?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| format!("client read: {e}"))?;
            Ok::<(), String>(())
        };
        let c = tokio::time::timeout(Duration::from_secs(10), client).await.map_err(|_| "timed out".to_string())?;
        let s =
            tokio::time::timeout(Duration::from_secs(10), serve).await.map_err(|_| "server timed out".to_string())?;
        c.and(s.unwrap())
    }
}

impl Plane {
    /// The foreign bundles this plane hands its clusters now (what `TrustState.federated_bundles`
    /// carries: the stored record, filtered by the policy in force).
    async fn distributed(&self) -> Vec<(TrustDomain, RootSet)> {
        let Some(policy) = self.policy().await else { return Vec::new() };
        let record = poll::read(self.store.as_ref(), &meshca_mgmt::records::Keyspace::legacy()).await.unwrap();
        poll::bundles(&record, &policy.federation)
            .into_iter()
            .map(|b| (TrustDomain::new(&b.trust_domain).unwrap(), RootSet::from_pem(b.roots.as_bytes()).unwrap()))
            .collect()
    }

    /// The applied policy (`None`: the default one, which federates with nobody).
    async fn policy(&self) -> Option<Policy> {
        let rec = self.store.get(&meshca_mgmt::records::policy()).await.unwrap()?;
        Some(Policy::from_yaml(std::str::from_utf8(rec.value.get(meshca_mgmt::records::POLICY_KEY)?).unwrap()).unwrap())
    }

    async fn alerts(&self) -> Vec<meshca_proto::mgmt::Alert> {
        let mut op = self.operator().await;
        op.get_status(meshca_proto::mgmt::GetStatusRequest::default()).await.unwrap().into_inner().alerts
    }
}

/// Two meshes, each its own management plane, root and trust domain, each serving its bundle
/// endpoint (`https_web`). A cross-mesh mutual TLS handshake between their workloads fails until
/// each policy federates with the other; then each plane polls the other's endpoint and hands its
/// bundle (and only for its trust domain) to its clusters, and the handshake succeeds both ways —
/// with meshca's verifier, and `openssl verify` agrees on the distributed file. A foreign leaf
/// claiming the mesh's own trust domain is still refused. When one endpoint goes down, the other
/// plane keeps its last good bundle (the handshake still works) and raises `FederationFailing`.
#[tokio::test(flavor = "multi_thread")]
async fn two_meshes_federate_through_their_bundle_endpoints() {
    meshca_tls::provider::install();
    let now = SystemTime::now();
    let (web_roots, ck) = web_identity(now);
    let (ta, tb) = (TrustDomain::new("a.example").unwrap(), TrustDomain::new("b.example").unwrap());
    let a = Plane::start_as(None, ManualClock::new(now), Profile::Web(ck.clone()), &ta).await;
    let b = Plane::start_as(None, ManualClock::new(now), Profile::Web(ck), &tb).await;
    let wa = MeshWorkload::new(&a, &ta, "spiffe://a.example/ns/default/sa/sleep").await;
    let wb = MeshWorkload::new(&b, &tb, "spiffe://b.example/ns/default/sa/httpbin").await;

    // Not federated: each mesh refuses the other's workloads.
    let e = wa.handshake(&wb).await.expect_err("no federation");
    assert!(e.contains("UnknownIssuer") || e.contains("certificate"), "{e}");
    assert!(wb.handshake(&wa).await.is_err());

    // Each federates with the other.
    let url = |p: &Plane| format!("https://localhost:{}/", p.bundle.port());
    for (p, own, other, other_url) in [(&a, &ta, &tb, url(&b)), (&b, &tb, &ta, url(&a))] {
        let yaml = federating_policy(own, &[(other, other_url)], &web_roots);
        p.operator().await.apply_policy(meshca_proto::mgmt::ApplyPolicyRequest { policy: yaml }).await.unwrap();
    }
    let (ra, rb) = (a.roots().await, b.roots().await);
    eventually(WAIT, "A holds B's bundle", || async {
        (a.distributed().await == vec![(tb.clone(), rb.clone())]).then_some(())
    })
    .await;
    eventually(WAIT, "B holds A's bundle", || async {
        (b.distributed().await == vec![(ta.clone(), ra.clone())]).then_some(())
    })
    .await;
    assert_eq!(a.roots().await, ra, "federating did not touch the mesh's own root");
    wa.follow(&a, &ta).await;
    wb.follow(&b, &tb).await;
    wa.handshake(&wb).await.expect("A -> B once federated");
    wb.handshake(&wa).await.expect("B -> A once federated");

    // openssl agrees: B's distributed bundle for a.example verifies A's workload leaf; B's own
    // roots do not.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.example.pem"), b.distributed().await[0].1.to_pem()).unwrap();
    std::fs::write(dir.path().join("own.pem"), rb.to_pem()).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), wa.leaf.to_pem()).unwrap();
    let out = meshca_testsupport::openssl::openssl_ok(dir.path(), &["verify", "-CAfile", "a.example.pem", "leaf.pem"]);
    assert!(out.contains("leaf.pem: OK"), "{out}");
    let (ok, out) = meshca_testsupport::openssl::openssl(dir.path(), &["verify", "-CAfile", "own.pem", "leaf.pem"]);
    assert!(!ok, "{out}");

    // A leaf under A's root claiming B's trust domain is refused by B's workloads.
    let impostor = MeshWorkload::new(&a, &ta, "spiffe://b.example/ns/default/sa/httpbin").await;
    assert!(impostor.handshake(&wb).await.is_err(), "a foreign root never vouches for the mesh's own trust domain");

    // A's endpoint goes down: B keeps A's bundle and raises the alert once its next fetch fails.
    assert!(b.alerts().await.iter().all(|x| x.kind() != meshca_proto::AlertKind::FederationFailing));
    a.stop().await;
    b.clock.advance(Duration::from_secs(61));
    let alert = eventually(WAIT, "FederationFailing", || async {
        b.alerts().await.into_iter().find(|x| x.kind() == meshca_proto::AlertKind::FederationFailing)
    })
    .await;
    assert!(alert.message.contains("federation with a.example"), "{}", alert.message);
    assert!(alert.message.contains("the last good bundle (sequence"), "{}", alert.message);
    assert_eq!(b.distributed().await, vec![(ta.clone(), ra.clone())], "the last good bundle is kept");
    wb.follow(&b, &tb).await;
    wb.handshake(&wa).await.expect("still federated with the last good bundle");
    b.stop().await;
}

/// The policy set of [`two_policies_in_one_management_plane_are_two_meshes`]: `prod` (trust domain
/// prod.example, clusters by name) and `staging` (staging.example, clusters labelled
/// env=staging), each federating with the other's trust domain at `federate` (`None`: no
/// federation).
fn two_meshes(federate: Option<(&str, &RootSet)>) -> String {
    let fed = |other: &str| match federate {
        Some((base, ca)) => format!(
            "  federation:\n    - {{ trustDomain: {other}, bundleEndpointUrl: \"{base}{other}\", profile: https_web, endpointCa: {} }}\n",
            serde_json::to_string(&ca.to_pem()).unwrap()
        ),
        None => String::new(),
    };
    let common = "  config: { generated: {} }\n  intermediateCertOptions: { ttl: 1h }\n  rootRotation: { maxLeafLifetime: 10s, skew: 1s }\n";
    format!(
        "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: prod }}\nspec:\n  trustDomain: prod.example\n  \
         clusters: [east-1, clash]\n{common}{}---\napiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: staging }}\n\
         spec:\n  trustDomain: staging.example\n  clusterSelector: {{ matchLabels: {{ env: staging }} }}\n{common}{}",
        fed("staging.example"),
        fed("prod.example")
    )
}

/// Two RootTrustPolicies in one management plane are two meshes: each its own generated root (its
/// own records), trust domain, clusters (by name and by label), status, bundle at
/// `/<trust domain>` and root rotation. A cluster both select is refused naming both
/// (`ClusterPolicyConflict`); one neither selects is shown as such. A cross-mesh mutual TLS
/// handshake fails until each policy federates with the other — through this same plane's bundle
/// endpoint — and then succeeds both ways. Rotating one mesh's root leaves the other's untouched.
#[tokio::test(flavor = "multi_thread")]
async fn two_policies_in_one_management_plane_are_two_meshes() {
    use meshca_mgmt::records::ClusterRecord;
    use meshca_proto::mgmt::{ApplyPolicyRequest, GetStatusRequest};
    meshca_tls::provider::install();
    let now = SystemTime::now();
    let (web_roots, ck) = web_identity(now);
    let p = Plane::start(None, ManualClock::new(now), Profile::Web(ck)).await;
    let (tp, ts) = (TrustDomain::new("prod.example").unwrap(), TrustDomain::new("staging.example").unwrap());
    let applied = p.operator().await.apply_policy(ApplyPolicyRequest { policy: two_meshes(None) }).await.unwrap();
    let generations = applied.into_inner().generations;
    assert_eq!(generations.len(), 2, "{generations:?}");
    // Each mesh has records of its own: a new mesh never inherits the earlier one's root.
    let (kp, ks) = (Keyspace::named("prod"), Keyspace::named("staging"));
    let root_of = |keys: Keyspace| {
        let store = p.store.clone();
        async move {
            RootSet::from_pem(store.get(&keys.root_ca()).await.unwrap().unwrap().value.get("ca-cert.pem").unwrap())
                .unwrap()
        }
    };
    let (rp, rs) = (root_of(kp.clone()).await, root_of(ks.clone()).await);
    assert_ne!(rp.fingerprint(), rs.fingerprint());
    assert_ne!(rp.fingerprint(), p.roots().await.fingerprint(), "the first mesh's root stays with its records");

    // Clusters: by name, by label, in both (refused), in neither (left alone).
    let labelled = |v: &[(&str, &str)]| v.iter().map(|(k, x)| (k.to_string(), x.to_string())).collect();
    for (name, labels) in [
        ("east-1", labelled(&[])),
        ("staging-1", labelled(&[("env", "staging")])),
        ("clash", labelled(&[("env", "staging")])),
        ("lone", labelled(&[("env", "dev")])),
    ] {
        let rec = ClusterRecord { name: name.into(), registered_at: 1, labels, ..Default::default() };
        typed::put(
            p.store.as_ref(),
            &meshca_mgmt::records::cluster(name).unwrap(),
            &rec,
            meshca_store::Precondition::Absent,
        )
        .await
        .unwrap();
    }
    let mut op = p.operator().await;
    let all = op.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    let names: Vec<&str> = all.meshes.iter().map(|m| m.policy.as_str()).collect();
    assert_eq!(names, ["prod", "staging"]);
    assert_eq!(all.meshes[0].trust_domain, "prod.example");
    assert_eq!(all.meshes[1].roots[0].fingerprint, rs.iter().next().unwrap().fingerprint());
    let placed =
        |c: &str| all.clusters.iter().find(|v| v.name == c).map(|v| (v.policy.clone(), v.placement.clone())).unwrap();
    assert_eq!(placed("east-1").0, "prod");
    assert_eq!(placed("staging-1").0, "staging");
    assert!(placed("lone").1.contains("selected by no RootTrustPolicy"), "{:?}", placed("lone"));
    let clash = placed("clash");
    assert!(clash.0.is_empty() && clash.1.contains("prod and staging"), "{clash:?}");
    let conflict = all.alerts.iter().find(|a| a.kind() == meshca_proto::AlertKind::ClusterPolicyConflict).unwrap();
    assert_eq!(conflict.cluster, "clash");
    let staging = op.get_status(GetStatusRequest { policy: "staging".into() }).await.unwrap().into_inner();
    let cs: Vec<&str> = staging.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(cs, ["staging-1"], "a policy's status lists its own clusters");
    let e = op.get_status(GetStatusRequest { policy: "nope".into() }).await.unwrap_err();
    assert!(e.message().contains("prod, staging"), "{e:?}");

    // Each trust domain's bundle at its own path; the bare path names them.
    let web =
        meshca_tls::client_config(ServerTrust::Roots(&web_roots), ClientAuth::None, Versions::Tls13And12).unwrap();
    for (td, roots) in [(&tp, &rp), (&ts, &rs)] {
        let resp = p.get(web.clone(), &format!("/{td}")).await.unwrap();
        assert_eq!(resp.status, 200);
        let b = Bundle::parse(&resp.body, td, p.clock.now()).unwrap();
        assert_eq!(RootSet::from_certs(b.authorities.clone()).unwrap().fingerprint(), roots.fingerprint());
    }
    let bare = p.get(web.clone(), "/").await.unwrap();
    assert_eq!(bare.status, 404);
    assert!(String::from_utf8_lossy(&bare.body).contains("/prod.example"));

    // Not federated: each mesh refuses the other's workloads.
    let wp = MeshWorkload::of(&p, &kp, "spiffe://prod.example/ns/default/sa/sleep").await;
    let ws = MeshWorkload::of(&p, &ks, "spiffe://staging.example/ns/default/sa/httpbin").await;
    assert!(wp.handshake(&ws).await.is_err());
    assert!(ws.handshake(&wp).await.is_err());

    // Each federates with the other, through this plane's own endpoint.
    let base = format!("https://localhost:{}/", p.bundle.port());
    op.apply_policy(ApplyPolicyRequest { policy: two_meshes(Some((&base, &web_roots))) }).await.unwrap();
    let held = |keys: Keyspace, name: &'static str| {
        let store = p.store.clone();
        async move {
            let text = store.get(&meshca_mgmt::records::policy()).await.unwrap().unwrap();
            let set = meshca_policy::PolicySet::from_yaml(
                std::str::from_utf8(text.value.get(meshca_mgmt::records::POLICY_KEY).unwrap()).unwrap(),
            )
            .unwrap();
            let record = poll::read(store.as_ref(), &keys).await.unwrap();
            poll::bundles(&record, &set.get(name).unwrap().federation)
                .into_iter()
                .map(|b| (TrustDomain::new(&b.trust_domain).unwrap(), RootSet::from_pem(b.roots.as_bytes()).unwrap()))
                .collect::<Vec<_>>()
        }
    };
    eventually(WAIT, "prod holds staging's bundle", || async {
        (held(kp.clone(), "prod").await == vec![(ts.clone(), rs.clone())]).then_some(())
    })
    .await;
    eventually(WAIT, "staging holds prod's bundle", || async {
        (held(ks.clone(), "staging").await == vec![(tp.clone(), rp.clone())]).then_some(())
    })
    .await;
    wp.verifier.set_federation(&tp, &held(kp.clone(), "prod").await).unwrap();
    ws.verifier.set_federation(&ts, &held(ks.clone(), "staging").await).unwrap();
    wp.handshake(&ws).await.expect("prod -> staging once federated");
    ws.handshake(&wp).await.expect("staging -> prod once federated");

    // A root rotation names its mesh; rotating prod's root leaves staging's alone.
    let e = op.rotate_root(RotateRootRequest::default()).await.unwrap_err();
    assert!(e.message().contains("several RootTrustPolicies (prod, staging)"), "{e:?}");
    let r = op.rotate_root(RotateRootRequest { policy: "prod".into(), abort: false }).await.unwrap().into_inner();
    assert_eq!(r.phase(), RotationPhase::Distributing, "{}", r.message);
    let journal = |keys: Keyspace| {
        let store = p.store.clone();
        async move { meshca_mgmt::rotation::controller::read_journal(store.as_ref(), &keys).await.unwrap().value }
    };
    assert!(journal(kp.clone()).await.rotation.is_some());
    assert!(journal(ks.clone()).await.rotation.is_none(), "staging's root is not rotating");
    let after = op.get_status(GetStatusRequest { policy: "staging".into() }).await.unwrap().into_inner();
    assert_eq!(after.root_set_fingerprint, rs.fingerprint(), "staging's root set is untouched");
    assert_eq!(after.policy_generation, staging.policy_generation);
    p.stop().await;
}
