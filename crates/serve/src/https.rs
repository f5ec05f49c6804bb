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
