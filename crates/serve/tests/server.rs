//! `GrpcServer` in process, over real TLS on 127.0.0.1, serving Istio's CA API from a test
//! service whose calls answer at once or hang until the test lets them go. Timeouts are short
//! (hundreds of milliseconds) so the tests run in real time; what is asserted is behaviour —
//! which connections are closed, which calls are answered, that the server returns — never how
//! fast. A generous deadline only turns a hang into a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca_pki::{CaSigner, KeyAlgorithm, LeafParams, PrivateKey, RootParams, RootSet};
use meshca_proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_proto::istio::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
use meshca_proto::istio::{IstioCertificateRequest, IstioCertificateResponse};
use meshca_serve::conn::CloseReason;
use meshca_serve::{Caps, GrpcServer, ServeConfig, ServeMetrics};
use meshca_tls::{ClientAuth, Identity, ServerTrust, SwappableCert, Versions};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// A CSR of `"hang"` waits for a permit from the gate; anything else is answered at once.
struct TestCa {
    gate: Arc<Semaphore>,
}

#[tonic::async_trait]
impl IstioCertificateService for TestCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        if request.get_ref().csr == "hang" {
            self.gate.acquire().await.map_err(|_| Status::internal("gate closed"))?.forget();
        }
        Ok(Response::new(IstioCertificateResponse { cert_chain: vec!["ok".into()] }))
    }
}

struct Harness {
    addr: SocketAddr,
    roots: RootSet,
    gate: Arc<Semaphore>,
    metrics: ServeMetrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

fn config() -> ServeConfig {
    ServeConfig {
        caps: Caps { total: 1000, per_peer: 100, per_identity: 100 },
        handshake_timeout: Duration::from_millis(500),
        preface_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(700),
        drain_timeout: Duration::from_millis(800),
        ..ServeConfig::default()
    }
}

impl Harness {
    async fn start(cfg: ServeConfig) -> Harness {
        meshca_tls::provider::install();
        let now = SystemTime::now();
        let root =
            CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("t"), now)
                .unwrap();
        let roots = RootSet::from_certs(vec![root.cert().clone()]).unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let params = LeafParams { identity: None, dns_names: vec!["localhost".into()], ttl: Duration::from_secs(3600) };
        let leaf = root.sign_leaf(key.public_key_spki(), &params, now).unwrap().parse().unwrap();
        let ck = Identity::new(&leaf, &[], &key).certified_key().unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(SwappableCert::new(ck));
        let tls = meshca_tls::grpc::server_config_for_grpc(tls);
        let gate = Arc::new(Semaphore::new(0));
        let routes = tonic::service::Routes::new(IstioCertificateServiceServer::new(TestCa { gate: gate.clone() }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = ServeMetrics::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = GrpcServer::new(tls, routes, cfg, metrics.clone());
        let served = tokio::spawn(server.serve(listener, async move {
            let _ = stopped.await;
        }));
        Harness { addr, roots, gate, metrics, stop: Some(stop), served }
    }

    fn client(&self) -> IstioCertificateServiceClient<Channel> {
        let config =
            meshca_tls::client_config(ServerTrust::Roots(&self.roots), ClientAuth::None, Versions::Tls13).unwrap();
        IstioCertificateServiceClient::new(
            meshca_tls::grpc::channel(&self.addr.to_string(), config, "localhost").unwrap(),
        )
    }

    /// A TLS connection that sends nothing after the handshake.
    async fn silent_tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut config =
            meshca_tls::client_config(ServerTrust::Roots(&self.roots), ClientAuth::None, Versions::Tls13).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap()
    }

