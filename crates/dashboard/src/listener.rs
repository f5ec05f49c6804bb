//! HTTPS for the dashboard: tokio-rustls under axum, with the client's certificate (when it
//! sent one) reaching the handlers as a [`Peer`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use meshca_pki::{Cert, RootSet};
use meshca_proto::identity::{Caller, RELAY_TRUST_DOMAIN};
use meshca_tls::{PeerPolicy, SpiffeVerifier, TlsError};
use rustls::server::ResolvesServerCert;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The dashboard's TLS configuration: the management plane's serving certificate (`cert`), and
/// an optional client certificate that must be an operator identity issued by the relay CA
/// (`relay`). A browser without one connects and gets the login page; a certificate that is not
/// an operator's (a cluster's agent, another CA) fails the handshake.
pub fn server_config(
    relay: &RootSet,
    cert: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let operators =
        SpiffeVerifier::new(relay, PeerPolicy::UriPrefix(format!("spiffe://{RELAY_TRUST_DOMAIN}/operator/")), false)?;
    let mut config = rustls::ServerConfig::builder_with_provider(meshca_tls::provider::get())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(operators)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The operator named by the client certificate, when one was presented (the handshake
    /// already checked it against the relay CA).
    pub operator: Option<String>,
}

/// How long a client may take to finish the TLS handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most dashboard connections open at once (handshaking or established). The dashboard is
/// for a few operators' browsers; past this, new connections are closed at once, so a client
/// holding idle sockets cannot take the process's file descriptors from the gRPC servers.
pub const MAX_CONNECTIONS: usize = 256;

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow client cannot hold
/// up the others), each within [`HANDSHAKE_TIMEOUT`], with at most [`MAX_CONNECTIONS`] open.
pub struct TlsListener {
    local: SocketAddr,
    incoming: mpsc::Receiver<Conn>,
}

/// An accepted connection; it holds its place under the cap until it is dropped.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl TlsListener {
    /// Serves TLS with `config` on `listener`. The accept task ends when this is dropped.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let (tx, incoming) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => break,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "dashboard: accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, cap = MAX_CONNECTIONS, "dashboard: connection refused at the connection cap");
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Conn { tls, _permit: permit }).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "dashboard: TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "dashboard: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, incoming })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Conn;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.recv().await {
                Some(conn) => {
                    let (tcp, session) = conn.tls.get_ref();
                    let Ok(addr) = tcp.peer_addr() else { continue };
                    let operator = session.peer_certificates().and_then(|c| c.first()).and_then(operator_name);
                    return (conn, Peer { addr, operator });
                }
                // The accept task ends only when this listener is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { addr: self.local, operator: None })
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

/// The operator a certificate names, if it names one.
fn operator_name(der: &rustls::pki_types::CertificateDer<'_>) -> Option<String> {
    let cert = Cert::from_der(der.to_vec()).ok()?;
    cert.uri_sans().iter().find_map(|u| match Caller::from_uri(u) {
        Some(Caller::Operator { name }) => Some(name),
        _ => None,
    })
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
