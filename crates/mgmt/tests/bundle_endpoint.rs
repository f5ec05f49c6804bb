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
use meshca_mgmt::federation::publish::{Sequences, sequences_key};
use meshca_mgmt::federation::{BundleEndpoint, Profile};
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
        meshca_tls::provider::install();
        let dir = dir.unwrap_or_else(|| Arc::new(tempfile::tempdir().unwrap()));
        let store = Arc::new(DirStore::open(dir.path().join("store")).unwrap());
        let mut policy = Policy::generated_default(Duration::from_secs(3600));
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
        let rec = self.store.get(&meshca_mgmt::records::root_ca()).await.unwrap().unwrap();
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
        let j = meshca_mgmt::rotation::controller::read_journal(self.store.as_ref()).await.unwrap().value;
        j.rotation.map_or(RotationPhase::Idle, |r| r.phase)
    }
}

/// A client authenticating the server as `https_spiffe` does: a chain to `roots`, and exactly
/// the SPIFFE ID `id`.
fn spiffe_client(roots: &RootSet, id: SpiffeId) -> rustls::ClientConfig {
    let verifier = SpiffeVerifier::new(roots, PeerPolicy::AnyOf(vec![id]), false).unwrap();
    meshca_tls::client_config(ServerTrust::Verifier(verifier), ClientAuth::None, Versions::Tls13And12).unwrap()
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
    let web_ca =
        CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("web"), now)
            .unwrap();
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let params = LeafParams { identity: None, dns_names: vec!["localhost".into()], ttl: Duration::from_secs(3600) };
    let leaf = Cert::from_der(web_ca.sign_leaf(key.public_key_spki(), &params, now).unwrap().der).unwrap();
    let ck = meshca_tls::Identity::new(&leaf, &[], &key).certified_key().unwrap();
    let p = Plane::start(None, ManualClock::new(now), Profile::Web(ck)).await;
    let web_roots = RootSet::from_certs(vec![web_ca.cert().clone()]).unwrap();
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

    let r = p.operator().await.rotate_root(RotateRootRequest { abort: false }).await.unwrap().into_inner();
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
