//! HTTPS for meshca's small axum servers (the dashboard, the SPIFFE bundle endpoint):
//! tokio-rustls under axum, with TLS handshakes completed concurrently (a slow client cannot hold
//! up the others), each within a deadline, and a cap on the connections open at once, so a client
//! holding idle sockets cannot take the process's file descriptors from the gRPC servers.
//!
//! What a handler learns of its peer is the server's choice ([`PeerOf`]): the dashboard reads the
//! operator from the client certificate; the bundle endpoint, which anyone may read, only the
//! address.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish the TLS handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The default cap on connections open at once (handshaking or established). These servers are
/// for a few browsers or a few federated peers polling every few minutes; past the cap, new
/// connections are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

/// What a server's handlers know of the other end of a connection, made once per connection
/// after its handshake.
pub trait PeerOf: Clone + Send + Sync + 'static {
    /// The peer at `addr`, over the established `tls` session (`None` for the listener's own
    /// address, which axum asks for).
    fn of(addr: SocketAddr, tls: Option<&rustls::ServerConnection>) -> Self;
}

/// Only the address.
impl PeerOf for SocketAddr {
    fn of(addr: SocketAddr, _tls: Option<&rustls::ServerConnection>) -> Self {
        addr
    }
}

/// Limits of one HTTPS listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Names the server in log lines (`dashboard`, `bundle endpoint`).
    pub server: &'static str,
    /// The TLS handshake's deadline from the accept.
    pub handshake_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// [`HANDSHAKE_TIMEOUT`] and [`MAX_CONNECTIONS`] for `server`.
    pub const fn new(server: &'static str) -> Self {
        Limits { server, handshake_timeout: HANDSHAKE_TIMEOUT, max_connections: MAX_CONNECTIONS }
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, each within the limits'
/// deadline, with at most their number of connections open. An `axum::serve::Listener`.
pub struct TlsListener<P> {
    local: SocketAddr,
    incoming: mpsc::Receiver<Conn>,
    _peer: std::marker::PhantomData<fn() -> P>,
}

/// An accepted connection; it holds its place under the cap until it is dropped.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl<P> TlsListener<P> {
    /// Serves TLS with `config` on `listener`. The accept task ends when this is dropped.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>, limits: Limits) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let (tx, incoming) = mpsc::channel(64);
        let server = limits.server;
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => break,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "{server}: accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, cap = limits.max_connections, "{server}: connection refused at the connection cap");
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Conn { tls, _permit: permit }).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "{server}: TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "{server}: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, incoming, _peer: std::marker::PhantomData })
    }
}

impl<P: PeerOf> axum::serve::Listener for TlsListener<P> {
    type Io = Conn;
    type Addr = P;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.recv().await {
                Some(conn) => {
                    let (tcp, session) = conn.tls.get_ref();
                    let Ok(addr) = tcp.peer_addr() else { continue };
                    let peer = P::of(addr, Some(session));
                    return (conn, peer);
                }
                // The accept task ends only when this listener is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(P::of(self.local, None))
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::SystemTime;

    use meshca_pki::{CaSigner, Cert, KeyAlgorithm, LeafParams, PrivateKey, RootParams, RootSet};
    use tokio::io::AsyncReadExt;

    use super::*;

    /// An HTTPS server (one route, `/`) behind a [`TlsListener`] with `limits`, serving a
    /// `localhost` certificate from a fresh CA; returns its address and that CA.
    async fn server(limits: Limits) -> (SocketAddr, RootSet) {
        meshca_tls::provider::install();
        let now = SystemTime::now();
        let ca = CaSigner::new_root(PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap(), &RootParams::new("t"), now)
            .unwrap();
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let params = LeafParams { identity: None, dns_names: vec!["localhost".into()], ttl: Duration::from_secs(600) };
        let leaf = Cert::from_der(ca.sign_leaf(key.public_key_spki(), &params, now).unwrap().der).unwrap();
        let ck = meshca_tls::Identity::new(&leaf, &[], &key).certified_key().unwrap();
        let config = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(meshca_tls::SwappableCert::new(ck));
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = TlsListener::<SocketAddr>::new(tcp, Arc::new(config), limits).unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, RootSet::from_certs(vec![ca.cert().clone()]).unwrap())
    }

    async fn get(addr: SocketAddr, roots: &RootSet) -> Result<String, meshca_http::HttpError> {
        let url = meshca_http::Url::parse(&format!("https://localhost:{}/", addr.port())).unwrap();
        let tls = meshca_tls::client_config(
            meshca_tls::ServerTrust::Roots(roots),
            meshca_tls::ClientAuth::None,
            meshca_tls::Versions::Tls13And12,
        )
        .unwrap();
        let r = meshca_http::Client::new(&url, Some(tls), Duration::from_secs(5), 1024)
            .unwrap()
            .send(http::Method::GET, "/", &[], None)
            .await?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// Whether the server closed `tcp` (a read ends) within `within`.
    async fn closed(tcp: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(within, tcp.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_handshake_is_dropped_at_the_deadline() {
        let limits = Limits { server: "test", handshake_timeout: Duration::from_millis(300), max_connections: 8 };
        let (addr, roots) = server(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut silent, Duration::from_secs(5)).await, "the silent client is disconnected");
        // Meanwhile, and after, others are served.
        assert_eq!(get(addr, &roots).await.unwrap(), "ok");
    }

    #[tokio::test]
    async fn past_the_cap_a_new_connection_is_closed_at_once_and_a_freed_slot_serves_again() {
        let limits = Limits { server: "test", handshake_timeout: Duration::from_secs(30), max_connections: 2 };
        let (addr, roots) = server(limits).await;
        let mut held = vec![TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap()];
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut third, Duration::from_secs(5)).await, "over the cap: closed");
        assert!(get(addr, &roots).await.is_err(), "no slot while two sockets are held");
        for h in &mut held {
            assert!(!closed(h, Duration::from_millis(100)).await, "the held connections stay open");
        }
        drop(held);
        let served = meshca_testsupport::wait::eventually(Duration::from_secs(5), "a freed slot", || async {
            get(addr, &roots).await.ok()
        })
        .await;
        assert_eq!(served, "ok");
    }
}