    /// Stops the server and waits (at most `within`) for `serve` to return.
    async fn stop(mut self, within: Duration) -> ServeMetrics {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(within, &mut self.served)
            .await
            .expect("the server returned within its drain timeout")
            .unwrap();
        self.metrics
    }
}

async fn call(c: &mut IstioCertificateServiceClient<Channel>, csr: &str) -> Result<Vec<String>, Status> {
    c.create_certificate(IstioCertificateRequest { csr: csr.into(), validity_duration: 0, metadata: None })
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// Reads until the server closes the connection; `true` if it did within `within`.
async fn closed_by_server(mut io: impl tokio::io::AsyncRead + Unpin, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A plain TCP connection that never starts TLS, and a TLS connection that never sends the HTTP/2
/// preface, are each closed by the server; a client that did send its preface keeps its
/// connection and is answered on it well past both timeouts (it is never mistaken for one that
/// did not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_a_talking_one_is_kept() {
    let h = Harness::start(config()).await;
    let plain = TcpStream::connect(h.addr).await.unwrap();
    let silent = h.silent_tls().await;
    let mut c = h.client();
    call(&mut c, "warm").await.unwrap();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        call(&mut c, "again").await.expect("the talking client keeps being answered");
    }
    assert!(closed_by_server(plain, Duration::from_secs(10)).await, "the silent TCP connection is closed");
    assert!(closed_by_server(silent, Duration::from_secs(10)).await, "the TLS connection without a preface is closed");
    let m = h.stop(Duration::from_secs(10)).await;
    assert_eq!(m.closed_count(CloseReason::HandshakeTimeout), 1);
    assert_eq!(
        m.closed_count(CloseReason::PrefaceTimeout),
        1,
        "only the silent one: the talking one had sent its preface"
    );
    assert_eq!(m.accepted.get(), 3, "the talking client used one connection throughout");
}

/// A connection whose call is in flight past the idle timeout keeps it; once the call ends and
/// the idle timeout passes with nothing in flight, the server sends a GOAWAY and closes it — and
/// the client simply reconnects for its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_connections_with_nothing_in_flight_are_idle() {
    let h = Harness::start(config()).await;
    let mut c = h.client();
    call(&mut c, "warm").await.unwrap();
    let mut hung = c.clone();
    let long = tokio::spawn(async move { call(&mut hung, "hang").await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.metrics.closed_count(CloseReason::Idle), 0, "a call in flight: not idle");
    h.gate.add_permits(1);
    long.await.unwrap().expect("the long call is answered");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.metrics.closed_count(CloseReason::Idle), 1, "idle after its last call");
    call(&mut c, "later").await.expect("the client reconnects");
    assert_eq!(h.metrics.accepted.get(), 2);
    h.stop(Duration::from_secs(10)).await;
}

/// Stopping: the listener closes at once; a call that finishes within the drain timeout is
/// answered; a call that never finishes, and a connection that never sent its preface, do not
/// keep the server: `serve` returns shortly after the drain timeout, and the hung call's client
/// gets an error rather than waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_calls_in_flight_and_returns_within_the_drain_timeout() {
    let cfg = ServeConfig { preface_timeout: Duration::from_secs(60), ..config() };
    let h = Harness::start(cfg).await;
    let addr = h.addr;
    let _silent = h.silent_tls().await;
    let (mut hung, mut finishing) = (h.client(), h.client());
    call(&mut hung, "warm").await.unwrap();
    call(&mut finishing, "warm").await.unwrap();
    let hung_call = tokio::spawn(async move { call(&mut hung, "hang").await });
    let finishing_call = tokio::spawn(async move { call(&mut finishing, "hang").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gate = h.gate.clone();
    let stopped = tokio::spawn(h.stop(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(addr).await.is_err(), "no new connections once stopping");
    gate.add_permits(1);
    let m = stopped.await.unwrap();
    let answers = [
        tokio::time::timeout(Duration::from_secs(10), hung_call).await.expect("no client left hanging").unwrap(),
        tokio::time::timeout(Duration::from_secs(10), finishing_call).await.expect("no client left hanging").unwrap(),
    ];
    assert_eq!(answers.iter().filter(|a| a.is_ok()).count(), 1, "the call that could finish did: {answers:?}");
    assert_eq!(answers.iter().filter(|a| a.is_err()).count(), 1, "the hung one was cut at the deadline: {answers:?}");
    assert!(m.closed_count(CloseReason::Stopping) >= 1);
}
