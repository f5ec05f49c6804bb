//! tonic over meshca's rustls configs.
//!
//! tonic's built-in TLS cannot take a custom rustls config (a SPIFFE verifier, optional client
//! auth, a hot-swappable certificate), so the server accepts TLS itself and hands tonic the
//! streams, and the client dials through a connector. The peer's certificates stay reachable
//! from handlers through tonic's `TlsConnectInfo` (`Request::peer_certs`).

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Channel, Endpoint};

use crate::TlsError;

/// How long a client may take to finish the TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets the ALPN protocol gRPC needs.
pub fn server_config_for_grpc(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Accepts TCP connections and completes TLS handshakes concurrently, yielding established
/// streams. A failed or slow handshake is logged and dropped; it never stops the server.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
    tls_incoming_routed(listener, config, |tcp, _| Some(tcp))
}

/// [`tls_incoming`] with a say, before TLS, over each accepted connection: `route` returns it
/// to be served here, or takes it (to hand it elsewhere, or to close it) and returns `None`.
/// A replicated management plane uses this to serve only while it leads.
pub fn tls_incoming_routed(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    route: impl Fn(TcpStream, std::net::SocketAddr) -> Option<TcpStream> + Send + 'static,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // Stop accepting once the server (the receiver) is gone.
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // gRPC answers a unary call with several small writes (headers, data, trailers); with
            // Nagle on, the last one waits for the client's delayed ACK: +40 ms on every call.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "setting TCP_NODELAY failed");
            }
            let Some(tcp) = route(tcp, peer) else { continue };
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A lazily-connecting gRPC channel to `address` (`host:port`) over TLS with `config`, sending
/// `server_name` as SNI (and checking it, when the config's verifier checks names).
pub fn channel(address: &str, config: ClientConfig, server_name: &str) -> Result<Channel, TlsError> {
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(server_name.to_string()).map_err(|_| TlsError::Endpoint(server_name.into()))?;
    let addr = address.to_string();
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|_| TlsError::Endpoint(address.into()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        let name = name.clone();
        let addr = addr.clone();
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    })))
}

/// The client certificates of a request's connection (leaf first), when the client sent any.
pub fn peer_certs<T>(req: &tonic::Request<T>) -> Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.peer_certs())
}
