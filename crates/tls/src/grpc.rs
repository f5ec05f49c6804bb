//! tonic over meshca's rustls configs.
//!
//! tonic's built-in TLS cannot take a custom rustls config (a SPIFFE verifier, optional client
//! auth, a hot-swappable certificate), so the client dials through a connector, and the servers
//! accept TLS themselves (`meshca-serve`, which also caps, times out and drains connections). The
//! peer's certificates stay reachable from handlers through tonic's `TlsConnectInfo`
//! ([`peer_certs`]).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::TlsError;

/// Sets the ALPN protocol gRPC needs.
pub fn server_config_for_grpc(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
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
